"""What the record holds: one row per completion the gateway answered, in one schema for every
store (SQLite, PostgreSQL), and the filters a query takes.

Prompts, answers and sampling parameters are stored after redaction (`pipelines.clean.redact`,
the data cleaning's PII rules); the caller's key is stored only as `key_id`, a digest of it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from typing import Any

TABLE = "completions"
KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def key_id(api_key: str) -> str:
    """The hashed id of an API key: 16 hex digits of its sha256. Keys are random secrets, so the
    digest tells nothing about one; it names a key's rows (`lifecycle forget`) and its opt-out
    (`record.opt_out_keys`) without the key itself ever being stored or written in params."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One completion, as stored. Times are Unix seconds (UTC)."""

    id: str  # the id the client got: the body's `id` and the x-completion-id header
    ts: float  # when the gateway received the request
    key_id: str | None  # key_id() of the Bearer key the caller sent; None without one
    tier: str  # the key's tier; "untiered" (no keys file, the gateway's key) or "service" (the plane's own traffic key)
    model: str  # the public model name the client asked for
    version: str | None  # the model version that answered (the cached answer's version on a cache hit)
    replica: str | None  # the engine replica that answered; "cache" for a cache hit
    endpoint: str  # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    prompt: str  # JSON: the request's `messages` (chat) or `prompt` (text), redacted
    answer: str | None  # the first choice's text, redacted; None when nothing was answered
    params: str  # JSON: the request's other fields (temperature, top_p, max_tokens, stop, seed, n, stream, ...), redacted
    finish_reason: str | None  # the engine's (stop, length, ...); for a stream that broke: "error", or "aborted" (the client left)
    prompt_tokens: int | None  # from the engine's `usage` (asked of the engine for streams too)
    completion_tokens: int | None
    latency_s: float  # from the request's arrival at the gateway to the answer's last byte
    cache_hit: bool
    status: int  # the HTTP status the client got
    stream: bool


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Row))

# One schema, two dialects: only the column types differ.
_TYPES = {
    "id": ("TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    "ts": ("REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    "key_id": ("TEXT", "TEXT"),
    "tier": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "model": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "version": ("TEXT", "TEXT"),
    "replica": ("TEXT", "TEXT"),
    "endpoint": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "prompt": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "answer": ("TEXT", "TEXT"),
    "params": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "finish_reason": ("TEXT", "TEXT"),
    "prompt_tokens": ("INTEGER", "INTEGER"),
    "completion_tokens": ("INTEGER", "INTEGER"),
    "latency_s": ("REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    "cache_hit": ("INTEGER NOT NULL", "BOOLEAN NOT NULL"),
    "status": ("INTEGER NOT NULL", "INTEGER NOT NULL"),
    "stream": ("INTEGER NOT NULL", "BOOLEAN NOT NULL"),
}
INDEXES = ("ts", "version", "key_id")  # the queries' filters: a time window, a version, a key


def create_statements(dialect: str) -> list[str]:
    """CREATE TABLE and its indexes for 'sqlite' or 'postgresql' (idempotent)."""
    which = 0 if dialect == "sqlite" else 1
    columns = ", ".join(f"{c} {_TYPES[c][which]}" for c in COLUMNS)
    return [f"CREATE TABLE IF NOT EXISTS {TABLE} ({columns})"] + [f"CREATE INDEX IF NOT EXISTS {TABLE}_{c} ON {TABLE} ({c})" for c in INDEXES]


def row_from_db(values: tuple[Any, ...]) -> Row:
    """A stored row (COLUMNS order) as a Row: SQLite returns its booleans as 0/1."""
    row = dict(zip(COLUMNS, values))
    row["cache_hit"], row["stream"] = bool(row["cache_hit"]), bool(row["stream"])
    return Row(**row)


@dataclass(frozen=True)
class Filters:
    """Which rows a query, an export or a count takes; None means any. `since` is inclusive,
    `until` exclusive (Unix seconds). Newest first; `limit` None = all."""

    version: str | None = None
    key_id: str | None = None
    tier: str | None = None
    finish_reason: str | None = None
    status: int | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def where(self, placeholder: str) -> tuple[str, list[Any]]:
        """(' WHERE ...' or '', its parameters) with the dialect's placeholder (? or %s)."""
        clauses, values = [], []
        for column in ("version", "key_id", "tier", "finish_reason", "status"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = {placeholder}")
                values.append(value)
        if self.since is not None:
            clauses.append(f"ts >= {placeholder}")
            values.append(self.since)
        if self.until is not None:
            clauses.append(f"ts < {placeholder}")
            values.append(self.until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values
