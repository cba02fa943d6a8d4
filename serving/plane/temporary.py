"""A plane for one release, when none is running: the same `Plane` and app as `make serve`,
served from this process on a free loopback port, stopped (engines included) when the release
is over. The release then goes into it through the admin API exactly as into a running plane.

Its state lives in `.serving/release-plane/` (releases of one project run one at a time: the
flows hold the project's slot). Engine logs stay there until the next release; the model copies
go with the plane. A release that crashed without stopping its plane left engines running: the
next one stops them (from the state file) before it starts its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType

from pipelines.config import Params
from serving import auth
from serving.background import ThreadedServer
from serving.plane.adoption import stop_orphans
from serving.plane.app import create_plane_app
from serving.plane.operations import Plane
from serving.plane.state import PlaneError, RoutingState
from serving.plane_client import PlaneClient

STATE_DIR = Path(".serving/release-plane")


class TemporaryPlane:
    """`with TemporaryPlane(params, version) as plane:` a PlaneClient for a plane serving
    `version` as stable. `side_by_side`: the engines that will share the cores (stable's
    replicas and the candidate's); `drill`: engine flags for the stable version (a first
    release serves its candidate as stable). Entering raises what starting the engines raised
    (ServerStartError, or the download's error), with nothing left running."""

    def __init__(self, params: Params, version: str, side_by_side: int | None = None, drill: list[str] | None = None, state_dir: Path = STATE_DIR) -> None:
        self.params, self.version, self.side_by_side, self.drill = params, str(version), side_by_side, list(drill or [])
        self.state_dir = Path(state_dir)
        self.plane: Plane | None = None
        self.server: ThreadedServer | None = None
        self.client: PlaneClient | None = None

    def _clear(self) -> None:
        """A previous release's plane that was never stopped: its engines go, then its state."""
        try:
            state = RoutingState.load(self.state_dir / "state.json")
        except PlaneError:
            state = None
        if state is not None:
            stop_orphans(state.replicas, keep=set())
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> PlaneClient:
        from serving.gateway import ADMIN_KEY_ENV, API_KEY_ENV

        self._clear()
        plane = self.plane = Plane(self.params, self.state_dir, side_by_side=self.side_by_side)
        plane.engines.drills[self.version] = self.drill
        try:
            plane.start(self.version)
            app = create_plane_app(plane, api_key=auth.env_key(API_KEY_ENV) or auth.backend_key(), admin_key=auth.env_key(ADMIN_KEY_ENV))
            self.server = ThreadedServer(app, host="127.0.0.1", startup_timeout_s=self.params.serve.startup_timeout_s).__enter__()
            plane.gateway_address = self.server.root_url.split("://", 1)[1]
            plane.save()  # the scrape targets now name the gateway too
        except BaseException:
            self._close()
            raise
        self.client = PlaneClient(self.server.root_url)
        return self.client

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.__exit__(None, None, None)  # the lifespan stops the engines
        if self.plane is not None:
            self.plane.stop_all()  # all of them, however far the start got
        shutil.rmtree(self.state_dir / "models", ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close()
