"""Where the record is kept: SQLite by default (a file, WAL), PostgreSQL by URL. One schema
(`serving.record.schema`), one interface:

    store = open_store(".serving/plane/record.sqlite3")      # or "postgresql://user@host:5432/db"
    store.write_batch(rows)                  # rows: list[Row], in one transaction
    store.query(Filters(version="3", since=t0, limit=100))   # list[Row], newest first
    store.count(Filters(...))                # how many rows match
    store.counts_by("finish_reason", Filters(...))           # {value: rows}
    store.delete_key(key_id)                 # rows of one key, deleted; returns how many
    store.purge_older_than(ts)               # rows with ts < ts, deleted; returns how many
    store.export(path, Filters(...))         # OpenAI `messages` JSONL for data.sources; returns rows written
    store.find(completion_id)                # one Row, or None
    store.put_feedback(feedback)             # (stored Feedback, created?): a repeat merges into its row
    store.iter_feedback(FeedbackFilters(...))  # FeedbackItems: feedback + completion + review (serving.record.feedback)
    store.put_reviews(reviews)               # decisions, one per (feedback, revision)
    store.close()

A store is used from one thread at a time (the recorder's writer, or a command). SQLite rather
than Parquet files by day: forgetting a key and purging by age delete rows, which Parquet can
only do by rewriting whole files, and WAL lets `lifecycle traffic` read while the gateway writes.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.redact import redact_url  # re-exported: the record's messages name its store without the password
from serving.record import feedback as fb
from serving.record.export import write_jsonl
from serving.record.feedback import FEEDBACK, FEEDBACK_COLUMNS, MUTABLE, REVIEW_COLUMNS, REVIEWS, Feedback, FeedbackFilters, FeedbackItem, Review
from serving.record.schema import COLUMNS, TABLE, Filters, Row, create_statements, row_from_db

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
CUT_SHORT = ("error", "aborted")  # a stream's finish reasons when it broke or the client left: not data
SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
# A feedback with its completion, the preferred completion's answer and the decision on its
# current revision (an edit after a decision leaves the new revision unreviewed).
SELECT_FEEDBACK = (
    f"SELECT {', '.join('f.' + c for c in FEEDBACK_COLUMNS)}, {', '.join('c.' + c for c in COLUMNS)}, p.answer, {', '.join('r.' + c for c in REVIEW_COLUMNS)} "
    f"FROM {FEEDBACK} f JOIN {TABLE} c ON c.id = f.completion_id LEFT JOIN {TABLE} p ON p.id = f.preferred "
    f"LEFT JOIN {REVIEWS} r ON r.feedback_id = f.id AND r.revision = f.revision"
)
# Feedback (and its reviews) whose completion is gone: forgotten with its key, or purged by age.
ORPHANS = [
    f"DELETE FROM {FEEDBACK} WHERE NOT EXISTS (SELECT 1 FROM {TABLE} c WHERE c.id = {FEEDBACK}.completion_id)",
    f"DELETE FROM {REVIEWS} WHERE NOT EXISTS (SELECT 1 FROM {FEEDBACK} f WHERE f.id = {REVIEWS}.feedback_id)",
]


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message names it and what to do."""


class Store(abc.ABC):
    """The SQL both dialects share; subclasses open the connection and name the placeholder."""

    placeholder = "?"
    dialect = "sqlite"

    def __init__(self, connection: Any, where: str) -> None:
        self.connection, self.where = connection, where
        with self._transaction() as cur:
            for statement in (*create_statements(self.dialect), *fb.create_statements(self.dialect)):
                cur.execute(statement)

    @abc.abstractmethod
    def _transaction(self, streaming: bool = False):
        """A context manager giving a cursor inside one transaction (committed on success);
        `streaming`: the cursor reads its result a batch at a time where the driver needs asking."""

    def write_batch(self, rows: list[Row]) -> None:
        if not rows:
            return
        marks = ", ".join([self.placeholder] * len(COLUMNS))
        sql = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks})"
        with self._transaction() as cur:
            cur.executemany(sql, [tuple(getattr(r, c) for c in COLUMNS) for r in rows])

    def iter_rows(self, filters: Filters = Filters(), batch: int = 1000) -> Iterator[Row]:
        """Matching rows, newest first, fetched `batch` at a time (an export of a long window
        never holds it all in memory)."""
        where, values = filters.where(self.placeholder)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit is not None else ""
        with self._transaction(streaming=True) as cur:
            cur.execute(f"{SELECT}{where} ORDER BY ts DESC, id{limit}", values)
            while chunk := cur.fetchmany(batch):
                yield from (row_from_db(tuple(v)) for v in chunk)

    def query(self, filters: Filters = Filters()) -> list[Row]:
        return list(self.iter_rows(filters))

    def count(self, filters: Filters = Filters()) -> int:
        where, values = filters.where(self.placeholder)
        with self._transaction() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {TABLE}{where}", values)
            return int(cur.fetchone()[0])

    def counts_by(self, column: str, filters: Filters = Filters()) -> dict[Any, int]:
        """Matching rows per value of `column` (a schema column), most first."""
        if column not in COLUMNS:
            raise ValueError(f"unknown column {column!r}; the record's columns: {', '.join(COLUMNS)}")
        where, values = filters.where(self.placeholder)
        with self._transaction() as cur:
            cur.execute(f"SELECT {column}, COUNT(*) FROM {TABLE}{where} GROUP BY {column} ORDER BY COUNT(*) DESC", values)
            return {value: int(n) for value, n in cur.fetchall()}

    def delete_key(self, key_id: str) -> int:
        """The key's completions, the feedback on them and the feedback it gave; returns how
        many completions."""
        with self._transaction() as cur:
            cur.execute(f"DELETE FROM {TABLE} WHERE key_id = {self.placeholder}", [key_id])
            gone = cur.rowcount
            cur.execute(f"DELETE FROM {FEEDBACK} WHERE key_id = {self.placeholder}", [key_id])
            for statement in ORPHANS:
                cur.execute(statement)
            return gone

    def purge_older_than(self, ts: float) -> int:
        """Completions older than `ts`, with the feedback on them; returns how many completions."""
        with self._transaction() as cur:
            cur.execute(f"DELETE FROM {TABLE} WHERE ts < {self.placeholder}", [ts])
            gone = cur.rowcount
            if gone:
                for statement in ORPHANS:
                    cur.execute(statement)
            return gone

    # --- feedback (serving.record.feedback) ---

    def find(self, completion_id: str) -> Row | None:
        with self._transaction() as cur:
            cur.execute(f"{SELECT} WHERE id = {self.placeholder}", [completion_id])
            found = cur.fetchone()
        return None if found is None else row_from_db(tuple(found))

    def put_feedback(self, given: Feedback) -> tuple[Feedback, bool]:
        """Store `given` under its id: (the stored feedback, True) when new; a repeat merges into
        the stored row (fields it sends replace theirs, fields it leaves out are kept) and is a
        new revision only when that changed something: (stored, False)."""
        mark = self.placeholder
        with self._transaction() as cur:
            cur.execute(f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM {FEEDBACK} WHERE id = {mark}", [given.id])
            found = cur.fetchone()
            if found is None:
                cur.execute(f"INSERT INTO {FEEDBACK} ({', '.join(FEEDBACK_COLUMNS)}) VALUES ({', '.join([mark] * len(FEEDBACK_COLUMNS))})", [getattr(given, c) for c in FEEDBACK_COLUMNS])
                return given, True
            old = fb.feedback_from_db(tuple(found))
            merged = {c: getattr(given, c) if getattr(given, c) is not None else getattr(old, c) for c in MUTABLE}
            if all(merged[c] == getattr(old, c) for c in MUTABLE):
                return old, False
            new = Feedback(**{**old.__dict__, **merged, "updated": given.updated, "revision": old.revision + 1})
            changed = (*MUTABLE, "updated", "revision")
            cur.execute(f"UPDATE {FEEDBACK} SET {', '.join(f'{c} = {mark}' for c in changed)} WHERE id = {mark}", [*(getattr(new, c) for c in changed), new.id])
            return new, False

    def iter_feedback(self, filters: FeedbackFilters = FeedbackFilters(), batch: int = 1000) -> Iterator[FeedbackItem]:
        """Matching feedback, oldest update first, each joined with its completion (feedback whose
        completion is gone is not returned), the preferred completion's answer and the decision
        on its current revision."""
        where, values = filters.where(self.placeholder)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit is not None else ""
        nf, nc = len(FEEDBACK_COLUMNS), len(COLUMNS)
        with self._transaction(streaming=True) as cur:
            cur.execute(f"{SELECT_FEEDBACK}{where} ORDER BY f.updated, f.id{limit}", values)
            while chunk := cur.fetchmany(batch):
                for values_ in chunk:
                    v = tuple(values_)
                    yield FeedbackItem(fb.feedback_from_db(v[:nf]), row_from_db(v[nf : nf + nc]), v[nf + nc], fb.review_from_db(v[nf + nc + 1 :]))

    def count_feedback_by(self, column: str, filters: FeedbackFilters = FeedbackFilters(kind=None)) -> dict[Any, int]:
        """Matching feedback per value of a feedback column, the completion's `version`, or the
        review's `decision` (None: not reviewed), most first."""
        qualified = {"version": "c.version", "decision": "r.decision", **{c: f"f.{c}" for c in FEEDBACK_COLUMNS}}.get(column)
        if qualified is None:
            raise ValueError(f"cannot count feedback by {column!r}: use version, decision or a feedback column ({', '.join(FEEDBACK_COLUMNS)})")
        where, values = filters.where(self.placeholder)
        joined = SELECT_FEEDBACK.split(" FROM ", 1)[1]
        with self._transaction() as cur:
            cur.execute(f"SELECT {qualified}, COUNT(*) FROM {joined}{where} GROUP BY {qualified} ORDER BY COUNT(*) DESC", values)
            return {value: int(n) for value, n in cur.fetchall()}

    def put_reviews(self, reviews: list[Review]) -> None:
        """Record decisions; a second decision on the same (feedback, revision) replaces the first."""
        if not reviews:
            return
        mark = self.placeholder
        later = [c for c in REVIEW_COLUMNS if c not in ("feedback_id", "revision")]
        sql = (
            f"INSERT INTO {REVIEWS} ({', '.join(REVIEW_COLUMNS)}) VALUES ({', '.join([mark] * len(REVIEW_COLUMNS))}) "
            f"ON CONFLICT (feedback_id, revision) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in later)}"
        )
        with self._transaction() as cur:
            cur.executemany(sql, [tuple(getattr(r, c) for c in REVIEW_COLUMNS) for r in reviews])

    def export(self, path: str | Path, filters: Filters = Filters()) -> int:
        """The matching answered rows (status 200, an answer, not a stream cut short: finish
        reason neither "error" nor "aborted") as a dataset `data.sources` reads: OpenAI
        `messages` JSONL, the answer as the assistant turn, with provenance fields."""
        answered = Filters(**{**filters.__dict__, "status": 200})
        whole = (r for r in self.iter_rows(answered) if r.answer and r.finish_reason not in CUT_SHORT)
        return write_jsonl(Path(path), whole)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where})"


class _SQLiteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Cursor:
        self.cursor = self.connection.cursor()
        self.cursor.execute("BEGIN")
        return self.cursor

    def __exit__(self, kind, *exc: object) -> None:
        self.connection.execute("ROLLBACK" if kind else "COMMIT")
        self.cursor.close()


class SQLiteStore(Store):
    """A file under .serving/ in WAL mode: the gateway's writer and a reader (`lifecycle
    traffic`) never block each other; a second writer (`lifecycle forget`) waits its turn."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Transactions are explicit (isolation_level=None); the writer thread owns it.
            connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL's safe setting: a power cut may lose the last batch, never corrupt
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the record's SQLite file {path}: {exc}; fix record.store in params.yaml") from None
        super().__init__(connection, str(path))

    def _transaction(self, streaming: bool = False) -> _SQLiteTransaction:
        return _SQLiteTransaction(self.connection)  # SQLite's cursors always step through a result


class PostgresStore(Store):
    """PostgreSQL by URL (psycopg 3). Shared by every gateway that names the same URL."""

    placeholder = "%s"
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        try:
            # Autocommit, with explicit transaction blocks: a read never leaves one open.
            connection = psycopg.connect(url, connect_timeout=10, autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the record's PostgreSQL at {redact_url(url)}: {str(exc).strip()}; check record.store (or ${{record.store_env}}) and that the server runs") from None
        super().__init__(connection, redact_url(url))

    def _transaction(self, streaming: bool = False):
        return _PostgresTransaction(self.connection, streaming)


class _PostgresTransaction:
    def __init__(self, connection: Any, streaming: bool) -> None:
        self.connection, self.streaming = connection, streaming

    def __enter__(self):
        self.tx = self.connection.transaction()
        self.tx.__enter__()
        # A named (server-side) cursor sends rows as they are fetched; a plain one holds the
        # whole result in memory, which a long export window must not.
        self.cursor = self.connection.cursor(name="record_rows") if self.streaming else self.connection.cursor()
        return self.cursor

    def __exit__(self, *exc: Any) -> None:
        self.cursor.close()
        self.tx.__exit__(*exc)


def close_quietly(store: Store | None) -> None:
    """Close a store that just failed: a second error while closing says nothing new."""
    if store is None:
        return
    try:
        store.close()
    except Exception:  # noqa: BLE001 - the failure that got us here is the one reported
        pass


class RowWriter:
    """Writes the record's batches to a store it opens itself, and opens again after a failure.
    The recorder's writer thread uses one, and so does the redactor process when it owns the
    store (serving/record/redactor.py): the same rules either side."""

    def __init__(self, open_store: Callable[[], Store], where: str) -> None:
        self.open_store, self.where = open_store, where
        self.store: Store | None = None

    def opened(self) -> Store:
        """The store, opened on first use and again after a failure (a restarted database, a
        dropped connection)."""
        if self.store is None:
            self.store = self.open_store()
        return self.store

    def discard(self) -> None:
        close_quietly(self.store)
        self.store = None

    def write(self, rows: list[Row]) -> tuple[int, int, list[str]]:
        """(rows written, rows dropped, warnings). Either the store is down (every row fails:
        dropped) or it refuses one row (the rest are written): a failed batch is retried one
        row at a time, on a new connection, to tell which. A row already there (a batch written
        by a redactor process that died before it answered) counts as written."""
        if not rows:
            return 0, 0, []
        try:
            self.opened().write_batch(rows)
            return len(rows), 0, []
        except Exception as exc:
            warnings = [f"a batch of {len(rows)} completion(s) not written to {self.where} ({type(exc).__name__}: {exc}); retrying them one by one"]
        self.discard()
        written = dropped = 0
        for i, row in enumerate(rows):
            try:
                store = self.opened()
            except Exception as exc:  # still down: the rest of the batch is lost
                warnings.append(f"{self.where} cannot be opened ({type(exc).__name__}: {exc}): {len(rows) - i} completion(s) lost")
                dropped += len(rows) - i
                break
            try:
                store.write_batch([row])
                written += 1
            except Exception:
                try:
                    there = store.find(row.id) is not None
                except Exception:
                    there = False
                    self.discard()
                written, dropped = written + there, dropped + (not there)
        return written, dropped, warnings

    def purge(self, before: float) -> tuple[int, str | None]:
        """Delete rows older than `before`: (how many, why it failed or None)."""
        try:
            return self.opened().purge_older_than(before), None
        except Exception as exc:
            self.discard()
            return 0, f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def open_store(where: str | Path) -> Store:
    """A store by where it is: postgresql://... (or postgres://) is PostgreSQL; sqlite:///path or
    a plain path is a SQLite file."""
    text = str(where)
    if text.startswith(POSTGRES_SCHEMES):
        return PostgresStore(text)
    if "://" in text and not text.startswith("sqlite:///"):
        raise StoreError(f"record store {redact_url(text)!r}: use a file path (SQLite), sqlite:///path, or postgresql://user@host:port/db")
    return SQLiteStore(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text)
