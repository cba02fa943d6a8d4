"""The receiver: Alertmanager's webhook turned into actions, and the scheduled checks' gauges.

Alertmanager (monitoring/alertmanager.yml) sends every alert group here. What each alert does
is the pure `plan(alert)`:

  a burn (ErrorBudgetBurn, LatencyBudgetBurn, TTFTBudgetBurn) on a version whose role is canary,
  or CanaryWorseThanStable       -> roll the canary back through the plane's admin API
                                    (serving/plane_client.py), if that version is still the
                                    plane's canary; the registry marks it rolled_back with the
                                    alert and its values as the reason, as a rollback by hand
                                    is marked; the webhook hears `rolled_back`
  OnlineQualityDrop              -> Prefect event lifecycle.quality.dropped + webhook
  DriftDetected                  -> Prefect event lifecycle.drift.detected + webhook
  anything else (a stable burn, EngineDown, GatewayDown, QueueSaturated, RecordRowsDropped)
                                 -> webhook (`alert`)

A flapping alert acts once: an action on the same subject (alert, plane, model, version or
check) within `monitor.cooldown_s` is recorded as suppressed and not done again; the cooldown
survives a restart of the receiver (it is read back from the record). Actions run one at a time
on a worker thread, so the webhook answers at once and a rollback's drain never holds
Alertmanager.

Every alert received and every action is a JSON line in `.serving/monitoring/actions.jsonl`
(who: alertmanager; why: the alert's name, labels, annotations with its values, when it
started; what was done and its outcome; for a rollback, the time since the version's first
failure as Prometheus saw it). GET /actions returns the latest.

The exporter (GET /metrics): the scheduled checks (online quality, drift: flows/watch.py)
write their latest results as JSON files in `.serving/monitoring/checks/` (format:
`QualityCheck`, `DriftCheck` below; `write_check` writes one atomically), and every scrape reads
them into the gauges the alert rules read:

  lifecycle_online_quality_score{model, version}   0..1, higher is better
  lifecycle_drift_score{model, check}               the check's statistic
  lifecycle_drift_threshold{model, check}           above it, the check has drifted
  lifecycle_check_timestamp_seconds{model, kind, subject}   when the result was computed
  lifecycle_check_unreadable_files                  files in checks/ that are not a valid result

A result older than `monitor.check_max_age_s` is not exported: a check that stopped running must
not hold an alert forever.

    python -m serving.alerts [--params params.yaml]    # the receiver alone (make monitor runs it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipelines.config import Params
from serving.plane_client import PlaneAPIError, PlaneClient, plane_root

log = logging.getLogger("serving.alerts")
MONITOR_DIR = Path(".serving/monitoring")
BURNS = frozenset({"ErrorBudgetBurn", "LatencyBudgetBurn", "TTFTBudgetBurn"})
BY = "alertmanager"
Action = Literal["rollback", "quality", "drift", "notify", "resolved"]


# --- what an alert does (pure) -------------------------------------------------------------------


def plan(alert: dict[str, Any]) -> Action:
    """What the receiver does about one alert of Alertmanager's webhook."""
    labels = alert.get("labels", {})
    name = labels.get("alertname", "")
    if alert.get("status") == "resolved":
        return "resolved"
    if name == "CanaryWorseThanStable" or (name in BURNS and labels.get("role") == "canary"):
        return "rollback"
    if name == "OnlineQualityDrop":
        return "quality"
    if name == "DriftDetected":
        return "drift"
    return "notify"


def subject(alert: dict[str, Any]) -> str:
    """What a cooldown is kept for: the alert and what it is about. A rollback's subject is the
    version, whichever alert asked for it first (a burn and CanaryWorseThanStable together roll
    back once)."""
    labels = alert.get("labels", {})
    action = plan(alert)
    about = [labels.get(k, "") for k in ("plane", "model", "version", "check", "replica")]
    head = "rollback" if action == "rollback" else labels.get("alertname", "")
    return "|".join([head, *about])


def reason(alert: dict[str, Any]) -> str:
    labels, notes = alert.get("labels", {}), alert.get("annotations", {})
    said = "; ".join(v for v in (notes.get("summary"), notes.get("description")) if v)
    return f"alert {labels.get('alertname')} ({labels.get('severity', '?')}) since {alert.get('startsAt', '?')}: {said}"


# --- the checks' results (the exporter's input) ----------------------------------------------------


class QualityCheck(BaseModel):
    """The online-quality check's latest score for one model version."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["online_quality"]
    model: str
    version: str
    score: float = Field(ge=0, le=1, description="0..1, higher is better")
    at: datetime.datetime = Field(description="when the score was computed (ISO 8601, with a time zone)")


class DriftCheck(BaseModel):
    """One drift check's latest statistic for one model (length, script, vocabulary, domain...)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["drift"]
    model: str
    check: str
    score: float
    threshold: float
    at: datetime.datetime


CheckResult = TypeAdapter(list[QualityCheck | DriftCheck])


def write_check(result: dict[str, Any], checks_dir: Path = MONITOR_DIR / "checks") -> Path:
    """Write one check's latest result where the exporter reads it (atomically: a scrape never
    reads half a file). One file per subject: `<kind>-<model>-<version or check>.json`."""
    parsed = CheckResult.validate_python([result])[0]
    name = f"{parsed.kind}-{parsed.model}-{getattr(parsed, 'version', None) or getattr(parsed, 'check')}.json"
    checks_dir.mkdir(parents=True, exist_ok=True)
    path = checks_dir / name.replace("/", "_")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(parsed.model_dump_json())
    os.replace(tmp, path)
    return path


def read_checks(checks_dir: Path, max_age_s: float) -> tuple[list[QualityCheck | DriftCheck], list[str]]:
    """The fresh results in `checks_dir` (each file: one result or a list), and the files that
    could not be read, each with why."""
    results, bad = [], []
    now = datetime.datetime.now(datetime.UTC)
    for path in sorted(checks_dir.glob("*.json")) if checks_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            found = CheckResult.validate_python(data if isinstance(data, list) else [data])
        except (OSError, ValueError, ValidationError) as exc:
            bad.append(f"{path.name}: {str(exc).splitlines()[0][:200]}")
            continue
        for r in found:
            at = r.at if r.at.tzinfo else r.at.replace(tzinfo=datetime.UTC)
            if (now - at).total_seconds() <= max_age_s:
                results.append(r)
    return results, bad


class ChecksCollector:
    """prometheus_client collector: the checks' files, read at every scrape."""

    def __init__(self, checks_dir: Path, max_age_s: float) -> None:
        self.checks_dir, self.max_age_s = checks_dir, max_age_s

    def collect(self):
        results, bad = read_checks(self.checks_dir, self.max_age_s)
        quality = GaugeMetricFamily("lifecycle_online_quality_score", "Online quality of a model version (0..1, higher is better), from the scheduled online-quality check.", labels=["model", "version"])
        drift = GaugeMetricFamily("lifecycle_drift_score", "A drift check's statistic on live prompts, from the scheduled drift check.", labels=["model", "check"])
        threshold = GaugeMetricFamily("lifecycle_drift_threshold", "The drift check's threshold: above it, the prompts drifted.", labels=["model", "check"])
        stamp = GaugeMetricFamily("lifecycle_check_timestamp_seconds", "When a check's exported result was computed.", labels=["model", "kind", "subject"])
        for r in results:
            if isinstance(r, QualityCheck):
                quality.add_metric([r.model, r.version], r.score)
                stamp.add_metric([r.model, r.kind, r.version], r.at.timestamp())
            else:
                drift.add_metric([r.model, r.check], r.score)
                threshold.add_metric([r.model, r.check], r.threshold)
                stamp.add_metric([r.model, r.kind, r.check], r.at.timestamp())
        unreadable = GaugeMetricFamily("lifecycle_check_unreadable_files", "Files in the checks folder that are not a valid check result (named in the receiver's log).")
        unreadable.add_metric([], len(bad))
        for line in bad:
            log.warning("unreadable check result %s", line)
        yield from (quality, drift, threshold, stamp, unreadable)


# --- acting ---------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class Receiver:
    """Acts on alerts for one project (its params: plane, registry, webhook, cooldown)."""

    def __init__(self, params: Params, monitor_dir: Path = MONITOR_DIR, prometheus_url: str | None = None, plane_url: str | None = None) -> None:
        self.params = params
        self.monitor_dir = Path(monitor_dir)
        self.record_path = self.monitor_dir / "actions.jsonl"
        self.prometheus_url = prometheus_url or f"http://127.0.0.1:{params.monitor.prometheus_port}"
        self.plane_url = plane_url or plane_root(params)
        self._lock = threading.Lock()
        self._acted: dict[str, float] = self._acted_before()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="alert-action")  # one action at a time

    # --- the record ---

    def _acted_before(self) -> dict[str, float]:
        """When each subject was last acted on, from the record (a restart keeps the cooldown)."""
        acted: dict[str, float] = {}
        for entry in self.entries():
            if entry.get("outcome") not in (None, "suppressed", "failed", "recorded") and entry.get("subject") and entry.get("acted_at_unix"):
                acted[entry["subject"]] = max(acted.get(entry["subject"], 0.0), float(entry["acted_at_unix"]))
        return acted

    def entries(self, last: int | None = None) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text().splitlines()
        out = []
        for line in lines[-last:] if last else lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash; the rest stands
        return out

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"at": now_iso(), "by": BY, **entry}
        self.monitor_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, self.record_path.open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        log.info("alert action: %s", json.dumps(entry, default=str)[:1000])
        return entry

    # --- the webhook ---

    def receive(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Alertmanager's webhook body: each alert planned now, its action queued (or recorded as
        suppressed within the cooldown). Returns what was decided, per alert."""
        decided = []
        for alert in payload.get("alerts", []):
            action, key = plan(alert), subject(alert)
            base = {"alert": alert.get("labels", {}).get("alertname"), "status": alert.get("status"), "labels": alert.get("labels", {}),
                    "annotations": alert.get("annotations", {}), "starts_at": alert.get("startsAt"), "action": action, "subject": key}
            if action == "resolved":
                decided.append(self.record({**base, "outcome": "recorded"}))
                continue
            with self._lock:
                last = self._acted.get(key)
                cooling = last is not None and time.time() - last < self.params.monitor.cooldown_s
                if not cooling:
                    self._acted[key] = time.time()
            if cooling:
                decided.append(self.record({**base, "outcome": "suppressed", "detail": f"acted on {key} {time.time() - last:.0f}s ago (monitor.cooldown_s {self.params.monitor.cooldown_s:g})"}))
                continue
            decided.append({**base, "outcome": "queued"})
            self._worker.submit(self._act, alert, base)
        return decided

    def _act(self, alert: dict[str, Any], base: dict[str, Any]) -> None:
        acted_at = time.time()
        try:
            result = getattr(self, f"_{base['action']}")(alert)
        except Exception as exc:  # an action that fails is recorded; the receiver goes on
            log.exception("alert action %s failed", base["action"])
            result = {"outcome": "failed", "detail": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if result.get("outcome") == "failed":  # nothing was done: the next firing may try again
            with self._lock:
                self._acted.pop(base["subject"], None)
        self.record({**base, **result, "acted_at_unix": acted_at})

    def drain(self, timeout_s: float = 120) -> None:
        """Wait for the queued actions (tests and shutdown)."""
        self._worker.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # --- the actions ---

    def _rollback(self, alert: dict[str, Any]) -> dict[str, Any]:
        labels = alert.get("labels", {})
        version, model = labels.get("version"), self.params.registry.model_name
        if not self.plane_url:
            return {"outcome": "skipped", "detail": "no plane to act on (serve.plane_url is null)"}
        plane = PlaneClient(self.plane_url)
        try:
            state = plane.state()
            if state.get("public_model") != model:
                return {"outcome": "skipped", "detail": f"the plane at {self.plane_url} serves '{state.get('public_model')}', not '{model}'"}
            if state.get("canary") != version:
                return {"outcome": "skipped", "detail": f"version {version} is not the plane's canary (canary: {state.get('canary')}, stable: {state.get('stable')}): nothing to roll back"}
            first = self.first_failure(labels)
            plane.rollback()
            rolled_back_at = time.time()
        except (PlaneAPIError, httpx.HTTPError) as exc:
            return {"outcome": "failed", "detail": f"the plane at {self.plane_url}: {type(exc).__name__}: {exc}"}
        finally:
            plane.close()
        why = reason(alert)
        result: dict[str, Any] = {"outcome": "rolled_back", "version": version, "stable": state.get("stable"), "rolled_back_at": datetime.datetime.fromtimestamp(rolled_back_at, datetime.UTC).isoformat(timespec="milliseconds")}
        if first is not None:
            result["first_failure_seen_at"] = datetime.datetime.fromtimestamp(first, datetime.UTC).isoformat(timespec="milliseconds")
            result["seconds_from_first_failure"] = round(rolled_back_at - first, 3)
        result["registry"] = self._mark_rolled_back(model, version, state, why)
        from registry import audit

        audit.record("rollback", BY, version=version, reason=why, evidence=f"alert {labels.get('alertname')} in {self.record_path}",
                     model=model, kind="alert", stable=state.get("stable"), plane=self.plane_url, seconds_from_first_failure=result.get("seconds_from_first_failure"))
        said = f"canary version {version} rolled back by {BY}: {why}" + (f" ({result['seconds_from_first_failure']:.1f}s after its first failure)" if first is not None else "")
        from tasks.notify import notify

        result["notified"] = notify(self.params, "rolled_back", said, version=version, champion=state.get("stable"), by=BY, alert=labels.get("alertname"))
        return result

    def _mark_rolled_back(self, model: str, version: str, state: dict[str, Any], why: str) -> str:
        """Where a rollback by hand is recorded: the version's status (rolled_back, with the
        reason), so the same bytes are not released again unapproved."""
        from registry.models import ROLLED_BACK, set_status
        from registry.store import client
        from serving.plane.operations import registry_uri

        if state.get("registry_uri") != registry_uri():  # both without credentials
            return f"not marked: the plane's registry is {state.get('registry_uri')}, this receiver's {registry_uri()}"
        set_status(model, version, ROLLED_BACK, f"rolled back by {BY}: {why}")
        c = client()
        c.set_model_version_tag(model, version, "canary", "rolled_back")
        c.set_model_version_tag(model, version, "rolled_back_by", BY)
        return f"version {version} marked rolled_back"

    def first_failure(self, labels: dict[str, str]) -> float | None:
        """When Prometheus first saw the version fail (its failures' counter appearing or rising),
        at the resolution of its scrapes; None if it cannot tell."""
        from monitoring.render import failure_selector
        from pipelines.serve_config import seconds

        step = max(1.0, seconds(self.params.monitor.scrape_interval))
        matchers = ",".join(f'{k}="{labels[k]}"' for k in ("plane", "model", "version") if labels.get(k))
        end = time.time()
        lookback = max(3600.0, max(seconds(w.long) for w in self.params.monitor.burn_windows))
        try:
            r = httpx.get(f"{self.prometheus_url}/api/v1/query_range", params={
                "query": f"sum(gateway_backend_requests_total{{{matchers},{failure_selector()}}})", "start": end - lookback, "end": end, "step": step,
            }, timeout=10, trust_env=False)
            series = r.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        if not series:
            return None
        points = [(float(t), float(v)) for t, v in series[0]["values"]]
        if points[0][0] > end - lookback + step:
            return points[0][0]  # the counter appeared: its first failure came since the scrape before
        return next((t for (t, v), (_, before) in zip(points[1:], points) if v > before), None)

    def _quality(self, alert: dict[str, Any]) -> dict[str, Any]:
        from flows.events import QUALITY_DROPPED

        return self._event(alert, QUALITY_DROPPED, "quality_dropped")

    def _drift(self, alert: dict[str, Any]) -> dict[str, Any]:
        from flows.events import DRIFT_DETECTED

        return self._event(alert, DRIFT_DETECTED, "drift_detected")

    def _event(self, alert: dict[str, Any], event: str, notice: str) -> dict[str, Any]:
        from flows.events import emit_model_event
        from tasks.notify import notify

        labels = alert.get("labels", {})
        model = labels.get("model") or self.params.registry.model_name
        payload = {"alert": labels.get("alertname"), "labels": labels, "annotations": alert.get("annotations", {}), "starts_at": alert.get("startsAt"), "by": BY}
        event_id, detail = emit_model_event(event, model, payload)
        notified = notify(self.params, notice, reason(alert), by=BY, alert=labels.get("alertname"), **{k: labels[k] for k in ("version", "check") if k in labels})
        return {"outcome": "emitted" if event_id else "not_emitted", "event": event, "event_id": event_id, "detail": detail, "notified": notified}

    def _notify(self, alert: dict[str, Any]) -> dict[str, Any]:
        from tasks.notify import notify

        labels = alert.get("labels", {})
        notified = notify(self.params, "alert", reason(alert), by=BY, alert=labels.get("alertname"), labels=labels)
        return {"outcome": "notified" if notified else "not_notified", "notified": notified}


# --- the app --------------------------------------------------------------------------------------


def create_receiver_app(receiver: Receiver) -> FastAPI:
    """The receiver's routes; loopback only (make monitor binds 127.0.0.1)."""
    app = FastAPI(title="lifecycle alert receiver")
    registry = CollectorRegistry()
    registry.register(ChecksCollector(receiver.monitor_dir / "checks", receiver.params.monitor.check_max_age_s))
    app.state.receiver = receiver

    @app.post("/alerts")
    async def alerts(request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except ValueError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            return JSONResponse({"error": "expected Alertmanager's webhook body: {\"alerts\": [...]}"}, status_code=400)
        return JSONResponse({"decided": receiver.receive(payload)})

    @app.get("/actions")
    async def actions(last: int = 100) -> dict[str, Any]:
        return {"actions": receiver.entries(last)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvicorn

    from pipelines.config import ConfigError, load_params

    parser = argparse.ArgumentParser(prog="python -m serving.alerts", description="Alertmanager's receiver: roll back a burning canary, emit Prefect events, notify; /metrics exports the scheduled checks.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dir", type=Path, default=MONITOR_DIR, help="where the record and the checks' files live")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    receiver = Receiver(params, args.dir)
    try:
        uvicorn.run(create_receiver_app(receiver), host="127.0.0.1", port=params.monitor.receiver_port, log_level="warning")
    finally:
        receiver.close()


if __name__ == "__main__":
    main()
