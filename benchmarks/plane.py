"""`make bench`: the serving plane as `make serve` runs it (its own process, a real registry).

Printed, never asserted (a shared 2-core machine is noisy):
- the gateway's overhead: throughput and p95 latency at 32 clients through the plane against the
  same engine called directly (target: <= 10 % less throughput);
- the response cache: the same deterministic requests answered from the cache against the same
  requests sent with `Cache-Control: no-cache` (target: >= 5x the throughput);
- requests lost while a release and then a rollback happen under load (target: 0), with more
  clients than the gateway has queue slots, so requests wait in its queue through every switch
  (the most that waited during each is printed). The release is the release's own code into a
  running plane (`tasks.deploy.release_into_plane`: canary attached, weight steps analysed on
  the traffic, then the registry's and the plane's promotion); the rollback is the user's
  command, `python -m registry.cli rollback` (what `make rollback` runs), in its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import psutil
import yaml

from benchmarks.serving_load import build_default_model
from benchmarks.workspace import wait_healthy
from serving.launcher import PROJECT_ROOT, free_port

NAME = "bench-model"
CLIENTS = int(os.environ.get("BENCH_PLANE_CLIENTS", "32"))
QUEUE_SLOTS = 32  # serve.queue_capacity (its default) of the bench's plane, one replica: the release phase sends more clients
RELEASE_CLIENTS = int(os.environ.get("BENCH_PLANE_RELEASE_CLIENTS", str(QUEUE_SLOTS + 16)))
SECONDS = float(os.environ.get("BENCH_PLANE_SECONDS", "15"))
MAX_TOKENS = int(os.environ.get("BENCH_PLANE_MAX_TOKENS", "32"))  # an answer's length: what a cache hit saves


async def load(url: str, seconds: float, distinct: int | None, cached: bool, stop: asyncio.Event | None = None, model: str = NAME, clients: int = CLIENTS) -> dict:
    """CLIENTS concurrent users sending greedy chats for `seconds` (or until `stop`): prompts
    cycle over `distinct` texts (None: every request its own). The users are aiohttp sessions:
    with httpx the load generator itself saturated a core at ~770 cache hits/s, so the cache
    run measured the client rather than the gateway."""
    latencies: list[float] = []
    failures: list[str] = []
    sent_at: list[tuple[float, bool]] = []  # (monotonic send time, answered): which phase lost what
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"} | ({} if cached else {"cache-control": "no-cache"})

    async def user(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            n = next(counter)
            text = f"{n % distinct} {(n * 7) % 10}" if distinct else f"{n % 10} {(n // 10) % 10} {(n // 100) % 10}"
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0})
            started, sent = time.perf_counter(), time.monotonic()
            try:
                async with http.post(url, data=body, headers=headers) as r:
                    answer = await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures.append(f"{r.status} {answer[:120].decode(errors='replace')}")
                    sent_at.append((sent, r.status == 200))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures.append(type(exc).__name__)
                sent_at.append((sent, False))

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(user(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    return {"rps": len(latencies) / elapsed, "p95_s": p95, "ok": len(latencies), "failed": failures, "sent_at": sent_at}


async def queue_waiting(root: str, stop: asyncio.Event, samples: list[tuple[float, float]]) -> None:
    """The gateway's queue (`gateway_queue{state="waiting"}`), sampled every 0.1 s until `stop`."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while not stop.is_set():
            try:
                async with http.get(f"{root}/metrics") as r:
                    text = await r.text()
                waiting = next((x.value for f in text_string_to_metric_families(text) for x in f.samples if x.name == "gateway_queue" and x.labels.get("state") == "waiting"), 0.0)
                samples.append((time.monotonic(), waiting))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # a busy gateway answers late; the next sample counts
            await asyncio.sleep(0.1)


def golden_of(url: str, model: str, n: int = 8) -> list[tuple[str, str]]:
    """Golden prompts for the bench's (untrained) model: its own greedy answers are the reference,
    which the candidate, the same bytes registered again, must match."""
    prompts = [f"Reverse the list:\n{i} {(i * 3) % 10} {(i * 7) % 10}" for i in range(n)]
    answers = []
    for p in prompts:
        body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": MAX_TOKENS, "temperature": 0}
        answers.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"])
    return list(zip(prompts, answers))


def fmt(r: dict) -> str:
    return f"{r['rps']:7.1f} req/s  p95 {1000 * r['p95_s']:6.0f} ms  ({r['ok']} answered, {len(r['failed'])} failed)"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-plane-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    from registry import models
    from registry.store import client, experiment_id
    from serving.plane_client import PlaneClient

    build_default_model(work / "model")
    c, exp = client(), experiment_id("bench")
    v1, v2 = (str(models.register(NAME, work / "model", c.create_run(exp).info.run_id, f"md5-{i}", {}).version) for i in range(2))
    models.promote(NAME, v1)
    port = free_port()
    # The SPRT's default effect (1 %) needs 255 canary requests a step; three steps keep the
    # release under two minutes here.
    (work / "params.yaml").write_text(yaml.safe_dump({
        "registry": {"model_name": NAME},
        "serve": {"port": port, "max_new_tokens": MAX_TOKENS, "cache_entries": 4096, "queue_capacity": QUEUE_SLOTS, "queue_max_waiting": 1024, "startup_timeout_s": 600},
        # The analysis is not what is measured: loose bounds keep a noisy machine from rolling back.
        "canary": {"steps": [10, 50, 100], "golden_prompts": 8, "shadow_prompts": 4, "min_exact_match": 0.5, "champion_tolerance": 0.5, "max_latency_ratio": 20, "max_ttft_ratio": 20},
    }))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
    plane = subprocess.Popen([sys.executable, "-m", "serving.plane"], cwd=work, env=env, stdout=(work / "plane.log").open("wb"), stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(root, plane, work / "plane.log", "plane", 900)  # its engines start slowly on a busy machine
        admin = PlaneClient(root)
        engine = admin.state()["replicas"][v1][0]["url"]
        # The engine serves the version's own name; the plane's public name is NAME.
        direct_url, plane_url = f"{engine}/v1/chat/completions", f"{root}/v1/chat/completions"

        asyncio.run(load(plane_url, 3, None, cached=False))  # warm-up
        # Same load straight to the engine, which serves the version's own name.
        engine_alone = asyncio.run(load(direct_url, SECONDS, None, cached=False, model=f"{NAME}-v{v1}"))
        gateway_cpu = psutil.Process(plane.pid)  # the gateway's process; the engines run in their own
        cpu_before = sum(gateway_cpu.cpu_times()[:2])
        through = asyncio.run(load(plane_url, SECONDS, None, cached=False))
        cpu_ms = 1000 * (sum(gateway_cpu.cpu_times()[:2]) - cpu_before) / max(1, through["ok"])
        uncached = asyncio.run(load(plane_url, SECONDS, 16, cached=False))
        cached = asyncio.run(load(plane_url, SECONDS, 16, cached=True))

        from pipelines.config import load_params
        from tasks.deploy import release_into_plane

        params = load_params(work / "params.yaml")
        golden = golden_of(engine, f"{NAME}-v{v1}")
        phases: dict[str, tuple[float, float]] = {}

        def release_then_rollback() -> None:
            """The release's own code into the running plane, then the user's rollback command."""
            started = time.monotonic()
            result, _ = release_into_plane(params, admin, v2, golden, None, top_up_concurrency=2)
            if result.outcome != "promoted":
                raise SystemExit(f"the bench's candidate (the champion's own bytes) was not promoted:\n{result.summary()}")
            models.promote(NAME, v2)  # the registry first, then the plane, as tasks.deploy.finish does
            admin.promote()
            phases["release"] = (started, time.monotonic())
            time.sleep(2)
            started = time.monotonic()
            rolled = subprocess.run([sys.executable, "-m", "registry.cli", "rollback", "--reason", "make bench"], cwd=work, env=env, capture_output=True, text=True)
            if rolled.returncode:
                raise SystemExit(f"python -m registry.cli rollback failed:\n{rolled.stdout}{rolled.stderr}")
            phases["rollback"] = (started, time.monotonic())
            time.sleep(2)

        async def under_load() -> tuple[dict, list[tuple[float, float]]]:
            stop, samples = asyncio.Event(), []

            async def operate() -> None:
                try:
                    await asyncio.to_thread(release_then_rollback)
                finally:
                    stop.set()

            result, _, _ = await asyncio.gather(load(plane_url, 3600, None, cached=False, stop=stop, clients=RELEASE_CLIENTS), operate(), queue_waiting(root, stop, samples))
            return result, samples

        released, samples = asyncio.run(under_load())
        overhead = 1 - through["rps"] / engine_alone["rps"]
        print(f"serving plane, {CLIENTS} clients, {SECONDS:g}s each, greedy, max_tokens {MAX_TOKENS} (default-size bootstrap model, CPU engine):")
        print(f"  engine alone         {fmt(engine_alone)}")
        print(f"  through the plane    {fmt(through)}")
        print(f"  gateway overhead: {overhead:.1%} throughput, p95 x{through['p95_s'] / engine_alone['p95_s']:.2f} (target <= 10 %, {'met' if overhead <= 0.10 else 'MISSED'})")
        print(f"  gateway CPU: {cpu_ms:.2f} ms a request ({cpu_ms * through['rps'] / 1000:.0%} of a core at this rate, taken from the engine when they share the cores)")
        print(f"  16 prompts, no-cache {fmt(uncached)}")
        print(f"  16 prompts, cached   {fmt(cached)}")
        ratio = cached["rps"] / uncached["rps"]
        print(f"  cache: x{ratio:.1f} throughput (target >= 5x, {'met' if ratio >= 5 else 'MISSED'})")
        print(f"  release + rollback, {RELEASE_CLIENTS} clients for {QUEUE_SLOTS} queue slots: {fmt(released)}")
        for phase, (since, until) in phases.items():
            sent = [ok for t, ok in released["sent_at"] if since <= t <= until]
            waited = [w for t, w in samples if since <= t <= until]
            print(
                f"  {phase:<8} {until - since:5.1f}s: {len(sent)} requests sent, {sent.count(False)} lost; "
                f"queue: up to {max(waited, default=0):.0f} waiting, non-empty in {sum(w > 0 for w in waited)} of {len(waited)} samples"
            )
        lost = len(released["failed"])
        print(f"  requests lost during the release and the rollback: {lost} (target 0, {'met' if lost == 0 else 'MISSED'}) {released['failed'][:3]}")
    finally:
        plane.terminate()
        plane.wait(timeout=60)
        os.chdir(PROJECT_ROOT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
