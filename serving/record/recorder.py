"""The record's writer: a bounded buffer between the gateway's requests and the store.

A request only appends to the buffer (`submit`, never blocking); a thread of its own takes rows
out in batches, has the redactor process (`serving.record.redactor`) parse the answers and
redact prompts and answers with the data cleaning's PII rules (`pipelines.clean.redact`), and
writes the rows (`Store.write_batch`). The thread mostly waits, the GIL released: the redaction's
CPU is not spent in the gateway's process (when the redactor is not there, the thread redacts
itself, as it did before the process existed). A full buffer drops the
row, never the request: counted in `gateway_record_dropped_total{reason="buffer_full"}`; a
batch the store refused is counted with reason "store_error". Written rows are counted in
`gateway_record_written_total`. Rows past `retention_days` are purged every `purge_interval_s`.
`close()` (the gateway's shutdown) writes what is buffered before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from serving.record.redactor import Redactor, rows_of
from serving.record.rows import NOT_PARAMS, PROMPT_FIELDS, Pending, answer_of, redact_text, redacted_json, storable, to_row
from serving.record.schema import Row, key_id
from serving.record.store import Store, StoreError, close_quietly, open_store
from serving.record.tap import Tap

log = logging.getLogger("serving.record")
REDACTOR_RETRY_S = 10  # a redactor process that failed is started again this much later (a dead one at once)
# Batches start GATHER_S apart at most while there is no backlog: a few a second, not one per
# request, so the writer thread takes the gateway's GIL a few times a second. A row that comes
# after a quiet spell is taken at once.
GATHER_S = 0.1
STORE_FILE = "record.sqlite3"  # in the plane's state folder unless record.store names one
SERVICE_TIER, UNTIERED = "service", "untiered"


class Recorder:
    """The bounded buffer and its writer thread. `store` is opened on `start()` (in the writer's
    own thread for SQLite's sake, but before `start` returns, so a bad store fails the start).

    `opt_out_keys` are key ids (`serving.record.schema.key_id`), `opt_out_tiers` tier names:
    their completions still get an id, and nothing is kept."""

    def __init__(
        self, store: str | Path | Callable[[], Store], *, buffer_rows: int = 10_000, batch_rows: int = 256, flush_interval_s: float = 0.5,
        retention_days: float | None = 30, purge_interval_s: float = 3600, opt_out_keys: frozenset[str] | set[str] = frozenset(),
        opt_out_tiers: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.open_store = store if callable(store) else (lambda: open_store(store))
        self.where = getattr(store, "__name__", str(store)) if callable(store) else str(store)
        self.buffer: queue.Queue[Pending] = queue.Queue(maxsize=buffer_rows)
        self.batch_rows, self.flush_interval_s = batch_rows, flush_interval_s
        self.retention_s = None if retention_days is None else retention_days * 86400
        self.purge_interval_s = purge_interval_s
        self.opt_out_keys, self.opt_out_tiers = frozenset(opt_out_keys), frozenset(opt_out_tiers)
        # Registered in the gateway's registry by `register` (serving.gateway does, for /metrics).
        self.written = Counter("gateway_record_written", "Completions written to the record.", registry=None)
        self.dropped = Counter("gateway_record_dropped", "Completions not recorded: buffer_full (the buffer was full: the request was still answered) or store_error (the store refused the batch).", ["reason"], registry=None)
        self.opted_out = Counter("gateway_record_opted_out", "Completions not recorded because their key or tier opted out (record.opt_out_keys, opt_out_tiers).", registry=None)
        self.buffered = Gauge("gateway_record_buffered", "Completions waiting in the record's buffer.", registry=None)
        self.cpu = Counter("gateway_record_writer_cpu_seconds", "CPU time the record's writer spent on its rows: the writer thread in the gateway's process (shipping batches, writing them) and the redactor process (parsing, redacting).", registry=None)
        self.buffered.set_function(self.buffer.qsize)
        for reason in ("buffer_full", "store_error"):
            self.dropped.labels(reason)
        self._submitted = 0  # rows put in the buffer; with _settled, what flush() waits for
        self._settled = 0  # rows written or dropped by the writer
        self._progress = threading.Condition()
        self._unwritten: set[str] = set()  # ids of buffered rows: a feedback on one waits for it (wait_written)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: threading.Event = threading.Event()
        self._store: Store | None = None  # the writer's; reopened after a failure
        self._redactor = Redactor()  # the writer's; restarted after a failure
        self._redactor_retry = 0.0  # monotonic time before which a failed redactor is not restarted
        self._start_error: BaseException | None = None

    @classmethod
    def from_params(cls, record, state_dir: Path) -> "Recorder | None":
        """From the `record:` params section; None when it is disabled."""
        if not record.enabled:
            return None
        return cls(
            record.store_url() or Path(state_dir) / STORE_FILE, buffer_rows=record.buffer_rows, batch_rows=record.batch_rows,
            flush_interval_s=record.flush_interval_s, retention_days=record.retention_days, purge_interval_s=record.purge_interval_s,
            opt_out_keys=set(record.opt_out_keys), opt_out_tiers=set(record.opt_out_tiers),
        )

    def register(self, registry: CollectorRegistry) -> None:
        """Export the recorder's counters on a gateway's /metrics."""
        for metric in (self.written, self.dropped, self.opted_out, self.buffered, self.cpu):
            try:
                registry.register(metric)
            except ValueError:  # already there: the same recorder behind a rebuilt app
                pass

    # --- the request path ---

    def tap(self, path: str, payload: dict, api_key: str | None, tier: str, model: str, arrived: float | None = None) -> Tap:
        """A completion about to be sent on (`arrived`: its perf_counter() at the gateway)."""
        kid = key_id(api_key) if api_key else None
        kept = not (kid in self.opt_out_keys or tier in self.opt_out_tiers)
        if not kept:
            self.opted_out.inc()
        tap = Tap(self if kept else None, path, payload, kid, tier, model)
        if arrived is not None:
            tap.started = arrived
        return tap

    def submit(self, tap: Tap, status: int, body: bytes | None, version: str | None, replica: str | None, cache_hit: bool) -> None:
        """Never blocks: a full buffer drops the row (counted)."""
        pending = Pending(tap, status, body, version, replica, cache_hit, time.perf_counter() - tap.started)
        try:
            self.buffer.put_nowait(pending)
        except queue.Full:
            self.dropped.labels("buffer_full").inc()
            return
        with self._progress:
            self._submitted += 1
            self._unwritten.add(tap.id)

    # --- the writer ---

    def start(self) -> None:
        """Open the store and start the writer; a store that cannot be opened raises StoreError."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread = None
            raise self._start_error

    def _run(self) -> None:
        try:
            store = self.open_store()
        except BaseException as exc:  # reported by start(), in the caller's thread
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        self._store = store
        self._start_redactor()
        next_purge = time.monotonic()
        try:
            while True:
                batch = self._take()
                if batch:
                    cpu, began = time.thread_time(), time.monotonic()
                    self._write(batch)
                    self.cpu.inc(time.thread_time() - cpu)
                    if len(batch) < self.batch_rows:  # no backlog: let the next batch gather (returns at once on close)
                        self._stop.wait(min(GATHER_S, self.flush_interval_s) - (time.monotonic() - began))
                if self.retention_s is not None and time.monotonic() >= next_purge and self._store is not None:
                    next_purge = time.monotonic() + self.purge_interval_s
                    self._purge(self._store)
                if self._stop.is_set() and self.buffer.empty():
                    return
        finally:
            self._redactor.close()
            if self._store is not None:
                self._store.close()

    def _take(self) -> list[Pending]:
        """Up to batch_rows rows: waits flush_interval_s for the first, then takes what is there."""
        try:
            batch = [self.buffer.get(timeout=self.flush_interval_s)]
        except queue.Empty:
            return []
        while len(batch) < self.batch_rows:
            try:
                batch.append(self.buffer.get_nowait())
            except queue.Empty:
                break
        return batch

    def _made(self, batch: list[Pending]) -> list[Row | str]:
        """Each completion's row (or why not): by the redactor process, restarted if it is gone;
        else here, a row at a time."""
        if not self._redactor.running and time.monotonic() >= self._redactor_retry:
            self._start_redactor()
        if self._redactor.running:
            try:
                made, cpu = self._redactor.rows(batch)
                self.cpu.inc(cpu)
                return made
            except (OSError, EOFError) as exc:
                self._redactor_retry = time.monotonic() + REDACTOR_RETRY_S
                log.warning("record: the redactor process failed (%s: %s); the writer thread redacts until it is restarted, in %gs", type(exc).__name__, exc, REDACTOR_RETRY_S)
        made = []
        for p in batch:
            time.sleep(0)  # let the event loop have the GIL between rows: it never waits a whole batch
            made.extend(rows_of([p]))
        return made

    def _start_redactor(self) -> None:
        if not self._redactor.start():
            self._redactor_retry = time.monotonic() + REDACTOR_RETRY_S

    def _write(self, batch: list[Pending]) -> None:
        rows: list[Row] = []
        for p, made in zip(batch, self._made(batch)):
            if isinstance(made, Row):
                rows.append(made)
            else:  # a bug for one odd request costs its row, never the batch
                self.dropped.labels("store_error").inc()
                log.warning("record: completion %s could not be made a row: %s", p.tap.id, made)
        try:
            self._reopened().write_batch(rows)
            self.written.inc(len(rows))
        except Exception as exc:
            # Either the store is down (every row fails: dropped, counted) or one row is
            # refused (the rest are written): one at a time tells which, on a new connection.
            log.warning("record: a batch of %d completion(s) not written to %s (%s: %s); retrying them one by one", len(rows), self.where, type(exc).__name__, exc)
            self._discard_store()
            for i, row in enumerate(rows):
                try:
                    store = self._reopened()
                except Exception:  # still down: the rest of the batch is lost, counted
                    self.dropped.labels("store_error").inc(len(rows) - i)
                    break
                try:
                    store.write_batch([row])
                    self.written.inc()
                except Exception:
                    self.dropped.labels("store_error").inc()
        with self._progress:
            self._settled += len(batch)
            self._unwritten.difference_update(p.tap.id for p in batch)
            self._progress.notify_all()

    def _reopened(self) -> Store:
        """The store, opened again after a failure (a restarted database, a dropped connection)."""
        if self._store is None:
            self._store = self.open_store()
        return self._store

    def _discard_store(self) -> None:
        close_quietly(self._store)
        self._store = None

    def _purge(self, store: Store) -> None:
        try:
            gone = store.purge_older_than(time.time() - self.retention_s)
            if gone:
                log.info("record: purged %d completion(s) older than %g days from %s", gone, self.retention_s / 86400, store)
        except Exception as exc:
            log.warning("record: purge failed on %s: %s: %s", store, type(exc).__name__, exc)

    def flush(self, timeout_s: float = 60) -> bool:
        """Wait until every row submitted so far is written (or dropped); False on timeout."""
        with self._progress:
            target = self._submitted
            return self._progress.wait_for(lambda: self._settled >= target or self._thread is None, timeout_s)

    def holds(self, completion_id: str) -> bool:
        """Whether the completion's row is in the buffer, not yet in the store."""
        with self._progress:
            return completion_id in self._unwritten

    def wait_written(self, completion_id: str, timeout_s: float) -> bool:
        """Wait until the completion's row has left the buffer (written, or dropped by a store
        error); True at once for an id the buffer does not hold (written long ago, never
        recorded, unknown), False when it is still buffered after `timeout_s`. A feedback can
        arrive before the writer's next batch: its completion is then in the buffer, not the store."""
        with self._progress:
            return self._progress.wait_for(lambda: completion_id not in self._unwritten or self._thread is None, timeout_s)

    def close(self, timeout_s: float = 60) -> None:
        """Write what is buffered, then stop the writer."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("record: %d completion(s) still buffered after %gs at shutdown, not written", self.buffer.qsize(), timeout_s)
        self._thread = None
        with self._progress:
            self._progress.notify_all()


__all__ = [  # the row-making lives in serving.record.rows; re-exported for callers
    "NOT_PARAMS", "PROMPT_FIELDS", "Pending", "Recorder", "SERVICE_TIER", "STORE_FILE", "StoreError", "UNTIERED",
    "answer_of", "redact_text", "redacted_json", "storable", "to_row",
]
