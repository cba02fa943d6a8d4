"""Limits and injected faults: a full queue is a 429 with Retry-After, a request past its timeout
is a 504 and is abandoned, and the drill flags fail or delay generation requests on demand.

Slowness is made deterministic by holding the engine's model lock (nothing generates until the
test lets go) or by a fault delay far longer than the request timeout; no test measures time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from serving import server as server_module
from serving.client import client
from serving.dispatch import fault_fires
from serving.server import create_app
from tests.serving.conftest import wait_until

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Reverse the list:\n1 2 3"}]
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}


def batches(server) -> float:
    return server.app.state.metrics.registry.get_sample_value("serving_batch_size_count")


def errors(server, code: str) -> float:
    value = server.app.state.metrics.registry.get_sample_value(
        "serving_errors_total", {"endpoint": "/v1/chat/completions", "code": code}
    )
    return value or 0.0


def test_a_full_queue_answers_429_with_retry_after(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4, max_queue=1)) as s:
        engine, url = s.app.state.engine, f"{s.base_url}/chat/completions"
        with ThreadPoolExecutor(max_workers=2) as pool:
            with engine._lock:  # the model is busy: the first request runs, the second waits
                running = pool.submit(httpx.post, url, json=CHAT, timeout=60)
                wait_until(lambda: engine.active == 1, "the first request is generating")
                queued = pool.submit(httpx.post, url, json=CHAT, timeout=60)
                wait_until(lambda: engine.queue_depth == 1, "the second request is queued")

                refused = httpx.post(url, json=CHAT)
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                with pytest.raises(openai.RateLimitError):
                    client(s.base_url).chat.completions.create(**CHAT)
                streamed = httpx.post(url, json={**CHAT, "stream": True})
                assert streamed.status_code == 429  # refused before the stream starts
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert errors(s, "queue_full") == 3


def test_a_request_past_its_timeout_answers_504_and_is_abandoned(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4, request_timeout_s=0.3)) as s:
        engine, url = s.app.state.engine, f"{s.base_url}/chat/completions"
        with ThreadPoolExecutor(max_workers=2) as pool:
            with engine._lock:
                running = pool.submit(httpx.post, url, json=CHAT, timeout=60)
                wait_until(lambda: engine.active == 1, "the first request is generating")
                queued = pool.submit(httpx.post, url, json=CHAT, timeout=60)
                assert running.result().status_code == 504
                assert queued.result().status_code == 504
                assert queued.result().json()["error"]["code"] == "request_timeout"
                assert engine.queue_depth == 0  # the queued request was dropped, not left to run
                streamed = httpx.post(url, json={**CHAT, "stream": True}, timeout=60)
                assert streamed.status_code == 504  # no token within the timeout: no stream at all
                assert engine.queue_depth == 0
                generated_before = batches(s)
        # The abandoned requests cost no generation once the model is free: the next request's
        # batch is the only one.
        assert engine.generate(engine.encode_chat(MESSAGES), 2).completion_tokens >= 1
        assert batches(s) == generated_before + 1
        assert errors(s, "request_timeout") == 3


def test_a_failing_generation_answers_500_and_the_engine_keeps_serving(model_dir, serve_app, monkeypatch):
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4)) as s:
        engine, url = s.app.state.engine, f"{s.base_url}/chat/completions"

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.model, "generate", broken)
        failed = httpx.post(url, json=CHAT)
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error" and "boom" in failed.json()["error"]["message"]
        assert httpx.post(url, json={**CHAT, "stream": True}).status_code == 500
        monkeypatch.undo()
        assert httpx.post(url, json=CHAT).status_code == 200  # the worker survived the failed batches


def test_fault_fires_spreads_exactly_the_asked_share():
    assert [fault_fires(n, 0.5) for n in range(1, 7)] == [False, True] * 3
    assert [n for n in range(1, 13) if fault_fires(n, 0.25)] == [4, 8, 12]
    assert sum(fault_fires(n, 0.29) for n in range(1, 101)) == 29
    assert not any(fault_fires(n, 0.0) for n in range(1, 50))
    assert all(fault_fires(n, 1.0) for n in range(1, 50))


def test_fault_error_rate_answers_500_for_that_share_of_generation_requests(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4, fault_error_rate=0.5)) as s:
        url = f"{s.base_url}/chat/completions"
        statuses = [httpx.post(url, json=CHAT).status_code for _ in range(4)]
        assert statuses == [200, 500, 200, 500]
        assert httpx.post(url, json={**CHAT, "model": "nope"}).status_code == 404  # invalid requests are not counted
        assert httpx.post(url, json=CHAT).status_code == 200  # the 5th generation request
        with pytest.raises(openai.InternalServerError, match="injected fault"):  # the 6th, streamed
            client(s.base_url).chat.completions.create(**CHAT, stream=True)
        assert httpx.get(f"{s.root_url}/health").status_code == 200  # only generation fails
        assert errors(s, "injected_fault") == 3


def test_fault_delay_holds_answers_back_before_queueing(model_dir, serve_app):
    # A delay far beyond the timeout: the request times out while held back, before it ever
    # reaches the engine, and a streamed request gets no token (a 504 instead of a stream).
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4, fault_delay_s=600, request_timeout_s=0.3)) as s:
        url = f"{s.base_url}/chat/completions"
        assert httpx.post(url, json=CHAT, timeout=60).status_code == 504
        assert httpx.post(url, json={**CHAT, "stream": True}, timeout=60).status_code == 504
        assert httpx.post(f"{s.base_url}/completions", json={**CHAT, "prompt": "1"}, timeout=60).status_code == 504
        assert not batches(s)  # nothing was generated
        assert httpx.get(f"{s.root_url}/health").status_code == 200  # the delay applies to generation only


def test_a_small_fault_delay_still_answers(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL, max_new_tokens_limit=4, fault_delay_s=0.05)) as s:
        oai = client(s.base_url)
        assert oai.chat.completions.create(**CHAT).usage.completion_tokens >= 1
        chunks = list(oai.chat.completions.create(**CHAT, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_cli_flags_reach_their_settings(monkeypatch):
    monkeypatch.delenv(server_module.API_KEY_ENV, raising=False)
    base = ["--model-dir", "/m", "--model-name", "x"]
    defaults = server_module.parse_args(base)
    assert (defaults.max_batch_size, defaults.batch_window_ms, defaults.max_queue, defaults.request_timeout_s) == (16, 5.0, 64, 60.0)
    assert (defaults.fault_error_rate, defaults.fault_delay_s) == (0.0, 0.0)  # drills are opt-in
    args = server_module.parse_args(
        [*base, "--max-batch-size", "4", "--batch-window-ms", "2.5", "--max-queue", "8", "--request-timeout-s", "3",
         "--fault-error-rate", "0.2", "--fault-delay-s", "1.5"]
    )
    assert (args.max_batch_size, args.batch_window_ms, args.max_queue, args.request_timeout_s) == (4, 2.5, 8, 3.0)
    assert (args.fault_error_rate, args.fault_delay_s) == (0.2, 1.5)

    seen = {}
    monkeypatch.setattr(server_module, "create_app", lambda *a, **kw: seen.update(args=a, kwargs=kw))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    server_module.main([*base, "--max-queue", "8", "--fault-error-rate", "0.2"])
    assert seen["kwargs"]["max_queue"] == 8 and seen["kwargs"]["fault_error_rate"] == 0.2


@pytest.mark.parametrize(
    "flags",
    [["--fault-error-rate", "1.5"], ["--fault-delay-s", "-1"], ["--max-queue", "0"], ["--max-batch-size", "0"], ["--request-timeout-s", "0"]],
)
def test_cli_refuses_settings_out_of_range(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        server_module.parse_args(["--model-dir", "/m", "--model-name", "x", *flags])
    assert exit_.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_create_app_refuses_a_fault_rate_out_of_range(model_dir):
    with pytest.raises(ValueError, match="fault_error_rate"):
        create_app(model_dir, MODEL, fault_error_rate=2)
