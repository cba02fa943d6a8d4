"""The record's redactor process (serving/record/redactor.py): the writer thread ships batches
there and writes what comes back; a redactor that dies is replaced, one that cannot start is
done without (the writer thread redacts): no row is lost and none is stored unredacted."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

from pipelines.clean import find_pii
from serving.record import Recorder, open_store
from serving.record import redactor as redactor_module

EMAIL, PHONE, CARD = "jane.doe@example.com", "+1 202-555-0143", "4111 1111 1111 1111"


def submit(recorder: Recorder, i: int) -> str:
    payload = {"model": "m", "messages": [{"role": "user", "content": f"{i}: mail {EMAIL}, card {CARD}"}], "temperature": 0, "user": f"call {PHONE}"}
    tap = recorder.tap("/v1/chat/completions", payload, "sk-key-0123456789", "untiered", "m")
    body = f'{{"choices": [{{"index": 0, "message": {{"content": "call {PHONE}"}}, "finish_reason": "stop"}}], "usage": {{"prompt_tokens": 9, "completion_tokens": 4}}}}'.encode()
    tap.answered(type("Response", (), {"status_code": 200, "body": body, "headers": {"x-gateway-version": "1", "x-gateway-backend": "v1-r0"}})())
    return tap.id


@contextmanager
def started(path, **kw):
    """A started Recorder on `path` that flushes every 50 ms, closed on the way out."""
    recorder = Recorder(path, flush_interval_s=0.05, **kw)
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.close()


def stored_clean(path, ids: list[str]) -> None:
    rows = open_store(path).query()
    assert {r.id for r in rows} == set(ids), "one row per completion, none lost"
    for r in rows:
        for text in (r.prompt, r.answer, r.params):
            assert not find_pii(text) and EMAIL not in text and "202-555-0143" not in text and CARD not in text, text
        assert r.completion_tokens == 4 and r.finish_reason == "stop" and "<PHONE>" in r.answer


def test_the_redactor_process_redacts_and_one_killed_is_replaced_without_losing_a_row(tmp_path):
    """Seen red: with `_made` not restarting a redactor that is gone (rows() refused, the writer
    thread redacting every later batch itself), no new redactor process was running after the
    kill (the last assertion)."""
    path = tmp_path / "record.sqlite3"
    with started(path) as recorder:
        ids = [submit(recorder, i) for i in range(20)]
        assert recorder.flush()
        first = recorder._redactor.process
        assert recorder._redactor.running and first.pid != os.getpid()
        assert recorder.cpu._value.get() > 0
        first.kill()
        first.wait(30)
        ids += [submit(recorder, i) for i in range(20, 40)]
        assert recorder.flush()
        stored_clean(path, ids)
        assert recorder.dropped.labels("store_error")._value.get() == 0 and recorder.written._value.get() == 40
        assert recorder._redactor.running and recorder._redactor.process.pid != first.pid, "a new redactor process took over"
    assert recorder._redactor.process is None, "close() reaped the redactor"


def test_without_a_redactor_process_the_writer_thread_redacts(tmp_path, monkeypatch):
    """The redactor process exits before it is ready: the writer thread makes the rows itself.
    Seen red: with `_made` returning the redactor's answer only (no local fallback, the
    EOFError left to the writer), the writer thread died and flush() timed out with 0 rows."""
    monkeypatch.setattr(redactor_module, "CHILD", "import sys; sys.exit(3)")
    path = tmp_path / "record.sqlite3"
    with started(path) as recorder:
        ids = [submit(recorder, i) for i in range(10)]
        assert recorder.flush(30)
        assert not recorder._redactor.running
        stored_clean(path, ids)
        assert recorder.written._value.get() == 10


def test_a_sigint_leaves_the_redactor_running(tmp_path):
    """The gateway writes its buffer on a Ctrl-C, through the redactor: which must outlive it.
    Seen red: without serve()'s SIG_IGN for SIGINT, the process was gone (poll() -2) and the
    batch after it was redacted by the writer thread."""
    with started(tmp_path / "record.sqlite3") as recorder:
        ids = [submit(recorder, 0)]
        assert recorder.flush()  # the redactor is up (its handler set) and has made a row
        process = recorder._redactor.process
        process.send_signal(signal.SIGINT)
        ids += [submit(recorder, i) for i in range(1, 4)]
        assert recorder.flush()
        assert process.poll() is None and recorder._redactor.process is process
        stored_clean(tmp_path / "record.sqlite3", ids)


def test_the_redactor_process_writes_the_rows_itself(tmp_path, monkeypatch):
    """The SQLite insert was ~25 us of the gateway's CPU a row: with a store given by path (as
    the gateway's always is) the redactor process writes the rows, and the writer thread in the
    gateway's process writes none. The path travels down the pipe, not in the argv (`ps` shows
    argv; a PostgreSQL URL can hold a password).
    Seen red: with the Recorder giving the Redactor no store (rows shipped back and written by
    the thread, as before), the thread's RowWriter.write was called: the writer thread died on
    its AssertionError and flush() returned False."""
    from serving.record.store import RowWriter

    def not_here(self, rows):
        raise AssertionError("the gateway's writer thread wrote rows the redactor process should have")

    monkeypatch.setattr(RowWriter, "write", not_here)  # in this process only: the redactor's is its own
    path = tmp_path / "record.sqlite3"
    with started(path) as recorder:
        ids = [submit(recorder, i) for i in range(30)]
        assert recorder.flush()
        assert recorder.written._value.get() == 30 and recorder.dropped.labels("store_error")._value.get() == 0
        assert str(tmp_path) not in " ".join(recorder._redactor.process.args)
        stored_clean(path, ids)


def test_a_batch_written_twice_is_counted_once(tmp_path):
    """A redactor process that dies after its commit and before its answer leaves the writer
    thread to write the same batch again: the rows already there count as written, not dropped
    (the retry row by row finds them), and none is stored twice.
    Seen red: without RowWriter.write's look-up of a refused row, the 5 rows already stored
    were counted dropped (written 1, dropped 5)."""
    from serving.record.rows import Pending, to_row
    from serving.record.store import RowWriter
    from serving.record.tap import Tap

    def row(i: int):
        tap = Tap(None, "/v1/completions", {"model": "m", "prompt": f"p{i}"}, None, "untiered", "m")
        return to_row(Pending(tap, 200, b'{"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}', "1", "v1-r0", False, 0.1))

    path = tmp_path / "record.sqlite3"
    writer = RowWriter(lambda: open_store(path), str(path))
    first = [row(i) for i in range(5)]
    assert writer.write(first) == (5, 0, [])
    written, dropped, warnings = writer.write([*first, row(5)])
    assert (written, dropped) == (6, 0) and len(warnings) == 1, warnings
    assert open_store(path).count() == 6
    writer.close()


def test_the_redactor_yields_the_cpu_to_serving_at_the_niceness_params_give_it(tmp_path):
    """record.redactor_nice (default 10): the redactor process runs below the gateway's priority,
    and still writes every row. Seen red: with serve() ignoring its niceness, the process ran at
    the gateway's own (0 where 10 was asserted)."""
    import psutil

    from pipelines.config import load_params
    from tests.conftest import ROOT

    nice = load_params(ROOT / "params.yaml").record.redactor_nice
    assert nice == 10
    path = tmp_path / "record.sqlite3"
    with started(path, redactor_nice=nice) as recorder:
        ids = [submit(recorder, i) for i in range(10)]
        assert recorder.flush()
        process = psutil.Process(recorder._redactor.process.pid)
        assert process.nice() == psutil.Process().nice() + nice
    stored_clean(path, ids)


def test_the_params_redactor_runs_on_idle_cpu_only_and_makes_every_row(tmp_path):
    """record.redactor_idle (default true): the gateway's recorder (`Recorder.from_params`)
    hands its batches to a redactor at the SCHED_IDLE policy, which never takes a core from
    serving; the niced redactor is not even started while the idle one keeps up.
    Seen red: with serve() ignoring its `idle` argument, the process ran at SCHED_OTHER (0
    where SCHED_IDLE, 5, was asserted)."""
    from pipelines.config import load_params
    from tests.conftest import ROOT

    record = load_params(ROOT / "params.yaml").record
    assert record.redactor_idle is True
    # A patience no busy test machine exceeds: this test is about who makes the rows, not about when.
    record = record.model_copy(update={"redactor_idle_patience_s": 60.0, "flush_interval_s": 0.05, "store": str(tmp_path / "record.sqlite3")})
    recorder = Recorder.from_params(record, tmp_path)
    recorder.start()
    try:
        ready_on_idle_cpu(recorder)
        ids = [submit(recorder, i) for i in range(10)]
        assert recorder.flush()
        idle = recorder._idle_redactor.process
        assert os.sched_getscheduler(idle.pid) == os.SCHED_IDLE
        assert recorder.batches.labels("idle")._value.get() >= 1
        assert recorder.batches.labels("niced")._value.get() == recorder.batches.labels("thread")._value.get() == 0
        assert recorder._redactor.process is None, "the niced redactor is started only when the idle one falls short"
    finally:
        recorder.close()
    stored_clean(tmp_path / "record.sqlite3", ids)
    assert recorder._idle_redactor.process is None, "close() reaped the idle redactor"


def ready_on_idle_cpu(recorder: Recorder, timeout_s: float = 180, policy: int = os.SCHED_IDLE) -> None:
    """Wait until the recorder's idle redactor is running at `policy` and ready (its imports,
    ~0.25 s of CPU, done on idle CPU: on a busy test machine that can take a while). Called
    while no row is buffered, so the writer thread is not using the redactor meanwhile."""
    idle = recorder._idle_redactor
    deadline = time.monotonic() + timeout_s
    while not (idle.running and idle.ready_within(1.0)):
        assert time.monotonic() < deadline, f"the idle redactor was not ready within {timeout_s}s"
        time.sleep(0.05)
    assert os.sched_getscheduler(idle.process.pid) == policy


def test_an_idle_redactor_that_gets_no_cpu_is_killed_and_the_niced_one_writes_its_batch(tmp_path, monkeypatch):
    """A machine with no idle core gives a SCHED_IDLE redactor (next to) nothing: here it is
    stopped outright (SIGSTOP) while it holds a batch. After record.redactor_idle_patience_s
    the writer kills it and the niced redactor writes that batch and the next ones; every row
    is stored once, redacted; REDACTOR_RETRY_S later a new idle redactor takes over again.
    Seen red: with `Redactor.handle` ignoring its timeout (waiting for the answer as the
    niced one does), flush() returned False: the stopped redactor held every row after the first."""
    from serving.record import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "REDACTOR_RETRY_S", 1.0)
    path = tmp_path / "record.sqlite3"
    with started(path, redactor_idle=True, redactor_nice=10, idle_patience_s=60.0) as recorder:
        ready_on_idle_cpu(recorder)
        ids = [submit(recorder, 0)]
        assert recorder.flush()
        assert recorder.batches.labels("idle")._value.get() == 1
        stopped = recorder._idle_redactor.process
        recorder.idle_patience_s = 0.3
        stopped.send_signal(signal.SIGSTOP)
        try:
            ids += [submit(recorder, i) for i in range(1, 21)]
            assert recorder.flush(30), "the rows the stopped redactor held were written by the niced one"
            assert stopped.wait(30) == -signal.SIGKILL, "the late idle redactor was killed, not left holding its batch"
        finally:
            if stopped.poll() is None:
                stopped.kill()
        assert recorder.batches.labels("niced")._value.get() >= 1
        assert os.getpriority(os.PRIO_PROCESS, recorder._redactor.process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10
        stored_clean(path, ids)
        # The retry: REDACTOR_RETRY_S later a batch starts a new idle redactor (the niced one
        # takes the batches until it is ready), which then takes them again.
        recorder.idle_patience_s = 60.0
        time.sleep(1.0)
        ids.append(submit(recorder, len(ids)))
        assert recorder.flush()
        assert recorder._idle_redactor.process is not None and recorder._idle_redactor.process.pid != stopped.pid
        ready_on_idle_cpu(recorder)
        idle_before = recorder.batches.labels("idle")._value.get()
        ids.append(submit(recorder, len(ids)))
        assert recorder.flush()
        assert recorder.batches.labels("idle")._value.get() == idle_before + 1, "the new idle redactor took over"
        assert recorder.written._value.get() == len(ids) and recorder.dropped.labels("store_error")._value.get() == 0
    stored_clean(path, ids)


def test_a_filling_buffer_does_not_wait_out_the_idle_redactors_patience(tmp_path):
    """While a late idle redactor has a batch, the buffer fills; once it is half full the writer
    stops waiting (however long record.redactor_idle_patience_s is) and the niced redactor
    takes over: rows are not dropped for the sake of the idle one.
    Seen red: with `Recorder._backlogged` always False, flush(20) returned False: the writer
    waited out the 60 s patience while the buffer (20 rows) dropped what came after it."""
    path = tmp_path / "record.sqlite3"
    with started(path, buffer_rows=20, redactor_idle=True, redactor_nice=10, idle_patience_s=60.0) as recorder:
        ready_on_idle_cpu(recorder)
        ids = [submit(recorder, 0)]
        assert recorder.flush()
        stopped = recorder._idle_redactor.process
        stopped.send_signal(signal.SIGSTOP)
        try:
            ids.append(submit(recorder, 1))  # the batch the stopped redactor will hold
            time.sleep(0.3)
            ids += [submit(recorder, i) for i in range(2, 14)]  # 12 rows: the buffer (20) more than half full
            assert recorder.flush(20), "the niced redactor took over before the patience ran out"
        finally:
            if stopped.poll() is None:
                stopped.kill()
        assert recorder.dropped.labels("buffer_full")._value.get() == 0
        assert recorder.batches.labels("niced")._value.get() >= 1
    stored_clean(path, ids)


def test_an_idle_policy_the_os_refuses_leaves_the_redactor_niced(tmp_path, monkeypatch):
    """A sandbox may refuse SCHED_IDLE (sched_setscheduler: EPERM): the idle redactor then runs
    at record.redactor_nice, like the other one, and still makes every row; it does not die
    and get restarted every 10 s. Seen red: with serve() letting the OSError out, the process
    exited before it was ready and ready_on_idle_cpu timed out."""
    refuse = "import os, sys; os.sched_setscheduler = lambda *a: (_ for _ in ()).throw(PermissionError(1, 'refused'));"
    monkeypatch.setattr(redactor_module, "CHILD", refuse + redactor_module.CHILD.removeprefix("import sys;"))
    path = tmp_path / "record.sqlite3"
    with started(path, redactor_idle=True, redactor_nice=10, idle_patience_s=60.0) as recorder:
        ready_on_idle_cpu(recorder, 60, policy=os.SCHED_OTHER)
        idle = recorder._idle_redactor
        assert os.getpriority(os.PRIO_PROCESS, idle.process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10
        ids = [submit(recorder, i) for i in range(5)]
        assert recorder.flush()
        assert recorder.batches.labels("idle")._value.get() >= 1
    stored_clean(path, ids)
