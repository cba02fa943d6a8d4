"""A completion as the request path left it (`Pending`), and the row the store keeps of it
(`to_row`: the answer parsed, prompt, answer and parameters redacted with the data cleaning's
PII rules). `to_row` runs in the redactor process (serving/record/redactor.py), or in the
writer thread when that process is not there; `wire`/`unwire` carry a completion between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipelines.clean import redact
from pipelines.formats import map_strings
from serving.record.schema import Row
from serving.record.tap import Tap

PROMPT_FIELDS = ("messages", "prompt")
NOT_PARAMS = (*PROMPT_FIELDS, "model")  # everything else a request sends is a sampling parameter


@dataclass(slots=True)
class Pending:
    """A completion as the request path left it: raw, neither parsed nor redacted."""

    tap: Tap
    status: int
    body: bytes | None  # a JSON answer; None for a stream (its text is in the tap)
    version: str | None
    replica: str | None
    cache_hit: bool
    latency_s: float


# A completion as plain values: what the recorder's buffer holds and the pipe to the redactor
# carries. The tap's id, ts, chat, payload (the request's JSON: its raw bytes from the gateway,
# parsed by `to_row`), key_id, tier, model, a stream's text (its first choice's; None for a JSON
# answer), finish, usage, then the answer's status, body, version, replica, cache_hit, latency_s.
# A tuple, not the request's objects: a request's Tap and parsed payload die with the request,
# so the buffer adds one object per request to the garbage collector's count, not six (the
# record made the gateway collect generation 0 every ~150 cache hits, and promote its rows).
Wire = tuple


def wire_of(t: Tap, status: int, body: bytes | None, version: str | None, replica: str | None, cache_hit: bool, latency_s: float) -> Wire:
    text = "".join(t.texts.get(0, ())) if body is None else None
    return (t.id, t.ts, t.chat, t.payload, t.key_id, t.tier, t.model, text, t.finish, t.usage, status, body, version, replica, cache_hit, latency_s)


def wire(p: Pending) -> Wire:
    return wire_of(p.tap, p.status, p.body, p.version, p.replica, p.cache_hit, p.latency_s)


def unwire(w: Wire) -> Pending:
    tap = Tap.__new__(Tap)
    (tap.id, tap.ts, tap.chat, tap.payload, tap.key_id, tap.tier, tap.model, text, tap.finish, tap.usage, status, body, version, replica, cache_hit, latency_s) = w
    tap.texts = {0: [text]} if text else {}
    tap.recorder, tap.done = None, True
    return Pending(tap, status, body, version, replica, cache_hit, latency_s)


@lru_cache(maxsize=8192)
def _redact_seen(text: str) -> str:
    return redact(text)


def redact_text(text: str) -> str:
    """`pipelines.clean.redact`, remembered for texts seen before: a system prompt, a repeated
    question, a cached answer are redacted once (a text with seven digits or more costs ~0.4 ms
    in libphonenumber). Long texts are not kept: the memory stays under ~32 MB."""
    return _redact_seen(text) if len(text) <= 4096 else redact(text)


# json.dumps(value, ensure_ascii=False) builds a new encoder at every call (a third of its time
# for a chat's messages): the same encoder, built once.
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def redacted_json(value: Any) -> str:
    return _ENCODE(map_strings(value, redact_text))


def answer_of(body: bytes | None, chat: bool) -> tuple[str | None, str | None, dict | None]:
    """(first choice's text, its finish reason, usage) of a JSON answer; Nones for an error."""
    try:
        data = json.loads(body or b"")
        choice = data["choices"][0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        return text, choice.get("finish_reason"), data.get("usage")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None, None


def storable(text: str | None) -> str | None:
    """Text every store takes: PostgreSQL refuses NUL in text and psycopg cannot encode a lone
    surrogate (a byte-level model answers both; JSON carries them as \\u escapes). One
    replacement character each, in every store alike."""
    if text is None:
        return None
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def to_row(p: Pending) -> Row:
    """Parsed and redacted: what the store keeps."""
    tap = p.tap
    if p.body is not None:
        text, finish, usage = answer_of(p.body, tap.chat) if p.status == 200 else (None, None, None)
    else:
        text, finish, usage = "".join(tap.texts.get(0, ())), tap.finish, tap.usage
    usage = usage if isinstance(usage, dict) else {}
    payload = tap.payload
    if isinstance(payload, (bytes, bytearray)):  # the request's body as the client sent it (the gateway parsed it already)
        payload = json.loads(payload)
    if not isinstance(payload, dict):
        raise ValueError(f"the request is not a JSON object: {str(payload)[:80]}")
    return Row(
        id=tap.id, ts=tap.ts, key_id=tap.key_id, tier=tap.tier, model=tap.model, version=p.version, replica=p.replica,
        endpoint="chat" if tap.chat else "text",
        prompt=storable(redacted_json(payload.get("messages" if tap.chat else "prompt"))),
        answer=storable(redact_text(text)) if isinstance(text, str) else None,
        params=storable(redacted_json({k: v for k, v in payload.items() if k not in NOT_PARAMS})),
        finish_reason=finish, prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        latency_s=p.latency_s, cache_hit=p.cache_hit, status=p.status, stream=bool(payload.get("stream")),
    )
