"""Gate tasks: gather metrics, call the pure decision, publish the report (table + chart to
MLflow and Prefect), stop the flow on failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS, read_json
from pipelines.config import Params
from pipelines.gates import Decision, decide, decide_quantization, mean_interval, pair_items
from pipelines.plots import plot_gate
from registry.models import CHAMPION, REJECTED, by_alias, download, mark_candidate, metrics_of, set_status
from registry.store import client

GATE_DIR = Path(".serving/gate")  # the champion, downloaded to be re-scored (removed after)


class GateFailed(RuntimeError):
    """Raised to stop the flow; the message says which metric failed and by how much."""


def publish(decision: Decision, key: str) -> str:
    rows = "\n".join(
        f"| {c.metric} | {c.rule} | {'' if c.value is None else f'{c.value:.4f}'} | {'' if c.bound is None else f'{c.bound:.4f}'} | {'pass' if c.passed else '**FAIL**'} |"
        for c in decision.checks
    )
    markdown = f"## {decision.gate} gate: {'passed' if decision.passed else 'FAILED'}\n\n| metric | rule | value | bound | result |\n|---|---|---|---|---|\n{rows}\n"
    create_markdown_artifact(key=key, markdown=markdown, description=f"{decision.gate} gate report")
    return markdown


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def champion_items(params: Params, version: str) -> tuple[object | None, list[dict] | None]:
    """The champion's served model scored item by item on *this* run's test items with the same
    settings as the candidate, so the two are compared like for like. Skipped when the
    candidate is the champion (a rerun that produced the same bytes)."""
    mv = by_alias(params.registry.model_name, CHAMPION)
    if mv is None:
        return None, None
    if str(mv.version) == str(version):
        print(f"candidate is champion v{mv.version} itself: paired comparison skipped")
        return mv, None
    from pipelines.evaluate import exact_match  # lm-eval is heavy: import only when needed

    champion_dir = download(mv, GATE_DIR / f"v{mv.version}")
    try:
        _, items = exact_match(str(champion_dir), params.evaluate, compute=params.compute)
    finally:
        shutil.rmtree(GATE_DIR, ignore_errors=True)
    return mv, items


def item_table(candidate: list[dict], champion: list[dict] | None) -> str:
    """Both models' per-item scores side by side: the audit trail of a gate decision."""
    champ = {c["id"]: c for c in champion or []}
    rows = [
        {"id": c["id"], "prompt": c.get("prompt"), "target": c.get("target"), "candidate": c["response"], "candidate_exact_match": c["exact_match"],
         **({"champion": champ[c["id"]]["response"], "champion_exact_match": champ[c["id"]]["exact_match"]} if c["id"] in champ else {})}
        for c in candidate
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


@task(cache_policy=NO_CACHE)
def quality_gate(params: Params, parent_run_id: str, version: str) -> Decision:
    """The served artifact (quantized when quantization is on) against the base, the absolute
    thresholds and, item by item, the champion's served artifact. The verdict is recorded on
    the version: a rejected version keeps that status (registry.models.blocked)."""
    served = read_json(METRICS / "quantize.json")
    results = read_json(METRICS / "evaluate.json")
    candidate_items = read_items(METRICS / "samples/quantized.jsonl")
    base_items = read_items(METRICS / "samples/base.jsonl")
    mv, champ_items = champion_items(params, version)
    paired = {"exact_match": pair_items(candidate_items, champ_items, "exact_match")} if champ_items else None
    decision = decide(served, results["base"], metrics_of(mv) if mv is not None and str(mv.version) != str(version) else None, params.gate, paired=paired)

    def interval(items: list[dict]) -> tuple[float, float, float]:
        i = mean_interval([float(x["exact_match"]) for x in items], params.gate.bootstrap_resamples, params.gate.confidence)
        return i.mean, i.low, i.high

    chart_data = {"base": {"exact_match": interval(base_items)}, "candidate": {"exact_match": interval(candidate_items)}}
    if champ_items:
        chart_data["champion"] = {"exact_match": interval(champ_items)}
    for name, block in (("base", results["base"]), ("candidate", served)):
        if block.get("validation_loss") is not None:
            v = block["validation_loss"]
            chart_data[name]["validation_loss"] = (v, v, v)
    chart = plot_gate(chart_data, Path(".serving/reports/quality_gate.png"), f"quality gate: {'passed' if decision.passed else 'FAILED'}")
    markdown = publish(decision, "quality-gate")
    c = client()
    c.log_artifact(parent_run_id, str(chart), "gates")
    c.log_text(parent_run_id, markdown, "gates/quality_gate.md")
    c.log_text(parent_run_id, item_table(candidate_items, champ_items), "gates/quality_gate_items.jsonl")
    print(decision.summary())
    name = params.registry.model_name
    if not decision.passed:
        set_status(name, version, REJECTED, "quality gate: " + "; ".join(decision.reasons))
        raise GateFailed(f"quality gate failed, version {version} rejected, nothing was deployed:\n  " + "\n  ".join(decision.reasons))
    if mv is None or str(mv.version) != str(version):
        mark_candidate(name, version)
    return decision


@task(cache_policy=NO_CACHE)
def quantization_gate(params: Params, parent_run_id: str) -> Decision:
    decision = decide_quantization(read_json(METRICS / "quantize.json"), read_json(METRICS / "evaluate.json")["candidate"], params.quantize)
    client().log_text(parent_run_id, publish(decision, "quantization-gate"), "gates/quantization_gate.md")
    print(decision.summary())
    if not decision.passed:
        raise GateFailed("quantization gate failed, nothing was deployed:\n  " + "\n  ".join(decision.reasons))
    return decision
