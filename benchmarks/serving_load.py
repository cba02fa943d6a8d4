"""`make bench`: load through the gateway, as users would put it there.

A default-size bootstrap model (ModelParams() defaults) is served by two CPU servers, stable
and canary, each its own process started by serving.launcher, behind a gateway process
(`python -m serving.gateway`) sending `--canary-weight` of the traffic to the canary. `--clients`
concurrent users (asyncio, the real AsyncOpenAI client; half of them streaming, so time to first
token is measured where users feel it) send greedy chats for `--seconds`. Printed: requests/s,
completion tokens/s, latency and TTFT percentiles, each backend's share, and the requests
clients saw fail ("lost"), which must be 0. Figures are printed, never asserted: a shared
2-core machine is noisy. Everything listens on 127.0.0.1 and stops when the run ends.

`--canary-error-rate` turns on the canary server's fault injection: its failures must show in
the canary's statistics and never reach a client. `--torch-threads` caps each server's torch
threads: two servers on two cores, each with a thread per core, oversubscribe the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.workspace import release
from serving.launcher import PROJECT_ROOT, ServerProcess, free_port, launch

HOST = "127.0.0.1"
PUBLIC = "bench"


def build_default_model(path: Path) -> None:
    """The bootstrap model at its default size, built as the pipeline's bootstrap stage does."""
    from pipelines.bootstrap import build_model, train_tokenizer
    from pipelines.config import ModelParams

    params = ModelParams()
    texts = [f"Reverse the list:\n{i % 10} {(i * 7) % 10} {(i * 3) % 10} {(i * 9) % 10}" for i in range(400)]
    tokenizer = train_tokenizer(iter(texts), params.vocab_size)
    model = build_model(params, tokenizer)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)


def start_gateway(stable: ServerProcess, canary: ServerProcess, weight: float, log_path: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable, "-m", "serving.gateway",
        "--stable-url", stable.root_url, "--stable-model", "stable",
        "--canary-url", canary.root_url, "--canary-model", "canary", "--canary-weight", str(weight),
        "--public-model", PUBLIC, "--host", HOST, "--port", str(port), "--seed", "0", "--log-level", "warning",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p))
    gateway = ServerProcess(command, HOST, port, log_path, env).start()
    gateway.wait_healthy(60)
    return gateway


@dataclass
class Results:
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + len(self.errors)


def prompt(n: int) -> str:
    return f"Reverse the list:\n{n % 10} {(n * 7) % 10} {(n * 3) % 10}"


async def user(api, streaming: bool, deadline: float, budget: list[int], max_tokens: int, results: Results) -> None:
    """One user: request after request until the deadline or the shared request budget is spent."""
    n = 0
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        n += 1
        started = time.perf_counter()
        try:
            messages = [{"role": "user", "content": prompt(n)}]
            if streaming:
                first, tokens, chunks = None, 0, 0
                stream = await api.chat.completions.create(
                    model=PUBLIC, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}
                )
                async for c in stream:
                    if c.choices and c.choices[0].delta.content:
                        chunks += 1
                        first = first or time.perf_counter()
                    if c.usage:
                        tokens = c.usage.completion_tokens
                if first is not None:
                    results.ttfts_s.append(first - started)
                results.completion_tokens += tokens or chunks  # one chunk per token without usage
            else:
                response = await api.chat.completions.create(model=PUBLIC, messages=messages, max_tokens=max_tokens, temperature=0)
                results.completion_tokens += response.usage.completion_tokens
            results.latencies_s.append(time.perf_counter() - started)
        except Exception as exc:  # a client-visible failure: what the gateway must prevent
            results.errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def run_load(base_url: str, clients: int, seconds: float, max_requests: int, max_tokens: int) -> tuple[Results, Results, float]:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=60)
    plain, streamed = Results(), Results()
    budget = [max_requests]
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(user(api, i % 2 == 1, deadline, budget, max_tokens, streamed if i % 2 else plain) for i in range(clients)))
    elapsed = time.monotonic() - started
    await api.close()
    return plain, streamed, elapsed


def pct(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return ms(ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None)


def cpu_seconds(server: ServerProcess) -> float | None:
    """CPU time the server's process has used so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, AttributeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def backend_requests(gateway: ServerProcess) -> dict[str, dict]:
    snap = httpx.get(f"{gateway.root_url}/admin/backends", timeout=10).json()
    return {role: snap[role] for role in ("stable", "canary") if snap[role]}


def report(args: argparse.Namespace, plain: Results, streamed: Results, elapsed: float, before: dict, after: dict, cpu: dict[str, float | None]) -> None:
    total = plain.requests + streamed.requests
    lost = len(plain.errors) + len(streamed.errors)
    latencies = plain.latencies_s + streamed.latencies_s
    tokens = plain.completion_tokens + streamed.completion_tokens
    threads = os.environ.get("OMP_NUM_THREADS", f"inherited ({os.cpu_count()} cores)")
    print(f"\ngateway load: {args.clients} clients ({args.clients // 2} streaming) for {elapsed:.1f} s, canary weight {args.canary_weight} (injected canary error rate {args.canary_error_rate}), max_tokens {args.max_tokens}, torch threads per server {threads}")
    print(f"  requests             {total} ({total / elapsed:.1f} req/s)")
    print(f"  completion tokens/s  {tokens / elapsed:.0f}")
    print(f"  latency p50 / p95    {pct(latencies, 0.5)} / {pct(latencies, 0.95)}  (all requests, to the last byte)")
    print(f"  non-streaming        {pct(plain.latencies_s, 0.5)} / {pct(plain.latencies_s, 0.95)}")
    print(f"  streaming            {pct(streamed.latencies_s, 0.5)} / {pct(streamed.latencies_s, 0.95)}")
    print(f"  TTFT p50 / p95       {pct(streamed.ttfts_s, 0.5)} / {pct(streamed.ttfts_s, 0.95)}  (streaming clients, first content chunk)")
    def delta(role: str, key: str) -> int:
        return after[role][key] - before[role][key]

    # Routed: the gateway's first choice; stable's retries of canary failures are not routing.
    routed = {role: delta(role, "requests") - delta(role, "retries_served") for role in after}
    for role, n in routed.items():
        print(
            f"  {role:<7} share       {100 * n / max(sum(routed.values()), 1):5.1f} % (routed {n}, failed {delta(role, 'failures')}, "
            f"retried on stable {delta(role, 'retried_to_stable')}, retries answered {delta(role, 'retries_served')}, "
            f"gateway-side p95 {ms(after[role]['p95_latency_s'])})"
        )
    used = ", ".join(f"{name} {s:.1f} s" for name, s in cpu.items() if s is not None)
    if used:
        print(f"  CPU time in the run  {used}  (of {(os.cpu_count() or 1) * elapsed:.0f} core-seconds on {os.cpu_count()} cores)")
    banner = "OK" if lost == 0 else "!!! CLIENTS SAW ERRORS !!!"
    print(f"\n  LOST REQUESTS (client-visible errors): {lost}   {banner}")
    for e in sorted(set(plain.errors + streamed.errors))[:5]:
        print(f"    {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30, help="how long the clients send requests")
    parser.add_argument("--clients", type=int, default=32, help="concurrent users; every second one streams")
    parser.add_argument("--canary-weight", type=float, default=0.25, help="share of traffic the gateway sends to the canary")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--max-requests", type=int, default=20_000, help="stop after this many requests even before --seconds")
    parser.add_argument("--canary-error-rate", type=float, default=0.0, help="make the canary answer this share of requests with HTTP 500 (the server's fault injection): lost requests must stay 0")
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="OMP_NUM_THREADS for each CPU server (default: cores / 2, the split a plane gives a canary and its stable side by side; 0 = inherit, every server uses every core)")
    parser.add_argument("--keep", action="store_true", help="keep the model and the server logs")
    args = parser.parse_args(argv)

    if args.torch_threads:
        # Inherited by the servers launch() starts (torch reads it when it loads); the same
        # split the plane's engines get side by side (serving/plane/engines.py, serve.cpu_threads: 0).
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="serving-load-"))
    servers: list[ServerProcess] = []
    try:
        model_dir = tmp / "model"
        build_default_model(model_dir)
        for name in ("stable", "canary"):  # the same checkpoint twice: the split, not the model, is measured
            extra = ["--log-level", "warning"]
            if name == "canary" and args.canary_error_rate:
                extra += ["--fault-error-rate", str(args.canary_error_rate)]
            servers.append(launch("cpu", str(model_dir), name, HOST, free_port(), tmp / f"{name}.log", 180, extra))
        gateway = start_gateway(servers[0], servers[1], args.canary_weight, tmp / "gateway.log")
        servers.append(gateway)
        # Warm-up outside the measurement: first requests pay one-off costs in every process.
        asyncio.run(run_load(gateway.base_url, 4, 1.0, 16, args.max_tokens))
        names = ("stable", "canary", "gateway")
        before, cpu_before = backend_requests(gateway), [cpu_seconds(s) for s in servers]
        plain, streamed, elapsed = asyncio.run(run_load(gateway.base_url, args.clients, args.seconds, args.max_requests, args.max_tokens))
        cpu = {n: (a - b if a is not None and b is not None else None) for n, a, b in zip(names, [cpu_seconds(s) for s in servers], cpu_before)}
        report(args, plain, streamed, elapsed, before, backend_requests(gateway), cpu)
    finally:
        for server in reversed(servers):
            server.stop()
        release(tmp, args.keep, "model and logs")


if __name__ == "__main__":
    main()
