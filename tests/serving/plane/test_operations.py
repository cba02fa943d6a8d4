"""The serving plane's operations (serving/plane/operations.py) with real engine processes behind
its gateway (one plane for the module, with few queue slots so that clients queue): replicas
balanced and named in every answer, an engine killed under load and restarted by the supervisor
with no client-visible error, a replica drained and restarted, a canary attached with mirrored
traffic compared, rolled back, the routing state persisted at every change, and a promotion
under load with requests queued (the new stable scaled up before the old one leaves).

Versions resolve to the tiny checkpoint here (no registry): the same weights under two version
numbers, so greedy answers agree exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pipelines.config import ServeParams
from serving.background import ThreadedServer
from serving.plane import Plane, create_plane_app
from tests.conftest import tiny_params
from tests.serving.conftest import QueueWatch, wait_until

PUBLIC = "reverse-digits"
NO_CACHE = {"cache-control": "no-cache"}  # every request reaches an engine (the cache has its own tests)


@pytest.fixture(scope="module")
def plane(model_dir, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("plane")
    # 2 slots per replica: 8 or 16 clients keep the gateway's queue busy. Start-up waits for
    # /health as long as a busy machine needs (the timeout only bounds a hang).
    serve = ServeParams(replicas=2, max_new_tokens=8, startup_timeout_s=300, supervise_interval_s=0.2, drain_timeout_s=60, queue_capacity=2)
    params = tiny_params(serve=serve)
    p = Plane(params, state_dir, resolve=lambda version: Path(model_dir))
    p.start(champion="1")
    app = create_plane_app(p)
    with ThreadedServer(app) as server:
        p.url = server.root_url
        yield p
    p.stop_all()


def ask(url: str, prompt: str = "1 2 3", **extra) -> httpx.Response:
    body = {"model": PUBLIC, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=60)


class Clients:
    """`n` clients sending requests without pause until stopped; every answer is recorded."""

    def __init__(self, url: str, n: int = 16) -> None:
        self.url, self.stop_event = url, threading.Event()
        self.answers: list[tuple[float, int, str, str]] = []  # (sent at, status, backend, version)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def run(self, i: int) -> None:
        with httpx.Client(timeout=300) as http:
            while not self.stop_event.is_set():
                sent = time.monotonic()
                body = {"model": PUBLIC, "messages": [{"role": "user", "content": f"{i} {i + 1}"}], "max_tokens": 4, "temperature": 0}
                try:
                    r = http.post(f"{self.url}/v1/chat/completions", json=body, headers=NO_CACHE)
                    record = (sent, r.status_code, r.headers.get("x-gateway-backend", ""), r.headers.get("x-gateway-version", ""))
                except httpx.HTTPError as exc:
                    record = (sent, 0, type(exc).__name__, "")
                with self.lock:
                    self.answers.append(record)

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=300)

    def failed(self) -> list[tuple]:
        with self.lock:
            return [a for a in self.answers if a[1] != 200]

    def count(self) -> int:
        with self.lock:
            return len(self.answers)


def test_replicas_share_the_load_and_every_answer_names_replica_and_version(plane):
    with Clients(plane.url, 8) as clients:
        wait_until(lambda: clients.count() >= 40, "40 answers")
    assert not clients.failed()
    assert {a[2] for a in clients.answers} == {"v1-r0", "v1-r1"}, "least-outstanding balancing uses both replicas"
    assert {a[3] for a in clients.answers} == {"1"}


def test_an_engine_killed_under_load_is_restarted_with_no_client_visible_error(plane):
    victim = plane.replicas["v1-r0"]
    old_pid, restarts = victim.pid, victim.restarts
    with Clients(plane.url, 16) as clients:
        wait_until(lambda: clients.count() >= 20, "traffic flowing")
        os.killpg(old_pid, signal.SIGKILL)
        wait_until(lambda: plane.replicas["v1-r0"].restarts == restarts + 1 and not plane.gateway.is_down("v1-r0"), "the supervisor restarted v1-r0", 300)
        seen = clients.count()
        wait_until(lambda: clients.count() >= seen + 30, "traffic after the restart")
    assert clients.failed() == [], "requests in flight on the dead engine are retried on a healthy replica"
    assert plane.replicas["v1-r0"].pid != old_pid
    after = [a for a in clients.answers if a[2] == "v1-r0"]
    assert after, "the restarted replica is back in rotation"
    assert any(e["event"] == "restarted" and e["replica"] == "v1-r0" and "exited" in e["why"] for e in plane.history.events)


def test_a_drained_replica_finishes_its_requests_and_is_restarted(plane):
    before = plane.replicas["v1-r1"].restarts
    with Clients(plane.url, 8) as clients:
        wait_until(lambda: clients.count() >= 10, "traffic flowing")
        r = httpx.post(f"{plane.url}/admin/drain", json={"replica": "v1-r1"}, timeout=300)
        assert r.status_code == 200, r.text
    assert clients.failed() == []
    assert plane.replicas["v1-r1"].restarts == before + 1
    assert httpx.post(f"{plane.url}/admin/drain", json={"replica": "nope"}).status_code == 409


def test_canary_with_mirrored_traffic_is_compared_then_rolled_back_and_state_is_persisted(plane):
    r = httpx.post(f"{plane.url}/admin/canary", json={"version": "2", "weight": 0, "args": ["--max-batch-size", "2"]}, timeout=300)
    assert r.status_code == 409 and "drill flags" in r.json()["error"]["message"], "only drill flags reach an engine"
    r = httpx.post(f"{plane.url}/admin/canary", json={"version": "2", "weight": 0}, timeout=300)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{plane.url}/admin/canary", json={"version": "3"}, timeout=300).status_code == 409, "one canary at a time"
    assert httpx.post(f"{plane.url}/admin/mirror", json={"enabled": True}).status_code == 200
    httpx.post(f"{plane.url}/admin/window")
    answers = [ask(plane.url, f"{i} {i}") for i in range(8)]
    assert {a.headers["x-gateway-version"] for a in answers} == {"1"}, "mirrored copies are never what a client gets"
    wait_until(lambda: plane.gateway.snapshot()["canary"]["mirrored_compared"] >= 8, "8 mirrored answers compared")
    canary = httpx.post(f"{plane.url}/admin/window").json()["canary"]
    assert canary["agreement"] == 1.0 and canary["failures"] == 0  # same weights: the same greedy answers

    r = httpx.post(f"{plane.url}/admin/weight", json={"weight": 0.3})
    saved = json.loads(plane.state_path.read_text())
    assert (saved["stable"], saved["canary"], saved["weight"], saved["mirror"]) == ("1", "2", 0.3, True)
    assert [rec["name"] for rec in saved["replicas"]["2"]] == ["v2-r0"] and saved["replicas"]["2"][0]["pid"]

    canary_process = plane.replicas["v2-r0"].process
    assert httpx.post(f"{plane.url}/admin/rollback", timeout=300).status_code == 200
    assert canary_process.poll() is not None, "a rolled-back canary's engine is stopped"
    saved = json.loads(plane.state_path.read_text())
    assert (saved["stable"], saved["canary"], saved["weight"]) == ("1", None, 0.0)
    assert {ask(plane.url).headers["x-gateway-version"] for _ in range(4)} == {"1"}


def test_a_promotion_under_load_scales_the_new_stable_up_first_and_loses_no_queued_request(plane):
    """The canary (one replica) is promoted while 16 clients queue for 4 slots: it gets its
    second replica before traffic moves, the old stable leaves rotation at once, drains, stops.
    Seen red: with Plane.promote switching first and scaling after (as before), the history read
    ["promoted", "scaled"]; the requests themselves survived (routing after the queue)."""
    r = httpx.post(f"{plane.url}/admin/canary", json={"version": "3", "weight": 0.5}, timeout=300)
    assert r.status_code == 200, r.text
    old = [plane.replicas[n].process for n in ("v1-r0", "v1-r1")]
    with Clients(plane.url, 16) as clients, QueueWatch(plane.url) as queue:
        wait_until(lambda: clients.count() >= 30, "traffic flowing", 300)
        started = time.monotonic()
        r = httpx.post(f"{plane.url}/admin/promote", timeout=600)
        switched = time.monotonic()
        assert r.status_code == 200, r.text
        seen = clients.count()
        wait_until(lambda: clients.count() >= seen + 30, "traffic after the promotion", 300)
    assert queue.most_waiting(started, switched) > 0, "requests were queued while the stable changed"
    assert clients.failed() == []
    assert {a[3] for a in clients.answers if a[0] > switched} == {"3"}
    events = [(e["event"], e.get("version")) for e in plane.history.events]
    assert events.index(("scaled", "3")) < events.index(("promoted", "3"))
    assert sorted(b.name for b in plane.gateway.stable_backends) == ["v3-r0", "v3-r1"]
    assert all(p.poll() is not None for p in old), "the old stable's engines are stopped"
