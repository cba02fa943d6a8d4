"""The recorder's writer against a store that fails (serving/record/recorder.py): a row the
store refuses costs only itself, and a store that goes down and comes back loses the rows of
its outage (counted) and none after it."""

from __future__ import annotations

import sqlite3
import time

from serving.record import Recorder, SQLiteStore, open_store
from serving.record.tap import Tap


class FlakyStore(SQLiteStore):
    """The real SQLite store, which refuses any batch holding a row whose prompt has 'refuse',
    and every batch while `down` is set (as a database that restarts)."""

    down = False

    def write_batch(self, rows):
        if FlakyStore.down:
            raise sqlite3.OperationalError("the database is restarting")
        if any("refuse" in r.prompt for r in rows):
            raise sqlite3.IntegrityError("refused")
        super().write_batch(rows)


def submit(recorder: Recorder, text: str) -> str:
    tap = recorder.tap("/v1/completions", {"model": "m", "prompt": text}, None, "untiered", "m")
    body = b'{"id": "x", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}'
    tap.answered(type("Response", (), {"status_code": 200, "body": body, "headers": {"x-gateway-version": "1", "x-gateway-backend": "v1-r0"}})())
    return tap.id


def test_a_refused_row_costs_only_itself_and_an_outage_only_its_own_rows(tmp_path):
    """Seen red: with the one-by-one retry removed (a failed batch dropped whole), the batch
    holding the refused row lost its 4 good rows too (written 0 of them)."""
    path = tmp_path / "record.sqlite3"
    recorder = Recorder(lambda: FlakyStore(path), batch_rows=5, flush_interval_s=0.05)
    recorder.start()
    try:
        FlakyStore.down = False
        good = [submit(recorder, f"fine {i}") for i in range(4)]
        submit(recorder, "refuse me")
        assert recorder.flush()
        assert {r.id for r in open_store(path).query()} == set(good), "the refused row alone is lost"
        assert recorder.dropped.labels("store_error")._value.get() == 1

        FlakyStore.down = True
        for i in range(3):
            submit(recorder, f"during the outage {i}")
        assert recorder.flush()
        FlakyStore.down = False
        after = [submit(recorder, f"after {i}") for i in range(3)]
        assert recorder.flush()
        assert {r.id for r in open_store(path).query()} == set(good) | set(after)
        assert recorder.dropped.labels("store_error")._value.get() == 4 and recorder.written._value.get() == 7
    finally:
        FlakyStore.down = False
        recorder.close()



def gathering(recorder: Recorder) -> None:
    """Leave the writer gathering a batch: a row after a quiet spell is taken at once, and once
    it is written (polled through holds(), which does not hurry the writer) the writer waits its
    interval for more. After a row it was hurried for, it gathers again."""
    row = submit(recorder, "taken at once")
    deadline = time.monotonic() + 30
    while recorder.holds(row):
        assert time.monotonic() < deadline, "the writer did not take a row after a quiet spell"
        time.sleep(0.01)


def test_whoever_waits_for_a_row_does_not_wait_out_the_batch_interval(tmp_path):
    """A batch gathers for flush_interval_s (2 s by default: a few large batches cost the
    redactor less than many small ones), but a flush, a feedback waiting for its completion
    (wait_written) and the gateway's shutdown take the buffered rows at once. Here the interval
    is an hour. Seen red with each of the three not hurrying the writer: flush() and
    wait_written() timed out, and close() left the row unwritten."""
    path = tmp_path / "record.sqlite3"
    recorder = Recorder(lambda: SQLiteStore(path), flush_interval_s=3600)
    recorder.start()
    try:
        gathering(recorder)
        second = submit(recorder, "second")
        assert recorder.flush(30), "flush() waited out the writer's interval"
        third = submit(recorder, "third")
        assert recorder.wait_written(third, 30), "a feedback's wait for its completion waited out the writer's interval"
        fourth = submit(recorder, "fourth")
    finally:
        recorder.close(30)
    assert {second, third, fourth} <= {r.id for r in open_store(path).query()}, "close() left the gathering batch unwritten"


def test_a_full_batch_is_not_left_gathering(tmp_path):
    """A writer gathering for its interval takes the buffer as soon as it holds a full batch:
    at cache-hit rates (5,000+ rows/s) a 2 s wait overflowed the 10,000-row buffer (51,351 rows
    dropped in `make bench`). Seen red with the full-batch hurry removed: the batch waited the
    hour."""
    path = tmp_path / "record.sqlite3"
    recorder = Recorder(lambda: SQLiteStore(path), flush_interval_s=3600, batch_rows=3)
    recorder.start()
    try:
        gathering(recorder)
        rows = [submit(recorder, f"row {i}") for i in range(3)]
        deadline = time.monotonic() + 30
        while any(recorder.holds(r) for r in rows):  # holds() does not hurry the writer
            assert time.monotonic() < deadline, "a full batch waited out the writer's interval"
            time.sleep(0.01)
    finally:
        recorder.close(30)
