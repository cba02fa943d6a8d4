"""The record's redactor process (serving/record/redactor.py): the writer thread ships batches
there and writes what comes back; a redactor that dies is replaced, one that cannot start is
done without (the writer thread redacts): no row is lost and none is stored unredacted."""

from __future__ import annotations

import os
import signal
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
