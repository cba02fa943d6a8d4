"""The deployments for real: one `prefect server start` (SQLite, a free loopback port, its own
PREFECT_HOME) for the module, the deployments served from a subprocess exactly as
`make serve-flows` serves them, in a private project copy on a tiny config (the whole real
flow, only smaller: a minute instead of several).

In order, like an operator's day: `make data-add` triggers a lifecycle run and a second
new-data event during it waits for the slot instead of running beside it; the cron has its
next runs scheduled; the finished run's artifacts tell the story through the API and on the
run's page in the UI (a headless-Chromium screenshot); release and rollback run from their
deployments with parameters; a run started while the slot is held is dropped with a message
saying why; a failed gate is a failed run whose state message names the metric.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.workspace import ROOT, copy_project
from flows.patience import stretched
from tests.flows.prefect_server import env_of, prefect, prefect_server, runs_of, serve_flows, triggered, wait_for

pytestmark = pytest.mark.slow

# The smallest config that still runs every real stage and task: a tiny Llama trained for a
# few steps, a few eval items, no quantization, gates and canary bounds it can meet.
TINY = {
    "generate": {"n_sft": 400, "n_preference": 160},
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
    "sft": {"max_steps": 10, "batch_size": 8, "save_steps": 10, "warmup_steps": 0},
    "dpo": {"max_steps": 4, "batch_size": 4},
    # One task: the safety suite's few PII probes would fall outside a limit this small.
    "evaluate": {"tasks": [{"name": "reverse_digits", "metrics": {"exact_match": "higher"}}], "limit": 8, "batch_size": 8, "max_new_tokens": 8},
    "quantize": {"enabled": False},
    "gate": {"thresholds": {"reverse_digits/exact_match": {"min": 0.0}, "preference_accuracy": {"min": 0.0}}, "must_beat_base": False},
    "canary": {"golden_prompts": 3, "min_exact_match": 0.0, "max_latency_ratio": 100.0},
    "serve": {"max_new_tokens": 8},
}
# A cron half a day away: its runs are scheduled, none comes due during the test.
CRON_HOUR = (datetime.datetime.now(datetime.UTC).hour + 12) % 24
WAITED = "AwaitingConcurrencySlot"


def write_params(project: Path, **sections) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    yearly = {"quality_cron": "0 0 1 1 *", "drift_cron": "0 0 1 1 *"}  # served, never due while the module runs
    for name, values in {**TINY, "orchestration": {"cron": f"0 {CRON_HOUR} * * *", "timezone": "UTC"}, "monitor": yearly, **sections}.items():
        params[name] = {**params.get(name, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server: UI and API on a free loopback port, SQLite in its own home."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    p = copy_project(tmp_path_factory.mktemp("project"))
    write_params(p)
    return p


@pytest.fixture(scope="module")
def served(project, server):
    """`make serve-flows`'s command, in the project, against the server; its deployments."""
    with serve_flows(project, server) as found:
        yield found


def data_add(project: Path, url: str, file: Path) -> subprocess.CompletedProcess:
    """`make data-add FILE=...` in the project (setup skipped: the test's venv is the project's)."""
    return subprocess.run(["make", "-o", "setup", f"PY={sys.executable}", "data-add", f"FILE={file}"], cwd=project, env=env_of(project, url), capture_output=True, text=True)


def running_intervals(url: str, run_id) -> list[tuple]:
    """When the run was Running: (start, end) pairs from its state history."""
    with prefect(url) as c:
        states = sorted(c.read_flow_run_states(run_id), key=lambda s: s.timestamp)
    out = []
    for s, nxt in zip(states, states[1:] + [None]):
        if s.type.value == "RUNNING":
            out.append((s.timestamp, nxt.timestamp if nxt else None))
    return out


def pipeline_on_server(project: Path, url: str) -> subprocess.CompletedProcess:
    """`make pipeline --no-deploy` with PREFECT_API_URL pointing at the server."""
    return subprocess.run([sys.executable, "-m", "flows.lifecycle", "--no-deploy"], cwd=project, env=env_of(project, url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


def last_pipeline_run(url: str):
    """The latest flow run that no deployment started."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect(url) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=True)), sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0]


def artifacts_of(url: str, run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect(url) as c:
        return {a.key: a for a in c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}


LIFECYCLE: dict = {}  # the event-triggered run, for the tests after the first


def test_new_data_runs_the_lifecycle_and_a_second_event_waits_for_the_slot(project, server, served, tmp_path):
    deployment = served["llm-lifecycle/lifecycle"]
    mine = tmp_path / "my-chats.jsonl"
    mine.write_text("".join(f'{{"instruction": "Reverse the list:\\n{i} 5 8", "output": "8 5 {i}"}}\n' for i in range(12)))
    added = data_add(project, server, mine)
    assert added.returncode == 0, added.stdout + added.stderr
    emitted = re.search(r"emitted lifecycle\.data\.added \(data (\w+)\)", added.stdout)
    assert emitted, added.stdout + added.stderr
    data = emitted.group(1)

    first = wait_for("the event's lifecycle run to start", lambda: [r for r in triggered(server, deployment) if r.state and r.state.is_running()], 180, project / "serve-flows.log")[0]
    assert first.name == f"reverse-digits sft-dpo data {data}"
    # A second event while it runs: the new run is queued, not started beside it.
    again = subprocess.run([sys.executable, "-m", "flows.deployments", "data-added"], cwd=project, env=env_of(project, server), capture_output=True, text=True)
    assert f"emitted lifecycle.data.added (data {data})" in again.stdout, again.stdout + again.stderr

    def queued():
        runs = triggered(server, deployment)
        second = [r for r in runs if r.id != first.id]
        return second and second[0].state.name == WAITED and second[0]

    second = wait_for("the second run to wait for the slot", queued, 120, project / "serve-flows.log")
    with prefect(server) as c:
        assert not c.read_flow_run(first.id).state.is_final(), "the second run was queued while the first was running"

    def finished():
        with prefect(server) as c:
            runs = [c.read_flow_run(first.id), c.read_flow_run(second.id)]
        return all(r.state.is_final() for r in runs) and runs

    done_first, done_second = wait_for("both runs to finish", finished, 1500, project / "serve-flows.log")
    assert done_first.state.is_completed(), (done_first.state, (project / "serve-flows.log").read_text()[-4000:])
    assert done_second.state.is_completed(), done_second.state
    # Never both running: the second started after the first had ended.
    (start1, end1), = running_intervals(server, first.id)
    (start2, _), = running_intervals(server, second.id)
    assert end1 is not None and start2 >= end1, (start1, end1, start2)
    assert {f"data:{data}", "model:reverse-digits", "recipe:sft-dpo", "llm-lifecycle"} <= set(done_first.tags)
    LIFECYCLE["run"] = done_first


def test_the_cron_has_its_next_runs_scheduled(served, server):
    deployment = served["llm-lifecycle/lifecycle"]

    def scheduled():
        return [r for r in runs_of(server, deployment.id) if r.auto_scheduled and r.state.is_scheduled()]

    upcoming = wait_for("the scheduler to create the cron's runs", scheduled, 90)
    assert len(upcoming) >= 2
    for r in upcoming:
        at = r.expected_start_time.astimezone(datetime.UTC)
        assert (at.hour, at.minute) == (CRON_HOUR, 0), at
        assert at > datetime.datetime.now(datetime.UTC)


def test_the_finished_run_tells_its_story_through_the_api(server, project):
    from mlflow import MlflowClient

    run = LIFECYCLE.get("run") or pytest.fail("the event-triggered lifecycle run did not complete: see test_new_data_runs_the_lifecycle_and_a_second_event_waits_for_the_slot above")
    artifacts = artifacts_of(server, run.id)
    assert {"quality-gate", "evaluation-report", "canary", "release-history", "lifecycle-summary", "mlflow-run"} <= set(artifacts), sorted(artifacts)
    gate = artifacts["quality-gate"].data
    assert "quality gate: passed" in gate and "reverse_digits/exact_match" in gate and "preference_accuracy" in gate, gate
    summary = artifacts["lifecycle-summary"].data
    assert "outcome: promoted (version 1)" in summary and "open in MLflow" in summary, summary
    assert "## release of version 1: promoted" in artifacts["release-history"].data
    link = re.search(r"\]\((http://127\.0\.0\.1:5999/#/experiments/\d+/runs/(\w+))\)", artifacts["mlflow-run"].data)  # Prefect stores a link as markdown
    assert link, artifacts["mlflow-run"].data
    mlflow_run_id = link.group(2)
    assert f"({link.group(1)})" in summary, "the summary links the same run"
    uri = f"sqlite:///{project / 'mlflow.db'}"
    parent = MlflowClient(tracking_uri=uri, registry_uri=uri).get_run(mlflow_run_id)
    assert parent.data.tags["lineage.prefect_flow_run_id"] == str(run.id), "the link leads to this run's MLflow run"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_run_page_shows_the_run_and_its_artifacts(server, tmp_path):
    from PIL import Image

    browser = chromium()
    if browser is None:
        msg = "chromium not installed: apt-get update && apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    run = LIFECYCLE.get("run") or pytest.fail("the event-triggered lifecycle run did not complete: see test_new_data_runs_the_lifecycle_and_a_second_event_waits_for_the_slot above")
    shot = Path(os.environ.get("LIFECYCLE_SCREENSHOT_DIR", tmp_path)) / "flow-run-artifacts.png"
    page = f"{server}/runs/flow-run/{run.id}"  # its header, tags and the graph with the artifacts on it
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium'}",
         "--window-size=1400,1400", "--virtual-time-budget=20000", f"--screenshot={shot}", page],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.exists(), result.stderr[-3000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the page rendered as a blank image"
    assert max(n for n, _ in colours) < 0.95 * image.width * image.height, "one colour fills the page: nothing rendered"


def test_release_and_rollback_run_from_their_deployments_with_parameters(served, server):
    from prefect.deployments import run_deployment

    with prefect(server):
        released = run_deployment(str(served["llm-release/release"].id), parameters={"version": "1"}, timeout=stretched(600))
        rolled = run_deployment(str(served["llm-rollback/rollback"].id), timeout=stretched(300))
    # v1 is the champion already: the release flow says so and changes nothing.
    assert released.state.is_completed(), released.state
    assert released.name == "release reverse-digits v1" and "version:1" in released.tags
    # Nothing to roll back to yet: a failed run that says why.
    assert rolled.state.is_failed(), rolled.state
    assert "no 'previous' version to roll back to" in rolled.state.message, rolled.state.message


def test_a_run_started_while_the_slot_is_held_is_dropped_saying_why(project, server, monkeypatch):
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.control import slot_name
    from pipelines.config import load_params

    write_params(project, orchestration={"cron": f"0 {CRON_HOUR} * * *", "on_busy": "drop"})
    monkeypatch.chdir(project)  # the slot is this project's
    name = slot_name(load_params(project / "params.yaml"))
    try:
        with temporary_settings({PREFECT_API_URL: f"{server}/api"}), concurrency(name, strict=True):
            result = pipeline_on_server(project, server)
    finally:
        write_params(project)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "lifecycle not run" in result.stdout and "dropped" in result.stdout, result.stdout[-4000:]
    assert "dvc repro" not in result.stdout, "nothing ran"
    run = last_pipeline_run(server)
    assert run.state.is_cancelled(), run.state
    assert f"the project's run limit '{name}'" in run.state.message and "on_busy is 'drop'" in run.state.message, run.state.message


def test_a_failed_gate_is_a_failed_run_naming_the_metric(project, server):
    """`make pipeline` with PREFECT_API_URL set: the run shows up on the server, failed by the gate."""
    write_params(project, gate={"thresholds": {"reverse_digits/exact_match": {"min": 1.01}}, "must_beat_base": False})
    result = pipeline_on_server(project, server)
    assert result.returncode == 1, result.stdout[-4000:]
    run = last_pipeline_run(server)
    assert run.state.is_failed(), run.state
    assert "quality gate failed" in run.state.message and "reverse_digits/exact_match" in run.state.message, run.state.message
    summary = artifacts_of(server, run.id)["lifecycle-summary"].data
    assert "outcome: blocked by gate" in summary and "reverse_digits/exact_match" in summary, summary


def test_the_new_data_trigger_passes_the_events_recipe_and_start_point_to_the_flow():
    """The lifecycle deployment's trigger as Prefect builds it (its automation, validated by the
    server's own schema) and as Prefect's server renders it for an event: the feedback export's
    payload becomes the flow's `recipe` / `start_from` / `overrides` parameters; plain new data
    (no recipe in the payload) leaves them None, so params.yaml's recipe runs from the base.
    Seen red: with the trigger built without `parameters`, the feedback event rendered {} (the
    flow would have run params.yaml's [sft, dpo] from the base) and the first assert failed."""
    import asyncio
    import uuid

    from prefect.server.events.schemas.automations import Automation, TriggeredAction
    from prefect.server.events.schemas.events import ReceivedEvent

    from flows.deployments import DATA_ADDED, build_deployments, data_resource
    from flows.lifecycle import lifecycle
    from pipelines.config import load_params

    params = load_params(ROOT / "params.yaml")
    deployment = next(d for d in build_deployments(params) if d.name == "lifecycle")
    (trigger,) = deployment.triggers
    trigger.set_deployment_id(uuid.uuid4())
    automation = Automation.model_validate({**trigger.as_automation().model_dump(mode="json"), "id": str(uuid.uuid4())})
    (action,) = automation.actions
    now = datetime.datetime.now(datetime.UTC)

    def rendered(payload: dict) -> dict:
        event = ReceivedEvent(occurred=now, event=DATA_ADDED, resource={"prefect.resource.id": data_resource(params)}, payload=payload, id=uuid.uuid4())
        fired = TriggeredAction(automation=automation, triggered=now, triggering_labels={}, triggering_event=event, action=action)
        return asyncio.run(action.render_parameters(fired))

    # What pipelines/feedback_export.py sends when its policy holds (feedback_loop.recipe, .start_from, .overrides).
    settings = {"dpo": {"max_steps": 120, "learning_rate": 0.001, "peft": {"r": 16}}}
    feedback = rendered({"source": "feedback", "new_rows": 24, "recipe": ["dpo"], "start_from": "champion", "overrides": settings, "pairs": 20, "data_hash": "abc", "file": "feedback"})
    assert feedback == {"recipe": ["dpo"], "start_from": "champion", "overrides": settings}
    assert lifecycle.validate_parameters(feedback) == {"deploy": True, "canary_drill": None, **feedback}, "the flow accepts them as typed parameters"
    plain = rendered({"data_hash": "def", "file": "my-chats.json"})  # `make data-add`
    assert plain == {"recipe": None, "start_from": None, "overrides": None}
    assert lifecycle.validate_parameters(plain) == {"deploy": True, "canary_drill": None, **plain}
    with pytest.raises(Exception, match="start_from"):  # a typo in an event fails at the parameters, before the run starts
        lifecycle.validate_parameters({"start_from": "champoin"})
