"""`make bench`: what the stages cost and what orchestration adds. The lifecycle flow (Prefect
tasks, DVC's `repro`, MLflow runs, gates, registration, `dvc push`; `--no-deploy`, so no canary)
on a fresh copy of the project, against the sum of its stages' own commands (`python -m
pipelines.<stage>`, in DAG order) run directly on a second fresh copy: the difference is what
Prefect, DVC and MLflow add. Then the no-op rerun, where every stage comes from DVC's cache.

Each direct stage is printed with its wall time and its CPU time (user + sys of the stage's
processes): on a machine shared with other work the wall time says how busy it was, the CPU
time what the stage costs. Both are set against the cold lifecycle's budget.

Targets (issues #9 and #15, 2-core CPU): the stages run directly <= 120 s cold, overhead <= 10 %
of the direct stages, no-op rerun <= 10 s. Printed, never asserted: shared machines are noisy.
`--direct-only` runs the stages alone (no flow)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.workspace import copy_project, flow_env, release, run_flow, stage_table

TARGETS = {"cold_s": 120.0, "overhead": 0.10, "noop_s": 10.0}


def children_cpu() -> float:
    """User + sys seconds of every child process this one has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def direct(project: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Each stage's command, as dvc.yaml (rendered from params) lists it, without DVC or Prefect:
    wall and CPU seconds per stage."""
    subprocess.run([sys.executable, "-m", "pipelines.dag"], cwd=project, env=flow_env(project), check=True, capture_output=True)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    seconds, cpu = {}, {}
    for name, stage in stages.items():
        started, cpu_before = time.perf_counter(), children_cpu()
        r = subprocess.run(stage["cmd"], shell=True, cwd=project, env=flow_env(project), capture_output=True, text=True)
        seconds[name], cpu[name] = time.perf_counter() - started, children_cpu() - cpu_before
        if r.returncode != 0:
            raise SystemExit(f"stage {name} failed when run directly:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        print(f"  direct {name:<10} {seconds[name]:6.1f} s wall {cpu[name]:6.1f} s CPU", flush=True)
    return seconds, cpu


def budget_table(seconds: dict[str, float], cpu: dict[str, float]) -> None:
    """Every stage against the cold lifecycle's budget, wall and CPU."""
    budget = TARGETS["cold_s"]
    total, total_cpu = sum(seconds.values()), sum(cpu.values())
    print(f"\n{'stage':<11} {'wall':>7} {'CPU':>7} {'of the ' + format(budget, '.0f') + ' s budget (wall)':>28}")
    for name in seconds:
        print(f"{name:<11} {seconds[name]:6.1f}s {cpu[name]:6.1f}s {100 * seconds[name] / budget:27.1f} %")
    load = os.getloadavg()[0]
    print(f"{'total':<11} {total:6.1f}s {total_cpu:6.1f}s {100 * total / budget:27.1f} %   (target <= {budget:.0f} s, ratio {total / budget:.2f}; load average now {load:.1f} on {os.cpu_count()} cores)")


def quality(project: Path) -> None:
    """What the timed run made: a faster lifecycle must not be a worse model."""
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    quant = json.loads((project / "metrics/quantize.json").read_text())
    metrics = [m for m in ev["candidate"] if "/" in m]
    print("held-out scores: " + "; ".join(f"{m}: " + ", ".join(f"{model} {ev[model][m]:.3f}" for model in ev if model != "candidate" and ev[model].get(m) is not None) + (f", quantized {quant[m]:.3f}" if quant.get(m) is not None else "") for m in metrics))


def flowed(project: Path) -> tuple[float, str]:
    started = time.perf_counter()
    r = run_flow(project, "--no-deploy")
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"the flow failed (exit {r.returncode}):\n{r.stdout[-3000:]}")
    return seconds, r.stdout


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark workspaces")
    parser.add_argument("--direct-only", action="store_true", help="only the stages run directly, against the cold budget")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lifecycle-orch-"))
    try:
        a = copy_project(tmp / "direct")
        if args.direct_only:
            print("stages run directly:", flush=True)
            budget_table(*direct(a))
            quality(a)
            return
        (tmp / "flow").mkdir()
        b = copy_project(tmp / "flow")
        # `make setup` creates Prefect's database once; so does this, timed on its own.
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], cwd=b, env=flow_env(b), check=True, capture_output=True)
        print(f"Prefect's database created (once, by make setup): {time.perf_counter() - started:.1f} s", flush=True)
        print("stages run directly:", flush=True)
        plain, plain_cpu = direct(a)
        budget_table(plain, plain_cpu)
        quality(a)
        total_direct = sum(plain.values())
        print("the lifecycle flow (--no-deploy):", flush=True)
        total_flow, out = flowed(b)
        in_flow = stage_table(out)
        overhead = total_flow / total_direct - 1
        print(f"\n{'stage':<11} {'direct':>8} {'in flow':>8}")
        for name, s in plain.items():
            print(f"{name:<11} {s:7.1f}s {in_flow.get(name, ('', float('nan')))[1]:7.1f}s")
        staged = sum(s for _, s in in_flow.values())
        print(f"{'sum':<11} {total_direct:7.1f}s {staged:7.1f}s   (+ {total_flow - staged:.1f} s outside the stages: Prefect API, MLflow runs, gates, registration, dvc push)")
        print(f"\norchestration overhead: flow {total_flow:.1f} s vs direct {total_direct:.1f} s = {100 * overhead:+.1f} % (target <= {100 * TARGETS['overhead']:.0f} %, ratio {overhead / TARGETS['overhead']:.2f})")
        noop, _ = flowed(b)
        print(f"no-op rerun: {noop:.1f} s (target <= {TARGETS['noop_s']:.0f} s, ratio {noop / TARGETS['noop_s']:.2f})")
    finally:
        release(tmp, args.keep, "the benchmark workspaces")


if __name__ == "__main__":
    main()
