"""MLflow bookkeeping for a flow run: one parent run, one nested run per stage.

Stages write their metrics to files (so DVC can version them); these tasks copy them into
MLflow, which is where people compare runs."""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS
from pipelines.config import Params, snapshot
from pipelines.plots import plot_history
from pipelines.redact import redacted
from registry.lineage import dvc_lock_hashes, git_commit
from registry.store import client, experiment_id

# Which params section belongs to which stage; a recipe step reads the section of its own name.
STAGE_SECTIONS = {"generate": "generate", "prepare": "prepare", "bootstrap": "model", "start_model": "model", "evaluate": "evaluate", "quantize": "quantize"}
SCHEMA_SAMPLE_ROWS = 200
CURVES = ("loss", "eval_loss", "learning_rate", "rewards/accuracies", "rewards/margins", "reward", "accuracy")


def flatten(obj: dict, prefix: str = "") -> dict[str, float]:
    """Nested numbers as MLflow-safe dotted keys ('sft_rows.train')."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        key = re.sub(r"[^\w.\-/ ]", "_", f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def flatten_params(obj: dict, prefix: str = "") -> dict[str, object]:
    """Every config value (numbers, strings, lists) as a dotted MLflow param."""
    out: dict[str, object] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@task(task_run_name="mlflow: open run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_parent_run(params: Params, flow_run_id: str | None) -> str:
    c = client()
    sha, dirty = git_commit()
    run = c.create_run(
        experiment_id(params.registry.experiment),
        run_name=f"lifecycle-{sha[:8]}",
        tags={"lineage.git_sha": sha, "lineage.git_dirty": str(dirty).lower(), "lineage.prefect_flow_run_id": flow_run_id or "none"},
    )
    c.log_text(run.info.run_id, snapshot(params), "effective_config.json")
    flat = flatten_params(redacted(params.model_dump(mode="json")))  # a record.store password or a webhook token stays out
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
    return run.info.run_id


@task(task_run_name="mlflow: log {result[stage]}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_stage(parent_run_id: str, params: Params, result: dict) -> str:
    """A nested run for one stage: its params section, metrics, training curve and dvc hashes."""
    c = client()
    stage = result["stage"]
    parent = c.get_run(parent_run_id)
    hashes = {f"dvc.{k}": v for k, v in dvc_lock_hashes().items() if k.startswith(f"{stage}:")}
    run = c.create_run(
        parent.info.experiment_id,
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "stage": stage,
            "cached": str(not result["ran"]).lower(),
            **{k: v for k, v in parent.data.tags.items() if k.startswith("lineage.")},  # git SHA, flow run
            **hashes,
        },
    )
    rid = run.info.run_id
    section = redacted(getattr(params, STAGE_SECTIONS.get(stage, stage)).model_dump(mode="json"))
    c.log_batch(rid, params=[Param(k, str(v)) for k, v in flatten_params(section).items()])
    now = int(time.time() * 1000)
    metrics = [Metric("stage_seconds", result["seconds"], now, 0)]
    metrics_file = METRICS / f"{stage}.json"
    if metrics_file.exists():
        metrics += [Metric(k, v, now, 0) for k, v in flatten(json.loads(metrics_file.read_text())).items()]
    history_file = METRICS / f"{stage}_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    for row in history:  # training curves, step by step
        for key in CURVES:
            if key in row:
                metrics.append(Metric(key.replace("/", "_"), float(row[key]), now, int(row["step"])))
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        c.log_batch(rid, metrics=metrics[i : i + 1000])
    if history:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_history(history, Path(tmp) / f"{stage}_loss.png", title=f"{stage}: loss by step")
            if png:
                c.log_artifact(rid, str(png), "plots")
    if stage == "prepare":
        log_data_card(rid)
    c.set_terminated(rid, "FINISHED")
    return rid


def log_data_card(run_id: str) -> None:
    """Every prepared table as an MLflow dataset input (name, digest, source, schema), and the
    data card, its length histogram and the Great Expectations Data Docs as artifacts."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    from pipelines.common import PREPARED
    from pipelines.common import file_digest

    # A local path reads as two kinds of source to MLflow; either is right, the warning is noise.
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
    inputs = []
    for path in sorted(PREPARED.glob("*.parquet")):
        frame = pd.read_parquet(path)
        if frame.empty:
            continue
        # The schema is inferred from the first rows (MLflow walks every nested value of every
        # row otherwise: seconds for the chat tables); the profile counts the whole table.
        ds = mlflow.data.from_pandas(frame.head(SCHEMA_SAMPLE_ROWS), source=str(path), name=path.stem, digest=file_digest(path))
        entity = ds._to_mlflow_entity()
        entity._profile = json.dumps({"num_rows": len(frame), "num_elements": int(frame.size)})
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", path.stem.rsplit("_", 1)[-1])]))
    c = client()
    if inputs:
        c.log_inputs(run_id, datasets=inputs)
    reports = Path("reports/data")  # data_card.json, data_card.png, data_docs/
    if reports.is_dir():
        c.log_artifacts(run_id, str(reports), "data")


@task(task_run_name="mlflow: close run ({status})", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def finish_parent_run(parent_run_id: str, status: str, summary: dict) -> None:
    c = client()
    now = int(time.time() * 1000)
    c.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in flatten(summary).items()])
    c.log_text(parent_run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    c.set_tag(parent_run_id, "outcome", summary.get("outcome", status))
    c.set_terminated(parent_run_id, status)
