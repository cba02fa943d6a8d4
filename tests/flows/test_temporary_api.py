"""`python -m flows.lifecycle` starts Prefect's temporary API server before its imports and
hands it to Prefect (flows/temporary_api.py), and leaves without the interpreter's teardown
once every exit handler has run (flows/quick_exit.py). Both reach into how Prefect runs its
ephemeral server, so these check the hand-over against the pinned Prefect, in a process of
its own, as `make pipeline` runs it. The server's start-up allowance (the project's own, a
user's wins, a timeout says which setting to raise) and the load-stretched wait
(flows/patience.py) are checked here too."""

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
    with temporary_api.startup_allowance():  # as flows/lifecycle.py runs it
        url = temporary_api.attach()
        server = SubprocessASGIServer()
        assert hello() == 42
    print("URL", url, "PID", server.server_process.pid, "SERVER", server.api_url, flush=True)
    sys.exit(int(sys.argv[1]))


quick_exit.run(main)
"""


# A flow entry point as flows/lifecycle.py and flows/sweep.py run theirs: the early server
# (when `early` is given), then the flow under the project's start-up allowance.
TIMEOUT_SCRIPT = """
import sys
from flows import temporary_api

if sys.argv[1] == "early":
    temporary_api.start()

from prefect import flow


@flow
def hello() -> int:
    return 42


try:
    with temporary_api.startup_allowance():
        temporary_api.attach()
        hello()
except temporary_api.ApiStartTimeout as exc:
    print("STOPPED", exc, flush=True)
    sys.exit(1)
"""


def run(tmp_path: Path, code: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(code)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **env},
    )


def run_with_allowance(tmp_path: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TIMEOUT_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT), **env},
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


@pytest.mark.parametrize("mode", ["early", "prefects-own"])
def test_a_server_slower_than_its_allowance_names_the_setting_to_raise(tmp_path, mode):
    """1 s is too little for any start here: the early server's wait (ours) and Prefect's own
    both end in the project's message naming the setting and how to raise it, not Prefect's
    bare "Timed out while attempting to connect to ephemeral Prefect API server".
    Seen red: startup_allowance without its except clause -> Prefect's bare RuntimeError
    (prefects-own); attach raising its old RuntimeError -> no "export" hint (early)."""
    r = run_with_allowance(tmp_path, mode, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "STOPPED" in r.stdout, out
    assert "did not answer within 1 s" in r.stdout and "export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in r.stdout, out
    assert "PREFECT_API_URL" in r.stdout, "the other way out: a server that keeps running"


def test_the_project_allows_its_own_start_up_time_unless_the_user_set_one(monkeypatch, tmp_path):
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as SETTING

    from flows.temporary_api import STARTUP_TIMEOUT_S, startup_allowance

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    with startup_allowance():
        assert SETTING.value() == STARTUP_TIMEOUT_S > 20, "Prefect's 20 s default is what failed on a busy machine"
    code = "from flows.temporary_api import startup_allowance\nfrom prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S\nwith startup_allowance(): print(S.value())"
    users = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PREFECT_HOME": str(tmp_path / "p2"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7"})
    assert users.stdout.strip() == "7", users.stdout + users.stderr


def test_patience_stretches_with_the_load(monkeypatch):
    """Time counts at the rate the machine gives it: 60 s of patience last 4 wall minutes at
    4 runnable processes per core, one minute on an idle machine."""
    from types import SimpleNamespace

    from flows import patience

    now = [1000.0]
    monkeypatch.setattr(patience, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(patience, "load_factor", lambda: 4.0)
    busy = patience.Patience(60)
    now[0] += 200
    assert not busy.expired()
    now[0] += 41
    assert busy.expired() and busy.waited() == 241
    monkeypatch.setattr(patience, "load_factor", lambda: 1.0)
    idle = patience.Patience(60)
    now[0] += 59
    assert not idle.expired()
    now[0] += 1
    assert idle.expired()
