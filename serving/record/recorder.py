"""The record's writer: a bounded buffer between the gateway's requests and the store.

A request only appends to the buffer (`submit`, never blocking, no lock); a thread of its own
takes rows out in batches and ships them to a redactor process (`serving.record.redactor`),
which parses the answers, redacts prompts and answers with the data cleaning's PII rules
(`pipelines.clean.redact`) and writes the rows (`Store.write_batch`): first to one on idle CPU
only (SCHED_IDLE), and when that one is late, gone or not there, to a niced one (counted by who
in `gateway_record_batches_total{by}`). The thread mostly waits,
the GIL released: neither the redaction's CPU nor the store's is spent in the gateway's process
(when the redactor is not there, the thread redacts and writes itself, as it did before the
process existed; a store given as a callable is always written by the thread). A full buffer
drops the row, never the request: counted in `gateway_record_dropped_total{reason="buffer_full"}`; a
batch the store refused is counted with reason "store_error". Written rows are counted in
`gateway_record_written_total`. Rows past `retention_days` are purged every `purge_interval_s`.
`close()` (the gateway's shutdown) writes what is buffered before it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from serving.record.redactor import ROWS, Redactor, rows_of
from serving.record.rows import NOT_PARAMS, PROMPT_FIELDS, Pending, Wire, answer_of, redact_text, redacted_json, storable, to_row, unwire, wire_of
from serving.record.schema import Row, key_id
from serving.record.store import RowWriter, Store, StoreError, open_store, redact_url
from serving.record.tap import Tap

log = logging.getLogger("serving.record")
REDACTOR_RETRY_S = 10  # a redactor process that failed is started again this much later (a dead one at once)
STORE_FILE = "record.sqlite3"  # in the plane's state folder unless record.store names one
SERVICE_TIER, UNTIERED = "service", "untiered"


class Buffer(deque):
    """The bounded buffer: the event loop appends, the writer thread pops from the left. A
    deque's append and popleft are atomic (the GIL), so a request takes no lock and wakes no
    thread, where a `queue.Queue` took a lock and notified a condition on every put and get."""

    def qsize(self) -> int:
        return len(self)

    def empty(self) -> bool:
        return not self


class Recorder:
    """The bounded buffer and its writer thread. `store` is opened on `start()` (in the writer's
    own thread for SQLite's sake, but before `start` returns, so a bad store fails the start).

    `opt_out_keys` are key ids (`serving.record.schema.key_id`), `opt_out_tiers` tier names:
    their completions still get an id, and nothing is kept."""

    def __init__(
        self, store: str | Path | Callable[[], Store], *, buffer_rows: int = 10_000, batch_rows: int = 1024, flush_interval_s: float = 2.0,
        retention_days: float | None = 30, purge_interval_s: float = 3600, opt_out_keys: frozenset[str] | set[str] = frozenset(),
        opt_out_tiers: frozenset[str] | set[str] = frozenset(), redactor_nice: int = 0, redactor_idle: bool = False,
        idle_patience_s: float = 1.0,
    ) -> None:
        self.open_store = store if callable(store) else (lambda: open_store(store))
        self.where = getattr(store, "__name__", str(store)) if callable(store) else redact_url(str(store))
        self.buffer = Buffer()
        self.buffer_rows = buffer_rows
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
        self.batches = Counter("gateway_record_batches", "Batches of completions made rows and written, by who did it: idle (the redactor process on idle CPU only), niced (the niced redactor: the idle one was late, gone or not there) or thread (the writer thread: no redactor process could).", ["by"], registry=None)
        self.buffered.set_function(self.buffer.qsize)
        for by in ("idle", "niced", "thread"):
            self.batches.labels(by)
        self._full = self.dropped.labels("buffer_full")
        self.dropped.labels("store_error")
        # Rows put in the buffer; with _settled, what flush() waits for. Only the event loop's
        # thread submits (the gateway's one loop), so the count needs no lock.
        self._submitted = 0
        self._settled = 0  # rows written or dropped by the writer
        self._progress = threading.Condition()
        self._unwritten: set[str] = set()  # ids of buffered rows: a feedback on one waits for it (wait_written)
        self._idle = False  # the writer waits for a first row: the next submit wakes it (_wake)
        self._wake = threading.Event()
        self._hurry = threading.Event()  # someone waits for the buffer (flush, wait_written, close): no gathering
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: threading.Event = threading.Event()
        self._writer = RowWriter(self.open_store, self.where)  # the thread's own connection: purges, and rows the redactor did not write
        # The writer thread's; restarted after a failure. It owns the store's connection unless
        # the store is a callable (which cannot be sent to another process).
        redactor_store = None if callable(store) else str(store)
        self._redactor = Redactor(redactor_store, nice=redactor_nice)
        self._redactor_retry = 0.0  # monotonic time before which a failed redactor is not restarted
        # First choice when redactor_idle: a redactor that runs on idle CPU only (SCHED_IDLE), so
        # that serving never waits for it. One that has not answered a batch within
        # idle_patience_s, or by the time the buffer is half full (a machine with no idle core),
        # is killed and the batch goes to the niced redactor, started then if it is not running;
        # the idle one is tried again REDACTOR_RETRY_S later.
        self._idle_redactor = Redactor(redactor_store, nice=redactor_nice, idle=True) if redactor_idle else None
        if self._idle_redactor is not None and not self._idle_redactor.idle:
            log.info("record: this OS has no idle scheduling policy; the redactor runs niced (%d) instead", redactor_nice)
            self._idle_redactor = None
        self.idle_patience_s = idle_patience_s
        self._idle_retry = 0.0
        self._start_error: BaseException | None = None

    @classmethod
    def from_params(cls, record, state_dir: Path) -> "Recorder | None":
        """From the `record:` params section; None when it is disabled."""
        if not record.enabled:
            return None
        return cls(
            record.store_url() or Path(state_dir) / STORE_FILE, buffer_rows=record.buffer_rows, batch_rows=record.batch_rows,
            flush_interval_s=record.flush_interval_s, retention_days=record.retention_days, purge_interval_s=record.purge_interval_s,
            opt_out_keys=set(record.opt_out_keys), opt_out_tiers=set(record.opt_out_tiers), redactor_nice=record.redactor_nice,
            redactor_idle=record.redactor_idle, idle_patience_s=record.redactor_idle_patience_s,
        )

    def register(self, registry: CollectorRegistry) -> None:
        """Export the recorder's counters on a gateway's /metrics."""
        for metric in (self.written, self.dropped, self.opted_out, self.buffered, self.cpu, self.batches):
            try:
                registry.register(metric)
            except ValueError:  # already there: the same recorder behind a rebuilt app
                pass

    # --- the request path ---

    def tap(self, path: str, payload: dict | bytes, api_key: str | None, tier: str, model: str, arrived: float | None = None) -> Tap:
        """A completion about to be sent on (`payload`: the request's JSON, parsed or its raw
        bytes; `arrived`: its perf_counter() at the gateway)."""
        kid = key_id(api_key) if api_key else None
        kept = not (kid in self.opt_out_keys or tier in self.opt_out_tiers)
        if not kept:
            self.opted_out.inc()
        tap = Tap(self if kept else None, path, payload, kid, tier, model)
        if arrived is not None:
            tap.started = arrived
        return tap

    def submit(self, tap: Tap, status: int, body: bytes | None, version: str | None, replica: str | None, cache_hit: bool) -> None:
        """Never blocks, takes no lock: a full buffer drops the row (counted)."""
        if len(self.buffer) >= self.buffer_rows:
            self._full.inc()
            return
        self._unwritten.add(tap.id)  # before the writer can see the row, which removes it once written
        self._submitted += 1
        self.buffer.append(wire_of(tap, status, body, version, replica, cache_hit, time.perf_counter() - tap.started))
        if self._idle:
            self._wake.set()
        elif len(self.buffer) == self.batch_rows:  # a full batch: the writer stops gathering (at 5,000 rows/s 2 s would overflow the buffer)
            self._hurry.set()

    # --- the writer ---

    def start(self) -> None:
        """Open the store and start the writer; a store that cannot be opened raises StoreError."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._hurry.clear()
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
            self._writer.opened()  # a store that cannot be opened fails the start
        except BaseException as exc:  # reported by start(), in the caller's thread
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        if self._idle_redactor is None or not self._idle_redactor.start():
            self._start_redactor()  # the niced one starts now only when there is no idle one
        next_purge = time.monotonic()
        try:
            while True:
                batch = self._take()
                if batch:
                    cpu, began = time.thread_time(), time.monotonic()
                    self._write(batch)
                    self.cpu.inc(time.thread_time() - cpu)
                    # No backlog: the next batch gathers for flush_interval_s, unless someone
                    # waits for the buffer (flush, a feedback's wait_written, close) or a batch
                    # fills (submit). Few, full batches: each costs the redactor a fixed share
                    # (its caches cold after the engine ran, the store's commit), and the
                    # gateway a GIL hand-over (at 32 clients, 0.1 s apart cost the redactor
                    # 0.053 ms a row, 0.5 s 0.035-0.053, 2 s 0.039-0.041).
                    # A row that comes after a quiet spell is taken at once.
                    if len(batch) < self.batch_rows and not self._stop.is_set():
                        self._hurry.wait(self.flush_interval_s - (time.monotonic() - began))
                if not self._stop.is_set():  # close() keeps it set: the rest is written without gathering
                    self._hurry.clear()
                if self.retention_s is not None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.purge_interval_s
                    self._purge()
                if self._stop.is_set() and not self.buffer:
                    return
        finally:
            if self._idle_redactor is not None:
                self._idle_redactor.close()
                self._idle_redactor.reap(5)  # one killed for being late exits once it gets a core
            self._redactor.close()
            self._writer.close()

    def _take(self) -> list[Wire]:
        """Up to batch_rows rows: waits flush_interval_s for the first (a submit or close()
        wakes it), then takes what is there."""
        buffer = self.buffer
        if not buffer and not self._stop.is_set():
            self._idle = True
            if not buffer:  # a row appended before the submit saw _idle is not waited for
                self._wake.wait(self.flush_interval_s)
            self._idle = False
            self._wake.clear()
        return [buffer.popleft() for _ in range(min(len(buffer), self.batch_rows))]

    def _start_redactor(self) -> None:
        if not self._redactor.start():
            self._redactor_retry = time.monotonic() + REDACTOR_RETRY_S

    def _idly(self, batch: list[Wire]) -> tuple | None:
        """The idle redactor's answer for the batch; None when it is not there, not ready, or
        late (then killed: the batch is the niced redactor's)."""
        idle = self._idle_redactor
        if idle is None:
            return None
        if not idle.running and time.monotonic() >= self._idle_retry and not idle.start():
            self._idle_retry = time.monotonic() + REDACTOR_RETRY_S
        # Not ready yet (its imports): waited for only when the niced one would have to start.
        if not idle.ready_within(0 if self._redactor.running else self.idle_patience_s):
            if not idle.running:  # it died on the way (closed): not restarted for every batch
                self._idle_retry = time.monotonic() + REDACTOR_RETRY_S
            return None
        try:
            said = idle.handle(batch, timeout_s=self.idle_patience_s, give_up=self._backlogged)
        except (OSError, EOFError) as exc:
            log.warning("record: the idle redactor failed (%s: %s); the niced one takes its batches for %gs", type(exc).__name__, exc, REDACTOR_RETRY_S)
            said = None
        else:
            if said is not None:
                self.batches.labels("idle").inc()
                return said
            log.info("record: the idle redactor did not answer within %gs, or before the buffer was half full (no idle CPU): killed; the niced one takes its batches for %gs", self.idle_patience_s, REDACTOR_RETRY_S)
            idle.abandon()
        self._idle_retry = time.monotonic() + REDACTOR_RETRY_S
        return None

    def _backlogged(self) -> bool:
        """The buffer is half full: waiting longer for a late idle redactor risks dropping rows."""
        return len(self.buffer) >= self.buffer_rows // 2

    def _redacted(self, batch: list[Wire]) -> tuple | None:
        """What a redactor process answered for the batch (`Redactor.handle`): the idle one
        first, then the niced one, restarted if it is gone; None when neither is there (the
        writer thread then does their work)."""
        said = self._idly(batch)
        if said is not None:
            return said
        if not self._redactor.running and time.monotonic() >= self._redactor_retry:
            self._start_redactor()
        if not self._redactor.running:
            return None
        try:
            said = self._redactor.handle(batch)
            self.batches.labels("niced").inc()
            return said
        except (OSError, EOFError) as exc:
            self._redactor_retry = time.monotonic() + REDACTOR_RETRY_S
            log.warning("record: the redactor process failed (%s: %s); the writer thread redacts until it is restarted, in %gs", type(exc).__name__, exc, REDACTOR_RETRY_S)
            return None

    def _write(self, batch: list[Wire]) -> None:
        said = self._redacted(batch)
        if said is not None and said[0] != ROWS:  # the redactor wrote them: (STORED, written, dropped, warnings, cpu)
            _, written, dropped, warnings, cpu = said
        else:
            if said is not None:
                made, cpu = said[1], said[2]
            else:
                made, cpu = [], 0.0
                self.batches.labels("thread").inc()
                for w in batch:
                    time.sleep(0)  # let the event loop have the GIL between rows: it never waits a whole batch
                    made.extend(rows_of([unwire(w)]))
            rows = [r for r in made if isinstance(r, Row)]
            # A bug for one odd request costs its row, never the batch.
            warnings = [f"completion {w[0]} could not be made a row: {r}" for w, r in zip(batch, made) if not isinstance(r, Row)]
            written, dropped, failed = self._writer.write(rows)
            dropped, warnings = dropped + len(warnings), warnings + failed
        self.cpu.inc(cpu)
        for warning in warnings:
            log.warning("record: %s", warning)
        if written:
            self.written.inc(written)
        if dropped:
            self.dropped.labels("store_error").inc(dropped)
        with self._progress:
            self._settled += len(batch)
            self._unwritten.difference_update(w[0] for w in batch)
            self._progress.notify_all()

    def _purge(self) -> None:
        gone, failed = self._writer.purge(time.time() - self.retention_s)
        if failed:
            log.warning("record: purge failed on %s: %s", self.where, failed)
        elif gone:
            log.info("record: purged %d completion(s) older than %g days from %s", gone, self.retention_s / 86400, self.where)

    def flush(self, timeout_s: float = 60) -> bool:
        """Wait until every row submitted so far is written (or dropped); False on timeout."""
        with self._progress:
            target = self._submitted
            self._hurry.set()
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
            if completion_id in self._unwritten:
                self._hurry.set()
            return self._progress.wait_for(lambda: completion_id not in self._unwritten or self._thread is None, timeout_s)

    def close(self, timeout_s: float = 60) -> None:
        """Write what is buffered, then stop the writer."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._hurry.set()
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
