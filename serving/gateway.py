"""The gateway's app: the one public OpenAI-compatible endpoint in front of the versions.

Clients talk to one public model name; each request goes to the canary with probability
`weight`, else to stable, with `model` rewritten to the served name of the replica chosen
(`serving.routing` holds that state, `serving.proxy` sends and retries). Every answer names the
replica that gave it in `x-gateway-backend` and its version in `x-gateway-version`.

Routes: POST /v1/chat/completions and /v1/completions (JSON or `stream: true` SSE),
POST /v1/feedback (on a recorded completion, serving/feedback.py), GET /v1/models, GET /health, GET /metrics (Prometheus, one registry per app), and the admin
routes GET /admin/backends and POST /admin/weight, which answer keys-file keys holding the
`admin` scope, clients sending the admin key (Bearer `admin_key`, by default $SERVING_ADMIN_KEY)
and loopback clients that send no keys-file key; a keys-file key without the scope gets 403 in
OpenAI's error shape, from anywhere. The serving plane (`serving.plane`) adds its own admin
routes with the same rule. Each key's scopes gate its routes (serving/keys.py: `inference`,
`feedback`, `read-metrics` for /metrics from off this machine). With an audit log
(registry/audit.py), every refused admin call and every allowed one that changes something is
an entry: who, the route, the answer's status.

In-process callers hold the `Gateway` controller (`app.state.gateway`): it routes, keeps the
per-version statistics, and moves traffic (`set_weight`, `set_canary`, `remove_canary`,
`promote_canary`) from any thread. `python -m serving.gateway` runs it under uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import auth
from serving.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, StatusNote
from serving.netaddr import is_loopback
from serving.cache import MemoryCache, RedisCache, ResponseCache
from serving.feedback import Caller, FeedbackDesk, FeedbackPolicy
from serving.feedback import answer as feedback_answer
from registry.audit import AuditLog
from serving.keys import PRIORITY_HEADER, BadPriority, KeyEntry, KeyRing, KeyTable, Tier, request_priority
from serving.keys import key_id as keys_key_id
from serving.queue import AdmissionQueue, ClientDisconnected, QueueFull
from serving.ratelimit import LimiterUnavailable, MemoryRateLimiter, RateLimited, RateLimiter, RedisRateLimiter, estimate_tokens
from serving.record.recorder import SERVICE_TIER, Recorder
from serving.record.schema import key_id
from serving.protocol import APIError
from serving.protocol import error_body as protocol_error_body
from serving.proxy import Attempt, Proxy, StreamStart, error_body, rewrite_sse_line, sessions, sse_data
from serving.routing import CALLER_TIER, FAILURES, LATENCY_SAMPLES, Backend, Gateway, NoCanaryError, Slot, Stats, Target, check_weight, classify, percentile

log = logging.getLogger("serving.gateway")
API_KEY_ENV = "GATEWAY_API_KEY"  # keys come from the environment: a key in argv is visible in `ps`
ADMIN_KEY_ENV = auth.ADMIN_KEY_ENV
LEGACY_ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"  # still read, after $SERVING_ADMIN_KEY
BACKEND_KEY_ENV = auth.API_KEY_ENV  # what serving.server reads, so one variable serves both sides

# Callers without a tier (no keys file, or the gateway's own key): priority 0 unless the header
# asks for less; no rate limit.
UNTIERED = Tier("untiered", 0, 0, 0)


@dataclass
class FrontDoor:
    """What stands in front of the engines, each part optional: a response cache for
    deterministic requests (keyed by model version), a priority queue with backpressure, and
    per-key tiers with their rate limits. In memory, or in Redis shared by gateway replicas."""

    cache: ResponseCache | None = None
    cache_ttl_s: float = 300
    queue: AdmissionQueue | None = None
    keys: KeyTable | KeyRing | None = None  # a KeyRing re-reads its file when it changes
    limiter: RateLimiter | None = None
    default_max_tokens: int = 64
    # While the limiter cannot be read (Redis down): True serves keyed requests without their
    # limits, False refuses them with 503 (serve.redis_failure_mode).
    limits_fail_open: bool = True
    # The record of every answer (serving/record/): started and flushed with the app.
    record: Recorder | None = None
    # What POST /v1/feedback accepts (serving/feedback.py); None, or no record: 404 feedback_unavailable.
    feedback: FeedbackPolicy | None = field(default_factory=FeedbackPolicy)

    @classmethod
    def from_params(cls, serve, replicas: int = 1, record: Recorder | None = None, feedback=None) -> "FrontDoor":
        """From `serve:` params; `replicas` sizes the queue's in-flight slots; `record` is the
        recorder (`Recorder.from_params(params.record, ...)`), if any; `feedback` the `feedback:`
        params section (None: the endpoint's defaults)."""
        cache = None
        if serve.cache_entries:
            cache = RedisCache.from_url(serve.redis_url) if serve.redis_url else MemoryCache(serve.cache_entries)
        keys = KeyRing(serve.keys_file) if serve.keys_file else None
        limiter = (RedisRateLimiter.from_url(serve.redis_url) if serve.redis_url else MemoryRateLimiter()) if keys else None
        queue = AdmissionQueue(serve.queue_capacity * max(1, replicas), serve.queue_max_waiting, max_overtake_s=serve.queue_max_overtake_s)
        policy = FeedbackPolicy() if feedback is None else FeedbackPolicy.from_params(feedback)
        return cls(cache, serve.cache_ttl_s, queue, keys, limiter, serve.max_new_tokens, serve.redis_failure_mode == "open", record, policy)


__all__ = [  # the routing state and the proxy live in their own modules; re-exported for callers
    "FAILURES", "LATENCY_SAMPLES", "Attempt", "Backend", "Gateway", "NoCanaryError", "Proxy", "Slot", "Stats", "StreamStart", "Target",
    "check_weight", "classify", "create_gateway", "error_body", "percentile", "rewrite_sse_line", "shadow_agreement", "sse_data",
]


# --- the app -----------------------------------------------------------------------------------


class AdminAudit:
    """Writes an admin call to the audit log once it is answered (its status known): every
    refused call, and every allowed one but the plain reads (GET), which the release polls every
    second; handing out the traffic key is logged though. Who it was is what `require_admin`
    left on the request's state; a route may add the version it acted on (`audit_version`)."""

    LOGGED_READS = frozenset({"/admin/traffic-key"})

    def __init__(self, app, log: AuditLog) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/admin/"):
            await self.app(scope, receive, send)
            return
        noted = StatusNote(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            status = noted.status
            state = scope.get("state") or {}
            refused = state.get("audit_refusal") or (f"answered {status}" if status in (401, 403) else None)
            if refused or scope["method"] != "GET" or scope["path"] in self.LOGGED_READS:
                try:
                    await asyncio.to_thread(
                        self.log.append, "admin_call", state.get("audit_who") or "unidentified caller", version=state.get("audit_version"),
                        reason=refused, route=scope["path"], method=scope["method"], status=status, outcome="refused" if refused else "answered",
                    )
                except OSError as exc:  # the call was answered; a lost entry is logged loudly
                    log.error("gateway: audit log %s not written for %s %s: %s", self.log.path, scope["method"], scope["path"], exc)


bearer_matches = auth.bearer_matches


def create_gateway(
    stable: Backend | list[Backend] | Gateway,
    canary: Backend | list[Backend] | None = None,
    canary_weight: float = 0.0,
    retry_timeout_s: float = 30,
    seed: int | None = None,
    *,
    public_model: str | None = None,
    timeout_s: float = 120,
    api_key: str | None = None,
    admin_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_change: Callable[[], None] | None = None,
    front: FrontDoor | None = None,
    service_keys: Collection[str] = (),
    audit: AuditLog | None = None,
) -> FastAPI:
    """The gateway app; its controller is `app.state.gateway`.

    `public_model` is the name clients send (default: stable's served name); `retry_timeout_s`
    is how long the canary has to answer (a stream: to send its first event) before the request
    is retried on stable, `timeout_s` the same bound for stable, which has no fallback.
    `api_key` guards /v1. The /admin routes answer loopback clients, and others only with
    `admin_key` (default: $SERVING_ADMIN_KEY, else $GATEWAY_ADMIN_KEY); everyone else gets 403.
    A request body over `max_body_bytes` is refused with 413 before it is read whole.
    `stable` may be a ready `Gateway` (the plane's); `on_change()` runs after an admin route
    moved traffic (the plane persists its routing there). `front` is what stands before the
    engines: the response cache, the priority queue, the keys file and its rate limits.
    `service_keys` are accepted like `api_key` (untiered, no rate limit): the plane's own key
    for a release's synthetic users, which must get in whatever keys the clients use.
    `audit`: where admin calls are recorded (None: nowhere).

    Every error is answered in OpenAI's shape, an unexpected one too (500, `internal_error`)."""
    front = front or FrontDoor()
    gateway = stable if isinstance(stable, Gateway) else Gateway(stable, canary, canary_weight, seed, public_model)
    if admin_key is None:
        admin_key = auth.env_key(ADMIN_KEY_ENV) or auth.env_key(LEGACY_ADMIN_KEY_ENV)

    record = front.record
    if record is not None:
        record.register(gateway.metrics.registry)
    desk = FeedbackDesk(record.open_store, record, front.feedback) if record is not None and front.feedback is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if record is not None:
            await asyncio.to_thread(record.start)  # a store that cannot be opened fails the start
        try:
            http, fresh = sessions()
            async with http, fresh:
                app.state.proxy = Proxy(gateway, http, retry_timeout_s, timeout_s, fresh)
                yield
        finally:
            if desk is not None:
                await asyncio.to_thread(desk.close)
            if record is not None:
                await asyncio.to_thread(record.close)  # what is buffered is written first

    app = FastAPI(title=f"gateway: {gateway.public_model}", lifespan=lifespan)
    app.state.gateway, app.state.record = gateway, record
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if audit is not None:
        app.add_middleware(AdminAudit, log=audit)
    app.state.audit = audit

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)

    for refusal in (QueueFull, RateLimited, BadPriority):

        @app.exception_handler(refusal)
        async def _refused(request: Request, exc: Exception) -> JSONResponse:
            gateway.metrics.refused.labels(type(exc).__name__).inc()
            return JSONResponse(exc.error, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; counted by the queue

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A client speaks OpenAI's protocol: even a bug answers in its error shape (Starlette
        # still logs the traceback).
        log.exception("gateway: unexpected error on %s", request.url.path)
        message = f"the gateway failed on this request: {type(exc).__name__}: {str(exc)[:300]}"
        return JSONResponse(status_code=500, content=protocol_error_body(message, "internal_error", "server_error"))

    def require(request: Request, key: str | None) -> None:
        if key is not None and not bearer_matches(request.headers.get("authorization", ""), key):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def keyed(request: Request) -> tuple[str, KeyEntry] | None:
        return front.keys.lookup(request.headers.get("authorization")) if front.keys is not None else None

    def require_admin(request: Request) -> None:
        """Moving traffic is for keys with the `admin` scope, whoever holds the admin key, or this
        machine. A keys-file key without the scope is refused even from loopback: the caller
        named itself, and that key may not. Who it was is left on `request.state` for the audit."""
        header = request.headers.get("authorization", "")
        host = request.client.host if request.client is not None else "?"
        found = keyed(request)
        refusal = None
        if found is not None:
            entry = found[1]
            request.state.audit_who = f"key {entry.id}"
            if entry.expired():
                refusal = f"key {entry.id} expired at {entry.expires.isoformat()}"
            elif not entry.allows("admin"):
                refusal = f"key {entry.id} lacks the 'admin' scope (it has: {', '.join(sorted(entry.scopes))}); issue one with `lifecycle keys create --scopes admin`"
        elif admin_key is not None and bearer_matches(header, admin_key):
            request.state.audit_who = f"admin key ${ADMIN_KEY_ENV} ({keys_key_id(admin_key)})"
        elif request.client is not None and is_loopback(host):
            request.state.audit_who = f"loopback client {host}"
        else:
            token = header.partition(" ")[2].strip()
            request.state.audit_who = f"unknown key {keys_key_id(token)} from {host}" if token else f"no key, from {host}"
            refusal = f"the admin routes answer keys with the 'admin' scope, clients sending 'Authorization: Bearer ${ADMIN_KEY_ENV}', and loopback clients"
        request.state.audit_refusal = refusal
        if refusal is not None:
            raise APIError(403, refusal, code="forbidden", error_type="permission_error")

    app.state.require_admin = require_admin  # for routes added by the plane

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:  # [[[[...]]]] within the body limit: Python's parser gives up
            raise APIError(400, "the body is not valid JSON here: it nests deeper than any request does") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def caller(request: Request, scope: str) -> tuple[str | None, Tier | None]:
        """(key, tier) of a caller named in the keys file, if its key holds `scope` (else 403)
        and has not expired (else 401); (None, None) for one holding the gateway's own key, or
        for anyone when no key is required. Else 401."""
        header = request.headers.get("authorization", "")
        found = keyed(request)
        if found is not None:
            token, entry = found
            if entry.expired():
                raise APIError(401, f"key {entry.id} expired at {entry.expires.isoformat()}: ask for a new one", code="expired_api_key")
            if not entry.allows(scope):
                raise APIError(403, f"key {entry.id} lacks the '{scope}' scope (it has: {', '.join(sorted(entry.scopes))})", code="forbidden", error_type="permission_error")
            return token, entry.tier
        if api_key is None and front.keys is None:
            return None, None
        if api_key is not None and bearer_matches(header, api_key):
            return None, None
        if any(bearer_matches(header, k) for k in service_keys):
            return None, None
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def identity(request: Request, key: str | None, tier: Tier | None) -> tuple[str | None, str]:
        """(the key as the record knows it, the tier name) of a caller `caller()` let in: a key the
        gateway checked (a keyed one, its own, the plane's), else None; its tier, 'service' for
        the plane's own key, else 'untiered'."""
        header = request.headers.get("authorization", "")
        checked = key is not None or api_key is not None or front.keys is not None
        token = header.partition(" ")[2].strip() if checked else None
        who = tier.name if tier is not None else SERVICE_TIER if any(bearer_matches(header, k) for k in service_keys) else UNTIERED.name
        return token or None, who

    async def proxied(request: Request, path: str) -> Response:
        arrived = time.perf_counter()  # a completion's recorded latency starts here
        key, tier = caller(request, "inference")
        CALLER_TIER.set((tier or UNTIERED).name)  # this request's series carry its tier (serving.routing)
        payload = await json_body(request)
        if payload.get("model") != gateway.public_model:
            raise APIError(404, f"The model '{payload.get('model')}' does not exist; this gateway serves '{gateway.public_model}'", code="model_not_found")
        asked = request.headers.get(PRIORITY_HEADER)
        priority = request_priority(tier or UNTIERED, asked)
        limit_headers = {}
        if tier is not None and front.limiter is not None:
            try:
                limit_headers = await front.limiter.acquire(key, tier.rpm, tier.tpm, estimate_tokens(payload, front.default_max_tokens))
            except LimiterUnavailable as exc:
                gateway.metrics.limits_unavailable.labels("open" if front.limits_fail_open else "closed").inc()
                if not front.limits_fail_open:
                    raise APIError(
                        503, f"{exc}; this gateway refuses keyed requests until the limits can be checked (serve.redis_failure_mode: closed); retry later",
                        code="rate_limiter_unavailable", error_type="server_error", headers={"Retry-After": "1"},
                    ) from None
                log.warning("gateway: serving %s without its rate limits (serve.redis_failure_mode: open): %s", tier.name, exc)
        cached = "no-cache" not in request.headers.get("cache-control", "").lower()
        tap = None
        if record is not None:
            token, who = identity(request, key, tier)  # recorded by the key's id
            # The raw body (Starlette keeps it): the record parses it off the request path, and
            # no parsed object outlives the request in the record's buffer.
            tap = record.tap(path, await request.body(), token, who, gateway.public_model, arrived)
        response = await request.app.state.proxy.forward(path, payload, front, priority, request.is_disconnected, cached, tap)
        response.headers.update(limit_headers)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxied(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxied(request, "/v1/completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        key, tier = caller(request, "feedback")
        if desk is None:
            why = "the gateway keeps no record of its answers (record.enabled: false)" if record is None else "feedback.enabled is false"
            raise APIError(404, f"this gateway takes no feedback: {why}", code="feedback_unavailable")
        token, who = identity(request, key, tier)
        asker = Caller(key_id(token) if token else None, who, bool(tier is not None and tier.feedback_any))
        stored, created = await desk.take(await request.body(), asker)
        return JSONResponse(feedback_answer(stored), status_code=201 if created else 200)

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
    async def metrics(request: Request) -> Response:
        # Prometheus beside the gateway scrapes it from loopback; from elsewhere a keyed gateway
        # wants a key with the read-metrics scope (the figures name tiers and versions).
        if front.keys is not None and not (request.client is not None and is_loopback(request.client.host)):
            found = keyed(request)
            if found is None or found[1].expired() or not found[1].allows("read-metrics"):
                raise APIError(403, "/metrics answers loopback clients and keys with the 'read-metrics' scope", code="forbidden", error_type="permission_error")
        if front.queue is not None:
            gateway.metrics.observe_queue(front.queue.stats())
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
        if on_change is not None:
            on_change()
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


def exposure_problem(host: str, api_key: str | None, admin_key: str | None, keys_file: str | None, flag: str = "--keys-file",
                     tls: bool = False, tls_flags: str = "--tls-certfile and --tls-keyfile, or --tls-offloaded behind a TLS proxy") -> str | None:
    """Why serving on `host` would let anyone in, with how to fix it; None when it is safe: a
    loopback bind, or clients that need a key ($GATEWAY_API_KEY/$SERVING_API_KEY, or any key of
    the keys file), admin routes that need one ($SERVING_ADMIN_KEY, or a keys-file key with the
    `admin` scope) and TLS (served here or terminated in front: `tls`), since the keys travel in
    the Authorization header. Off loopback every client address is someone else's, and loopback is
    the only thing that lets a keyless caller into /admin."""
    if is_loopback(host):
        return None
    from serving.keys import load_keys

    entries = [e for e in load_keys(keys_file).entries() if not e.expired()] if keys_file else []
    missing = []
    if not (api_key or entries):
        missing.append(f"client keys (${API_KEY_ENV} or ${auth.API_KEY_ENV}, or a keys file: {flag} with `lifecycle keys create`)")
    if not (admin_key or any(e.allows("admin") for e in entries)):
        missing.append(f"an admin key (${ADMIN_KEY_ENV}, or a keys-file key with the admin scope: `lifecycle keys create --scopes admin`)")
    if not tls:
        missing.append(f"TLS ({tls_flags}): the keys would cross the network in the clear")
    if not missing:
        return None
    return (
        f"refusing to listen on {host} without " + " and ".join(missing) + ": anyone who can reach it could use the models and "
        "move traffic. Set them, bind 127.0.0.1, or pass --insecure if that is really intended"
    )


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
    parser.add_argument("--keys-file", help="YAML keys file (`lifecycle keys`): per-key scopes, tiers and rate limits; its keys count as client and admin keys for a non-loopback --host")
    parser.add_argument("--tls-certfile", help="PEM certificate to serve HTTPS with (with --tls-keyfile); a non-loopback --host needs TLS")
    parser.add_argument("--tls-keyfile", help="the PEM private key of --tls-certfile")
    parser.add_argument("--tls-offloaded", action="store_true", help="TLS is terminated in front of this gateway (an ingress, a load balancer, a TLS proxy)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback host without client keys, an admin key or TLS")
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
    from serving.tls import files_problem

    tls_problem = files_problem(args.tls_certfile, args.tls_keyfile, ("--tls-certfile", "--tls-keyfile"))
    if tls_problem:
        parser.error(tls_problem)
    if not args.insecure:
        try:
            problem = exposure_problem(args.host, args.api_key, args.admin_key, args.keys_file, tls=bool(args.tls_certfile) or args.tls_offloaded)
        except (OSError, ValueError) as exc:  # KeysFileError is a ValueError naming the file
            parser.error(f"--keys-file: {exc}")
        if problem:
            parser.error(problem)
    return args


def app_from_args(args: argparse.Namespace) -> FastAPI:
    stable = Backend(args.stable_name, args.stable_url, args.stable_model, args.backend_api_key)
    canary = Backend(args.canary_name, args.canary_url, args.canary_model, args.backend_api_key) if args.canary_url else None
    return create_gateway(
        stable, canary, args.canary_weight, args.retry_timeout, args.seed,
        public_model=args.public_model, timeout_s=args.timeout, api_key=args.api_key, admin_key=args.admin_key,
        max_body_bytes=args.max_body_bytes, audit=AuditLog(),
        front=FrontDoor(keys=KeyRing(args.keys_file), limiter=MemoryRateLimiter()) if args.keys_file else None,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from serving.tls import server_kwargs

    args = parse_args(argv)
    uvicorn.run(app_from_args(args), host=args.host, port=args.port, log_level=args.log_level, **server_kwargs(args.tls_certfile, args.tls_keyfile))


if __name__ == "__main__":
    main()
