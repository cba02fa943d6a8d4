"""Registry commands for people: which version is where, serve the champion, roll back.

    python -m registry.cli show       # aliases and their versions' key metrics
    python -m registry.cli serve      # the champion alone on serve.host:serve.port (no plane)
    python -m registry.cli rollback   # champion <- previous, switched live on a running plane (make rollback)
    python -m registry.cli approve 7 --reason "flaky canary host, re-run"   # lift a rejection
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from pipelines.config import ConfigError, load_params
from registry.models import CANDIDATE, CHAMPION, PREVIOUS, STATUS, approve, by_alias, download, metrics_of, rollback
from serving import auth


def show(name: str) -> None:
    for alias in (CHAMPION, PREVIOUS, CANDIDATE):
        mv = by_alias(name, alias)
        detail = f"version {mv.version}  {metrics_of(mv)}  git {mv.tags.get('lineage.git_sha', '?')[:8]}" if mv else "-"
        print(f"{alias:>9}: {detail}")


def rollback_plane(params, plane) -> None:
    """`make rollback` on a running plane: start `previous`'s engine beside the champion, check it
    answers, move the aliases, then switch all traffic to it; the old champion drains and stops.
    No restart, and no request is dropped (the gateway keeps serving throughout)."""
    from pipelines.common import PREPARED
    from serving.canary import golden_prompts, probe
    from serving.plane_client import backends_of

    name = params.registry.model_name
    previous = by_alias(name, PREVIOUS)
    if previous is None:
        raise SystemExit(f"model '{name}' has no 'previous' version to roll back to")
    print(f"starting version {previous.version} in the plane at {plane.root_url} ...", flush=True)
    state = plane.attach_canary(str(previous.version), 0.0)
    target = backends_of(state, "canary")[0]
    test_file = PREPARED / "sft_test.parquet"
    prompts = golden_prompts(test_file, 5) if test_file.exists() else [("Say OK.", "")]
    checked = probe({"previous": (f"{target.base_url}/v1", target.model)}, prompts, params.serve.max_new_tokens, api_key=target.api_key)["previous"]
    if checked["error_rate"]:
        plane.rollback()
        raise SystemExit(f"version {previous.version} failed {checked['error_rate']:.0%} of its checks ({checked['errors_seen']}): not switched; the champion keeps serving")
    old, new = rollback(name)
    plane.promote()
    print(f"rolled back '{name}': version {new} now serves all traffic at {plane.base_url} (version {old} drained and stopped)")


def serve(params) -> None:
    name = params.registry.model_name
    mv = by_alias(name, CHAMPION)
    if mv is None:
        raise SystemExit(f"model '{name}' has no champion yet: run `make pipeline` first")
    model_dir = download(mv, Path(".serving/models") / f"v{mv.version}")
    served = f"{name}"
    guarded = " (requires $SERVING_API_KEY)" if auth.backend_key() else ""
    print(f"serving {name} version {mv.version} as '{served}' on http://{params.serve.host}:{params.serve.port}/v1{guarded}")
    if params.serve.engine == "cpu":
        from serving.server import main as serve_main

        serve_main(["--model-dir", str(model_dir), "--model-name", served, "--host", params.serve.host, "--port", str(params.serve.port), "--max-new-tokens", str(params.serve.max_new_tokens)])
    else:
        from serving.launcher import engine_command, engine_key_env, require_engine

        require_engine(params.serve.engine)
        cmd = engine_command(params.serve.engine, str(model_dir), served, params.serve.host, params.serve.port)
        # $SERVING_API_KEY guards every engine alike (vLLM reads it as $VLLM_API_KEY); never in argv.
        os.execvpe(cmd[0], cmd, {**os.environ, **engine_key_env(params.serve.engine, dict(os.environ))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m registry.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["show", "serve", "rollback", "approve"])
    parser.add_argument("version", nargs="?", help="approve: the version whose rejection a person overrides")
    parser.add_argument("--reason", default="", help="approve: why it may be released despite its status (recorded)")
    args = parser.parse_args(argv)
    if args.command == "approve" and not args.version:
        parser.error("approve needs a VERSION")
    try:
        params = load_params()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    name = params.registry.model_name
    if args.command == "show":
        show(name)
    elif args.command == "serve":
        serve(params)
    elif args.command == "approve":
        mv = approve(name, args.version, args.reason, getpass.getuser())
        print(f"approved version {mv.version} (was {mv.tags.get(STATUS)}): {args.reason}; the next run may release it again")
    else:
        from serving.plane_client import discover

        plane = discover(params)
        if plane is not None:
            try:
                rollback_plane(params, plane)
            finally:
                plane.close()
            return
        old, new = rollback(name)
        print(f"rolled back '{name}': champion is now version {new} (was {old}); no plane is running, so `make serve` will serve it")


if __name__ == "__main__":
    main()
