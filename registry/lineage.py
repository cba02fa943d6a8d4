"""Lineage: what a registered model was made from, as MLflow tags.

The git commit of the code, the dvc.lock hash of every artifact and every params section each
stage read, and the Prefect flow run. With these, `git checkout <sha> && dvc checkout` gives
back the exact bytes that made the model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

DVC_LOCK = Path("dvc.lock")


def git_commit() -> tuple[str, bool]:
    """(sha, dirty). 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
        return sha, dirty
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", False


def dvc_lock_hashes(lock: Path = DVC_LOCK) -> dict[str, str]:
    """{'<stage>:<path>': md5} for every output, and {'<stage>:params': digest} per stage."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    hashes: dict[str, str] = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            hashes[f"{name}:{out['path']}"] = out.get("md5", "")
        if stage.get("params"):
            digest = hashlib.md5(json.dumps(stage["params"], sort_keys=True).encode()).hexdigest()
            hashes[f"{name}:params"] = digest
    return hashes


def lineage_tags(flow_run_id: str | None, parent_run_id: str | None, stage_runs: dict[str, str]) -> dict[str, str]:
    sha, dirty = git_commit()
    tags = {
        "lineage.git_sha": sha,
        "lineage.git_dirty": str(dirty).lower(),
        "lineage.prefect_flow_run_id": flow_run_id or "none",
        "lineage.mlflow_parent_run_id": parent_run_id or "none",
    }
    tags.update({f"lineage.dvc.{k}": v for k, v in dvc_lock_hashes().items()})
    tags.update({f"lineage.stage_run.{k}": v for k, v in stage_runs.items()})
    return tags
