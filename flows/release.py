"""Release and rollback as flows of their own, for the Prefect UI (deployments `release` and
`rollback`, flows/deployments.py): the lifecycle's last part for a model that is built already,
and `make rollback`.

A version may be released when the quality gate passed it and nothing blocked it since: it is
the `candidate` (the gate's mark; `python -m flows.lifecycle --no-deploy` leaves one), or it was
released before (it has a release history), and the registry does not refuse its bytes
(rejected or rolled back, unless a person approved them). The gate is not re-run: its evidence
(this workspace's metrics) belongs to whatever was built last, not to an arbitrary version.
"""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.control import label_run, link_mlflow_run, project_key, release_run_name, take_slot
from pipelines.config import Params, load_params
from registry.models import CANDIDATE, CHAMPION, PREVIOUS, blocked, by_alias
from tasks.deploy import canary_release
from tasks.gates import GateFailed
from tasks.notify import notify


def releasable(params: Params, version: str | None) -> object:
    """The registered version to release, or GateFailed saying why it may not be."""
    from mlflow.exceptions import MlflowException

    from registry.store import client

    name = params.registry.model_name
    candidate = by_alias(name, CANDIDATE)
    if version is None:
        if candidate is None:
            raise GateFailed(f"no version of '{name}' is waiting for release (no 'candidate' alias): build and gate one with `python -m flows.lifecycle --no-deploy`, or name a version")
        return candidate
    try:
        mv = client().get_model_version(name, str(version))
    except MlflowException:
        raise GateFailed(f"model '{name}' has no version {version}") from None
    why = blocked(mv)
    if why:
        raise GateFailed(f"release refused, nothing was deployed:\n  {why}")
    was_released = "release.history" in mv.tags or any(str(getattr(by_alias(name, a), "version", "")) == str(mv.version) for a in (CHAMPION, PREVIOUS))
    if not (candidate is not None and str(candidate.version) == str(mv.version)) and not was_released:
        raise GateFailed(f"version {mv.version} has not passed the quality gate: it is not the 'candidate' and was never released; run the lifecycle on its data to gate it")
    return mv


@flow(name="llm-release", log_prints=True, flow_run_name=release_run_name)
def release(version: str | None = None, canary_drill: list[str] | None = None) -> dict:
    """Canary `version` (default: the `candidate`) beside the champion; promote or roll back.
    `canary_drill`: extra server flags for the candidate (e.g. ["--fault-error-rate", "1.0"])."""
    params = load_params()
    with ExitStack() as stack:
        busy = take_slot(stack, params, flow_run.id)
        if busy:
            print(busy)
            return Cancelled(message=busy)
        try:
            mv = releasable(params, version)
        except GateFailed as exc:
            notify(params, "gate_failed", str(exc), version=version)
            raise
        label_run(flow_run.id, ["llm-lifecycle", f"model:{params.registry.model_name}", f"version:{mv.version}", f"recipe:{mv.tags.get('recipe', '?').replace(' -> ', '-')}", f"project:{project_key(params)}"])
        url = link_mlflow_run(mv.run_id, f"version {mv.version}") if mv.run_id else None
        result = canary_release(params, str(mv.version), drill=canary_drill)
        create_markdown_artifact(
            key="release-summary",
            markdown=f"## release of version {mv.version}: {result['outcome']}\n\n- model: {params.registry.model_name}\n- recipe: {mv.tags.get('recipe', '?')}\n"
            + (f"- MLflow run: [{mv.run_id}]({url})\n" if url else ""),
            description=f"release of version {mv.version}",
        )
        return {k: v for k, v in result.items() if k != "history"}


def rollback_run_name() -> str:
    return f"rollback {load_params().registry.model_name}"


@flow(name="llm-rollback", log_prints=True, flow_run_name=rollback_run_name)
def rollback_release(model: str | None = None) -> dict:
    """champion <- previous. On a running plane (`make serve`) `previous` is started, checked and
    switched to live, and the old champion drains; without one, the aliases alone move.
    `model`: the registered model (default: registry.model_name; it must match params)."""
    from registry.cli import rollback_plane
    from registry.models import rollback
    from serving.plane_client import discover

    params = load_params()
    name = params.registry.model_name
    if model not in (None, name):
        raise ValueError(f"this project manages '{name}', not '{model}' (registry.model_name in params.yaml)")
    before = by_alias(name, CHAMPION)
    plane = discover(params)
    try:
        if plane is not None:
            where = f"the running plane at {plane.root_url}"
            rollback_plane(params, plane)
        else:
            where = "the registry's aliases (no plane is running: `make serve` serves the new champion)"
            rollback(name)
    except SystemExit as exc:  # the CLI's own refusals ("no 'previous' version", a failed check)
        raise RuntimeError(str(exc)) from None
    finally:
        if plane is not None:
            plane.close()
    after = by_alias(name, CHAMPION)
    old, new = (str(before.version) if before else "none"), str(after.version)
    markdown = f"## rollback of {name}: champion v{old} -> v{new}\n\n- where: {where}\n- `previous` is now v{old}\n"
    create_markdown_artifact(key="rollback", markdown=markdown, description=f"rollback of {name}")
    notify(params, "rolled_back", f"champion rolled back by hand: v{old} -> v{new}", version=new, previous=old, where=where)
    print(markdown)
    return {"outcome": "rolled_back_by_hand", "from": old, "to": new, "where": where}
