"""Tasks of the fan-out flows (flows/sweep.py): train one SFT trial, evaluate one candidate
(both as worker processes in their own folder, so they run the same under a thread pool or on
a Ray worker), and the MLflow side: a parent run per sweep, a nested run per trial, the winner
registered.

Training and evaluation are processes, not calls: a stage reads and writes paths relative to
its working directory (data/prepared, models/, metrics/), and a thread cannot have a working
directory of its own. Each process gets `threads` torch threads, so trials side by side do not
fight over the same cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.plots import plot_history
from registry.lineage import git_commit
from registry.models import MODEL_HASH_TAG, find_by_model_hash, register
from registry.store import client, experiment_id
from tasks.stages import dvc_env
from tasks.tracking import CURVES, flatten, flatten_params


class TrialFailed(RuntimeError):
    """A trial's (or a candidate's) worker process failed or ran past its deadline."""


def run_worker(cmd: list[str], cwd: Path, threads: int, log_file: Path, timeout_s: float | None) -> None:
    """Run `cmd` in `cwd` with `threads` torch threads, its output to `log_file`. The process gets
    its own process group, which is stopped whole on a timeout or when this task is cancelled."""
    env = {**dvc_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except BaseException as exc:  # a timeout, or the flow being cancelled: leave nothing running
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                    break
            if isinstance(exc, subprocess.TimeoutExpired):
                raise TrialFailed(f"`{' '.join(cmd[1:])}` in {cwd} ran past stage_timeout_s ({timeout_s:g}s) and was stopped; log: {log_file}") from None
            raise
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-15:])
        raise TrialFailed(f"`{' '.join(cmd[1:])}` in {cwd} failed (exit {code}); log: {log_file}\n{tail}")


# Results are small dicts of paths and numbers (never models): they travel between Ray workers.
@task(task_run_name="train {trial[name]}", cache_policy=NO_CACHE)
def train_trial(trial: dict, threads: int, timeout_s: float | None) -> dict:
    """The sft stage, exactly as DVC runs it, in the trial's folder with the trial's params."""
    workdir = Path(trial["workdir"])
    started = time.perf_counter()
    run_worker([sys.executable, "-m", "pipelines.sft", "--params", "params.yaml"], workdir, threads, workdir / "train.log", timeout_s)
    metrics = json.loads((workdir / "metrics/sft.json").read_text())
    return {**trial, "model_dir": str(workdir / "models/sft"), "training": metrics, "train_wall_seconds": time.perf_counter() - started, "worker": where()}


@task(task_run_name="evaluate {name}", cache_policy=NO_CACHE)
def evaluate_candidate(candidate: dict, threads: int, timeout_s: float | None, name: str) -> dict:
    """The evaluation suite on one model folder (pipelines.evaluate.measure, in a worker process).
    `candidate` may be a training task's future: this starts once that training is done."""
    workdir = Path(candidate["workdir"])
    cmd = [sys.executable, "-m", "tasks.measure", "--name", candidate["name"], "--model", candidate["model_dir"], "--out", "metrics/evaluation.json"]
    run_worker(cmd, workdir, threads, workdir / "evaluate.log", timeout_s)
    return {**candidate, "evaluation": json.loads((workdir / "metrics/evaluation.json").read_text()), "evaluated_on": where()}


def where() -> str:
    """host:pid of the process running a task: the flow's own under the thread pool, a Ray worker's under Ray."""
    return f"{socket.gethostname()}:{os.getpid()}"


def scores(result: dict) -> dict[str, float]:
    """Every number a trial produced, training and evaluation alike, as one flat table."""
    return {**flatten(result.get("training", {})), **flatten(result.get("evaluation", {}))}


def model_md5(folder: Path) -> str:
    """The model's bytes (file names and contents), to recognise the same model registered before."""
    h = hashlib.md5()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- MLflow: record and register


@task(task_run_name="mlflow: open {run_name} run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_parent(experiment: str, run_name: str, flow_run_id: str | None, params: dict, tags: dict[str, str]) -> str:
    c = client()
    sha, dirty = git_commit()
    run = c.create_run(
        experiment_id(experiment),
        run_name=f"{run_name}-{sha[:8]}",
        tags={"lineage.git_sha": sha, "lineage.git_dirty": str(dirty).lower(), "lineage.prefect_flow_run_id": flow_run_id or "none", **tags},
    )
    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten_params(params).items()])
    return run.info.run_id


@task(task_run_name="mlflow: log {result[name]}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record(parent_run_id: str, result: dict, section: dict | None, tags: dict[str, str]) -> str:
    """A nested run for one trial or candidate: its settings, every score, the training curve
    and its worker logs; a failed one is recorded FAILED with its error."""
    c = client()
    parent = c.get_run(parent_run_id)
    run = c.create_run(
        parent.info.experiment_id,
        run_name=result["name"],
        tags={
            "mlflow.parentRunId": parent_run_id,
            **{k: v for k, v in parent.data.tags.items() if k.startswith("lineage.")},
            "sweep.status": result["status"],
            **{f"sweep.{k}": result[k] for k in ("worker", "evaluated_on") if k in result},
            **({"sweep.error": result["error"][:4900]} if result.get("error") else {}),
            **tags,
        },
    )
    rid = run.info.run_id
    if section is not None:
        overrides = {f"override.{k}": json.dumps(v) for k, v in result.get("overrides", {}).items()}
        c.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in {**flatten_params(section), **overrides}.items()])
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in scores(result).items()]
    workdir = Path(result["workdir"])
    history_file = workdir / "metrics/sft_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    metrics += [Metric(key.replace("/", "_"), float(row[key]), now, int(row["step"])) for row in history for key in CURVES if key in row]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        c.log_batch(rid, metrics=metrics[i : i + 1000])
    if history:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_history(history, Path(tmp) / "sft_loss.png", title=f"{result['name']}: loss by step")
            if png:
                c.log_artifact(rid, str(png), "plots")
    for log in ("train.log", "evaluate.log", "params.yaml"):
        if (workdir / log).exists():
            c.log_artifact(rid, str(workdir / log), "worker")
    c.set_terminated(rid, "FINISHED" if result["status"] == "ok" else "FAILED")
    return rid


@task(task_run_name="registry: register the winner as {name}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_winner(name: str, winner: dict, run_id: str, metric: str, tags: dict[str, str]) -> dict:
    """Register the winner's model folder as a version of `name` (its bytes logged to the
    winner's own trial run). The same bytes registered before are that version again."""
    folder = Path(winner["model_dir"])
    md5 = model_md5(folder)
    found = find_by_model_hash(name, md5)
    if found is not None:
        return {"name": name, "version": str(found.version), "reused": True, "run_id": found.run_id}
    value = scores(winner)[metric]
    lineage = {k: v for k, v in client().get_run(run_id).data.tags.items() if k.startswith("lineage.")}  # git SHA, inputs
    mv = register(name, folder, run_id, md5, {**lineage, **tags, f"metric.{metric}": str(value)})
    client().update_registered_model(name, description="SFT sweep winners (flows/sweep.py): one version per sweep, the best trial by its validation metric. Not release candidates: the lifecycle's model holds those.")
    return {"name": name, "version": str(mv.version), "reused": False, "run_id": run_id, MODEL_HASH_TAG: md5}
