"""What stands in front of the engines, through the real gateway app (uvicorn, real HTTP): the
response cache keyed by version, the priority queue with backpressure, per-key tiers and rate
limits, and the same shared through a real Redis by two gateways."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from pipelines.config import ServeParams
from serving.cache import MemoryCache
from serving.gateway import FrontDoor, create_gateway
from serving.keys import load_keys
from serving.queue import AdmissionQueue
from serving.ratelimit import MemoryRateLimiter
from tests.serving.conftest import wait_until
from tests.serving.redis_server import redis_url  # noqa: F401  (a module-scoped real redis-server)
from tests.serving.test_gateway import PUBLIC, Fake, Fakes, fake_app, metric
from serving.routing import Backend

GOLD, FREE = "sk-gold-0123456789", "sk-free-0123456789"


@pytest.fixture(scope="module")
def fakes(serve_app):
    pair = Fakes(Fake("stable", "stable-model"), Fake("canary", "canary-model"))
    with serve_app(fake_app(pair.stable)) as s, serve_app(fake_app(pair.canary)) as c:
        pair.stable.backend = Backend("stable", s.root_url, pair.stable.model, version="1")
        pair.canary.backend = Backend("canary", c.root_url, pair.canary.model, version="2")
        yield pair


@pytest.fixture(autouse=True)
def reset(fakes):
    fakes.stable.reset()
    fakes.canary.reset()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(f'tiers:\n  gold: {{priority: 10, rpm: 1000, tpm: 1000000}}\n  free: {{priority: 0, rpm: 3, tpm: 1000000}}\nkeys:\n  "{GOLD}": gold\n  "{FREE}": free\n')
    return path


@pytest.fixture
def gateway_with(serve_app, fakes):
    with ExitStack() as stack:

        def start(front: FrontDoor, canary: bool = False):
            app = create_gateway(fakes.stable.backend, fakes.canary.backend if canary else None, public_model=PUBLIC, front=front)
            server = stack.enter_context(serve_app(app))
            return server.root_url, app.state.gateway

        yield start


def ask(url: str, key: str | None = None, content: str = "1 2 3", headers: dict | None = None, **extra) -> httpx.Response:
    body = {"model": PUBLIC, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **extra}
    auth = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={**auth, **(headers or {})}, timeout=60)


def test_a_repeated_deterministic_request_is_answered_from_the_cache_and_never_across_versions(gateway_with, fakes):
    url, gateway = gateway_with(FrontDoor(cache=MemoryCache(100)), canary=True)
    first, second = ask(url), ask(url)
    assert first.json() == second.json() and first.json()["choices"][0]["message"]["content"] == "answer from stable"
    assert (first.headers.get("x-gateway-cache"), second.headers["x-gateway-cache"]) == (None, "hit")
    assert second.headers["x-gateway-version"] == "1" and len(fakes.stable.models_seen) == 1, "the hit never reached a backend"
    assert ask(url, headers={"cache-control": "no-cache"}).headers.get("x-gateway-cache") is None and len(fakes.stable.models_seen) == 2
    ask(url, temperature=0.7), ask(url, temperature=0.7)
    assert len(fakes.stable.models_seen) == 4, "sampled answers are not cached"
    ask(url, temperature=0.7, seed=5), ask(url, temperature=0.7, seed=5)
    assert len(fakes.stable.models_seen) == 5, "a fixed seed makes a sampled answer repeatable"

    gateway.promote_canary()  # version 2 is stable now: version 1's entry must never answer
    after = ask(url)
    assert after.headers["x-gateway-version"] == "2" and after.json()["choices"][0]["message"]["content"] == "answer from canary"
    assert after.headers.get("x-gateway-cache") is None and ask(url).headers["x-gateway-cache"] == "hit"
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "gateway_cache_requests_total", result="hit") == 3


def test_saturated_engines_serve_higher_priority_first_and_a_full_queue_answers_429(gateway_with, fakes, keys_file):
    # The overtaking bound well past this test's waits, however busy the machine: the order of
    # service is strict priority here (tests/serving/test_queue.py tests the bound).
    queue = AdmissionQueue(capacity=1, max_waiting=16, max_overtake_s=600)
    url, _ = gateway_with(FrontDoor(queue=queue, keys=load_keys(keys_file)))
    fakes.stable.hold = threading.Event()  # the engine is busy: everything else waits in the queue
    fakes.stable.delay_s = 0.05  # each answer takes a while, so the order of service shows in the waits
    done: list[str] = []
    lock = threading.Lock()

    def send(tier_key: str, label: str) -> int:
        r = ask(url, tier_key, content=label)
        with lock:
            done.append(label)
        return r.status_code

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(send, FREE, "first")]
        wait_until(lambda: queue.in_flight == 1, "the first request holds the only slot")
        futures += [pool.submit(send, FREE if i % 2 else GOLD, ("low" if i % 2 else "high") + str(i)) for i in range(16)]
        wait_until(lambda: queue.waiting == 16, "16 requests waiting")
        full = ask(url, GOLD, content="one too many")
        fakes.stable.hold.set()
        statuses = [f.result() for f in futures]
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1 and full.json()["error"]["code"] == "queue_full"
    assert statuses.count(200) == 17
    order = [d for d in done if d != "first"]
    assert all(d.startswith("high") for d in order[:8]), f"gold (priority 10) is served before free (0): {order}"
    waits = queue.stats()["wait_s"]
    assert waits[10]["p95"] < waits[0]["p95"]
    stats = queue.stats()
    assert stats["admitted"] + stats["rejected_full"] + stats["dropped_disconnected"] + stats["cancelled"] == 18, "every arrival counted"
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "gateway_queue", state="rejected_full") == 1
    assert metric(text, "gateway_refused_requests_total", reason="QueueFull") == 1


def test_per_key_rate_limits_answer_429_with_openai_headers_and_unknown_keys_401(gateway_with, keys_file):
    url, _ = gateway_with(FrontDoor(keys=load_keys(keys_file), limiter=MemoryRateLimiter()))
    assert ask(url, "sk-not-a-key").status_code == 401 and ask(url).status_code == 401
    answers = [ask(url, FREE) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    refused = ask(url, FREE)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert float(refused.headers["retry-after"]) > 0 and refused.headers["x-ratelimit-limit-requests"] == "3"
    assert ask(url, GOLD).status_code == 200, "limits are per key"
    assert ask(url, GOLD, headers={"x-priority": "high"}).status_code == 400


def test_two_gateways_share_the_cache_and_the_limits_through_redis(gateway_with, fakes, keys_file, redis_url):  # noqa: F811
    serve = ServeParams(redis_url=redis_url, keys_file=str(keys_file))
    a, _ = gateway_with(FrontDoor.from_params(serve))
    b, _ = gateway_with(FrontDoor.from_params(serve))
    assert ask(a, FREE, content="shared").status_code == 200
    hit = ask(b, FREE, content="shared")
    assert hit.headers["x-gateway-cache"] == "hit" and len(fakes.stable.models_seen) == 1, "b answers from a's entry"
    assert ask(b, FREE, content="other").status_code == 200
    refused = ask(a, FREE, content="fourth")
    assert refused.status_code == 429, "3 requests per minute across both gateways"


def test_two_models_with_the_same_version_behind_one_redis_never_answer_for_each_other(serve_app, fakes, redis_url):  # noqa: F811
    """Two projects' gateways share one Redis; both models have a version 3 served under the
    same name. Each answer is cached under its own model.
    Seen red: with the model left out of serving.cache.cache_key (the version alone, as
    before), model-b's first request was a cache hit with "answer from stable", model-a's answer."""
    serve = ServeParams(redis_url=redis_url)
    urls = {}
    with ExitStack() as stack:
        for public, fake in (("model-a", fakes.stable), ("model-b", fakes.canary)):
            backend = Backend(f"{public}-r0", fake.backend.base_url, "served-v3", version="3")
            urls[public] = stack.enter_context(serve_app(create_gateway(backend, public_model=public, front=FrontDoor.from_params(serve)))).root_url

        def chat(public: str) -> httpx.Response:
            body = {"model": public, "messages": [{"role": "user", "content": "same prompt"}], "max_tokens": 4, "temperature": 0}
            return httpx.post(f"{urls[public]}/v1/chat/completions", json=body, timeout=60)

        assert chat("model-a").json()["choices"][0]["message"]["content"] == "answer from stable"
        b = chat("model-b")
        assert b.headers.get("x-gateway-cache") is None and b.json()["choices"][0]["message"]["content"] == "answer from canary"
        again = chat("model-b")
        assert again.headers["x-gateway-cache"] == "hit" and again.json()["choices"][0]["message"]["content"] == "answer from canary"


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_with_redis_down_keyed_requests_are_served_or_refused_as_params_say_in_openais_shape(gateway_with, fakes, keys_file, mode):
    """serve.redis_failure_mode: 'open' serves a keyed request without its rate limits, 'closed'
    refuses it with 503 and Retry-After; both answer in OpenAI's error shape, never plain text.
    Seen red: with RedisRateLimiter.acquire letting the Redis error through (as before), both
    modes answered 500 (`internal_error`; before the gateway's catch-all handler, a plain-text
    "Internal Server Error")."""
    from serving.launcher import free_port

    serve = ServeParams(redis_url=f"redis://127.0.0.1:{free_port()}/0", keys_file=str(keys_file), redis_failure_mode=mode)  # nothing listens there
    url, _ = gateway_with(FrontDoor.from_params(serve))
    answer = ask(url, GOLD, content="while redis is down")
    if mode == "open":
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "answer from stable"
        assert "x-ratelimit-limit-requests" not in answer.headers, "served without its limits"
    else:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        error = answer.json()["error"]
        assert error["code"] == "rate_limiter_unavailable" and error["type"] == "server_error" and "redis_failure_mode" in error["message"]
        assert fakes.stable.models_seen == []
    assert metric(httpx.get(f"{url}/metrics").text, "gateway_rate_limits_unavailable_total", mode=mode) == 1
    assert ask(url, "sk-unknown").status_code == 401, "an unknown key is still refused"
