"""Prefect's temporary API server for one `python -m flows.lifecycle`, started early.

With no PREFECT_API_URL, Prefect runs a flow against a temporary API server (a uvicorn
subprocess, ~3.5 s to come up on 2 cores) that it starts when the flow begins, after this
process has spent ~4 s importing torch, transformers, MLflow and Prefect itself. Starting the
same server first, so it boots on the other core while those imports run, takes that wait off
every `make pipeline` (measured in `make bench`: benchmarks/orchestration.py).

The server is Prefect's own: the same command and environment `SubprocessASGIServer` uses,
handed to that class once it is healthy, so Prefect's client finds it running, treats it as
the ephemeral API it is (no slot, no server-side state beyond the run) and stops it at exit.
Prefect is pinned (constraints.txt); tests/flows/test_temporary_api.py checks the hand-over
against that version.

How long the server may take to answer: Prefect waits
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 20 s by default. On a 2-core machine busy
with other work the server took longer (12-22 s at a load of 3; a first start also creates
its database), and `python -m flows.sweep` and the lifecycle failed with "Timed out while
attempting to connect to ephemeral Prefect API server". The project's flows run under
`startup_allowance()`: STARTUP_TIMEOUT_S unless the user set the setting (environment or
profile), counted in an idle machine's seconds (flows/patience.py) while the early server
boots, and a timeout names the setting and how to raise it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_started: dict = {}

TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# What this project's runs need: ~4 s idle, 22 s measured at a load of 3 on 2 cores with a new
# database, several times that when the suite and a pipeline share the machine.
STARTUP_TIMEOUT_S = 180
PREFECT_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


class ApiStartTimeout(RuntimeError):
    """Prefect's temporary API server did not answer in time; the message says what to raise."""


def timeout_message(seconds: float, waited: str | None = None) -> str:
    took = f" (waited {waited})" if waited else ""
    return (
        f"Prefect's temporary API server did not answer within {seconds:g} s{took}: {TIMEOUT_SETTING} "
        f"(this project allows {STARTUP_TIMEOUT_S} s unless you set it; Prefect's own default is 20 s). "
        f"The machine is busy: raise it (export {TIMEOUT_SETTING}=600), or keep a Prefect server running "
        "(`make ui`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)."
    )


@contextmanager
def startup_allowance() -> Iterator[None]:
    """Around a flow run without a configured server: Prefect waits STARTUP_TIMEOUT_S for its
    temporary server unless the user set the setting (a value in the environment or the
    profile wins), and its timeout becomes an ApiStartTimeout that says what to raise."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    with temporary_settings(set_defaults={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: STARTUP_TIMEOUT_S}):
        try:
            yield
        except RuntimeError as exc:
            if PREFECT_TIMEOUT not in str(exc):
                raise
            raise ApiStartTimeout(timeout_message(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())) from exc


def wanted() -> bool:
    """Prefect would start a temporary server: no API URL set (env or profile) and ephemeral
    mode allowed."""
    from prefect.settings import get_current_settings

    s = get_current_settings()
    return not s.api.url and s.server.ephemeral.enabled


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start() -> None:
    """Launch the server and return at once; `attach()` waits for it. Params are checked
    first: an invalid config starts nothing (main() reports it)."""
    from pipelines.config import ConfigError, load_params

    try:
        load_params()
    except ConfigError:
        return
    if _started or not wanted():
        return
    import prefect
    from prefect.settings import get_current_settings

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on",
        ],
        env={
            **os.environ,
            "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        },
    )
    _started.update(port=port, proc=proc)
    import atexit

    atexit.register(_stop_unclaimed)  # a run that ends before attach() (--help, a bad plan) leaves no server behind


def _stop_unclaimed() -> None:
    proc = _started.get("proc")
    if proc is not None and not _started.get("claimed") and proc.poll() is None:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def attach(timeout_s: float | None = None) -> str | None:
    """Wait until the early server answers, then hand it to Prefect as its ephemeral server.
    Returns its URL, or None when none was started (a configured server, or not `__main__`):
    Prefect then does what it always does. The wait is `timeout_s` (default: the start-up
    setting) of an idle machine's seconds, stretched by the load (flows/patience.py)."""
    if not _started:
        return None
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from flows.patience import Patience

    port, proc = _started["port"], _started["proc"]
    url = f"http://127.0.0.1:{port}"
    patience = Patience(timeout_s or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect's temporary API server exited with code {proc.returncode} before it answered on {url}")
        with suppress(httpx.TransportError):  # not listening yet
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        if patience.expired():
            proc.kill()
            raise ApiStartTimeout(timeout_message(patience.seconds, str(patience)))
        time.sleep(0.05)
    server = SubprocessASGIServer()  # the instance Prefect's client asks for (port None)
    _started["claimed"] = True
    if not server.running:
        server.port, server.server_process, server.running = port, proc, True
        import atexit

        atexit.register(server.stop)
    else:  # Prefect had started its own meanwhile: keep one
        proc.terminate()
        url = server.address
    print(f"Prefect API: temporary server on {url} (set PREFECT_API_URL, e.g. `make ui`, to record runs on a server you keep)", flush=True)
    return url


@contextmanager
def run_settings(url: str | None) -> Iterator[None]:
    """Around a flow on the early server: no flow-run heartbeats. They let a server mark a run
    whose process died as crashed; a temporary server dies with that process, so nothing reads
    them, and Prefect joins the heartbeat thread at the end of every run (up to 1 s)."""
    if url is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
