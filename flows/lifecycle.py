"""The lifecycle flow: data -> base -> the recipe's training steps (e.g. SFT -> DPO) ->
evaluate -> quantize -> quant gate -> register -> quality gate (the served artifact against
the champion's) -> canary -> promote or roll back.

Reads like the DAG it runs. Artifact stages are DVC's (skipped when nothing changed); gates,
registration and deployment are Prefect tasks; MLflow gets one parent run per flow run and a
nested run per stage. Run it with `make pipeline`, `python -m flows.lifecycle`, a Prefect
deployment (flows/schedule.py), or from the Prefect UI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipelines.common import METRICS, read_json
from pipelines.config import ConfigError, Params, load_params
from pipelines.dag import stage_names, sync
from tasks.deploy import canary_release
from tasks.gates import GateFailed, quality_gate, quantization_gate
from tasks.registry import register_candidate
from tasks.stages import push_artifacts, repro
from tasks.tracking import finish_parent_run, log_stage, start_parent_run



def summary_table(stages: list[dict]) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {'ran' if s['ran'] else 'cached (skipped)'} | {s['seconds']:.1f} |" for s in stages]
    return "\n".join(lines)


def quality_summary(params: Params) -> dict:
    """Every suite metric (and preference accuracy) per model: {metric: {model: value}}."""
    ev = read_json(METRICS / "evaluate.json")
    q = read_json(METRICS / "quantize.json") if (METRICS / "quantize.json").exists() else {}
    models = [name for name in ev if name != "candidate"]
    out = {m: {name: ev[name].get(m) for name in models} | ({"quantized": q.get(m)} if q else {}) for m in params.evaluate.directions()}
    out["preference_accuracy"] = {name: ev[name].get("preference_accuracy") for name in models}
    return out


@flow(name="llm-lifecycle", log_prints=True)
def lifecycle(deploy: bool = True, canary_drill: list[str] | None = None) -> dict:
    """`canary_drill`: extra server flags for the candidate (e.g. ["--fault-error-rate", "1.0"])
    to rehearse a rollback through the real release path."""
    # DVC stages read ./params.yaml, so the flow reads exactly that file too: one source of truth.
    params: Params = load_params()  # invalid config fails here, before any work
    parent = start_parent_run(params, flow_run.id)
    stages: list[dict] = []
    stage_runs: dict[str, str] = {}
    summary: dict = {"mlflow_parent_run_id": parent, "stages": stages, "recipe": list(params.recipe)}
    started = time.perf_counter()

    def stage(name: str) -> None:
        result = repro(name, params.stage_timeout_s)
        stages.append(result)
        stage_runs[name] = log_stage(parent, params, result)

    if sync(params):  # the recipe or the sources changed: DVC's stages follow
        print("dvc.yaml re-rendered for recipe " + " -> ".join(params.recipe))
    stages_in_order = stage_names(params)
    try:
        for name in stages_in_order:
            stage(name)
        summary["quality"] = quality_summary(params)
        quantization_gate(params, parent)
        push_artifacts()
        # The served artifact is registered first, so the quality gate's verdict (and a
        # canary's) sticks to its bytes: a rejected version never comes back by itself.
        registered = register_candidate(params, parent, flow_run.id, stage_runs)
        summary["registered"] = registered
        summary["version"] = registered["version"]
        quality_gate(params, parent, registered["version"])
        if deploy:
            summary.update(canary_release(params, registered["version"], drill=canary_drill))
        else:
            summary["outcome"] = "not deployed (deploy=False)"
    except GateFailed as exc:
        summary["outcome"] = "blocked by gate"
        summary["gate_failure"] = str(exc)
        finish_parent_run(parent, "FAILED", summary)
        print("\n" + summary_table(stages))  # what ran before the stop, for the person reading the log
        raise
    except Exception as exc:
        summary["outcome"] = f"failed: {type(exc).__name__}"
        finish_parent_run(parent, "FAILED", summary)
        print("\n" + summary_table(stages))
        raise
    summary["total_seconds"] = time.perf_counter() - started
    finish_parent_run(parent, "FINISHED", summary)
    report = render(summary)
    create_markdown_artifact(key="lifecycle-summary", markdown=report, description="lifecycle run summary")
    print("\n" + report)
    return summary


def render(summary: dict) -> str:
    ran = [s["stage"] for s in summary["stages"] if s["ran"]]
    quality = summary.get("quality", {})
    lines = [
        "## LLM lifecycle run",
        "",
        summary_table(summary["stages"]),
        "",
        *(f"{metric} (held-out): " + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if v is not None) for metric, per in quality.items()),
        f"outcome: {summary.get('outcome')} (version {summary.get('version', '-')})",
        f"recipe: {' -> '.join(summary.get('recipe', []))}",
        f"stages run: {', '.join(ran) if ran else 'none: nothing changed, every stage came from the DVC cache'}",
        f"MLflow parent run: {summary['mlflow_parent_run_id']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.lifecycle", description=__doc__)
    parser.add_argument("--no-deploy", action="store_true", help="stop after the gates: the version is registered and gated, but not canaried")
    parser.add_argument(
        "--canary-drill",
        metavar="FLAGS",
        help="rehearse a rollback: start the candidate's server with these fault flags, e.g. '--fault-error-rate 1.0' or '--fault-delay-s 2'",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        load_params()  # fail fast, before Prefect even starts its API
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    try:
        summary = lifecycle(deploy=not args.no_deploy, canary_drill=shlex.split(args.canary_drill) if args.canary_drill else None)
    except (GateFailed, RuntimeError) as exc:
        print(f"\nlifecycle stopped: {exc}", file=sys.stderr)
        sys.exit(1)
    if summary.get("outcome") == "rolled_back":
        # The flow did its job (the champion is untouched), but nothing new reached users:
        # scripts and schedulers should see that as a failure to release.
        print(f"\ncandidate v{summary['version']} was rolled back; champion v{summary.get('champion')} keeps serving", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
