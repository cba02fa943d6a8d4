"""`python -m flows.lifecycle` starts Prefect's temporary API server before its imports and
hands it to Prefect (flows/temporary_api.py), and leaves without the interpreter's teardown
once every exit handler has run (flows/quick_exit.py). Both reach into how Prefect runs its
ephemeral server, so these check the hand-over against the pinned Prefect, in a process of
its own, as `make pipeline` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from flows import quick_exit, temporary_api

quick_exit.arm()
temporary_api.start()

from prefect import flow
from prefect.server.api.server import SubprocessASGIServer


@flow
def hello() -> int:
    return 42


def main() -> None:
    url = temporary_api.attach()
    server = SubprocessASGIServer()
    assert hello() == 42
    print("URL", url, "PID", server.server_process.pid, "SERVER", server.api_url, flush=True)
    sys.exit(int(sys.argv[1]))


quick_exit.run(main)
"""


def run(tmp_path: Path, code: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(code)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **env},
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_the_early_server_is_the_one_prefect_uses_and_is_stopped_at_exit(tmp_path):
    r = run(tmp_path, 3)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out  # the exit code survives the quick exit
    assert "Starting temporary server" not in out, "Prefect started a second server of its own"
    line = next(l for l in r.stdout.splitlines() if l.startswith("URL "))
    _, url, _, pid, _, api = line.split()
    assert api == f"{url}/api"  # Prefect's client went to the early server
    assert "Stopping temporary server" in out  # Prefect's own exit handler ran before the process left
    assert not alive(int(pid))
    with pytest.raises(httpx.TransportError):  # nothing listens there any more
        httpx.get(f"{url}/api/health", timeout=2)


def test_a_configured_server_is_used_as_it_is(tmp_path):
    """With PREFECT_API_URL set nothing is started early: Prefect talks to that server (here an
    address nobody serves, so the flow fails to reach it, and says where)."""
    r = run(tmp_path, 0, PREFECT_API_URL="http://127.0.0.1:9/api")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "URL " not in r.stdout and "Starting temporary server" not in out
    assert "127.0.0.1:9" in out
