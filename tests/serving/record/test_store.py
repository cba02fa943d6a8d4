"""The record's one store interface on both stores (serving/record/store.py): SQLite in a file
and a real PostgreSQL server: write, query by every filter, count, forget a key, purge by age,
and export a window that the prepare stage reads as `openai` rows."""

from __future__ import annotations

import json
import re

import pytest

from pipelines.sources import check_file
from serving.record import Filters, Row, StoreError, key_id, open_store
from serving.record.store import redact_url
from tests.serving.postgres_server import new_database, postgres_url  # noqa: F401  (a module-scoped real PostgreSQL)

T0 = 1_800_000_000.0


def row(i: int, **changes) -> Row:
    base = dict(
        id=f"chatcmpl-{i:04d}", ts=T0 + i, key_id=key_id("sk-a" if i % 2 else "sk-b"), tier="gold" if i % 2 else "free", model="m",
        version="1" if i < 6 else "2", replica="v1-r0", endpoint="chat",
        prompt=json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"reverse {i} 2 3 <EMAIL>"}]),
        answer=f"3 2 {i}", params=json.dumps({"temperature": 0, "max_tokens": 8}), finish_reason="length" if i == 3 else "stop",
        prompt_tokens=7, completion_tokens=3, latency_s=0.01 * i, cache_hit=i == 4, status=200, stream=i == 5,
    )
    return Row(**{**base, **changes})


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path / "record.sqlite3")
    else:
        s = open_store(new_database(request.getfixturevalue("postgres_url"), re.sub(r"\W", "_", request.node.name).lower()[:60]))
    with s:
        yield s


def test_rows_come_back_as_written_and_every_filter_selects(store):
    rows = [row(i) for i in range(10)] + [row(10, endpoint="text", prompt=json.dumps("count to 3"), status=502, answer=None, finish_reason=None)]
    store.write_batch(rows[:4])
    store.write_batch(rows[4:])
    got = store.query()
    assert [r.id for r in got] == [r.id for r in sorted(rows, key=lambda r: -r.ts)], "newest first"
    assert {r.id: r for r in got} == {r.id: r for r in rows}, "every field round-trips, booleans and floats included"
    assert store.count() == 11
    assert {r.id for r in store.query(Filters(version="2"))} == {r.id for r in rows if r.version == "2"}
    assert {r.id for r in store.query(Filters(key_id=key_id("sk-a")))} == {r.id for r in rows if r.ts % 2}
    assert [r.id for r in store.query(Filters(finish_reason="length"))] == ["chatcmpl-0003"]
    assert {r.id for r in store.query(Filters(since=T0 + 2, until=T0 + 5))} == {"chatcmpl-0002", "chatcmpl-0003", "chatcmpl-0004"}, "since inclusive, until exclusive"
    assert [r.id for r in store.query(Filters(tier="free", limit=2))] == ["chatcmpl-0010", "chatcmpl-0008"]
    assert store.counts_by("version") == {"1": 6, "2": 5}
    assert store.counts_by("status", Filters(version="2")) == {200: 4, 502: 1}
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        store.counts_by("nope")


def test_a_key_is_forgotten_and_old_rows_are_purged(store):
    store.write_batch([row(i) for i in range(10)])
    assert store.delete_key(key_id("sk-a")) == 5
    assert store.count(Filters(key_id=key_id("sk-a"))) == 0 and store.count() == 5
    assert store.delete_key(key_id("sk-a")) == 0
    assert store.purge_older_than(T0 + 5) == 3  # rows 0, 2, 4
    assert sorted(r.id for r in store.query()) == ["chatcmpl-0006", "chatcmpl-0008"]


def test_an_exported_window_is_read_by_the_prepare_stage_as_openai_rows(store, tmp_path):
    """Seen red: with the answer left out of the exported messages (the prompt alone), prepare
    read every row as SFT whose last turn is the user's: check_file still counted them, so the
    test also checks the assistant turn and provenance field by field."""
    store.write_batch([row(i) for i in range(10)] + [row(10, status=500, answer=None), row(12, ts=T0 + 9.5, stream=True, finish_reason="aborted", answer="3 2")])
    text = row(11, endpoint="text", prompt=json.dumps("Reverse the list: 1 2"), answer="2 1", version="2")
    store.write_batch([text])
    path = tmp_path / "export" / "traffic.jsonl"
    n = store.export(path, Filters(version="2", since=T0 + 7))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(lines) == 4, "rows 7, 8, 9 and the text completion; the failed one and the stream cut short are not data"
    chat = next(line for line in lines if line["completion_id"] == "chatcmpl-0008")
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse 8 2 3 <EMAIL>"}, {"role": "assistant", "content": "3 2 8"}]
    assert (chat["version"], chat["tier"], chat["model"], chat["finish_reason"]) == ("2", "free", "m", "stop")
    assert "key_id" not in chat, "an exported file is training data: no key ids in it"
    plain = next(line for line in lines if line["completion_id"] == "chatcmpl-0011")
    assert plain["messages"] == [{"role": "user", "content": "Reverse the list: 1 2"}, {"role": "assistant", "content": "2 1"}]
    assert check_file(path, "openai") == {"sft": 4}, "the prepare stage's own reader and normaliser take every row"


def test_bad_store_addresses_name_the_fix(tmp_path):
    with pytest.raises(StoreError, match="use a file path .SQLite., sqlite:///path, or postgresql://"):
        open_store("mysql://u@h/db")
    with pytest.raises(StoreError, match=r"cannot connect to the record's PostgreSQL at postgresql://u:\*\*\*@127.0.0.1:1/db"):
        open_store("postgresql://u:secret@127.0.0.1:1/db")
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert open_store(f"sqlite:///{tmp_path / 'r.sqlite3'}").count() == 0


def test_what_a_byte_level_model_answers_is_stored_by_both(store):
    """A tiny byte-level model answers NUL and lone surrogates (JSON \\u escapes): PostgreSQL
    refuses NUL in text and psycopg cannot encode a surrogate, so the recorder replaces them
    (in every store alike). Seen red: without `storable` on the answer, both stores refused the
    row (UnicodeEncodeError: surrogates not allowed). PostgreSQL's refusal of NUL (DataError)
    was found by the 32-client plane test, whose record was 22 rows short."""
    from serving.record.recorder import Pending, to_row
    from serving.record.tap import Tap

    tap = Tap(None, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a\x00b"}]}, None, "untiered", "m")
    body = json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "1\x002\ud8003"}, "finish_reason": "stop"}]}).encode()
    store.write_batch([to_row(Pending(tap, 200, body, "1", "v1-r0", False, 0.1))])
    (got,) = store.query()
    assert got.answer == "1\ufffd2?3" and json.loads(got.prompt) == [{"role": "user", "content": "a\x00b"}], "JSON keeps NUL as an escape"
