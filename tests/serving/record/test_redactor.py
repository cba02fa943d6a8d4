"""The record's redactor process (serving/record/redactor.py): the writer thread ships batches
there and writes what comes back; a redactor that dies is replaced, one that cannot start is
done without (the writer thread redacts): no row is lost and none is stored unredacted."""

from __future__ import annotations

import os
import signal

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
    recorder = Recorder(path, flush_interval_s=0.05)
    recorder.start()
    try:
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
    finally:
        recorder.close()
    assert recorder._redactor.process is None, "close() reaped the redactor"


def test_without_a_redactor_process_the_writer_thread_redacts(tmp_path, monkeypatch):
    """The redactor process exits before it is ready: the writer thread makes the rows itself.
    Seen red: with `_made` returning the redactor's answer only (no local fallback, the
    EOFError left to the writer), the writer thread died and flush() timed out with 0 rows."""
    monkeypatch.setattr(redactor_module, "CHILD", "import sys; sys.exit(3)")
    path = tmp_path / "record.sqlite3"
    recorder = Recorder(path, flush_interval_s=0.05)
    recorder.start()
    try:
        ids = [submit(recorder, i) for i in range(10)]
        assert recorder.flush(30)
        assert not recorder._redactor.running
        stored_clean(path, ids)
        assert recorder.written._value.get() == 10
    finally:
        recorder.close()


def test_a_sigint_leaves_the_redactor_running(tmp_path):
    """The gateway writes its buffer on a Ctrl-C, through the redactor: which must outlive it.
    Seen red: without serve()'s SIG_IGN for SIGINT, the process was gone (poll() -2) and the
    batch after it was redacted by the writer thread."""
    recorder = Recorder(tmp_path / "record.sqlite3", flush_interval_s=0.05)
    recorder.start()
    try:
        ids = [submit(recorder, 0)]
        assert recorder.flush()  # the redactor is up (its handler set) and has made a row
        process = recorder._redactor.process
        process.send_signal(signal.SIGINT)
        ids += [submit(recorder, i) for i in range(1, 4)]
        assert recorder.flush()
        assert process.poll() is None and recorder._redactor.process is process
        stored_clean(tmp_path / "record.sqlite3", ids)
    finally:
        recorder.close()
