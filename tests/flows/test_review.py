"""The feedback review (flows/review.py) as a real Prefect flow run against a throwaway Prefect
API: the run pauses with its typed form, the test resumes it through the Prefect client with
the form's input (as the UI's Resume button does), and the decisions land in the record's
`reviews` table with who and when; ratings alone can skip the person."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from prefect import resume_flow_run
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_paused_state
from prefect.testing.utilities import prefect_test_harness

from pipelines.clean import find_pii
from serving.record import open_store
from serving.record.feedback import IMPLICIT, FeedbackFilters
from tests.conftest import ROOT
from tests.serving.record.test_feedback import completion, given

EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def project(tmp_path, monkeypatch, **review) -> str:
    """A project folder whose params point the record at a SQLite file holding 4 completions and
    feedback on them: a rating alone, a correction, a preferred answer, and a signal."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = str(tmp_path / "record.sqlite3")
    params["record"]["store"] = path
    params["review"].update(poll_interval_s=1, timeout_s=300, **review)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFECYCLE_RECORD_URL", raising=False)
    with open_store(path) as store:
        store.write_batch([completion(i) for i in range(4)])
        store.put_feedback(given("chatcmpl-0001", at=1, rating=1, scale="thumbs"))
        store.put_feedback(given("chatcmpl-0002", at=2, rating=-1, scale="thumbs", correction="3 2 2", reason="reversed wrong"))
        store.put_feedback(given("chatcmpl-0003", at=3, preferred="chatcmpl-0000"))
        store.put_feedback(given("chatcmpl-0002", at=4, signal="regenerated"))
    return path


def run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    from flows.review import review_feedback

    out: dict = {}

    def target():
        try:
            out["counts"] = review_feedback(**kwargs)
        except BaseException as exc:  # shown by the test's assertion
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def paused_run(thread: threading.Thread, out: dict, timeout_s: float = 180):
    """The review's flow run once it is paused (waiting for its form)."""
    deadline = time.monotonic() + timeout_s
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0]
            assert thread.is_alive(), f"the review ended without pausing: {out}"
            time.sleep(0.2)
    raise AssertionError("the review never paused")


def test_a_person_decides_in_the_paused_runs_form_and_each_decision_is_stored_with_who_and_when(tmp_path, monkeypatch):
    """The run pauses with the three explicit items (never the signal) in its description; it is
    resumed with the form's input: bulk accept, one item edited (with PII in the edit), one
    rejected. Each decision is stored for the revision shown, with the reviewer and the time.
    Seen red: with `decide` ignoring all_items (only per-item decisions), the rating-only item
    stayed unreviewed (the counts said undecided 1 where 0 was expected)."""
    path = project(tmp_path, monkeypatch)
    with open_store(path) as store:
        by_completion = {i.completion.id: i.feedback.id for i in store.iter_feedback()}
    thread, out = run_in_thread()
    run = paused_run(thread, out)
    keyset = keyset_from_paused_state(run.state)
    description = read_flow_run_input(keyset["description"], flow_run_id=run.id)
    for cid, fid in by_completion.items():
        assert fid in description
    assert "reversed wrong" in description and "3 2 2" in description and "regenerated" not in description
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run.id)
    assert {"reviewer", "all_items", "items"} <= set(schema["properties"]), "the typed form the UI renders"

    before = time.time()
    resume_flow_run(run.id, run_input={
        "reviewer": "Ann Reviewer",
        "all_items": "accept",
        "items": [
            {"feedback_id": by_completion["chatcmpl-0001"]},
            {"feedback_id": by_completion["chatcmpl-0002"], "decision": "edit", "correction": f"3 2 2, mail {EMAIL}", "note": "typo"},
            {"feedback_id": by_completion["chatcmpl-0003"], "decision": "reject"},
        ],
    })
    thread.join(120)
    assert "error" not in out, out
    assert out["counts"] == {"accepted": 1, "edited": 1, "rejected": 1, "auto_accepted": 0, "undecided": 0, "batch": 3}
    with open_store(path) as store:
        items = {i.completion.id: i for i in store.iter_feedback(FeedbackFilters(reviewed=True))}
        assert not list(store.iter_feedback(FeedbackFilters(kind=IMPLICIT, reviewed=True))), "a signal is never reviewed"
    assert {cid: i.review.decision for cid, i in items.items()} == {"chatcmpl-0001": "accepted", "chatcmpl-0002": "edited", "chatcmpl-0003": "rejected"}
    for item in items.values():
        assert item.review.reviewer == "Ann Reviewer" and before <= item.review.decided <= time.time() and item.review.flow_run_id == str(run.id)
        assert item.review.revision == item.feedback.revision == 1
    assert items["chatcmpl-0002"].correction == "3 2 2, mail <EMAIL>" and find_pii(items["chatcmpl-0002"].correction) == [], "the edit is the label, redacted"
    assert items["chatcmpl-0002"].review.note == "typo"


def test_ratings_alone_skip_the_person_and_undecided_items_wait_for_the_next_review(tmp_path, monkeypatch):
    """With review.auto_accept_ratings the rating-only item is accepted by 'auto' and left out of
    the form; an item the reviewer leaves without a decision (and no bulk one) stays unreviewed.
    Seen red: with `rating_only` true for any rated item, the rated correction was auto-accepted
    too and never reached the form (the description said 1 item to review, not 2)."""
    path = project(tmp_path, monkeypatch, auto_accept_ratings=True)
    thread, out = run_in_thread()
    run = paused_run(thread, out)
    keyset = keyset_from_paused_state(run.state)
    description = read_flow_run_input(keyset["description"], flow_run_id=run.id)
    assert "2 feedback item(s) to review" in description, description
    with open_store(path) as store:
        shown = [i.feedback.id for i in store.iter_feedback() if i.completion.id in ("chatcmpl-0002", "chatcmpl-0003")]
    resume_flow_run(run.id, run_input={"reviewer": "bo", "items": [{"feedback_id": shown[0], "decision": "reject"}, {"feedback_id": shown[1]}]})
    thread.join(120)
    assert "error" not in out, out
    assert out["counts"] == {"accepted": 1, "edited": 0, "rejected": 1, "auto_accepted": 1, "undecided": 1, "batch": 3}
    with open_store(path) as store:
        decided = {i.completion.id: (i.review.decision, i.review.reviewer) for i in store.iter_feedback(FeedbackFilters(reviewed=True))}
        waiting = [i.completion.id for i in store.iter_feedback(FeedbackFilters(reviewed=False))]
    assert decided == {"chatcmpl-0001": ("accepted", "auto (review.auto_accept_ratings)"), "chatcmpl-0002": ("rejected", "bo")}
    assert waiting == ["chatcmpl-0003"]


def test_a_store_url_with_a_password_is_refused_before_it_becomes_a_flow_parameter(capsys):
    """Flow parameters are stored with the run in Prefect and argv shows in `ps`: a password in
    --store is refused, naming where it goes instead, and the message shows the URL redacted.
    Seen red: without the check in main -> no SystemExit: a flow run started with the URL as
    its parameter, and only the flow's own check stopped it (ValueError, "... holds a password")."""
    from flows.review import main

    with pytest.raises(SystemExit) as refused:
        main(["--store", "postgresql://reviewer:hunter2-PLANTED@db.invalid:5432/records"])
    said = str(refused.value.code)
    assert "LIFECYCLE_RECORD_URL" in said and "postgresql://reviewer:***@db.invalid:5432/records" in said
    assert "hunter2-PLANTED" not in said + capsys.readouterr().out
