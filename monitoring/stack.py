"""`make monitor`: Prometheus, Alertmanager and the receiver, against the plane `make serve` runs.

A separate command from `make serve`, so that the plane serves without Prometheus installed and
the monitor can be restarted (new rules, new params) without touching the engines; it watches
whatever the planes' target files name, so it may start before or after the plane.

`Stack` renders the configuration from params into `.serving/monitoring/` (prometheus.yml,
alertmanager.yml, rules/), runs Debian's `prometheus` and `prometheus-alertmanager` binaries as
child processes in their own sessions (loopback only, data under `.serving/monitoring/`), and
stops them. `python -m monitoring` serves the receiver (serving/alerts.py) and owns the two
processes in its lifespan: Ctrl-C and SIGTERM both stop everything (uvicorn re-raises a SIGTERM
after its shutdown, so code after `uvicorn.run` would not run). A monitor that was killed
(SIGKILL) leaves its children running: the next one stops them first, from its pid file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from monitoring.render import alertmanager_config, prometheus_config, write_rules
from pipelines.config import Params

MONITOR_DIR = Path(".serving/monitoring")
PLANE_DIRS = (Path(".serving/plane"), Path(".serving/release-plane"))  # `make serve`'s and a release's own plane
INSTALL = "apt-get install prometheus prometheus-alertmanager (Debian), or put prometheus and alertmanager on PATH"


class MonitorError(RuntimeError):
    """The stack could not start; the message says which part and why."""


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise MonitorError(f"{names[0]} is not installed: {INSTALL}")


class Stack:
    """Prometheus and Alertmanager for `params`, configured and stored under `monitor_dir`,
    scraping the planes whose state folders are `plane_dirs`."""

    def __init__(self, params: Params, monitor_dir: Path = MONITOR_DIR, plane_dirs: tuple[Path, ...] = PLANE_DIRS) -> None:
        self.params = params
        self.dir = Path(monitor_dir).resolve()
        self.plane_dirs = tuple(Path(p).resolve() for p in plane_dirs)
        self.processes: dict[str, subprocess.Popen] = {}
        m = params.monitor
        self.prometheus_url = f"http://127.0.0.1:{m.prometheus_port}"
        self.alertmanager_url = f"http://127.0.0.1:{m.alertmanager_port}"
        self.receiver_url = f"http://127.0.0.1:{m.receiver_port}"

    def render(self) -> None:
        """The configuration for the current params, checked by promtool and amtool."""
        rules = write_rules(self.params, self.dir / "rules")
        (self.dir / "checks").mkdir(parents=True, exist_ok=True)
        for d in self.plane_dirs:  # Prometheus watches a target file's folder, which must exist
            d.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(prometheus_config(self.params, rules, [d / "targets.json" for d in self.plane_dirs]))
        (self.dir / "alertmanager.yml").write_text(alertmanager_config(self.params))
        for tool, args in (("promtool", ["check", "config", str(self.dir / "prometheus.yml")]), ("amtool", ["check-config", str(self.dir / "alertmanager.yml")])):
            exe = shutil.which(tool)
            if exe is None:
                continue  # the servers check their own files when they start
            checked = subprocess.run([exe, *args], capture_output=True, text=True)
            if checked.returncode != 0:
                raise MonitorError(f"{tool} rejects the rendered configuration in {self.dir}: {(checked.stdout + checked.stderr)[-1500:]}")

    def start(self, startup_timeout_s: float = 60) -> None:
        self.stop_leftovers()
        m = self.params.monitor
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        commands = {
            "prometheus": [
                binary("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'prometheus'}",
                f"--storage.tsdb.retention.time={m.retention}", f"--web.listen-address=127.0.0.1:{m.prometheus_port}",
            ],
            "alertmanager": [
                binary("prometheus-alertmanager", "alertmanager"), f"--config.file={self.dir / 'alertmanager.yml'}", f"--storage.path={self.dir / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{m.alertmanager_port}", "--cluster.listen-address=",  # one instance: no gossip port
            ],
        }
        try:
            for name, command in commands.items():
                with (logs / f"{name}.log").open("ab") as log:
                    # Its own session: the terminal's Ctrl-C reaches the monitor, which stops it in order.
                    self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._save_pids()
            for name, url in (("prometheus", self.prometheus_url), ("alertmanager", self.alertmanager_url)):
                self._wait_ready(name, url, startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, name: str, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.processes[name].poll()
            if code is not None:
                raise MonitorError(f"{name} exited with code {code}: {self.log_tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2, trust_env=False).status_code == 200:
                    return
            time.sleep(0.2)
        raise MonitorError(f"{name} did not become ready on {url} within {timeout_s:g}s: {self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def _save_pids(self) -> None:
        (self.dir / "pids.json").write_text(json.dumps({name: p.pid for name, p in self.processes.items()}))

    def stop_leftovers(self) -> None:
        """Children of a monitor that was killed: stopped if they are still ours (same binary,
        same configuration folder)."""
        path = self.dir / "pids.json"
        if not path.exists():
            return
        for pid in json.loads(path.read_text()).values():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(self.dir) in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        path.unlink()

    def stop(self, timeout_s: float = 20) -> None:
        for name, p in list(self.processes.items()):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout_s)
            self.processes.pop(name)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pids.json").unlink()

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())
