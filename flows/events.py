"""The lifecycle's own Prefect events about a served model, emitted when an alert says the model
needs attention (serving/alerts.py): `lifecycle.quality.dropped` (the online-quality check's
score stayed under monitor.quality_min) and `lifecycle.drift.detected` (live prompts drifted
from the training prompts). Their resource is `lifecycle.model.<name>`, so a deployment
trigger can match one model's events (`match={"prefect.resource.id": model_resource(name)}`) and
start a run: the next issue's retraining.

Emitted with `prefect.events.emit_event` to the Prefect server in PREFECT_API_URL; without a
server nothing is emitted and the caller records why (an alert never depends on the orchestrator).
"""

from __future__ import annotations

from typing import Any

QUALITY_DROPPED = "lifecycle.quality.dropped"
DRIFT_DETECTED = "lifecycle.drift.detected"


def model_resource(model: str) -> str:
    return f"lifecycle.model.{model}"


def emit_model_event(event: str, model: str, payload: dict[str, Any], flush_timeout_s: float = 10) -> tuple[str | None, str]:
    """Emit `event` about `model` with `payload`; returns (event id or None, what happened).
    Flushed before returning, so the event is on the server when the caller records it."""
    from flows.deployments import server_problem

    problem = server_problem()
    if problem:
        return None, f"no Prefect event emitted: {problem}"
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    sent = emit_event(event=event, resource={"prefect.resource.id": model_resource(model), "prefect.resource.name": model}, payload=payload)
    if sent is None:
        return None, "no Prefect event emitted: this process' Prefect settings do not emit events"
    EventsWorker.drain_all(timeout=flush_timeout_s)
    return str(sent.id), f"emitted {event} for {model_resource(model)} (event {sent.id})"
