"""`make bench`: wall time of a cold `make pipeline` (install excluded) and of a no-op rerun,
with each stage's share, on a fresh copy of the project with empty stores.

Targets (issue #2, 2-core CPU): cold <= 300 s, no-op rerun <= 30 s. Figures are printed,
never asserted: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.workspace import copy_project, run_flow, stage_table

TARGETS = {"cold": 300.0, "noop": 30.0}


def timed(project: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = run_flow(project)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the flow failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    return seconds, result.stdout


def report(label: str, seconds: float, output: str) -> None:
    target = TARGETS[label]
    print(f"\n{label} run: {seconds:6.1f} s  (target <= {target:.0f} s, ratio {seconds / target:.2f})")
    stages = stage_table(output)
    staged = sum(s for _, s in stages.values())
    for name, (status, s) in stages.items():
        print(f"  {name:<11} {status:<17} {s:6.1f} s  {100 * s / seconds:5.1f} %")
    print(f"  {'(flow, gates, registry, canary, Prefect API)':<30}{seconds - staged:6.1f} s  {100 * (seconds - staged) / seconds:5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark workspace")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    project = copy_project(tmp)
    print(f"benchmark workspace: {project}")
    cold, out = timed(project)
    report("cold", cold, out)
    noop, out = timed(project)
    report("noop", noop, out)
    print(f"\nno-op rerun / cold run: {noop / cold:.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
