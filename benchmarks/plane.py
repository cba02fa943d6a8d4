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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.serving_load import build_default_model
from serving.launcher import PROJECT_ROOT, free_port

NAME = "bench-model"
CLIENTS = int(os.environ.get("BENCH_PLANE_CLIENTS", "32"))
SECONDS = float(os.environ.get("BENCH_PLANE_SECONDS", "15"))
MAX_TOKENS = int(os.environ.get("BENCH_PLANE_MAX_TOKENS", "32"))  # an answer's length: what a cache hit saves


async def load(url: str, seconds: float, distinct: int | None, cached: bool, stop: asyncio.Event | None = None, model: str = NAME) -> dict:
    """CLIENTS concurrent users sending greedy chats for `seconds` (or until `stop`): prompts
    cycle over `distinct` texts (None: every request its own)."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    headers = {} if cached else {"cache-control": "no-cache"}

    async def user(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            n = next(counter)
            text = f"{n % distinct} {(n * 7) % 10}" if distinct else f"{n % 10} {(n // 10) % 10} {(n // 100) % 10}"
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0}
            started = time.perf_counter()
            try:
                r = await http.post(url, json=body, headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(f"{r.status_code} {r.text[:120]}")
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS * 2)) as http:
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
        through = asyncio.run(load(plane_url, SECONDS, None, cached=False))
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
