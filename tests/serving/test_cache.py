"""The gateway's response cache: which requests get a key, and both cache backends."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from serving.cache import MemoryCache, RedisCache, cache_key
from tests.serving.redis_server import redis_url  # noqa: F401  (a module-scoped fixture)

CHAT = "/v1/chat/completions"


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "1 2 3"}], "max_tokens": 8, "temperature": 0, **fields}


def test_key_is_stable_and_bound_to_model_and_version():
    key = cache_key("m", "v7", CHAT, chat())
    assert key is not None and len(key) == 64
    # Field order, 0 vs 0.0, and fields that do not change the answer give the same key.
    reordered = dict(reversed(list(chat(temperature=0.0, user="alice", stream=False, stream_options=None).items())))
    assert cache_key("m", "v7", CHAT, reordered) == key
    assert cache_key("m", "v7", CHAT, chat(model="another-public-name")) == key
    # Another model, version, route, prompt or sampling parameter: another key.
    assert cache_key("m", "v8", CHAT, chat()) != key
    assert cache_key("other-model", "v7", CHAT, chat()) != key, "two models' version 7 are two answers"
    assert cache_key("m", "v7", "/v1/completions", chat()) != key
    assert cache_key("m", "v7", CHAT, chat(messages=[{"role": "user", "content": "3 2 1"}])) != key
    assert cache_key("m", "v7", CHAT, chat(messages=[{"role": "user", "content": "1 2 3 "}])) != key  # other tokens
    for changed in ({"max_tokens": 9}, {"top_p": 0.5}, {"stop": ["\n"]}, {"seed": 1}, {"logit_bias": {"5": 1}}):
        assert cache_key("m", "v7", CHAT, chat(**changed)) != key, changed
    assert cache_key("m", "v7", CHAT, chat(stop="\n")) == cache_key("m", "v7", CHAT, chat(stop=["\n"]))


def test_only_deterministic_requests_get_a_key():
    assert cache_key("m", "v7", CHAT, chat(temperature=0.7)) is None
    assert cache_key("m", "v7", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}) is None  # default 1.0
    assert cache_key("m", "v7", CHAT, chat(temperature=0.7, seed=3)) is not None  # a fixed seed fixes the sample
    assert cache_key("m", "v7", CHAT, chat(stream=True)) is None
    assert cache_key("m", "v7", CHAT, chat(n=2)) is None
    assert cache_key("m", "v7", CHAT, chat(n=1)) == cache_key("m", "v7", CHAT, chat())
    assert cache_key("m", "v7", CHAT, chat(temperature="hot")) is None


def test_memory_cache_hits_misses_ttl_and_lru():
    now = [0.0]
    cache = MemoryCache(max_entries=2, clock=lambda: now[0])

    async def run():
        v7, v8 = cache_key("m", "v7", CHAT, chat()), cache_key("m", "v8", CHAT, chat())
        assert await cache.get(v7) is None
        await cache.put(v7, b"seven", ttl_s=10)
        assert await cache.get(v7) == b"seven"  # the repeated request hits
        assert await cache.get(v8) is None  # the same request to another version does not
        assert (cache.hits, cache.misses) == (1, 2)
        now[0] = 10.0
        assert await cache.get(v7) is None  # expired
        await cache.put("a", b"A", 60)
        await cache.put("b", b"B", 60)
        assert await cache.get("a") == b"A"  # "a" is now the most recently used
        await cache.put("c", b"C", 60)  # evicts "b", the least recently used
        assert await cache.get("b") is None and await cache.get("a") == b"A" and await cache.get("c") == b"C"
        assert len(cache) == 2
        await cache.put("d", b"D", 0)  # no TTL, nothing stored
        assert await cache.get("d") is None

    asyncio.run(run())


def test_redis_cache_hits_across_clients_and_expires(redis_url):  # noqa: F811
    async def run():
        first, second = redis.asyncio.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
        try:
            writer, reader = RedisCache(first), RedisCache(second)  # two gateway replicas
            key = cache_key("m", "v7", CHAT, chat())
            assert await reader.get(key) is None
            await writer.put(key, b'{"id": "x"}', ttl_s=30)
            assert await reader.get(key) == b'{"id": "x"}'
            assert await reader.get(cache_key("m", "v8", CHAT, chat())) is None
            assert (reader.hits, reader.misses) == (1, 2)
            assert 0 < await first.pttl("gateway:cache:" + key) <= 30_000  # Redis expires it
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(run())


def test_redis_cache_failure_is_a_counted_miss():
    async def run():
        cache = RedisCache.from_url("redis://127.0.0.1:1/0")  # nothing listens there
        try:
            await cache.put("k", b"body", 30)
            assert await cache.get("k") is None
            assert (cache.misses, cache.errors) == (1, 2)
        finally:
            await cache.client.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("entries", [0, -1])
def test_memory_cache_needs_room(entries):
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(entries)
