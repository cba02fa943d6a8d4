"""Scheduled and event-triggered runs of the lifecycle flow.

    python -m flows.schedule                 # serve the flow: nightly cron + data-changed trigger
    python -m flows.schedule --cron "0 */6 * * *"
    python -m flows.schedule emit            # announce new raw data: triggers a run

`serve` needs a Prefect server (run `make ui-prefect` in another shell and set
PREFECT_API_URL=http://127.0.0.1:4200/api); runs then show up in the Prefect UI.
"""

from __future__ import annotations

import argparse

from prefect.events import DeploymentEventTrigger, emit_event

from flows.lifecycle import lifecycle

DATA_UPDATED = "lifecycle.data.updated"  # emitted by whatever lands new raw data
DEFAULT_CRON = "0 3 * * *"


def build_deployment(cron: str = DEFAULT_CRON):
    """One deployment, two ways to start it: the cron schedule and a data-updated event."""
    return lifecycle.to_deployment(
        name="lifecycle",
        cron=cron,
        triggers=[DeploymentEventTrigger(name="on-new-data", expect={DATA_UPDATED}, match={"prefect.resource.id": "lifecycle.data.*"})],
        description="Data -> SFT -> DPO -> gates -> quantize -> register -> canary, nightly and on new data.",
        tags=["llm-lifecycle"],
    )


def announce_new_data(source: str = "raw") -> None:
    emit_event(event=DATA_UPDATED, resource={"prefect.resource.id": f"lifecycle.data.{source}"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.schedule", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["serve", "emit"], default="serve")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule (default: '{DEFAULT_CRON}', nightly at 03:00)")
    args = parser.parse_args()
    if args.command == "emit":
        announce_new_data()
        print(f"emitted {DATA_UPDATED}")
        return
    from prefect import serve

    serve(build_deployment(args.cron))


if __name__ == "__main__":
    main()
