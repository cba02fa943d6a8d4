"""The monitoring stack as a user runs it: `python -m serving.plane` (make serve) and
`python -m monitoring` (make monitor), each its own process in one project folder, with real
Prometheus and Alertmanager, a real MLflow registry, a real Prefect server (the harness) for the
events, and a real webhook endpoint. Short scrape, evaluation and burn windows (params) so an
alert fires within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.serving.conftest import wait_until

NAME = "reverse-digits"
GOLD, FREE = "sk-gold-monitoring-0001", "sk-free-monitoring-0001"
KEYS = f'tiers:\n  gold: {{priority: 10, rpm: 1000000, tpm: 100000000}}\n  free: {{priority: 0, rpm: 1000000, tpm: 100000000}}\nkeys:\n  "{GOLD}": gold\n  "{FREE}": free\n'


def need(tool: str) -> str:
    """A binary the tests run for real: skipped where it is missing, failed under CI (.ci/run
    installs it)."""
    found = shutil.which(tool)
    if found is None:
        message = f"{tool} is not installed (apt-get install prometheus prometheus-alertmanager)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def prom(url: str, query: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10, trust_env=False).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


class Process:
    """`python -m <module>` in the project folder, its output in `<name>.log`."""

    def __init__(self, workdir: Path, module: str, name: str, ready_url: str, env: dict[str, str]) -> None:
        self.workdir, self.module, self.name, self.ready_url, self.env = workdir, module, name, ready_url, env
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600) -> "Process":
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, f"{self.module} answering on {self.ready_url} (log: {self.log})", timeout_s)
        return self

    def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(self.ready_url, timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=300)
        return None if self.process is None else self.process.returncode


class Clients:
    """`n` clients sending without pause through the gateway: keys of two tiers; every third a
    stream asking for its usage, every fourth cacheable (temperature 0, no `no-cache`). Every
    answer: (sent, done, status, version)."""

    def __init__(self, url: str, n: int = 8) -> None:
        self.url, self.stop_event, self.lock = url, threading.Event(), threading.Lock()
        self.answers: list[tuple[float, float, int, str]] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def run(self, i: int) -> None:
        key = GOLD if i % 2 else FREE
        with httpx.Client(timeout=180, trust_env=False) as http:
            n = 0
            while not self.stop_event.is_set():
                n += 1
                sent = time.monotonic()
                stream, cacheable = n % 3 == 0, n % 4 == 0
                body = {"model": NAME, "messages": [{"role": "user", "content": f"{i % 10} {n % 10}" if not cacheable else "1 2 3"}], "max_tokens": 4, "temperature": 0}
                headers = {"authorization": f"Bearer {key}", **({} if cacheable else {"cache-control": "no-cache"})}
                try:
                    if stream:
                        body.update(stream=True, stream_options={"include_usage": True})
                        with http.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=headers) as r:
                            text = "".join(r.iter_text())
                            status = r.status_code if '"error"' not in text else 599
                            version = r.headers.get("x-gateway-version", "")
                    else:
                        r = http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)
                        status, version = r.status_code, r.headers.get("x-gateway-version", "")
                except httpx.HTTPError as exc:
                    status, version = 0, type(exc).__name__
                with self.lock:
                    self.answers.append((sent, time.monotonic(), status, version))

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.answers) >= 8, "the clients' first answers", 300)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=180)

    def failed(self) -> list:
        return [a for a in self.answers if a[2] != 200]


class Served:
    """The plane and the monitor running in `workdir`, and where to reach each part."""

    workdir: Path
    plane: Process
    monitor: Process
    versions: list[str]
    plane_url: str
    prometheus_url: str
    alertmanager_url: str
    receiver_url: str
    webhook: object
    prefect_api: str

    def state(self) -> dict:
        return httpx.get(f"{self.plane_url}/admin/state", timeout=120, trust_env=False).json()

    def actions(self) -> list[dict]:
        return httpx.get(f"{self.receiver_url}/actions", params={"last": 1000}, timeout=10, trust_env=False).json()["actions"]

    def query(self, q: str) -> list[dict]:
        return prom(self.prometheus_url, q)


def monitor_params(ports: dict[str, int]) -> dict:
    """Seconds where production has minutes: 1 s scrapes and rule evaluations, a 20 s / 5 s burn
    window pair, a 10 s canary comparison, alerts held 2 s."""
    return {
        "prometheus_port": ports["prometheus"], "alertmanager_port": ports["alertmanager"], "receiver_port": ports["receiver"],
        "scrape_interval": "1s", "evaluation_interval": "1s", "retention": "1d",
        "slo_error_ratio": 0.05, "slo_p95_latency_s": 5, "slo_p95_ttft_s": 5,
        "burn_windows": [{"long": "20s", "short": "5s", "burn_rate": 10, "severity": "page"}],
        "engine_down_for": "30s", "queue_for": "1m", "canary_window": "10s", "canary_for": "2s",
        "quality_min": 0.6, "quality_for": "2s", "drift_for": "2s",
        "group_wait": "1s", "group_interval": "2s", "repeat_interval": "1h", "cooldown_s": 600,
    }


@pytest.fixture(scope="module")
def served(prepared_dir, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.config import Params
    from registry import models
    from registry.store import client, experiment_id
    from serving.launcher import free_port
    from tests.tasks.webhook import Webhook

    need("prometheus")
    need("prometheus-alertmanager")
    work = tmp_path_factory.mktemp("monitoring")
    for sub in ("data", "models"):
        shutil.copytree(prepared_dir / sub, work / sub)
    (work / "keys.yaml").write_text(KEYS)
    ports = {k: free_port() for k in ("plane", "prometheus", "alertmanager", "receiver")}
    webhook = Webhook()
    serve = {"port": ports["plane"], "replicas": 1, "max_new_tokens": 8, "startup_timeout_s": 300, "supervise_interval_s": 0.3, "drain_timeout_s": 30, "keys_file": str(work / "keys.yaml")}
    raw = {
        "serve": serve, "notify": {"webhook_url": webhook.url}, "monitor": monitor_params(ports),
    }
    Params.model_validate(raw)  # a typo here fails now, not inside both processes
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        for key in ("GATEWAY_API_KEY", "SERVING_API_KEY", "LIFECYCLE_WEBHOOK_URL"):
            mp.delenv(key, raising=False)
        c, exp = client(), experiment_id("test")
        versions = [str(models.register(NAME, work / "models/base", c.create_run(exp).info.run_id, f"md5-{i}", {}).version) for i in range(2)]
        models.promote(NAME, versions[0])
        s = Served()
        s.workdir, s.versions, s.webhook = work, versions, webhook
        s.prefect_api = PREFECT_API_URL.value()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": s.prefect_api}
        s.plane_url = f"http://127.0.0.1:{ports['plane']}"
        s.prometheus_url, s.alertmanager_url = f"http://127.0.0.1:{ports['prometheus']}", f"http://127.0.0.1:{ports['alertmanager']}"
        s.receiver_url = f"http://127.0.0.1:{ports['receiver']}"
        s.plane = Process(work, "serving.plane", "plane", f"{s.plane_url}/health", env)
        s.monitor = Process(work, "monitoring", "monitor", f"{s.receiver_url}/health", env)
        try:
            s.plane.start()
            s.monitor.start(120)
            yield s
        finally:
            s.monitor.stop()
            s.plane.stop(signal.SIGINT)
            webhook.close()
