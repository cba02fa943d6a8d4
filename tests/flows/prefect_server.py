"""A real Prefect server and `make serve-flows`'s deployments for the whole-flow tests
(tests/flows/test_deployments.py, and the feedback loop's end-to-end test in test_lifecycle.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.workspace import flow_env
from flows.patience import Patience
from serving.launcher import free_port
from tests.serving.conftest import stop

DEPLOYMENTS = {"llm-lifecycle/lifecycle", "llm-release/release", "llm-rollback/rollback", "online-quality/online-quality", "drift/drift"}


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start`: UI and API on a free loopback port, SQLite in `home`; its URL."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # the UI's pages call this port, not the default 4200
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # the cron's runs appear within seconds
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",  # a queued run looks again every 5 s
    }
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            patience = Patience(90)  # ~10 s on an idle machine, a new database included
            while not patience.expired():
                assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):  # not listening yet
                    if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                        break
                time.sleep(1)
            else:
                pytest.fail(f"prefect server did not answer in {patience}:\n" + (home / "server.log").read_text()[-3000:])
            yield url
        finally:
            stop(proc, 30)


@contextmanager
def prefect(url: str):
    """A sync Prefect client on the test server."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{url}/api"}), get_client(sync_client=True) as c:
        yield c


def env_of(project: Path, url: str) -> dict[str, str]:
    return {**flow_env(project), "PREFECT_API_URL": f"{url}/api", "PREFECT_RUNNER_POLL_FREQUENCY": "2", "MLFLOW_UI_URL": "http://127.0.0.1:5999"}


@contextmanager
def serve_flows(project: Path, url: str) -> Iterator[dict]:
    """`make serve-flows`'s command, in the project, against the server: its deployments by
    'flow/deployment' name, once all are registered."""
    with open(project / "serve-flows.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deployments", "serve"], cwd=project, env=env_of(project, url), stdout=log, stderr=subprocess.STDOUT)
        try:
            patience = Patience(120)
            found: dict = {}
            while not patience.expired() and set(found) != DEPLOYMENTS:
                assert proc.poll() is None, (project / "serve-flows.log").read_text()[-3000:]
                with prefect(url) as c:
                    flows = {f.id: f.name for f in c.read_flows()}
                    found = {f"{flows[d.flow_id]}/{d.name}": d for d in c.read_deployments() if d.flow_id in flows}
                time.sleep(1)
            assert set(found) == DEPLOYMENTS, (project / "serve-flows.log").read_text()[-3000:]
            yield found
        finally:
            stop(proc, 30)


def runs_of(url: str, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect(url) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), sort=FlowRunSort.START_TIME_ASC)


def triggered(url: str, deployment) -> list:
    """The deployment's runs that an event (not the cron) created."""
    return [r for r in runs_of(url, deployment.id) if not r.auto_scheduled]


def wait_for(what: str, check, timeout: float, log: Path | None = None):
    """Poll `check` until it returns something; `timeout` is an idle machine's seconds,
    stretched by the load (flows/patience.py)."""
    patience = Patience(timeout)
    while not patience.expired():
        got = check()
        if got:
            return got
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what} after {patience}" + (f"\n{log.read_text()[-4000:]}" if log and log.exists() else ""))
