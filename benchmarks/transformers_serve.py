"""`python -m benchmarks.transformers_serve`: the project's CPU engine against `transformers serve`.

Both serve the same local checkpoint (the bootstrap model at its default size, ModelParams()
defaults, untrained, built here as benchmarks/serving_load.py builds it) on the CPU, one server
at a time so each has the machine to itself, with the same torch threads:

- ours: `python -m serving.server` (serving/engine.py: dynamic batching over `generate`), with
  its defaults (--max-batch-size 16, --batch-window-ms 5) unless --ours-args says otherwise;
- theirs: `transformers serve <model dir> --continuous-batching --device cpu` (paged attention,
  a scheduler thread that adds and retires requests between decoding steps). Passing the
  directory as FORCE_MODEL preloads it from disk (a local path: no hub lookup, and with
  HF_HUB_OFFLINE=1 none is tried), pins the server to it (requests must name that same path as
  `model`) and never unloads it. HF_HUB_DISABLE_UPDATE_CHECK=1 skips the CLI's PyPI check.

The load is the same for both: for each --concurrency, that many clients (asyncio, the real
AsyncOpenAI client) send non-streaming greedy chat completions (temperature 0, fixed
--max-tokens) back to back for --seconds. Printed per side: requests/s, completion tokens/s
(from each answer's usage), p50/p95 latency, failed requests, and the ratio ours / theirs.
Before timing, a few prompts are asked of both and their answers compared: with greedy
decoding the same weights should say the same, so both sides do the same work.

Figures are printed, never asserted: a shared 2-core machine is noisy. Run it when the machine
is otherwise quiet (see `uptime`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serving_load import build_default_model, ms, prompt
from benchmarks.workspace import release
from serving.launcher import ServerProcess, free_port, launch

HOST = "127.0.0.1"


@dataclass
class Side:
    name: str
    base_url: str
    model: str  # what requests send as `model`


@dataclass
class Load:
    latencies_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def pct(self, q: float) -> float | None:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    @property
    def tps(self) -> float:
        return self.completion_tokens / self.elapsed_s


async def client_loop(api, side: Side, offset: int, deadline: float, max_tokens: int, load: Load) -> None:
    n = offset
    while time.monotonic() < deadline:
        n += 1
        started = time.perf_counter()
        try:
            r = await api.chat.completions.create(
                model=side.model, messages=[{"role": "user", "content": prompt(n)}], max_tokens=max_tokens, temperature=0
            )
            load.completion_tokens += r.usage.completion_tokens
            load.latencies_s.append(time.perf_counter() - started)
        except Exception as exc:
            load.errors.append(f"{type(exc).__name__}: {exc}"[:300])


async def run_load(side: Side, clients: int, seconds: float, max_tokens: int) -> Load:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=side.base_url, api_key="EMPTY", max_retries=0, timeout=120)
    load = Load()
    started = time.monotonic()
    await asyncio.gather(*(client_loop(api, side, 1000 * i, started + seconds, max_tokens, load) for i in range(clients)))
    load.elapsed_s = time.monotonic() - started
    await api.close()
    return load


async def answers(side: Side, n: int, max_tokens: int) -> list[str]:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=side.base_url, api_key="EMPTY", max_retries=0, timeout=120)
    try:
        out = []
        for i in range(n):
            r = await api.chat.completions.create(model=side.model, messages=[{"role": "user", "content": prompt(i)}], max_tokens=max_tokens, temperature=0)
            out.append(r.choices[0].message.content or "")
        return out
    finally:
        await api.close()


def start_ours(model_dir: Path, tmp: Path, extra: list[str]) -> tuple[ServerProcess, Side]:
    server = launch("cpu", str(model_dir), "ours", HOST, free_port(), tmp / "ours.log", 180, ["--log-level", "warning", *extra])
    return server, Side("project CPU engine", server.base_url, "ours")


def start_theirs(model_dir: Path, tmp: Path, extra: list[str]) -> tuple[ServerProcess, Side]:
    port = free_port()
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--continuous-batching", "--device", "cpu", "--dtype", "float32",
        "--host", HOST, "--port", str(port), "--log-level", "warning", *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", TRANSFORMERS_VERBOSITY="warning")
    server = ServerProcess(command, HOST, port, tmp / "transformers-serve.log", env).start()
    try:
        server.wait_healthy(300)
    except BaseException:
        server.stop()
        raise
    return server, Side("transformers serve (CB)", server.base_url, str(model_dir))


def measure(start, model_dir: Path, tmp: Path, extra: list[str], args: argparse.Namespace) -> tuple[Side, dict[int, Load], list[str], str]:
    server, side = start(model_dir, tmp, extra)
    try:
        said = asyncio.run(answers(side, args.compare_prompts, args.max_tokens))
        asyncio.run(run_load(side, max(args.concurrency), 3.0, args.max_tokens))  # warm-up: first batches of each size
        loads = {}
        for c in args.concurrency:
            loads[c] = asyncio.run(run_load(side, c, args.seconds, args.max_tokens))
            print(f"  {side.name}: {c} clients done ({len(loads[c].latencies_s)} answered, {len(loads[c].errors)} failed)", flush=True)
        return side, loads, said, " ".join(shlex.quote(a) for a in server.command)
    finally:
        server.stop()


def row(name: str, load: Load) -> str:
    return f"  {name:<26} {load.rps:7.2f} {load.tps:9.1f} {ms(load.pct(0.5)):>8} {ms(load.pct(0.95)):>8} {len(load.errors):>7}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transformers_serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32], help="concurrent clients, one load per value")
    parser.add_argument("--seconds", type=float, default=25, help="how long each load runs, per side")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS for each server (default: every core; one server runs at a time)")
    parser.add_argument("--compare-prompts", type=int, default=8, help="prompts whose greedy answers are compared between the two before timing")
    parser.add_argument("--ours-args", default="", help="extra flags for serving.server, e.g. '--max-batch-size 32'")
    parser.add_argument("--theirs-args", default="", help="extra flags for transformers serve, e.g. '--cb-max-batch-tokens 512'")
    parser.add_argument("--only", choices=["ours", "theirs"], help="run one side only")
    parser.add_argument("--keep", action="store_true", help="keep the model and the server logs")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by both servers
    tmp = Path(tempfile.mkdtemp(prefix="bench-transformers-serve-"))
    try:
        model_dir = tmp / "model"
        build_default_model(model_dir)
        import torch
        import transformers

        print(f"transformers {transformers.__version__}, torch {torch.__version__}, {os.cpu_count()} cores, OMP_NUM_THREADS={args.torch_threads}")
        print(f"load: {args.concurrency} concurrent clients, {args.seconds:g} s each, non-streaming chat, greedy, max_tokens {args.max_tokens}\n")
        sides = [("ours", start_ours, shlex.split(args.ours_args)), ("theirs", start_theirs, shlex.split(args.theirs_args))]
        results = {}
        for key, start, extra in sides:
            if args.only in (None, key):
                results[key] = measure(start, model_dir, tmp, extra, args)
        print()
        for side, _, _, command in results.values():
            print(f"{side.name}: {command}")
        if "theirs" in results:
            # The server logs every request's path ("CB: True" when continuous batching served it).
            log = (tmp / "transformers-serve.log").read_text(errors="replace")
            print(f"transformers serve requests by continuous batching: {log.count('CB: True')}, by sequential generate: {log.count('CB: False')}")
        if len(results) == 2:
            a, b = results["ours"][2], results["theirs"][2]
            print(f"greedy answers alike on {sum(x == y for x, y in zip(a, b))} of {len(a)} prompts")
        for c in args.concurrency:
            print(f"\n{c} clients               req/s     tok/s      p50      p95  failed")
            for side, loads, _, _ in results.values():
                print(row(side.name, loads[c]))
            if len(results) == 2:
                ours, theirs = results["ours"][1][c], results["theirs"][1][c]
                p50 = (ours.pct(0.5) or 0) / (theirs.pct(0.5) or float("inf"))
                p95 = (ours.pct(0.95) or 0) / (theirs.pct(0.95) or float("inf"))
                print(f"  ours / theirs              {ours.rps / max(theirs.rps, 1e-9):6.2f}x {ours.tps / max(theirs.tps, 1e-9):8.2f}x {p50:7.2f}x {p95:7.2f}x")
            for side, loads, _, _ in results.values():
                for e in sorted(set(loads[c].errors))[:3]:
                    print(f"  {side.name} error: {e}")
    finally:
        release(tmp, args.keep, "model and logs")


if __name__ == "__main__":
    main()
