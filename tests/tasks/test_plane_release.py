"""Releases into a running serving plane (`python -m serving.plane`, a real process, as `make serve`
starts it) with a real MLflow registry, while 16 clients send requests without pause through ONE
queue slot (serve.queue_capacity 1, one replica), with keys of two tiers from a keys file and no
gateway key: a full release (canary steps, promotion) and then `make rollback` (the real make
target, in its own process), both while requests wait in the gateway's queue; a bad candidate
rolled back; the plane killed mid-canary and restarted. No client may see an error, every answer
names the version that gave it, and the release's own traffic gets in with the plane's key.

One plane for the module; the versions are the same tiny checkpoint registered several times,
so their greedy answers agree and a healthy candidate is promoted."""

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

from pipelines.config import CanaryParams, ServeParams
from registry import models
from registry.store import client
from serving.launcher import free_port
from serving.plane_client import PlaneClient
from tasks.deploy import canary_release
from tests.conftest import ROOT, tiny_params
from tests.serving.conftest import QueueWatch, wait_until

NAME = "reverse-digits"
GOLD, FREE = "sk-gold-plane-release-0001", "sk-free-plane-release-0001"
KEYS = f'tiers:\n  gold: {{priority: 10, rpm: 1000000, tpm: 100000000}}\n  free: {{priority: 0, rpm: 1000000, tpm: 100000000}}\nkeys:\n  "{GOLD}": gold\n  "{FREE}": free\n'


def auth(key: str = GOLD) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Plane:
    """The plane as a user runs it: its own process, its own log."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Plane":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        log = (self.workdir / "plane.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "serving.plane"], cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, f"the plane answering on {self.url} (log: {self.workdir / 'plane.log'})", 600)  # a busy machine starts engines slowly
        return self

    def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, (self.workdir / "plane.log").read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def state(self) -> dict:
        return httpx.get(f"{self.url}/admin/state", timeout=120).json()

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=300)


class Clients:
    """16 clients sending without pause, half with a gold key (odd ones), half with a free one;
    every answer: (sent, done, status, version, client)."""

    def __init__(self, url: str, n: int = 16) -> None:
        self.url, self.stop_event, self.lock = url, threading.Event(), threading.Lock()
        self.answers: list[tuple[float, float, int, str, int]] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def run(self, i: int) -> None:
        with httpx.Client(timeout=180) as http:
            while not self.stop_event.is_set():
                sent = time.monotonic()
                body = {"model": NAME, "messages": [{"role": "user", "content": f"{i % 10} {(i * 3) % 10}"}], "max_tokens": 4, "temperature": 0}
                try:
                    r = http.post(f"{self.url}/v1/chat/completions", json=body, headers={"cache-control": "no-cache", **auth(GOLD if i % 2 else FREE)})
                    status, version = r.status_code, r.headers.get("x-gateway-version", "")
                except httpx.HTTPError as exc:
                    status, version = 0, type(exc).__name__
                with self.lock:
                    self.answers.append((sent, time.monotonic(), status, version, i))

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.answers) >= 16, "the clients' first answers", 300)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=180)

    def failed(self) -> list:
        return [a for a in self.answers if a[2] != 200]

    def versions_sent_after(self, t: float) -> set[str]:
        return {a[3] for a in self.answers if a[0] > t}

    def starved(self, since: float) -> list[str]:
        """Clients none of whose requests sent after `since` was answered (read once they have
        stopped): a request that waits until the others stop sending holds its client up, so
        nothing of its is sent meanwhile. Not a count: how many fit in a release is timing."""
        answered = {a[4] for a in self.answers if a[0] > since}
        return [f"client {i} ({'gold' if i % 2 else 'free'})" for i in range(len(self.threads)) if i not in answered]


# A coarse error-rate effect (4 requests a step): these tests are about the plane, not the
# error-rate test's power (tests/pipelines/test_gates.py).
CANARY = CanaryParams(steps=[50, 100], step_requests=3, error_rate_effect=0.5, golden_prompts=4, shadow_prompts=2, min_exact_match=0.0, max_latency_ratio=50)


@pytest.fixture(scope="module")
def plane(prepared_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("plane-release")
    for sub in ("data", "models"):
        shutil.copytree(prepared_dir / sub, work / sub)
    port = free_port()
    (work / "keys.yaml").write_text(KEYS)
    # One slot: 16 clients keep 15 requests waiting in the gateway's queue, through every switch.
    serve = ServeParams(
        port=port, replicas=1, max_new_tokens=8, startup_timeout_s=300, supervise_interval_s=0.3, drain_timeout_s=60,
        queue_capacity=1, keys_file=str(work / "keys.yaml"),
    )
    params = tiny_params(serve=serve, canary=CANARY)
    (work / "params.yaml").write_text(yaml.safe_dump({"serve": serve.model_dump(mode="json"), "canary": CANARY.model_dump(mode="json")}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        for key in ("GATEWAY_API_KEY", "SERVING_API_KEY"):  # clients need a key from the file; the release holds none
            mp.delenv(key, raising=False)
        from registry.store import experiment_id

        c, exp = client(), experiment_id("test")
        versions = [str(models.register(NAME, work / "models/base", c.create_run(exp).info.run_id, f"md5-{i}", {}).version) for i in range(4)]
        models.promote(NAME, versions[0])
        running = Plane(work, port).start()
        running.params, running.versions = params, versions
        try:
            yield running
        finally:
            running.stop()


def alias(name: str) -> str | None:
    mv = models.by_alias(NAME, name)
    return str(mv.version) if mv else None


def make_rollback(workdir: Path) -> subprocess.CompletedProcess:
    """`make rollback`, as a user types it in the project folder (the Makefile's own target)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-o", "setup", f"PY={sys.executable}", "rollback"], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def test_a_release_and_a_rollback_with_requests_queued_lose_nothing_and_leave_registry_routing_and_engines_agreeing(plane):
    """Seen red: with the gateway routing each request before its wait in the queue and a
    version that left the routing still handing out replicas (the code before the fix), the
    queue assertions held but "11 of 3676 requests failed": 502s from version 2, reached after
    the rollback had drained and stopped it, and a ReadTimeout.
    Seen red: with the queue back to strict priority (no serve.queue_max_overtake_s), the 8 gold
    clients kept the one slot busy and each free client's request sent before the release waited
    until the gold clients stopped (160 s; 727 answers for each gold client meanwhile): "starved
    while the release and the rollback ran: ['client 0 (free)', 'client 2 (free)', ...,
    'client 14 (free)']". The release's own untiered users waited out their 60 s timeout at each
    step (the release took 140 s; 31 s with the bound). A full-suite run on a busy machine had
    gone past the clients' 180 s timeout: "8 of 2907 requests failed", ReadTimeout, and
    "client-visible errors: 4"."""
    v1, v2 = plane.versions[:2]
    assert plane.state()["stable"] == v1
    with Clients(plane.url) as clients, QueueWatch(plane.url) as queue:
        release_started = time.monotonic()
        outcome = canary_release.fn(plane.params, v2)
        promoted_at = time.monotonic()
        assert outcome["outcome"] == "promoted", outcome["reasons"]
        assert outcome["where"].startswith("the running plane")
        wait_until(lambda: clients.versions_sent_after(promoted_at), "answers after the promotion", 300)
        rollback_started = time.monotonic()
        rolled = make_rollback(plane.workdir)
        rolled_back_at = time.monotonic()
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        wait_until(lambda: clients.versions_sent_after(rolled_back_at + 0.5), "answers after the rollback", 300)
    # Both tiers go on being answered: priority orders the queue, it never stops a tier.
    assert clients.starved(release_started) == [], f"starved while the release and the rollback ran: {clients.starved(release_started)}"
    assert queue.most_waiting(release_started, promoted_at) > 0, "requests were queued while the release switched versions"
    assert queue.most_waiting(rollback_started, rolled_back_at) > 0, "requests were queued while the rollback switched back"
    assert clients.failed() == [], f"{len(clients.failed())} of {len(clients.answers)} requests failed: {clients.failed()[:3]}"
    assert {a[3] for a in clients.answers} == {v1, v2}, "clients were answered by the champion, then the candidate, then the champion"
    during = {a[3] for a in clients.answers if promoted_at < a[0] < rollback_started}
    assert during == {v2}, "after the promotion every new request went to the new stable"
    assert clients.versions_sent_after(rolled_back_at) == {v1}, "after the rollback every new request went back"
    assert [s["weight"] for s in outcome["steps"]] == [50, 100]
    assert all(s["canary"]["requests"] > 0 for s in outcome["steps"]), "the release's own traffic got in with the plane's key"
    assert f"version {v1} now serves all traffic" in rolled.stdout

    state = plane.state()
    assert (alias("champion"), alias("previous")) == (v1, v2)
    assert (state["stable"], state["canary"]) == (v1, None)
    assert list(state["replicas"]) == [v1], "only the champion's engine is running"
    answer = httpx.post(f"{plane.url}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "1"}], "max_tokens": 2}, headers=auth(), timeout=60)
    assert answer.headers["x-gateway-version"] == v1
    events = [(e["event"], e.get("version")) for e in state["history"]]
    assert [("canary_attached", v2), ("promoted", v2), ("canary_attached", v1), ("promoted", v1)] == [e for e in events if e[0] in ("canary_attached", "promoted")]
    tags = client().get_model_version(NAME, v2).tags
    assert tags["release.history"].endswith(f"release/v{v2}.json"), "the release history is stored with the version"
    assert tags["status"] == "rolled_back" and tags["status.reason"].startswith("rolled back by hand"), "a rerun of these bytes is refused"
    assert models.blocked(client().get_model_version(NAME, v2)) is not None


def test_a_bad_candidate_released_into_the_plane_is_rolled_back_while_clients_keep_sending(plane):
    v1, v3 = plane.versions[0], plane.versions[2]
    with Clients(plane.url) as clients:
        outcome = canary_release.fn(plane.params, v3, drill=["--fault-error-rate", "1.0"])
    assert outcome["outcome"] == "rolled_back" and any(r.startswith("error_rate") for r in outcome["reasons"])
    assert clients.failed() == [], "the canary's failures are retried on stable"
    assert {a[3] for a in clients.answers} == {v1}
    state = plane.state()
    assert (state["stable"], state["canary"], alias("champion")) == (v1, None, v1)
    assert list(state["replicas"]) == [v1]


def test_a_plane_killed_mid_canary_resumes_the_same_routing_on_restart(plane):
    v1, v4 = plane.versions[0], plane.versions[3]
    admin = PlaneClient(plane.url)
    admin.attach_canary(v4, 0.5)
    before = plane.state()
    plane.stop(signal.SIGKILL)  # a crash: the engines, in their own process groups, live on
    plane.start()
    after = plane.state()
    assert (after["stable"], after["canary"], after["weight"]) == (v1, v4, 0.5)
    assert after["replicas"] == before["replicas"], "the running engines were adopted, not restarted"
    assert any(e["event"] == "adopted" for e in after["history"])
    seen = {
        httpx.post(f"{plane.url}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": str(i)}], "max_tokens": 2, "temperature": 0}, headers=auth(), timeout=60).headers["x-gateway-version"]
        for i in range(30)
    }
    assert seen == {v1, v4}, "half the traffic still goes to the canary"
    admin.rollback()
    admin.close()


def test_blue_green_switches_all_traffic_at_once_after_an_analysis_on_mirrored_traffic(plane):
    v1, v4 = plane.versions[0], plane.versions[3]
    params = plane.params.model_copy(update={"canary": CANARY.model_copy(update={"strategy": "blue_green", "step_requests": 20})})
    with Clients(plane.url, 8) as clients:
        started = time.monotonic()
        outcome = canary_release.fn(params, v4)
        switched = time.monotonic()
        wait_until(lambda: clients.versions_sent_after(switched), "answers after the switch", 300)
    assert outcome["outcome"] == "promoted", outcome["reasons"]
    (step,) = outcome["steps"]
    assert step["weight"] == 0 and step["canary"]["mirrored_compared"] >= 1 and step["canary"]["agreement"] == 1.0
    assert {a[3] for a in clients.answers if started < a[0] and a[1] < switched - 5} <= {v1}, "no client is answered by the candidate before the switch"
    assert clients.versions_sent_after(switched) == {v4} and clients.failed() == []
    assert (alias("champion"), plane.state()["stable"]) == (v4, v4)


def test_shadow_compares_and_reports_but_never_promotes(plane):
    v4, v2 = plane.versions[3], plane.versions[1]
    params = plane.params.model_copy(update={"canary": CANARY.model_copy(update={"strategy": "shadow", "step_requests": 10})})
    with Clients(plane.url, 4) as clients:
        outcome = canary_release.fn(params, v2)
    assert outcome["outcome"] == "shadowed" and outcome["steps"][0]["passed"]
    assert {a[3] for a in clients.answers} == {v4} and clients.failed() == []
    state = plane.state()
    assert (alias("champion"), alias("candidate"), state["stable"], state["canary"]) == (v4, None, v4, None)
    assert client().get_model_version(NAME, v2).tags["canary"] == "shadowed"
