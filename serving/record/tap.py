"""One completion as the gateway answers it: its id, and what the recorder needs of it, taken on
the request path without waiting for anything.

The gateway gives every completion its own id (`chatcmpl-…` or `cmpl-…`): written into the
answer's `id` (every chunk's, for a stream) and sent as the `x-completion-id` header. An
engine's own id is not unique across engines, and a cached answer is a new completion for the
client who gets it. Parsing, redaction and storage happen later, on the recorder's thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi.responses import Response

    from serving.record.recorder import Recorder

ID_HEADER = "x-completion-id"
VERSION_HEADER, REPLICA_HEADER = "x-gateway-version", "x-gateway-backend"  # serving.proxy's, on every answer
VERSION_RAW, REPLICA_RAW = VERSION_HEADER.encode(), REPLICA_HEADER.encode()
STAMPED = b'{"id": "'  # how a JSON answer the gateway re-encoded (json.dumps) begins: its id first


class RandomIds:
    """128-bit random hex ids (as uuid4().hex, from os.urandom), drawn 256 at a time: one
    system call per 256 completions instead of one each (it was most of a tap's cost)."""

    BATCH = 256

    def __init__(self) -> None:
        self._ready: list[str] = []
        self._lock = threading.Lock()

    def __call__(self) -> str:
        while True:
            try:
                return self._ready.pop()  # atomic: two threads never get the same id
            except IndexError:
                with self._lock:
                    if not self._ready:
                        raw = os.urandom(16 * self.BATCH).hex()
                        self._ready = [raw[i : i + 32] for i in range(0, len(raw), 32)]


random_id = RandomIds()


class Tap:
    """Created when a completion request reaches the proxy; finished when its answer is known
    (`answered` for a JSON answer, `streamed` when a stream ends). `recorder` None: the caller
    opted out, so the client still gets an id but nothing is kept. `payload`: the request's JSON,
    parsed or (the gateway's) as the raw bytes it came in, which the record keeps: no parsed
    object outlives the request (serving.record.rows.Wire)."""

    __slots__ = ("recorder", "id", "ts", "started", "chat", "payload", "key_id", "tier", "model", "hide_usage", "texts", "finish", "usage", "done")

    def __init__(self, recorder: Recorder | None, path: str, payload: dict | bytes, key_id: str | None, tier: str, model: str) -> None:
        self.recorder = recorder
        self.chat = path.endswith("/chat/completions")
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{random_id()}"
        self.ts, self.started = time.time(), time.perf_counter()
        self.payload, self.key_id, self.tier, self.model = payload, key_id, tier, model
        self.hide_usage = False  # the stream's usage was asked of the engine for the record, not by the client
        self.texts: dict[int, list[str]] = {}
        self.finish: str | None = None
        self.usage: dict | None = None
        self.done = False

    @property
    def headers(self) -> dict[str, str]:
        return {ID_HEADER: self.id}

    # --- what goes to the engine, and what comes back to the client ---

    def upstream(self, payload: dict) -> dict:
        """The body sent to the engine: a stream also asks for its `usage` (the token counts the
        record keeps), which the client is then spared unless it asked too."""
        if not payload.get("stream") or self.recorder is None:
            return payload
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            return payload
        self.hide_usage = True
        return {**payload, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}

    def stamp(self, answer: Any) -> Any:
        """An answer or chunk (parsed JSON) carrying this completion's id."""
        if isinstance(answer, dict) and "choices" in answer:
            answer["id"] = self.id
        return answer

    def stamp_body(self, body: bytes) -> bytes:
        """A JSON answer (a cached one) re-issued under this completion's id. The gateway cached
        what it sent, re-encoded with the id first: that id is replaced in the bytes (a cache
        hit is the gateway alone, and parsing and re-encoding the answer cost ~5 % of it); any
        other body is parsed and stamped."""
        start = len(STAMPED)
        if body.startswith(STAMPED) and b'"choices"' in body:
            end = body.find(b'"', start)
            if end > 0 and b"\\" not in body[start:end]:
                return STAMPED + self.id.encode() + body[end:]
        with suppress(ValueError):
            return json.dumps(self.stamp(json.loads(body))).encode()
        return body

    def chunk(self, data: Any) -> bool:
        """Take what a stream chunk says (text, finish reason, usage) and stamp it; False for a
        chunk the client must not get (the usage it did not ask for)."""
        if not isinstance(data, dict):
            return True
        choices = data.get("choices")
        for choice in choices or ():
            if not isinstance(choice, dict):
                continue
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if piece:
                self.texts.setdefault(choice.get("index", 0), []).append(piece)
            if choice.get("finish_reason") and choice.get("index", 0) == 0:
                self.finish = choice["finish_reason"]
        if data.get("usage"):
            self.usage = data["usage"]
        self.stamp(data)
        if self.hide_usage and "usage" in data:
            del data["usage"]
            return bool(choices)  # the usage-only chunk (no choices) is the record's alone
        return True

    # --- the answer is known ---

    def answered(self, response: Response, cache_hit: bool = False) -> None:
        """A JSON answer (or an error) went to the client: its body is parsed later."""
        if self.done:
            return
        self.done = True
        if self.recorder is None:
            return
        raw = getattr(response, "raw_headers", None)
        if raw is None:
            version, replica = response.headers.get(VERSION_HEADER), response.headers.get(REPLICA_HEADER)
        else:  # one pass over the encoded headers: `response.headers` builds a mapping each time it is read
            version = replica = None
            for name, value in raw:
                if name == VERSION_RAW:
                    version = value.decode("latin-1")
                elif name == REPLICA_RAW:
                    replica = value.decode("latin-1")
        self.recorder.submit(self, response.status_code, response.body, version, replica, cache_hit)

    def streamed(self, outcome: str, version: str | None, replica: str | None) -> None:
        """A stream ended: `outcome` is the gateway's ("ok", "server_error" for an error event,
        "aborted", a connection's failure), kept as the finish reason when it was not "ok"."""
        if self.done:
            return
        self.done = True
        if outcome != "ok":
            self.finish = "aborted" if outcome == "aborted" else "error"
        if self.recorder is not None:
            self.recorder.submit(self, 200, None, version, replica, False)
