"""The plane's engines and routing, and the operations on them (the admin API's verbs).

`Plane.start` builds the routing from the state file and the registry's champion
(`serving.plane.reconcile`), adopting a crashed plane's engines or starting new ones. Every
operation is serialised (one at a time) and rewrites the state file; the gateway keeps serving
throughout. A version leaving the routing (promoted away, rolled back) leaves rotation at once
(`Gateway` hands its replicas to no new request), finishes its requests in flight
(`drain_timeout_s`), and only then stops; a promoted canary is scaled up to `serve.replicas`
before the old stable leaves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import Params
from serving.launcher import ServerStartError
from serving.plane.adoption import adopt, stop_orphans
from serving.plane.engines import EngineStarter, Replica, registry_resolver
from serving.plane.reconcile import reconcile
from serving.plane.state import History, PlaneError, RoutingState, traffic_key
from serving.plane.targets import TARGETS_FILE, scrape_targets, write_targets
from serving.routing import Backend, Gateway

STATE_DIR = Path(".serving/plane")
DRILL_FLAGS = ("--fault-",)  # the only engine flags the admin API passes on: the canary drills'


class Plane:
    """The engines, the routing state and the operations on them.

    `side_by_side`: how many engines will share this machine's cores (each CPU engine gets
    cores / that many threads); None counts the engines running when one starts. A temporary
    plane for a release knows it will run the champion and the candidate together."""

    def __init__(self, params: Params, state_dir: Path = STATE_DIR, resolve: Callable[[str], Path] | None = None, side_by_side: int | None = None) -> None:
        self.params = params
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / "state.json"
        self.targets_path = self.state_dir / TARGETS_FILE  # what Prometheus scrapes (serving/plane/targets.py)
        self.gateway_address: str | None = None  # host:port the gateway listens on, once whoever serves it knows
        self.gateway_scheme = "http"  # https when the gateway serves TLS itself (serve.tls_certfile)
        self.public_model = params.registry.model_name
        self.engines = EngineStarter(params, self.public_model, self.state_dir / "logs", resolve or registry_resolver(params, self.state_dir / "models"))
        self.side_by_side = side_by_side
        self.replicas: dict[str, Replica] = {}  # by backend name
        self.history = History()
        self.gateway: Gateway | None = None
        self.ops = threading.RLock()
        self.closing = False  # set by stop_all: an engine started after that is stopped at once
        self.traffic_key = traffic_key(self.state_dir)

    # --- engines ---

    def event(self, what: str, **detail: Any) -> None:
        self.history.add(what, **detail)

    def _share(self, adding: int = 0) -> int:
        return self.side_by_side or max(1, len(self.replicas) + adding)

    def start_version(self, version: str, count: int, first_index: int = 0) -> list[Replica]:
        """`count` engines of `version` (all healthy, or none: a failure stops those started)."""
        started: list[Replica] = []
        try:
            for i in range(first_index, first_index + count):
                started.append(self.engines.start(version, i, self._share(count)))
        except BaseException:
            for r in started:
                r.process.stop()
            raise
        for r in started:
            self.replicas[r.backend.name] = r
        return started

    def stop_version(self, version: str) -> None:
        for name in [n for n, r in self.replicas.items() if r.version == version]:
            self.replicas.pop(name).process.stop()

    def version_backends(self, version: str) -> list[Backend]:
        return [r.backend for r in self.replicas.values() if r.version == version]

    # --- state ---

    def routing(self) -> RoutingState:
        g = self.require_gateway()
        stable = g.stable.version
        canary = g.canary.version if g.canary else None
        versions = [v for v in (stable, canary) if v is not None]
        return RoutingState(
            stable, canary, g.weight, g.mirror,
            {v: [r.record() for r in self.replicas.values() if r.version == v] for v in versions}, list(self.history.events),
        )

    def save(self) -> None:
        """The routing state, and the scrape targets: every change of replicas or routing passes here."""
        if self.gateway is not None:
            self.routing().save(self.state_path)
            self.write_targets()

    def write_targets(self) -> None:
        g = self.gateway
        stable = g.stable.version if g is not None else None
        canary = g.canary.version if g is not None and g.canary else None
        replicas = [(name, r.version, r.backend.base_url) for name, r in sorted(self.replicas.items())]
        write_targets(self.targets_path, scrape_targets(self.public_model, self.state_dir.name, self.gateway_address, replicas, stable, canary, self.gateway_scheme))

    # --- start: reconcile the state file, the running engines and the registry ---

    def start(self, champion: str | None) -> Gateway:
        """Build the routing from the state file and the registry's `champion` version."""
        with self.ops:
            state = RoutingState.load(self.state_path)
            if state is not None:
                self.history = History(state.history)
            plan, why = reconcile(state, champion, self.public_model)
            for what, detail in why:
                self.event(what, **detail)
            canary, weight, mirror = plan.canary, plan.weight, plan.mirror
            records = state.replicas if state else {}
            for version in [v for v in (plan.stable, plan.canary) if v is not None]:
                adopted = adopt(version, records.get(version, []))
                if adopted:
                    for r in adopted:
                        self.replicas[r.backend.name] = r
                    self.event("adopted", version=version, replicas=[r.backend.name for r in adopted])
                    continue
                count = self.params.serve.replicas if version == plan.stable else max(1, len(records.get(version, [])))
                try:
                    self.start_version(version, count)
                except ServerStartError as exc:
                    if version == plan.stable:
                        raise
                    self.event("canary_dropped", version=version, why=f"could not be restarted: {str(exc)[:300]}")
                    canary, weight, mirror = None, 0.0, False
                else:
                    self.event("started", version=version, replicas=count)
            stop_orphans(records, keep={plan.stable, canary})
            self.gateway = Gateway(self.version_backends(plan.stable), public_model=self.public_model, seed=None)
            if canary is not None:
                self.gateway.set_canary(self.version_backends(canary), weight)
                self.gateway.mirror = mirror
            self.save()
            return self.gateway

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
            self.engines.drills[version] = list(args or [])
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
        """Wait until the named replicas have no request in flight (or drain_timeout_s passes).
        They are out of rotation already: no new request reaches them."""
        g = self.require_gateway()
        deadline = time.monotonic() + self.params.serve.drain_timeout_s
        while g.outstanding(names) and time.monotonic() < deadline:
            time.sleep(0.05)
        return g.outstanding(names) == 0

    def promote(self) -> dict[str, Any]:
        """The canary becomes stable: scaled up to serve.replicas first (so the switch never
        leaves fewer engines than stable had), then all traffic moves to it; the old stable,
        out of rotation from that moment, finishes its requests in flight and stops."""
        g = self.require_gateway()
        with self.ops:
            if g.canary is None:
                raise PlaneError("no canary to promote")
            old_version, new_version = g.stable.version, g.canary.version
            have = len(self.version_backends(new_version))
            if have < self.params.serve.replicas:
                self.start_version(new_version, self.params.serve.replicas - have, first_index=have)
                g.set_canary_backends(self.version_backends(new_version))
                self.event("scaled", version=new_version, replicas=self.params.serve.replicas)
            g.promote_canary()
            old = [r.backend.name for r in self.replicas.values() if r.version == old_version]
            self.save()  # routing first: a crash from here on resumes with the new stable
            drained = self.drain(old)
            self.stop_version(old_version)
            self.event("promoted", version=new_version, previous=old_version, drained=drained)
            self.save()
        return self.state()

    def rollback(self) -> dict[str, Any]:
        g = self.require_gateway()
        with self.ops:
            if g.canary is None:
                raise PlaneError("no canary to roll back")
            version = g.canary.version
            names = [b.name for b in g.canary_backends]
            g.remove_canary()  # out of rotation now
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
        new = self.engines.start(replica.version, index, self._share())
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

    def stop_all(self) -> bool:
        """Every engine this plane runs is stopped; the state file keeps the routing. Returns
        whether there was anything to stop (it is called from several ways out)."""
        self.closing = True
        with self.ops:
            self.save()
            stopped = bool(self.replicas)
            for r in list(self.replicas.values()):
                r.process.stop()
            self.replicas.clear()
            write_targets(self.targets_path, [])  # nothing of this plane is left to scrape
        return stopped


def registry_uri() -> str:
    """The registry this plane serves from, as /admin/state shows it: without credentials (a
    tracking URI may hold a database or server password). Clients compare it with their own
    `registry_uri()`, redacted the same way."""
    from pipelines.redact import redact_url
    from registry.store import tracking_uri

    return redact_url(tracking_uri())


def champion_version(params: Params) -> str | None:
    from registry.models import CHAMPION, by_alias

    mv = by_alias(params.registry.model_name, CHAMPION)
    return None if mv is None else str(mv.version)
