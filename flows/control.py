"""What every lifecycle and release run shares on a Prefect server: a name and tags that say
what it is about (model, recipe, data), the project's slot (one run at a time: they share the
DVC workspace and the registry's aliases), and a link to its MLflow run.

The slot is a Prefect global concurrency limit named after the project; a run takes it for its
whole body, whoever started it (the cron, a new-data event, the UI, `make pipeline` pointed at
the server). Deployments add the same limit on the server side, so a queued deployment run
waits as `AwaitingConcurrencySlot` instead of starting.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path

from pipelines.config import Params, load_params
from pipelines.data_config import SourceParams

GENERATED = Path("data/generated")  # the demo generator's output: derived from params, not data a person brought
MLFLOW_UI_ENV = "MLFLOW_UI_URL"  # where people open MLflow (`make ui` serves it on port 5000)
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def project_key(params: Params) -> str:
    """This project on a shared Prefect server: the model's name and the folder it is built in
    (two checkouts with the same model name have their own DVC workspaces)."""
    folder = hashlib.md5(str(Path.cwd().resolve()).encode()).hexdigest()[:8]
    return f"{params.registry.model_name}.{folder}"


def slot_name(params: Params) -> str:
    return f"llm-lifecycle {project_key(params)}"


def _source_files(src: SourceParams) -> list[Path]:
    """A source's data files, and the dataset_info.json beside them that says how they are read
    (a changed format alone is new data)."""
    from pipelines.sources import DATASET_INFO, files_of

    out = []
    for f in files_of(src):
        out += sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
    infos = {p.parent / DATASET_INFO for p in out} | ({Path(src.path) / DATASET_INFO} if src.path else set())
    return out + sorted(i for i in infos if i.is_file() and i not in out)


def data_hash(params: Params) -> str:
    """md5 (12 hex digits) of the data people brought: every file of every declared source but
    the generator's folder, names and bytes (a hub source by its id and split). The same data
    gives the same hash on every run, so runs and events can be matched by it."""
    h = hashlib.md5()
    for src in params.data.sources:
        if src.hub is not None:
            h.update(f"hub:{src.hub}:{src.hub_split}\n".encode())
            continue
        if src.path and Path(src.path).resolve() == GENERATED.resolve():
            continue
        for f in _source_files(src):
            h.update(f"{f}\n".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def run_tags(params: Params, data: str) -> list[str]:
    return ["llm-lifecycle", f"model:{params.registry.model_name}", f"recipe:{'-'.join(params.recipe)}", f"data:{data}", f"project:{project_key(params)}"]


def lifecycle_run_name() -> str:
    """The flow run's name (Prefect calls this when the run starts): model, recipe (the run's
    own, e.g. a feedback run's [dpo] from the champion), data."""
    from prefect.runtime import flow_run

    params = load_params()
    given = flow_run.parameters
    recipe = given.get("recipe") or params.recipe
    start = " from champion" if (given.get("start_from") or params.model.start_from) == "champion" else ""
    return f"{params.registry.model_name} {'-'.join(recipe)}{start} data {data_hash(params)}"


def release_run_name() -> str:
    from prefect.runtime import flow_run

    params = load_params()
    version = flow_run.parameters.get("version") or "candidate"
    return f"release {params.registry.model_name} v{version}" if version != "candidate" else f"release {params.registry.model_name} candidate"


def on_server() -> bool:
    """A Prefect server is configured (PREFECT_API_URL): the slot and run labels live there. The
    ephemeral API of a plain `make pipeline` serves one process, so there is nobody to exclude."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def label_run(flow_run_id: str | None, tags: list[str]) -> None:
    """Add tags to the running flow run (the deployment's own tags stay)."""
    if not flow_run_id:
        return
    from prefect import get_client

    with get_client(sync_client=True) as c:
        run = c.read_flow_run(flow_run_id)
        c.update_flow_run(flow_run_id, tags=sorted(set(run.tags) | set(tags)))


def _locked(exc: BaseException) -> bool:
    cause = exc.__cause__
    return getattr(getattr(cause, "response", None), "status_code", None) == 423


def _holders(params: Params, me: str | None) -> str:
    """The project's other running flow runs, by name: who holds the slot."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"project:{project_key(params)}"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            )
        )
    names = [f"'{r.name}' ({r.id})" for r in runs if str(r.id) != str(me)]
    return ", ".join(names) if names else "a run outside this server's view"


def take_slot(stack: ExitStack, params: Params, flow_run_id: str | None) -> str | None:
    """Hold one of the project's slots until `stack` closes. Returns None when held, or (with
    orchestration.on_busy: drop) why this run must not go on. With `wait`, blocks until free."""
    if not on_server():
        return None
    from prefect import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    cfg = params.orchestration
    name = slot_name(params)
    with get_client(sync_client=True) as c:
        c.upsert_global_concurrency_limit_by_name(name, cfg.concurrency_limit)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id) if flow_run_id else None
    try:
        stack.enter_context(concurrency(name, max_retries=0, strict=True, holder=holder))
        return None
    except ConcurrencySlotAcquisitionError as exc:
        if not _locked(exc):
            raise
    busy = f"the project's run limit '{name}' ({cfg.concurrency_limit} at a time) is taken by {_holders(params, flow_run_id)}"
    if cfg.on_busy == "drop":
        return f"dropped: {busy}; orchestration.on_busy is 'drop' (set 'wait' to queue instead)"
    print(f"waiting: {busy} (orchestration.on_busy: wait)")
    stack.enter_context(concurrency(name, strict=True, holder=holder))
    print("slot free: starting")
    return None


def mlflow_run_url(run_id: str) -> str:
    from pipelines.redact import redact_url
    from registry.store import client

    experiment = client().get_run(run_id).info.experiment_id
    base = redact_url(os.environ.get(MLFLOW_UI_ENV, DEFAULT_MLFLOW_UI)).rstrip("/")  # the link is a Prefect artifact: no password in it
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


def link_mlflow_run(run_id: str, what: str) -> str:
    """A link artifact to the MLflow run (metrics, gate reports, data card, model files)."""
    from prefect.artifacts import create_link_artifact

    url = mlflow_run_url(run_id)
    create_link_artifact(key="mlflow-run", link=url, link_text=f"MLflow run of this {what}", description=f"MLflow run {run_id}: metrics, gate reports, data card, model")
    return url
