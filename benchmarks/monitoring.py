"""`python -m benchmarks.monitoring`: what Prometheus' scrapes cost an engine.

One CPU engine (the default bootstrap model's size, untrained) under CLIENTS concurrent greedy
chats for SECONDS, twice without Prometheus and twice with a real Prometheus scraping its
/metrics every second, in turns (off, on, off, on) so drift in the machine's load hits both
alike. Printed: requests/s, p50 and p95 latency, and the engine's CPU seconds per request (its
process' user + system time); then the engine idle for SECONDS, scraped and not, which isolates
the CPU one scrape costs. Figures only, never asserted: a shared 2-core machine is noisy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

import aiohttp

from benchmarks.serving_load import build_default_model
from serving.launcher import free_port, launch

NAME = "bench-model"
CLIENTS = int(os.environ.get("BENCH_MONITOR_CLIENTS", "8"))
SECONDS = float(os.environ.get("BENCH_MONITOR_SECONDS", "10"))
SCRAPE_INTERVAL = os.environ.get("BENCH_MONITOR_SCRAPE_INTERVAL", "1s")


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


class Prometheus:
    """A real Prometheus scraping one target every SCRAPE_INTERVAL."""

    def __init__(self, target: str, folder: Path) -> None:
        self.target, self.folder = target, folder
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Prometheus":
        port = free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "prometheus.yml"
        config.write_text(f"global: {{scrape_interval: {SCRAPE_INTERVAL}, scrape_timeout: {SCRAPE_INTERVAL}}}\nscrape_configs:\n  - job_name: engine\n    static_configs: [{{targets: ['{self.target}']}}]\n")
        log = (self.folder / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=2, trust_env=False).json()
                if r["data"]["result"] and r["data"]["result"][0]["value"][1] == "1":
                    return self  # scraping the engine
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Prometheus never scraped {self.target}: {(self.folder / 'prometheus.log').read_text()[-1500:]}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


async def load(url: str, seconds: float) -> dict:
    """CLIENTS users sending greedy chats without pause for `seconds`: requests/s, p50, p95."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def user(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            n = next(counter)
            body = {"model": NAME, "messages": [{"role": "user", "content": f"{n % 10} {(n // 10) % 10} {(n // 100) % 10}"}], "max_tokens": 32, "temperature": 0}
            started = time.perf_counter()
            async with http.post(url, json=body) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(user(http) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_s": pick(0.5), "p95_s": pick(0.95)}


def run(engine_url: str, engine: psutil.Process) -> dict:
    before = cpu_seconds(engine)
    result = asyncio.run(load(f"{engine_url}/v1/chat/completions", SECONDS))
    result["cpu_per_request_ms"] = 1000 * (cpu_seconds(engine) - before) / max(1, result["requests"])
    return result


def idle_cpu(engine: psutil.Process) -> float:
    before = cpu_seconds(engine)
    time.sleep(SECONDS)
    return cpu_seconds(engine) - before


def main() -> None:
    if shutil.which("prometheus") is None:
        print("benchmarks.monitoring: skipped, prometheus is not installed (apt-get install prometheus)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_default_model(folder / "model")
        server = launch("cpu", str(folder / "model"), NAME, "127.0.0.1", free_port(), folder / "engine.log", 300, extra_args=["--max-new-tokens", "32"])
        try:
            engine = psutil.Process(server.process.pid)
            target = server.root_url.split("://", 1)[1]
            asyncio.run(load(f"{server.root_url}/v1/chat/completions", 3))  # warm-up
            rounds: dict[str, list[dict]] = {"not scraped": [], f"scraped every {SCRAPE_INTERVAL}": []}
            idle: dict[str, float] = {}
            for i in range(2):
                rounds["not scraped"].append(run(server.root_url, engine))
                with Prometheus(target, folder / f"prom-{i}"):
                    rounds[f"scraped every {SCRAPE_INTERVAL}"].append(run(server.root_url, engine))
                    if i == 0:
                        idle["scraped"] = idle_cpu(engine)
            idle["not scraped"] = idle_cpu(engine)
            scrape_s = float(SCRAPE_INTERVAL.rstrip("s"))
        finally:
            server.stop()
    print(f"\nPrometheus' scrape cost on one CPU engine ({CLIENTS} clients, {SECONDS:g} s a round, 2 rounds each, 32 tokens an answer):")
    print(f"{'':>22} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'engine CPU ms/req':>18}")
    for name, results in rounds.items():
        mean = lambda k: statistics.mean(r[k] for r in results)  # noqa: E731
        print(f"{name:>22} {mean('rps'):8.1f} {1000 * mean('p50_s'):8.1f} {1000 * mean('p95_s'):8.1f} {mean('cpu_per_request_ms'):18.2f}")
    (off, on) = (statistics.mean(r["rps"] for r in rs) for rs in rounds.values())
    print(f"throughput scraped / not: {on / off:.3f}")
    per_scrape_ms = 1000 * (idle["scraped"] - idle["not scraped"]) / (SECONDS / scrape_s)
    print(f"idle engine over {SECONDS:g} s: {idle['not scraped']:.3f} CPU s unscraped, {idle['scraped']:.3f} scraped -> ~{per_scrape_ms:.2f} ms of engine CPU per scrape")


if __name__ == "__main__":
    main()
