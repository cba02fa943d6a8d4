"""The receiver without a plane (serving/alerts.py): what each alert does, the cooldown that
makes a flapping alert act once (across a restart too), and the exporter of the scheduled
checks' results. The alert path itself, through real Prometheus and Alertmanager into a real
plane, is tests/monitoring/test_alert_path.py."""

from __future__ import annotations

import datetime
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from pipelines.config import Params
from serving.alerts import Receiver, create_receiver_app, plan, write_check
from tests.tasks.webhook import Webhook


def alert(name: str, status: str = "firing", **labels: str) -> dict:
    """One alert as Alertmanager's webhook (version 4) carries it."""
    return {
        "status": status, "labels": {"alertname": name, "severity": "page", **labels},
        "annotations": {"summary": f"{name} summary", "description": "value 0.5"}, "startsAt": "2026-12-03T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": "abc",
    }


def webhook_body(*alerts: dict) -> dict:
    return {"version": "4", "groupKey": "{}:{alertname=\"x\"}", "status": "firing", "receiver": "lifecycle", "groupLabels": {}, "commonLabels": {}, "alerts": list(alerts)}


@pytest.mark.parametrize(("a", "action"), [
    (alert("ErrorBudgetBurn", role="canary", version="2"), "rollback"),
    (alert("LatencyBudgetBurn", role="canary", version="2"), "rollback"),
    (alert("TTFTBudgetBurn", role="canary", version="2"), "rollback"),
    (alert("CanaryWorseThanStable", role="canary", version="2"), "rollback"),
    (alert("ErrorBudgetBurn", role="stable", version="1"), "notify"),  # no previous version to fall back on here: a person decides
    (alert("OnlineQualityDrop", version="1"), "quality"),
    (alert("DriftDetected", check="length"), "drift"),
    (alert("EngineDown", replica="v1-r0"), "notify"),
    (alert("RecordRowsDropped", reason="buffer_full"), "notify"),  # requests were answered: nothing to roll back
    (alert("ErrorBudgetBurn", status="resolved", role="canary", version="2"), "resolved"),
])
def test_each_alert_has_its_action(a, action):
    assert plan(a) == action


def test_a_flapping_alert_notifies_once_within_the_cooldown_even_across_a_restart(tmp_path):
    """Seen red: with the cooldown check removed from Receiver.receive (`cooling` always
    False), the second firing was queued and acted on again: "assert ['queued'] == ['suppressed']"."""
    hook = Webhook()
    try:
        params = Params.model_validate({"notify": {"webhook_url": hook.url}, "monitor": {"cooldown_s": 600}})
        receiver = Receiver(params, tmp_path, plane_url=None)
        down = alert("EngineDown", replica="v1-r0", plane="plane", model="m")
        assert [d["outcome"] for d in receiver.receive(webhook_body(down))] == ["queued"]
        receiver.drain()
        assert [d["outcome"] for d in receiver.receive(webhook_body(down))] == ["suppressed"]
        other = alert("EngineDown", replica="v1-r1", plane="plane", model="m")  # another subject: acted on
        assert [d["outcome"] for d in receiver.receive(webhook_body(other))] == ["queued"]
        receiver.drain()
        receiver.close()
        restarted = Receiver(params, tmp_path, plane_url=None)
        assert [d["outcome"] for d in restarted.receive(webhook_body(down))] == ["suppressed"], "the cooldown is read back from the record"
        restarted.close()
        assert hook.events() == ["alert", "alert"]
        record = [json.loads(line) for line in (tmp_path / "actions.jsonl").read_text().splitlines()]
        assert [(r["labels"]["replica"], r["outcome"]) for r in record] == [("v1-r0", "notified"), ("v1-r0", "suppressed"), ("v1-r1", "notified"), ("v1-r0", "suppressed")]
        assert all(r["by"] == "alertmanager" and r["annotations"]["description"] == "value 0.5" for r in record)
    finally:
        hook.close()


def test_a_rollback_without_a_plane_to_act_on_is_recorded_as_skipped(tmp_path):
    params = Params.model_validate({"serve": {"plane_url": None}})
    receiver = Receiver(params, tmp_path)
    receiver.receive(webhook_body(alert("CanaryWorseThanStable", role="canary", version="2")))
    receiver.drain()
    receiver.close()
    (entry,) = receiver.entries()
    assert (entry["action"], entry["outcome"]) == ("rollback", "skipped") and "serve.plane_url is null" in entry["detail"]


def test_a_rollback_by_an_alert_is_an_audit_entry_by_alertmanager_with_the_alert_as_evidence(tmp_path, serve_app, monkeypatch):
    """The plane here is a fake with the admin API's real shapes (GET /admin/state, POST
    /admin/rollback); its registry is another one, so only the audit log and the record change."""
    from fastapi import FastAPI

    from registry.audit import AUDIT_ENV, AuditLog
    from tests.serving.redis_server import free_port

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    plane, rolled = FastAPI(), []

    @plane.get("/admin/state")
    def state() -> dict:
        return {"public_model": "reverse-digits", "canary": None if rolled else "7", "stable": "6", "registry_uri": "sqlite:///elsewhere.db"}

    @plane.post("/admin/rollback")
    def rollback() -> dict:
        rolled.append(True)
        return {"stable": "6", "canary": None}

    params = Params.model_validate({"registry": {"model_name": "reverse-digits"}})
    with serve_app(plane) as server:
        receiver = Receiver(params, tmp_path, prometheus_url=f"http://127.0.0.1:{free_port()}", plane_url=server.root_url)
        receiver.receive(webhook_body(alert("CanaryWorseThanStable", role="canary", version="7")))
        receiver.drain()
        receiver.close()
    assert rolled and receiver.entries()[-1]["outcome"] == "rolled_back"
    (entry,) = AuditLog().entries()
    assert (entry["action"], entry["who"], entry["version"], entry["detail"]["kind"]) == ("rollback", "alertmanager", "7", "alert")
    assert "CanaryWorseThanStable" in entry["evidence"] and "actions.jsonl" in entry["evidence"] and "value 0.5" in entry["reason"]


def gauges(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_exporter_serves_the_checks_latest_results_and_drops_stale_and_broken_ones(tmp_path, serve_app):
    """The file format the scheduled flows write (write_check), read at every scrape.
    Seen red: with read_checks not comparing `at` with check_max_age_s, the 2020 result was
    exported: lifecycle_online_quality_score{model="m",version="1"} 0.9 was in the scrape."""
    checks = tmp_path / "checks"
    now = datetime.datetime.now(datetime.UTC).isoformat()
    write_check({"kind": "online_quality", "model": "m", "version": "2", "score": 0.81, "at": now, "samples": 200}, checks)
    write_check({"kind": "online_quality", "model": "m", "version": "1", "score": 0.9, "at": "2020-01-01T00:00:00+00:00"}, checks)
    write_check({"kind": "drift", "model": "m", "check": "length", "score": 0.3, "threshold": 0.2, "at": now}, checks)
    (checks / "list.json").write_text(json.dumps([{"kind": "drift", "model": "m", "check": "script", "score": 0.01, "threshold": 0.1, "at": now}]))
    (checks / "broken.json").write_text('{"kind": "drift", "model": "m"}')
    with pytest.raises(ValidationError):
        write_check({"kind": "online_quality", "model": "m", "version": "2", "score": 1.5, "at": now}, checks)
    receiver = Receiver(Params(), tmp_path)
    with serve_app(create_receiver_app(receiver)) as server:
        got = gauges(httpx.get(f"{server.root_url}/metrics", trust_env=False).text)
    receiver.close()
    assert got[("lifecycle_online_quality_score", frozenset({"model": "m", "version": "2"}.items()))] == 0.81
    assert ("lifecycle_online_quality_score", frozenset({"model": "m", "version": "1"}.items())) not in got
    assert got[("lifecycle_drift_score", frozenset({"model": "m", "check": "length"}.items()))] == 0.3
    assert got[("lifecycle_drift_threshold", frozenset({"model": "m", "check": "script"}.items()))] == 0.1
    assert got[("lifecycle_check_unreadable_files", frozenset())] == 1
