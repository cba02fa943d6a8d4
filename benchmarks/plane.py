"""`make bench`: the serving plane as `make serve` runs it (its own process, a real registry).

Printed, never asserted (a shared 2-core machine is noisy):
- the gateway's overhead: throughput and p95 latency at 32 clients through the plane against the
  same engine called directly (target: <= 10 % less throughput);
- the response cache: the same deterministic requests answered from the cache against the same
  requests sent with `Cache-Control: no-cache` (target: >= 5x the throughput);
- requests lost while a release (canary attached, weights 10 -> 50 -> 100, promoted) and then a
  rollback (the previous version started, switched to, the other drained) happen under load
  (target: 0).
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
from serving.launcher import PROJECT_ROOT, free_port

NAME = "bench-model"
CLIENTS = int(os.environ.get("BENCH_PLANE_CLIENTS", "32"))
SECONDS = float(os.environ.get("BENCH_PLANE_SECONDS", "15"))
MAX_TOKENS = int(os.environ.get("BENCH_PLANE_MAX_TOKENS", "32"))  # an answer's length: what a cache hit saves


async def load(url: str, seconds: float, distinct: int | None, cached: bool, stop: asyncio.Event | None = None, model: str = NAME) -> dict:
    """CLIENTS concurrent users sending greedy chats for `seconds` (or until `stop`): prompts
    cycle over `distinct` texts (None: every request its own). The users are aiohttp sessions:
    with httpx the load generator itself saturated a core at ~770 cache hits/s, so the cache
    run measured the client rather than the gateway."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"} | ({} if cached else {"cache-control": "no-cache"})

    async def user(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            n = next(counter)
            text = f"{n % distinct} {(n * 7) % 10}" if distinct else f"{n % 10} {(n // 10) % 10} {(n // 100) % 10}"
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0})
            started = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=headers) as r:
                    answer = await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures.append(f"{r.status} {answer[:120].decode(errors='replace')}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures.append(type(exc).__name__)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=CLIENTS * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(user(http) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    return {"rps": len(latencies) / elapsed, "p95_s": p95, "ok": len(latencies), "failed": failures}


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
    (work / "params.yaml").write_text(yaml.safe_dump({"registry": {"model_name": NAME}, "serve": {"port": port, "max_new_tokens": MAX_TOKENS, "cache_entries": 4096, "queue_max_waiting": 1024}}))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
    plane = subprocess.Popen([sys.executable, "-m", "serving.plane"], cwd=work, env=env, stdout=(work / "plane.log").open("wb"), stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if plane.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the plane did not start:\n{(work / 'plane.log').read_text()[-3000:]}")
            time.sleep(0.5)
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

        async def release_under_load() -> tuple[dict, list[str]]:
            stop = asyncio.Event()
            steps: list[str] = []

            async def operate() -> None:
                for what, op in (
                    (f"attach v{v2}", lambda: admin.attach_canary(v2, 0.1)), ("weight 50%", lambda: admin.set_weight(0.5)),
                    ("weight 100%", lambda: admin.set_weight(1.0)), (f"promote v{v2}", admin.promote),
                    (f"attach v{v1} (rollback)", lambda: admin.attach_canary(v1, 0.0)), (f"switch to v{v1}", admin.promote),
                ):
                    started = time.perf_counter()
                    await asyncio.to_thread(op)
                    steps.append(f"{what} {time.perf_counter() - started:.1f}s")
                    await asyncio.sleep(2)
                stop.set()

            result, _ = await asyncio.gather(load(plane_url, 600, None, cached=False, stop=stop), operate())
            return result, steps

        released, steps = asyncio.run(release_under_load())
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
        print(f"  release + rollback under load: {fmt(released)}; steps: {', '.join(steps)}")
        lost = len(released["failed"])
        print(f"  requests lost during the release and the rollback: {lost} (target 0, {'met' if lost == 0 else 'MISSED'}) {released['failed'][:3]}")
    finally:
        plane.terminate()
        plane.wait(timeout=60)
        os.chdir(PROJECT_ROOT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
