"""The lifecycle flow: data -> base -> the recipe's training steps (e.g. SFT -> DPO) ->
evaluate -> quantize -> quant gate -> register -> quality gate (the served artifact against
the champion's) -> canary -> promote or roll back.

Reads like the DAG it runs. Artifact stages are DVC's (skipped when nothing changed); gates,
registration and deployment are Prefect tasks; MLflow gets one parent run per flow run and a
nested run per stage. Run it with `make pipeline`, `python -m flows.lifecycle`, a Prefect
deployment (flows/deployments.py: cron, new data), or from the Prefect UI.

On a Prefect server a run is named and tagged after what it is about (model, recipe, data
hash), takes the project's slot first (orchestration.concurrency_limit; a run that finds it
taken waits or is cancelled, orchestration.on_busy) and links its MLflow run. Retries are only
around I/O (MLflow, the DVC remote): a stage or gate that fails would fail the same way again.
"""

from __future__ import annotations

if __name__ == "__main__":  # `make pipeline`: Prefect's API boots while the imports below run
    from flows import quick_exit, temporary_api

    quick_exit.arm()  # first, so it runs after every exit handler registered later
    temporary_api.start()

import argparse
import os
import shlex
import sys
import time
from contextlib import ExitStack
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.utilities.annotations import quote

from flows.control import data_hash, label_run, lifecycle_run_name, link_mlflow_run, run_tags, take_slot

from pipelines.common import METRICS, read_json
from pipelines.config import ConfigError, Params, load_params
from pipelines.dag import DEFAULT_PARAMS, check_params_file, stage_names, sync
from pipelines.run_params import RUN_PARAMS, described, needs_run_file, overlay_values, parse_sets, with_overlay, write_run_params
from registry.models import NoStartPoint
from pipelines.directions import FEEDBACK_SLICE_METRIC
from tasks.deploy import canary_release
from tasks.gates import GateFailed, quality_gate, quantization_gate
from tasks.registry import pin_start_version, register_candidate
from tasks.stages import changed_stages, push_artifacts, repro
from tasks.notify import notify
from tasks.tracking import finish_parent_run, log_stage, start_parent_run



def summary_table(stages: list[dict]) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {'ran' if s['ran'] else 'cached (skipped)'} | {s['seconds']:.1f} |" for s in stages]
    return "\n".join(lines)


def quality_summary(params: Params) -> dict:
    """Every suite metric (and preference accuracy, and the feedback slice when there is one)
    per model: {metric: {model: value}}."""
    ev = read_json(METRICS / "evaluate.json")
    q = read_json(METRICS / "quantize.json") if (METRICS / "quantize.json").exists() else {}
    models = [name for name, block in ev.items() if name != "candidate" and isinstance(block, dict)]  # not the `steps` comparisons
    out = {m: {name: ev[name].get(m) for name in models} | ({"quantized": q.get(m)} if q else {}) for m in params.evaluate.directions()}
    out["preference_accuracy"] = {name: ev[name].get("preference_accuracy") for name in models}
    if any(FEEDBACK_SLICE_METRIC in ev[name] for name in models):  # held-out feedback exists
        out[FEEDBACK_SLICE_METRIC] = {name: ev[name].get(FEEDBACK_SLICE_METRIC) for name in models} | ({"quantized": q.get(FEEDBACK_SLICE_METRIC)} if q else {})
    return out


def step_summary() -> list[str]:
    """One line per recipe step against the step before on the primary metric (the evaluate
    stage's comparison), and which step became the candidate."""
    ev = read_json(METRICS / "evaluate.json")
    lines = []
    for c in ev.get("steps", []):
        verdict = "WORSE" if c["regressed"] else "not worse"
        lines.append(f"step {c['step']} vs {c['previous']} on {c['metric']}: {c['previous_value']:.3f} -> {c['value']:.3f} ({c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]): {verdict}")
    if ev.get("steps"):
        lines.append(f"candidate: {ev['candidate'].get('step')}")
    return lines


@flow(name="llm-lifecycle", log_prints=True, flow_run_name=lifecycle_run_name)
def lifecycle(
    deploy: bool = True,
    canary_drill: list[str] | None = None,
    recipe: list[str] | None = None,
    start_from: Literal["base", "champion"] | None = None,
    overrides: dict[str, dict] | None = None,
) -> dict:
    """`canary_drill`: extra server flags for the candidate (e.g. ["--fault-error-rate", "1.0"])
    to rehearse a rollback through the real release path. `recipe`, `start_from`, `overrides`:
    this run's overlay on params.yaml's `recipe`, `model.start_from` and sections' keys (a
    feedback run's [dpo] from the champion with its training settings: the deployment's trigger
    fills them from the event); None keeps params.yaml's."""
    # DVC stages read ./params.yaml, so the flow reads exactly that file too: one source of truth.
    # A run overlay goes to params.run.yaml, which the stages of this run read instead.
    overlay = overlay_values(recipe, start_from, overrides=overrides)
    params, _ = with_overlay(overlay)  # invalid config fails here, before any work
    run_file = needs_run_file(params, overlay)
    if not run_file:
        check_params_file(params)  # and so does a key DVC needs that the file leaves out
    data = data_hash(params)
    label_run(flow_run.id, run_tags(params, data))
    with ExitStack() as stack:
        busy = take_slot(stack, params, flow_run.id)
        if busy:  # orchestration.on_busy: drop; the state message says which run is busy
            print(busy)
            return Cancelled(message=busy)
        params_file = DEFAULT_PARAMS
        if params.model.start_from == "champion":
            # Pinned in the slot, before DVC runs: the run is keyed by a version, not an alias
            # that may move; no champion, or one without trainable weights, stops the run here.
            version = pin_start_version(params.registry.model_name, params.model.start_version)
            if params.model.start_version is None:
                overlay = {**overlay, "model": {**overlay.get("model", {}), "start_version": version}}
        if run_file:
            params = write_run_params(with_overlay(overlay)[1], overlay)
            params_file = str(RUN_PARAMS)
            print(f"run params: params.yaml + {described(overlay)} -> {RUN_PARAMS}")
        else:
            RUN_PARAMS.unlink(missing_ok=True)  # a past overlay run's file: nothing reads it now
        try:
            return run_lifecycle(params, data, deploy, canary_drill, params_file)
        finally:
            if params_file != DEFAULT_PARAMS:
                # This run's DAG read the run file: leave dvc.yaml as params.yaml renders it, so
                # a `dvc repro` by hand is the user's pipeline again (the run's own dvc.yaml and
                # params.run.yaml are in the version's lineage record).
                sync(load_params())


def run_lifecycle(params: Params, data: str, deploy: bool, canary_drill: list[str] | None, params_file: str = DEFAULT_PARAMS) -> dict:
    # MLflow opens the parent run while DVC checks and runs the first stages.
    opening = start_parent_run.submit(params, flow_run.id)
    stages: list[dict] = []
    stage_runs: dict[str, str] = {}
    summary: dict = {"stages": stages, "recipe": list(params.recipe), "data_hash": data, "start": start_label(params)}

    def parent() -> str:
        """The MLflow parent run's id, once open. The first ask links it from the Prefect run,
        which happens on the way out of a failed run too: its evidence is one click away."""
        if "mlflow_parent_run_id" not in summary:
            run_id = opening.result()
            summary["mlflow_parent_run_id"] = run_id
            summary["mlflow_url"] = link_mlflow_run(run_id, "lifecycle run")
        return summary["mlflow_parent_run_id"]

    started = time.perf_counter()
    # The run graph draws what really depends on what: each step waits for the one before
    # (`then`), a stage's MLflow record hangs off its stage and the opened run, and the run id
    # the later bookkeeping tasks receive is passed quoted so it draws no edge of its own.
    last: list = []

    def then(task, *args, **kwargs):
        state = task(*args, wait_for=last[-1:] or None, return_state=True, **kwargs)
        last[:] = [state]
        return state.result()  # raises what the task raised

    # A stage's MLflow record is written while the next stage runs; registration waits for all.
    logged: dict = {}

    def stage(name: str, up_to_date: bool) -> None:
        result = then(repro, name, params.stage_timeout_s, up_to_date)
        stages.append(result)
        logged[name] = log_stage.submit(opening, params, result)

    if sync(params, params_file=params_file):  # the recipe, the sources or the params file changed: DVC's stages follow
        print("dvc.yaml re-rendered for recipe " + " -> ".join(params.recipe) + (f", from {start_label(params)}, reading {params_file}" if params_file != DEFAULT_PARAMS else ""))
    stages_in_order = stage_names(params)
    try:
        changed = then(changed_stages, stages_in_order)
        unchanged_so_far = True  # a stage is skipped outright only if nothing before it changed
        for name in stages_in_order:
            unchanged_so_far = unchanged_so_far and name not in changed
            stage(name, unchanged_so_far)
        parent()
        stage_runs.update({name: future.result() for name, future in logged.items()})
        summary["quality"] = quality_summary(params)
        summary["recipe_steps"] = step_summary()  # not "steps": a release adds its canary steps under that key
        then(quantization_gate, params, quote(parent()))
        then(push_artifacts)
        # The served artifact is registered first, so the quality gate's verdict (and a
        # canary's) sticks to its bytes: a rejected version never comes back by itself.
        registered = then(register_candidate, params, quote(parent()), flow_run.id, stage_runs)
        summary["registered"] = registered
        summary["version"] = registered["version"]
        then(quality_gate, params, quote(parent()), registered["version"])
        if deploy:
            summary.update(then(canary_release, params, registered["version"], drill=canary_drill))
        else:
            summary["outcome"] = "not deployed (deploy=False)"
    except GateFailed as exc:
        # The run fails with the gate's words as its state message: which metric, by how much.
        summary["outcome"] = "blocked by gate"
        summary["gate_failure"] = str(exc)
        finish_parent_run(quote(parent()), "FAILED", summary)
        publish_summary(summary)
        if not getattr(exc, "notified", False):  # the gate tasks send their own, with the metrics
            notify(params, "gate_failed", str(exc), version=summary.get("version"), mlflow_run=summary.get("mlflow_url"))
        print("\n" + summary_table(stages))  # what ran before the stop, for the person reading the log
        raise
    except Exception as exc:
        summary["outcome"] = f"failed: {type(exc).__name__}"
        summary["error"] = str(exc)[-2000:]
        finish_parent_run(quote(parent()), "FAILED", summary)
        publish_summary(summary)
        print("\n" + summary_table(stages))
        raise
    summary["total_seconds"] = time.perf_counter() - started
    finish_parent_run(quote(parent()), "FINISHED", summary)
    print("\n" + publish_summary(summary))
    return summary


def start_label(params: Params) -> str:
    m = params.model
    return f"champion version {m.start_version}" if m.start_from == "champion" else "base"


def publish_summary(summary: dict) -> str:
    report = render(summary)
    create_markdown_artifact(key="lifecycle-summary", markdown=report, description="lifecycle run summary")
    return report


def render(summary: dict) -> str:
    ran = [s["stage"] for s in summary["stages"] if s["ran"]]
    quality = summary.get("quality", {})
    lines = [
        "## LLM lifecycle run",
        "",
        summary_table(summary["stages"]),
        "",
        *(f"{metric} (held-out): " + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if v is not None) for metric, per in quality.items()),
        *summary.get("recipe_steps", []),
        f"outcome: {summary.get('outcome')} (version {summary.get('version', '-')})",
        *([f"gate: {summary['gate_failure']}"] if "gate_failure" in summary else []),
        *([f"error: {summary['error']}"] if "error" in summary else []),
        f"recipe: {' -> '.join(summary.get('recipe', []))} (from {summary.get('start', 'base')})",
        f"data: {summary.get('data_hash', '-')}",
        f"stages run: {', '.join(ran) if ran else 'none: nothing changed, every stage came from the DVC cache'}",
        f"MLflow parent run: {summary['mlflow_parent_run_id']}" + (f" ([open in MLflow]({summary['mlflow_url']}))" if summary.get("mlflow_url") else ""),
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
    parser.add_argument("--recipe", type=lambda text: [s.strip() for s in text.split(",") if s.strip()], metavar="STEPS",
                        help="this run's recipe instead of params.yaml's, e.g. 'dpo' or 'sft,kto' (params.yaml is not changed)")
    parser.add_argument("--start-from", choices=["base", "champion"], help="this run's model.start_from: train the first step from the champion's weights instead of the base")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="sets",
                        help="this run's value for a params key, e.g. --set dpo.max_steps=120 (repeatable; params.yaml is not changed)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # fail fast, before Prefect even starts its API
        overrides = parse_sets(args.sets) or None
        overlay = overlay_values(args.recipe, args.start_from, overrides=overrides)
        params, _ = with_overlay(overlay)
        if not needs_run_file(params, overlay):
            check_params_file(params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    from flows import temporary_api  # the same module the early start used

    try:
        with temporary_api.startup_allowance():
            api = temporary_api.attach()
            with temporary_api.run_settings(api):
                summary = lifecycle(deploy=not args.no_deploy, canary_drill=shlex.split(args.canary_drill) if args.canary_drill else None,
                                    recipe=args.recipe, start_from=args.start_from, overrides=overrides)
    except (ConfigError, NoStartPoint) as exc:  # e.g. start_from: champion with no champion yet
        print(f"\nlifecycle not run: {exc}", file=sys.stderr)
        sys.exit(2)
    except (GateFailed, RuntimeError) as exc:  # RuntimeError includes temporary_api.ApiStartTimeout
        print(f"\nlifecycle stopped: {exc}", file=sys.stderr)
        sys.exit(1)
    except CancelledRun as exc:  # another run held the project's slot (orchestration.on_busy: drop)
        print(f"\nlifecycle not run: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        from registry.store import exit_if_unreadable

        exit_if_unreadable(exc, "\nlifecycle stopped: ", 1)
        raise
    if summary.get("outcome") == "rolled_back":
        # The flow did its job (the champion is untouched), but nothing new reached users:
        # scripts and schedulers should see that as a failure to release.
        print(f"\ncandidate v{summary['version']} was rolled back; champion v{summary.get('champion')} keeps serving", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    quick_exit.run(main)
