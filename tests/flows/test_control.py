"""The deployments' shape from params, the data hash that names runs, new-data events without a
server, the Makefile targets, and the retry policy (retries only around I/O). No server here:
tests/flows/test_deployments.py runs them against a real one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.control import data_hash, project_key
from flows.deployments import DATA_ADDED, announce_data, build_deployments, data_resource
from pipelines.config import ConfigError, MonitorParams, OrchestrationParams, Params
from pipelines.data_config import DataParams, SourceParams
from tests.conftest import ROOT


def test_deployments_follow_the_orchestration_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params(orchestration=OrchestrationParams(cron="0 */6 * * *", timezone="Europe/Berlin", concurrency_limit=2, on_busy="drop"), monitor=MonitorParams(quality_cron="*/15 * * * *", drift_cron=None))
    lifecycle, release, rollback, quality = build_deployments(params)
    assert (lifecycle.name, release.name, rollback.name) == ("lifecycle", "release", "rollback")
    assert [(s.schedule.cron, s.schedule.timezone) for s in lifecycle.schedules] == [("0 */6 * * *", "Europe/Berlin")]
    (trigger,) = lifecycle.triggers
    assert trigger.expect == {DATA_ADDED}
    assert trigger.match.model_dump() == {"prefect.resource.id": data_resource(params)} and project_key(params) in data_resource(params)
    for d in (lifecycle, release):
        assert d.concurrency_limit == 2 and d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert lifecycle.entrypoint.endswith("flows/lifecycle.py:lifecycle")
    assert release.entrypoint.endswith("flows/release.py:release") and rollback.entrypoint.endswith("flows/release.py:rollback_release")
    assert quality.entrypoint.endswith("flows/watch.py:online_quality") and [(s.schedule.cron, s.schedule.timezone) for s in quality.schedules] == [("*/15 * * * *", "Europe/Berlin")]
    assert [d.name for d in build_deployments(Params())][3:] == ["online-quality", "drift"], "a null cron is no deployment; both by default"
    waiting = build_deployments(Params())[0]
    assert waiting.concurrency_options.collision_strategy.value == "ENQUEUE" and waiting.schedules[0].schedule.cron == "0 3 * * *"


def test_a_bad_cron_names_the_key():
    with pytest.raises(ConfigError, match="orchestration.cron 'every night'"):
        build_deployments(Params(orchestration=OrchestrationParams(cron="every night")))
    with pytest.raises(ConfigError, match="monitor.drift_cron 'hourly'"):
        build_deployments(Params(monitor=MonitorParams(drift_cron="hourly")))


def test_the_data_hash_follows_the_users_data_not_the_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params(data=DataParams(sources=[SourceParams(name="demo", path="data/generated"), SourceParams(name="user", path="data/raw", required=False)]))
    (tmp_path / "data/generated").mkdir(parents=True)
    (tmp_path / "data/raw").mkdir(parents=True)
    empty = data_hash(params)
    (tmp_path / "data/generated/alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert data_hash(params) == empty, "regenerated demo data is not new data"
    (tmp_path / "data/raw/mine.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    added = data_hash(params)
    assert added != empty and data_hash(params) == added
    (tmp_path / "data/raw/mine.jsonl").write_text('{"instruction": "a", "output": "c"}\n')
    changed = data_hash(params)
    assert changed not in (empty, added)
    # how the file is read (`make data-add FORMAT=...` records it there) is part of the data
    (tmp_path / "data/raw/dataset_info.json").write_text('{"mine": {"file_name": "mine.jsonl", "formatting": "alpaca"}}')
    assert data_hash(params) not in (empty, added, changed)


def test_new_data_without_a_server_says_so_and_does_not_fail(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_API_URL: None}):
        said = announce_data(Params())
    assert said.startswith("no new-data event sent: no Prefect server is configured (PREFECT_API_URL is unset)")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        said = announce_data(Params())
    assert f"no Prefect server answers at http://127.0.0.1:{port}/api" in said and "The data is added" in said


def make_dry_run(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-o", "setup", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_make_targets_run_the_deployments_commands():
    assert any(line.endswith("-m flows.deployments serve") and "PREFECT_API_URL=" in line for line in make_dry_run("serve-flows"))
    assert any(line.endswith("-m flows.deployments serve") for line in make_dry_run("schedule"))
    lines = make_dry_run("data-add", "FILE=some file.jsonl")
    assert any(line.endswith('-m pipelines.sources add "some file.jsonl" --format auto') for line in lines)
    assert any(line.endswith('-m flows.deployments data-added "some file.jsonl"') for line in lines)
    ui = "\n".join(make_dry_run("ui"))
    assert "prefect server start --host 127.0.0.1 --port 4200" in ui and "mlflow ui" in ui and "--host 127.0.0.1 --port 5000" in ui
    # With a tracking server, its own UI is the one to open: nothing is started on port 5000.
    remote = "MLFLOW_TRACKING_URI=http://mlflow.example:5000"
    lines = make_dry_run("ui-mlflow", remote)  # (under `make test`, a sub-make also says which directory it entered)
    assert "echo \"MLflow's UI is the tracking server's own: open http://mlflow.example:5000\"" in lines and not any("mlflow ui" in l for l in lines)
    ui = "\n".join(make_dry_run("ui", remote))
    assert "mlflow ui" not in ui and "MLflow UI:  http://mlflow.example:5000" in ui
    assert any(line.startswith(".venv/bin/mlflow ui --backend-store-uri sqlite:///") for line in make_dry_run("ui-mlflow"))


def test_data_add_still_succeeds_with_no_server(tmp_path):
    """`make data-add`'s two commands in a fresh repo, no Prefect server: the file is added and
    the missing server is reported, exit 0."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(f'{{"instruction": "Reverse the list:\\n{i} 2", "output": "2 {i}"}}\n' for i in range(5)))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    out = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-o", "setup", f"PY={sys.executable}", "data-add", f"FILE={mine}"], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "added data/raw/mine.jsonl" in out.stdout and "no new-data event sent: no Prefect server is configured" in out.stdout


def test_only_io_tasks_retry():
    """A stage, a gate or a canary that fails would fail the same way again (and a canary has
    side effects); MLflow and the DVC remote are I/O that a retry can get through."""
    from tasks.deploy import canary_release
    from tasks.gates import quality_gate, quantization_gate
    from tasks.registry import register_candidate
    from tasks.stages import push_artifacts, repro
    from tasks.tracking import finish_parent_run, log_stage, start_parent_run

    assert [t.retries for t in (repro, quality_gate, quantization_gate, canary_release)] == [0, 0, 0, 0]
    assert all(t.retries and t.retries > 0 for t in (push_artifacts, register_candidate, start_parent_run, log_stage, finish_parent_run))


def test_the_run_summary_shows_the_recipe_steps_beside_a_releases_canary_steps():
    """A release's result carries its canary steps (dicts) under "steps"; the summary's
    recipe-step lines must not share that key. Seen red: with both under "steps", every
    released run failed at its summary ("sequence item 6: expected str instance, dict found")."""
    from flows.lifecycle import render

    summary = {"stages": [{"stage": "sft", "ran": True, "seconds": 1.0}], "quality": {}, "recipe_steps": ["step dpo vs sft on reverse_digits/exact_match: 1.000 -> 1.000 (+0.000 [-0.020, +0.020]): not worse"],
               "mlflow_parent_run_id": "r1", "recipe": ["sft", "dpo"], "version": "2", "outcome": "promoted"}
    summary.update({"steps": [{"weight": 100, "requests": 3}], "outcome": "promoted"})  # what canary_release returns
    text = render(summary)
    assert "step dpo vs sft" in text and "outcome: promoted (version 2)" in text
