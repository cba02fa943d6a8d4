"""The fan-out flows (flows/sweep.py) on the tiny workspace, for real: SFT trials trained by the
sft stage, the evaluation suite, MLflow records and the registry.

- On a local Ray instance, as a user runs it (`python -m flows.sweep --runner ray`: Prefect's
  ephemeral API, the Ray instance RayTaskRunner starts): 3 trials with learning rates far
  apart; the one with the lowest validation loss is registered, the other two are recorded.
- On the default in-process thread pool: a sweep whose winner is picked by the evaluation
  suite's validation loss, then the fan-out evaluation of several model folders.
- The plan's checks (grid keys, metric, direction, registered model) and the runner choice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.workspace import flow_env
from pipelines.config import ConfigError, EvalTask, EvaluateParams, GateParams, SweepParams, Threshold, load_params
from tests.conftest import tiny_params

LEARNING_RATES = [1e-4, 3e-3, 3e-2]  # far apart: after 12 steps their validation losses differ clearly
SWEEP_MODEL = "reverse-digits-sweep"


def make_project(d: Path, prepared_dir: Path, **params) -> Path:
    """A project folder with the tiny prepared data and base model, and its params.yaml."""
    for sub in ("data", "models"):
        shutil.copytree(prepared_dir / sub, d / sub)
    (d / "params.yaml").write_text(yaml.safe_dump(tiny_params(**params).model_dump(mode="json"), sort_keys=False))
    return d


def mlflow_client(d: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{d / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def trial_runs(c, parent_run_id: str) -> dict[str, object]:
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["sweep.trial"]: r for r in runs}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------- on Ray, as a user runs it


@pytest.fixture(scope="module")
def ray_sweep(prepared_dir, tmp_path_factory):
    """One sweep on a local Ray instance (the module's one Ray start), through the CLI."""
    d = make_project(tmp_path_factory.mktemp("ray-sweep"), prepared_dir, sweep=SweepParams(grid={"learning_rate": LEARNING_RATES}))
    env = flow_env(d)
    env.pop("RAY_ADDRESS", None)  # a Ray instance of its own, never a developer's cluster
    out = subprocess.run(
        [sys.executable, "-m", "flows.sweep", "--no-repro", "--runner", "ray"], cwd=d, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-6000:]
    assert "RayTaskRunner" in out.stdout and "Started a local Ray instance" in out.stdout, out.stdout[-3000:]
    c = mlflow_client(d)
    versions = c.search_model_versions(f"name='{SWEEP_MODEL}'")
    assert len(versions) == 1, "only the winner is registered"
    parent = versions[0].tags["sweep.parent_run_id"]
    return {"dir": d, "client": c, "version": versions[0], "parent": c.get_run(parent), "trials": trial_runs(c, parent)}


@pytest.mark.slow
def test_ray_sweep_registers_the_trial_with_the_lowest_validation_loss(ray_sweep):
    c, version, trials = ray_sweep["client"], ray_sweep["version"], ray_sweep["trials"]
    assert set(trials) == {"trial-1", "trial-2", "trial-3"}
    losses = {name: run.data.metrics["eval_loss"] for name, run in trials.items()}
    assert len({round(v, 4) for v in losses.values()}) == 3, f"learning rates this far apart give different validation losses: {losses}"
    best = min(losses, key=losses.get)
    # The registered version is that trial's model, logged to that trial's own run.
    assert version.run_id == trials[best].info.run_id
    assert version.tags["sweep.trial"] == best
    assert float(version.tags["metric.eval_loss"]) == pytest.approx(losses[best])
    assert json.loads(version.tags["sweep.overrides"]) == {"learning_rate": float(trials[best].data.params["learning_rate"])}
    assert "model/model.safetensors" in {f.path for f in c.list_artifacts(version.run_id, "model")}
    # What it was trained from, as every trial of the sweep was.
    assert version.tags["lineage.data.sft"] == ray_sweep["parent"].data.tags["lineage.data.sft"] and "lineage.git_sha" in version.tags
    # Kept apart from the lifecycle's model: its champion cannot be confused with a sweep winner.
    assert {m.name for m in c.search_registered_models()} == {SWEEP_MODEL}


@pytest.mark.slow
def test_ray_sweep_records_every_trial_under_the_sweep_run(ray_sweep):
    parent, trials = ray_sweep["parent"], ray_sweep["trials"]
    assert parent.data.tags["sweep.runner"] == "ray" and parent.info.status == "FINISHED"
    ranked = sorted(trials, key=lambda n: trials[n].data.metrics["eval_loss"])
    for place, name in enumerate(ranked, 1):
        run = trials[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep.rank"] == str(place)
        assert run.data.tags["sweep.winner"] == str(place == 1).lower()
        assert run.data.metrics["eval_loss"] < run.data.metrics["eval_loss_before"], f"{name} trained"
        assert "learning_rate" in run.data.params and "override.learning_rate" in run.data.params
        # The trial ran in a Ray worker process, not in the flow's.
        assert run.data.tags["sweep.worker"] != parent.data.tags["sweep.driver"]
    assert sorted(float(trials[n].data.params["learning_rate"]) for n in trials) == LEARNING_RATES


@pytest.mark.slow
def test_ray_sweep_trials_trained_their_own_weights_and_left_models_sft_alone(ray_sweep):
    d, parent = ray_sweep["dir"], ray_sweep["parent"]
    base = weights(d / "models/base")
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    trained = {t: weights(sweep_dir / t / "models/sft") for t in ("trial-1", "trial-2", "trial-3")}
    for name, w in trained.items():
        moved = [k for k in base if not torch.equal(base[k], w[k])]
        assert any("embed_tokens" in k for k in moved) and any("q_proj" in k for k in moved), f"{name} changed too little: {moved}"
    assert not torch.equal(trained["trial-1"]["model.embed_tokens.weight"], trained["trial-3"]["model.embed_tokens.weight"])
    assert not (d / "models/sft").exists(), "the DVC-owned models/sft is not the sweep's to write"


# ---------------------------------------------------------------- the default runner, in process


@pytest.fixture(scope="module")
def local_runs(prepared_dir, tmp_path_factory):
    """A sweep on the default thread pool, picked by the evaluation suite, then the fan-out
    evaluation of the base and the winner; one Prefect API for both."""
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import evaluate_candidates, fan_out, sft_sweep

    suite = EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=8, batch_size=8, max_new_tokens=12)
    sweep = SweepParams(grid={"learning_rate": [LEARNING_RATES[0], LEARNING_RATES[-1]]}, evaluate=True, metric="validation_loss")
    gate = GateParams(thresholds={"reverse_digits/exact_match": Threshold(min=0.8)})  # the suite without its safety task
    d = make_project(tmp_path_factory.mktemp("local-sweep"), prepared_dir, evaluate=suite, gate=gate, sweep=sweep)
    from flows.patience import stretched
    from flows.temporary_api import STARTUP_TIMEOUT_S

    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=round(stretched(STARTUP_TIMEOUT_S))):
        mp.chdir(d)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
        mp.delenv("RAY_ADDRESS", raising=False)
        summary = sft_sweep(repro_inputs=False)
        table = json.loads(Artifact.get("sft-sweep").data)
        winner_dir = next(r["model_dir"] for r in summary["results"] if r["name"] == summary["winner"])
        evaluated = evaluate_candidates([str(d / "models/base"), winner_dir])
        eval_table = json.loads(Artifact.get("candidate-evaluation").data)
        # A job whose training fails (no params.yaml in its folder) beside one that needs none.
        (d / "broken").mkdir()
        broken = fan_out([{"name": "broken", "workdir": str(d / "broken")}], train=True, evaluate=True, threads=1, timeout_s=None)
    return {"dir": d, "summary": summary, "table": table, "evaluated": evaluated, "eval_table": eval_table, "broken": broken, "client": mlflow_client(d)}


@pytest.mark.slow
def test_default_runner_sweep_picks_by_the_evaluation_suite(local_runs):
    summary, c = local_runs["summary"], local_runs["client"]
    results = {r["name"]: r for r in summary["results"]}
    assert all(r["status"] == "ok" for r in results.values())
    losses = {n: r["evaluation"]["validation_loss"] for n, r in results.items()}
    assert len(set(losses.values())) == 2
    assert summary["winner"] == min(losses, key=losses.get)
    parent = c.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.tags["sweep.runner"] == "local"
    for name, run in trial_runs(c, parent.info.run_id).items():
        assert run.data.metrics["validation_loss"] == pytest.approx(losses[name])
        assert "reverse_digits/exact_match" in run.data.metrics and "eval_loss" in run.data.metrics
        # The thread pool runs tasks in the flow's own process (each trial still trains in a child process).
        assert run.data.tags["sweep.worker"] == parent.data.tags["sweep.driver"]
    mv = c.get_model_version(SWEEP_MODEL, summary["version"])
    assert mv.tags["sweep.trial"] == summary["winner"] and float(mv.tags["metric.validation_loss"]) == pytest.approx(losses[summary["winner"]])
    # The Prefect table artifact lists both trials, the registered one marked.
    assert [(row["trial"], row["registered"]) for row in sorted(local_runs["table"], key=lambda r: r["rank"])] == [(summary["winner"], "yes"), (next(n for n in losses if n != summary["winner"]), "")]


@pytest.mark.slow
def test_fan_out_evaluation_scores_several_models_at_once(local_runs):
    evaluated, summary = local_runs["evaluated"], local_runs["summary"]
    scores = evaluated["results"]
    assert set(scores) == {"base", "sft"}
    winner = next(r for r in summary["results"] if r["name"] == summary["winner"])
    # The same folder through the same suite gives the same numbers as inside the sweep.
    assert scores["sft"]["validation_loss"] == pytest.approx(winner["evaluation"]["validation_loss"], rel=1e-5)
    assert scores["sft"]["validation_loss"] < scores["base"]["validation_loss"], "the trained model fits the held-out answers better than the base"
    assert {row["model"] for row in local_runs["eval_table"]} == {"base", "sft"}
    runs = local_runs["client"].search_runs([local_runs["client"].get_run(evaluated["mlflow_parent_run_id"]).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{evaluated['mlflow_parent_run_id']}'")
    assert {r.info.run_name for r in runs} == {"base", "sft"} and all("reverse_digits/exact_match" in r.data.metrics for r in runs)


# ---------------------------------------------------------------- the plan, before any work


def write(tmp_path: Path, sweep: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"sweep": sweep}))
    return p


def test_grid_keys_and_values_are_checked_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep: .*grid key 'learning_rat' is not an sft setting \(did you mean 'learning_rate'\?\)"):
        load_params(write(tmp_path, {"grid": {"learning_rat": [1e-3]}}))
    with pytest.raises(ConfigError, match=r"grid value learning_rate=-1"):
        load_params(write(tmp_path, {"grid": {"learning_rate": [1e-3, -1]}}))
    with pytest.raises(ConfigError, match=r"grid key 'max_steps' has no values"):
        load_params(write(tmp_path, {"grid": {"max_steps": []}}))
    with pytest.raises(ConfigError, match=r"grid makes 12 trials, more than max_trials \(4\)"):
        load_params(write(tmp_path, {"grid": {"learning_rate": [1, 2, 3], "max_steps": [1, 2, 3, 4]}, "max_trials": 4}))
    assert load_params(write(tmp_path, {"grid": {"peft": [{"method": "full"}, {"method": "lora", "r": 4}]}})).sweep.grid["peft"][1]["r"] == 4


def test_metric_direction_and_registered_model_are_checked_before_any_work():
    from flows.sweep import SweepError, check_plan

    assert check_plan(tiny_params()) == "reverse-digits-sweep"
    with pytest.raises(SweepError, match=r"sweep.metric 'validation_loss' .*need sweep.evaluate: true"):
        check_plan(tiny_params(sweep=SweepParams(metric="validation_loss")))
    with pytest.raises(SweepError, match=r"set sweep.direction: higher"):
        check_plan(tiny_params(sweep=SweepParams(metric="reverse_digits/exact_match", evaluate=True)))
    with pytest.raises(SweepError, match=r"is the lifecycle's registered model"):
        check_plan(tiny_params(sweep=SweepParams(registered_model="reverse-digits")))


def test_trials_and_ranking():
    from flows.sweep import expand_grid, rank

    assert expand_grid({"learning_rate": [1, 2], "max_steps": [5, 6]}) == [
        {"learning_rate": 1, "max_steps": 5}, {"learning_rate": 1, "max_steps": 6}, {"learning_rate": 2, "max_steps": 5}, {"learning_rate": 2, "max_steps": 6},
    ]
    assert expand_grid({}) == [{}], "an empty grid is one trial of the sft section as it is"
    results = [
        {"name": "a", "status": "ok", "training": {"eval_loss": 2.0}},
        {"name": "b", "status": "failed", "error": "boom"},
        {"name": "c", "status": "ok", "training": {"eval_loss": 1.0}},
        {"name": "d", "status": "ok", "training": {"eval_loss": float("nan")}},
    ]
    assert [r["name"] for r in rank(results, "eval_loss", "lower")] == ["c", "a"]
    assert [r["name"] for r in rank(results, "eval_loss", "higher")] == ["a", "c"]


def test_the_task_runner_follows_params_and_ray_address(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_ray import RayTaskRunner

    from flows.sweep import cores, task_runner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = task_runner(SweepParams())
    assert isinstance(local, ThreadPoolTaskRunner) and local._max_workers == max(1, cores())
    ray = task_runner(SweepParams(runner="ray"))
    assert isinstance(ray, RayTaskRunner) and ray.address == "local", "its own instance, not whatever cluster runs here"
    assert ray.init_kwargs["num_cpus"] == cores() and ray.init_kwargs["include_dashboard"] is False
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    joined = task_runner(SweepParams())  # runner: local, but a cluster is named
    assert isinstance(joined, RayTaskRunner) and joined.address == "ray://head:10001"
    assert "num_cpus" not in joined.init_kwargs, "a cluster brings its own resources"


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_log_and_not_evaluated(local_runs):
    [broken] = local_runs["broken"]
    assert broken["status"] == "failed"
    assert broken["error"].startswith("training:") and "pipelines.sft" in broken["error"] and "train.log" in broken["error"]
    assert "params.yaml not found" in (local_runs["dir"] / "broken/train.log").read_text()
    assert "evaluation" not in broken
