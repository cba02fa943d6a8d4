"""An OpenAI-compatible HTTP server around `CpuEngine` (the `cpu` serving engine).

It speaks the subset of the OpenAI API that the canary, the evaluation and any OpenAI client
need, with the same shapes as vLLM and trtllm-serve, so callers never know which engine answers:

- GET  /health                liveness, unauthenticated (as in vLLM), used by the launcher
- GET  /metrics               Prometheus text format, unauthenticated (as in vLLM)
- GET  /v1/models             the one served model
- POST /v1/chat/completions   plain or streamed (`stream: true`, server-sent events)
- POST /v1/completions        plain or streamed; a list of prompts is queued as one unit

Requests go through the engine's bounded queue and are batched with whatever else is waiting.

Input checks, cheapest first: a body over `max_body_bytes` gets 413 before it is read whole; a
prompt with more characters than its token limit can hold gets 400 before it is tokenised; a
prompt over `max_prompt_tokens`, or one that leaves no room for max_tokens within the model's
context length (`max_position_embeddings`), gets 400 naming the limit. `stop` (up to 4 strings)
and `seed` are supported; `n` > 1, `logprobs`, `top_logprobs`, `tools`, `tool_choice` and a
`response_format` other than text get 400 naming the field (as vLLM answers what it cannot do),
never a silently different answer.

Errors use OpenAI's `{"error": {"message", "type", "code"}}` body, so the `openai` client raises
its usual typed exceptions: 400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError (queue full, with Retry-After), 500/503/504 InternalServerError.

For canary drills and tests, faults can be injected (off by default): a deterministic share of
generation requests answers 500, and/or every generation answer is delayed.

As with vLLM's server, `create_app` builds the app and its lifespan loads the model, so a test
can run the real app in-process; `python -m serving.server` runs it under uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.engine import CpuEngine, EngineClosedError, FinishReason, Generation, QueueFullError, Submission
from serving.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from serving.netaddr import is_loopback
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest, Shape, sse
from serving.protocol import error_body as _error_body

API_KEY_ENV = "SERVING_API_KEY"  # read when --api-key is absent: a key in argv is visible in `ps`
MAX_PROMPTS_PER_REQUEST = 32  # a /v1/completions prompt list is queued as one unit; bound its size
MAX_STOP_STRINGS = 4  # as OpenAI
# A full queue drains in about one batch's generation time, well under a second for the embedded
# model; a client that honours Retry-After (the openai client does) comes back after that.
RETRY_AFTER_S = 1
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


# --- pure helpers ------------------------------------------------------------------------------


def fault_fires(n: int, rate: float) -> bool:
    """Whether the n-th (1-based) generation request gets an injected error.

    Deterministic and evenly spread: exactly floor(n * rate) of the first n requests fail (rate
    0.5 fails every 2nd, 0.25 every 4th), so a drill or a test knows what to expect.
    """
    eps = 1e-9  # 0.29 * 100 is 28.999999999999996 in floating point
    return math.floor(n * rate + eps) > math.floor((n - 1) * rate + eps)


def endpoint_label(path: str) -> str:
    """The metrics label for a request path; unknown paths share one label to bound cardinality."""
    return path if path in ENDPOINTS else "other"


# --- metrics -----------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of their own: several apps can then live in
    one process (the tests) without their counters colliding in the global registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("serving_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.errors = Counter("serving_errors", "Error answers (also those sent inside a stream), by endpoint and OpenAI error code.", ["endpoint", "code"], registry=r)
        self.latency = Histogram("serving_request_latency_seconds", "From receiving a request to the last byte of its answer.", ["endpoint"], buckets=latency_buckets, registry=r)
        self.ttft = Histogram("serving_time_to_first_token_seconds", "From receiving a generation request to its first generated token (server-side).", buckets=latency_buckets, registry=r)
        self.tokens = Counter("serving_tokens", "Tokens of answered generation requests, by kind: prompt or completion.", ["kind"], registry=r)
        self.queue_depth = Gauge("serving_queue_depth", "Requests waiting for the engine, not yet generating.", registry=r)
        self.running = Gauge("serving_requests_running", "Requests in the batch being generated.", registry=r)
        self.batch_size = Histogram("serving_batch_size", "Requests generated together in one batch.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def answered(self, generations: list[Generation], arrived: float) -> None:
        self.tokens.labels("prompt").inc(sum(g.prompt_tokens for g in generations))
        self.tokens.labels("completion").inc(sum(g.completion_tokens for g in generations))
        for g in generations:
            if g.first_token_at is not None:
                self.ttft.observe(max(0.0, g.first_token_at - arrived))


class MetricsMiddleware:
    """Counts every HTTP answer and times it to its last byte (so a stream is timed whole)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = endpoint_label(scope["path"])
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# --- the app -----------------------------------------------------------------------------------


def create_app(
    model_dir: str,
    model_name: str,
    api_key: str | None = None,
    max_new_tokens_limit: int = 64,
    max_prompt_tokens: int = 512,
    *,
    max_batch_size: int = 16,
    batch_window_ms: float = 5.0,
    max_queue: int = 64,
    request_timeout_s: float = 60.0,
    fault_error_rate: float = 0.0,
    fault_delay_s: float = 0.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
) -> FastAPI:
    """The server for one checkpoint. See `parse_args` for what each setting means; the
    fault_* settings are for canary drills and tests and are off by default.
    `max_prompt_chars` None: the most characters `max_prompt_tokens` tokens of this tokenizer
    can spell (its longest vocabulary entry times the limit), so no valid prompt is refused."""
    if not 0 <= fault_error_rate <= 1:
        raise ValueError(f"fault_error_rate must be between 0 and 1, got {fault_error_rate}")
    if fault_delay_s < 0 or request_timeout_s <= 0:
        raise ValueError("fault_delay_s must be >= 0 and request_timeout_s > 0")
    created = int(time.time())
    metrics = Metrics()
    generation_requests = itertools.count(1)  # numbers valid generation requests, for fault_fires

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading happens before uvicorn accepts connections, so /health answering means ready.
        engine = CpuEngine(
            model_dir,
            max_new_tokens_limit=max_new_tokens_limit,
            max_batch_size=max_batch_size,
            batch_window_ms=batch_window_ms,
            max_queue=max_queue,
            on_batch=metrics.batch_size.observe,
        )
        metrics.queue_depth.set_function(lambda: engine.queue_depth)
        metrics.running.set_function(lambda: engine.active)
        app.state.engine = engine
        try:
            yield
        finally:
            app.state.engine = None
            await run_in_threadpool(engine.close)  # joins the worker: off the event loop

    app = FastAPI(title=f"serving: {model_name}", lifespan=lifespan)
    app.state.metrics = metrics

    def body_refused(scope: Scope) -> None:
        metrics.errors.labels(endpoint_label(scope["path"]), "request_too_large").inc()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_refused=body_refused)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it counts the 413s too

    def error_response(request: Request, exc: APIError) -> JSONResponse:
        metrics.errors.labels(endpoint_label(request.url.path), exc.code or str(exc.status)).inc()
        return JSONResponse(status_code=exc.status, content=_error_body(exc.message, exc.code, exc.error_type), headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(request, APIError(400, problems, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still OpenAI-shaped, so a client's error handling sees a 500 like any other.
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error", "server_error"))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def engine(request: Request) -> CpuEngine:
        eng = request.app.state.engine
        if eng is None:
            raise APIError(503, "the server is shutting down", code="shutting_down", error_type="server_error")
        return eng

    def unsupported(field: str, why: str) -> APIError:
        return APIError(400, f"'{field}' is not supported by this server: {why}", code="unsupported_parameter")

    def check_request(body: GenerationRequest, max_tokens: int | None) -> int | None:
        """Validate what every generation request shares; return the max_tokens asked for
        (None: as many as the limits leave room for, decided once the prompt is tokenised)."""
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"'n' is not supported above 1 by this server: only n=1, got n={body.n}", code="unsupported_parameter")
        if body.logprobs not in (None, False):
            raise unsupported("logprobs", f"no log probabilities are returned (got logprobs={body.logprobs!r})")
        if body.top_logprobs is not None:
            raise unsupported("top_logprobs", "no log probabilities are returned")
        if body.tools:
            raise unsupported("tools", "no function calling; send the tools in the prompt if the model was trained on them")
        if body.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "no function calling")
        format_type = body.response_format.get("type") if isinstance(body.response_format, dict) else body.response_format
        if format_type not in (None, "text"):
            raise unsupported("response_format", f"answers are plain text only (got type {format_type!r})")
        stops = body.stop_strings()
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(stops)!r}", code="invalid_stop")
        if max_tokens is not None and not 1 <= max_tokens <= max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {max_new_tokens_limit}, got {max_tokens}", code="invalid_max_tokens")
        return max_tokens

    def prompt_token_limit(eng: CpuEngine) -> int:
        context = eng.context_length
        return max_prompt_tokens if context is None else min(max_prompt_tokens, context - 1)

    def check_chars(eng: CpuEngine, chars: int) -> None:
        """Before tokenising: a prompt with more characters than its token limit can spell is
        refused without paying for the tokenizer (which is linear in a prompt of any size)."""
        limit = max_prompt_chars if max_prompt_chars is not None else prompt_token_limit(eng) * eng.max_token_chars
        if chars > limit:
            raise APIError(
                400, f"the prompt is {chars} characters; this server accepts at most {limit} "
                f"(prompts of at most {prompt_token_limit(eng)} tokens)", code="context_length_exceeded",
            )

    def check_prompt(ids: list[int]) -> list[int]:
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt_tokens}", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", code="empty_prompt")
        return ids

    def fit(eng: CpuEngine, prompts: list[list[int]], max_tokens: int | None) -> int:
        """The max_tokens to generate: prompt and answer must fit in the model's context length."""
        context = eng.context_length
        if context is None:
            return max_new_tokens_limit if max_tokens is None else max_tokens
        longest = max(len(ids) for ids in prompts)
        room = context - longest
        if room < 1:
            raise APIError(
                400, f"the prompt is {longest} tokens; the model's context length (max_position_embeddings) is {context} tokens, "
                "which leaves no room for an answer", code="context_length_exceeded",
            )
        if max_tokens is None:  # as vLLM does: the default shrinks to what fits
            return min(max_new_tokens_limit, room)
        if max_tokens > room:
            raise APIError(
                400, f"the prompt ({longest} tokens) and max_tokens ({max_tokens}) need {longest + max_tokens} tokens; "
                f"the model's context length (max_position_embeddings) is {context}", code="context_length_exceeded",
            )
        return max_tokens

    def timed_out() -> APIError:
        return APIError(504, f"the request took longer than {request_timeout_s:g} s and was abandoned", "request_timeout", "server_error")

    async def enqueue(
        eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, deadline: float,
        on_delta: list[Callable[[str, FinishReason | None], None]] | None = None,
    ) -> list[Submission]:
        """Injected faults first (a drill's delay counts against the timeout, like a slow model
        would), then the engine's queue: a full queue is a 429 the client may retry."""
        try:
            async with asyncio.timeout_at(deadline):
                if fault_delay_s:
                    await asyncio.sleep(fault_delay_s)
        except TimeoutError:
            raise timed_out() from None
        if fault_error_rate and fault_fires(next(generation_requests), fault_error_rate):
            raise APIError(500, "injected fault (--fault-error-rate)", "injected_fault", "server_error")
        try:
            return eng.submit_many(prompts, max_tokens, body.temperature, body.top_p, on_delta, body.stop_strings(), body.seed)
        except QueueFullError as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", "queue_full", "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosedError:
            raise APIError(503, "the server is shutting down", "shutting_down", "server_error") from None

    def failure(future: Future) -> APIError | None:
        """A finished engine future's error as the API answers it; None if it succeeded."""
        if future.cancelled():
            return APIError(500, "the request was cancelled", "cancelled", "server_error")
        exc = future.exception()
        if exc is None:
            return None
        if isinstance(exc, EngineClosedError):
            return APIError(503, "the server is shutting down", "shutting_down", "server_error")
        return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "internal_error", "server_error")

    async def answer(eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, shape: Shape) -> dict[str, Any]:
        arrived, deadline = time.monotonic(), asyncio.get_running_loop().time() + request_timeout_s
        submissions = await enqueue(eng, prompts, max_tokens, body, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                gens = await asyncio.gather(*(asyncio.wrap_future(s.future) for s in submissions))
        except TimeoutError:
            raise timed_out() from None
        except EngineClosedError:
            raise APIError(503, "the server is shutting down", "shutting_down", "server_error") from None
        finally:
            for s in submissions:  # a timed-out request leaves the queue, or stops generating
                s.cancel()
        metrics.answered(gens, arrived)
        return shape.response(gens)

    async def stream(
        request: Request, eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, shape: Shape
    ) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, each token's text as it is generated.

        The engine's worker thread posts (delta, finish) per token and the finished future per
        prompt onto one asyncio queue, in order. The response starts only once the first event
        is here, so a queue-full, timeout or injected fault is still an HTTP status rather than
        an error inside a 200 stream. A stream whose row stops on a stop token ends with an
        empty-content chunk carrying finish_reason (as OpenAI does): the stop is only known one
        step after the last text, and holding every token back a step would delay the stream.
        """
        arrived, loop = time.monotonic(), asyncio.get_running_loop()
        deadline = loop.time() + request_timeout_s
        events: asyncio.Queue[tuple] = asyncio.Queue()

        def post(event: tuple) -> None:  # called on the engine's worker thread
            with suppress(RuntimeError):  # the loop is closed: the server stopped, nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        on_delta = [lambda text, finish, i=i: post(("delta", i, text, finish)) for i in range(len(prompts))]
        submissions = await enqueue(eng, prompts, max_tokens, body, deadline, on_delta)
        for i, s in enumerate(submissions):
            s.future.add_done_callback(lambda fut, i=i: post(("done", i, fut, None)))

        def cancel_all() -> None:
            for s in submissions:
                s.cancel()

        try:
            async with asyncio.timeout_at(deadline):
                first = await events.get()
        except TimeoutError:
            cancel_all()
            raise timed_out() from None
        except BaseException:
            cancel_all()
            raise
        if first[0] == "done" and failure(first[2]) is not None:
            cancel_all()
            raise failure(first[2])  # type: ignore[misc]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        endpoint = endpoint_label(request.url.path)

        def chunk(payload: dict[str, Any]) -> str:
            return sse({**payload, "usage": None} if include_usage and "usage" not in payload else payload)

        def stream_error(exc: APIError) -> str:
            metrics.errors.labels(endpoint, exc.code or str(exc.status)).inc()
            return sse(_error_body(exc.message, exc.code, exc.error_type))

        async def events_as_sse() -> AsyncIterator[str]:
            try:
                if shape.chat:  # OpenAI opens a chat stream with the role
                    for i in range(len(prompts)):
                        yield chunk(shape.chunk(i, "", None, role=True))
                gens: list[Generation | None] = [None] * len(prompts)
                event = first
                while True:
                    kind, i, payload, finish = event
                    if kind == "delta":
                        yield chunk(shape.chunk(i, payload, finish))
                    elif (exc := failure(payload)) is not None:
                        yield stream_error(exc)
                        return
                    else:
                        gens[i] = payload.result()
                        if all(g is not None for g in gens):
                            break
                    try:
                        async with asyncio.timeout_at(deadline):
                            event = await events.get()
                    except TimeoutError:
                        yield stream_error(timed_out())
                        return
                answered = [g for g in gens if g is not None]
                metrics.answered(answered, arrived)
                if include_usage:
                    yield sse(shape.usage_chunk(answered))
                yield sse("[DONE]")
            finally:  # also when the client goes away mid-stream: stop generating for it
                cancel_all()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
        return StreamingResponse(events_as_sse(), media_type="text/event-stream", headers=headers)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "serving"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        asked = check_request(body, body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens)
        eng = engine(request)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_chars(eng, sum(len(m["content"]) for m in messages))
        # Tokenising blocks; in the threadpool it leaves the event loop free for other requests.
        ids = check_prompt(await run_in_threadpool(eng.encode_chat, messages))
        max_tokens = fit(eng, [ids], asked)
        shape = Shape(chat=True, model_name=model_name)
        if body.stream:
            return await stream(request, eng, [ids], max_tokens, body, shape)
        return await answer(eng, [ids], max_tokens, body, shape)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        asked = check_request(body, body.max_tokens)
        eng = engine(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS_PER_REQUEST:
            raise APIError(400, f"send between 1 and {MAX_PROMPTS_PER_REQUEST} prompts, got {len(prompts)}", code="invalid_prompt")
        for p in prompts:
            check_chars(eng, len(p))
        ids = [check_prompt(i) for i in await run_in_threadpool(lambda: [eng.encode_prompt(p) for p in prompts])]
        max_tokens = fit(eng, ids, asked)
        shape = Shape(chat=False, model_name=model_name)
        if body.stream:
            return await stream(request, eng, ids, max_tokens, body, shape)
        return await answer(eng, ids, max_tokens, body, shape)

    return app


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description="OpenAI-compatible CPU server for one checkpoint.")
    parser.add_argument("--model-dir", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--model-name", required=True, help="name clients send as `model`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key or --insecure")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this Bearer key (default: ${API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback host without an API key")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt accepted, in tokens (and never more than the model's context length leaves)")
    parser.add_argument("--max-prompt-chars", type=int, help="longest prompt accepted, in characters, checked before tokenising (default: what --max-prompt-tokens tokens can spell)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body accepted; larger ones get 413")
    batching = parser.add_argument_group("batching and limits")
    batching.add_argument("--max-batch-size", type=int, default=16, help="most requests generated together in one batch")
    batching.add_argument("--batch-window-ms", type=float, default=5.0, help="how long the oldest waiting request waits for others to join its batch")
    batching.add_argument("--max-queue", type=int, default=64, help="most requests waiting for the engine; beyond it, 429 with Retry-After")
    batching.add_argument("--request-timeout-s", type=float, default=60.0, help="a request not answered by then gets 504 and is abandoned (a stream not started: 504; one cut short: an error event)")
    faults = parser.add_argument_group("fault injection (for canary drills and tests only; off by default)")
    faults.add_argument("--fault-error-rate", type=float, default=0.0, help="share of generation requests answered with HTTP 500 (deterministic: exactly floor(n*P) of the first n)")
    faults.add_argument("--fault-delay-s", type=float, default=0.0, help="seconds added before every generation answer (and before a stream's first token)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        parser.error(
            f"refusing to listen on {args.host} without an API key: anyone who can reach it could use the model. "
            f"Pass --api-key (or set ${API_KEY_ENV}), bind 127.0.0.1, or pass --insecure if that is really intended."
        )
    if args.max_batch_size < 1 or args.max_queue < 1 or args.batch_window_ms < 0 or args.request_timeout_s <= 0:
        parser.error("--max-batch-size and --max-queue must be >= 1, --batch-window-ms >= 0 and --request-timeout-s > 0")
    if args.max_body_bytes < 1 or (args.max_prompt_chars is not None and args.max_prompt_chars < 1):
        parser.error("--max-body-bytes and --max-prompt-chars must be >= 1")
    if not 0 <= args.fault_error_rate <= 1 or args.fault_delay_s < 0:
        parser.error("--fault-error-rate must be between 0 and 1 and --fault-delay-s >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app = create_app(
        args.model_dir,
        args.model_name,
        args.api_key,
        args.max_new_tokens,
        args.max_prompt_tokens,
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        fault_error_rate=args.fault_error_rate,
        fault_delay_s=args.fault_delay_s,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
