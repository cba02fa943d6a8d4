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
can run the real app in-process; `python -m serving.server` runs it under uvicorn. The pieces it
wires: serving/admission.py (what a request may ask), serving/dispatch.py (queue, deadline,
faults, streaming), serving/server_metrics.py (/metrics), serving/engine.py (the batching engine).
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from serving.admission import Admission
from serving.dispatch import Dispatcher, shutting_down
from serving.engine import CpuEngine
from serving.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from serving.netaddr import is_loopback
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, Shape
from serving.protocol import error_body as _error_body
from serving.server_metrics import Metrics, MetricsMiddleware, endpoint_label
from serving.tls import files_problem, server_kwargs

API_KEY_ENV = "SERVING_API_KEY"  # read when --api-key is absent: a key in argv is visible in `ps`
MAX_PROMPTS_PER_REQUEST = 32  # a /v1/completions prompt list is queued as one unit; bound its size


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
    """The server for one checkpoint: the engine (owned by the lifespan), what a request may
    ask (`Admission`), how it is answered (`Dispatcher`), and the routes between them. See
    `parse_args` for what each setting means; the fault_* settings are for canary drills and
    tests and are off by default."""
    created = int(time.time())
    metrics = Metrics()
    admit = Admission(model_name, max_new_tokens_limit, max_prompt_tokens, max_prompt_chars)
    dispatch = Dispatcher(metrics, request_timeout_s, fault_error_rate, fault_delay_s)

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
    add_error_handlers(app, metrics)

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
            raise shutting_down()
        return eng

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
        asked = admit.request(body, body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens)
        eng = engine(request)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        admit.chars(eng, sum(len(m["content"]) for m in messages))
        # Tokenising blocks; in the threadpool it leaves the event loop free for other requests.
        ids = admit.prompt(await run_in_threadpool(eng.encode_chat, messages))
        max_tokens = admit.fit(eng, [ids], asked)
        shape = Shape(chat=True, model_name=model_name)
        if body.stream:
            return await dispatch.stream(request, eng, [ids], max_tokens, body, shape)
        return await dispatch.answer(eng, [ids], max_tokens, body, shape)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        asked = admit.request(body, body.max_tokens)
        eng = engine(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS_PER_REQUEST:
            raise APIError(400, f"send between 1 and {MAX_PROMPTS_PER_REQUEST} prompts, got {len(prompts)}", code="invalid_prompt")
        for p in prompts:
            admit.chars(eng, len(p))
        ids = [admit.prompt(i) for i in await run_in_threadpool(lambda: [eng.encode_prompt(p) for p in prompts])]
        max_tokens = admit.fit(eng, ids, asked)
        shape = Shape(chat=False, model_name=model_name)
        if body.stream:
            return await dispatch.stream(request, eng, ids, max_tokens, body, shape)
        return await dispatch.answer(eng, ids, max_tokens, body, shape)

    return app


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error in OpenAI's shape, counted by endpoint and code: the `openai` client then
    raises its usual typed exceptions."""

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


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description="OpenAI-compatible CPU server for one checkpoint.")
    parser.add_argument("--model-dir", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--model-name", required=True, help="name clients send as `model`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key or --insecure")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this Bearer key (default: ${API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback host without an API key or TLS")
    parser.add_argument("--tls-certfile", help="serve HTTPS with this PEM certificate (with --tls-keyfile); anything but loopback needs TLS, served or offloaded")
    parser.add_argument("--tls-keyfile", help="the PEM private key of --tls-certfile")
    parser.add_argument("--tls-offloaded", action="store_true", help="TLS is terminated in front of this server (an ingress or proxy): a non-loopback bind is allowed without --tls-certfile")
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
    if problem := files_problem(args.tls_certfile, args.tls_keyfile, ("--tls-certfile", "--tls-keyfile")):
        parser.error(problem)
    if not is_loopback(args.host) and not (args.tls_certfile or args.tls_offloaded or args.insecure):
        parser.error(
            f"refusing to listen on {args.host} without TLS: the API key and every prompt would cross the network in the clear. "
            "Pass --tls-certfile and --tls-keyfile, --tls-offloaded if a proxy terminates TLS in front, bind 127.0.0.1, or pass --insecure if that is really intended."
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
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **server_kwargs(args.tls_certfile, args.tls_keyfile))


if __name__ == "__main__":
    main()
