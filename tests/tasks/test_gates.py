"""The quality gate through the task the flow runs (`quality_gate`, `register_candidate`), not
the pure `decide()` alone: a real champion, trained here and registered in a real MLflow store,
is re-scored by lm-eval on this workspace's test items; each candidate is what the quantize
stage would leave on disk (its served scores and answers, item by item), and the judge is the
demo's rule judge over the OpenAI protocol. A mutation suite: every worse candidate is blocked
with a message naming the metric, an equally good one is promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config import EvalTask, EvaluateParams, GateParams, ModelParams, NotifyParams, Threshold
from registry import models
from tasks.gates import GateFailed, quality_gate
from tasks.registry import register_candidate
from tests.conftest import tiny_params
from tests.tasks.webhook import Webhook

EM = "reverse_digits/exact_match"
PARAMS = tiny_params(
    model=ModelParams(),
    evaluate=EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=None, batch_size=64, max_new_tokens=12),  # every test item: ~40
    gate=GateParams(thresholds={EM: Threshold(min=0.8), "preference_accuracy": Threshold(min=0.5)}),
)


@pytest.fixture
def gate_ws(trained_dir, tmp_path, monkeypatch):
    for sub in ("data", "models"):
        shutil.copytree(trained_dir / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    from pipelines.evaluate import measure

    c = client()
    parent = c.create_run(experiment_id("test")).info.run_id
    # The champion: the trained model, registered and promoted like a first release.
    champ = models.register("reverse-digits", Path("models/sft"), parent, "champion-md5", {f"metric.{EM}": "1.0"})
    models.promote("reverse-digits", str(champ.version))
    scores = measure("sft", "models/sft", PARAMS.evaluate, PARAMS.compute)
    base = {EM: 0.0, "validation_loss": 9.0, "preference_accuracy": 0.3}
    Path("metrics").mkdir(exist_ok=True)
    (Path("metrics") / "evaluate.json").write_text(json.dumps({"base": base, "candidate": scores}))
    (Path("metrics/samples") / "base.jsonl").write_text((Path("metrics/samples") / "sft.jsonl").read_text().replace(f'"{EM}": 1', f'"{EM}": 0'))
    items = [json.loads(line) for line in Path("metrics/samples/sft.jsonl").read_text().splitlines()]
    assert scores[EM] >= 0.9, "the champion fixture must have learned the task"
    return {"parent": parent, "scores": scores, "items": items}


def served(ws: dict, flips: int, ramble: str = "") -> str:
    """Write what the quantize stage leaves: the served artifact's item scores and answers, with
    `flips` items the champion answers right turned wrong, and `ramble` appended on a new line
    to every answer (the task scores the first line only); register it as a new version."""
    items = [dict(i) for i in ws["items"]]
    flipped = 0
    for item in items:
        if flipped < flips and item[EM] == 1:
            item[EM], item["response"], item["raw"] = 0, "wrong", "wrong"
            flipped += 1
        if ramble:
            item["raw"] = item["raw"] + "\n" + ramble
    Path("metrics/samples/quantized.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    em = sum(i[EM] for i in items) / len(items)
    Path("metrics/quantize.json").write_text(json.dumps({**ws["scores"], "enabled": True, EM: em}))
    mv = models.register("reverse-digits", Path("models/sft"), ws["parent"], f"candidate-{flips}-{len(ramble)}", {})
    return str(mv.version)


def test_slightly_worse_candidate_is_caught_only_by_the_paired_test(gate_ws):
    n = len(gate_ws["items"])
    flips = max(2, n // 10)  # ~10 % newly wrong: above the 0.8 threshold, below the champion
    version = served(gate_ws, flips)
    hook = Webhook()  # whoever watches releases hears of the rejection, with the metric
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS.model_copy(update={"notify": NotifyParams(webhook_url=hook.url)}), gate_ws["parent"], version)
    hook.close()
    (note,) = hook.received
    assert note["event"] == "gate_failed" and note["gate"] == "quality" and note["version"] == version and EM in note["text"]
    msg = str(err.value)
    assert f"version {version} rejected" in msg and EM in msg and "paired diff vs champion (mcnemar" in msg
    assert "vs >= 0.8000" not in msg, "the absolute threshold passes: only the paired test sees it"
    assert models.client().get_model_version("reverse-digits", version).tags["status"] == "rejected"
    assert models.by_alias("reverse-digits", "candidate") is None


def test_worse_only_after_quantization_is_blocked(gate_ws):
    """The unquantized model (evaluate.json) matches the champion; the served, quantized one
    does not. The gate must judge what would be served."""
    version = served(gate_ws, max(2, len(gate_ws["items"]) // 10))
    assert json.loads(Path("metrics/evaluate.json").read_text())["candidate"][EM] >= 0.9
    with pytest.raises(GateFailed, match=EM):
        quality_gate.fn(PARAMS, gate_ws["parent"], version)


def test_worse_only_by_the_judge_is_blocked(gate_ws):
    """Every answer right on its first line (exact match equals the champion's, item for item)
    but followed by chatter: only the judge, reading the whole answer, sees it."""
    version = served(gate_ws, 0, ramble="I hope this helps! Let me know if you need more lists reversed.")
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    reasons = str(err.value).split("\n")[1:]
    assert len(reasons) == 1 and reasons[0].strip().startswith("judge_win_rate = 0.0"), reasons
    assert "win rate vs champion, 0.5 minus tolerance" in reasons[0]


def test_an_equally_good_candidate_is_promoted_to_candidate(gate_ws):
    version = served(gate_ws, 0)
    decision = quality_gate.fn(PARAMS, gate_ws["parent"], version)
    assert decision.passed, decision.summary()
    assert {c.metric for c in decision.checks if "Holm" in c.rule} == {EM, "judge_win_rate"}
    assert str(models.by_alias("reverse-digits", "candidate").version) == version
    logged = models.client().list_artifacts(gate_ws["parent"], "gates")
    assert {"gates/quality_gate_items.jsonl", "gates/quality_gate.md", "gates/evaluation_report.md", "gates/quality_gate.png"} <= {a.path for a in logged}
    report = models.client().download_artifacts(gate_ws["parent"], "gates/evaluation_report.md")
    text = Path(report).read_text()
    assert "### reverse_digits" in text and "### Paired against the champion" in text and "win rate against the champion: **0.500**" in text
    audit = [json.loads(line) for line in Path(models.client().download_artifacts(gate_ws["parent"], "gates/quality_gate_items.jsonl")).read_text().splitlines()]
    assert len(audit) == len(gate_ws["items"]) and all(f"champion:{EM}" in r and r["judge_verdicts"] == ["tie", "tie"] for r in audit)


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
    assert f"{EM} = " in str(err.value) and "vs >= 0.8000" in str(err.value)


def test_a_contaminated_candidate_is_not_inflated_and_is_blocked(gate_ws):
    """Training data that leaks the test items (re-cased and re-punctuated, so another hash
    and another split): decontamination quarantines every leaked row, the candidate trained on
    what is left never saw a test item, and, undertrained, it is blocked by the gate."""
    import pandas as pd

    from pipelines import prepare, sft
    from pipelines.clean import normal_form
    from pipelines.config import SftParams
    from pipelines.data_config import DataParams, SourceParams
    from pipelines.evaluate import measure

    test = pd.read_parquet("data/prepared/sft_test.parquet")
    leaked = [(m[-2]["content"], m[-1]["content"]) for m in test["messages"]]
    Path("data/raw").mkdir(parents=True, exist_ok=True)
    Path("data/raw/leak.jsonl").write_text("".join(json.dumps({"instruction": q.upper().replace("\n", " ;  "), "input": "", "output": a}) + "\n" for q, a in leaked))
    params = tiny_params(
        data=DataParams(sources=[SourceParams(name="demo", path="data/generated"), SourceParams(name="leak", path="data/raw/leak.jsonl", split="train", weight=3)]),
        sft=SftParams(max_steps=4, batch_size=8, save_steps=4, warmup_steps=0),
    )
    prepare.run(params)
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["rows_by_file"]["data/raw/leak.jsonl"]["kept"] == 0, report["rows_by_file"]
    # Each leaked row is quarantined: as contaminated, or as a duplicate of the test row itself.
    why = report["quarantined_by_file_and_reason"]["data/raw/leak.jsonl"]
    assert sum(why.values()) == len(leaked) and set(why) <= {"contaminated", "duplicate"} and why["contaminated"] > 0, why
    train_prompts = {normal_form(m[-2]["content"]) for m in pd.read_parquet("data/prepared/sft_train.parquet")["messages"]}
    overlap = train_prompts & {normal_form(q) for q, _ in leaked}
    assert not overlap, f"test prompts reached training: {sorted(overlap)}"

    sft.run(params)
    scores = measure("quantized", "models/sft", PARAMS.evaluate, PARAMS.compute)
    Path("metrics/quantize.json").write_text(json.dumps({**scores, "enabled": True}))
    version = str(models.register("reverse-digits", Path("models/sft"), gate_ws["parent"], "contaminated", {}).version)
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    assert f"{EM} = " in str(err.value) and "vs >= 0.8000" in str(err.value)
