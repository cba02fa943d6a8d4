"""model.start_from: champion, at the stages: start_model fetches the pinned version's trainable
weights from a real MLflow registry, and the recipe's first step (DPO here) trains from exactly
those, not from the base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines import dpo, start_model
from tests.conftest import tiny_params


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture
def champion(workspace, monkeypatch):
    """A champion whose trainable weights are the tiny base with noise on them (so they differ
    from models/base), served as another folder, as a quantized champion would be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    from registry import models
    from registry.store import client, experiment_id

    model = AutoModelForCausalLM.from_pretrained("models/base")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    trainable, served = workspace / "champion-trainable", workspace / "champion-served"
    for folder in (trainable, served):
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained("models/base").save_pretrained(folder)
    run = client().create_run(experiment_id("test")).info.run_id
    version = str(models.register("reverse-digits", served, run, "champ", {}, trainable_dir=trainable).version)
    models.promote("reverse-digits", version)
    return version, trainable


def test_dpo_from_the_champion_starts_from_its_trainable_weights_and_changes_them(workspace, champion):
    """Seen red: with training.step_inputs calling input_model without model.start_from, DPO
    trained from models/base (metrics/dpo.json input_model was 'models/base')."""
    version, trainable = champion
    params = tiny_params(recipe=["dpo"], model=tiny_params().model.model_copy(update={"start_from": "champion", "start_version": version}))
    start_model.run(params)
    start, base = weights(workspace / "models/start"), weights(workspace / "models/base")
    champ = weights(trainable)
    assert start.keys() == champ.keys() and all(torch.equal(start[k], champ[k]) for k in champ), "models/start holds the champion's trainable weights"
    assert not all(torch.equal(start[k], base[k]) for k in base), "...which are not the base's"
    assert json.loads((workspace / "models/start/START.json").read_text())["version"] == version

    dpo.run(params)
    assert json.loads((workspace / "metrics/dpo.json").read_text())["input_model"] == "models/start"
    trained = weights(workspace / "models/dpo")
    changed = [k for k in start if not torch.equal(trained[k], start[k])]
    adapted = [k for k in start if k.endswith("proj.weight")]  # DPO's LoRA targets every linear layer
    assert adapted and set(adapted) <= set(changed), f"DPO left {sorted(set(adapted) - set(changed))} as the champion had them"


def test_the_stage_refuses_an_unpinned_start(workspace, champion):
    """A stage never follows the moving alias: without a pinned version it names the fix."""
    params = tiny_params(recipe=["dpo"], model=tiny_params().model.model_copy(update={"start_from": "champion"}))
    with pytest.raises(SystemExit, match=r"model.start_version is not set.*pins the champion's version.*model.start_version: N"):
        start_model.run(params)
