"""SFT and DPO train for real (TRL) on the tiny workspace: weights change, metrics are written,
and a killed run resumes from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pipelines import preference, sft
from pipelines.config import LoraParams, SftParams
from tests.conftest import ROOT, tiny_params


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def changed(before: dict, after: dict) -> dict[str, bool]:
    return {k: not (before[k] == after[k]).all().item() for k in before}


def test_full_sft_changes_every_weight(workspace):
    params = tiny_params(sft=SftParams(method="full", max_steps=8, batch_size=8, eval_steps=4, warmup_steps=0))
    before = weights("models/base")
    sft.run(params)
    diff = changed(before, weights("models/sft"))
    assert all(diff.values()), f"unchanged tensors: {[k for k, v in diff.items() if not v]}"
    metrics = json.loads(Path("metrics/sft.json").read_text())
    assert metrics["steps"] == 8 and metrics["eval_loss"] > 0
    assert not list(Path("models/checkpoints/sft").glob("*")), "finished runs clean up their checkpoints"


def test_lora_sft_merges_adapters_into_targets_only(workspace):
    params = tiny_params(sft=SftParams(method="lora", lora=LoraParams(r=4, alpha=8), max_steps=8, batch_size=8, eval_steps=4))
    before = weights("models/base")
    sft.run(params)
    after = weights("models/sft")
    assert set(after) == set(before), "the saved model is a plain merged checkpoint, no adapter keys"
    diff = changed(before, after)
    linear = [k for k in diff if k.endswith(("proj.weight",))]
    assert linear and all(diff[k] for k in linear)
    assert not any(diff[k] for k in diff if "norm" in k), "LoRA must not touch the norms"
    assert not diff["model.embed_tokens.weight"], "embeddings are frozen unless listed in modules_to_save"


def test_dpo_changes_the_sft_model_and_reports_preference_accuracy(workspace):
    params = tiny_params()
    sft.run(params)
    before = weights("models/sft")
    preference.run(params)
    diff = changed(before, weights("models/dpo"))
    assert any(diff.values())
    metrics = json.loads(Path("metrics/preference.json").read_text())
    assert 0.0 <= metrics["preference_accuracy"] <= 1.0 and metrics["steps"] == 4
    assert 0.0 <= metrics["preference_accuracy_before"] <= 1.0


def run_stage(module: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", module], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_killed_sft_resumes_from_its_checkpoint(workspace):
    params = tiny_params(sft=SftParams(method="full", max_steps=3000, batch_size=4, eval_steps=20, warmup_steps=0))
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    proc = run_stage("pipelines.sft", workspace)
    deadline = time.time() + 180
    while not list(Path("models/checkpoints/sft").glob("*/checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(Path("models/checkpoints/sft").glob("*/checkpoint-*")), "no checkpoint was written before the kill"
    assert not Path("models/sft").exists()

    resumed = tiny_params(sft=SftParams(method="full", max_steps=3000, batch_size=4, eval_steps=20, warmup_steps=0))
    assert resumed == params
    proc = run_stage("pipelines.sft", workspace)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    metrics = json.loads(Path("metrics/sft.json").read_text())
    assert metrics["resumed_from"] and "checkpoint-" in metrics["resumed_from"]
    assert metrics["steps"] == 3000


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_deepspeed_zero2_under_torch_distributed(workspace, nproc):
    ds = str(ROOT / "configs/deepspeed/zero2.json")
    params = tiny_params(sft=SftParams(method="full", max_steps=6, batch_size=4, eval_steps=3, warmup_steps=0, nproc=nproc, deepspeed=ds))
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    before = weights("models/base")
    proc = run_stage("pipelines.sft", workspace)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    metrics = json.loads(Path("metrics/sft.json").read_text())
    assert metrics["world_size"] == nproc and metrics["steps"] == 6
    assert all(changed(before, weights("models/sft")).values())
