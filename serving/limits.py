"""Request-size limits and the response-status note shared by the server and the gateway (free of torch imports, so the
gateway stays a light process)."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# An OpenAI request is a few KiB of JSON; a MiB holds a prompt far beyond any context length
# this project serves, and bounds what one request can make the process buffer.
DEFAULT_MAX_BODY_BYTES = 1 << 20


class StatusNote:
    """An ASGI `send` that passes every message on and notes the response's status: 500 until
    the app starts answering (what the client gets if the app raises first)."""

    def __init__(self, send: Send) -> None:
        self.send, self.status = send, 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class BodyLimit:
    """Refuses a request whose body is over `max_bytes` with 413, in OpenAI's error shape.

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    body without one (chunked) is read up to the limit and refused once it passes it. Bodies
    within the limit are buffered (every route here reads the whole body anyway) and handed to
    the app unchanged. `on_refused(scope)` is called for each refusal (for a metrics counter)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refused: Callable[[Scope], None] | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, f"the request body is {int(declared)} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, f"the request body is over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, for streaming responses

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, what: str) -> None:
        if self.on_refused is not None:
            self.on_refused(scope)
        message = f"{what}; this server accepts at most {self.max_bytes} bytes (--max-body-bytes)"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": "request_too_large"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
