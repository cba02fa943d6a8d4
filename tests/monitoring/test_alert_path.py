"""The watching half, end to end (make serve + make monitor, real Prometheus and Alertmanager):
a failing canary rolled back by the alert path while clients lose nothing, a restarted replica
scraped again without a reload, every dashboard panel answered after traffic, and a quality drop
and drift turned into Prefect events and webhook notifications."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time

import httpx

from monitoring.panels import dashboards, panel_data, render_all
from registry.store import client
from serving.alerts import write_check
from serving.plane_client import PlaneClient
from tests.monitoring.conftest import NAME, Clients
from tests.serving.conftest import wait_until


def test_prometheus_scrapes_the_gateway_and_every_engine_from_the_planes_target_file(served):
    v1 = served.versions[0]
    targets = json.loads((served.workdir / ".serving/plane/targets.json").read_text())
    assert {g["labels"]["job"] for g in targets} == {"gateway", "engine"}
    wait_until(lambda: served.query('up{job="gateway"} == 1') and served.query(f'up{{job="engine",version="{v1}",role="stable"}} == 1'), "the gateway and the engine scraped", 120)
    (engine,) = served.query('up{job="engine"}')
    assert engine["metric"]["replica"] == f"v{v1}-r0" and engine["metric"]["model"] == NAME


def test_a_failing_canary_is_rolled_back_by_the_alert_path_and_the_clients_lose_nothing(served):
    """Prometheus sees the canary's failures, ErrorBudgetBurn / CanaryWorseThanStable fire,
    Alertmanager sends them to the receiver, which rolls the canary back through the admin API
    and marks the version in the registry. The gateway retries every canary failure on stable.
    Seen red: with the receiver's plan() no longer sending burns and CanaryWorseThanStable to
    "rollback" (they fell through to "notify"), "timed out waiting until the alert path rolled the
    canary back" while both alerts kept firing."""
    v1, v2 = served.versions
    admin = PlaneClient(served.plane_url)
    with Clients(served.plane_url) as clients:
        attached = admin.attach_canary(v2, 0.5, ["--fault-error-rate", "1.0"])  # every generation request it gets: 500
        attached_at = time.time()
        assert attached["canary"] == v2
        wait_until(lambda: served.state()["canary"] is None, "the alert path rolled the canary back", 300)
        detected_at = time.time()
        wait_until(lambda: any(a.get("outcome") == "rolled_back" for a in served.actions()), "the receiver recorded its rollback", 60)
        time.sleep(2)  # answers after the rollback: stable alone
    admin.close()

    (done,) = [a for a in served.actions() if a.get("outcome") == "rolled_back"]
    assert done["version"] == v2 and done["by"] == "alertmanager" and done["alert"] in ("ErrorBudgetBurn", "CanaryWorseThanStable")
    assert done["labels"]["role"] == "canary" and done["annotations"]["summary"], "why: the alert and its values"
    first = datetime.datetime.fromisoformat(done["first_failure_seen_at"]).timestamp()
    assert attached_at - 60 < first <= datetime.datetime.fromisoformat(done["rolled_back_at"]).timestamp()
    print(
        f"\nfirst failure seen by Prometheus -> rollback: {done['seconds_from_first_failure']:.1f} s "
        f"(canary attached -> rollback seen by the test: {detected_at - attached_at:.1f} s; alert {done['alert']})"
    )
    assert clients.failed() == [], f"{len(clients.failed())} of {len(clients.answers)} requests failed: {clients.failed()[:3]}"
    assert {a[3] for a in clients.answers} == {v1}, "every answer came from stable: the canary's failures were retried there"

    tags = client().get_model_version(NAME, v2).tags
    assert tags["status"] == "rolled_back" and tags["status.reason"].startswith("rolled back by alertmanager: alert "), tags
    assert tags["rolled_back_by"] == "alertmanager"
    assert "rolled_back" in served.webhook.events()
    assert [e["event"] for e in served.state()["history"]][-2:] == ["canary_attached", "rolled_back"]

    # A flapping alert acts once: the same alert again (as Alertmanager sends it when it fires
    # anew) is recorded as suppressed within the cooldown, and nothing is rolled back twice.
    again = {"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": done["labels"], "annotations": done["annotations"], "startsAt": done["starts_at"]}]}
    decided = httpx.post(f"{served.receiver_url}/alerts", json=again, timeout=10, trust_env=False).json()["decided"]
    assert [d["outcome"] for d in decided] == ["suppressed"]
    assert len([a for a in served.actions() if a.get("outcome") == "rolled_back"]) == 1


def test_a_replica_killed_and_restarted_by_the_supervisor_is_scraped_again_without_a_reload(served):
    """Seen red: with Plane.restart_replica no longer calling save() (the targets file kept the
    dead port), "timed out waiting until Prometheus scraping the new replica at 127.0.0.1:57397"."""
    v1 = served.versions[0]
    reloads = served.query("prometheus_config_last_reload_success_timestamp_seconds")[0]["value"][1]
    before = served.state()["replicas"][v1][0]
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: served.state()["replicas"][v1][0]["restarts"] > before["restarts"], "the supervisor restarted the engine", 300)
    after = served.state()["replicas"][v1][0]
    address = after["url"].split("://", 1)[1]
    assert address != before["url"].split("://", 1)[1], "a restarted engine listens on a new port"
    wait_until(lambda: served.query(f'up{{job="engine",replica="v{v1}-r0",instance="{address}"}} == 1'), f"Prometheus scraping the new replica at {address}", 120)
    old = f'up{{job="engine",instance="{before["url"].split("://", 1)[1]}"}}'
    wait_until(lambda: not served.query(old), "the dead target gone with the file's rewrite (Prometheus marks its series stale)", 60)
    assert served.query("prometheus_config_last_reload_success_timestamp_seconds")[0]["value"][1] == reloads, "no reload"


def test_a_quality_drop_and_drift_emit_prefect_events_and_notify_through_the_webhook(served):
    """The checks' files (written as the scheduled flows will) -> the receiver's exporter ->
    OnlineQualityDrop and DriftDetected -> Alertmanager -> the receiver: a Prefect event on the
    model's resource and a webhook notification each.
    Seen red: with ChecksCollector no longer adding the quality gauges, OnlineQualityDrop never
    fired: "timed out waiting until the receiver acting on the quality drop and the drift"."""
    v1 = served.versions[0]
    checks = served.workdir / ".serving/monitoring/checks"
    now = datetime.datetime.now(datetime.UTC).isoformat()
    write_check({"kind": "online_quality", "model": NAME, "version": v1, "score": 0.3, "at": now}, checks)
    write_check({"kind": "online_quality", "model": NAME, "version": "old", "score": 0.9, "at": "2020-01-01T00:00:00+00:00"}, checks)  # stale: not exported
    write_check({"kind": "drift", "model": NAME, "check": "length", "score": 0.42, "threshold": 0.2, "at": now}, checks)
    write_check({"kind": "drift", "model": NAME, "check": "vocabulary", "score": 0.05, "threshold": 0.2, "at": now}, checks)
    (checks / "broken.json").write_text("{not json")

    def acted(alert: str) -> list[dict]:
        return [a for a in served.actions() if a.get("alert") == alert and a.get("outcome") in ("emitted", "not_emitted")]

    wait_until(lambda: acted("OnlineQualityDrop") and acted("DriftDetected"), "the receiver acting on the quality drop and the drift", 180)
    (quality,), (drift,) = acted("OnlineQualityDrop"), acted("DriftDetected")
    assert quality["outcome"] == "emitted" and quality["event"] == "lifecycle.quality.dropped", quality
    assert drift["outcome"] == "emitted" and drift["labels"]["check"] == "length", drift
    assert served.query("lifecycle_check_unreadable_files")[0]["value"][1] == "1"
    assert not served.query('lifecycle_online_quality_score{version="old"}'), "a stale result is not exported"
    assert not [a for a in served.actions() if a.get("labels", {}).get("check") == "vocabulary"], "a check under its threshold stays quiet"

    def events() -> list[dict]:
        body = {"filter": {"event": {"prefix": ["lifecycle."]}, "any_resource": {"id": [f"lifecycle.model.{NAME}"]}}, "limit": 50}
        return httpx.post(f"{served.prefect_api}/events/filter", json=body, timeout=10, trust_env=False).json().get("events", [])

    wait_until(lambda: {"lifecycle.quality.dropped", "lifecycle.drift.detected"} <= {e["event"] for e in events()}, "both events on the Prefect server", 60)
    found = {e["event"]: e for e in events()}
    assert found["lifecycle.quality.dropped"]["payload"]["labels"]["version"] == v1
    assert found["lifecycle.drift.detected"]["resource"]["prefect.resource.id"] == f"lifecycle.model.{NAME}"
    assert {"quality_dropped", "drift_detected"} <= set(served.webhook.events())


def test_every_dashboard_panel_has_data_after_traffic_and_renders_to_png(served, tmp_path):
    """Grafana is not installed here: each panel's PromQL is asked of the running Prometheus
    over the module's traffic, and every query must return data. The same views are rendered
    to PNG (what a flow attaches to its run).
    Seen red: with Gateway.record_tokens returning at once (the tokens counter never fed), "panels
    without data: cost / Tokens/s by key tier: tier:gateway_tokens:rate5m, cost / Tokens in the
    last hour by key tier: ..."."""
    now = datetime.datetime.now(datetime.UTC).isoformat()
    checks = served.workdir / ".serving/monitoring/checks"  # the scheduled checks' latest results, as the flows will write them
    write_check({"kind": "online_quality", "model": NAME, "version": served.versions[0], "score": 0.3, "at": now}, checks)
    write_check({"kind": "drift", "model": NAME, "check": "length", "score": 0.42, "threshold": 0.2, "at": now}, checks)
    with Clients(served.plane_url, 4):
        time.sleep(8)  # the 5-minute rates now hold the module's traffic, streams and cache hits included
    empty = []
    boards = dashboards()
    assert set(boards) == {"service", "canary", "cost", "quality", "drift"}
    for name, board in boards.items():
        for panel in panel_data(served.prometheus_url, board, minutes=15):
            empty += [f"{name} / {panel['title']}: {t['expr']}" for t in panel["targets"] if not t["series"]]
    assert empty == [], "panels without data:\n  " + "\n  ".join(empty)
    pngs = render_all(served.prometheus_url, tmp_path, minutes=15)
    assert sorted(p.stem for p in pngs) == sorted(boards) and all(p.stat().st_size > 10_000 for p in pngs)


def test_a_flow_attaches_the_dashboards_to_its_mlflow_run_and_its_prefect_run_page(served, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from monitoring.panels import publish_dashboards
    from registry.store import experiment_id

    run_id = client().create_run(experiment_id("test")).info.run_id

    @flow
    def after_a_release() -> list[str]:
        return [p.name for p in publish_dashboards(served.prometheus_url, run_id, tmp_path, minutes=15)]

    assert sorted(after_a_release()) == ["canary.png", "cost.png", "drift.png", "quality.png", "service.png"]
    assert sorted(a.path for a in client().list_artifacts(run_id, "monitoring")) == [f"monitoring/{n}.png" for n in ("canary", "cost", "drift", "quality", "service")]
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["monitoring"])), limit=1)
    assert artifact.data.count("data:image/png;base64,") == 5
