"""The record's redactor: a process of its own that turns the gateway's raw completions into the
rows the store keeps (parse the answer, redact prompt, answer and parameters: `to_row`) and,
when the record's store is a path or URL (as the gateway's always is), writes them there too.

Why a process: redaction is most of the record's CPU (regexes, libphonenumber: 0.05-0.4 ms a
row), and in a thread of the gateway's process it held the GIL the gateway's event loop needs.
On a busy machine every hand-over of the GIL can cost the loop a scheduler slice, and at 32
clients the record cost the gateway a fifth of its throughput (benchmarks/record.py). The
SQLite insert came next (~25 us of CPU a row, a GIL hand-over per row as each step released
it), so the process owns the store's connection too: the writer thread only pickles a batch
down a pipe and waits, the GIL released, for how many rows were written. It runs niced
(record.redactor_nice): on a machine the gateway and its engines keep busy, its CPU would
otherwise come out of theirs (at 32 clients on two cores, ~3 % of throughput and p50).

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
CHILD = "import sys; from serving.record.redactor import serve; serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"
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
    gateway and the engines, and catches up when they leave it some; the buffer absorbs the lag."""

    def __init__(self, store: str | None = None, nice: int = 0) -> None:
        self.store, self.nice = store, nice
        self.process: subprocess.Popen | None = None
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
                [sys.executable, "-c", CHILD, str(theirs_r), str(theirs_w), str(self.nice)],
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

    def _wait_ready(self) -> None:
        assert self.inbox is not None
        if not self.inbox.poll(START_TIMEOUT_S):
            raise EOFError(f"the redactor process was not ready within {START_TIMEOUT_S}s")
        said = self.inbox.recv()
        if said != READY:
            raise EOFError(f"the redactor process began with {said!r}, not {READY!r}")
        self.ready = True

    def handle(self, batch: list[Wire]) -> tuple:
        """(ROWS, the batch's rows (or, per row, why not), CPU seconds) without a store;
        (STORED, rows written, rows dropped, warnings, CPU seconds) with one. Raises
        OSError/EOFError (the process is gone: closed here) for the caller to do it itself."""
        if self.outbox is None or self.inbox is None:
            raise EOFError("the redactor process is not running")
        try:
            if not self.ready:
                self._wait_ready()
            self.outbox.send(batch)
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


def serve(read_fd: int, write_fd: int, nice: int = 0) -> None:
    """The process: its store (or None) first, then batches of wired completions in, their
    rows or what the store made of them out (`Redactor.handle`), until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
