"""Registry commands for people: which version is where, serve the champion, roll back.

    python -m registry.cli show       # aliases and their versions' key metrics
    python -m registry.cli serve      # the champion on serve.host:serve.port (make serve)
    python -m registry.cli rollback   # champion <- previous (make rollback)
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
        old, new = rollback(name)
        print(f"rolled back '{name}': champion is now version {new} (was {old}); restart `make serve` to serve it")


if __name__ == "__main__":
    main()
