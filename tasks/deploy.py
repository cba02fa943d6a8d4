"""Release a registered version: into a serving plane, where it is the canary beside the champion
and the canary controller (serving/rollout.py) decides.

There is one path. With a plane running for this registry (`make serve`), the release goes into
it, on its real traffic. Without one, the release starts a temporary plane of its own in this
process (serving/plane/temporary.py: the same plane, on a free loopback port) serving the
champion, releases into it the same way, and stops it afterwards. The first release has no
champion: the temporary plane serves the candidate, and its health and golden prompts decide.

Success: alias `champion` moves to the candidate and `previous` to the old champion (the
registry first; then a running plane promotes its canary, the old stable draining first).
Failure: the canary is rolled back, the version is tagged with the canary report, and the
champion and its traffic are untouched. A champion that cannot be served stops the release
before the candidate is judged: the candidate loses its alias (it is not rolled back: nothing
was held against it), the champion keeps its aliases, and ReleaseAborted names the version
that failed and why.

The synthetic users that top up the canary's evidence send the plane's own traffic key, which
its gateway accepts whatever it requires of clients (a keys file, $GATEWAY_API_KEY); with
$SERVING_API_KEY set, the engines require it and the plane and the probes send it.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import PREPARED
from pipelines.config import Params
from registry.card import refresh as refresh_card
from registry.models import CANDIDATE, CHAMPION, by_alias, log_release, promote, reject, shadowed
from registry.store import client
from serving.analysis import decide_canary
from serving.canary import golden_prompts, probe
from serving.plane.temporary import TemporaryPlane
from serving.plane_client import PlaneAPIError, PlaneClient, RemoteGateway, backends_of, discover
from serving.rollout import RolloutResult, StepReport, run_rollout
from tasks.notify import notify

TEMPORARY = "a temporary plane (no plane was running: `make serve` starts one that releases go into)"


class ReleaseAborted(RuntimeError):
    """The release could not be judged (the champion cannot be served); the registry is left
    as it was before the candidate was proposed."""


def unservable(params: Params, exc: Exception) -> RolloutResult:
    """A candidate that never became healthy: it failed every request it could have served."""
    metrics = {"requests": 0, "error_rate": 1.0, "exact_match": 0.0, "p95_latency_s": None, "start_error": str(exc)[-500:]}
    return RolloutResult("rolled_back", [StepReport(0, metrics, {}, decide_canary(metrics, None, params.canary), 0, 0)])


def first_release(params: Params, plane: PlaneClient, golden: list[tuple[str, str]]) -> RolloutResult:
    """No champion yet: the temporary plane serves the candidate alone; health (it came up) and
    the golden prompts decide."""
    candidate = backends_of(plane.state(), "stable")[0]
    stats = probe({"candidate": (f"{candidate.base_url}/v1", candidate.model)}, golden, params.serve.max_new_tokens, api_key=candidate.api_key)["candidate"]
    decision = decide_canary(stats, None, params.canary)
    return RolloutResult("promoted" if decision.passed else "rolled_back", [StepReport(100, stats, {}, decision, stats["requests"], 0)])


def abort(name: str, version: str, what: str, exc: Exception) -> None:
    """Stop a release that cannot be judged, leaving the registry consistent: the candidate
    loses its alias (no version is under evaluation any more) but is not marked rolled back,
    so the same bytes may be released once the cause is fixed; the champion's aliases stay.
    Raises ReleaseAborted, naming what failed and why."""
    cause = f"{type(exc).__name__}: {exc}"
    message = f"release of version {version} aborted: {what}, so there is nothing to judge the candidate against.\n{cause}"
    c = client()
    c.set_model_version_tag(name, version, "canary", "aborted")
    c.set_model_version_tag(name, version, "canary.report", message[:4900])
    current = by_alias(name, CANDIDATE)
    if current is not None and str(current.version) == version:
        c.delete_registered_model_alias(name, CANDIDATE)
    create_markdown_artifact(key="canary", markdown=f"## canary: aborted\n\n```\n{message[-4000:]}\n```\n", description="canary analysis")
    raise ReleaseAborted(message) from exc


def release_into_plane(
    params: Params, plane: PlaneClient, version: str, golden: list[tuple[str, str]], drill: list[str] | None, top_up_concurrency: int,
) -> tuple[RolloutResult, int]:
    """The candidate joins the plane as its canary and is judged on the plane's traffic (topped
    up by `top_up_concurrency` synthetic users, who send the plane's traffic key). A rollback
    has stopped it already; promotion is left to the caller (registry first, then the plane).
    Returns the result and where the plane's event history stood before."""
    name = params.registry.model_name
    before = len(plane.state()["history"])
    try:
        state = plane.attach_canary(version, 0.0, drill)
    except PlaneAPIError as exc:
        if exc.status != 502:  # 409: the plane is busy with another canary; nothing was judged
            abort(name, version, f"the plane at {plane.root_url} refused the canary ({exc.message})", exc)
        return unservable(params, exc), before
    candidate = backends_of(state, "canary")[0]
    try:
        result = run_rollout(
            RemoteGateway(plane), plane.base_url, candidate, golden, params.canary, params.serve.max_new_tokens,
            gateway_api_key=plane.traffic_key(), top_up_concurrency=top_up_concurrency,
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the release broke: the plane must not keep a canary nobody drives
            if plane.state()["canary"] == version:
                plane.rollback()
        raise
    return result, before


def plane_events(plane: PlaneClient, before: int) -> list[dict]:
    events = plane.state()["history"]
    return events[before:] if len(events) > before else events[-10:]


def history_markdown(history: dict) -> str:
    lines = [
        f"## release of version {history['version']}: {history['outcome']}",
        "",
        f"- where: {history['where']}",
        f"- from {history['started_at']} to {history['finished_at']}",
        f"- stable before: version {history['stable_before']}",
        "",
        "| at | canary weight | canary requests | error rate | p95 canary / stable | golden EM | agreement | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in history["steps"]:
        c, st = s["canary"], s["stable"]
        p95 = f"{c.get('p95_latency_s') or 0:.3f} / {st.get('p95_latency_s') or 0:.3f} s"
        verdict = "passed" if s["passed"] else "FAILED: " + "; ".join(s["reasons"])
        lines.append(f"| {s['at']} | {s['weight']}% | {c.get('requests')} | {c.get('error_rate')} | {p95} | {c.get('exact_match')} | {c.get('agreement')} | {verdict} |")
    if history["plane_events"]:
        lines += ["", "Plane events:", ""] + [f"- {e['at']} {e['event']}: " + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event")) for e in history["plane_events"]]
    return "\n".join(lines) + "\n"


@task(task_run_name="release v{version}", cache_policy=NO_CACHE)
def canary_release(params: Params, version: str, drill: list[str] | None = None) -> dict:
    name = params.registry.model_name
    version = str(version)
    champion = by_alias(name, CHAMPION)
    if champion is not None and str(champion.version) == version:
        print(f"version {version} is already the champion: nothing to deploy")
        return {"outcome": "unchanged", "version": version}
    if params.serve.target == "kserve":  # the cluster applies the manifests; nothing is served or judged here
        from serving.kserve import write_release

        paths = write_release(params, version, str(champion.version) if champion else None)
        print(f"rendered KServe manifests for version {version}: " + ", ".join(str(p) for p in paths))
        return {"outcome": "rendered", "version": version, "manifests": [str(p) for p in paths]}
    golden = golden_prompts(PREPARED / "sft_test.parquet", params.canary.golden_prompts)
    started_at = now()
    running = discover(params) if champion is not None else None
    if running is not None:
        where = f"the running plane at {running.root_url}"
        with contextlib.closing(running):
            stable_before = running.state()["stable"]
            print(f"releasing version {version} into {where} (stable: version {stable_before})")
            result, before = release_into_plane(params, running, version, golden, drill, top_up_concurrency=2)
            # The registry first: a plane that stops before its own promotion finishes it on restart
            # (its canary is the champion); then the plane, whose old stable drains and stops.
            return finish(params, version, champion, result, where, started_at, stable_before, running.promote, lambda: plane_events(running, before))
    print(f"releasing version {version} into {TEMPORARY}")
    if champion is None:
        # The temporary plane serves the candidate itself; one that cannot start failed every
        # request it could have served.
        temporary = TemporaryPlane(params, version, side_by_side=params.serve.replicas, drill=drill)
        try:
            plane = temporary.__enter__()
        except Exception as exc:  # the download or the engine
            return finish(params, version, None, unservable(params, exc), TEMPORARY, started_at, None)
        try:
            result = first_release(params, plane, golden)
        finally:
            temporary.__exit__(None, None, None)
        return finish(params, version, None, result, TEMPORARY, started_at, None)
    # The champion first: without it there is nothing to judge the candidate against, and the
    # candidate's start would be wasted. It and the candidate share the cores.
    temporary = TemporaryPlane(params, str(champion.version), side_by_side=params.serve.replicas + 1)
    try:
        plane = temporary.__enter__()
    except Exception as exc:  # the download or the engine: either way it cannot serve
        abort(name, version, f"champion version {champion.version} could not be served", exc)
    try:
        result, before = release_into_plane(params, plane, version, golden, drill, top_up_concurrency=4)
        events = plane_events(plane, before)
    finally:
        temporary.__exit__(None, None, None)
    # The temporary plane is gone: the registry alone records the outcome, and the next plane
    # (`make serve`, or the next release's) serves whatever it names champion.
    return finish(params, version, champion, result, TEMPORARY, started_at, str(champion.version), None, lambda: events)


def release_evidence(name: str, version: str) -> str:
    """Where the audit log's entry points: the release history (written just after) and the
    Prefect flow run that made it."""
    from prefect.runtime import flow_run

    run_id = client().get_model_version(name, version).run_id
    where = f"runs:/{run_id}/release/v{version}.json" if run_id else f"models:/{name}/{version}"
    return where + (f" (Prefect flow run {flow_run.id})" if flow_run.id else "")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def finish(
    params: Params, version: str, champion, result: RolloutResult, where: str, started_at: str, stable_before: str | None,
    then_promote: Callable[[], object] | None = None, events: Callable[[], list[dict]] | None = None,
) -> dict:
    """Record the outcome in the registry (then `then_promote()`, the plane's own promotion), and
    the release history in MLflow and Prefect."""
    name = params.registry.model_name
    report = result.summary()
    print(report)
    evidence = release_evidence(name, version)
    if result.outcome == "promoted":
        old = promote(name, version, evidence=evidence, reason="passed its canary via " + where)
        if then_promote is not None:
            then_promote()
        outcome = {"outcome": "promoted", "version": version, "previous": str(old.version) if old else None}
    elif result.outcome == "shadowed":  # compared on mirrored traffic and reported; never promoted
        shadowed(name, version, report)
        outcome = {"outcome": "shadowed", "version": version, "champion": str(champion.version) if champion else None}
    else:
        reject(name, version, report, evidence=evidence)
        outcome = {"outcome": "rolled_back", "version": version, "champion": str(champion.version) if champion else None}
    said = {
        "promoted": f"version {version} promoted to champion (was {outcome.get('previous')}) via {where}",
        "rolled_back": f"version {version} rolled back; champion {outcome.get('champion')} keeps serving: " + "; ".join(result.reasons),
        "shadowed": f"version {version} compared on mirrored traffic (shadow): " + ("; ".join(result.reasons) or "no difference found"),
    }[outcome["outcome"]]
    notify(params, outcome["outcome"], said, **outcome, reasons=result.reasons)
    history = {
        "version": version, "outcome": result.outcome, "where": where, "started_at": started_at, "finished_at": now(),
        "stable_before": stable_before, "steps": [s.as_dict() for s in result.steps], "plane_events": events() if events else [],
    }
    markdown = history_markdown(history)
    log_release(name, version, history, markdown)
    refresh_card(name, version)
    create_markdown_artifact(key="release-history", markdown=markdown, description=f"release history of version {version}")
    create_markdown_artifact(key="canary", markdown=f"## canary: {outcome['outcome']}\n\n```\n{report}\n```\n", description="canary analysis")
    from registry.audit import AuditLog, markdown as audit_markdown, of_version

    create_markdown_artifact(key="audit", markdown=f"## audit log of version {version}\n\n{audit_markdown(of_version(version))}\n`{AuditLog().path}`; `lifecycle audit verify` checks it\n",
                             description=f"who did what to version {version} (registry/audit.py)")
    return {**outcome, "where": where, "steps": [s.as_dict() for s in result.steps], "client_errors": result.client_errors, "reasons": result.reasons, "history": history}
