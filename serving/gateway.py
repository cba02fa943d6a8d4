"""A traffic-splitting gateway in front of a stable and a canary OpenAI-compatible backend.

Clients talk to one public model name; each request goes to the canary with probability
`weight`, else to stable, with `model` rewritten to the chosen backend's served name. When the
canary fails a request (HTTP 5xx or 429, connection refused or reset, no answer within
`retry_timeout_s`), the gateway retries it on stable, so a bad canary costs clients latency,
never an error; the failure still counts against the canary in the statistics the canary
controller (`serving.rollout`) analyses. A stream is retried only while nothing has reached
the client; once bytes are out, a failure ends the stream with an OpenAI error event. Other
4xx are the caller's own errors and are passed through. Every answer names the backend that
gave it in an `x-gateway-backend` header.

Stable has no fallback, but a connection it refused, reset or closed before answering (a pooled
keep-alive connection the backend had just closed, a restart) is retried once on a new
connection: nothing had reached the client, so the retry is invisible to it.

A request is attributed when it is dispatched: the backend, its role (stable or canary) and the
statistics window it counts in are fixed then, so a promotion or a new window while it is in
flight does not move its record to another version.

Routes: POST /v1/chat/completions and /v1/completions (JSON or `stream: true` SSE),
GET /v1/models, GET /health, GET /metrics (Prometheus, one registry per app), and the admin
routes GET /admin/backends and POST /admin/weight, which answer loopback clients and clients
sending the admin key (Bearer `admin_key`, by default $SERVING_ADMIN_KEY), and 403 to others.

In-process callers hold the `Gateway` controller (`app.state.gateway`): it routes, keeps the
per-backend statistics, and moves traffic (`set_weight`, `set_canary`, `remove_canary`,
`promote_canary`) from any thread. `python -m serving.gateway` runs it under uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving import auth
from serving.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from serving.netaddr import is_loopback

API_KEY_ENV = "GATEWAY_API_KEY"  # keys come from the environment: a key in argv is visible in `ps`
ADMIN_KEY_ENV = auth.ADMIN_KEY_ENV
LEGACY_ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"  # still read, after $SERVING_ADMIN_KEY
BACKEND_KEY_ENV = auth.API_KEY_ENV  # what serving.server reads, so one variable serves both sides
LATENCY_SAMPLES = 10_000  # per backend and window: enough for a stable p95, bounded memory
# What a backend is blamed for, and what a canary's request is retried on stable after.
FAILURES = frozenset({"server_error", "overloaded", "connection_error", "timeout"})
PASSED_HEADERS = ("retry-after",)  # upstream headers a client may act on


@dataclass(frozen=True)
class Backend:
    """One OpenAI-compatible server: `base_url` is its root (http://host:port; a trailing /v1 is
    dropped), `model` the name it serves, `api_key` the Bearer key it requires, if any."""

    name: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        root = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", root[: -len("/v1")] if root.endswith("/v1") else root)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "base_url": self.base_url, "model": self.model}


# --- statistics: plain counters the controller reads without scraping Prometheus ----------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (as serving.canary computes p95)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def classify(status: int) -> str:
    """The outcome of an answered request: 4xx are the caller's fault, 5xx the backend's, and so
    is 429: a full queue says the backend cannot carry its share, not that the request was bad."""
    if status < 400:
        return "ok"
    if status == 429:
        return "overloaded"
    return "client_error" if status < 500 else "server_error"


@dataclass
class Stats:
    """What one backend did. Latencies are of successful answers only (a timeout's "latency" is
    the timeout); failures show up in error_rate instead."""

    requests: int = 0
    failures: int = 0
    client_errors: int = 0
    # This backend's failures that were retried: a canary's on stable, stable's own dropped
    # connections on a new connection to stable.
    retried_to_stable: int = 0
    retries_served: int = 0  # requests this backend answered after the canary failed them
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def record(self, outcome: str, latency_s: float | None, retry: bool) -> None:
        self.requests += 1
        self.failures += outcome in FAILURES
        self.client_errors += outcome == "client_error"
        self.retries_served += retry
        if outcome == "ok" and latency_s is not None:
            self.latencies_s.append(latency_s)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "requests": self.requests,
            "failures": self.failures,
            # None, not 0, without requests: no evidence must not pass an error-rate check.
            "error_rate": self.failures / self.requests if self.requests else None,
            "client_errors": self.client_errors,
            "retried_to_stable": self.retried_to_stable,
            "retries_served": self.retries_served,
            "p50_latency_s": percentile(lat, 0.50),
            "p95_latency_s": percentile(lat, 0.95),
        }


@dataclass
class Slot:
    """A backend with its statistics since it joined (`total`) and since the last window()."""

    backend: Backend
    total: Stats = field(default_factory=Stats)
    window: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class Target:
    """A backend as it stood when a request was dispatched to it: its slot, its role then, and
    the statistics (since it joined, this window) open then. The request is recorded there
    however the gateway changes while it is in flight (a promotion, a new window)."""

    slot: Slot
    role: str  # "stable" | "canary"
    stats: tuple[Stats, Stats]

    @property
    def backend(self) -> Backend:
        return self.slot.backend


class Metrics:
    """The gateway's Prometheus series, in a registry of its own so several apps (tests) coexist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["role", "backend"]
        self.requests = Counter("gateway_backend_requests", "Requests sent to a backend, by outcome.", [*labels, "outcome"], registry=self.registry)
        self.latency = Histogram(
            "gateway_backend_latency_seconds", "Latency of successful backend answers (a stream until its end).", labels,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.retries = Counter("gateway_retries", "Failures retried: a canary's on stable, stable's dropped connections on a new connection.", ["backend"], registry=self.registry)
        self.lost = Counter("gateway_client_visible_errors", "Requests the client saw fail (stable failed too).", registry=self.registry)
        self.weight = Gauge("gateway_canary_weight", "Share of requests routed to the canary.", registry=self.registry)


class NoCanaryError(LookupError):
    """A canary operation was asked for while no canary is set."""


class Gateway:
    """Routing state and statistics, safe to drive from any thread while the app serves."""

    def __init__(self, stable: Backend, canary: Backend | None = None, canary_weight: float = 0.0, seed: int | None = None, public_model: str | None = None) -> None:
        self.public_model = public_model or stable.model
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # seeded: a test or a drill routes the same way every run
        self._stable = Slot(stable)
        self._canary: Slot | None = None
        self._weight = 0.0
        if canary is not None:
            self.set_canary(canary, canary_weight)
        elif canary_weight:
            raise NoCanaryError(f"canary_weight={canary_weight} needs a canary")

    # --- traffic control ---

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def stable(self) -> Backend:
        return self._stable.backend

    @property
    def canary(self) -> Backend | None:
        slot = self._canary
        return None if slot is None else slot.backend

    def set_canary(self, backend: Backend, weight: float = 0.0) -> None:
        """Put `backend` beside stable (replacing any canary, with fresh statistics)."""
        check_weight(weight)
        with self._lock:
            if backend.name == self._stable.backend.name:
                raise ValueError(f"the canary needs a name other than stable's ('{backend.name}'): statistics are kept by name")
            self._canary = Slot(backend)
            self._set_weight(weight)

    def set_weight(self, weight: float) -> None:
        check_weight(weight)
        with self._lock:
            if weight > 0 and self._canary is None:
                raise NoCanaryError(f"cannot send {weight:g} of the traffic to a canary: none is set")
            self._set_weight(weight)

    def remove_canary(self) -> Backend | None:
        """Roll back: stable takes all traffic. Returns the removed canary (for the caller to stop)."""
        with self._lock:
            slot, self._canary = self._canary, None
            self._set_weight(0.0)
        return None if slot is None else slot.backend

    def promote_canary(self) -> Backend:
        """The canary becomes stable, keeping its statistics; returns the old stable to stop."""
        with self._lock:
            if self._canary is None:
                raise NoCanaryError("no canary to promote")
            old, self._stable, self._canary = self._stable, self._canary, None
            self._set_weight(0.0)
        return old.backend

    def _set_weight(self, weight: float) -> None:
        self._weight = weight
        self.metrics.weight.set(weight)

    # --- routing and recording (called by the app) ---

    def route(self) -> tuple[Target, Target]:
        """(the backend to try first, stable to fall back on), both attributed now: at dispatch."""
        with self._lock:
            stable = Target(self._stable, "stable", (self._stable.total, self._stable.window))
            canary = self._canary
            # random() < 1 always and < 0 never, so weights 1 and 0 are exact.
            if canary is not None and self._rng.random() < self._weight:
                return Target(canary, "canary", (canary.total, canary.window)), stable
        return stable, stable

    def record(self, target: Target, outcome: str, latency_s: float | None, retry: bool = False) -> None:
        with self._lock:
            for stats in target.stats:
                stats.record(outcome, latency_s, retry)
        self.metrics.requests.labels(target.role, target.backend.name, outcome).inc()
        if outcome == "ok" and latency_s is not None:
            self.metrics.latency.labels(target.role, target.backend.name).observe(latency_s)

    def record_retry(self, target: Target) -> None:
        with self._lock:
            for stats in target.stats:
                stats.retried_to_stable += 1
        self.metrics.retries.labels(target.backend.name).inc()

    # --- what the canary controller reads ---

    def snapshot(self) -> dict[str, Any]:
        """Statistics since each backend joined: {"stable": {...}, "canary": {...} or None, ...}."""
        with self._lock:
            return self._report(lambda s: s.total)

    def window(self) -> dict[str, Any]:
        """Statistics since the previous window() call (same shape as snapshot()), then start a new
        window: a controller calls it when a weight step begins and again when it ends."""
        with self._lock:
            report = self._report(lambda s: s.window)
            for slot in (self._stable, self._canary):
                if slot is not None:
                    slot.window = Stats()
            return report

    def canary_requests(self) -> int:
        """Requests the canary got in the current window (0 without a canary)."""
        with self._lock:
            return 0 if self._canary is None else self._canary.window.requests

    def _report(self, pick) -> dict[str, Any]:
        def one(slot: Slot | None) -> dict[str, Any] | None:
            return None if slot is None else {**slot.backend.describe(), **pick(slot).summary()}

        return {"public_model": self.public_model, "canary_weight": self._weight, "stable": one(self._stable), "canary": one(self._canary)}


def check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the canary weight is a share of traffic between 0 and 1, got {weight}")


# --- proxying ----------------------------------------------------------------------------------


def error_body(message: str, error_type: str = "server_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}}).encode()


@dataclass
class Attempt:
    """One backend's answer, or a synthesised 502/504 when it gave none."""

    outcome: str
    latency_s: float
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    backend: str = ""  # who answered, for the x-gateway-backend header
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def answered(cls, r: httpx.Response, body: bytes, latency_s: float) -> "Attempt":
        kept = {h: r.headers[h] for h in PASSED_HEADERS if h in r.headers}
        return cls(classify(r.status_code), latency_s, r.status_code, body, r.headers.get("content-type", "application/json"), headers=kept)


def unanswered(backend: Backend, exc: BaseException, latency_s: float, timeout_s: float) -> Attempt:
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return Attempt("timeout", latency_s, 504, error_body(f"backend '{backend.name}' gave no answer within {timeout_s:g}s", code="backend_timeout"))
    return Attempt("connection_error", latency_s, 502, error_body(f"backend '{backend.name}' unreachable: {type(exc).__name__}: {exc}", code="backend_unreachable"))


def with_public_model(payload: Any, public_model: str) -> Any:
    """Backends answer with their own served name; clients asked for the public one."""
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = public_model
    return payload


def sse_data(line: str) -> Any:
    """The JSON of an SSE `data:` line, or None for other lines, [DONE] and non-JSON data."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def is_error_event(payload: Any) -> bool:
    """vLLM reports a failure that happens after the 200 as a `data: {"error": ...}` event."""
    return isinstance(payload, dict) and bool(payload.get("error"))


def rewrite_sse_line(line: str, payload: Any, public_model: str) -> str:
    if isinstance(payload, dict) and "model" in payload:
        return "data: " + json.dumps(with_public_model(payload, public_model), separators=(",", ":"))
    return line


class Proxy:
    """Sends one client request to the chosen backend, and to stable if the canary fails it.

    `http` pools keep-alive connections; `fresh` keeps none, so a request sent through it
    always opens a new connection (the retry after a dropped one)."""

    def __init__(self, gateway: Gateway, http: httpx.AsyncClient, retry_timeout_s: float, timeout_s: float, fresh: httpx.AsyncClient | None = None) -> None:
        self.gateway, self.http, self.fresh = gateway, http, fresh or http
        self.retry_timeout_s, self.timeout_s = retry_timeout_s, timeout_s

    def _request(self, http: httpx.AsyncClient, backend: Backend, path: str, payload: dict, timeout_s: float) -> httpx.Request:
        return http.build_request(
            "POST", backend.base_url + path, json={**payload, "model": backend.model}, headers=auth.bearer_headers(backend.api_key),
            # A read timeout bounds each silence; the asyncio.timeout around the call bounds the total.
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        )

    async def forward(self, path: str, payload: dict) -> Response:
        chosen, stable = self.gateway.route()
        stream = bool(payload.get("stream"))
        send = self._open_stream if stream else self._call
        result = await send(chosen, path, payload, retry=False, fallback=chosen.slot is not stable.slot)
        if chosen.slot is not stable.slot and result.outcome in FAILURES:
            self.gateway.record_retry(chosen)
            result = await send(stable, path, payload, retry=True, fallback=False)
        if result.outcome == "connection_error":
            # Stable refused, reset or closed the connection before any answer (a pooled
            # keep-alive connection it had just closed, a restart): nothing reached the client,
            # so try once more, on a new connection. There is no other stable replica to ask,
            # and the canary's share of traffic must stay what the weight says.
            self.gateway.record_retry(stable)
            result = await send(stable, path, payload, retry=True, fallback=False, fresh=True)
        if isinstance(result, StreamStart):
            return result.response(self.gateway)
        if result.outcome in FAILURES:
            self.gateway.metrics.lost.inc()
        return self._respond(result)

    def _respond(self, attempt: Attempt) -> Response:
        body = attempt.body
        if attempt.outcome == "ok":
            with suppress(ValueError):  # not JSON: pass it on untouched
                body = json.dumps(with_public_model(json.loads(body), self.gateway.public_model)).encode()
        return Response(body, status_code=attempt.status, media_type=attempt.content_type, headers={**attempt.headers, "x-gateway-backend": attempt.backend})

    async def _call(self, target: Target, path: str, payload: dict, retry: bool, fallback: bool, fresh: bool = False) -> Attempt:
        timeout_s = self.retry_timeout_s if fallback else self.timeout_s  # stable waits longer: nobody is behind it
        http = self.fresh if fresh else self.http
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                r = await http.send(self._request(http, target.backend, path, payload, timeout_s))
            attempt = Attempt.answered(r, r.content, time.perf_counter() - started)
        except (TimeoutError, httpx.TransportError) as exc:
            attempt = unanswered(target.backend, exc, time.perf_counter() - started, timeout_s)
        attempt.backend = target.backend.name
        self.gateway.record(target, attempt.outcome, attempt.latency_s, retry)
        return attempt

    async def _open_stream(self, target: Target, path: str, payload: dict, retry: bool, fallback: bool, fresh: bool = False) -> "Attempt | StreamStart":
        """Open the backend's stream and read up to its first event, sending nothing to the client
        yet: until then a failure can still be retried on stable."""
        timeout_s = self.retry_timeout_s if fallback else self.timeout_s  # stable waits longer: nobody is behind it
        http = self.fresh if fresh else self.http
        slot = target.slot
        started = time.perf_counter()
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(timeout_s):
                response = await http.send(self._request(http, slot.backend, path, payload, timeout_s), stream=True)
                if response.status_code >= 400:
                    body = await response.aread()
                    await response.aclose()
                    attempt = Attempt.answered(response, body, time.perf_counter() - started)
                else:
                    lines = response.aiter_lines()
                    head = [await anext(lines)]
                    while not head[-1].startswith("data:"):  # comments or `event:` lines before the first data
                        head.append(await anext(lines))
                    first = sse_data(head[-1])
                    if not is_error_event(first):  # recorded when the stream ends
                        return StreamStart(target, response, lines, head, first, started, retry)
                    await response.aclose()
                    attempt = Attempt("server_error", time.perf_counter() - started, 502, json.dumps(first).encode())
        except StopAsyncIteration:  # 200 and then nothing
            attempt = Attempt("server_error", time.perf_counter() - started, 502, error_body(f"backend '{slot.backend.name}' sent an empty stream"))
        except (TimeoutError, httpx.TransportError) as exc:
            attempt = unanswered(slot.backend, exc, time.perf_counter() - started, timeout_s)
        if response is not None and not response.is_closed:
            await response.aclose()
        attempt.backend = slot.backend.name
        self.gateway.record(target, attempt.outcome, attempt.latency_s, retry)
        return attempt


@dataclass
class StreamStart:
    """A backend stream whose first event has arrived and nothing has been sent on yet."""

    target: Target
    upstream: httpx.Response
    lines: AsyncIterator[str]
    head: list[str]
    first: Any
    started: float
    retry: bool
    outcome: str = "ok"  # so far: Proxy.forward retries only failed Attempts

    def response(self, gateway: Gateway) -> StreamingResponse:
        return StreamingResponse(self.relay(gateway), media_type="text/event-stream", headers={"x-gateway-backend": self.target.backend.name, "cache-control": "no-cache"})

    async def relay(self, gateway: Gateway) -> AsyncIterator[str]:
        public = gateway.public_model
        recorded = False

        def finish(outcome: str) -> None:
            # Called before the last bytes go out: a client that has read them may look at the
            # statistics at once, and a cancelled generator may never get past its next await.
            nonlocal recorded
            if not recorded:
                recorded = True
                gateway.record(self.target, outcome, time.perf_counter() - self.started, self.retry)
                if outcome in FAILURES:
                    gateway.metrics.lost.inc()  # bytes were out, so the client sees this one

        try:
            for line in self.head[:-1]:
                yield line + "\n"
            yield rewrite_sse_line(self.head[-1], self.first, public) + "\n"
            failed = False
            async for line in self.lines:
                payload = sse_data(line)
                failed = failed or is_error_event(payload)  # the backend's own error event
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    finish("server_error" if failed else "ok")
                yield rewrite_sse_line(line, payload, public) + "\n"
            finish("server_error" if failed else "ok")
        except (httpx.TransportError, TimeoutError) as exc:
            finish("timeout" if isinstance(exc, (TimeoutError, httpx.TimeoutException)) else "connection_error")
            # No retry once bytes are out: end with an error event, which the openai client
            # raises as APIError, rather than a silently truncated answer.
            message = f"backend '{self.target.backend.name}' failed mid-stream: {type(exc).__name__}: {exc}"
            yield "data: " + error_body(message, code="backend_stream_failed").decode() + "\n\n"
        finally:
            finish("aborted")  # the client went away: neither a success nor the backend's fault
            await self.upstream.aclose()


# --- the app -----------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.error_type = status, message, code, error_type


bearer_matches = auth.bearer_matches


def create_gateway(
    stable: Backend,
    canary: Backend | None = None,
    canary_weight: float = 0.0,
    retry_timeout_s: float = 30,
    seed: int | None = None,
    *,
    public_model: str | None = None,
    timeout_s: float = 120,
    api_key: str | None = None,
    admin_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The gateway app; its controller is `app.state.gateway`.

    `public_model` is the name clients send (default: stable's served name); `retry_timeout_s`
    is how long the canary has to answer (a stream: to send its first event) before the request
    is retried on stable, `timeout_s` the same bound for stable, which has no fallback.
    `api_key` guards /v1. The /admin routes answer loopback clients, and others only with
    `admin_key` (default: $SERVING_ADMIN_KEY, else $GATEWAY_ADMIN_KEY); everyone else gets 403.
    A request body over `max_body_bytes` is refused with 413 before it is read whole."""
    gateway = Gateway(stable, canary, canary_weight, seed, public_model)
    if admin_key is None:
        admin_key = auth.env_key(ADMIN_KEY_ENV) or auth.env_key(LEGACY_ADMIN_KEY_ENV)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # trust_env=False: backends are explicit URLs; an HTTP(S)_PROXY variable must not reroute them.
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        no_pool = httpx.Limits(max_connections=64, max_keepalive_connections=0)  # a new connection every time
        async with httpx.AsyncClient(trust_env=False, limits=limits) as http, httpx.AsyncClient(trust_env=False, limits=no_pool) as fresh:
            app.state.proxy = Proxy(gateway, http, retry_timeout_s, timeout_s, fresh)
            yield

    app = FastAPI(title=f"gateway: {gateway.public_model}", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": {"message": exc.message, "type": exc.error_type, "code": exc.code}})

    def require(request: Request, key: str | None) -> None:
        if key is not None and not bearer_matches(request.headers.get("authorization", ""), key):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def require_admin(request: Request) -> None:
        """Moving traffic is for this machine, or for whoever holds the admin key."""
        if admin_key is not None and bearer_matches(request.headers.get("authorization", ""), admin_key):
            return
        if request.client is not None and is_loopback(request.client.host):
            return
        raise APIError(
            403, f"the admin routes answer loopback clients only, or clients sending 'Authorization: Bearer ${ADMIN_KEY_ENV}'",
            code="forbidden", error_type="permission_error",
        )

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    async def proxied(request: Request, path: str) -> Response:
        require(request, api_key)
        payload = await json_body(request)
        if payload.get("model") != gateway.public_model:
            raise APIError(404, f"The model '{payload.get('model')}' does not exist; this gateway serves '{gateway.public_model}'", code="model_not_found")
        return await request.app.state.proxy.forward(path, payload)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxied(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxied(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        require(request, api_key)
        return {"object": "list", "data": [{"id": gateway.public_model, "object": "model", "created": 0, "owned_by": "gateway"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # Liveness of the gateway only: it stays up, and retries, while a backend is down.
        canary_backend = gateway.canary
        return {"status": "ok", "model": gateway.public_model, "stable": gateway.stable.name, "canary": canary_backend and canary_backend.name, "canary_weight": gateway.weight}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/backends")
    async def backends(request: Request) -> dict[str, Any]:
        require_admin(request)
        return gateway.snapshot()

    @app.post("/admin/weight")
    async def weight(request: Request) -> dict[str, Any]:
        require_admin(request)
        value = (await json_body(request)).get("weight")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"send {{\"weight\": <number between 0 and 1>}}, got weight={value!r}")
        try:
            gateway.set_weight(float(value))
        except NoCanaryError as exc:
            raise APIError(409, str(exc), code="no_canary") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return {"canary_weight": gateway.weight}

    return app


# --- shadowing -----------------------------------------------------------------------------------


def shadow_agreement(stable: Backend, canary: Backend, prompts: list[str], max_tokens: int, timeout_s: float = 60) -> float | None:
    """Agreement with stable on a shadowed sample: each prompt goes straight to both backends
    (not through the gateway, so it neither shifts traffic nor counts in its statistics) as a
    greedy chat, and the share of identical answers (whitespace-stripped) is returned. A prompt
    either backend fails to answer counts as a disagreement; None without prompts.

    Exact match is the right test for greedy decoding of the same prompt: a re-quantized or
    re-served copy of one model should agree almost always; a different model rarely will."""
    if not prompts:
        return None
    from serving.client import chat_once, client

    apis = [(client(b.base_url + "/v1", api_key=b.api_key, timeout=timeout_s), b.model) for b in (stable, canary)]
    same = 0
    for prompt in prompts:
        answers = []
        for api, model in apis:
            try:
                answers.append(chat_once(api, model, prompt, max_tokens)[0].strip())
            except Exception:  # an unanswered prompt cannot agree; the error rate is measured elsewhere
                answers.append(None)
        same += answers[0] is not None and answers[0] == answers[1]
    return same / len(prompts)


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description="Split traffic between a stable and a canary OpenAI-compatible backend.")
    parser.add_argument("--stable-url", required=True, help="stable backend root, e.g. http://127.0.0.1:8001")
    parser.add_argument("--stable-model", required=True, help="the model name stable serves")
    parser.add_argument("--stable-name", default="stable", help="label in statistics and metrics")
    parser.add_argument("--canary-url", help="canary backend root")
    parser.add_argument("--canary-model", help="the model name the canary serves")
    parser.add_argument("--canary-name", default="canary", help="label in statistics and metrics")
    parser.add_argument("--canary-weight", type=float, default=0.0, help="share of requests sent to the canary, 0..1")
    parser.add_argument("--public-model", help="the name clients send (default: --stable-model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--retry-timeout", type=float, default=30, help="seconds the canary has to answer before stable is asked")
    parser.add_argument("--timeout", type=float, default=120, help="seconds stable has to answer")
    parser.add_argument("--seed", type=int, help="routing seed, for reproducible splits")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body accepted; larger ones get 413")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback host without API and admin keys")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # Keys only from the environment: argv is visible to every user in `ps`.
    args.api_key = auth.env_key(API_KEY_ENV)
    args.admin_key = auth.env_key(ADMIN_KEY_ENV) or auth.env_key(LEGACY_ADMIN_KEY_ENV)
    args.backend_api_key = auth.backend_key()
    if bool(args.canary_url) != bool(args.canary_model):
        parser.error("--canary-url and --canary-model go together")
    if args.canary_weight and not args.canary_url:
        parser.error("--canary-weight needs a canary (--canary-url, --canary-model)")
    if not 0 <= args.canary_weight <= 1:
        parser.error(f"--canary-weight must be between 0 and 1, got {args.canary_weight}")
    if not is_loopback(args.host) and not (args.api_key and args.admin_key) and not args.insecure:
        parser.error(
            f"refusing to listen on {args.host} without ${API_KEY_ENV} and ${ADMIN_KEY_ENV}: anyone who can reach it "
            "could use the models and move traffic. Set both, bind 127.0.0.1, or pass --insecure if that is really intended."
        )
    return args


def app_from_args(args: argparse.Namespace) -> FastAPI:
    stable = Backend(args.stable_name, args.stable_url, args.stable_model, args.backend_api_key)
    canary = Backend(args.canary_name, args.canary_url, args.canary_model, args.backend_api_key) if args.canary_url else None
    return create_gateway(
        stable, canary, args.canary_weight, args.retry_timeout, args.seed,
        public_model=args.public_model, timeout_s=args.timeout, api_key=args.api_key, admin_key=args.admin_key,
        max_body_bytes=args.max_body_bytes,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    uvicorn.run(app_from_args(args), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
