"""The feedback export (pipelines/feedback_export.py): reviewed feedback written through the real
record store (SQLite) becomes pairs, KTO and SFT rows with their provenance, split by prompt
(so never a completion on both sides), redacted, byte-identical on a rerun, read by the real
`prepare` as a declared source; and the trigger policy, a pure function."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from pipelines import feedback_export as fe
from pipelines import generate, prepare
from pipelines.clean import normal_form
from pipelines.data_config import DataParams, FeedbackLoopParams, SourceParams
from serving.record import Row, key_id, open_store
from serving.record.feedback import EXPLICIT, IMPLICIT, Feedback, Review, feedback_id
from tests.conftest import build_workspace, tiny_params

T0 = 1_800_000_000.0
ALICE = key_id("sk-alice")
SOURCES = DataParams(sources=[
    SourceParams(name="demo", path="data/generated"),
    SourceParams(name="feedback", path="data/feedback/train/*.jsonl", split="train", required=False),
    SourceParams(name="feedback_test", path="data/feedback/test/*.jsonl", split="test", required=False),
])


def completion(i: int, prompt: str | None = None, answer: str | None = None, version: str = "3") -> Row:
    return Row(
        id=f"chatcmpl-{i:04d}", ts=T0 + i, key_id=ALICE, tier="gold", model="m", version=version, replica="v3-r0", endpoint="chat",
        prompt=json.dumps([{"role": "user", "content": prompt or f"reverse the list {i} {i + 1} {i + 2} {i + 7}"}]),
        answer=answer if answer is not None else f"{i + 2} {i + 1} {i}", params="{}", finish_reason="stop", prompt_tokens=5, completion_tokens=3,
        latency_s=0.01, cache_hit=False, status=200, stream=False,
    )


def given(cid: str, at: float = T0 + 100, **fields) -> Feedback:
    kind = IMPLICIT if fields.get("signal") else EXPLICIT
    base = dict(id=feedback_id(cid, ALICE, kind, fields.get("signal")), completion_id=cid, key_id=ALICE, tier="gold", kind=kind, signal=None, rating=None,
                scale=None, correction=None, preferred=None, reason=None, tags=None, created=at, updated=at, revision=1)
    return Feedback(**{**base, **fields})


def decided(cid: str, decision: str = "accepted", correction: str | None = None, at: float = T0 + 500) -> Review:
    return Review(feedback_id(cid, ALICE, EXPLICIT), 1, decision, correction, "ann", at, "run-1")


def params(**loop):
    return tiny_params(data=SOURCES, feedback_loop=FeedbackLoopParams(**{"test_fraction": 0.0, **loop}))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store(tmp_path / "record.sqlite3") as s:
        yield s


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_accepted_and_edited_feedback_become_pairs_kto_and_sft_rows_with_provenance(store):
    """Seen red: with `build` taking rejected decisions as labels (the `rejected` check removed),
    the rejected correction became a fourth pair (4 != 3) and `skipped` lost its 'rejected' entry."""
    store.write_batch([completion(i) for i in range(10)])
    store.put_feedback(given("chatcmpl-0001", correction="8 3 2 1", rating=-1, scale="thumbs", reason="wrong order"))
    store.put_feedback(given("chatcmpl-0002", correction="9 4 3 2"))  # the reviewer edits it
    store.put_feedback(given("chatcmpl-0003", preferred="chatcmpl-0004"))
    store.put_feedback(given("chatcmpl-0005", correction="not this one"))  # rejected
    store.put_feedback(given("chatcmpl-0006", correction="never reviewed"))
    store.put_feedback(given("chatcmpl-0007", signal="regenerated"))  # implicit: never a label
    store.put_feedback(given("chatcmpl-0008", rating=3, scale="stars"))
    store.put_feedback(given("chatcmpl-0009", rating=5, scale="stars"))
    store.put_reviews([decided("chatcmpl-0001"), decided("chatcmpl-0002", "edited", "4 3 2 (checked)"), decided("chatcmpl-0003"),
                       decided("chatcmpl-0005", "rejected"), decided("chatcmpl-0008"), decided("chatcmpl-0009")])

    report = fe.export(params(sft_rows=True), store)

    pairs = read("data/feedback/train/preference.jsonl")
    assert [p["feedback_id"] for p in pairs] == sorted(p["feedback_id"] for p in pairs), "sorted: the same feedback, the same bytes"
    by_id = {p["completion_id"]: p for p in pairs}
    assert set(by_id) == {"chatcmpl-0001", "chatcmpl-0002", "chatcmpl-0003"}, "rejected, unreviewed and implicit feedback make no pair"
    assert by_id["chatcmpl-0002"]["chosen"][0]["content"] == "4 3 2 (checked)", "the reviewer's edit is the label"
    assert by_id["chatcmpl-0003"]["chosen"][0]["content"] == completion(4).answer and by_id["chatcmpl-0003"]["preferred_completion_id"] == "chatcmpl-0004"
    assert all(p["rejected"][0]["content"] == completion(int(p["completion_id"][-4:])).answer for p in pairs), "rejected = the served answer"
    one = by_id["chatcmpl-0001"]
    assert one["prompt"] == [{"role": "user", "content": "reverse the list 1 2 3 8"}]
    assert {k: one[k] for k in ("feedback_id", "completion_id", "version", "tier", "decision", "reviewer")} == {
        "feedback_id": feedback_id("chatcmpl-0001", ALICE, EXPLICIT), "completion_id": "chatcmpl-0001", "version": "3", "tier": "gold", "decision": "accepted", "reviewer": "ann"}
    assert by_id["chatcmpl-0002"]["decision"] == "edited" and "key_id" not in one

    kto = read("data/feedback/train/kto.jsonl")
    assert sorted((k["completion_id"], k["label"]) for k in kto) == [("chatcmpl-0001", False), ("chatcmpl-0009", True)], "thumbs by sign, 5 stars good, 3 stars skipped"
    sft = read("data/feedback/train/sft.jsonl")
    assert sorted(s["messages"][-1]["content"] for s in sft) == ["4 3 2 (checked)", "8 3 2 1"], "a correction is also an SFT row with sft_rows"
    assert report["skipped"] == {"neutral_rating": 1, "rejected": 1, "unreviewed": 1} and report["implicit_signals_ignored"] == 1
    assert (report["pairs"], report["kto_rows"], report["sft_rows"], report["feedback_used"]) == (3, 2, 2, 4)
    assert json.loads(open("metrics/feedback_export.json").read())["pairs"] == 3

    fe.export(params(sft_rows=False), store)
    assert not os.path.exists("data/feedback/train/sft.jsonl"), "no SFT rows unless params say so (and no stale file left)"


def test_held_out_rows_are_split_by_prompt_never_a_completion_on_both_sides_and_keep_their_side(store):
    """Seen red: with `held_out` hashing a random value per row instead of the prompt, a
    completion's pair and KTO row landed on different sides (the one-side check failed)."""
    rows = [completion(i) for i in range(40)] + [completion(100 + i, prompt=f"reverse the list {i} {i + 1} {i + 2} {i + 7}") for i in range(10)]  # second completions of the same prompts
    store.write_batch(rows)
    for r in rows:
        store.put_feedback(given(r.id, correction="9 9 9", rating=-1, scale="thumbs"))
    store.put_reviews([decided(r.id) for r in rows])
    cfg = params(test_fraction=0.3)
    fe.export(cfg, store)
    side = {}
    for split in ("train", "test"):
        for table in ("preference", "kto"):
            for row in read(f"data/feedback/{split}/{table}.jsonl"):
                side.setdefault(row["completion_id"], set()).add(split)
                side.setdefault(normal_form(row["prompt"][0]["content"]), set()).add(split)
    assert all(len(s) == 1 for s in side.values()), "a completion (and a prompt) is on one side only"
    held = {k for k, s in side.items() if k.startswith("chatcmpl-") and s == {"test"}}
    assert 5 <= len(held) <= 30, f"about 30 % of prompts held out, got {len(held)} of 50"

    store.write_batch([completion(200 + i) for i in range(20)])  # more feedback arrives
    store.put_feedback(given("chatcmpl-0200", correction="1 1 1"))
    store.put_reviews([decided("chatcmpl-0200")])
    fe.export(cfg, store)
    again = {row["completion_id"] for row in read("data/feedback/test/preference.jsonl")}
    assert held <= again | {"chatcmpl-0200"} and held == again - {"chatcmpl-0200"}, "rows keep their side as feedback grows"


def test_pii_in_a_correction_or_prompt_is_redacted_before_it_is_written(store):
    """Seen red: with `redact` removed from rows_of's chosen answer, the e-mail address reached
    train/preference.jsonl."""
    store.write_batch([completion(1, prompt="reverse 1 2 3 and mail bob@example.com")])
    store.put_feedback(given("chatcmpl-0001", correction="3 2 1, write to alice@example.org or +44 20 7946 0958"))  # the store API alone does not redact
    store.put_reviews([decided("chatcmpl-0001")])
    fe.export(params(), store)
    text = open("data/feedback/train/preference.jsonl").read()
    assert "@example" not in text and "7946" not in text and "<EMAIL>" in text and "<PHONE>" in text


def test_a_rerun_with_no_new_feedback_writes_identical_bytes(store):
    """Seen red: with an 'exported' time added to every row's provenance, the second run's
    preference.jsonl differed from the first."""
    store.write_batch([completion(i) for i in range(12)])
    for i in range(12):
        store.put_feedback(given(f"chatcmpl-{i:04d}", at=T0 + 100 - i, correction=f"{i} {i}", rating=1 if i % 2 else -1, scale="thumbs"))
    store.put_reviews([decided(f"chatcmpl-{i:04d}") for i in range(12)])
    cfg = params(test_fraction=0.4)
    fe.export(cfg, store)
    files = sorted(p for p in os.popen("find data/feedback -name '*.jsonl'").read().split())
    before = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in files}
    metrics = open("metrics/feedback_export.json", "rb").read()
    fe.export(cfg, store)
    assert {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in files} == before and len(files) == 4
    assert open("metrics/feedback_export.json", "rb").read() == metrics


def test_prepare_reads_the_exported_folders_as_sources_and_quarantines_a_leaked_evaluation_prompt(tmp_path, monkeypatch):
    """Must show: a correction that repeats an evaluation prompt never reaches a training split,
    and the exported rows survive prepare's cleaning otherwise.
    Seen red: with decontaminate() skipped in prepare.run, the safety prompt's pair reached
    preference_train (no feedback row quarantined)."""
    safety = [json.loads(line)["prompt"] for line in open(prepare.TASKS_DIR / "safety.jsonl")]
    cfg = params(test_fraction=0.3)
    leaked = next(p for p in safety if not fe.held_out([{"role": "user", "content": p}], cfg.feedback_loop))
    monkeypatch.chdir(tmp_path)
    ours = [completion(i, prompt=f"please reverse these digits for me {i} {i + 3} {i + 5}") for i in range(30)] + [completion(99, prompt=leaked, answer="Sure, here is how")]
    with open_store(tmp_path / "record.sqlite3") as store:
        store.write_batch(ours)
        for r in ours:
            store.put_feedback(given(r.id, correction="I can't help with that." if r.id.endswith("99") else f"fixed {r.id[-2:]} answer", rating=-1, scale="thumbs"))
        store.put_reviews([decided(r.id) for r in ours])
        report = fe.export(cfg, store)
    assert report["undeclared"] == [] and report["held_out_rows"] > 0
    build_workspace(tmp_path, cfg, generate, prepare)

    train, test = pd.read_parquet("data/prepared/preference_train.parquet"), pd.read_parquet("data/prepared/preference_test.parquet")
    kto_train = pd.read_parquet("data/prepared/kto_train.parquet")
    quarantine = [json.loads(line) for line in open("data/prepared/quarantine.jsonl")]
    ours_quarantined = [q for q in quarantine if "data/feedback" in q["file"]]
    assert [q["reason"].split(":")[0] for q in ours_quarantined] == ["contaminated", "contaminated"], f"only the leaked prompt's pair and KTO row: {ours_quarantined}"
    assert all(leaked in q["raw"] for q in ours_quarantined)
    exported_train = len(read("data/feedback/train/preference.jsonl"))
    assert (train["source"] == "feedback").sum() == exported_train - 1, "every other exported pair is trained on"
    assert (test["source"] == "feedback_test").sum() == len(read("data/feedback/test/preference.jsonl")), "the held-out pairs are prepare's test rows"
    assert (kto_train["source"] == "feedback").sum() == len(read("data/feedback/train/kto.jsonl")) - 1
    assert not any(leaked in m["content"] for cell in train["prompt"] for m in cell)


def test_the_lineage_names_the_feedback_its_rows_the_corrected_versions_and_the_decisions(tmp_path, monkeypatch):
    """What registration tags a version with (tasks/registry.py), read from the rows' provenance
    after the real prepare. Seen red: `versions[...]` counting `row.get("model")` instead of the
    version -> lineage.feedback.versions was 'm:...' and the assertion on '3:..,4:..' failed."""
    cfg = params(test_fraction=0.3)
    monkeypatch.chdir(tmp_path)
    assert fe.feedback_lineage(cfg) == {}, "no feedback exported: no feedback lineage"
    ours = [completion(i, prompt=f"please reverse these digits for me {i} {i + 3} {i + 5}", version="3" if i < 20 else "4") for i in range(30)]
    with open_store(tmp_path / "record.sqlite3") as store:
        store.write_batch(ours)
        for r in ours:
            store.put_feedback(given(r.id, correction=f"fixed {r.id[-2:]} answer"))
        store.put_reviews([decided(r.id, "edited" if int(r.id[-2:]) % 3 == 0 else "accepted", f"edited {r.id[-2:]} answer" if int(r.id[-2:]) % 3 == 0 else None) for r in ours])
        fe.export(cfg, store)
    build_workspace(tmp_path, cfg, generate, prepare)
    tags = fe.feedback_lineage(cfg)

    train, test = read("data/feedback/train/preference.jsonl"), read("data/feedback/test/preference.jsonl")
    assert len(train) + len(test) == 30 and test, "some held out"
    count = lambda rows, key, value: sum(1 for r in rows if r[key] == value)  # noqa: E731
    assert tags["lineage.feedback.source"] == "feedback" and tags["lineage.feedback.rows"] == str(len(train))
    assert tags["lineage.feedback.tables"] == f"preference:{len(train)}"
    assert tags["lineage.feedback.versions"] == f"3:{count(train, 'version', '3')},4:{count(train, 'version', '4')}"
    assert tags["lineage.feedback.decisions"] == ",".join(f"{d}:{count(train, 'decision', d)}" for d in ("edited", "accepted") if count(train, "decision", d))
    assert tags["lineage.feedback.rows_trained"] == str((pd.read_parquet("data/prepared/preference_train.parquet")["source"] == "feedback").sum())
    assert tags["lineage.feedback_slice.source"] == "feedback_test" and tags["lineage.feedback_slice.rows"] == str(len(test))


# ---------------------------------------------------------------- the trigger policy

POLICY = FeedbackLoopParams(min_new_rows=5, cooldown_s=3600, max_runs_per_day=2)
NOW = T0 + 10 * 86_400


def test_the_policy_fires_only_when_every_rule_holds_and_names_each_that_does_not():
    """Seen red: with the budget counted as `today > max_runs_per_day`, a third run in 24 h fired."""
    assert fe.decide_trigger(5, NOW, [], POLICY).fire
    assert fe.decide_trigger(9, NOW, [NOW - 3 * 3600, NOW - 30 * 3600], POLICY).fire, "a run older than 24 h is outside the budget"
    few = fe.decide_trigger(4, NOW, [], POLICY)
    assert not few.fire and few.reasons == ["4 new accepted feedback row(s), fewer than min_new_rows 5"]
    cool = fe.decide_trigger(50, NOW, [NOW - 600], POLICY)
    assert not cool.fire and cool.reasons[0].startswith("cooldown: the last run started 600 s ago, cooldown_s is 3600")
    spent = fe.decide_trigger(50, NOW, [NOW - 20 * 3600, NOW - 10 * 3600], POLICY)
    assert not spent.fire and spent.reasons == ["budget: 2 run(s) started in the last 24 h, max_runs_per_day is 2"]
    off = fe.decide_trigger(0, NOW, [NOW - 60], FeedbackLoopParams(trigger=False, min_new_rows=5, cooldown_s=3600, max_runs_per_day=0))
    assert not off.fire and len(off.reasons) == 4, "every rule that fails is named"


def test_stars_and_thumbs_labels():
    assert [fe.stars_label(r, "stars") for r in (1, 2, 3, 4, 5)] == [False, False, None, True, True]
    assert [fe.stars_label(r, "thumbs") for r in (-1, 1)] == [False, True]


def test_a_bad_feedback_recipe_is_refused_naming_the_step():
    with pytest.raises(ValueError, match="unknown step"):
        FeedbackLoopParams(recipe=["dpoo"])


def test_the_export_announces_a_run_when_the_policy_holds_and_not_again_without_new_feedback(store):
    """Seen red: with the state recorded whatever `announce` answered, a run never started (no
    Prefect server) was written to state/loop.json, spending the budget and the new rows."""
    store.write_batch([completion(i) for i in range(6)])
    for i in range(6):
        store.put_feedback(given(f"chatcmpl-{i:04d}", correction=f"fixed {i}"))
    store.put_reviews([decided(f"chatcmpl-{i:04d}") for i in range(6)])
    cfg = params(min_new_rows=5, cooldown_s=3600, max_runs_per_day=2, state_file="state/loop.json")
    said: list[dict] = []

    offline = fe.export(cfg, store, lambda payload: "no new-data event sent: no Prefect server is configured", now=NOW)
    assert offline["trigger"]["fire"] and not os.path.exists("state/loop.json"), "nothing started: nothing recorded"
    first = fe.export(cfg, store, lambda payload: said.append(payload) or "emitted lifecycle.data.added (data abc)", now=NOW)
    assert first["trigger"]["fire"] and first["new_rows"] == 6 and len(said) == 1
    assert said[0]["recipe"] == ["dpo"] and said[0]["start_from"] == "champion" and said[0]["pairs"] == 6 and said[0]["source"] == "feedback"
    assert said[0]["overrides"] == cfg.feedback_loop.overrides == {"dpo": {"max_steps": 160, "learning_rate": 0.0005}}, "the run's training settings travel with it"
    again = fe.export(cfg, store, lambda payload: said.append(payload) or "emitted", now=NOW + 60)
    assert not again["trigger"]["fire"] and len(said) == 1 and again["new_rows"] == 0
    assert any("min_new_rows" in r for r in again["trigger"]["reasons"]) and any(r.startswith("cooldown") for r in again["trigger"]["reasons"])
