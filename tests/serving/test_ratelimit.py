"""Per-key rate limits (in memory and shared through Redis) and the keys file behind them."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from serving.keys import BadPriority, KeysFileError, Tier, load_keys, request_priority
from serving.ratelimit import MemoryRateLimiter, RateLimited, RedisRateLimiter, estimate_tokens, format_duration
from tests.serving.redis_server import redis_url  # noqa: F401  (a module-scoped fixture)

KEY = "sk-test-gold-0123456789"


# --- token estimate and header format -------------------------------------------------------------


def test_token_estimate_is_max_tokens_plus_prompt_chars_over_four():
    chat = {"messages": [{"role": "system", "content": "x" * 10}, {"role": "user", "content": [{"type": "text", "text": "y" * 5}]}], "max_tokens": 20}
    assert estimate_tokens(chat, default_max_tokens=64) == 20 + 4  # ceil(15 / 4)
    assert estimate_tokens({"prompt": "abcd" * 3}, default_max_tokens=64) == 64 + 3
    assert estimate_tokens({"prompt": ["ab", "cd"], "max_tokens": 1, "n": 3}, 64) == 3 + 1
    assert estimate_tokens({"prompt": [1, 2, 3], "max_completion_tokens": 2}, 64) == 2 + 3  # token ids count one each


def test_reset_durations_use_openai_format():
    assert [format_duration(s) for s in (0, 0.25, 1, 7.5, 60, 360, 90.25)] == ["0ms", "250ms", "1s", "7.5s", "1m0s", "6m0s", "1m30.25s"]


# --- the in-memory limiter ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_over_rpm_is_refused_with_headers_and_retry_after():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)

    async def run():
        for i in range(3):
            headers = await limiter.acquire(KEY, rpm=3, tpm=1000, tokens=10)
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-ratelimit-remaining-requests"] == str(2 - i)
            assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 * (i + 1))
        assert headers["x-ratelimit-reset-requests"] == "1m0s"  # 3 requests at 3/minute: a minute to refill
        with pytest.raises(RateLimited) as refused:
            await limiter.acquire(KEY, rpm=3, tpm=1000, tokens=10)
        exc = refused.value
        assert exc.status == 429 and exc.retry_after_s == pytest.approx(20)  # one request refills in 60/3 s
        assert exc.headers["retry-after"] == "20" and exc.headers["x-ratelimit-remaining-requests"] == "0"
        assert exc.error["error"]["type"] == "requests" and exc.error["error"]["code"] == "rate_limit_exceeded"
        assert (await limiter.acquire("sk-another-key", rpm=3, tpm=1000, tokens=10))["x-ratelimit-remaining-requests"] == "2"  # per key
        clock.now += 19.9
        with pytest.raises(RateLimited):
            await limiter.acquire(KEY, rpm=3, tpm=1000, tokens=10)
        clock.now += 0.1  # a refused request took nothing: the refill is on time
        assert (await limiter.acquire(KEY, rpm=3, tpm=1000, tokens=10))["x-ratelimit-remaining-requests"] == "0"

    asyncio.run(run())


def test_request_over_tpm_is_refused_and_takes_nothing():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)

    async def run():
        headers = await limiter.acquire(KEY, rpm=100, tpm=600, tokens=500)
        assert headers["x-ratelimit-remaining-tokens"] == "100"
        assert headers["x-ratelimit-reset-tokens"] == "50s"  # 500 tokens at 600/minute
        with pytest.raises(RateLimited) as refused:
            await limiter.acquire(KEY, rpm=100, tpm=600, tokens=200)
        exc = refused.value
        assert exc.retry_after_s == pytest.approx(10)  # 100 more tokens at 10 per second
        assert exc.headers["retry-after"] == "10" and exc.error["error"]["type"] == "tokens"
        assert "requested 200" in str(exc)
        # The refused request's request was not taken either; a smaller one still fits.
        headers = await limiter.acquire(KEY, rpm=100, tpm=600, tokens=100)
        assert headers["x-ratelimit-remaining-requests"] == "98" and headers["x-ratelimit-remaining-tokens"] == "0"

    asyncio.run(run())


def test_request_larger_than_a_minute_of_tokens_can_never_pass():
    async def run():
        with pytest.raises(RateLimited) as refused:
            await MemoryRateLimiter().acquire(KEY, rpm=10, tpm=100, tokens=101)
        assert refused.value.retry_after_s is None and "retry-after" not in refused.value.headers
        assert "smaller max_tokens" in str(refused.value)

    asyncio.run(run())


# --- the Redis limiter: one limit shared by every replica -----------------------------------------


def test_redis_limiters_on_one_redis_share_one_limit(redis_url):  # noqa: F811
    async def run():
        first, second = redis.asyncio.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
        try:
            replicas = [RedisRateLimiter(first), RedisRateLimiter(second)]  # two gateway processes
            for i in range(4):  # alternating replicas: 4 of rpm=4 pass between them
                headers = await replicas[i % 2].acquire(KEY, rpm=4, tpm=10_000, tokens=5)
                assert headers["x-ratelimit-remaining-requests"] == str(3 - i)
            for limiter in replicas:  # the 5th is refused by either
                with pytest.raises(RateLimited) as refused:
                    await limiter.acquire(KEY, rpm=4, tpm=10_000, tokens=5)
                assert 0 < refused.value.retry_after_s <= 15 and refused.value.headers["retry-after"] in {"14", "15"}
            assert (await replicas[1].acquire("sk-other", rpm=4, tpm=10_000, tokens=5))["x-ratelimit-remaining-requests"] == "3"
            # The key is stored hashed, never in clear, and expires after a minute idle.
            stored = [k.decode() async for k in first.scan_iter("gateway:ratelimit:*")]
            assert len(stored) == 2 and not any("sk-" in k for k in stored)
            assert 0 < await first.pttl(stored[0]) <= 60_000
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(run())


def test_redis_token_limit_is_shared_and_concurrent_takes_are_atomic(redis_url):  # noqa: F811
    async def run():
        clients = [redis.asyncio.Redis.from_url(redis_url) for _ in range(2)]
        try:
            replicas = [RedisRateLimiter(c) for c in clients]
            key = "sk-tokens-shared"
            # 20 requests of 100 tokens at once, from both replicas, against tpm=1000: exactly 10 pass.
            results = await asyncio.gather(
                *(replicas[i % 2].acquire(key, rpm=1000, tpm=1000, tokens=100) for i in range(20)), return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, RateLimited)]
            assert len(refused) == 10 and len(results) - len(refused) == 10
            assert all(r.error["error"]["type"] == "tokens" for r in refused)
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(run())


# --- the keys file --------------------------------------------------------------------------------

GOOD = """
tiers:
  gold: {priority: 10, rpm: 600, tpm: 100000}
  free: {priority: 0, rpm: 60, tpm: 10000}
keys:
  "sk-gold-aaaaaaaaaaaa": gold
  "sk-free-bbbbbbbbbbbb": free
"""


def write(tmp_path, text: str):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_keys_file_maps_keys_to_tiers(tmp_path):
    table = load_keys(write(tmp_path, GOOD))
    assert len(table) == 2
    assert table.tier("sk-gold-aaaaaaaaaaaa") == Tier("gold", 10, 600, 100000)
    assert table.tier("sk-free-bbbbbbbbbbbb").rpm == 60
    assert table.tier("sk-unknown") is None
    assert table.from_authorization("Bearer sk-free-bbbbbbbbbbbb") == ("sk-free-bbbbbbbbbbbb", table.tiers["free"])
    assert table.from_authorization("Basic sk-free-bbbbbbbbbbbb") is None and table.from_authorization(None) is None


@pytest.mark.parametrize(
    "text, names",
    [
        ("tiers: {}\n", ["with 'tiers' and 'keys'"]),
        ("tiers:\n  gold: {priority: 1, rpm: 5}\nkeys: {}\n", ["tiers.gold", "missing field(s) ['tpm']"]),
        ("tiers:\n  gold: {priority: 1, rpm: 5, tpm: 9, rps: 1}\nkeys: {}\n", ["tiers.gold", "unknown field(s) ['rps']"]),
        ("tiers:\n  gold: {priority: 1, rpm: 0, tpm: 9}\nkeys: {}\n", ["tiers.gold.rpm", ">= 1"]),
        ("tiers:\n  gold: {priority: high, rpm: 1, tpm: 9}\nkeys: {}\n", ["tiers.gold.priority", "integer"]),
        ("tiers:\n  gold: {priority: 1, rpm: 1, tpm: 9}\nkeys:\n  sk-secret-value-123: silver\n", ["keys[sk-sec…]", "'silver'", "gold"]),
        ("tiers: [\n", ["not valid YAML"]),
    ],
)
def test_bad_keys_file_names_the_problem_and_never_the_whole_key(tmp_path, text, names):
    with pytest.raises(KeysFileError) as bad:
        load_keys(write(tmp_path, text))
    for name in names:
        assert name in str(bad.value)
    assert "sk-secret-value-123" not in str(bad.value)


def test_missing_keys_file_says_how_to_fix(tmp_path):
    with pytest.raises(KeysFileError, match="not found: create it"):
        load_keys(tmp_path / "nope.yaml")


def test_priority_header_may_lower_but_never_raise_the_tier_priority():
    gold = Tier("gold", 10, 600, 100000)
    assert request_priority(gold, None) == 10
    assert request_priority(gold, "3") == 3
    assert request_priority(gold, "99") == 10
    assert request_priority(gold, "-5") == -5
    with pytest.raises(BadPriority) as bad:
        request_priority(gold, "urgent")
    assert bad.value.status == 400 and "x-priority" in bad.value.error["error"]["message"]
