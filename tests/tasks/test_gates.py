"""The quality gate through the task the flow runs (`quality_gate`, `register_candidate`), not
the pure `decide()` alone: a real champion, trained here and registered in a real MLflow store,
is re-scored by lm-eval on this workspace's test items; each candidate is what the quantize
stage would leave on disk (its served scores, item by item). A mutation suite: every worse
candidate is blocked with a message naming the metric, an equally good one is promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config import EvaluateParams, ModelParams
from registry import models
from tasks.gates import GateFailed, quality_gate
from tasks.registry import register_candidate
from tests.conftest import tiny_params

PARAMS = tiny_params(model=ModelParams(), evaluate=EvaluateParams(limit=None, batch_size=64, max_new_tokens=12))  # every test item: ~40


@pytest.fixture
def gate_ws(trained_dir, tmp_path, monkeypatch):
    for sub in ("data", "models"):
        shutil.copytree(trained_dir / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    from pipelines.evaluate import exact_match, measure

    c = client()
    parent = c.create_run(experiment_id("test")).info.run_id
    # The champion: the trained model, registered and promoted like a first release.
    champ = models.register("reverse-digits", Path("models/sft"), parent, "champion-md5", {"metric.exact_match": "1.0"})
    models.promote("reverse-digits", str(champ.version))
    scores = measure("sft", "models/sft", PARAMS.evaluate, PARAMS.compute)
    base = {"exact_match": 0.0, "validation_loss": 9.0, "preference_accuracy": 0.3}
    Path("metrics").mkdir(exist_ok=True)
    (Path("metrics") / "evaluate.json").write_text(json.dumps({"base": base, "candidate": scores}))
    (Path("metrics/samples") / "base.jsonl").write_text((Path("metrics/samples") / "sft.jsonl").read_text().replace('"exact_match": 1', '"exact_match": 0'))
    items = [json.loads(line) for line in Path("metrics/samples/sft.jsonl").read_text().splitlines()]
    assert exact_match("models/sft", PARAMS.evaluate)[0] >= 0.9, "the champion fixture must have learned the task"
    return {"parent": parent, "scores": scores, "items": items}


def served(ws: dict, flips: int, **overrides) -> str:
    """Write what the quantize stage leaves: the served artifact's item scores, with `flips`
    items the champion answers right turned wrong; register it as a new version."""
    items = [dict(i) for i in ws["items"]]
    flipped = 0
    for item in items:
        if flipped < flips and item["exact_match"] == 1:
            item["exact_match"], item["response"] = 0, "wrong"
            flipped += 1
    Path("metrics/samples/quantized.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    em = sum(i["exact_match"] for i in items) / len(items)
    Path("metrics/quantize.json").write_text(json.dumps({**ws["scores"], "enabled": True, "exact_match": em, **overrides}))
    mv = models.register("reverse-digits", Path("models/sft"), ws["parent"], f"candidate-{flips}-{len(overrides)}", {})
    return str(mv.version)


def test_slightly_worse_candidate_is_caught_only_by_the_paired_test(gate_ws):
    n = len(gate_ws["items"])
    flips = max(2, n // 10)  # ~10 % newly wrong: above the 0.8 threshold, below the champion
    version = served(gate_ws, flips)
    with pytest.raises(GateFailed) as err:
        quality_gate.fn(PARAMS, gate_ws["parent"], version)
    msg = str(err.value)
    assert f"version {version} rejected" in msg and "exact_match" in msg and "paired diff vs champion (mcnemar" in msg
    assert "vs >= 0.8000" not in msg, "the absolute threshold passes: only the paired test sees it"
    assert models.client().get_model_version("reverse-digits", version).tags["status"] == "rejected"
    assert models.by_alias("reverse-digits", "candidate") is None


def test_worse_only_after_quantization_is_blocked(gate_ws):
    """The unquantized model (evaluate.json) matches the champion; the served, quantized one
    does not. The gate must judge what would be served."""
    version = served(gate_ws, max(2, len(gate_ws["items"]) // 10))
    assert json.loads(Path("metrics/evaluate.json").read_text())["candidate"]["exact_match"] >= 0.9
    with pytest.raises(GateFailed, match="exact_match"):
        quality_gate.fn(PARAMS, gate_ws["parent"], version)


def test_an_equally_good_candidate_is_promoted_to_candidate(gate_ws):
    version = served(gate_ws, 0)
    decision = quality_gate.fn(PARAMS, gate_ws["parent"], version)
    assert decision.passed, decision.summary()
    assert str(models.by_alias("reverse-digits", "candidate").version) == version
    logged = models.client().list_artifacts(gate_ws["parent"], "gates")
    assert {"gates/quality_gate_items.jsonl", "gates/quality_gate.md"} <= {a.path for a in logged}


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
    assert "exact_match" in str(err.value) and "vs >= 0.8000" in str(err.value)
