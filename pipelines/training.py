"""What SFT and DPO share: loading, LoRA, resumable checkpoints, distributed launch, metrics."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pipelines.common import METRICS, MODELS, log, write_json
from pipelines.config import LoraParams


def load_model_and_tokenizer(ref: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:  # many released checkpoints ship without one
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    return model, tokenizer


def lora_config(cfg: LoraParams):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def checkpoint_dir(stage: str, *fingerprint: object) -> Path:
    """Checkpoints live under a hash of everything that shapes the run, so a rerun after a crash
    resumes (same hash) while a changed config or dataset starts fresh (new hash).
    The folder is a DVC `persist` output: DVC does not wipe it before rerunning the stage."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return MODELS / "checkpoints" / stage / digest


def last_checkpoint(path: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(path)) if path.is_dir() else None


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def maybe_relaunch_distributed(nproc: int, module: str, deepspeed: str | None = None) -> bool:
    """Re-run this stage under torch.distributed.run when more than one process is asked for,
    or when DeepSpeed is on (even with one process: without a launcher's env vars DeepSpeed
    falls back to MPI discovery). Returns True in the launcher, which has nothing left to do."""
    if (nproc <= 1 and not deepspeed) or "LOCAL_RANK" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *sys.argv[1:]]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    subprocess.run(cmd, check=True)
    return True


def save_final(trainer, tokenizer, out_dir: Path, merge_lora: bool) -> None:
    """Save a plain Hugging Face checkpoint (adapters merged) so every later stage, lm-eval,
    llm-compressor and every serving engine can load it without knowing about PEFT."""
    model = trainer.model
    if merge_lora:
        model = model.merge_and_unload()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def write_training_metrics(stage: str, trainer, extra: dict) -> dict:
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    summary = {
        "steps": trainer.state.global_step,
        "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
        **extra,
    }
    write_json(METRICS / f"{stage}.json", summary)
    write_json(METRICS / f"{stage}_history.json", [h for h in history if "step" in h])
    return summary


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
