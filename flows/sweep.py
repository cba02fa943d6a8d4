"""Fan-out work through a Prefect task runner: an SFT hyperparameter sweep and the evaluation of
several candidates at once.

`sft-sweep` reads the `sweep` section of params.yaml. Every combination of `sweep.grid` over the
sft section is a trial, trained by the sft stage itself (`python -m pipelines.sft`) in its own
folder, models/sweeps/<sweep>/<trial>/, from the prepared data and the base model the DVC
stages made (linked, never copied or written; the DVC-owned models/sft is not touched). With
`sweep.evaluate` each trial's model then goes through the evaluation suite. Every trial gets a
nested MLflow run under the sweep's parent run (its settings, scores, curve, logs), the best by
`sweep.metric` is registered as a version of `<registry.model_name>-sweep`, and a Prefect table
artifact lists the trials.

`evaluate-candidates` scores model folders side by side with the same suite
(`python -m flows.sweep --evaluate models/sft models/dpo`).

Where the work runs: a thread pool in this process by default (each trial is its own process
with `cpus_per_trial` torch threads, cores // cpus_per_trial at once), or Ray through
prefect-ray when `sweep.runner: ray` or $RAY_ADDRESS is set: a Ray instance started for the run,
or the cluster at that address. The flow is the same either way; only the task runner changes.

    python -m flows.sweep [--runner ray] [--no-repro]      (make sweep)
"""

from __future__ import annotations

if __name__ == "__main__":  # `make sweep`: Prefect's API boots while the imports below run (flows/temporary_api.py)
    from flows import temporary_api

    temporary_api.start()

import argparse
import datetime
import itertools
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.common import BASE_DIR, MODELS, PREPARED
from pipelines.config import ConfigError, Params, SftParams, SweepParams, load_params
from pipelines.dag import stage_names, sync
from pipelines.gates import DIRECTIONS
from pipelines.common import file_digest
from registry.lineage import dvc_lock_hashes
from tasks.stages import repro
from tasks.sweep import TrialFailed, evaluate_candidate, record, register_winner, scores, start_parent, train_trial, where
from tasks.tracking import finish_parent_run

SWEEPS = MODELS / "sweeps"  # git-ignored with models/, but no DVC stage's output
# What a trial's training reports (metrics/sft.json) and what the evaluation adds.
TRAINING_METRICS = {"eval_loss": "lower", "eval_loss_before": "lower", "final_train_loss": "lower"}
EVALUATION_METRICS = ("validation_loss", "preference_accuracy", "reward_score")


class SweepError(ValueError):
    """A sweep that cannot run as configured; the message names the key or file and the fix."""


# ---------------------------------------------------------------- the plan (pure)


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the grid's order (an empty grid: one trial)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def metric_directions(params: Params) -> dict[str, str]:
    known = dict(TRAINING_METRICS)
    if params.sweep.evaluate:
        known.update({m: DIRECTIONS[m] for m in EVALUATION_METRICS})
        known.update(params.evaluate.directions())
    return known


def check_plan(params: Params) -> str:
    """Fail before any work on a metric no trial reports, a direction against the metric's own,
    or a winner that would land in the lifecycle's registered model. Returns that model's name."""
    cfg = params.sweep
    known = metric_directions(params)
    if cfg.metric not in known:
        more = "" if cfg.evaluate else " (evaluation metrics need sweep.evaluate: true)"
        raise SweepError(f"sweep.metric '{cfg.metric}' is not a number a trial reports{more}; available: {', '.join(known)}")
    if known[cfg.metric] != cfg.direction:
        raise SweepError(f"sweep.direction is '{cfg.direction}' but {cfg.metric} is better {known[cfg.metric]}: set sweep.direction: {known[cfg.metric]}")
    name = cfg.registered_model or f"{params.registry.model_name}-sweep"
    if name == params.registry.model_name:
        raise SweepError(f"sweep.registered_model '{name}' is the lifecycle's registered model: a sweep winner is an ungated SFT checkpoint, give it a model of its own (null: '{name}-sweep')")
    return name


def trial_params(params: Params, overrides: dict, root: Path) -> dict:
    """The trial's params.yaml: the project's, with the overrides over the sft section, the
    recipe reduced to sft (the sweep tunes SFT from the base model) and local paths absolute."""
    sft = SftParams.model_validate({**params.sft.model_dump(mode="json"), **overrides})
    data = params.model_dump(mode="json")
    data["sft"] = sft.model_dump(mode="json")
    data["recipe"] = ["sft"]
    if sft.deepspeed and not Path(sft.deepspeed).is_absolute():
        data["sft"]["deepspeed"] = str((root / sft.deepspeed).resolve())
    if not params.bootstrapped and (root / params.model.base_model).exists():
        data["model"]["base_model"] = str((root / params.model.base_model).resolve())
    Params.model_validate(data)  # the trial's config is valid before anything trains
    return data


def rank(results: list[dict], metric: str, direction: str) -> list[dict]:
    """Finished trials that report `metric`, best first; ties keep the grid's order."""
    ok = [r for r in results if r["status"] == "ok" and math.isfinite(scores(r).get(metric, math.nan))]
    sign = 1 if direction == "lower" else -1
    return sorted(ok, key=lambda r: sign * scores(r)[metric])


# ---------------------------------------------------------------- folders and inputs


def check_inputs(root: Path, *files: Path) -> None:
    for path in files:
        if not (root / path).exists():
            raise SweepError(f"{path} is missing: trials start from the prepared data and the base model. Run `make sweep` (it brings them up to date first) or `dvc repro bootstrap`")


def setup_workdir(workdir: Path, root: Path, params: dict) -> Path:
    """A folder that looks like the project to a stage: data/prepared and models/base link to
    the project's (read only), everything the stage writes stays inside."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "models").mkdir(exist_ok=True)
    (workdir / PREPARED).symlink_to((root / PREPARED).resolve(), target_is_directory=True)
    if (root / BASE_DIR).exists():
        (workdir / BASE_DIR).symlink_to((root / BASE_DIR).resolve(), target_is_directory=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return workdir


def input_lineage(root: Path) -> dict[str, str]:
    """What every trial started from: the prepared SFT splits and the base model (digests), and
    DVC's record of the stages that made them when there is one."""
    data = [root / PREPARED / f"sft_{s}.parquet" for s in ("train", "validation")]
    dvc = {f"lineage.dvc.{k}": v for k, v in dvc_lock_hashes(root / "dvc.lock").items() if k.split(":")[0] in ("prepare", "bootstrap")}
    return {"lineage.data.sft": file_digest(*data), "lineage.base_model": file_digest(root / BASE_DIR), **dvc}


def new_run_dir(kind: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (SWEEPS / f"{stamp}-{kind}-{flow_run.name or os.getpid()}").resolve()


# ---------------------------------------------------------------- where the work runs


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ray_address(cfg: SweepParams) -> str | None:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def uses_ray(cfg: SweepParams) -> bool:
    return cfg.runner == "ray" or ray_address(cfg) is not None


def task_runner(cfg: SweepParams):
    """ThreadPoolTaskRunner (cores // cpus_per_trial at once), or prefect-ray's RayTaskRunner:
    a Ray instance started for this run, sized to this machine's cores, or the cluster at the
    address."""
    if not uses_ray(cfg):
        return ThreadPoolTaskRunner(max_workers=max(1, cores() // cfg.cpus_per_trial))
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise SweepError("sweep.runner is 'ray' (or $RAY_ADDRESS is set) but prefect-ray is not installed: pip install -e '.[ray]'") from None
    address = ray_address(cfg)
    if address:  # a cluster brings its own resources
        return RayTaskRunner(address=address)
    # "local": a new instance even when a `ray start` cluster runs here (ray.init() would join
    # it, or fail on one that died); `ray_address: auto` joins that one. No dashboard (a port,
    # ~100 MB); tasks pass paths and numbers, never models, so a small object store will do.
    # A trial asking for more cores than the machine has would wait forever: let it oversubscribe.
    init = {"num_cpus": max(cores(), cfg.cpus_per_trial), "include_dashboard": False, "object_store_memory": 256 * 1024**2}
    return RayTaskRunner(address="local", init_kwargs=init)


@contextmanager
def api_for_workers():
    """Ray runs tasks in other processes. In Prefect's ephemeral mode (no PREFECT_API_URL) each
    would start a temporary API server of its own (seconds each, and not the flow's): point them
    at this process's. A remote cluster needs PREFECT_API_URL set to a server it can reach."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the ephemeral server this process's client runs
    server.start()  # already running: a no-op
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@flow(name="sweep-fan-out")
def fan_out(jobs: list[dict], train: bool, evaluate: bool, threads: int, timeout_s: float | None, ray: bool = False) -> list[dict]:
    """Every job at once on this flow's task runner: train it, then (as soon as its training is
    done) evaluate it. A failed job is reported with its error; the others go on."""
    options = nullcontext()
    if ray:
        from prefect_ray.context import remote_options

        options = remote_options(num_cpus=threads)  # Ray schedules by the cores a trial uses
    with options:
        trained = {j["name"]: train_trial.submit(j, threads, timeout_s) for j in jobs} if train else {}
        evaluated = {j["name"]: evaluate_candidate.submit(trained.get(j["name"], j), threads, timeout_s, name=j["name"]) for j in jobs} if evaluate else {}
    for future in [*trained.values(), *evaluated.values()]:
        future.wait()
    results = []
    for job in jobs:
        out = {**job, "status": "ok"}
        for stage, futures in (("training", trained), ("evaluation", evaluated)):
            future = futures.get(job["name"])
            if future is None:
                continue
            if not future.state.is_completed():
                out.update(status="failed", error=f"{stage}: {future.state.message or future.state.name}")
                break
            out.update(future.result())
        results.append(out)
    return results


def run_fan_out(cfg: SweepParams, jobs: list[dict], train: bool, evaluate: bool, timeout_s: float | None) -> list[dict]:
    ray = uses_ray(cfg)
    with api_for_workers() if ray else nullcontext():
        runner = task_runner(cfg)
        print(f"{len(jobs)} job(s) on {type(runner).__name__}" + (f" at {ray_address(cfg)}" if ray and ray_address(cfg) else ""))
        return fan_out.with_options(task_runner=runner)(jobs, train, evaluate, cfg.cpus_per_trial, timeout_s, ray)


def bring_inputs_up_to_date(params: Params) -> None:
    """The stages trials start from (data, base model), through DVC: skipped when up to date."""
    sync(params)
    names = stage_names(params)
    for stage in names[: names.index("bootstrap") + 1]:
        repro(stage, params.stage_timeout_s)


def with_runner(params: Params, runner: str | None) -> Params:
    return params if runner is None else params.model_copy(update={"sweep": params.sweep.model_copy(update={"runner": runner})})


# ---------------------------------------------------------------- the flows


@flow(name="sft-sweep", log_prints=True)
def sft_sweep(runner: Literal["local", "ray"] | None = None, repro_inputs: bool = True) -> dict:
    """`runner` overrides sweep.runner; `repro_inputs` brings data and base up to date first."""
    params = with_runner(load_params(), runner)  # ./params.yaml, as every stage reads it
    cfg = params.sweep
    target = check_plan(params)
    if repro_inputs:
        bring_inputs_up_to_date(params)
    root = Path.cwd()
    check_inputs(root, PREPARED / "sft_train.parquet", PREPARED / "sft_validation.parquet", BASE_DIR)
    sweep_dir = new_run_dir("sft")
    trials = []
    for i, overrides in enumerate(expand_grid(cfg.grid), 1):
        workdir = setup_workdir(sweep_dir / f"trial-{i}", root, trial_params(params, overrides, root))
        trials.append({"name": f"trial-{i}", "overrides": overrides, "workdir": str(workdir)})
    parent = start_parent(
        params.registry.experiment, "sft-sweep", flow_run.id,
        {"sweep": cfg.model_dump(mode="json"), "sft": params.sft.model_dump(mode="json")},
        {"kind": "sft-sweep", "sweep.metric": cfg.metric, "sweep.direction": cfg.direction, "sweep.runner": "ray" if uses_ray(cfg) else "local", "sweep.dir": str(sweep_dir), "sweep.driver": where(), **input_lineage(root)},
    )
    summary: dict = {"mlflow_parent_run_id": parent, "sweep_dir": str(sweep_dir), "metric": cfg.metric, "trials": len(trials)}
    try:
        results = run_fan_out(cfg, trials, train=True, evaluate=cfg.evaluate, timeout_s=params.stage_timeout_s)
        ranked = rank(results, cfg.metric, cfg.direction)
        runs = {}
        for r in results:
            place = ranked.index(r) + 1 if r in ranked else None
            tags = {"kind": "sft-sweep-trial", "sweep.trial": r["name"], "sweep.overrides": json.dumps(r["overrides"]), "sweep.metric": cfg.metric,
                    "sweep.rank": str(place or "-"), "sweep.winner": str(place == 1).lower()}
            sft = yaml.safe_load((Path(r["workdir"]) / "params.yaml").read_text())["sft"]
            runs[r["name"]] = record(parent, r, sft, tags)
        failed = {r["name"]: r["error"] for r in results if r["status"] != "ok"}
        summary.update(failed=len(failed), errors=failed)
        rows = trial_rows(results, ranked, cfg.metric, runs)
        create_table_artifact(key="sft-sweep", table=rows, description=f"SFT sweep: {len(trials)} trials by {cfg.metric} ({cfg.direction} wins), {len(failed)} failed; the first ranked is registered as {target}")
        if not ranked:
            raise TrialFailed(f"no trial finished with a value of {cfg.metric}: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in failed.items()))
        winner = ranked[0]
        best = scores(winner)[cfg.metric]
        registered = register_winner(target, winner, runs[winner["name"]], cfg.metric, {
            "kind": "sft-sweep-winner", "sweep.parent_run_id": parent, "sweep.trial": winner["name"], "sweep.overrides": json.dumps(winner["overrides"]),
            "sweep.trials": str(len(trials)), "lineage.prefect_flow_run_id": flow_run.id or "none",
        })
        summary.update(winner=winner["name"], overrides=winner["overrides"], best=best, registered=registered, version=registered["version"],
                       trial_runs=runs, outcome=f"registered {target} v{registered['version']}")
    except Exception as exc:
        summary["outcome"] = f"failed: {type(exc).__name__}"
        finish_parent_run(parent, "FAILED", summary)
        raise
    finish_parent_run(parent, "FINISHED", summary)
    print(render(rows, summary))
    return {**summary, "results": results}


@flow(name="evaluate-candidates", log_prints=True)
def evaluate_candidates(models: list[str], runner: Literal["local", "ray"] | None = None) -> dict:
    """The evaluation suite on several model folders at once: {name: metrics}."""
    params = with_runner(load_params(), runner)
    root = Path.cwd()
    check_inputs(root, PREPARED / "sft_test.parquet", PREPARED / "sft_validation.parquet")
    for m in models:
        if not (Path(m) / "config.json").exists():
            raise SweepError(f"{m} is not a model folder (no config.json): give the folders to evaluate, e.g. models/sft models/dpo")
    out_dir = new_run_dir("evaluate")
    jobs, seen = [], set()
    for m in models:
        name = Path(m).resolve().name
        name = name if name not in seen else f"{name}-{len(seen)}"
        seen.add(name)
        workdir = setup_workdir(out_dir / name, root, params.model_dump(mode="json"))
        jobs.append({"name": name, "model_dir": str(Path(m).resolve()), "workdir": str(workdir)})
    parent = start_parent(params.registry.experiment, "evaluate-candidates", flow_run.id, {"models": {j["name"]: j["model_dir"] for j in jobs}}, {"kind": "evaluate-candidates"})
    results = run_fan_out(params.sweep, jobs, train=False, evaluate=True, timeout_s=params.stage_timeout_s)
    runs = {r["name"]: record(parent, r, None, {"kind": "candidate-evaluation", "candidate.model_dir": r["model_dir"]}) for r in results}
    failed = {r["name"]: r["error"] for r in results if r["status"] != "ok"}
    summary = {"mlflow_parent_run_id": parent, "candidates": len(jobs), "failed": len(failed), "errors": failed, "outcome": "evaluated" if not failed else f"{len(failed)} failed"}
    finish_parent_run(parent, "FINISHED" if not failed else "FAILED", summary)
    metrics = sorted({k for r in results for k, v in r.get("evaluation", {}).items() if isinstance(v, (int, float))})
    rows = [{"model": r["name"], "status": r["status"], **{k: r.get("evaluation", {}).get(k) for k in metrics}, "mlflow_run": runs[r["name"]]} for r in results]
    create_table_artifact(key="candidate-evaluation", table=rows, description=f"{len(jobs)} candidates, evaluated side by side")
    print(markdown(rows))
    if failed:
        raise TrialFailed("; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {**summary, "results": {r["name"]: r["evaluation"] for r in results}, "runs": runs}


# ---------------------------------------------------------------- reports


def trial_rows(results: list[dict], ranked: list[dict], metric: str, runs: dict[str, str]) -> list[dict]:
    rows = []
    for r in results:
        s = scores(r)
        place = ranked.index(r) + 1 if r in ranked else None
        rows.append({
            "trial": r["name"], "overrides": json.dumps(r["overrides"]), metric: s.get(metric), "rank": place,
            "registered": "yes" if place == 1 else "", "final_train_loss": s.get("final_train_loss"), "train_seconds": s.get("train_seconds"),
            "status": r["status"] if r["status"] == "ok" else f"failed: {r['error'].splitlines()[0][:200]}", "mlflow_run": runs.get(r["name"]),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows)])


def render(rows: list[dict], summary: dict) -> str:
    return "\n".join([
        "## SFT sweep", "", markdown(rows), "",
        f"winner: {summary['winner']} {json.dumps(summary['overrides'])} ({summary['metric']} {summary['best']:.4g})",
        f"outcome: {summary['outcome']}" + (" (same bytes as an earlier sweep's winner)" if summary["registered"]["reused"] else ""),
        f"trial folders: {summary['sweep_dir']}",
        f"MLflow parent run: {summary['mlflow_parent_run_id']}",
        "To train the winner in the lifecycle, copy its overrides into params.yaml's sft section and run `make pipeline`.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", choices=["local", "ray"], help="override sweep.runner")
    parser.add_argument("--no-repro", action="store_true", help="do not bring data and base model up to date through DVC first")
    parser.add_argument("--evaluate", nargs="+", metavar="MODEL_DIR", help="instead of a sweep: evaluate these model folders side by side")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        params = with_runner(load_params(), args.runner)  # fail fast, before Prefect starts its API
        if not args.evaluate:
            check_plan(params)
        if uses_ray(params.sweep):
            task_runner(params.sweep)  # prefect-ray installed?
    except (ConfigError, SweepError) as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    from flows import temporary_api  # the same module the early start used

    try:
        with temporary_api.startup_allowance():
            api = temporary_api.attach()
            with temporary_api.run_settings(api):
                if args.evaluate:
                    evaluate_candidates(args.evaluate, runner=args.runner)
                else:
                    sft_sweep(runner=args.runner, repro_inputs=not args.no_repro)
    except (SweepError, TrialFailed, temporary_api.ApiStartTimeout) as exc:
        print(f"\nsweep stopped: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
