"""Feedback beside the record, on both stores (serving/record/feedback.py, store.py): a repeat
merges into one row and is a new revision only when it changed something; `iter_feedback` joins
each feedback with its completion, the preferred answer and the decision on its current
revision, reads explicit feedback unless asked for signals; forgetting a key and purging by age
take the feedback with the completions."""

from __future__ import annotations

import json
import re

import pytest

from serving.record import Row, key_id, open_store
from serving.record.feedback import EXPLICIT, IMPLICIT, Feedback, FeedbackFilters, Review, feedback_id
from tests.serving.postgres_server import new_database, postgres_url  # noqa: F401  (a module-scoped real PostgreSQL)

T0 = 1_800_000_000.0
ALICE, BOB = key_id("sk-alice"), key_id("sk-bob")


def completion(i: int, **changes) -> Row:
    base = dict(
        id=f"chatcmpl-{i:04d}", ts=T0 + i, key_id=ALICE if i % 2 else BOB, tier="gold", model="m", version="1" if i < 3 else "2", replica="v1-r0",
        endpoint="chat", prompt=json.dumps([{"role": "user", "content": f"reverse {i % 3} 2 3"}]), answer=f"3 2 {i}", params="{}",
        finish_reason="stop", prompt_tokens=5, completion_tokens=3, latency_s=0.01, cache_hit=False, status=200, stream=False,
    )
    return Row(**{**base, **changes})


def given(cid: str, who: str | None = ALICE, at: float = T0 + 100, **fields) -> Feedback:
    kind = IMPLICIT if fields.get("signal") else EXPLICIT
    base = dict(
        id=feedback_id(cid, who, kind, fields.get("signal")), completion_id=cid, key_id=who, tier="gold", kind=kind, signal=None, rating=None, scale=None,
        correction=None, preferred=None, reason=None, tags=None, created=at, updated=at, revision=1,
    )
    return Feedback(**{**base, **fields})


def rows_in(store, table: str) -> int:
    """Rows a table holds, joined to nothing: what iter_feedback's join would hide."""
    with store._transaction() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cur.fetchone()[0])


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path / "record.sqlite3")
    else:
        s = open_store(new_database(request.getfixturevalue("postgres_url"), re.sub(r"\W", "_", request.node.name).lower()[:60]))
    with s:
        s.write_batch([completion(i) for i in range(6)])
        yield s


def test_a_repeat_lands_on_the_same_row_and_is_a_revision_only_when_it_changed_something(store):
    """Seen red: with put_feedback inserting every time (no merge), the repeat raised an
    IntegrityError on the primary key in both stores."""
    first, created = store.put_feedback(given("chatcmpl-0001", rating=-1, scale="thumbs", reason="wrong"))
    assert created and first.revision == 1
    same, created = store.put_feedback(given("chatcmpl-0001", at=T0 + 200, rating=-1, scale="thumbs"))
    assert not created and same == first, "nothing changed: same revision, same row"
    later, created = store.put_feedback(given("chatcmpl-0001", at=T0 + 300, correction="3 2 1"))
    assert not created and later.id == first.id and later.revision == 2
    assert (later.rating, later.reason, later.correction, later.created, later.updated) == (-1, "wrong", "3 2 1", T0 + 100, T0 + 300), "what a repeat leaves out is kept"
    (item,) = store.iter_feedback()
    assert item.feedback == later and item.completion.id == "chatcmpl-0001" and item.completion.answer == "3 2 1"


def test_iter_feedback_joins_completion_preference_and_the_decision_on_the_current_revision(store):
    """Seen red: with the reviews joined on feedback_id alone (not the revision), an edit made
    after a decision still read as decided, and `reviewed=False` missed it."""
    store.put_feedback(given("chatcmpl-0001", rating=1, scale="thumbs"))
    store.put_feedback(given("chatcmpl-0000", who=BOB, at=T0 + 101, correction="3 2 0", preferred="chatcmpl-0003"))
    store.put_feedback(given("chatcmpl-0003", signal="copied"))
    store.put_feedback(given("chatcmpl-0005", at=T0 + 102, rating=-1, scale="thumbs", tags=json.dumps(["order"])))
    items = list(store.iter_feedback())
    assert [i.completion.id for i in items] == ["chatcmpl-0001", "chatcmpl-0000", "chatcmpl-0005"], "explicit only by default, oldest first: a signal is not a label"
    assert items[1].preferred_answer == "3 2 3" and items[0].preferred_answer is None and items[2].feedback.tag_list == ["order"]
    assert [i.feedback.signal for i in store.iter_feedback(FeedbackFilters(kind=IMPLICIT))] == ["copied"]
    assert [i.completion.id for i in store.iter_feedback(FeedbackFilters(version="2"))] == ["chatcmpl-0005"]

    edited = feedback_id("chatcmpl-0000", BOB, EXPLICIT)
    store.put_reviews([
        Review(items[0].feedback.id, 1, "accepted", None, "ann", T0 + 500, "run-1"),
        Review(edited, 1, "edited", "3 2 0 (checked)", "ann", T0 + 500, "run-1"),
    ])
    decided = {i.completion.id: i for i in store.iter_feedback(FeedbackFilters(reviewed=True))}
    assert set(decided) == {"chatcmpl-0001", "chatcmpl-0000"}
    assert decided["chatcmpl-0000"].correction == "3 2 0 (checked)", "the reviewer's edit is the label"
    assert (decided["chatcmpl-0001"].review.reviewer, decided["chatcmpl-0001"].review.decided) == ("ann", T0 + 500)
    assert [i.completion.id for i in store.iter_feedback(FeedbackFilters(decision="accepted"))] == ["chatcmpl-0001"]

    store.put_feedback(given("chatcmpl-0000", who=BOB, at=T0 + 600, correction="3 2 0 !"))  # the user changed it after the decision
    assert {i.completion.id for i in store.iter_feedback(FeedbackFilters(reviewed=False))} == {"chatcmpl-0000", "chatcmpl-0005"}
    store.put_reviews([Review(edited, 2, "rejected", None, "bo", T0 + 700)])
    assert store.count_feedback_by("decision") == {"accepted": 1, "rejected": 1, None: 2}
    assert store.count_feedback_by("kind") == {"explicit": 3, "implicit": 1}
    assert store.count_feedback_by("version", FeedbackFilters()) == {"1": 2, "2": 1}
    with pytest.raises(ValueError, match="cannot count feedback by 'nope'"):
        store.count_feedback_by("nope")


def test_forgetting_a_key_and_purging_by_age_take_the_feedback_with_them(store):
    """Seen red: without the ORPHANS deletes, feedback on a forgotten key's completions stayed
    in the table with its review (2 feedback rows where 1 should be; 1 review)."""
    store.put_feedback(given("chatcmpl-0000", who=BOB, rating=1, scale="thumbs"))  # BOB on his own
    store.put_feedback(given("chatcmpl-0000", who=ALICE, rating=-1, scale="thumbs"))  # ALICE (a reviewer tier) on BOB's
    store.put_feedback(given("chatcmpl-0001", who=BOB, rating=1, scale="thumbs"))  # BOB on ALICE's
    store.put_feedback(given("chatcmpl-0005", who=ALICE, rating=1, scale="thumbs"))
    store.put_reviews([Review(feedback_id("chatcmpl-0000", ALICE, EXPLICIT), 1, "accepted", None, "ann", T0)])
    assert store.delete_key(BOB) == 3
    assert [(i.completion.id, i.feedback.key_id) for i in store.iter_feedback()] == [("chatcmpl-0005", ALICE)], "BOB's completions' feedback and BOB's own feedback are gone"
    assert (rows_in(store, "feedback"), rows_in(store, "reviews")) == (1, 0), "and the review of it"
    assert store.purge_older_than(T0 + 6) == 3
    assert list(store.iter_feedback()) == [] and rows_in(store, "feedback") == 0
