"""An OpenAI-compatible HTTP server around `CpuEngine` (the `cpu` serving engine).

It speaks the subset of the OpenAI API that the canary, the evaluation and any OpenAI client
need, with the same shapes as vLLM and trtllm-serve, so callers never know which engine answers:

- GET  /health                liveness, unauthenticated (as in vLLM), used by the launcher
- GET  /v1/models             the one served model
- POST /v1/chat/completions   non-streaming
- POST /v1/completions        non-streaming; a list of prompts is generated as one batch

Errors use OpenAI's `{"error": {"message", "type", "code"}}` body, so the `openai` client raises
its usual typed exceptions (BadRequestError, AuthenticationError, NotFoundError).

As with vLLM's server, `create_app` builds the app and its lifespan loads the model, so a test
can run the real app in-process; `python -m serving.server` runs it under uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import CpuEngine, Generation

API_KEY_ENV = "SERVING_API_KEY"  # read when --api-key is absent: a key in argv is visible in `ps`
MAX_PROMPTS_PER_REQUEST = 32  # a /v1/completions prompt list is one batch; bound its memory


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.error_type = status, message, code, error_type


def _error_response(status: int, message: str, code: str | None = None, error_type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": error_type, "code": code}})


# --- request bodies: extra fields allowed, since OpenAI clients send many we do not use ---------


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; send 0 for greedy decoding
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens for chat


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


# --- the app -----------------------------------------------------------------------------------


def create_app(
    model_dir: str,
    model_name: str,
    api_key: str | None = None,
    max_new_tokens_limit: int = 64,
    max_prompt_tokens: int = 512,
) -> FastAPI:
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading happens before uvicorn accepts connections, so /health answering means ready.
        app.state.engine = CpuEngine(model_dir, max_new_tokens_limit=max_new_tokens_limit)
        yield
        app.state.engine = None

    app = FastAPI(title=f"serving: {model_name}", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.code, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error_response(400, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def engine(request: Request) -> CpuEngine:
        return request.app.state.engine

    def check_request(body: GenerationRequest, max_tokens: int | None) -> int:
        """Validate what every generation request shares; return the max_tokens to use."""
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'", code="model_not_found")
        if body.stream:
            raise APIError(400, "stream=true is not supported by the cpu engine", code="unsupported_parameter")
        if body.n != 1:
            raise APIError(400, f"only n=1 is supported, got n={body.n}", code="unsupported_parameter")
        tokens = max_new_tokens_limit if max_tokens is None else max_tokens
        if not 1 <= tokens <= max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {max_new_tokens_limit}, got {tokens}", code="invalid_max_tokens")
        return tokens

    def check_prompt(ids: list[int]) -> list[int]:
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt_tokens}", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", code="empty_prompt")
        return ids

    def usage(generations: list[Generation]) -> dict[str, int]:
        prompt = sum(g.prompt_tokens for g in generations)
        completion = sum(g.completion_tokens for g in generations)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "serving"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        max_tokens = check_request(body, body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens)
        eng = engine(request)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        # Tokenising and generating block; in the threadpool they leave the event loop free for
        # /health and other requests (which then wait on the engine's lock, not on the loop).
        ids = check_prompt(await run_in_threadpool(eng.encode_chat, messages))
        gen = await run_in_threadpool(eng.generate, ids, max_tokens, body.temperature, body.top_p)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage([gen]),
        }

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        max_tokens = check_request(body, body.max_tokens)
        eng = engine(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS_PER_REQUEST:
            raise APIError(400, f"send between 1 and {MAX_PROMPTS_PER_REQUEST} prompts, got {len(prompts)}", code="invalid_prompt")
        ids = [check_prompt(i) for i in await run_in_threadpool(lambda: [eng.encode_prompt(p) for p in prompts])]
        gens = await run_in_threadpool(eng.generate_batch, ids, max_tokens, body.temperature, body.top_p)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None} for i, g in enumerate(gens)
            ],
            "usage": usage(gens),
        }

    return app


# --- command line ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description="OpenAI-compatible CPU server for one checkpoint.")
    parser.add_argument("--model-dir", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--model-name", required=True, help="name clients send as `model`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this Bearer key (default: ${API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback host without an API key")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt accepted, in tokens")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        parser.error(
            f"refusing to listen on {args.host} without an API key: anyone who can reach it could use the model. "
            f"Pass --api-key (or set ${API_KEY_ENV}), bind 127.0.0.1, or pass --insecure if that is really intended."
        )
    return args


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app = create_app(args.model_dir, args.model_name, args.api_key, args.max_new_tokens, args.max_prompt_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
