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


STAGE = r"""
import sys, time
print("rows kept: 412", flush=True)
for i in range(1, 6):  # a progress bar redrawn in place, as tqdm does
    sys.stdout.write(f"\rtraining: {i * 20}%|" + "#" * i)
    sys.stdout.flush()
sys.stdout.write("\n")
print("\x1b[32mloss 0.1234\x1b[0m", flush=True)
"""


def test_the_stage_task_is_named_after_its_stage_and_its_output_reaches_the_run_log(tmp_path, monkeypatch):
    """Through the task the flow runs (`repro`) in a real flow, read back from the Prefect API:
    the task run is called 'train', and the stage's own lines (row counts, loss, the progress
    bar's final state, without terminal colours) are in its log."""
    import asyncio
    import subprocess

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks.stages import repro

    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python stage.py > /dev/stderr\n    deps: [stage.py]\n")

    @flow
    def one_stage() -> str:
        from prefect.runtime import flow_run

        repro("train")
        return flow_run.id

    run_id = one_stage()

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            runs = await client.read_task_runs()
            return logs, [t.name for t in runs if str(t.flow_run_id) == str(run_id)]

    for _ in range(60):  # logs reach the API in batches from a background worker: wait for them (not a timing assertion)
        logs, task_names = asyncio.run(read())
        messages = [entry.message for entry in logs if entry.task_run_id is not None]
        if "loss 0.1234" in messages:
            break
        time.sleep(0.5)
    assert task_names == ["train"]
    assert "rows kept: 412" in messages and "loss 0.1234" in messages, messages
    assert "training: 100%|#####" in messages and not any("training: 20%" in m for m in messages)


def test_dvc_status_names_exactly_the_stages_a_rerun_must_run(tmp_path, monkeypatch):
    """The flow skips `dvc repro` for a stage only when one `dvc status` says it and every stage
    before it are unchanged: so the status task must name each out-of-date stage, and read an
    answer it cannot place (a changed `.dvc`-tracked source) as "everything changed"."""
    import subprocess

    from tasks.stages import changed_stages, repro

    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    (tmp_path / "raw.txt").write_text("1 2 3\n")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "raw.txt"], check=True)
    (tmp_path / "a.py").write_text("open('a.out', 'w').write(open('raw.txt').read())\n")
    (tmp_path / "b.py").write_text("open('b.out', 'w').write(open('a.out').read()[::-1])\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: python a.py\n    deps: [a.py, raw.txt]\n    outs: [a.out]\n"
        "  b:\n    cmd: python b.py\n    deps: [b.py, a.out]\n    outs: [b.out]\n"
    )
    stages = ["a", "b"]
    assert changed_stages(stages) == {"a", "b"}  # never run
    for name in stages:
        assert repro(name)["ran"]
    assert changed_stages(stages) == set()
    skipped = repro("b", up_to_date=True)
    assert (skipped["stage"], skipped["ran"]) == ("b", False)

    (tmp_path / "b.py").write_text("open('b.out', 'w').write(open('a.out').read())\n")
    assert changed_stages(stages) == {"b"}
    assert repro("b")["ran"]
    (tmp_path / "b.out").unlink()  # an output gone from the workspace
    assert changed_stages(stages) == {"b"}
    assert not repro("b")["ran"]  # DVC restores it from its cache
    assert changed_stages(stages) == set()
    (tmp_path / "raw.txt").write_text("4 5 6\n")  # a tracked source edited without `dvc add`
    assert changed_stages(stages) == {"a", "b"}
