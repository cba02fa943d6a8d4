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
from pipelines import eval_report
from pipelines.directions import FEEDBACK_SLICE_METRIC
from pipelines.gates import Decision, decide, decide_quantization, pair_items
from pipelines.plots import plot_gate
from registry.models import CHAMPION, REJECTED, UNDECIDED, by_alias, download, mark_candidate, metrics_of, set_status
from registry.card import record_gate
from registry.store import client
from tasks.notify import notify

GATE_DIR = Path(".serving/gate")  # the champion, downloaded to be re-scored (removed after)


class GateFailed(RuntimeError):
    """Raised to stop the flow; the message says which metric failed and by how much."""


def notified(exc: GateFailed) -> GateFailed:
    """Marks a failure whose notification this module already sent (the flow sends none again)."""
    exc.notified = True
    return exc


def publish_text(decision: Decision) -> str:
    def result(c) -> str:
        return "**undecided**" if c.pending and not c.passed else "undecided (passed)" if c.pending else "pass" if c.passed else "**FAIL**"

    rows = "\n".join(
        f"| {c.metric} | {c.rule} | {'' if c.value is None else f'{c.value:.4f}'} | {'' if c.bound is None else f'{c.bound:.4f}'} | {result(c)} | {c.text.replace('|', '/')} |"
        for c in decision.checks
    )
    head = {"pass": "passed", "fail": "FAILED", "continue": "UNDECIDED (not enough items to tell)"}[decision.outcome]
    return f"## {decision.gate} gate: {head}\n\n| metric | rule | value | bound | result | verdict |\n|---|---|---|---|---|---|\n{rows}\n"


def publish(decision: Decision, key: str) -> str:
    markdown = publish_text(decision)
    create_markdown_artifact(key=key, markdown=markdown, description=f"{decision.gate} gate report")
    return markdown


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def champion_items(params: Params, version: str) -> tuple[object | None, list[dict] | None]:
    """The champion's served model scored item by item on *this* run's items with the same
    suite and settings as the candidate (and this run's reward model), so the two are compared
    like for like. Skipped when the candidate is the champion (a rerun that produced the same
    bytes)."""
    mv = by_alias(params.registry.model_name, CHAMPION)
    if mv is None:
        return None, None
    if str(mv.version) == str(version):
        print(f"candidate is champion v{mv.version} itself: paired comparison skipped")
        return mv, None
    from pipelines.evaluate import add_reward_scores, preference_scores, reward_model_of, run_suite  # lm-eval is heavy: import only when needed

    champion_dir = download(mv, GATE_DIR / f"v{mv.version}")
    try:
        _, items, _ = run_suite(str(champion_dir), params.evaluate, compute=params.compute)
        add_reward_scores(items, reward_model_of(params), params.compute, params.evaluate.tasks[0].name)
        items += preference_scores(str(champion_dir), compute=params.compute, slice_source=params.evaluate.feedback_slice)[1]  # the feedback slice, item by item
    finally:
        shutil.rmtree(GATE_DIR, ignore_errors=True)
    return mv, items


def judge_items(params: Params, candidate: list[dict], champion: list[dict]) -> list[dict]:
    """The judge's verdicts on the candidate's and the champion's answers (as served, unfiltered)
    to the judged task's held-out prompts."""
    cfg = params.evaluate.judge
    if not cfg.enabled:
        return []
    from pipelines.judge import judge_pairs

    task = cfg.task or params.evaluate.tasks[0].name
    champ = {c["id"]: c for c in champion if c["task"] == task}
    pairs = [
        {"id": c["id"], "prompt": c["prompt"], "candidate": c.get("raw") or c.get("response") or "", "champion": champ[c["id"]].get("raw") or champ[c["id"]].get("response") or ""}
        for c in candidate if c["task"] == task and c["id"] in champ
    ]
    return judge_pairs(pairs, cfg) if pairs else []


def item_table(candidate: list[dict], champion: list[dict] | None, judged: list[dict] | None = None) -> str:
    """Both models' per-item answers and scores side by side, with the judge's verdicts: the
    audit trail of a gate decision."""
    champ = {c["id"]: c for c in champion or []}
    verdicts = {j["id"]: j for j in judged or []}
    rows = []
    for c in candidate:
        scores = {k: v for k, v in c.items() if "/" in k or k == "reward_score"}
        row = {"id": c["id"], "task": c.get("task"), "prompt": c.get("prompt"), "target": c.get("target"), "candidate": c.get("raw") or c.get("response"), **{f"candidate:{k}": v for k, v in scores.items()}}
        if c["id"] in champ:
            other = champ[c["id"]]
            row |= {"champion": other.get("raw") or other.get("response"), **{f"champion:{k}": v for k, v in other.items() if "/" in k or k == "reward_score"}}
        if c["id"] in verdicts:
            row |= {"judge_win_rate": verdicts[c["id"]]["judge_win_rate"], "judge_verdicts": verdicts[c["id"]]["verdicts"]}
        rows.append(row)
    return "".join(json.dumps(r) + "\n" for r in rows)


@task(task_run_name="quality gate v{version}", cache_policy=NO_CACHE)
def quality_gate(params: Params, parent_run_id: str, version: str) -> Decision:
    """The served artifact (quantized when quantization is on) against the base, the absolute
    thresholds and, item by item, the champion's served artifact on every suite metric, the
    reward model and the judge. The verdict is recorded on the version: a rejected version keeps
    that status (registry.models.blocked). The evaluation report goes to MLflow and Prefect."""
    served = read_json(METRICS / "quantize.json")
    results = read_json(METRICS / "evaluate.json")
    candidate_items = read_items(METRICS / "samples/quantized.jsonl")
    items = {"base": read_items(METRICS / "samples/base.jsonl")}
    if (METRICS / "samples/candidate.jsonl").exists() and served.get("enabled", True):
        items["unquantized"] = read_items(METRICS / "samples/candidate.jsonl")
    items["served"] = candidate_items
    mv, champ_items = champion_items(params, version)
    directions = params.evaluate.directions()
    paired: dict[str, tuple[list[float], list[float]]] = {}
    judged: list[dict] = []
    feedback_slice = None
    if champ_items:
        items["champion"] = champ_items
        for metric in [*directions, "reward_score"]:
            cand, ref = pair_items(candidate_items, champ_items, metric)
            if cand:
                paired[metric] = (cand, ref)
        cand, ref = pair_items(candidate_items, champ_items, FEEDBACK_SLICE_METRIC)  # the held-out feedback, when there is some
        feedback_slice = (cand, ref) if cand else None
        judged = judge_items(params, candidate_items, champ_items)
        if judged:
            paired["judge_win_rate"] = ([j["judge_win_rate"] for j in judged], [0.5] * len(judged))
    registered = metrics_of(mv) if mv is not None and str(mv.version) != str(version) else None
    decision = decide(
        served, results["base"], registered, params.gate, paired=paired or None, directions=directions, beat_base=params.evaluate.beat_base(),
        tolerances=params.evaluate.tolerances(), steps=results.get("steps"), candidate_step=results["candidate"].get("step"), feedback_slice=feedback_slice,
    )
    scalars = {"base": results["base"], "unquantized": results["candidate"], "served": served}
    markdown, chart_data = eval_report.render(items, paired, decision, params.gate, judged, {n: {k: b.get(k) for k in ("validation_loss", "preference_accuracy")} for n, b in scalars.items()}, directions)
    chart = plot_gate(chart_data, Path(".serving/reports/quality_gate.png"), f"quality gate: {'passed' if decision.passed else 'FAILED'}")
    create_markdown_artifact(key="evaluation-report", markdown=markdown, description="evaluation report: per task, paired, judge")
    publish(decision, "quality-gate")
    c = client()
    c.log_artifact(parent_run_id, str(chart), "gates")
    c.log_text(parent_run_id, markdown, "gates/evaluation_report.md")
    c.log_text(parent_run_id, publish_text(decision), "gates/quality_gate.md")
    c.log_text(parent_run_id, item_table(candidate_items, champ_items, judged), "gates/quality_gate_items.jsonl")
    print(decision.summary())
    name = params.registry.model_name
    undecided = decision.outcome == "continue"  # nothing failed; some metric had too few items to tell
    if not decision.passed:
        # A rejection sticks to the bytes; an undecided verdict does not: the same model may be
        # judged again on more items.
        set_status(name, version, UNDECIDED if undecided else REJECTED, "quality gate: " + "; ".join(decision.reasons))
    record_gate(name, version, "quality", decision.passed, "; ".join(decision.reasons) or f"{len(decision.checks)} checks passed")
    if not decision.passed:
        verdict = "could not tell (not enough items), version {v} not promoted" if undecided else "failed, version {v} rejected"
        notify(params, "gate_failed", f"quality gate {verdict.format(v=version)}: " + "; ".join(decision.reasons), gate="quality", version=version, reasons=decision.reasons)
        raise notified(GateFailed(f"quality gate {verdict.format(v=version)}, nothing was deployed:\n  " + "\n  ".join(decision.reasons)))
    if mv is None or str(mv.version) != str(version):
        mark_candidate(name, version)
    return decision


@task(task_run_name="quantization gate", cache_policy=NO_CACHE)
def quantization_gate(params: Params, parent_run_id: str) -> Decision:
    decision = decide_quantization(read_json(METRICS / "quantize.json"), read_json(METRICS / "evaluate.json")["candidate"], params.quantize, params.evaluate.directions())
    client().log_text(parent_run_id, publish(decision, "quantization-gate"), "gates/quantization_gate.md")
    print(decision.summary())
    if not decision.passed:
        notify(params, "gate_failed", "quantization gate failed: " + "; ".join(decision.reasons), gate="quantization", reasons=decision.reasons)
        raise notified(GateFailed("quantization gate failed, nothing was deployed:\n  " + "\n  ".join(decision.reasons)))
    return decision
