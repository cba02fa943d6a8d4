"""The project's Prefect deployments, served from one process (`make serve-flows`):

    lifecycle   the whole lifecycle, on orchestration.cron and whenever new data is added
                (`make data-add` emits `lifecycle.data.added` with the data's hash; the
                feedback export's event also carries the recipe and start point of its run,
                which the trigger passes as the flow's `recipe` / `start_from` parameters)
    release     canary a registered version that passed the quality gate (default: the
                `candidate` alias, e.g. built with `python -m flows.lifecycle --no-deploy`)
    rollback    champion <- previous, what `make rollback` does
    online-quality, drift   the scheduled checks over the record of every answer
                (flows/watch.py), on monitor.quality_cron and monitor.drift_cron

    python -m flows.deployments serve                # make serve-flows (needs a Prefect server: make ui)
    python -m flows.deployments data-added [FILE]    # make data-add: "new data landed" -> a lifecycle run

Every deployment runs in this project's folder, so runs read ./params.yaml and the DVC
workspace exactly as `make pipeline` does. Lifecycle and release runs share the project's slot
(orchestration.concurrency_limit, on_busy: wait | drop; flows/control.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pipelines.config import ConfigError, Params, load_params

DATA_ADDED = "lifecycle.data.added"
# The run the event asks for: the feedback export sends its recipe, start point and training settings
# (feedback_loop.recipe, .start_from, .overrides); plain new data (`make data-add`) sends none, and
# `default(none)` makes that None: the flow then runs params.yaml's. Prefect renders a template that is
# one expression to its JSON value, so the recipe arrives as a list and the overrides as a mapping.
EVENT_PARAMETERS = {
    "recipe": "{{ event.payload.recipe | default(none) }}",
    "start_from": "{{ event.payload.start_from | default(none) }}",
    "overrides": "{{ event.payload.overrides | default(none) }}",
}


def data_resource(params: Params) -> str:
    """The resource a new-data event is about: this project's data (the trigger matches it)."""
    from flows.control import project_key

    return f"lifecycle.data.{project_key(params)}"


def build_deployments(params: Params) -> list:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger
    from pydantic import ValidationError

    from flows.control import project_key
    from flows.lifecycle import lifecycle
    from flows.release import release, rollback_release
    from flows.watch import drift, online_quality

    cfg = params.orchestration
    try:
        schedule = CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as exc:
        raise ConfigError(f"params.yaml: orchestration.cron '{cfg.cron}' / timezone '{cfg.timezone}': {exc.errors()[0]['msg']} (5 cron fields, e.g. '0 3 * * *', and an IANA zone)") from None
    # Server-side too: a deployment run that finds the slot taken waits as AwaitingConcurrencySlot
    # (or is cancelled at once) instead of starting and holding a process while it waits.
    strategy = ConcurrencyLimitStrategy.ENQUEUE if cfg.on_busy == "wait" else ConcurrencyLimitStrategy.CANCEL_NEW
    limit = ConcurrencyLimitConfig(limit=cfg.concurrency_limit, collision_strategy=strategy)
    tags = ["llm-lifecycle", f"model:{params.registry.model_name}", f"project:{project_key(params)}"]
    on_new_data = DeploymentEventTrigger(name="on-new-data", expect={DATA_ADDED}, match={"prefect.resource.id": data_resource(params)}, parameters=EVENT_PARAMETERS)
    return [
        lifecycle.to_deployment(
            name="lifecycle",
            schedules=[schedule],
            triggers=[on_new_data],
            concurrency_limit=limit,
            tags=tags,
            description=f"Data -> {' -> '.join(params.recipe)} -> gates -> quantize -> register -> canary; on '{cfg.cron}' ({cfg.timezone}) and on new data.",
        ),
        release.to_deployment(name="release", concurrency_limit=limit, tags=tags, description="Canary a registered version that passed the quality gate (default: the 'candidate' alias) and promote or roll it back."),
        rollback_release.to_deployment(name="rollback", tags=tags, description="champion <- previous (make rollback): switched live on a running plane, else the aliases alone."),
        *watch_deployments(params, tags, online_quality, drift),
    ]


def watch_deployments(params: Params, tags: list[str], online_quality, drift) -> list:
    """The scheduled checks, each on its own cron (null: no deployment), in the lifecycle's zone."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    out = []
    m, zone = params.monitor, params.orchestration.timezone
    for fl, name, cron, key, what in (
        (online_quality, "online-quality", m.quality_cron, "monitor.quality_cron", f"judge a sample of the last {m.quality_window} of recorded answers"),
        (drift, "drift", m.drift_cron, "monitor.drift_cron", f"the last {m.drift_window} of users' prompts vs training and the window before"),
    ):
        if cron is None:
            continue
        try:
            schedule = CronSchedule(cron=cron, timezone=zone)
        except ValidationError as exc:
            raise ConfigError(f"params.yaml: {key} '{cron}': {exc.errors()[0]['msg']} (5 cron fields, e.g. '0 * * * *')") from None
        out.append(fl.to_deployment(name=name, schedules=[schedule], tags=tags, description=f"{what}; on '{cron}' ({zone})."))
    return out


def server_problem() -> str | None:
    """Why no Prefect server can take deployments or events, or None when one answers."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "no Prefect server is configured (PREFECT_API_URL is unset); start one with `make ui` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=3).raise_for_status()
    except httpx.HTTPError as exc:
        return f"no Prefect server answers at {url} ({type(exc).__name__}); start one with `make ui`"
    return None


def announce_data(params: Params, file: str | None = None, details: dict | None = None) -> str:
    """Emit `lifecycle.data.added` for this project, with the data's hash (and `details` in the
    payload: the feedback export's counts and recipe); returns what happened. Never raises for a
    missing server: adding data must not depend on the orchestrator."""
    from flows.control import data_hash

    digest = data_hash(params)
    problem = server_problem()
    if problem:
        return f"no new-data event sent: {problem}. The data is added; `make pipeline` uses it."
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    payload = {**(details or {}), "data_hash": digest, "file": Path(file).name if file else None}
    event = Event(event=DATA_ADDED, resource={"prefect.resource.id": data_resource(params), "prefect.resource.name": f"{params.registry.model_name} data", "data.hash": digest}, payload=payload)

    async def emit() -> None:
        async with get_events_client(reconnection_attempts=2) as events:
            await events.emit(event)

    try:
        asyncio.run(emit())
    except Exception as exc:  # the server went away between the health check and the event
        return f"no new-data event sent ({type(exc).__name__}: {exc}). The data is added; `make pipeline` uses it."
    return f"emitted {DATA_ADDED} (data {digest}): a served lifecycle deployment (`make serve-flows`) starts a run"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the lifecycle (cron + new data), release and rollback deployments until Ctrl-C")
    added = sub.add_parser("data-added", help="announce new data (make data-add): a served lifecycle deployment starts a run")
    added.add_argument("file", nargs="?", help="the file that was added (recorded in the event)")
    args = parser.parse_args(argv)
    try:
        params = load_params()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    if args.command == "data-added":
        print(announce_data(params, args.file))
        return
    problem = server_problem()
    if problem:
        print(f"cannot serve the deployments: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        deployments = build_deployments(params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    from prefect import serve

    serve(*deployments)


if __name__ == "__main__":
    main()
