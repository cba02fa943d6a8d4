"""Every admin route, of the gateway and of the serving plane, asks for the `admin` scope: a
keys-file key without it gets 403 in OpenAI's error shape (from loopback too: the caller named
itself), and the attempt is an entry of the audit log (registry/audit.py) naming the key's id.
The routes are enumerated from the apps themselves, so a route added later is covered."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from registry.access_cli import main as lifecycle
from registry.audit import AuditLog
from serving.gateway import FrontDoor, create_gateway
from serving.keys import KeyRing
from serving.plane import Plane, create_plane_app
from serving.routing import Backend, Gateway
from tests.conftest import tiny_params
from pipelines.config import ServeParams


@pytest.fixture
def keys(tmp_path, capsys):
    """(keys file, an inference+feedback key, an admin key)."""
    path = tmp_path / "keys.yaml"
    made = []
    for scopes in ("inference,feedback,read-metrics", "admin"):
        assert lifecycle(["keys", "create", "--file", str(path), "--scopes", scopes, "--log", str(tmp_path / "keys-audit.jsonl")]) == 0
        made.append(re.search(r"\(shown once, not stored\): (\S+)", capsys.readouterr().out).group(1))
    return path, made[0], made[1]


def admin_routes(app) -> list[tuple[str, str]]:
    return sorted((method, r.path) for r in app.routes if getattr(r, "path", "").startswith("/admin") for method in r.methods - {"HEAD"})


def refused_everywhere(app, key: str, audit: AuditLog) -> list[tuple[str, str]]:
    routes = admin_routes(app)
    client = TestClient(app)
    for method, path in routes:
        r = client.request(method, path, json={}, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 403, (method, path, r.text)
        error = r.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "forbidden" and "'admin' scope" in error["message"], error
    return routes


def assert_audited(audit: AuditLog, routes: list[tuple[str, str]], who: str) -> None:
    refused = [(e["detail"]["method"], e["detail"]["route"]) for e in audit.entries() if e["action"] == "admin_call" and e["detail"]["outcome"] == "refused"]
    assert sorted(refused) == routes
    assert all(e["who"] == who and e["detail"]["status"] == 403 and "'admin' scope" in e["reason"] for e in audit.entries())
    assert audit.verify().ok


def test_a_key_without_the_admin_scope_gets_403_on_every_gateway_admin_route_and_each_attempt_is_audited(keys, tmp_path):
    """Seen red: require_admin without its `allows("admin")` check -> GET /admin/backends
    answered 200 to the inference key."""
    path, user, admin = keys
    audit = AuditLog(tmp_path / "audit.jsonl")
    app = create_gateway(Backend("stable", "http://127.0.0.1:9", "m", version="1"), public_model="m", front=FrontDoor(keys=KeyRing(path)), audit=audit)
    routes = refused_everywhere(app, user, audit)
    assert routes == [("GET", "/admin/backends"), ("POST", "/admin/weight")]
    assert_audited(audit, routes, f"key {KeyRing(path).lookup('Bearer ' + user)[1].id}")

    allowed = TestClient(app).post("/admin/weight", json={"weight": 0.5}, headers={"authorization": f"Bearer {admin}"})
    assert allowed.status_code == 409, "the admin key gets through to the route (which has no canary to weigh)"
    last = list(audit.entries())[-1]
    assert (last["detail"]["outcome"], last["detail"]["status"], last["who"]) == ("answered", 409, f"key {KeyRing(path).lookup('Bearer ' + admin)[1].id}")
    before = len(list(audit.entries()))
    assert TestClient(app).get("/admin/backends", headers={"authorization": f"Bearer {admin}"}).status_code == 200
    assert len(list(audit.entries())) == before, "an allowed read is not logged (the release polls them)"


def test_a_key_without_the_admin_scope_gets_403_on_every_plane_admin_route_and_each_attempt_is_audited(keys, tmp_path):
    """Seen red: the plane's /admin/promote route without require_admin -> 409 (it reached the
    plane, which had no canary) instead of 403."""
    path, user, _ = keys
    audit = AuditLog(tmp_path / "audit.jsonl")
    plane = Plane(tiny_params(serve=ServeParams(keys_file=str(path))), tmp_path / "plane", resolve=lambda version: tmp_path)
    plane.gateway = Gateway(Backend("v1-r0", "http://127.0.0.1:9", "m", version="1"))  # no engine: a refusal never reaches one
    app = create_plane_app(plane, supervise=False, audit=audit)
    routes = refused_everywhere(app, user, audit)
    assert {p for _, p in routes} >= {"/admin/state", "/admin/traffic-key", "/admin/canary", "/admin/weight", "/admin/promote", "/admin/rollback", "/admin/drain", "/admin/mirror", "/admin/window"}
    assert_audited(audit, routes, f"key {KeyRing(path).lookup('Bearer ' + user)[1].id}")
