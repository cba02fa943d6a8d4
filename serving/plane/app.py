"""The plane's app: the gateway (`serving.gateway`) for the plane's routing, its admin routes,
and a lifespan that owns the supervisor and the engines.

The engines are stopped in the lifespan's shutdown, not after `uvicorn.run` returns: uvicorn
re-raises a SIGTERM it caught once its shutdown is done, so code after it never runs on
`kill`, systemd's stop or Kubernetes' termination, and the engines (in process groups of their
own) would be left running. Ctrl-C (SIGINT) goes the same way.

Admin routes (a key with the `admin` scope, Bearer $SERVING_ADMIN_KEY, or loopback; see
`serving.gateway`), each change and each refusal an entry in the audit log (registry/audit.py):
  GET  /admin/state                   routing, replicas, statistics, recent history
  GET  /admin/canary-requests         the canary's requests in the current window (cheap)
  GET  /admin/traffic-key             the key the release's own synthetic users send
  POST /admin/canary   {version, weight?, args?}   start a version's engines as the canary
  POST /admin/weight   {weight}       (the gateway's) canary share of traffic
  POST /admin/mirror   {enabled}      copy stable's traffic to the canary, answers compared
  POST /admin/window                  the statistics since the last call, and a new window
  POST /admin/promote                 canary -> stable; the old stable drains and stops
  POST /admin/rollback                the canary drains and stops; stable takes all traffic
  POST /admin/drain    {replica}      take a replica out, let it finish, restart it
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from registry.audit import AuditLog
from serving.gateway import APIError, FrontDoor, create_gateway
from serving.launcher import ServerStartError
from serving.plane.operations import Plane
from serving.plane.state import PlaneError
from serving.plane.supervisor import Supervisor
from serving.record.recorder import Recorder
from serving.routing import NoCanaryError

STOPPED = "the plane stopped its engines; `make serve` resumes the same routing"


def create_plane_app(
    plane: Plane, *, supervise: bool = True, api_key: str | None = None, admin_key: str | None = None,
    on_stopped: Callable[[bool], None] | None = None, **gateway_kwargs: Any,
) -> FastAPI:
    """The gateway app for `plane.gateway`, with the plane's admin routes and its supervisor.
    Its shutdown stops every engine the plane runs, then calls `on_stopped(anything_stopped)`.
    Admin calls go to the project's audit log (`audit=` another `AuditLog`)."""
    gateway = plane.require_gateway()
    record = Recorder.from_params(plane.params.record, plane.state_dir)  # in the plane's state folder unless record.store names one
    front = gateway_kwargs.pop("front", None) or FrontDoor.from_params(plane.params.serve, plane.params.serve.replicas, record, plane.params.feedback)
    audit = gateway_kwargs.pop("audit", None) or AuditLog()
    app = create_gateway(gateway, api_key=api_key, admin_key=admin_key, on_change=plane.save, front=front, service_keys=[plane.traffic_key], audit=audit, **gateway_kwargs)
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
                stopped = await run_in_threadpool(plane.stop_all)
                if on_stopped is not None:
                    on_stopped(stopped)

    app.router.lifespan_context = lifespan

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]] nested past the parser's limit
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

    @app.get("/admin/state")
    async def state(request: Request) -> dict[str, Any]:
        require_admin(request)
        return plane.state()

    @app.get("/admin/canary-requests")
    async def canary_requests(request: Request) -> dict[str, Any]:
        require_admin(request)
        return {"canary_window_requests": gateway.canary_requests()}

    @app.get("/admin/traffic-key")
    async def traffic_key(request: Request) -> dict[str, Any]:
        require_admin(request)
        return {"key": plane.traffic_key}

    @app.post("/admin/canary")
    async def canary(request: Request) -> dict[str, Any]:
        require_admin(request)
        data = await body(request)
        version, weight, args = data.get("version"), data.get("weight", 0.0), data.get("args", [])
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise APIError(400, f'send {{"version": "<registered version>"}}, got version={version!r}')
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise APIError(400, f"args must be a list of strings, got {args!r}")
        request.state.audit_version = str(version)
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
        request.state.audit_version = gateway.canary.version if gateway.canary else None
        return await run_in_threadpool(run, plane.promote)

    @app.post("/admin/rollback")
    async def rollback(request: Request) -> dict[str, Any]:
        require_admin(request)
        request.state.audit_version = gateway.canary.version if gateway.canary else None
        return await run_in_threadpool(run, plane.rollback)

    @app.post("/admin/drain")
    async def drain(request: Request) -> dict[str, Any]:
        require_admin(request)
        name = (await body(request)).get("replica")
        if not isinstance(name, str):
            raise APIError(400, f'send {{"replica": "<name>"}}, got replica={name!r}')
        return await run_in_threadpool(run, lambda: plane.drain_replica(name))

    return app
