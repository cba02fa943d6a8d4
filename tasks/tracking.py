"""MLflow bookkeeping for a flow run: one parent run, one nested run per stage.

Stages write their metrics to files (so DVC can version them); these tasks copy them into
MLflow, which is where people compare runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS
from pipelines.config import Params, snapshot
from pipelines.plots import plot_history
from registry.lineage import dvc_lock_hashes, git_commit
from registry.store import client, experiment_id

# Which params section and metrics file belong to which stage.
STAGE_SECTIONS = {"generate": "data", "prepare": "prepare", "bootstrap": "model", "sft": "sft", "preference": "preference", "evaluate": "evaluate", "quantize": "quantize"}


def flatten(obj: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}".replace("/", "_")
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_parent_run(params: Params, flow_run_id: str | None) -> str:
    c = client()
    sha, dirty = git_commit()
    run = c.create_run(
        experiment_id(params.registry.experiment),
        run_name=f"lifecycle-{sha[:8]}",
        tags={"lineage.git_sha": sha, "lineage.git_dirty": str(dirty).lower(), "lineage.prefect_flow_run_id": flow_run_id or "none"},
    )
    c.log_text(run.info.run_id, snapshot(params), "effective_config.json")
    for section, values in params.model_dump(mode="json").items():
        for key, value in flatten({section: values}).items():
            c.log_param(run.info.run_id, key, value)
    return run.info.run_id


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_stage(parent_run_id: str, params: Params, result: dict) -> str:
    """A nested run for one stage: its params section, metrics, training curve and dvc hashes."""
    c = client()
    stage = result["stage"]
    parent = c.get_run(parent_run_id)
    hashes = {f"dvc.{k}": v for k, v in dvc_lock_hashes().items() if k.startswith(f"{stage}:")}
    run = c.create_run(
        parent.info.experiment_id,
        run_name=stage,
        tags={"mlflow.parentRunId": parent_run_id, "stage": stage, "cached": str(not result["ran"]).lower(), **hashes},
    )
    rid = run.info.run_id
    section = getattr(params, STAGE_SECTIONS[stage]).model_dump(mode="json")
    for key, value in flatten(section).items():
        c.log_param(rid, key, value)
    c.log_metric(rid, "stage_seconds", result["seconds"])
    metrics_file = METRICS / f"{stage}.json"
    if metrics_file.exists():
        for key, value in flatten(json.loads(metrics_file.read_text())).items():
            c.log_metric(rid, key, value)
    history_file = METRICS / f"{stage}_history.json"
    if history_file.exists():
        history = json.loads(history_file.read_text())
        for row in history:
            for key in ("loss", "eval_loss", "learning_rate", "rewards/accuracies", "rewards/margins"):
                if key in row:
                    c.log_metric(rid, key.replace("/", "_"), float(row[key]), step=int(row["step"]))
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_history(history, Path(tmp) / f"{stage}_loss.png", title=f"{stage}: loss by step")
            if png:
                c.log_artifact(rid, str(png), "plots")
    c.set_terminated(rid, "FINISHED")
    return rid


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def finish_parent_run(parent_run_id: str, status: str, summary: dict) -> None:
    c = client()
    for key, value in flatten(summary).items():
        c.log_metric(parent_run_id, key, value)
    c.log_text(parent_run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    c.set_tag(parent_run_id, "outcome", summary.get("outcome", status))
    c.set_terminated(parent_run_id, status)
