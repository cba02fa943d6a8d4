"""The serving plane: the gateway on `serve.port` and the engine processes behind it, kept running.

`make serve` (`python -m serving.plane`) starts the champion's engines (`serve.replicas`) behind
the gateway, the one public OpenAI-compatible endpoint, and keeps them running: a supervisor
(`serving.supervisor`) restarts an engine that dies. Releases go into it through its admin API:
attach a canary version (the plane starts its engines), set its weight or mirror traffic to it,
promote it (the old stable drains, then stops) or roll it back (the canary drains, then stops).
`tasks/deploy.py` and `python -m registry.cli rollback` drive it with `serving.plane_client`.

The routing state (stable and canary versions, weight, mirroring, each replica's URL and pid) is
written to `<state_dir>/state.json` on every change. A plane restarted after a crash adopts the
engines still running from that file (they run in their own process groups) and routes exactly
as before; after a clean stop (Ctrl-C, which stops every engine it started) it starts the same
versions again. On start, the registry has the last word on the champion: if the alias moved
while the plane was down, the plane serves the new champion (finishing a promotion the registry
recorded, or dropping a canary the registry no longer holds).

Admin routes (loopback, or Bearer $SERVING_ADMIN_KEY; see `serving.gateway`):
  GET  /admin/state                   routing, replicas, statistics, recent history
  POST /admin/canary   {version, weight?, args?}   start a version's engines as the canary
  POST /admin/weight   {weight}       (the gateway's) canary share of traffic
  POST /admin/mirror   {enabled}      copy stable's traffic to the canary, answers compared
  POST /admin/window                  the statistics since the last call, and a new window
  POST /admin/promote                 canary -> stable; the old stable drains and stops
  POST /admin/rollback                the canary drains and stops; stable takes all traffic
  POST /admin/drain    {replica}      take a replica out, let it finish, restart it
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request

from pipelines.config import Params
from serving import auth
from serving.gateway import APIError, FrontDoor, create_gateway
from serving.launcher import ServerProcess, ServerStartError, free_port, launch
from serving.routing import Backend, Gateway, NoCanaryError

log = logging.getLogger("serving.plane")
STATE_DIR = Path(".serving/plane")
HISTORY_KEPT = 200  # events in the state file; the full release history goes to MLflow and Prefect
DRILL_FLAGS = ("--fault-",)  # the only engine flags the admin API passes on: the canary drills'


class PlaneError(RuntimeError):
    """An admin operation that cannot be done as asked (answered 409 with this message)."""


class Adopted:
    """An engine process this plane did not start (a previous plane's, found in the state file):
    watched and stopped through its pid and process group, like a ServerProcess."""

    def __init__(self, pid: int, root_url: str) -> None:
        self.pid, self.root_url = pid, root_url

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return -1
        except PermissionError:  # alive, another user's: not ours to adopt, but alive
            return None
        return None

    def stop(self, timeout_s: float = 10) -> int | None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + timeout_s
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.poll() is not None:
                return -1
        return -1


@dataclass
class Replica:
    version: str
    backend: Backend
    process: ServerProcess | Adopted
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        p = self.process
        return p.pid if isinstance(p, Adopted) else (p.process.pid if p.process else None)

    def record(self) -> dict[str, Any]:
        return {"name": self.backend.name, "url": self.backend.base_url, "model": self.backend.model, "pid": self.pid, "restarts": self.restarts}


@dataclass
class RoutingState:
    """What `state.json` holds: enough to route exactly as before after a restart."""

    stable: str | None = None  # version
    canary: str | None = None
    weight: float = 0.0
    mirror: bool = False
    replicas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # version -> replica records
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "RoutingState | None":
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise PlaneError(f"{path} is not a routing state this plane wrote ({exc}); move it aside to start from the registry's champion") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        os.replace(tmp, path)  # atomic: a crash leaves the old state or the new, never half of one


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


class Plane:
    """The engines, the routing state and the operations on them. Operations are serialised
    (one at a time); the gateway keeps serving throughout."""

    def __init__(self, params: Params, state_dir: Path = STATE_DIR, resolve: Callable[[str], Path] | None = None) -> None:
        self.params = params
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / "state.json"
        self.resolve = resolve or registry_resolver(params, self.state_dir / "models")
        self.public_model = params.registry.model_name
        self.replicas: dict[str, Replica] = {}  # by backend name
        self.history: list[dict[str, Any]] = []
        self.gateway: Gateway | None = None
        self.ops = threading.RLock()
        self.extra_args: dict[str, list[str]] = {}  # version -> drill flags it was started with
        self.closing = False  # set by stop_all: an engine started after that is stopped at once

    # --- engines ---

    def served_name(self, version: str) -> str:
        return f"{self.public_model}-v{version}"

    def engines_running(self) -> int:
        return max(1, len(self.replicas))

    def start_engine(self, version: str, index: int, servers: int | None = None) -> Replica:
        """Launch one engine process for `version` and wait until it is healthy."""
        serve = self.params.serve
        model_dir = self.resolve(version)
        extra = ["--max-new-tokens", str(serve.max_new_tokens)] if serve.engine == "cpu" else []
        threads = serve.cpu_threads or max(1, (os.cpu_count() or 1) // (servers or self.engines_running()))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if serve.engine == "cpu" else {}
        name = f"v{version}-r{index}"
        server = launch(
            serve.engine, str(model_dir), self.served_name(version), "127.0.0.1", free_port(), self.state_dir / "logs" / f"{name}.log",
            serve.startup_timeout_s, extra_args=extra + self.extra_args.get(version, []), env=env,
        )
        backend = Backend(name, server.root_url, self.served_name(version), api_key=auth.backend_key(), version=version)
        return Replica(version, backend, server)

    def start_version(self, version: str, count: int) -> list[Replica]:
        started: list[Replica] = []
        try:
            for i in range(count):
                started.append(self.start_engine(version, i, servers=len(self.replicas) + count))
        except Exception:
            for r in started:
                r.process.stop()
            raise
        for r in started:
            self.replicas[r.backend.name] = r
        return started

    def stop_version(self, version: str) -> None:
        for name in [n for n, r in self.replicas.items() if r.version == version]:
            self.replicas.pop(name).process.stop()

    def adopt(self, version: str, records: list[dict[str, Any]]) -> list[Replica] | None:
        """The engines a previous plane left running for `version`, if every one still answers."""
        adopted = []
        for rec in records:
            if not rec.get("pid") or not healthy(rec["url"], rec["model"]):
                return None
            backend = Backend(rec["name"], rec["url"], rec["model"], api_key=auth.backend_key(), version=version)
            adopted.append(Replica(version, backend, Adopted(int(rec["pid"]), backend.base_url), rec.get("restarts", 0)))
        return adopted or None

    def version_backends(self, version: str) -> list[Backend]:
        return [r.backend for r in self.replicas.values() if r.version == version]

    # --- state ---

    def event(self, what: str, **detail: Any) -> None:
        entry = {"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "event": what, **detail}
        self.history.append(entry)
        del self.history[:-HISTORY_KEPT]
        log.info("%s %s", what, json.dumps(detail))

    def routing(self) -> RoutingState:
        g = self.gateway
        assert g is not None
        stable = g.stable.version
        canary = g.canary.version if g.canary else None
        versions = [v for v in (stable, canary) if v is not None]
        return RoutingState(
            stable, canary, g.weight, g.mirror,
            {v: [r.record() for r in self.replicas.values() if r.version == v] for v in versions}, list(self.history),
        )

    def save(self) -> None:
        if self.gateway is not None:
            self.routing().save(self.state_path)

    # --- start: reconcile the state file, the running engines and the registry ---

    def start(self, champion: str | None) -> Gateway:
        """Build the routing from the state file and the registry's `champion` version."""
        with self.ops:
            state = RoutingState.load(self.state_path)
            if state is not None:
                self.history = list(state.history)
            if champion is None and (state is None or state.stable is None):
                raise PlaneError(f"model '{self.public_model}' has no champion yet: run `make pipeline` first")
            stable, canary, weight, mirror = (state.stable, state.canary, state.weight, state.mirror) if state else (None, None, 0.0, False)
            if champion is not None and stable != champion:
                if canary == champion:
                    self.event("reconcile", why=f"the registry promoted version {canary} while the plane was down: it is stable now", previous=stable)
                else:
                    self.event("reconcile", why=f"the registry's champion is version {champion}, not {stable}: serving it", dropped_canary=canary)
                stable, canary, weight, mirror = champion, None, 0.0, False
            records = state.replicas if state else {}
            for version in [v for v in (stable, canary) if v is not None]:
                adopted = self.adopt(version, records.get(version, []))
                if adopted:
                    for r in adopted:
                        self.replicas[r.backend.name] = r
                    self.event("adopted", version=version, replicas=[r.backend.name for r in adopted])
                    continue
                count = self.params.serve.replicas if version == stable else max(1, len(records.get(version, [])))
                try:
                    self.start_version(version, count)
                except ServerStartError as exc:
                    if version == stable:
                        raise
                    self.event("canary_dropped", version=version, why=f"could not be restarted: {str(exc)[:300]}")
                    canary, weight, mirror = None, 0.0, False
                else:
                    self.event("started", version=version, replicas=count)
            self.stop_orphans(records, keep={stable, canary})
            self.gateway = Gateway(self.version_backends(stable), public_model=self.public_model, seed=None)
            if canary is not None:
                self.gateway.set_canary(self.version_backends(canary), weight)
                self.gateway.mirror = mirror
            self.save()
            return self.gateway

    def stop_orphans(self, records: dict[str, list[dict[str, Any]]], keep: set[str | None]) -> None:
        """Engines a crashed plane left for versions no longer routed: stopped, not leaked."""
        for version, recs in records.items():
            if version in keep:
                continue
            for rec in recs:
                if rec.get("pid") and healthy(rec["url"], rec["model"]):
                    Adopted(int(rec["pid"]), rec["url"]).stop()

    # --- operations (the admin API) ---

    def attach_canary(self, version: str, weight: float = 0.0, args: list[str] | None = None, replicas: int = 1) -> dict[str, Any]:
        g = self.require_gateway()
        version = str(version)
        bad = [a for a in args or [] if a.startswith("--") and not a.startswith(DRILL_FLAGS)]
        if bad:
            raise PlaneError(f"only drill flags ({', '.join(f + '*' for f in DRILL_FLAGS)}) may be passed to a canary's engine, got {bad}")
        with self.ops:
            if g.stable.version == version:
                raise PlaneError(f"version {version} is already stable")
            if g.canary is not None:
                raise PlaneError(f"version {g.canary.version} is already the canary: promote or roll it back first")
            self.extra_args[version] = list(args or [])
            self.start_version(version, replicas)
            g.set_canary(self.version_backends(version), weight)
            self.event("canary_attached", version=version, weight=weight, drill=args or [])
            self.save()
            return self.state()

    def set_weight(self, weight: float) -> dict[str, Any]:
        g = self.require_gateway()
        with self.ops:
            g.set_weight(weight)
            self.event("weight", version=g.canary.version if g.canary else None, weight=weight)
            self.save()
        return self.state()

    def set_mirror(self, enabled: bool) -> dict[str, Any]:
        g = self.require_gateway()
        with self.ops:
            g.set_mirror(enabled)
            self.event("mirror", version=g.canary.version if g.canary else None, enabled=enabled)
            self.save()
        return self.state()

    def drain(self, names: list[str]) -> bool:
        """Wait until the named replicas have no request in flight (or drain_timeout_s passes)."""
        g = self.require_gateway()
        deadline = time.monotonic() + self.params.serve.drain_timeout_s
        while g.outstanding(names) and time.monotonic() < deadline:
            time.sleep(0.05)
        return g.outstanding(names) == 0

    def promote(self) -> dict[str, Any]:
        g = self.require_gateway()
        with self.ops:
            if g.canary is None:
                raise PlaneError("no canary to promote")
            old_version, new_version = g.stable.version, g.canary.version
            g.promote_canary()
            old = [r.backend.name for r in self.replicas.values() if r.version == old_version]
            self.save()  # routing first: a crash from here on resumes with the new stable
            drained = self.drain(old)
            self.stop_version(old_version)
            self.event("promoted", version=new_version, previous=old_version, drained=drained)
            missing = self.params.serve.replicas - len(self.version_backends(new_version))
            if missing > 0:  # a canary runs fewer replicas than stable should: scale it up now
                for i in range(len(self.version_backends(new_version)), self.params.serve.replicas):
                    r = self.start_engine(new_version, i)
                    self.replicas[r.backend.name] = r
                g.set_stable_backends(self.version_backends(new_version))
                self.event("scaled", version=new_version, replicas=self.params.serve.replicas)
            self.save()
        return self.state()

    def rollback(self) -> dict[str, Any]:
        g = self.require_gateway()
        with self.ops:
            if g.canary is None:
                raise PlaneError("no canary to roll back")
            version = g.canary.version
            names = [b.name for b in g.canary_backends]
            g.remove_canary()
            self.save()
            drained = self.drain(names)
            self.stop_version(version)
            self.event("rolled_back", version=version, drained=drained)
            self.save()
        return self.state()

    def restart_replica(self, name: str, why: str) -> None:
        """Replace one engine process with a new one of the same version (the supervisor's and
        /admin/drain's way): out of rotation first, back in once the new one is healthy."""
        g = self.require_gateway()
        replica = self.replicas.get(name)
        if replica is None:
            return
        g.set_healthy(name, False)
        replica.process.stop()
        index = int(name.rsplit("-r", 1)[1])
        new = self.start_engine(replica.version, index)
        new.restarts = replica.restarts + 1
        with self.ops:
            if self.closing or self.replicas.get(name) is not replica:  # stopping, or promoted away / rolled back meanwhile
                new.process.stop()
                return
            self.replicas[name] = new
            g.replace_replica(name, new.backend)
            g.set_healthy(name, True)
            self.event("restarted", replica=name, version=replica.version, why=why, restarts=new.restarts)
            self.save()

    def drain_replica(self, name: str) -> dict[str, Any]:
        g = self.require_gateway()
        if name not in self.replicas:
            raise PlaneError(f"no replica named '{name}'; the plane runs {sorted(self.replicas)}")
        g.set_healthy(name, False)
        drained = self.drain([name])
        self.restart_replica(name, why=f"drained on request (in flight finished: {drained})")
        return self.state()

    def window(self) -> dict[str, Any]:
        return self.require_gateway().window()

    def state(self) -> dict[str, Any]:
        g = self.require_gateway()
        routing = self.routing().__dict__
        return {
            **routing, "history": routing["history"][-20:], "public_model": self.public_model, "registry_uri": registry_uri(),
            "stats": g.snapshot(), "canary_window_requests": g.canary_requests(),
        }

    def require_gateway(self) -> Gateway:
        if self.gateway is None:
            raise PlaneError("the plane has not started")
        return self.gateway

    def stop_all(self) -> None:
        """Ctrl-C: every engine this plane runs is stopped; the state file keeps the routing."""
        self.closing = True
        with self.ops:
            self.save()
            for r in list(self.replicas.values()):
                r.process.stop()
            self.replicas.clear()


def registry_uri() -> str:
    from registry.store import tracking_uri

    return tracking_uri()


def champion_version(params: Params) -> str | None:
    from registry.models import CHAMPION, by_alias

    mv = by_alias(params.registry.model_name, CHAMPION)
    return None if mv is None else str(mv.version)


def create_plane_app(plane: Plane, *, supervise: bool = True, api_key: str | None = None, admin_key: str | None = None, **gateway_kwargs: Any) -> FastAPI:
    """The gateway app for `plane.gateway`, with the plane's admin routes and its supervisor."""
    from serving.supervisor import Supervisor

    gateway = plane.require_gateway()
    front = gateway_kwargs.pop("front", None) or FrontDoor.from_params(plane.params.serve, plane.params.serve.replicas)
    app = create_gateway(gateway, api_key=api_key, admin_key=admin_key, on_change=plane.save, front=front, **gateway_kwargs)
    require_admin = app.state.require_admin
    supervisor = Supervisor(plane, plane.params.serve.supervise_interval_s)
    app.state.plane, app.state.supervisor = plane, supervisor
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        async with inner(a):
            if supervise:
                supervisor.start()
            try:
                yield
            finally:
                supervisor.stop()

    app.router.lifespan_context = lifespan

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        return data

    def run(op: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return op()
        except (PlaneError, NoCanaryError) as exc:
            raise APIError(409, str(exc), code="conflict") from None
        except ServerStartError as exc:
            raise APIError(502, f"the engine did not start: {str(exc)[-2000:]}", code="engine_start_failed") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    from starlette.concurrency import run_in_threadpool

    @app.get("/admin/state")
    async def state(request: Request) -> dict[str, Any]:
        require_admin(request)
        return plane.state()

    @app.post("/admin/canary")
    async def canary(request: Request) -> dict[str, Any]:
        require_admin(request)
        data = await body(request)
        version, weight, args = data.get("version"), data.get("weight", 0.0), data.get("args", [])
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise APIError(400, f'send {{"version": "<registered version>"}}, got version={version!r}')
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise APIError(400, f"args must be a list of strings, got {args!r}")
        return await run_in_threadpool(run, lambda: plane.attach_canary(str(version), float(weight), args))

    @app.post("/admin/mirror")
    async def mirror(request: Request) -> dict[str, Any]:
        require_admin(request)
        enabled = (await body(request)).get("enabled")
        if not isinstance(enabled, bool):
            raise APIError(400, f'send {{"enabled": true|false}}, got enabled={enabled!r}')
        return run(lambda: plane.set_mirror(enabled))

    @app.post("/admin/window")
    async def window(request: Request) -> dict[str, Any]:
        require_admin(request)
        return plane.window()

    @app.post("/admin/promote")
    async def promote(request: Request) -> dict[str, Any]:
        require_admin(request)
        return await run_in_threadpool(run, plane.promote)

    @app.post("/admin/rollback")
    async def rollback(request: Request) -> dict[str, Any]:
        require_admin(request)
        return await run_in_threadpool(run, plane.rollback)

    @app.post("/admin/drain")
    async def drain(request: Request) -> dict[str, Any]:
        require_admin(request)
        name = (await body(request)).get("replica")
        if not isinstance(name, str):
            raise APIError(400, f'send {{"replica": "<name>"}}, got replica={name!r}')
        return await run_in_threadpool(run, lambda: plane.drain_replica(name))

    return app


# --- command line (`make serve`) ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvicorn

    from pipelines.config import ConfigError, load_params
    from serving.gateway import ADMIN_KEY_ENV, API_KEY_ENV, LEGACY_ADMIN_KEY_ENV
    from serving.netaddr import is_loopback

    parser = argparse.ArgumentParser(prog="python -m serving.plane", description="Serve the champion behind the gateway and keep it running (make serve).")
    parser.add_argument("--params", default="params.yaml", help="the params file (serve:, registry:)")
    parser.add_argument("--state-dir", default=str(STATE_DIR), help="where the routing state, model copies and engine logs live")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback serve.host without API and admin keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    serve = params.serve
    api_key = auth.env_key(API_KEY_ENV) or auth.backend_key()
    admin_key = auth.env_key(ADMIN_KEY_ENV) or auth.env_key(LEGACY_ADMIN_KEY_ENV)
    if not is_loopback(serve.host) and not (api_key and admin_key) and not args.insecure:
        parser.error(f"refusing to listen on {serve.host} without ${API_KEY_ENV} and ${ADMIN_KEY_ENV}: set both, bind 127.0.0.1, or pass --insecure")
    plane = Plane(params, Path(args.state_dir))
    try:
        gateway = plane.start(champion_version(params))
    except (PlaneError, ServerStartError) as exc:
        print(f"the plane could not start: {exc}", file=sys.stderr)
        plane.stop_all()
        sys.exit(1)
    app = create_plane_app(plane, api_key=api_key, admin_key=admin_key)
    canary = f", canary version {gateway.canary.version} at {gateway.weight:.0%}" if gateway.canary else ""
    guarded = " (requires $GATEWAY_API_KEY or $SERVING_API_KEY)" if api_key else ""
    print(
        f"serving '{plane.public_model}' on http://{serve.host}:{serve.port}/v1{guarded}: stable version {gateway.stable.version} "
        f"x{len(gateway.stable_backends)}{canary}. Ctrl-C stops it; routing is kept in {plane.state_path}.", flush=True,
    )
    try:
        uvicorn.run(app, host=serve.host, port=serve.port, log_level="warning")
    finally:
        plane.stop_all()
        print("the plane stopped its engines; `make serve` resumes the same routing", flush=True)


if __name__ == "__main__":
    main()
