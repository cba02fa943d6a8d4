"""Dynamic batching: requests that arrive together are generated together, and batching never
changes a greedy answer.

Batch formation is made deterministic without timing: either the batch window is made huge so
the worker waits until `max_batch_size` requests have arrived, or the test holds the model's lock
so that requests pile up in the queue and are then taken at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serving.client import client
from serving.engine import AbandonedError, CpuEngine, EngineClosedError, QueueFullError
from serving.server import create_app
from tests.serving.conftest import wait_until

FOREVER_MS = 600_000  # a batch window no test waits out: batches close by filling up
PROMPTS = ["1", "1 2 3", "Reverse the list:\n4 5 6", "9 8 7 6 5 4 3 2 1", "Reverse the list:\n1 2 3 4 5 6 7 8 9 0"]


@pytest.fixture
def make_engine(model_dir):
    """Build engines that record their batch sizes; all are closed after the test."""
    engines: list[CpuEngine] = []

    def make(**kwargs) -> CpuEngine:
        sizes: list[int] = []
        engine = CpuEngine(model_dir, max_new_tokens_limit=16, on_batch=sizes.append, **kwargs)
        engine.batch_sizes = sizes  # type: ignore[attr-defined]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def unbatched(model_dir):
    """The reference: each prompt generated alone with the batch primitive, bypassing the queue."""
    engine = CpuEngine(model_dir, max_new_tokens_limit=16)
    yield lambda ids, max_tokens: engine.generate_batch([ids], max_tokens)[0]
    engine.close()


def test_concurrent_greedy_requests_of_different_lengths_are_batched_without_changing_answers(make_engine, unbatched):
    engine = make_engine(max_batch_size=len(PROMPTS), batch_window_ms=FOREVER_MS)
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row is padded differently
    limits = [3, 16, 7, 12, 1]  # and each request has its own max_tokens

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(lambda args: engine.generate(*args), zip(prompts, limits)))

    assert engine.batch_sizes == [len(prompts)]
    assert answers == [unbatched(p, m) for p, m in zip(prompts, limits)]
    for answer, limit in zip(answers, limits):
        assert answer.completion_tokens <= limit
        assert answer.finish_reason == "stop" or answer.completion_tokens == limit


def test_greedy_and_sampled_requests_are_generated_in_separate_batches(make_engine, unbatched):
    engine = make_engine(max_batch_size=4, batch_window_ms=FOREVER_MS)
    ids = [engine.encode_prompt(p) for p in PROMPTS[:4]]
    submissions = [
        engine.submit(ids[0], 6),
        engine.submit(ids[1], 6, temperature=0.8, top_p=0.9),
        engine.submit(ids[2], 6),
        engine.submit(ids[3], 6, temperature=0.8, top_p=0.9),
    ]
    answers = [s.future.result(timeout=60) for s in submissions]
    assert engine.batch_sizes == [2, 2]  # one generate call per sampling setting
    assert [answers[0], answers[2]] == [unbatched(ids[0], 6), unbatched(ids[2], 6)]
    assert all(1 <= a.completion_tokens <= 6 for a in answers)


def test_a_streamed_request_is_batched_and_its_deltas_add_up_to_its_answer(make_engine, unbatched):
    engine = make_engine(max_batch_size=3, batch_window_ms=FOREVER_MS)
    ids = [engine.encode_prompt(p) for p in PROMPTS[1:4]]
    deltas: list[tuple[str, str | None]] = []
    streamed = engine.submit(ids[0], 12, on_delta=lambda text, finish: deltas.append((text, finish)))
    others = [engine.submit(i, 5) for i in ids[1:]]

    answer = streamed.future.result(timeout=60)
    assert engine.batch_sizes == [3]
    assert answer == unbatched(ids[0], 12)
    assert "".join(text for text, _ in deltas) == answer.text
    assert [finish for _, finish in deltas] == [None] * (len(deltas) - 1) + [answer.finish_reason]
    assert [o.future.result(timeout=60) for o in others] == [unbatched(i, 5) for i in ids[1:]]


def test_a_request_abandoned_mid_generation_stops_without_disturbing_its_batch(make_engine, unbatched):
    engine = make_engine(max_batch_size=2, batch_window_ms=FOREVER_MS)
    ids = [engine.encode_prompt(p) for p in PROMPTS[2:4]]
    deltas: list[str] = []
    box: dict = {}

    def abandon_after_first_delta(text: str, finish: str | None) -> None:
        deltas.append(text)
        box["submission"].cancel()  # as the server does when a client hangs up mid-stream

    # A stop token would end the row before it could be abandoned; this untrained model is
    # greedy-deterministic, so check that the reference answer really is long.
    assert unbatched(ids[0], 16).completion_tokens > 2
    box["submission"] = engine.submit(ids[0], 16, on_delta=abandon_after_first_delta)
    kept = engine.submit(ids[1], 8)

    with pytest.raises(AbandonedError):
        box["submission"].future.result(timeout=60)
    assert len(deltas) == 1  # nothing is streamed to an abandoned request
    assert kept.future.result(timeout=60) == unbatched(ids[1], 8)


def test_a_full_queue_refuses_and_a_cancelled_request_leaves_the_queue(make_engine):
    engine = make_engine(max_batch_size=1, batch_window_ms=0, max_queue=2)
    ids = engine.encode_prompt("1 2 3")
    with engine._lock:  # hold the model: requests pile up behind the first
        first = engine.submit(ids, 2)
        wait_until(lambda: engine.active == 1, "the worker took the first request")
        waiting = [engine.submit(ids, 2), engine.submit(ids, 2)]
        assert engine.queue_depth == 2
        with pytest.raises(QueueFullError, match="max_queue=2"):
            engine.submit(ids, 2)
        with pytest.raises(QueueFullError):  # all or nothing: a multi-prompt request too
            engine.submit_many([ids, ids], 2)
        waiting[0].cancel()
        assert engine.queue_depth == 1 and waiting[0].future.cancelled()
    assert first.future.result(timeout=60).completion_tokens >= 1
    assert waiting[1].future.result(timeout=60).completion_tokens >= 1
    assert engine.batch_sizes == [1, 1]  # the cancelled request was never generated


def test_close_fails_waiting_requests_and_stops_the_worker(make_engine):
    engine = make_engine(max_batch_size=1, batch_window_ms=0)
    ids = engine.encode_prompt("1 2 3")
    with engine._lock:
        running = engine.submit(ids, 4)
        wait_until(lambda: engine.active == 1, "the worker took the first request")
        waiting = engine.submit(ids, 4)
        closer = threading.Thread(target=engine.close)
        closer.start()
        with pytest.raises(EngineClosedError):
            waiting.future.result(timeout=30)
    closer.join(timeout=30)
    assert not engine._worker.is_alive()
    with pytest.raises(AbandonedError):  # the running batch was abandoned, not finished
        running.future.result(timeout=30)
    with pytest.raises(EngineClosedError):
        engine.submit(ids, 4)


def test_concurrent_http_requests_share_a_batch_and_keep_their_greedy_answers(model_dir, serve_app, unbatched):
    with serve_app(create_app(model_dir, "tiny", max_new_tokens_limit=16)) as server:
        engine, registry = server.app.state.engine, server.app.state.metrics.registry
        oai = client(server.base_url)
        messages = [[{"role": "user", "content": p}] for p in PROMPTS]

        def ask(m: list[dict]) -> str:
            return oai.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0).choices[0].message.content

        with ThreadPoolExecutor(max_workers=len(messages)) as pool:
            with engine._lock:
                first = pool.submit(ask, messages[0])
                wait_until(lambda: engine.active == 1, "the worker took the first request")
                rest = [pool.submit(ask, m) for m in messages[1:]]
                wait_until(lambda: engine.queue_depth == len(rest), "the other requests queued")
            answers = [first.result(timeout=60)] + [r.result(timeout=60) for r in rest]

        assert registry.get_sample_value("serving_batch_size_count") == 2
        assert registry.get_sample_value("serving_batch_size_sum") == len(messages)  # 1, then the other 4 together
        assert answers == [unbatched(engine.encode_chat(m), 8).text for m in messages]


def test_sampling_settings_are_validated_before_queueing(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1, 2], 2, temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1, 2], 17)
    assert engine.queue_depth == 0


def test_openai_client_sees_batched_sampling_as_well_formed(model_dir, serve_app):
    """Sampled requests arriving together (several sampling settings) all get answers."""
    with serve_app(create_app(model_dir, "tiny", max_new_tokens_limit=8)) as server:
        oai = client(server.base_url)
        settings = [(0.0, 1.0), (0.7, 0.9), (1.2, 1.0), (0.7, 0.9)]
        with ThreadPoolExecutor(max_workers=len(settings)) as pool:
            responses = list(
                pool.map(
                    lambda s: oai.completions.create(model="tiny", prompt="1 2 3", max_tokens=4, temperature=s[0], top_p=s[1]),
                    settings,
                )
            )
    assert all(isinstance(r, openai.types.Completion) and 1 <= r.usage.completion_tokens <= 4 for r in responses)
