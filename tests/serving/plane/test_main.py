"""`make serve` as a user runs it (`python -m serving.plane`, its own process, a real MLflow
registry) and stops it: Ctrl-C (SIGINT) and `kill` (SIGTERM, what systemd, Docker and Kubernetes
send) both stop every engine it started and print the stop line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from registry import models
from serving.launcher import free_port
from tests.conftest import ROOT
from tests.serving.conftest import wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_engine_and_says_so(model_dir, tmp_path, monkeypatch, sig):
    """Seen red: with plane.stop_all() and the stop line moved out of the app's lifespan into a
    `finally` after uvicorn.run (as before), SIGTERM failed: no stop line, the engine left
    running in its own process group (uvicorn re-raises SIGTERM after its shutdown, so the
    `finally` never runs). SIGINT still passed that way: Python turns it into KeyboardInterrupt."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    version = str(models.register("reverse-digits", Path(model_dir), client().create_run(experiment_id("test")).info.run_id, "md5-a", {}).version)
    models.promote("reverse-digits", version)
    port = free_port()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serve": {"port": port, "max_new_tokens": 8, "startup_timeout_s": 300}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "plane.log"
    with log.open("wb") as out:
        plane = subprocess.Popen([sys.executable, "-m", "serving.plane"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:

        def ready() -> bool:
            assert plane.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            return False

        wait_until(ready, "the plane answering", 600)  # a busy machine starts an engine slowly
        state = json.loads((tmp_path / ".serving/plane/state.json").read_text())
        pids = [r["pid"] for r in state["replicas"][version]]
        assert pids and all(alive(p) for p in pids)
        plane.send_signal(sig)
        plane.wait(timeout=300)
        output = log.read_text()
        assert "the plane stopped its engines; `make serve` resumes the same routing" in output, output[-3000:]
        assert [p for p in pids if alive(p)] == [], "no engine outlives the plane"
        assert json.loads((tmp_path / ".serving/plane/state.json").read_text())["stable"] == version, "the routing is kept for the next start"
    finally:
        if plane.poll() is None:
            plane.kill()
            plane.wait()
        for pid in pids:  # whatever the outcome, nothing is left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
