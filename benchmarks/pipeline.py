"""`make bench`: wall time of a cold `make pipeline` (install excluded) and of a no-op rerun,
with each stage's share of the cold budget, on a fresh copy of the project with empty stores.
Beside the wall time, the CPU time of the whole run (user + sys of every process it started):
on a machine shared with other work, the wall time says how busy it was, the CPU time what
the lifecycle costs.

Targets (issues #2 and #15, 2-core CPU): cold <= 120 s, no-op rerun <= 30 s. Figures are
printed, never asserted: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.orchestration import children_cpu
from benchmarks.workspace import copy_project, run_flow, stage_table

TARGETS = {"cold": 120.0, "noop": 30.0}


def timed(project: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of one `python -m flows.lifecycle`, and what it printed."""
    started, cpu_before = time.perf_counter(), children_cpu()
    result = run_flow(project)
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu_before
    if result.returncode != 0:
        raise SystemExit(f"the flow failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    return seconds, cpu, result.stdout


def report(label: str, seconds: float, cpu: float, output: str) -> None:
    target = TARGETS[label]
    print(f"\n{label} run: {seconds:6.1f} s wall, {cpu:6.1f} s CPU  (target <= {target:.0f} s, ratio {seconds / target:.2f}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    stages = stage_table(output)
    staged = sum(s for _, s in stages.values())
    for name, (status, s) in stages.items():
        print(f"  {name:<11} {status:<17} {s:6.1f} s  {100 * s / target:5.1f} % of the budget")
    print(f"  {'(flow, gates, registry, canary, Prefect API)':<30}{seconds - staged:6.1f} s  {100 * (seconds - staged) / target:5.1f} % of the budget")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark workspace")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    project = copy_project(tmp)
    print(f"benchmark workspace: {project}")
    cold, cpu, out = timed(project)
    report("cold", cold, cpu, out)
    noop, cpu, out = timed(project)
    report("noop", noop, cpu, out)
    print(f"\nno-op rerun / cold run: {noop / cold:.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
