"""The plane's engine processes: one `Replica` per process, started for a registered version by
`EngineStarter`, health-checked by `healthy`.

Each engine is its own process in its own process group (`serving.launcher`), serving the
version's local copy (downloaded once per plane into its state folder) under the served name
`<model>-v<version>`. Side-by-side CPU engines split the cores (`serve.cpu_threads: 0` means
cores / engines): each torch process otherwise claims every core, which cost ~8x throughput.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from serving import auth
from serving.launcher import ServerProcess, free_port, launch
from serving.routing import Backend

if TYPE_CHECKING:
    from pipelines.config import Params
    from serving.plane.adoption import Adopted


@dataclass
class Replica:
    version: str
    backend: Backend
    process: ServerProcess | Adopted
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        p = self.process
        return p.process.pid if isinstance(p, ServerProcess) and p.process else getattr(p, "pid", None)

    def record(self) -> dict[str, Any]:
        return {"name": self.backend.name, "url": self.backend.base_url, "model": self.backend.model, "pid": self.pid, "restarts": self.restarts}


def registry_resolver(params: Params, models_dir: Path) -> Callable[[str], Path]:
    """version -> a local copy of that registered version (downloaded once per plane)."""

    def resolve(version: str) -> Path:
        from registry.models import download
        from registry.store import client

        dst = models_dir / f"v{version}"
        done = dst / "path.txt"  # where the download landed, written once it is complete
        if done.exists():
            return Path(done.read_text())
        mv = client().get_model_version(params.registry.model_name, version)
        path = download(mv, dst)
        done.write_text(str(path.resolve()))
        return path

    return resolve


def engine_threads(params: Params, side_by_side: int) -> dict[str, str]:
    """The torch thread count of one CPU engine among `side_by_side` (nothing for GPU engines)."""
    serve = params.serve
    if serve.engine != "cpu":
        return {}
    threads = serve.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, side_by_side))
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class EngineStarter:
    """Starts engines for versions: `start(version, index, side_by_side)` launches replica
    `v<version>-r<index>` and returns it once healthy (or raises ServerStartError). Drill flags
    (`--fault-*`) set for a version in `drills` are passed to its engines."""

    def __init__(self, params: Params, public_model: str, logs: Path, resolve: Callable[[str], Path]) -> None:
        self.params, self.public_model, self.logs, self.resolve = params, public_model, logs, resolve
        self.drills: dict[str, list[str]] = {}

    def served_name(self, version: str) -> str:
        return f"{self.public_model}-v{version}"

    def start(self, version: str, index: int, side_by_side: int) -> Replica:
        serve = self.params.serve
        model_dir = self.resolve(version)
        extra = ["--max-new-tokens", str(serve.max_new_tokens)] if serve.engine == "cpu" else []
        name = f"v{version}-r{index}"
        server = launch(
            serve.engine, str(model_dir), self.served_name(version), "127.0.0.1", free_port(), self.logs / f"{name}.log",
            serve.startup_timeout_s, extra_args=extra + self.drills.get(version, []), env=engine_threads(self.params, side_by_side),
        )
        backend = Backend(name, server.root_url, self.served_name(version), api_key=auth.backend_key(), version=version)
        return Replica(version, backend, server)


_probe_client: httpx.Client | None = None


def probe_client() -> httpx.Client:
    """One client for every health check: a new httpx client builds an SSL context and loads
    the CA bundle (~5 ms of CPU), which the supervisor's checks every 0.5 s took from the gateway
    in the same process. httpx clients are safe to share across threads."""
    global _probe_client
    if _probe_client is None:
        # No pooled connections: a check must see whether the engine accepts a new one.
        _probe_client = httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
    return _probe_client


def healthy(root_url: str, model: str | None = None, timeout_s: float = 2.0) -> bool:
    """The engine answers /health (and serves `model`, when given)."""
    headers = auth.bearer_headers(auth.backend_key())
    http = probe_client()
    try:
        if http.get(f"{root_url}/health", headers=headers, timeout=timeout_s).status_code != 200:
            return False
        if model is None:
            return True
        return any(m.get("id") == model for m in http.get(f"{root_url}/v1/models", headers=headers, timeout=timeout_s).json().get("data", []))
    except (httpx.HTTPError, ValueError):
        return False
