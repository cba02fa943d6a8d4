"""Sending one client request to a version's replica, and retrying it where the client cannot see.

A request is routed when it leaves the gateway's queue, not when it arrives: a promotion or a
rollback while it waits must not send it to a version that has left (and may have stopped).
When the canary fails a request (HTTP 5xx or 429, connection refused or reset, no answer within
`retry_timeout_s`), it is retried on stable, so a bad canary costs clients latency, never an
error; the failure still counts against the canary in the statistics the release controller
analyses. A canary's 4xx is asked of stable too: if stable answers, the 4xx was the canary's
own (a smaller context, a changed template) and counts as its failure, and the client gets
stable's answer; if stable refuses it too, it was the request's fault, counted alike for both. A stable replica that refused, reset or closed the connection before answering (a
pooled keep-alive connection it had just closed, a process that died) is retried on another
healthy replica, or on a new connection after a short pause while the supervisor restarts it:
nothing had reached the client, so the retry is invisible to it. A stream is retried only while
nothing has reached the client; once bytes are out, a failure ends the stream with an OpenAI
error event. Stable's 4xx are the caller's own errors and are passed through.

Every answer names the replica that gave it in `x-gateway-backend` and its model version in
`x-gateway-version`. With the record on, a completion's `Tap` (serving/record/tap.py) stamps
its id on the answer (`x-completion-id`, the body's `id`) and hands it to the recorder once the
answer is known: a JSON answer when it is ready, a stream when it ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi.responses import Response, StreamingResponse

from serving import auth, protocol
from serving.cache import cache_key
from serving.routing import CALLER_TIER, FAILURES, REFUSED_VALID, Backend, Gateway, SlotRetired, Target, classify, version_of

PASSED_HEADERS = ("retry-after",)  # upstream headers a client may act on
# Stable's dropped connections: retried this many times, on another replica when there is one,
# else after a pause doubling from RETRY_PAUSE_S (the supervisor's time to notice and restart).
STABLE_RETRIES = 5
RETRY_PAUSE_S = 0.25


def error_body(message: str, error_type: str = "server_error", code: str | None = None) -> bytes:
    return json.dumps(protocol.error_body(message, code, error_type)).encode()


@dataclass
class Attempt:
    """One backend's answer, or a synthesised 502/503/504 when it gave none."""

    outcome: str
    latency_s: float
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    backend: Backend | None = None  # who answered, for the x-gateway-* headers
    headers: dict[str, str] = field(default_factory=dict)
    target: Target | None = None  # the version (and statistics) it is recorded under
    retried: bool = False  # sent after another attempt failed

    @classmethod
    def answered(cls, r: aiohttp.ClientResponse, body: bytes, latency_s: float) -> "Attempt":
        kept = {h: r.headers[h] for h in PASSED_HEADERS if h in r.headers}
        return cls(classify(r.status), latency_s, r.status, body, r.headers.get("content-type", "application/json"), headers=kept)


def identity_of(backend: Backend) -> str:
    """What a cached answer belongs to, beside the gateway's public model name: the served
    model and its version. Two models' version 3 behind one Redis are two identities."""
    return f"{backend.model}@{version_of(backend)}"


def backend_headers(backend: Backend | None, replica: str | None = None) -> dict[str, str]:
    if backend is None:
        return {"x-gateway-backend": ""}
    return {"x-gateway-backend": replica or backend.name, "x-gateway-version": version_of(backend)}


def unanswered(backend: Backend, exc: BaseException, latency_s: float, timeout_s: float) -> Attempt:
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
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


def answer_texts(body: bytes) -> list[str] | None:
    """The texts of a completion's choices (chat or legacy), for comparing two answers."""
    try:
        data = json.loads(body)
        return [(c.get("message") or {}).get("content") or c.get("text") or "" for c in data["choices"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def deterministic(payload: dict) -> bool:
    """Greedy decoding: the same model must give the same answer, so two answers can be compared."""
    return payload.get("temperature") == 0 and not payload.get("stream")


def sessions() -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
    """The gateway's two upstream clients: one pooling keep-alive connections, one that opens a
    new connection for every request (the retry after a dropped one). aiohttp, not httpx: the
    proxy's upstream calls were half the gateway's CPU with httpx (1.9 ms a request in make
    bench), CPU that a CPU engine on the same cores then lacks. Neither reads proxy variables
    from the environment: backends are explicit URLs."""
    unbounded = aiohttp.ClientTimeout(total=None)  # each call is bounded by its own timeouts
    pooled = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, limit_per_host=0), timeout=unbounded, trust_env=False)
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, force_close=True), timeout=unbounded, trust_env=False)
    return pooled, fresh


async def lines_of(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """A response body's lines, without their line endings (blank lines kept: they end SSE events)."""
    async for raw in response.content:
        yield raw.decode().rstrip("\r\n")


class Proxy:
    """Sends one client request to the version it is routed to, and to stable if the canary
    fails it (or refuses it with a 4xx: stable then tells whose fault that was).

    `http` pools keep-alive connections; `fresh` keeps none, so a request sent through it
    always opens a new connection (the retry after a dropped one)."""

    def __init__(self, gateway: Gateway, http: aiohttp.ClientSession, retry_timeout_s: float, timeout_s: float, fresh: aiohttp.ClientSession | None = None) -> None:
        self.gateway, self.http, self.fresh = gateway, http, fresh or http
        self.retry_timeout_s, self.timeout_s = retry_timeout_s, timeout_s
        self._background: set[asyncio.Task] = set()

    async def _send(self, http: aiohttp.ClientSession, backend: Backend, path: str, payload: dict, timeout_s: float) -> aiohttp.ClientResponse:
        return await http.post(
            backend.base_url + path, data=json.dumps({**payload, "model": backend.model}),
            headers={"content-type": "application/json", **auth.bearer_headers(backend.api_key)},
            # A read timeout bounds each silence; the asyncio.timeout around the call bounds the total.
            timeout=aiohttp.ClientTimeout(total=None, connect=min(timeout_s, 10.0), sock_read=timeout_s),
        )

    async def _acquire(self, target: Target, exclude: frozenset[str], wait_s: float) -> tuple[Target, Backend | None]:
        """A healthy replica of `target`'s version, preferring those not in `exclude`; while every
        replica is out of rotation (restarting), wait up to `wait_s` for one to come back. A
        version that left the routing meanwhile (promoted away, rolled back: its replicas drain
        and stop) hands the request to the current stable, which it is then attributed to."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                backend = self.gateway.acquire(target.slot, exclude) or self.gateway.acquire(target.slot)
            except SlotRetired:
                target, exclude = self.gateway.stable_target(), frozenset()
                continue
            if backend is not None or time.monotonic() >= deadline:
                return target, backend
            await asyncio.sleep(0.05)

    async def forward(
        self, path: str, payload: dict, front: Any = None, priority: int = 0, disconnected: Any = None, cached: bool = True, tap: Any = None,
    ) -> Response:
        """With a `front` (the gateway's FrontDoor): answer from the cache if the version the
        request would go to answered it before, else wait for a slot in the priority queue,
        route (now: the routing may have changed while it waited), send, and store a
        deterministic answer under the model version that gave it. `cached=False` (the client
        sent `Cache-Control: no-cache`) always asks a backend. `tap` (the record's) gets the
        answer, whatever gave it."""
        stream = bool(payload.get("stream"))
        cache = None if front is None or stream or not cached else front.cache
        if cache is not None:
            peek = self.gateway.route()  # which version's entry to look for; nothing is sent there
            key = cache_key(self.gateway.public_model, identity_of(peek.backend), path, payload)
            if key is not None:
                body = await cache.get(key)
                self.gateway.metrics.cache.labels("hit" if body is not None else "miss", CALLER_TIER.get()).inc()
                if body is not None:  # never recorded in a version's statistics: no backend answered
                    headers = {"x-gateway-cache": "hit", **backend_headers(peek.backend, replica="cache")}
                    if tap is None:
                        return Response(body, media_type="application/json", headers=headers)
                    response = Response(tap.stamp_body(body), media_type="application/json", headers={**headers, **tap.headers})
                    tap.answered(response, cache_hit=True)
                    return response
        queue = None if front is None else front.queue
        admission = None
        if queue is not None:
            queued_at = time.perf_counter()
            admission = await queue.acquire(priority, disconnected)
            self.gateway.metrics.queue_wait_seconds.labels(CALLER_TIER.get()).observe(time.perf_counter() - queued_at)
        try:
            response, answered_by = await self._forward(path, payload if tap is None else tap.upstream(payload), stream, admission, tap)
        except BaseException:
            if admission is not None:
                admission.release()
            raise
        if admission is not None and not isinstance(response, StreamingResponse):
            admission.release()  # a stream releases its slot when it ends
        if cache is not None and response.status_code == 200 and answered_by is not None:
            key = cache_key(self.gateway.public_model, identity_of(answered_by), path, payload)  # the version that answered
            if key is not None:
                await cache.put(key, response.body, front.cache_ttl_s)
        if tap is not None and not isinstance(response, StreamingResponse):  # a stream is recorded when it ends
            tap.answered(response)
        return response

    async def _forward(self, path: str, payload: dict, stream: bool, admission: Any, tap: Any = None) -> tuple[Response, Backend | None]:
        """Route (the request holds its queue slot now), send, retry where the client cannot see
        it; returns the response and the replica that gave it."""
        send = self._open_stream if stream else self._call
        chosen = self.gateway.route()
        canary_first = chosen.role == "canary"
        # A canary's answer is recorded here, once it is known whether a 4xx was its own fault.
        result = await send(chosen, path, payload, retry=False, fallback=canary_first, record=not canary_first)
        if canary_first and not isinstance(result, StreamStart):  # a stream is recorded when it ends
            if result.target is not None and result.target.role != "canary":
                self._record(result, retry=False)  # the canary left the routing before dispatch: stable took it
            elif result.outcome in FAILURES:
                self._record(result, retry=False)
                self.gateway.record_retry(result.target, result.backend)
                result = await send(self.gateway.stable_target(), path, payload, retry=True, fallback=False)
            elif result.outcome == "client_error":
                result = await self._second_opinion(result, send, path, payload)
            else:
                self._record(result, retry=False)
        tried: set[str] = set()
        for n in range(STABLE_RETRIES):
            if result.outcome != "connection_error":
                break
            # Stable's replica refused, reset or closed the connection before any answer: nothing
            # reached the client. Another replica if one is left untried, else a pause (the
            # supervisor's time to take a dead one out of rotation) and a new connection. Stable
            # as it is now: a promotion may have replaced it since.
            stable = self.gateway.stable_target()
            self.gateway.record_retry(result.target or stable, result.backend)
            if result.backend is not None:
                tried.add(result.backend.name)
            if not [b for b in stable.slot.backends if b.name not in tried and not self.gateway.is_down(b.name)]:
                tried.clear()
                if n:  # the first retry at once: a keep-alive connection closed under us is the common case
                    await asyncio.sleep(RETRY_PAUSE_S * 2 ** (n - 1))
            result = await send(stable, path, payload, retry=True, fallback=False, fresh=True, exclude=frozenset(tried))
        if isinstance(result, StreamStart):
            result.on_close = admission.release if admission is not None else None
            result.tap = tap
            return result.response(self.gateway), result.backend
        if result.outcome in FAILURES:
            self.gateway.metrics.lost.inc()
        elif result.outcome == "ok" and result.target is not None and result.target.role == "stable" and not result.retried:
            mirror = self.gateway.mirror_target()
            if mirror is not None:
                task = asyncio.create_task(self._mirror(mirror, path, payload, result.body))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return self._respond(result, tap), result.backend

    async def _second_opinion(self, refused: "Attempt", send: Any, path: str, payload: dict) -> "Attempt | StreamStart":
        """The canary refused the request (4xx): ask stable the same. Stable refusing it too makes
        it the request's own error, counted alike for both; stable answering it makes the 4xx the
        canary's failure (a smaller context, a changed template), and the client gets stable's
        answer. Stable failing decides nothing: the canary's 4xx stands."""
        self.gateway.record_retry(refused.target, refused.backend)
        second = await send(self.gateway.stable_target(), path, payload, retry=True, fallback=False)
        if second.outcome == "ok":  # a stream that opened is "ok" too
            refused.outcome = REFUSED_VALID
        self._record(refused, retry=False)
        return second if second.outcome in ("ok", "client_error") else refused

    def _record(self, attempt: "Attempt", retry: bool) -> None:
        if attempt.target is not None:
            self.gateway.record(attempt.target, attempt.outcome, attempt.latency_s, retry, attempt.backend)

    def _respond(self, attempt: Attempt, tap: Any = None) -> Response:
        body = attempt.body
        if attempt.outcome == "ok":
            with suppress(ValueError):  # not JSON: pass it on untouched
                answer = json.loads(body)
                if attempt.target is not None and isinstance(answer, dict):
                    self.gateway.record_tokens(attempt.target, answer.get("usage"), attempt.backend)
                answer = with_public_model(answer, self.gateway.public_model)
                body = json.dumps(answer if tap is None else tap.stamp(answer)).encode()
        headers = {**attempt.headers, **backend_headers(attempt.backend), **(tap.headers if tap is not None else {})}
        return Response(body, status_code=attempt.status, media_type=attempt.content_type, headers=headers)

    def _budget(self, fallback: bool, fresh: bool) -> tuple[float, aiohttp.ClientSession, float]:
        """(timeout, client, start) of one attempt: stable waits longer (nobody is behind it), a
        retry after a dropped connection goes out on a new one."""
        return (self.retry_timeout_s if fallback else self.timeout_s), (self.fresh if fresh else self.http), time.perf_counter()

    def _no_replica(self, target: Target, started: float, timeout_s: float, retry: bool, record: bool) -> Attempt:
        message = f"no healthy replica of '{target.backend.name}' within {timeout_s:g}s"
        attempt = Attempt("server_error", time.perf_counter() - started, 503, error_body(message, code="no_healthy_replica"), target=target, retried=retry)
        if record:
            self._record(attempt, retry)
        return attempt

    async def _call(
        self, target: Target, path: str, payload: dict, retry: bool, fallback: bool, fresh: bool = False, exclude: frozenset[str] = frozenset(), record: bool = True,
    ) -> Attempt:
        timeout_s, http, started = self._budget(fallback, fresh)
        target, backend = await self._acquire(target, exclude, timeout_s)
        if backend is None:
            return self._no_replica(target, started, timeout_s, retry, record)
        try:
            async with asyncio.timeout(timeout_s):
                async with await self._send(http, backend, path, payload, timeout_s) as r:
                    body = await r.read()
            attempt = Attempt.answered(r, body, time.perf_counter() - started)
        except (TimeoutError, aiohttp.ClientError) as exc:
            attempt = unanswered(backend, exc, time.perf_counter() - started, timeout_s)
        finally:
            self.gateway.release(backend)
        attempt.backend, attempt.target, attempt.retried = backend, target, retry
        if record:
            self._record(attempt, retry)
        return attempt

    async def _mirror(self, target: Target, path: str, payload: dict, stable_body: bytes) -> None:
        """A copy for the canary (blue-green analysis, shadow releases): recorded as its own,
        compared with stable's answer when decoding is greedy, never seen by a client. Stable
        answered this request, so a 4xx from the canary is the canary's own failure."""
        attempt = await self._call(target, path, payload, retry=False, fallback=True, record=False)
        if attempt.target is None or attempt.target.role != "shadow":
            return  # the canary left the routing first: the copy went to stable, compare nothing
        if attempt.outcome == "client_error":
            attempt.outcome = REFUSED_VALID
        self._record(attempt, retry=False)
        if attempt.outcome == "ok" and deterministic(payload):
            ours, theirs = answer_texts(attempt.body), answer_texts(stable_body)
            if ours is not None and theirs is not None:
                self.gateway.record_agreement(target, [t.strip() for t in ours] == [t.strip() for t in theirs])

    async def _open_stream(
        self, target: Target, path: str, payload: dict, retry: bool, fallback: bool, fresh: bool = False, exclude: frozenset[str] = frozenset(), record: bool = True,
    ) -> "Attempt | StreamStart":
        """Open the backend's stream and read up to its first event, sending nothing to the client
        yet: until then a failure can still be retried on stable."""
        timeout_s, http, started = self._budget(fallback, fresh)
        target, backend = await self._acquire(target, exclude, timeout_s)
        if backend is None:
            return self._no_replica(target, started, timeout_s, retry, record)
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._send(http, backend, path, payload, timeout_s)
                if response.status >= 400:
                    body = await response.read()
                    response.release()
                    attempt = Attempt.answered(response, body, time.perf_counter() - started)
                else:
                    lines = lines_of(response)
                    head = [await anext(lines)]
                    while not head[-1].startswith("data:"):  # comments or `event:` lines before the first data
                        head.append(await anext(lines))
                    first = sse_data(head[-1])
                    if not is_error_event(first):  # recorded, and released, when the stream ends
                        self.gateway.record_first_token(target, time.perf_counter() - started, backend)
                        return StreamStart(target, backend, response, lines, head, first, started, retry)
                    response.close()
                    attempt = Attempt("server_error", time.perf_counter() - started, 502, json.dumps(first).encode())
        except StopAsyncIteration:  # 200 and then nothing
            attempt = Attempt("server_error", time.perf_counter() - started, 502, error_body(f"backend '{backend.name}' sent an empty stream"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            attempt = unanswered(backend, exc, time.perf_counter() - started, timeout_s)
        if response is not None and not response.closed:
            response.close()
        self.gateway.release(backend)
        attempt.backend, attempt.target, attempt.retried = backend, target, retry
        if record:
            self._record(attempt, retry)
        return attempt


@dataclass
class StreamStart:
    """A backend stream whose first event has arrived and nothing has been sent on yet."""

    target: Target
    backend: Backend
    upstream: aiohttp.ClientResponse
    lines: AsyncIterator[str]
    head: list[str]
    first: Any
    started: float
    retry: bool
    outcome: str = "ok"  # so far: Proxy.forward retries only failed Attempts
    on_close: Any = None  # called once the stream is over (the queue slot it held)
    tap: Any = None  # the record's: stamps each chunk's id, collects the answer

    def response(self, gateway: Gateway) -> StreamingResponse:
        headers = {**backend_headers(self.backend), "cache-control": "no-cache", **(self.tap.headers if self.tap is not None else {})}
        return StreamingResponse(self.relay(gateway), media_type="text/event-stream", headers=headers)

    async def relay(self, gateway: Gateway) -> AsyncIterator[str]:
        public = gateway.public_model
        recorded = False
        tap = self.tap

        def finish(outcome: str) -> None:
            # Called before the last bytes go out: a client that has read them may look at the
            # statistics at once, and a cancelled generator may never get past its next await.
            nonlocal recorded
            if not recorded:
                recorded = True
                gateway.release(self.backend)
                gateway.record(self.target, outcome, time.perf_counter() - self.started, self.retry, self.backend)
                if outcome in FAILURES:
                    gateway.metrics.lost.inc()  # bytes were out, so the client sees this one
                if tap is not None:
                    tap.streamed(outcome, version_of(self.backend), self.backend.name)

        def out(line: str, payload: Any) -> str:
            if tap is not None and isinstance(payload, dict):  # stamped with the completion's id
                return "data: " + json.dumps(with_public_model(payload, public), separators=(",", ":")) + "\n"
            return rewrite_sse_line(line, payload, public) + "\n"

        try:
            for line in self.head[:-1]:
                yield line + "\n"
            if tap is not None:
                tap.chunk(self.first)
            yield out(self.head[-1], self.first)
            failed = skip_blank = False
            async for line in self.lines:
                if skip_blank and not line:  # the end of an event the client does not get
                    skip_blank = False
                    continue
                payload = sse_data(line)
                failed = failed or is_error_event(payload)  # the backend's own error event
                if isinstance(payload, dict) and payload.get("usage"):  # stream_options.include_usage
                    gateway.record_tokens(self.target, payload["usage"], self.backend)
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    finish("server_error" if failed else "ok")
                if tap is not None and not tap.chunk(payload):
                    skip_blank = True  # the usage the record asked the engine for
                    continue
                yield out(line, payload)
            finish("server_error" if failed else "ok")
        except (aiohttp.ClientError, TimeoutError) as exc:
            finish("timeout" if isinstance(exc, TimeoutError) else "connection_error")
            # No retry once bytes are out: end with an error event, which the openai client
            # raises as APIError, rather than a silently truncated answer.
            message = f"backend '{self.backend.name}' failed mid-stream: {type(exc).__name__}: {exc}"
            yield "data: " + error_body(message, code="backend_stream_failed").decode() + "\n\n"
        finally:
            finish("aborted")  # the client went away: neither a success nor the backend's fault
            if self.on_close is not None:
                self.on_close()
            self.upstream.close()
