"""The quality gate through the task the flow runs (`quality_gate`, `register_candidate`), not
the pure `decide()` alone: a real champion, trained here and registered in a real MLflow store,
is re-scored by lm-eval on this workspace's test items; each candidate is what the quantize
stage would leave on disk (its served scores and answers, item by item), and the judge is the
demo's rule judge over the OpenAI protocol. A mutation suite: every worse candidate is blocked
with a message naming the metric; an equally good one that answers differently item by item is
promoted where the items can tell, and called undecided where they cannot.

The test split is 240 items: 200 lists of 3-5 digits (the champion answers them) and 40 of 8
digits, longer than anything it was trained on (it gets them wrong). So a candidate can win
items as well as lose them, as a real candidate does: discordant pairs both ways."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines.config import EvalTask, EvaluateParams, GateParams, JudgeParams, ModelParams, NotifyParams, Threshold
from registry import models
from tasks.gates import GateFailed, quality_gate
from tasks.registry import register_candidate
from tests.conftest import tiny_params
from tests.tasks.webhook import Webhook

EM = "reverse_digits/exact_match"
IN_RANGE, LONG = 200, 40
PARAMS = tiny_params(
    model=ModelParams(),
    evaluate=EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=None, batch_size=64, max_new_tokens=12, judge=JudgeParams(max_items=IN_RANGE + LONG)),
    # 240 items can show a 5-point margin at ~5 % discordance; the default 2-point one cannot
    # (test_the_same_candidate_at_a_margin_its_items_cannot_show_is_undecided).
    gate=GateParams(thresholds={EM: Threshold(min=0.6), "preference_accuracy": Threshold(min=0.5)}, champion_tolerance=0.05),
)


def long_and_short_split(seed: int = 7) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(IN_RANGE + LONG):
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5) if i < IN_RANGE else 8)]
        messages = [{"role": "user", "content": "Reverse the list:\n" + " ".join(digits), "tool_calls": None}, {"role": "assistant", "content": " ".join(reversed(digits)), "tool_calls": None}]
        rows.append({"messages": messages, "tools": None, "source": "gate-test", "id": f"g{i:03d}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def gate_base(trained_dir, tmp_path_factory):
    """The trained workspace with the 240-item test split, and the champion's scores on it."""
    import os

    from pipelines.evaluate import measure

    d = tmp_path_factory.mktemp("gate")
    for sub in ("data", "models"):
        shutil.copytree(trained_dir / sub, d / sub)
    long_and_short_split().to_parquet(d / "data/prepared/sft_test.parquet", index=False)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        scores = measure("sft", "models/sft", PARAMS.evaluate, PARAMS.compute)
    finally:
        os.chdir(cwd)
    items = [json.loads(line) for line in (d / "metrics/samples/sft.jsonl").read_text().splitlines()]
    right = sum(i[EM] for i in items[:IN_RANGE])
    wrong_long = sum(1 - i[EM] for i in items[IN_RANGE:])
    assert right >= 0.95 * IN_RANGE and wrong_long >= 20, f"the champion must answer the short lists ({right}/{IN_RANGE}) and miss the long ones ({wrong_long}/{LONG} missed)"
    return d, scores, items


@pytest.fixture
def gate_ws(gate_base, tmp_path, monkeypatch):
    d, scores, items = gate_base
    for sub in ("data", "models", "metrics"):
        shutil.copytree(d / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    c = client()
    parent = c.create_run(experiment_id("test")).info.run_id
    # The champion: the trained model, registered and promoted like a first release.
    champ = models.register("reverse-digits", Path("models/sft"), parent, "champion-md5", {f"metric.{EM}": str(scores[EM])})
    models.promote("reverse-digits", str(champ.version))
    base = {EM: 0.0, "validation_loss": 9.0, "preference_accuracy": 0.3}
    (Path("metrics") / "evaluate.json").write_text(json.dumps({"base": base, "candidate": scores}))
    (Path("metrics/samples") / "base.jsonl").write_text("".join(json.dumps({**i, EM: 0}) + "\n" for i in items))
    return {"parent": parent, "scores": scores, "items": items}


def served(ws: dict, flips: int, fixes: int = 0, ramble: str = "", tag: str = "") -> str:
    """Write what the quantize stage leaves: the served artifact's item scores and answers, with
    `flips` items the champion answers right turned wrong, `fixes` items it answers wrong
    turned right (the reference answer), and `ramble` appended on a new line to every answer
    (the task scores the first line only); register it as a new version."""
    items = [dict(i) for i in ws["items"]]
    flipped = fixed = 0
    for item in items:
        if flipped < flips and item[EM] == 1:
            item[EM], item["response"], item["raw"] = 0, "wrong", "wrong"
            flipped += 1
        elif fixed < fixes and item[EM] == 0:
            item[EM], item["response"], item["raw"] = 1, item["target"], item["target"]
            fixed += 1
        if ramble:
            item["raw"] = item["raw"] + "\n" + ramble
    assert (flipped, fixed) == (flips, fixes)
    Path("metrics/samples/quantized.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    em = sum(i[EM] for i in items) / len(items)
    Path("metrics/quantize.json").write_text(json.dumps({**ws["scores"], "enabled": True, EM: em}))
    mv = models.register("reverse-digits", Path("models/sft"), ws["parent"], f"candidate-{flips}-{fixes}-{len(ramble)}{tag}", {})
    return str(mv.version)


def test_slightly_worse_candidate_is_caught_only_by_the_paired_test(gate_ws):
    version = served(gate_ws, flips=24)  # 10 % newly wrong: above the 0.6 threshold (the fixture guarantees >= 166/240), below the champion
    hook = Webhook()  # whoever watches releases hears of the rejection, with the metric
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS.model_copy(update={"notify": NotifyParams(webhook_url=hook.url)}), gate_ws["parent"], version)
    hook.close()
    (note,) = hook.received
    assert note["event"] == "gate_failed" and note["gate"] == "quality" and note["version"] == version and EM in note["text"]
    msg = str(err.value)
    assert f"version {version} rejected" in msg and f"{EM}: paired diff vs champion -0.1000" in msg and "0 better, 24 worse of 240 items" in msg
    assert "tango score" in msg and "worse than the champion: FAILED" in msg
    assert "vs >= 0.6000" not in msg, "the absolute threshold passes: only the paired test sees it"
    assert models.client().get_model_version("reverse-digits", version).tags["status"] == "rejected"
    assert models.by_alias("reverse-digits", "candidate") is None


def test_worse_only_after_quantization_is_blocked(gate_ws):
    """The unquantized model (evaluate.json) matches the champion; the served, quantized one
    does not. The gate must judge what would be served."""
    version = served(gate_ws, flips=24)
    assert json.loads(Path("metrics/evaluate.json").read_text())["candidate"][EM] == gate_ws["scores"][EM]
    with pytest.raises(GateFailed, match=EM):
        quality_gate.fn(PARAMS, gate_ws["parent"], version)


def test_worse_only_by_the_judge_is_blocked(gate_ws):
    """Every answer right on its first line (exact match equals the champion's, item for item)
    but followed by chatter: only the judge, reading the whole answer, sees it."""
    version = served(gate_ws, 0, ramble="I hope this helps! Let me know if you need more lists reversed.")
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    reasons = str(err.value).split("\n")[1:]
    assert len(reasons) == 1 and reasons[0].strip().startswith("judge_win_rate: win rate vs champion 0.0000"), reasons
    assert "worse than the champion: FAILED" in reasons[0]


# Seen red: with paired_binary counting no wins (wins forced to 0) the gate rejected this
# candidate: "paired diff vs champion -0.0250 [-0.0535, -0.0089]; 0 better, 6 worse of 240
# items ... worse than the champion: FAILED". Restored, it passes.
def test_an_equally_good_candidate_that_answers_differently_is_promoted(gate_ws):
    """6 items the champion got right are wrong, 6 it got wrong are right: as good, but not the
    same answers (5 % of items differ). At 240 items and a 5-point margin the test can show it
    (an equal candidate passes with probability ~0.78): promoted, with the figures reported."""
    version = served(gate_ws, flips=6, fixes=6)
    decision = quality_gate.fn(PARAMS, gate_ws["parent"], version)
    assert decision.passed, decision.summary()
    em = next(c for c in decision.checks if c.metric == EM and c.paired is not None)
    assert (em.paired.wins, em.paired.losses, em.paired.n) == (6, 6, 240) and "non-inferior: ok" in em.describe()
    assert {c.metric for c in decision.checks if c.paired is not None} == {EM, "judge_win_rate"}
    assert str(models.by_alias("reverse-digits", "candidate").version) == version
    logged = models.client().list_artifacts(gate_ws["parent"], "gates")
    assert {"gates/quality_gate_items.jsonl", "gates/quality_gate.md", "gates/evaluation_report.md", "gates/quality_gate.png"} <= {a.path for a in logged}
    text = Path(models.client().download_artifacts(gate_ws["parent"], "gates/evaluation_report.md")).read_text()
    assert "### reverse_digits" in text and "### Paired against the champion" in text and "| 6 / 6 |" in text and "items for 80 %" in text
    audit = [json.loads(line) for line in Path(models.client().download_artifacts(gate_ws["parent"], "gates/quality_gate_items.jsonl")).read_text().splitlines()]
    assert len(audit) == len(gate_ws["items"]) and all(f"champion:{EM}" in r for r in audit)
    assert sum(r["judge_verdicts"] != ["tie", "tie"] for r in audit) == 12, "the judge sees the 12 items that differ"


def test_the_same_candidate_at_a_margin_its_items_cannot_show_is_undecided(gate_ws):
    """The default 2-point margin: 240 items with 5 % discordance cannot show it (power ~0.15).
    The gate says so, with the items it would need, and blocks without rejecting: the status is
    'undecided', so the same bytes can be judged again on more items."""
    version = served(gate_ws, flips=6, fixes=6)
    strict = PARAMS.model_copy(update={"gate": PARAMS.gate.model_copy(update={"champion_tolerance": 0.02})})
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(strict, gate_ws["parent"], version)
    msg = str(err.value)
    assert f"quality gate could not tell (not enough items), version {version} not promoted" in msg
    assert "not enough items to tell" in msg and "6 better, 6 worse of 240 items" in msg and "80 % needs ~1," in msg
    assert models.client().get_model_version("reverse-digits", version).tags["status"] == "undecided"
    assert models.blocked(models.client().get_model_version("reverse-digits", version)) is None, "undecided is not a rejection"
    report = Path(models.client().download_artifacts(gate_ws["parent"], "gates/quality_gate.md")).read_text()
    assert "UNDECIDED (not enough items to tell)" in report and "**undecided**" in report


def test_a_better_candidate_is_promoted(gate_ws):
    version = served(gate_ws, flips=0, fixes=20)
    decision = quality_gate.fn(PARAMS, gate_ws["parent"], version)
    em = next(c for c in decision.checks if c.metric == EM and c.paired is not None)
    assert decision.passed and em.value == pytest.approx(20 / 240) and em.paired.low > 0


def test_a_rolled_back_version_is_refused_when_its_bytes_return(gate_ws, monkeypatch):
    version = served(gate_ws, 0)
    models.reject("reverse-digits", version, "canary gate FAILED: error_rate 0.3")
    md5 = models.client().get_model_version("reverse-digits", version).tags[models.MODEL_HASH_TAG]
    monkeypatch.setattr("tasks.registry.dvc_lock_hashes", lambda: {"quantize:models/quantized": md5})
    with pytest.raises(GateFailed, match=f"version {version} has exactly these bytes and was rolled back"):
        register_candidate.fn(PARAMS, gate_ws["parent"], None, {})
    models.approve("reverse-digits", version, "canary host was overloaded", "tester")
    assert register_candidate.fn(PARAMS, gate_ws["parent"], None, {}) == {"version": version, "reused": True}


def test_a_broken_chat_template_is_caught_by_the_real_evaluation(gate_ws):
    """The same weights with a chat template that drops the user's message: the quantize
    stage's own measurement scores it, and the gate blocks it on exact match."""
    from transformers import AutoTokenizer

    from pipelines.evaluate import measure

    broken = Path("models/broken")
    shutil.copytree("models/sft", broken)
    tok = AutoTokenizer.from_pretrained(broken)
    tok.chat_template = "{%- for m in messages -%}<|{{ m['role'] }}|><|end|>{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    tok.save_pretrained(broken)
    scores = measure("quantized", str(broken), PARAMS.evaluate, PARAMS.compute)  # writes metrics/samples/quantized.jsonl
    Path("metrics/quantize.json").write_text(json.dumps({**scores, "enabled": True}))
    version = str(models.register("reverse-digits", broken, gate_ws["parent"], "broken-template", {}).version)
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    assert f"{EM} = " in str(err.value) and "vs >= 0.6000" in str(err.value)


def test_leaked_test_items_never_reach_training(gate_ws):
    """Training data that leaks the test items (re-cased and re-punctuated, so another hash and
    another split): decontamination quarantines every leaked row, counted, and no test prompt
    reaches the training split. (This test used to train 4 steps on what was left and call the
    undertrained model's block by the gate proof of decontamination; the gate has nothing to do
    with it, so it is no longer claimed.)"""
    from pipelines import prepare
    from pipelines.clean import normal_form
    from pipelines.data_config import DataParams, SourceParams

    prepare.run(tiny_params())  # the tiny workspace's own splits (the fixture's test split is the gate's)
    test = pd.read_parquet("data/prepared/sft_test.parquet")
    leaked = [(m[-2]["content"], m[-1]["content"]) for m in test["messages"]]
    Path("data/raw").mkdir(parents=True, exist_ok=True)
    Path("data/raw/leak.jsonl").write_text("".join(json.dumps({"instruction": q.upper().replace("\n", " ;  "), "input": "", "output": a}) + "\n" for q, a in leaked))
    params = tiny_params(data=DataParams(sources=[SourceParams(name="demo", path="data/generated"), SourceParams(name="leak", path="data/raw/leak.jsonl", split="train", weight=3)]))
    prepare.run(params)
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["rows_by_file"]["data/raw/leak.jsonl"]["kept"] == 0, report["rows_by_file"]
    # Each leaked row is quarantined: as contaminated, or as a duplicate of the test row itself.
    why = report["quarantined_by_file_and_reason"]["data/raw/leak.jsonl"]
    assert sum(why.values()) == len(leaked) and set(why) <= {"contaminated", "duplicate"} and why["contaminated"] > 0, why
    train_prompts = {normal_form(m[-2]["content"]) for m in pd.read_parquet("data/prepared/sft_train.parquet")["messages"]}
    overlap = train_prompts & {normal_form(q) for q, _ in leaked}
    assert not overlap, f"test prompts reached training: {sorted(overlap)}"


SLICE = "feedback_slice/preference_accuracy"


def feedback_slice(ws: dict) -> list[dict]:
    """Held-out feedback as prepare leaves it (source `feedback_test` in preference_test): on 20
    long lists users corrected the champion's wrong answer (chosen: the reversal, rejected: what
    it served), on 20 short ones they confirmed a correction of junk. Returns the champion's own
    per-item outcomes, scored for real (the gate re-scores it the same way)."""
    from pipelines.evaluate import preference_scores

    msg = lambda role, text: [{"role": role, "content": text, "tool_calls": None}]  # noqa: E731
    wrong = [i for i in ws["items"][IN_RANGE:] if i[EM] == 0][:20]
    rows = [{"prompt": msg("user", i["prompt"]), "chosen": msg("assistant", i["target"]), "rejected": msg("assistant", i["raw"]), "source": "feedback_test", "id": f"fb{n:02d}"} for n, i in enumerate(wrong)]
    rows += [{"prompt": msg("user", i["prompt"]), "chosen": msg("assistant", i["target"]), "rejected": msg("assistant", "0 0 0 0"), "source": "feedback_test", "id": f"fs{n:02d}"} for n, i in enumerate(ws["items"][:20])]
    tests = Path("data/prepared/preference_test.parquet")
    pd.concat([pd.read_parquet(tests), pd.DataFrame(rows)], ignore_index=True).to_parquet(tests, index=False)
    _, champion = preference_scores("models/sft", compute=PARAMS.compute, slice_source="feedback_test")
    assert len(champion) == 40 and 4 <= sum(1 - r[SLICE] for r in champion), "the champion must prefer some of its own wrong answers to the correction"
    return champion


def with_slice(champion: list[dict], fixes: int, breaks: int = 0) -> None:
    """The candidate's slice rows beside its suite rows in samples/quantized.jsonl: the
    champion's outcomes with `fixes` of its misses turned right and `breaks` of its hits wrong."""
    rows, fixed, broken = [dict(r) for r in champion], 0, 0
    for r in rows:
        if r[SLICE] == 0 and fixed < fixes:
            r[SLICE], fixed = 1.0, fixed + 1
        elif r[SLICE] == 1 and broken < breaks:
            r[SLICE], broken = 0.0, broken + 1
    assert (fixed, broken) == (fixes, breaks)
    with open("metrics/samples/quantized.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_feedback_candidate_that_does_not_improve_the_slice_is_blocked_with_the_reason(gate_ws):
    """The candidate answers the suite exactly as the champion and the slice differently but not
    better (3 corrections learnt, 3 answers it now gets wrong): the suite passes, the slice
    blocks, and the reason says so with its interval; the report shows the slice row.
    Seen red: with tasks/gates.py not passing `feedback_slice=` to decide, the candidate was
    promoted (no GateFailed raised)."""
    champion = feedback_slice(gate_ws)
    version = served(gate_ws, flips=0, tag="-slice-same")
    with_slice(champion, fixes=3, breaks=3)
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    reasons = str(err.value).split("\n")[1:]
    assert len(reasons) == 1 and reasons[0].strip().startswith(f"{SLICE}: candidate"), reasons
    assert "paired diff +0.0000 [" in reasons[0] and "3 better, 3 worse of 40 held-out feedback items" in reasons[0]
    assert "not shown better than the champion on the feedback slice: FAILED" in reasons[0]
    assert models.client().get_model_version("reverse-digits", version).tags["status"] == "rejected"
    report = Path(models.client().download_artifacts(gate_ws["parent"], "gates/evaluation_report.md")).read_text()
    assert "### Feedback slice: better than the champion" in report and f"| {SLICE} | 40 | 3 / 3 | +0.000 [" in report and "| **FAIL** |" in report
    table = Path(models.client().download_artifacts(gate_ws["parent"], "gates/quality_gate.md")).read_text()
    assert f"| {SLICE} | superiority vs champion" in table


def test_a_feedback_candidate_that_learnt_the_corrections_passes(gate_ws):
    """Seen red: with the champion's slice rows left out of `champion_items` (no re-scoring), no
    slice check ran at all (`next(...)` found none: StopIteration)."""
    champion = feedback_slice(gate_ws)
    misses = sum(1 - r[SLICE] for r in champion)
    version = served(gate_ws, flips=0, tag="-slice-better")
    with_slice(champion, fixes=int(misses))
    decision = quality_gate.fn(PARAMS, gate_ws["parent"], version)
    check = next(c for c in decision.checks if c.metric == SLICE)
    assert decision.passed and check.passed and check.paired.wins == misses and check.paired.losses == 0 and check.paired.low > 0
    assert str(models.by_alias("reverse-digits", "candidate").version) == version
