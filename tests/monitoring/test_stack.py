"""`make monitor` as a process (`python -m monitoring`, no plane needed): it prints its URLs,
and Ctrl-C (SIGINT) or SIGTERM stops Prometheus, Alertmanager and the receiver; the children a
killed monitor left are stopped by the next one."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import yaml

from serving.launcher import free_port
from tests.conftest import ROOT
from tests.monitoring.conftest import Process, need, prom
from tests.serving.conftest import wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read()
    return "State:\tZ" not in status  # a zombie has exited


@pytest.fixture
def project(tmp_path):
    need("prometheus")
    need("prometheus-alertmanager")
    ports = {k: free_port() for k in ("prometheus", "alertmanager", "receiver")}
    monitor = {"prometheus_port": ports["prometheus"], "alertmanager_port": ports["alertmanager"], "receiver_port": ports["receiver"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"monitor": monitor}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return tmp_path, ports, env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_make_monitor_prints_its_urls_and_a_signal_stops_all_three(project, sig):
    """Seen red: with Stack.stop() taken out of the lifespan's `finally`, SIGTERM ended the
    receiver and left Prometheus and Alertmanager running ("prometheus still running")."""
    work, ports, env = project
    monitor = Process(work, "monitoring", "monitor", f"http://127.0.0.1:{ports['receiver']}/health", env).start(120)
    pids = json.loads((work / ".serving/monitoring/pids.json").read_text())
    assert set(pids) == {"prometheus", "alertmanager"} and all(alive(p) for p in pids.values())
    out = monitor.log.read_text()
    assert f"Prometheus http://127.0.0.1:{ports['prometheus']}" in out and f"Alertmanager http://127.0.0.1:{ports['alertmanager']}" in out
    wait_until(lambda: prom(f"http://127.0.0.1:{ports['prometheus']}", 'up{job="checks"} == 1'), "Prometheus scraping the receiver's exporter", 60)
    assert monitor.stop(sig) is not None
    for name, pid in pids.items():
        wait_until(lambda: not alive(pid), f"{name} stopped", 30)
    assert "the monitor stopped Prometheus, Alertmanager and the receiver" in monitor.log.read_text()


def test_a_killed_monitors_children_are_stopped_by_the_next_one(project):
    work, ports, env = project
    first = Process(work, "monitoring", "monitor", f"http://127.0.0.1:{ports['receiver']}/health", env).start(120)
    pids = json.loads((work / ".serving/monitoring/pids.json").read_text())
    first.stop(signal.SIGKILL)  # no clean-up: its children live on, holding their ports
    time.sleep(0.5)
    assert all(alive(p) for p in pids.values())
    second = Process(work, "monitoring", "monitor2", f"http://127.0.0.1:{ports['receiver']}/health", env).start(120)
    try:
        assert not any(alive(p) for p in pids.values()), "the leftovers were stopped before the new ones started on the same ports"
    finally:
        second.stop()
