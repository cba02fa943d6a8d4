"""A stage that hangs is stopped at `stage_timeout_s` with everything it started, and the flow's
task fails naming the timeout; a stage within its time is untouched."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tasks.stages import StageTimedOut, run_streaming

HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker it started
print(child.pid, flush=True)
print("working...", flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its parent's reaper is gone too
        return f.read().split()[2] != "Z"


def test_a_hung_stage_and_its_workers_are_stopped_at_the_timeout():
    with pytest.raises(StageTimedOut, match=r"ran past its timeout of 2s \(stage_timeout_s") as err:
        run_streaming([sys.executable, "-c", HANGS], timeout_s=2)
    assert "working..." in str(err.value), "the output so far says where it hung"
    worker = next(int(line) for line in str(err.value).splitlines() if line.strip().isdigit())
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker), "the stage's own workers are stopped with it"


def test_a_stage_within_its_time_is_untouched():
    code, output = run_streaming([sys.executable, "-c", "print('done')"], timeout_s=30)
    assert (code, output.strip()) == (0, "done")
    code, _ = run_streaming([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert code == 3, "a failing stage is still reported by its exit code"
