"""Gate tasks: read metrics, call the pure decision, publish the report, stop the flow on failure."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import METRICS, read_json
from pipelines.config import Params
from pipelines.gates import Decision, decide, decide_quantization
from registry.models import CHAMPION, by_alias, metrics_of


class GateFailed(RuntimeError):
    """Raised to stop the flow; the message says which metric failed and by how much."""


def publish(decision: Decision, key: str) -> None:
    rows = "\n".join(
        f"| {c.metric} | {c.rule} | {'' if c.value is None else f'{c.value:.4f}'} | {'' if c.bound is None else f'{c.bound:.4f}'} | {'pass' if c.passed else '**FAIL**'} |"
        for c in decision.checks
    )
    create_markdown_artifact(
        key=key,
        markdown=f"## {decision.gate} gate: {'passed' if decision.passed else 'FAILED'}\n\n| metric | rule | value | bound | result |\n|---|---|---|---|---|\n{rows}\n",
        description=f"{decision.gate} gate report",
    )


@task(cache_policy=NO_CACHE)
def quality_gate(params: Params) -> Decision:
    results = read_json(METRICS / "evaluate.json")
    champion = metrics_of(by_alias(params.registry.model_name, CHAMPION))
    decision = decide(results["dpo"], results["base"], champion, params.gate)
    publish(decision, "quality-gate")
    print(decision.summary())
    if not decision.passed:
        raise GateFailed("quality gate failed, nothing was deployed:\n  " + "\n  ".join(decision.reasons))
    return decision


@task(cache_policy=NO_CACHE)
def quantization_gate(params: Params) -> Decision:
    decision = decide_quantization(read_json(METRICS / "quantize.json"), read_json(METRICS / "evaluate.json")["dpo"], params.quantize)
    publish(decision, "quantization-gate")
    print(decision.summary())
    if not decision.passed:
        raise GateFailed("quantization gate failed, nothing was deployed:\n  " + "\n  ".join(decision.reasons))
    return decision
