"""Artifact stages: Prefect asks DVC to bring one stage up to date. DVC decides whether it
must run (code, deps or params changed) or is skipped; Prefect only orchestrates and logs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.cache_policies import NO_CACHE


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; earlier stages' outputs are kept and a rerun resumes here."""


def dvc_env() -> dict[str, str]:
    """Stage commands say `python`: make that the interpreter running this flow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class StageTimedOut(StageFailed):
    """A stage ran past `stage_timeout_s` and was stopped (its whole process group)."""


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class LineForwarder:
    """Bytes in, finished lines out to `emit`: a progress bar redrawn with carriage returns
    becomes the one line it ends as (its final state), not hundreds of redraws."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit, self.pending = emit, b""

    def feed(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = b""

    def _emit(self, line: bytes) -> None:
        text = ANSI.sub(b"", line.rsplit(b"\r", 1)[-1] if line.rstrip(b"\r") else line).decode(errors="replace").rstrip()
        if text.strip():
            self.emit(text)


def run_streaming(cmd: list[str], timeout_s: float | None = None, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a command, passing its output through unchanged (progress bars keep working)
    while keeping a copy to read what happened, and handing each finished line to `on_line`
    (the Prefect run's logger: the stage's own words reach the UI). Past `timeout_s` the
    command and everything it started (its own process group: DVC's stage, a training
    launcher's workers) are stopped, SIGTERM then SIGKILL, and StageTimedOut is raised with
    the output so far."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dvc_env(), start_new_session=True)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace or None)
                return

    watchdog = threading.Timer(timeout_s, stop) if timeout_s else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    captured = bytearray()
    lines = LineForwarder(on_line) if on_line else None
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read1(4096):
            captured += chunk
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if lines is not None:
                lines.feed(chunk)
        code = proc.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if lines is not None:
            lines.close()
    output = captured.decode(errors="replace")
    if timed_out.is_set():
        raise StageTimedOut(f"`{' '.join(cmd)}` ran past its timeout of {timeout_s:g}s (stage_timeout_s in params.yaml) and was stopped\n" + "\n".join(output.strip().splitlines()[-15:]))
    return code, output


def run_logger() -> Callable[[str], None] | None:
    """The current Prefect run's logger, as a line sink (None outside a run: tests, scripts)."""
    try:
        logger = get_run_logger()
    except MissingContextError:
        return None
    return logger.info


@task(task_run_name="dvc status", cache_policy=NO_CACHE)
def changed_stages(stages: list[str]) -> set[str]:
    """The stages DVC says are out of date (code, deps, params or outputs changed), asked once
    for the whole pipeline. Anything it reports that is not one of `stages` (a `.dvc`-tracked
    source, a stage of another dvc.yaml), or an answer that does not parse, counts as every
    stage changed: then each goes through `dvc repro`, which decides for itself."""
    r = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True, env=dvc_env())
    try:  # (`--quiet` would print nothing at all, which must not read as "nothing changed")
        report = json.loads(r.stdout) if r.returncode == 0 else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or not set(report) <= set(stages):
        return set(stages)
    return set(report)


# DVC owns the caching of artifact stages, so Prefect must not cache them a second time.
# The task run is named after its stage; its log holds the stage's own output, line by line.
@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def repro(stage: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict:
    """One stage, as `dvc repro --single-item`: callers (the lifecycle, the sweep) bring the
    stages up in DAG order, so the stages before this one are done and DVC need not check them
    again (~0.2 s a stage). `up_to_date`: DVC's status already says this stage and every stage
    before it are unchanged, so its `dvc repro` would only say so again (a DVC process, ~0.5 s)."""
    started = time.perf_counter()
    if up_to_date:
        print(f"Stage '{stage}' didn't change (dvc status), skipping")
        return {"stage": stage, "ran": False, "seconds": time.perf_counter() - started}
    code, output = run_streaming([sys.executable, "-m", "dvc", "repro", "--single-item", stage], timeout_s, on_line=run_logger())
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise StageFailed(f"stage '{stage}' failed (exit {code}); earlier stages' outputs are kept in the DVC cache and a rerun resumes from here.\n{tail}")
    ran = f"Running stage '{stage}'" in output
    return {"stage": stage, "ran": ran, "seconds": seconds}


@task(task_run_name="dvc push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def push_artifacts() -> None:
    """Copy every artifact's bytes to the DVC remote (a local folder by default, see .dvc/config),
    so a registered model can always be traced back to, and restored from, its inputs."""
    code, output = run_streaming([sys.executable, "-m", "dvc", "push", "--quiet"])
    if code != 0:
        raise RuntimeError(f"dvc push failed (exit {code}):\n{output[-2000:]}")
