"""The DAG follows the recipe: dvc.yaml is rendered from params, the committed one is current,
a step the recipe does not name is not a stage, and DVC itself accepts what is rendered."""

import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.config import Params, load_params
from pipelines.dag import render, render_text, stage_names
from tests.conftest import ROOT


def test_committed_dvc_yaml_is_the_rendering_of_params_yaml():
    rendered = render_text(load_params(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == rendered, "dvc.yaml is stale: run `python -m pipelines.dag`"


def test_default_recipe_runs_sft_then_dpo():
    names = stage_names(load_params(ROOT / "params.yaml"))
    assert names == ["generate", "prepare", "bootstrap", "sft", "dpo", "evaluate", "quantize"]


def test_a_recipe_without_dpo_has_no_dpo_stage_and_chains_its_models():
    stages = render(Params(recipe=["sft", "kto"]))["stages"]
    assert "dpo" not in stages and "kto" in stages
    assert "models/sft" in stages["kto"]["deps"] and "data/prepared/kto_train.parquet" in stages["kto"]["deps"]
    assert stages["kto"]["params"] == ["kto", "compute"]
    assert "models/kto" in stages["evaluate"]["deps"] and "models/kto" in stages["quantize"]["deps"]
    assert "metrics/samples/kto.jsonl" in stages["evaluate"]["outs"]


def test_rl_after_a_reward_model_depends_on_it_and_starts_from_the_policy():
    params = Params.model_validate({"recipe": ["sft", "rm", "grpo"], "grpo": {"rewards": ["reward_model", "exact_match"]}})
    stages = render(params)["stages"]
    assert "models/sft" in stages["rm"]["deps"]
    assert "models/rm" in stages["grpo"]["deps"] and "models/sft" in stages["grpo"]["deps"]
    assert "metrics/samples/rm.jsonl" not in stages["evaluate"]["outs"], "a reward model is not a candidate"
    assert "models/rm" in stages["evaluate"]["deps"], "it scores every model's answers (reward_score)"
    assert "models/grpo" in stages["quantize"]["deps"]


def test_dvc_accepts_the_rendered_stages(tmp_path):
    params = Params.model_validate({"recipe": ["sft", "rm", "grpo"], "grpo": {"rewards": ["reward_model"]}})
    (tmp_path / "dvc.yaml").write_text(render_text(params))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([*dvc, "stage", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert listed == stage_names(params)
    assert Path(tmp_path / "dvc.yaml").read_text().startswith("# GENERATED")
