"""Deploy the candidate beside the champion, probe both with golden prompts, then promote the
candidate (aliases move, the old champion becomes `previous`) or roll it back (the champion and
its alias are untouched; the version is tagged with the canary report)."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import PREPARED
from pipelines.config import Params
from pipelines.gates import decide_canary
from registry.models import CHAMPION, by_alias, download, promote, reject
from registry.store import client
from serving.canary import golden_prompts, probe
from serving.launcher import ServerStartError, free_port, launch

SERVING_DIR = Path(".serving")  # downloaded model versions and server logs (git-ignored)


def start(params: Params, stack: ExitStack, version: str, label: str):
    """Download a registered version and start it in its own server process."""
    mv = client().get_model_version(params.registry.model_name, version)
    model_dir = download(mv, SERVING_DIR / "models" / f"v{version}")
    served_name = f"{params.registry.model_name}-v{version}"
    server = launch(
        params.serve.engine,
        str(model_dir),
        served_name,
        params.serve.host,
        free_port(),
        SERVING_DIR / f"{label}-v{version}.log",
        params.serve.startup_timeout_s,
        extra_args=["--max-new-tokens", str(params.serve.max_new_tokens)] if params.serve.engine == "cpu" else [],
    )
    stack.callback(server.stop)
    return server, served_name


@task(cache_policy=NO_CACHE)
def canary_release(params: Params, version: str) -> dict:
    name = params.registry.model_name
    champion = by_alias(name, CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        print(f"version {version} is already the champion: nothing to deploy")
        return {"outcome": "unchanged", "version": str(version)}
    prompts = golden_prompts(PREPARED / "sft_test.parquet", params.canary.golden_prompts)
    with ExitStack() as stack:
        try:
            cand, cand_name = start(params, stack, str(version), "candidate")
            backends = {"candidate": (cand.base_url, cand_name)}
            if champion is not None:
                champ, champ_name = start(params, stack, str(champion.version), "champion")
                backends["champion"] = (champ.base_url, champ_name)
            stats = probe(backends, prompts, params.serve.max_new_tokens)
        except ServerStartError as exc:
            stats = {"candidate": {"requests": 0, "error_rate": 1.0, "exact_match": 0.0, "p95_latency_s": None, "errors_seen": [str(exc)[-500:]]}}
    decision = decide_canary(stats["candidate"], stats.get("champion"), params.canary)
    report = decision.summary() + "\n" + json.dumps(stats, indent=2)
    print(report)
    if decision.passed:
        old = promote(name, str(version))
        outcome = {"outcome": "promoted", "version": str(version), "previous": str(old.version) if old else None}
    else:
        reject(name, str(version), report)
        outcome = {"outcome": "rolled_back", "version": str(version), "champion": str(champion.version) if champion else None}
    create_markdown_artifact(key="canary", markdown=f"## canary: {outcome['outcome']}\n\n```\n{report}\n```\n", description="canary analysis")
    shutil.rmtree(SERVING_DIR / "models", ignore_errors=True)  # copies; the registry keeps the originals
    return {**outcome, "stats": stats, "reasons": decision.reasons}
