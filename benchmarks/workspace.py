"""A private copy of the project (its files as git sees them, a fresh git repo, empty stores),
for benchmarks and whole-flow tests that must not touch the user's workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Tracked and not-ignored files: what a fresh clone (plus uncommitted work) would hold."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file() and not f.startswith("tests/") and f != "dvc.lock"]


def copy_project(dst: Path) -> Path:
    for f in project_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    git = ["git", "-c", "user.name=lifecycle", "-c", "user.email=lifecycle@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace copy"], cwd=dst, check=True)
    return dst


def flow_env(project: Path) -> dict[str, str]:
    """The Makefile's environment, pointed at the copy's own stores."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(project / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def run_flow(project: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """`python -m flows.lifecycle` as a user runs it; stdout and stderr merged as a terminal shows them."""
    return subprocess.run(
        [sys.executable, "-m", "flows.lifecycle", *args], cwd=project, env=flow_env(project),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )


def stage_table(output: str) -> dict[str, tuple[str, float]]:
    """The flow summary's stage table: {stage: (status, seconds)}."""
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| ") and "stage" not in line]
    return {r[1].strip(): (r[2].strip(), float(r[3])) for r in rows if len(r) > 4}


def release(tmp: Path, keep: bool, what: str) -> None:
    """A benchmark's scratch folder at its end: kept, and where said, with --keep; else removed."""
    if keep:
        print(f"\n{what} kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_healthy(root: str, process: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Poll `root`/health until it answers 200; exit with the log's tail if `process` dies or
    `timeout_s` passes first (servers start slowly on a busy machine)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(*processes: subprocess.Popen) -> None:
    """Ask every process to stop (they flush on SIGTERM), then wait; kill one that hangs."""
    for p in processes:
        p.terminate()
    for p in processes:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
