"""A response cache for deterministic requests, keyed by the model and the version that answers.

Only a request whose answer is fixed by its input may be answered from a cache: greedy decoding
(temperature 0), or sampling with a fixed `seed`. A stream, `n` > 1 and sampling without a seed
get no key. The key hashes the MODEL (the gateway's public name) and the VERSION that answers
(the backend's served model and registered version, not the public name alone): a promotion or
a rollback moves the public name to another version, and an entry written by one version must
never answer for another; two models that both have a version 3 behind one Redis must never
answer for each other either.

What the key covers is everything in the body that can change the answer, in a canonical form
(JSON with sorted keys, 0 and 0.0 alike, `stop: "x"` as `["x"]`); it leaves out only fields
known not to (`model`, which the version replaces, `user`, `stream_options`, `metadata`...). A
field this module has never heard of is kept in the key: an unknown field costs a miss at worst,
never a wrong answer. For the same reason message contents are NOT whitespace-stripped: the
bootstrap chat template (pipelines/bootstrap.py) and the server pass contents through verbatim,
so "2+2= " and "2+2=" are different token sequences that may get different answers.

The gateway stores only a complete 200 answer, under the key of the version that gave it (after
a canary's failure was retried on stable, that is stable's). Both caches are async, so the
Redis one never blocks the event loop; a Redis failure counts as a miss (the cache is an
optimisation, never a reason to fail a request) and is counted in `errors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

# Fields that do not change the answer's content. `model` is replaced by the version, `stream`
# is false whenever a key exists, `n` is 1 (or absent) whenever a key exists.
IGNORED_FIELDS = frozenset({"model", "user", "stream", "stream_options", "metadata", "store", "service_tier", "n"})
DEFAULT_TEMPERATURE = 1.0  # OpenAI's, and serving.server's, when a request sends none


def is_deterministic(payload: dict[str, Any]) -> bool:
    """Whether the answer is fixed by the request: not a stream, one choice, and greedy or seeded."""
    if payload.get("stream") or payload.get("n", 1) not in (1, None):
        return False
    temperature = payload.get("temperature")
    try:
        temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    except (TypeError, ValueError):  # the backend will refuse it; nothing to cache
        return False
    return temperature == 0 or payload.get("seed") is not None


def _canonical(value: Any) -> Any:
    """Equal values, equal JSON: 1.0 becomes 1 (bools stay bools)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def cache_key(model: str, version: str, path: str, payload: dict[str, Any]) -> str | None:
    """The sha256 (hex) naming `payload`'s answer from `version` of `model` at `path`, or None
    when the answer is not determined by the request (see is_deterministic) and must not be cached."""
    if not is_deterministic(payload):
        return None
    request = {k: v for k, v in payload.items() if k not in IGNORED_FIELDS}
    if isinstance(request.get("stop"), str):
        request["stop"] = [request["stop"]]
    canonical = json.dumps({"model": model, "version": version, "path": path, "request": _canonical(request)}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache(Protocol):
    """What the gateway needs of a cache: bodies by key, and counters for its metrics."""

    hits: int
    misses: int

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, body: bytes, ttl_s: float) -> None: ...


class MemoryCache:
    """An in-process LRU of at most `max_entries` bodies, each kept for its `ttl_s`.

    Entries, not bytes, are bounded: a body is one answer of at most serve.max_new_tokens
    tokens, a few KiB. `clock` is injectable so tests move time without sleeping."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries, self.clock = max_entries, clock
        self.hits = self.misses = self.errors = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self.clock():
            del self._entries[key]
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    async def put(self, key: str, body: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        self._entries[key] = (self.clock() + ttl_s, body)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class RedisCache:
    """Bodies in Redis, shared by every gateway replica; Redis expires them (SET ... PX).

    `client` is a `redis.asyncio.Redis`; from_url(serve.redis_url) makes one that gives up within
    about a second (redis-py's defaults, 5 s timeouts and 3 retries with backoff, would stall
    every request for many seconds while Redis is down). Keys are `prefix` + the hash, so the
    cache can share a database with the rate limits."""

    def __init__(self, client: Any, prefix: str = "gateway:cache:") -> None:
        self.client, self.prefix = client, prefix
        self.hits = self.misses = self.errors = 0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisCache":
        return cls(redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1)), **kwargs)

    async def get(self, key: str) -> bytes | None:
        try:
            body = await self.client.get(self.prefix + key)
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("response cache: Redis get failed, answering from the backend: %s", exc)
            body = None
        if body is None:
            self.misses += 1
            return None
        self.hits += 1
        return bytes(body)

    async def put(self, key: str, body: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        try:
            await self.client.set(self.prefix + key, body, px=max(1, int(ttl_s * 1000)))
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("response cache: Redis set failed, answer not cached: %s", exc)
