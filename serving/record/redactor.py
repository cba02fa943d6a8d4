"""The record's redactor: a process of its own that turns the gateway's raw completions into the
rows the store keeps (parse the answer, redact prompt, answer and parameters: `to_row`) and,
when the record's store is a path or URL (as the gateway's always is), writes them there too.

Why a process: redaction is most of the record's CPU (regexes, libphonenumber: 0.05-0.4 ms a
row), and in a thread of the gateway's process it held the GIL the gateway's event loop needs.
On a busy machine every hand-over of the GIL can cost the loop a scheduler slice, and at 32
clients the record cost the gateway a fifth of its throughput (benchmarks/record.py). The
SQLite insert came next (~25 us of CPU a row, a GIL hand-over per row as each step released
it), so the process owns the store's connection too: the writer thread only pickles a batch
down a pipe and waits, the GIL released, for how many rows were written. On a machine the
gateway and its engines keep busy, its CPU would otherwise come out of theirs: niced
(record.redactor_nice), it still cost ~2.5 % of throughput and p50 at 32 clients on two cores,
because an engine computing on both cores loses more than the redactor's own time whenever the
redactor holds one. So the first redactor runs at Linux's SCHED_IDLE policy
(record.redactor_idle): only on a core nothing else wants, preempted the moment serving wakes.
One that is late with a batch (record.redactor_idle_patience_s: a machine with no idle core) is
killed (`abandon`) and a niced one takes the batch; the store keeps a row it already has once.

The writer thread (`serving.record.recorder`) calls `Redactor.handle(batch)`. A redactor that
cannot be started, dies or answers nonsense is replaced at the next batch; the batch in hand is
redacted and written by the writer thread itself, as before: a row is never lost, nor stored
unredacted, for want of the process. A store given as a callable (tests' failing stores) stays
in the writer thread: the process then only makes the rows (`("rows", ...)`). The process exits
when its pipe closes (the recorder's `close()`, or the gateway's death), and ignores SIGINT: a
Ctrl-C stops the gateway, which writes its buffer (through this process) before it closes the
pipe.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from serving.record.rows import Pending, Wire, to_row, unwire
from serving.record.schema import Row
from serving.record.store import RowWriter, open_store, redact_url

log = logging.getLogger("serving.record")
START_TIMEOUT_S = 60  # the child imports the redaction (and libphonenumber's metadata) before it answers
PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY = "ready"
# Not `-m serving.record.redactor`: the package imports this module before runpy would run it.
CHILD = "import sys; from serving.record.redactor import serve; serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == 'idle')"
# SCHED_IDLE (Linux): the process runs only on a core no other task wants, and any other task
# that wakes takes the core from it at once. None where the OS has no such policy (macOS).
IDLE_POLICY: int | None = getattr(os, "SCHED_IDLE", None)
POLL_S = 0.05  # how often a wait with a timeout asks its give_up()
ROWS, STORED = "rows", "stored"  # what a batch's answer holds: the rows, or what became of them in the store


def rows_of(batch: list[Pending]) -> list[Row | str]:
    """Each completion's row, or why it could not be made one (a bug for one odd request
    costs its row, never the batch)."""
    out: list[Row | str] = []
    for p in batch:
        try:
            out.append(to_row(p))
        except Exception as exc:  # noqa: BLE001 - reported per row by the writer
            out.append(f"{type(exc).__name__}: {exc}")
    return out


class Redactor:
    """The redactor process, seen from the writer thread (one thread uses it). `store`: where
    the process writes the rows itself (a path or URL, sent down the pipe, never in its argv: a
    PostgreSQL URL may hold a password); None: it answers with the rows. `nice`: the process's
    scheduling niceness (record.redactor_nice): on a busy machine it yields the CPU to the
    gateway and the engines, and catches up when they leave it some; the buffer absorbs the lag.
    `idle` (record.redactor_idle, where the OS has SCHED_IDLE): it runs on idle CPU only (at
    `nice` if the policy is refused); the writer gives it a batch with a timeout, and
    `abandon()`s it when it is late."""

    def __init__(self, store: str | None = None, nice: int = 0, idle: bool = False) -> None:
        self.store, self.nice, self.idle = store, nice, idle and IDLE_POLICY is not None
        self.process: subprocess.Popen | None = None
        self.abandoned: list[subprocess.Popen] = []  # killed and not yet reaped (abandon())
        self.inbox: Connection | None = None  # what the process answers
        self.outbox: Connection | None = None  # what it is sent
        self.ready = False  # it said READY: its imports and warm-up are done

    def start(self) -> bool:
        """Start the process, not waiting for it (the first `rows` does); False (logged) when it
        cannot be started."""
        self.close()
        ours_r, theirs_w = os.pipe()
        theirs_r, ours_w = os.pipe()
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(theirs_r), str(theirs_w), str(self.nice), "idle" if self.idle else "normal"],
                pass_fds=(theirs_r, theirs_w), stdin=subprocess.DEVNULL, env=env, cwd=PROJECT_ROOT,
            )
        except OSError as exc:
            for fd in (ours_r, ours_w):
                os.close(fd)
            log.warning("record: the redactor process could not start (%s); the writer thread redacts instead", exc)
            return False
        finally:
            os.close(theirs_r)
            os.close(theirs_w)
        self.inbox, self.outbox = Connection(ours_r, writable=False), Connection(ours_w, readable=False)
        try:
            self.outbox.send(self.store)  # the pipe holds it until the process reads it
        except OSError as exc:
            log.warning("record: the redactor process could not be told its store (%s); the writer thread redacts instead", exc)
            self.close()
            return False
        return True

    def _wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Whether it said READY within `timeout_s` (False: not yet); EOFError when it said
        something else or is gone."""
        assert self.inbox is not None
        if not self.ready:
            if not self.inbox.poll(timeout_s):
                return False
            said = self.inbox.recv()
            if said != READY:
                raise EOFError(f"the redactor process began with {said!r}, not {READY!r}")
            self.ready = True
        return True

    def ready_within(self, timeout_s: float) -> bool:
        """Whether the process is ready for a batch (its imports done), waiting at most
        `timeout_s` for it; False (closed when gone) otherwise."""
        if not self.running or self.inbox is None:
            return False
        try:
            return self._wait_ready(timeout_s)
        except (OSError, EOFError):
            self.close()
            return False

    def _answered_within(self, timeout_s: float, give_up: Callable[[], bool] | None) -> bool:
        assert self.inbox is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if self.inbox.poll(max(0.0, min(left, POLL_S))):
                return True
            if left <= POLL_S or (give_up is not None and give_up()):
                return False

    def handle(self, batch: list[Wire], timeout_s: float | None = None, give_up: Callable[[], bool] | None = None) -> tuple | None:
        """(ROWS, the batch's rows (or, per row, why not), CPU seconds) without a store;
        (STORED, rows written, rows dropped, warnings, CPU seconds) with one. Raises
        OSError/EOFError (the process is gone: closed here) for the caller to do it itself.
        With `timeout_s`: None when it has not answered by then, or before then as soon as
        `give_up()` (asked every POLL_S) is true; it still holds the batch and may yet write
        it, so the caller must `abandon()` it before the batch goes elsewhere."""
        if self.outbox is None or self.inbox is None:
            raise EOFError("the redactor process is not running")
        try:
            if not self._wait_ready():
                raise EOFError(f"the redactor process was not ready within {START_TIMEOUT_S}s")
            self.outbox.send(batch)
            if timeout_s is not None and not self._answered_within(timeout_s, give_up):
                return None
            said = self.inbox.recv()
        except (OSError, EOFError):
            self.close()
            raise
        if said[0] == ROWS and len(said) == 3 and len(said[1]) == len(batch):
            return said
        if said[0] == STORED and len(said) == 5 and said[1] + said[2] == len(batch):
            return said
        self.close()
        raise EOFError(f"the redactor answered {str(said)[:200]} for {len(batch)} completion(s)")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.outbox is not None

    def abandon(self) -> None:
        """Kill the process now, not waiting for it (an idle one may take a while to be given
        the core it needs to exit): reaped by a later `start`, `close` or `reap`. A batch it was
        writing is rolled back by the store, or was committed (a second write of it is counted
        once: `RowWriter.write`)."""
        if self.process is not None:
            self.process.kill()  # Popen's: nothing to do for a process that already exited
            self.abandoned.append(self.process)
            self.process = None
        self.close()

    def reap(self, wait_s: float = 0) -> None:
        """Reap the processes `abandon` killed, waiting at most `wait_s` for each."""
        for process in list(self.abandoned):
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            self.abandoned.remove(process)

    def close(self) -> None:
        """Close the pipe (the process exits on it) and reap the process."""
        for conn in (self.outbox, self.inbox):
            if conn is not None:
                conn.close()
        self.inbox = self.outbox = None
        self.ready = False
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self.reap()


def serve(read_fd: int, write_fd: int, nice: int = 0, idle: bool = False) -> None:
    """The process: its store (or None) first, then batches of wired completions in, their
    rows or what the store made of them out (`Redactor.handle`), until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if idle and IDLE_POLICY is not None:
        try:
            os.sched_setscheduler(0, IDLE_POLICY, os.sched_param(0))
            nice = 0
        except OSError as exc:  # a sandbox that refuses it: run niced, as the other redactor does
            print(f"record: the redactor could not take the idle scheduling policy ({exc}); it runs at nice {nice}", file=sys.stderr, flush=True)
    if nice:
        os.nice(nice)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        store: str | None = inbox.recv()
    except (EOFError, OSError):
        return
    rows_of([unwire(w) for w in WARM_UP])  # load libphonenumber's metadata before the first real batch
    writer = None if store is None else RowWriter(lambda: open_store(store), redact_url(store))
    outbox.send(READY)
    try:
        while True:
            try:
                batch: list[Wire] = inbox.recv()
            except (EOFError, OSError):
                return
            cpu = time.process_time()
            made = rows_of([unwire(w) for w in batch])
            if writer is None:
                outbox.send((ROWS, made, time.process_time() - cpu))
                continue
            rows = [r for r in made if isinstance(r, Row)]
            warnings = [f"completion {w[0]} could not be made a row: {r}" for w, r in zip(batch, made) if not isinstance(r, Row)]
            written, dropped, failed = writer.write(rows)
            outbox.send((STORED, written, dropped + len(warnings), warnings + failed, time.process_time() - cpu))
    finally:
        if writer is not None:
            writer.discard()


# One completion with a phone number, an e-mail address and a card number.
WARM_UP: list[Wire] = [
    ("chatcmpl-warm-up", 0.0, True, {"messages": [{"role": "user", "content": "call +1 202-555-0143, mail a@example.com, card 4111 1111 1111 1111"}]},
     None, "untiered", "m", None, None, None, 200, b'{"choices": [{"message": {"content": "020 7946 0958"}, "finish_reason": "stop"}]}', "1", "r", False, 0.0),
]
