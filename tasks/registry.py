"""Registration: the quantized model becomes an MLflow model version with alias `candidate`
and its lineage as tags. A rerun that produced the same bytes reuses the existing version."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS, QUANT_DIR, read_json
from pipelines.config import Params
from registry.lineage import dvc_lock_hashes, lineage_tags
from registry.models import CANDIDATE, CHAMPION, by_alias, find_by_model_hash, register
from registry.store import client


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_candidate(params: Params, parent_run_id: str, flow_run_id: str | None, stage_runs: dict[str, str]) -> dict:
    name = params.registry.model_name
    model_md5 = dvc_lock_hashes().get(f"quantize:{QUANT_DIR}")
    if not model_md5:
        raise RuntimeError("dvc.lock has no hash for the quantized model: run the quantize stage first")
    existing = find_by_model_hash(name, model_md5)
    if existing is not None:
        champion = by_alias(name, CHAMPION)
        if champion is None or str(champion.version) != str(existing.version):
            client().set_registered_model_alias(name, CANDIDATE, str(existing.version))
        print(f"model bytes unchanged (md5 {model_md5}): reusing version {existing.version}")
        return {"version": str(existing.version), "reused": True}
    evaluated = read_json(METRICS / "evaluate.json")["candidate"]
    quantized = read_json(METRICS / "quantize.json")
    tags = lineage_tags(flow_run_id, parent_run_id, stage_runs)
    tags.update({f"metric.{k}": str(v) for k, v in evaluated.items() if isinstance(v, (int, float))})
    tags["recipe"] = " -> ".join(params.recipe)
    tags["metric_quantized.exact_match"] = str(quantized["exact_match"])
    tags["quantization"] = f"{quantized.get('scheme', 'none')}/{quantized.get('algorithm', 'none')}" if quantized.get("enabled") else "none"
    mv = register(name, QUANT_DIR, parent_run_id, model_md5, tags)
    print(f"registered {name} version {mv.version} as '{CANDIDATE}'")
    return {"version": str(mv.version), "reused": False}
