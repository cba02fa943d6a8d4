"""The OpenAI protocol as this project speaks it, on both sides of the gateway: the error type and
body every server and the gateway answer with, the request bodies the engine server accepts, and
the shapes of its answers and stream chunks (the same as vLLM's and trtllm-serve's).

Free of torch imports: the gateway imports the error type from here and stays a light process.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from serving.engine import FinishReason, Generation


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.error_type, self.headers, self.param = status, message, code, error_type, headers, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.code, self.error_type, self.param)


def error_body(message: str, code: str | None = None, error_type: str = "server_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; `param` (the request field at fault) only when one is."""
    error = {"message": message, "type": error_type, "code": code}
    if param is not None:
        error["param"] = param
    return {"error": error}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event as OpenAI streams them."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- request bodies: extra fields allowed, since OpenAI clients send many we do not use ---------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; send 0 for greedy decoding
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Declared so that a request asking for them is refused by name rather than ignored.
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


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


# --- response shapes ---------------------------------------------------------------------------


class Shape:
    """How one endpoint's answers and stream chunks look (chat and completions differ)."""

    def __init__(self, chat: bool, model_name: str) -> None:
        self.chat, self.model_name = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def response(self, generations: list[Generation]) -> dict[str, Any]:
        if self.chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason, "logprobs": None}
                for i, g in enumerate(generations)
            ]
        else:
            choices = [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None} for i, g in enumerate(generations)]
        return {**self._envelope(chunk=False), "choices": choices, "usage": usage(generations)}

    def chunk(self, index: int, text: str, finish: FinishReason | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._envelope(chunk=True), "choices": [choice]}

    def usage_chunk(self, generations: list[Generation]) -> dict[str, Any]:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage(generations)}
