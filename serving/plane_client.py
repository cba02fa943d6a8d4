"""The plane's admin API from another process: what the release task and `registry.cli` use.

`discover(params)` finds a running plane that serves this project's registry (the plane reports
its MLflow tracking URI, so a test's or another checkout's release never lands in someone
else's plane); a release without one starts its own (`serving.plane.temporary`). `RemoteGateway` gives the release controller (`serving.rollout`) the same methods
as the in-process `Gateway`, over HTTP, so one controller drives both.
"""

from __future__ import annotations

from typing import Any

import httpx

from serving import auth
from serving.routing import Backend


class PlaneAPIError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the plane answered {status}: {message}")
        self.status, self.message = status, message


class PlaneClient:
    def __init__(self, root_url: str, admin_key: str | None = None, timeout_s: float = 600) -> None:
        from serving.tls import verify_for

        self.root_url = root_url.rstrip("/").removesuffix("/v1")
        headers = auth.bearer_headers(admin_key if admin_key is not None else auth.env_key(auth.ADMIN_KEY_ENV))
        # Long timeout: attaching a canary starts its engines, promotion waits for a drain. An
        # https plane is verified as plane_root() said (serving/tls.py), else by the system's CAs.
        self.http = httpx.Client(base_url=self.root_url, headers=headers, timeout=timeout_s, trust_env=False, verify=verify_for(self.root_url))

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.http.request(method, path, json=body)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            raise PlaneAPIError(r.status_code, message)
        return r.json()

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/admin/state")

    def canary_requests(self) -> int:
        """The canary's requests in the current statistics window (no statistics computed)."""
        return int(self._call("GET", "/admin/canary-requests")["canary_window_requests"])

    def traffic_key(self) -> str:
        """The key the release's synthetic users send: the plane's gateway accepts it whatever
        keys it requires of clients."""
        return self._call("GET", "/admin/traffic-key")["key"]

    def attach_canary(self, version: str, weight: float = 0.0, args: list[str] | None = None) -> dict[str, Any]:
        return self._call("POST", "/admin/canary", {"version": str(version), "weight": weight, "args": args or []})

    def set_weight(self, weight: float) -> dict[str, Any]:
        return self._call("POST", "/admin/weight", {"weight": weight})

    def set_mirror(self, enabled: bool) -> dict[str, Any]:
        return self._call("POST", "/admin/mirror", {"enabled": enabled})

    def window(self) -> dict[str, Any]:
        return self._call("POST", "/admin/window")

    def promote(self) -> dict[str, Any]:
        return self._call("POST", "/admin/promote")

    def rollback(self) -> dict[str, Any]:
        return self._call("POST", "/admin/rollback")

    def drain(self, replica: str) -> dict[str, Any]:
        return self._call("POST", "/admin/drain", {"replica": replica})

    def close(self) -> None:
        self.http.close()


def plane_root(params) -> str | None:
    """Where this config's releases look for a plane (None: never). A plane serving TLS
    (serve.tls_certfile) is https, and this process verifies it against serve.tls_ca_file, else
    the certificate itself, from here on (serving/tls.py)."""
    serve = params.serve
    url = serve.plane_url
    if not url:
        return None
    if url == "auto":
        from serving.netaddr import local_address

        url = f"{'https' if serve.tls_certfile else 'http'}://{local_address(serve.host)}:{serve.port}"
    if serve.tls_certfile and url.startswith("https://"):
        from serving.tls import trust, trusted_ca

        trust(url, trusted_ca(serve))
    return url


def discover(params) -> PlaneClient | None:
    """A running plane for this project's registry and model, else None."""
    from serving.plane.operations import registry_uri

    root = plane_root(params)
    if root is None:
        return None
    plane = PlaneClient(root)
    try:
        state = plane.state()
    except (httpx.HTTPError, PlaneAPIError, ValueError):
        plane.close()
        return None
    if state.get("registry_uri") != registry_uri() or state.get("public_model") != params.registry.model_name:
        plane.close()
        return None
    return plane


def backends_of(state: dict[str, Any], role: str) -> list[Backend]:
    """The replicas of the stable or canary version, from /admin/state."""
    version = state.get(role)
    if version is None:
        return []
    return [Backend(r["name"], r["url"], r["model"], api_key=auth.backend_key(), version=version) for r in state["replicas"].get(version, [])]


class RemoteGateway:
    """The in-process `Gateway`'s controller methods, on a running plane."""

    def __init__(self, plane: PlaneClient) -> None:
        self.plane = plane
        self._state = plane.state()
        self.public_model = self._state["public_model"]

    def refresh(self) -> dict[str, Any]:
        self._state = self.plane.state()
        return self._state

    @property
    def stable(self) -> Backend:
        return backends_of(self._state, "stable")[0]

    @property
    def canary(self) -> Backend | None:
        found = backends_of(self.refresh(), "canary")
        return found[0] if found else None

    @property
    def stable_backends(self) -> list[Backend]:
        return backends_of(self.refresh(), "stable")

    @property
    def canary_backends(self) -> list[Backend]:
        return backends_of(self.refresh(), "canary")

    @property
    def weight(self) -> float:
        return self.refresh()["weight"]

    def set_canary(self, backend: Backend | list[Backend], weight: float = 0.0) -> None:
        """The plane attached the canary already (it starts the engines): set its weight."""
        self.set_weight(weight)

    def set_weight(self, weight: float) -> None:
        self.plane.set_weight(weight)  # the gateway's route: it answers with the weight alone
        self.refresh()

    def set_mirror(self, on: bool) -> None:
        self.plane.set_mirror(on)
        self.refresh()

    def window(self) -> dict[str, Any]:
        return self.plane.window()

    def canary_requests(self) -> int:
        return self.plane.canary_requests()

    def remove_canary(self) -> Backend | None:
        canary = self.canary
        self._state = self.plane.rollback()
        return canary
