"""What users said about answers, kept beside the record in the same store: the `feedback` table
(one row per completion, key and kind), the `reviews` table (a person's decision on one revision
of it), and the read a later export stage uses, `Store.iter_feedback(FeedbackFilters(...))`:

    for item in store.iter_feedback(FeedbackFilters(decision="accepted")):
        item.completion.prompt, item.completion.answer     # what was asked and served (redacted)
        item.feedback.rating, item.correction               # the label (a reviewer's edit wins)
        item.preferred_answer                               # the other completion's answer, if any
        item.review.reviewer, item.review.decided           # who decided, when

`feedback` columns: id (`fb-` + 24 hex digits, derived from completion, key and kind: a repeat
lands on the same row), completion_id, key_id / tier (who gave it), kind ('explicit': a rating,
correction, preferred answer, reason or tags; 'implicit': a client's `signal`), signal
(regenerated, copied, abandoned), rating and scale ('thumbs' +1/-1, 'stars' 1-5: the scale it
was given in, whatever params say later), correction, preferred (another completion id for the
same prompt), reason, tags (JSON list), created, updated (Unix seconds), revision (1, then +1
each time a repeat changed it: a review decides one revision). Texts are redacted like the
record's. `reviews`: (feedback_id, revision) -> decision ('accepted', 'edited', 'rejected'),
correction (a reviewer's edit, redacted), reviewer, decided, flow_run_id, note.

Implicit signals are not labels: `iter_feedback` reads explicit feedback unless asked otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

from serving.record.schema import Row

FEEDBACK, REVIEWS = "feedback", "reviews"
EXPLICIT, IMPLICIT = "explicit", "implicit"
SIGNALS = ("regenerated", "copied", "abandoned")
DECISIONS = ("accepted", "edited", "rejected")
SCALES = {"thumbs": (-1, 1), "stars": (1, 2, 3, 4, 5)}


def feedback_id(completion_id: str, key_id: str | None, kind: str, signal: str | None = None) -> str:
    """The stored feedback's id: the same for the same completion, key and kind (and signal), so
    a client's repeat updates one row and gets the same id back."""
    raw = "\0".join((completion_id, key_id or "", kind, signal or ""))
    return "fb-" + hashlib.sha256(raw.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Feedback:
    id: str
    completion_id: str
    key_id: str | None  # key_id() of the key that gave it; None without one
    tier: str
    kind: str  # EXPLICIT or IMPLICIT
    signal: str | None  # one of SIGNALS for an implicit one
    rating: int | None
    scale: str | None  # a key of SCALES when rated
    correction: str | None  # redacted
    preferred: str | None  # another completion's id (same prompt)
    reason: str | None  # redacted
    tags: str | None  # JSON list of strings, redacted
    created: float
    updated: float
    revision: int

    @property
    def tag_list(self) -> list[str]:
        return json.loads(self.tags) if self.tags else []


@dataclass(frozen=True)
class Review:
    feedback_id: str
    revision: int  # the feedback's revision the reviewer saw
    decision: str  # one of DECISIONS
    correction: str | None  # the reviewer's edit ('edited'), redacted
    reviewer: str
    decided: float
    flow_run_id: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback with the completion it is about, the preferred completion's answer, and the
    decision on its current revision (None: not reviewed yet)."""

    feedback: Feedback
    completion: Row
    preferred_answer: str | None
    review: Review | None

    @property
    def correction(self) -> str | None:
        """The answer it should have been: the reviewer's edit, else the user's correction."""
        if self.review is not None and self.review.decision == "edited" and self.review.correction:
            return self.review.correction
        return self.feedback.correction


FEEDBACK_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Feedback))
REVIEW_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Review))
MUTABLE = ("rating", "scale", "correction", "preferred", "reason", "tags")  # what a repeat may change

_FEEDBACK_TYPES = {
    "id": ("TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    "completion_id": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "key_id": ("TEXT", "TEXT"),
    "tier": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "kind": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "signal": ("TEXT", "TEXT"),
    "rating": ("INTEGER", "INTEGER"),
    "scale": ("TEXT", "TEXT"),
    "correction": ("TEXT", "TEXT"),
    "preferred": ("TEXT", "TEXT"),
    "reason": ("TEXT", "TEXT"),
    "tags": ("TEXT", "TEXT"),
    "created": ("REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    "updated": ("REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    "revision": ("INTEGER NOT NULL", "INTEGER NOT NULL"),
}
_REVIEW_TYPES = {
    "feedback_id": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "revision": ("INTEGER NOT NULL", "INTEGER NOT NULL"),
    "decision": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "correction": ("TEXT", "TEXT"),
    "reviewer": ("TEXT NOT NULL", "TEXT NOT NULL"),
    "decided": ("REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    "flow_run_id": ("TEXT", "TEXT"),
    "note": ("TEXT", "TEXT"),
}


def create_statements(dialect: str) -> list[str]:
    """CREATE TABLE (idempotent) for both tables and their indexes, in 'sqlite' or 'postgresql'."""
    which = 0 if dialect == "sqlite" else 1
    feedback = ", ".join(f"{c} {_FEEDBACK_TYPES[c][which]}" for c in FEEDBACK_COLUMNS)
    reviews = ", ".join(f"{c} {_REVIEW_TYPES[c][which]}" for c in REVIEW_COLUMNS)
    return [
        f"CREATE TABLE IF NOT EXISTS {FEEDBACK} ({feedback})",
        f"CREATE INDEX IF NOT EXISTS {FEEDBACK}_completion_id ON {FEEDBACK} (completion_id)",
        f"CREATE INDEX IF NOT EXISTS {FEEDBACK}_updated ON {FEEDBACK} (updated)",
        f"CREATE TABLE IF NOT EXISTS {REVIEWS} ({reviews}, PRIMARY KEY (feedback_id, revision))",
    ]


@dataclass(frozen=True)
class FeedbackFilters:
    """Which feedback `iter_feedback` reads; None means any. `kind` defaults to explicit: implicit
    signals are never labels unless asked for. `reviewed` False: no decision on the current
    revision yet; `decision`: that decision on it. `since`/`until` bound `updated` (since
    inclusive, until exclusive); `version` is the answering model version's. Oldest first."""

    kind: str | None = EXPLICIT
    completion_id: str | None = None
    key_id: str | None = None
    version: str | None = None
    rating: int | None = None
    reviewed: bool | None = None
    decision: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def where(self, placeholder: str) -> tuple[str, list[Any]]:
        clauses, values = [], []
        for column, value in (("f.kind", self.kind), ("f.completion_id", self.completion_id), ("f.key_id", self.key_id), ("c.version", self.version), ("f.rating", self.rating), ("r.decision", self.decision)):
            if value is not None:
                clauses.append(f"{column} = {placeholder}")
                values.append(value)
        if self.reviewed is not None:
            clauses.append("r.decision IS NOT NULL" if self.reviewed else "r.decision IS NULL")
        if self.since is not None:
            clauses.append(f"f.updated >= {placeholder}")
            values.append(self.since)
        if self.until is not None:
            clauses.append(f"f.updated < {placeholder}")
            values.append(self.until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


def feedback_from_db(values: tuple[Any, ...]) -> Feedback:
    return Feedback(**dict(zip(FEEDBACK_COLUMNS, values)))


def review_from_db(values: tuple[Any, ...]) -> Review | None:
    row = dict(zip(REVIEW_COLUMNS, values))
    return None if row["decision"] is None else Review(**row)
