"""Registration: the served artifact (the quantized model) becomes an MLflow model version with
its lineage as tags, before the quality gate, so the gate's verdict is recorded on the version.
A rerun that produced the same bytes reuses the existing version, and bytes that were rejected
by a gate or rolled back by a canary are refused here unless a person approved them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS, QUANT_DIR, read_json
from pipelines.config import Params
from pipelines.feedback_export import feedback_lineage
from pipelines.gates import decide_quantization
from pipelines.recipe import final_step, model_dir
from registry.card import record_gate
from registry.graph import plot_lineage
from registry.lineage import dvc_lock_hashes, lineage_tags, load_record, log_record
from registry.models import NoStartPoint, blocked, find_by_model_hash, register, start_point
from registry.store import client
from tasks.gates import GateFailed


def _io_failure(task, task_run, state) -> bool:
    """Retry MLflow I/O errors; a refusal is a verdict, not a glitch."""
    return not isinstance(getattr(state, "data", None), (GateFailed, NoStartPoint))


@task(task_run_name="pin start model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_io_failure)
def pin_start_version(model_name: str, version: str | None) -> str:
    """The registered version a model.start_from: champion run trains from: the champion's, now
    (or the pinned one), checked to have trainable weights. Raises NoStartPoint naming the fix."""
    mv = start_point(model_name, version)
    print(f"starting from {model_name} version {mv.version}" + (" (the champion)" if version is None else ""))
    return str(mv.version)


@task(task_run_name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_io_failure)
def register_candidate(params: Params, parent_run_id: str, flow_run_id: str | None, stage_runs: dict[str, str]) -> dict:
    name = params.registry.model_name
    model_md5 = dvc_lock_hashes().get(f"quantize:{QUANT_DIR}")
    if not model_md5:
        raise RuntimeError("dvc.lock has no hash for the quantized model: run the quantize stage first")
    existing = find_by_model_hash(name, model_md5)
    if existing is not None:
        why = blocked(existing)
        if why:
            raise GateFailed(f"release refused, nothing was deployed:\n  {why}")
        print(f"model bytes unchanged (md5 {model_md5}): reusing version {existing.version}")
        return {"version": str(existing.version), "reused": True}
    served = read_json(METRICS / "quantize.json")
    unquantized = read_json(METRICS / "evaluate.json")["candidate"]
    tags = lineage_tags(flow_run_id, parent_run_id, stage_runs)
    # metric.* is what users get: the served (quantized) model's scores; the unquantized
    # model's are kept beside them as a diagnostic.
    tags.update({f"metric.{k}": str(v) for k, v in served.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tags.update({f"metric_unquantized.{k}": str(v) for k, v in unquantized.items() if isinstance(v, (int, float))})
    tags.update(feedback_lineage(params))  # the users' feedback it learnt from and was gated on, with its provenance
    tags["recipe"] = " -> ".join(params.recipe)
    tags["lineage.start_from"] = params.model.start_from
    if params.model.start_from == "champion":
        tags["lineage.start_version"] = str(params.model.start_version)
    tags["quantization"] = f"{served.get('scheme', 'none')}/{served.get('algorithm', 'none')}" if served.get("enabled") else "none"
    # The unquantized weights of the step that became the candidate, for a later run to train
    # from (model.start_from: champion); the served folder itself when it was not quantized.
    trainable = None
    if params.registry.keep_trainable:
        trainable = model_dir(unquantized.get("step") or final_step(params.recipe)) if served.get("enabled") else QUANT_DIR
    mv = register(name, QUANT_DIR, parent_run_id, model_md5, tags, trainable_dir=trainable)
    version = str(mv.version)
    # The record that makes the version reproducible without committing anything: its dvc.lock,
    # params, DAG, raw-input pointers and uncommitted code changes (the bytes are in the DVC remote).
    log_record(parent_run_id)
    quant = decide_quantization(served, unquantized, params.quantize, params.evaluate.directions())
    record_gate(name, version, "quantization", quant.passed, "; ".join(quant.reasons) or f"every suite metric within {params.quantize.max_drop} of the unquantized model")
    record = load_record(parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_lineage(name, client().get_model_version(name, version), record, Path(tmp) / "lineage.png")
        client().log_artifact(parent_run_id, str(png), "lineage")
    print(f"registered {name} version {version} (no alias until the quality gate passes); lineage: `lifecycle lineage {version}`")
    return {"version": version, "reused": False}
