"""Deploy the candidate beside the champion and let the canary controller decide.

The champion (stable) and the candidate (canary) each run in their own server process; a
gateway in this process splits traffic between them step by step (serving/rollout.py).
Success: alias `champion` moves to the candidate and `previous` to the old champion, the
gateway's stable backend is swapped and the old one stopped. Failure: the canary is removed,
the version is tagged with the canary report, and the champion and its traffic are untouched.
The first release has no champion: it is promoted after health and golden-prompt checks.
A champion that cannot be served stops the release before the candidate is judged: the
candidate loses its alias (it is not rolled back: nothing was held against it), the champion
keeps its aliases, and ReleaseAborted names the version that failed and why.

With $SERVING_API_KEY set, the servers require it and every client here sends it: the
gateway to its backends, the probes, the health waits; the gateway itself then requires
$GATEWAY_API_KEY, or else the same key, from the synthetic users.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import PREPARED
from pipelines.config import Params
from serving.analysis import decide_canary
from registry.models import CANDIDATE, CHAMPION, by_alias, download, log_release, promote, reject, shadowed
from registry.card import refresh as refresh_card
from registry.store import client
from serving import auth
from serving.background import ThreadedServer
from serving.canary import golden_prompts, probe
from serving.gateway import API_KEY_ENV as GATEWAY_KEY_ENV
from serving.gateway import Backend, create_gateway
from serving.launcher import ServerProcess, ServerStartError, free_port, launch
from serving.plane_client import PlaneAPIError, PlaneClient, RemoteGateway, backends_of, discover
from serving.rollout import RolloutResult, StepReport, run_rollout
from tasks.notify import notify

SERVING_DIR = Path(".serving")  # downloaded model versions and server logs (git-ignored)


class ReleaseAborted(RuntimeError):
    """The release could not be judged (the champion cannot be served); the registry is left
    as it was before the candidate was proposed."""


def cpu_threads(params: Params, servers: int) -> dict[str, str]:
    """Side-by-side CPU servers share the cores instead of each claiming all of them."""
    if params.serve.engine != "cpu":
        return {}
    n = params.serve.cpu_threads or max(1, (os.cpu_count() or 1) // servers)
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def start(params: Params, stack: ExitStack, version: str, label: str, servers: int, drill: list[str] | None = None) -> tuple[ServerProcess, Backend]:
    """Download a registered version and serve it in its own process (stopped with `stack`).
    `drill` adds server flags (e.g. --fault-error-rate) for canary drills."""
    mv = client().get_model_version(params.registry.model_name, version)
    model_dir = download(mv, SERVING_DIR / "models" / f"v{version}")
    served = f"{params.registry.model_name}-v{version}"
    extra = ["--max-new-tokens", str(params.serve.max_new_tokens)] if params.serve.engine == "cpu" else []
    server = launch(
        params.serve.engine,
        str(model_dir),
        served,
        params.serve.host,
        free_port(),
        SERVING_DIR / f"{label}-v{version}.log",
        params.serve.startup_timeout_s,
        extra_args=extra + (drill or []),
        env=cpu_threads(params, servers),
    )
    stack.callback(server.stop)
    return server, Backend(label, server.root_url, served, api_key=auth.backend_key())


def unservable(params: Params, exc: Exception) -> RolloutResult:
    """A candidate that never became healthy: it failed every request it could have served."""
    metrics = {"requests": 0, "error_rate": 1.0, "exact_match": 0.0, "p95_latency_s": None, "start_error": str(exc)[-500:]}
    return RolloutResult("rolled_back", [StepReport(0, metrics, {}, decide_canary(metrics, None, params.canary), 0, 0)])


def first_release(params: Params, candidate: Backend, golden: list[tuple[str, str]]) -> RolloutResult:
    """No champion yet: health (the server came up) and the golden prompts decide alone."""
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
    shutil.rmtree(SERVING_DIR / "models", ignore_errors=True)
    raise ReleaseAborted(message) from exc


def release_into_plane(params: Params, plane: PlaneClient, version: str, golden: list[tuple[str, str]], drill: list[str] | None) -> tuple[RolloutResult, int]:
    """The candidate joins the running plane as its canary and is judged on the plane's real
    traffic (topped up by synthetic users when it is thin). A rollback has stopped it already;
    promotion is left to the caller (registry first, then the plane). Returns the result and
    where the plane's event history stood before."""
    name = params.registry.model_name
    before = len(plane.state()["history"])
    try:
        state = plane.attach_canary(version, 0.0, drill)
    except PlaneAPIError as exc:
        if exc.status != 502:  # 409: the plane is busy with another canary; nothing was judged
            abort(name, version, f"the running plane at {plane.root_url} refused the canary ({exc.message})", exc)
        return unservable(params, exc), before
    remote = RemoteGateway(plane)
    candidate = backends_of(state, "canary")[0]
    gateway_key = auth.env_key(GATEWAY_KEY_ENV) or auth.backend_key()
    try:
        result = run_rollout(remote, plane.base_url, candidate, golden, params.canary, params.serve.max_new_tokens, gateway_api_key=gateway_key, top_up_concurrency=2)
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
    plane = discover(params) if champion is not None else None
    if plane is not None:
        stable_before = plane.state()["stable"]
        where = f"the running plane at {plane.root_url}"
        print(f"releasing version {version} into {where} (stable: version {stable_before})")
        try:
            result, before = release_into_plane(params, plane, version, golden, drill)
            # The registry first: a plane that stops before its own promotion finishes it on restart
            # (its canary is the champion); then the plane, whose old stable drains and stops.
            return finish(params, version, champion, result, where, started_at, stable_before, plane.promote, lambda: plane_events(plane, before))
        finally:
            plane.close()
    where = "an ephemeral gateway (no plane was running: `make serve` starts one)"
    print(f"releasing version {version} through {where}")
    servers = 1 if champion is None else 2
    with ExitStack() as stack:
        stable = None
        if champion is not None:
            # The champion first: without it there is nothing to judge the candidate against,
            # and the candidate's start would be wasted.
            try:
                _, stable = start(params, stack, str(champion.version), "champion", servers)
            except Exception as exc:  # the download or the server: either way it cannot serve
                abort(name, version, f"champion version {champion.version} could not be served", exc)
        try:
            _, candidate = start(params, stack, version, "candidate", servers, drill)
        except ServerStartError as exc:
            result = unservable(params, exc)
        else:
            if stable is None:
                result = first_release(params, candidate, golden)
            else:
                gateway_key = auth.env_key(GATEWAY_KEY_ENV) or auth.backend_key()
                app = create_gateway(stable, public_model=name, seed=0, api_key=gateway_key)
                with ThreadedServer(app, host=params.serve.host) as gw_server:
                    gateway = app.state.gateway
                    result = run_rollout(
                        gateway, gw_server.base_url, candidate, golden, params.canary, params.serve.max_new_tokens, gateway_api_key=gateway_key
                    )
                    if result.outcome == "promoted":
                        old = gateway.promote_canary()  # the gateway now serves the candidate as stable
                        print(f"gateway: stable is now {gateway.stable.model}; stopping {old.model}")
    return finish(params, version, champion, result, where, started_at, str(champion.version) if champion else None)


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
    if result.outcome == "promoted":
        old = promote(name, version)
        if then_promote is not None:
            then_promote()
        outcome = {"outcome": "promoted", "version": version, "previous": str(old.version) if old else None}
    elif result.outcome == "shadowed":  # compared on mirrored traffic and reported; never promoted
        shadowed(name, version, report)
        outcome = {"outcome": "shadowed", "version": version, "champion": str(champion.version) if champion else None}
    else:
        reject(name, version, report)
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
    shutil.rmtree(SERVING_DIR / "models", ignore_errors=True)  # copies; the registry keeps the originals
    return {**outcome, "where": where, "steps": [s.as_dict() for s in result.steps], "client_errors": result.client_errors, "reasons": result.reasons, "history": history}
