"""Shared fixtures: a tiny workspace (generated data, prepared splits, a bootstrapped tiny
Llama) built once per session and copied for each test that trains, so stages run on real
files exactly as under DVC, only smaller."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipelines import bootstrap, generate, prepare, sft
from pipelines.config import ComputeParams, DpoParams, EvaluateParams, GenerateParams, ModelParams, Params, PeftParams, SftParams

ROOT = Path(__file__).resolve().parents[1]

# One torch thread in the test process, as the embedded default's stages run (params.yaml
# compute.cpu_threads): the tiny models' ops gain little from a second thread and stall 4x
# whenever another process holds a core, which on a shared 2-core machine is most of the time.
torch.set_num_threads(1)


def tiny_params(**overrides) -> Params:
    """A config small enough to train in seconds on two cores, same code paths as the default."""
    base = dict(
        generate=GenerateParams(n_sft=400, n_preference=160),
        model=ModelParams(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300),
        sft=SftParams(max_steps=12, batch_size=8, save_steps=6, warmup_steps=0),
        dpo=DpoParams(max_steps=4, batch_size=4),
        evaluate=EvaluateParams(limit=8, batch_size=8, max_new_tokens=12),
        compute=ComputeParams(cpu_threads=1),
    )
    base.update(overrides)
    return Params(**base)


def build_workspace(d: Path, params: Params, *stages) -> Path:
    """Run stages (modules with `run(params)`) in folder `d`, as DVC would, then come back."""
    cwd = os.getcwd()
    os.chdir(d)
    try:
        for stage in stages:
            stage.run(params)
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("prepared"), tiny_params(), generate, prepare, bootstrap)


@pytest.fixture
def workspace(prepared_dir, tmp_path, monkeypatch) -> Path:
    """A private copy of the tiny workspace, as the current directory."""
    for sub in ("data", "models", "metrics"):
        if (prepared_dir / sub).exists():
            shutil.copytree(prepared_dir / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained_dir(prepared_dir, tmp_path_factory) -> Path:
    """A workspace whose models/sft has learned the demo task (default model size, 150 full SFT
    steps, ~10 s): for tests that need a model that answers and stops, like a champion."""
    d = tmp_path_factory.mktemp("trained")
    shutil.copytree(prepared_dir / "data", d / "data")
    params = tiny_params(model=ModelParams(), sft=SftParams(peft=PeftParams(method="full"), max_steps=150, batch_size=32, save_steps=150, learning_rate=3e-3))
    return build_workspace(d, params, bootstrap, sft)
