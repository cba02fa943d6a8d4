"""Per-API-key rate limits: requests per minute (rpm) and tokens per minute (tpm).

Each key has two token buckets, each holding at most one minute's allowance and refilled
continuously (rpm/60 requests and tpm/60 tokens a second): a key may burst its minute's worth
after being idle, and is then held to the steady rate. A request takes one request and its
token estimate, from both buckets or from neither: a refused request costs nothing.

Tokens are counted before the answer exists, as OpenAI does: the request's max_tokens (times
`n`; `default_max_tokens` when it sends none) plus its prompt's characters / 4, rounded up — the
usual rule of thumb for English BPE tokenizers; the gateway has no tokenizer, and an estimate
that errs high only makes a limit a little stricter.

Answers carry OpenAI's headers (x-ratelimit-limit-requests, x-ratelimit-remaining-requests,
x-ratelimit-reset-requests — the time until the bucket is full again, e.g. "1s", "6m0s" — and
the same for -tokens); a refusal raises RateLimited with them, plus Retry-After.

Two backends: MemoryRateLimiter for one gateway process, RedisRateLimiter for several gateway
replicas sharing limits (serve.redis_url): one Lua script refills and takes atomically, on
Redis's clock, so replicas agree however their own clocks drift. Keys are stored as hashes,
never in clear.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

CHARS_PER_TOKEN = 4
WINDOW_S = 60.0  # the limits are per minute; a bucket holds one window's allowance


class LimiterUnavailable(Exception):
    """The shared limits cannot be read (Redis is down or unreachable). The gateway decides what
    that means (serve.redis_failure_mode): serve without limits, or refuse with 503."""


class RateLimited(Exception):
    """Over a limit: the gateway answers 429 with `headers` (Retry-After included when waiting can
    help). `retry_after_s` is None for a request whose tokens exceed the whole minute's allowance:
    it can never pass, so it must be made smaller."""

    status = 429

    def __init__(self, retry_after_s: float | None, headers: dict[str, str], message: str, kind: str) -> None:
        super().__init__(message)
        self.retry_after_s, self.headers = retry_after_s, headers
        self.error = {"error": {"message": message, "type": kind, "code": "rate_limit_exceeded"}}


def prompt_chars(payload: dict[str, Any]) -> int:
    """Characters of text a request sends: chat message contents (strings or text parts) or the
    completion prompt(s); a prompt of token ids counts CHARS_PER_TOKEN per id."""
    total = 0

    def text(value: Any, depth: int = 0) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, int) and not isinstance(value, bool):  # a token id
            return CHARS_PER_TOKEN
        if depth > 3:  # deeper than any real prompt (a list of token-id lists of parts): the backend refuses it
            return 0
        if isinstance(value, list):
            return sum(text(v, depth + 1) for v in value)
        if isinstance(value, dict):  # a content part: {"type": "text", "text": ...}
            return text(value.get("text"), depth + 1)
        return 0

    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else []:  # anything else: the backend answers 400
        if isinstance(message, dict):
            total += text(message.get("content"))
    return total + text(payload.get("prompt"))


def estimate_tokens(payload: dict[str, Any], default_max_tokens: int) -> int:
    """What a request counts against its key's tokens per minute (see the module docstring)."""
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or default_max_tokens
    n = payload.get("n") or 1
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        max_tokens = default_max_tokens  # the backend refuses a bad value; count the default meanwhile
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        n = 1
    return max_tokens * n + math.ceil(prompt_chars(payload) / CHARS_PER_TOKEN)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms", "1s", "7.5s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{secs}" if minutes else secs


def refill(level: float, last: float, now: float, limit: int) -> float:
    """A bucket's level at `now`, refilled at limit/minute since `last`, never above `limit`."""
    return min(float(limit), level + max(0.0, now - last) * limit / WINDOW_S)


def verdict(allowed: bool, requests_left: float, tokens_left: float, rpm: int, tpm: int, cost: int) -> dict[str, str]:
    """The headers of an answer after the buckets were checked; raises RateLimited when refused."""
    headers = {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(max(0, math.floor(requests_left))),
        "x-ratelimit-reset-requests": format_duration((rpm - requests_left) * WINDOW_S / rpm),
        "x-ratelimit-limit-tokens": str(tpm),
        "x-ratelimit-remaining-tokens": str(max(0, math.floor(tokens_left))),
        "x-ratelimit-reset-tokens": format_duration((tpm - tokens_left) * WINDOW_S / tpm),
    }
    if allowed:
        return headers
    wait_requests = max(0.0, (1 - requests_left) * WINDOW_S / rpm)
    wait_tokens = max(0.0, (cost - tokens_left) * WINDOW_S / tpm)
    wait = max(wait_requests, wait_tokens)
    headers["retry-after"] = str(max(1, math.ceil(wait)))
    if wait_requests >= wait_tokens:
        message, kind = f"rate limit reached for this API key on requests per minute: limit {rpm}; retry in {format_duration(wait)}", "requests"
    else:
        message, kind = f"rate limit reached for this API key on tokens per minute: limit {tpm}, remaining {math.floor(tokens_left)}, requested {cost}; retry in {format_duration(wait)}", "tokens"
    raise RateLimited(wait, headers, message, kind)


def check_request(rpm: int, tpm: int, cost: int) -> None:
    """Refuse what no wait can let through, before touching the buckets."""
    if rpm < 1 or tpm < 1:
        raise ValueError(f"rpm and tpm must be >= 1, got rpm={rpm}, tpm={tpm}")
    if cost > tpm:
        message = f"request too large for this API key's tokens per minute: limit {tpm}, requested {cost} (max_tokens + prompt characters / {CHARS_PER_TOKEN}); send a smaller max_tokens or prompt"
        raise RateLimited(None, {"x-ratelimit-limit-tokens": str(tpm)}, message, "tokens")


def bucket_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class RateLimiter(Protocol):
    async def acquire(self, api_key: str, rpm: int, tpm: int, tokens: int) -> dict[str, str]:
        """Take one request and `tokens` from `api_key`'s buckets and return the headers to send,
        or raise RateLimited and take nothing."""
        ...


class MemoryRateLimiter:
    """Buckets in this process. `clock` is injectable so tests move time without sleeping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float, float]] = {}  # id -> (requests, tokens, when)

    async def acquire(self, api_key: str, rpm: int, tpm: int, tokens: int) -> dict[str, str]:
        check_request(rpm, tpm, tokens)
        now, key = self.clock(), bucket_id(api_key)
        requests_left, tokens_left, last = self._buckets.get(key, (rpm, tpm, now))
        requests_left, tokens_left = refill(requests_left, last, now, rpm), refill(tokens_left, last, now, tpm)
        allowed = requests_left >= 1 and tokens_left >= tokens
        if allowed:
            requests_left, tokens_left = requests_left - 1, tokens_left - tokens
        self._buckets[key] = (requests_left, tokens_left, now)
        return verdict(allowed, requests_left, tokens_left, rpm, tpm, tokens)


# refill() and the take of MemoryRateLimiter.acquire, run atomically in Redis on Redis's clock.
# A key idle for a minute has full buckets, which is what a missing key means: it expires then.
TAKE_LUA = """
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'requests', 'tokens', 'when')
local requests = tonumber(state[1]) or rpm
local tokens = tonumber(state[2]) or tpm
local elapsed = math.max(0, now - (tonumber(state[3]) or now))
requests = math.min(rpm, requests + elapsed * rpm / 60)
tokens = math.min(tpm, tokens + elapsed * tpm / 60)
local allowed = 0
if requests >= 1 and tokens >= cost then
  allowed, requests, tokens = 1, requests - 1, tokens - cost
end
redis.call('HSET', KEYS[1], 'requests', tostring(requests), 'tokens', tostring(tokens), 'when', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
return {allowed, tostring(requests), tostring(tokens)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway replica using the same Redis. A Redis error is
    raised as LimiterUnavailable: whether to fail open or closed is the gateway's decision.
    from_url() makes a client that gives up within about a second, as RedisCache.from_url does."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "gateway:ratelimit:") -> None:
        self.client, self.prefix = client, prefix
        self._take = client.register_script(TAKE_LUA)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisRateLimiter":
        return cls(redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1)), **kwargs)

    async def acquire(self, api_key: str, rpm: int, tpm: int, tokens: int) -> dict[str, str]:
        check_request(rpm, tpm, tokens)
        try:
            allowed, requests_left, tokens_left = await self._take(keys=[self.prefix + bucket_id(api_key)], args=[rpm, tpm, tokens])
        except (redis.RedisError, OSError) as exc:
            raise LimiterUnavailable(f"the rate limits in Redis cannot be read: {type(exc).__name__}: {exc}") from exc
        return verdict(bool(int(allowed)), float(requests_left), float(tokens_left), rpm, tpm, tokens)
