"""Registry commands for people (`lifecycle ...`, or `python -m registry.cli ...`): which version
is where, what made it, rebuild it, serve the champion, roll back.

    lifecycle status                # champion, previous, candidate: metrics, ages, release history
    lifecycle lineage 3             # raw sources -> stages -> version 3, as text and lineage-v3.png
    lifecycle reproduce 3           # rebuild version 3 in a scratch worktree; do all hashes match?
    python -m registry.cli show       # the aliases alone (short status)
    python -m registry.cli serve      # the champion alone on serve.host:serve.port (no plane)
    python -m registry.cli rollback --reason "p95 doubled"   # champion <- previous, switched live on a running plane (make rollback);
                                      # the version taken out is marked rolled_back: its bytes are not released again unapproved
    python -m registry.cli approve 7 --reason "flaky canary host, re-run"   # lift a rejection
    lifecycle traffic 3 --since 2h  # the record of every answer: counts and the newest rows (version 3, last 2 hours)
    lifecycle traffic --since 1d --export data/raw/traffic.jsonl   # a window as a dataset data.sources reads (format openai)
    lifecycle forget sk-...         # delete a key's recorded completions (the key or its key id)
    lifecycle feedback [3]          # feedback on answers (POST /v1/feedback): counts by kind, version, rating, review decision
    lifecycle keys create|list|revoke|rotate|migrate   # API keys, stored hashed, with scopes (registry/access_cli.py)
    lifecycle audit [verify]        # who promoted, rolled back, approved, changed keys, called /admin (registry/audit.py)

rollback, approve and forget need an admin key in $LIFECYCLE_KEY once serve.keys_file holds one
(registry/authority.py): refused with exit 3 otherwise, and the attempt audited.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from pipelines.config import ConfigError, load_params
from registry.models import CANDIDATE, CHAMPION, PREVIOUS, STATUS, approve, by_alias, download, metrics_of, rollback
from registry import audit
from registry.authority import authorize
from registry.store import exit_if_unreadable
from serving import auth


def show(name: str) -> None:
    for alias in (CHAMPION, PREVIOUS, CANDIDATE):
        mv = by_alias(name, alias)
        detail = f"version {mv.version}  {metrics_of(mv)}  git {mv.tags.get('lineage.git_sha', '?')[:8]}" if mv else "-"
        print(f"{alias:>9}: {detail}")


def age(ms: int | str) -> str:
    seconds = max(0, time.time() - int(ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def release_history(mv) -> dict | None:
    uri = mv.tags.get("release.history")
    if not uri:
        return None
    import mlflow

    from registry.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.artifacts.load_dict(uri)
    except Exception:  # a history whose artifact is gone is not worth failing `status` for
        return None


def status(name: str, recent: int = 5) -> None:
    from pipelines.redact import redact_url
    from registry.store import client, tracking_uri

    print(f"{name}  (registry {redact_url(tracking_uri())})")
    for alias in (CHAMPION, PREVIOUS, CANDIDATE):
        mv = by_alias(name, alias)
        if mv is None:
            print(f"{alias:>10}: -")
            continue
        metrics = "  ".join(f"{k} {v:.3f}" for k, v in sorted((metrics_of(mv) or {}).items()))
        print(f"{alias:>10}: v{mv.version}  registered {age(mv.creation_timestamp)}  git {mv.tags.get('lineage.git_sha', '?')[:8]}  {mv.tags.get('recipe', '')}")
        if metrics:
            print(f"{'':>12}{metrics}")
    try:
        versions = sorted(client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
    except Exception:
        versions = []
    if not versions:
        print("no versions yet: run `make pipeline`")
        return
    print(f"\nlatest {min(recent, len(versions))} of {len(versions)} version(s):")
    for mv in versions[:recent]:
        why = (mv.tags.get(f"{STATUS}.reason") or "").splitlines()[0][:90] if mv.tags.get(f"{STATUS}.reason") else ""
        print(f"  v{mv.version:<4} {mv.tags.get(STATUS, '?'):<12} {age(mv.creation_timestamp):<12} {why}")
    champion = by_alias(name, CHAMPION)
    history = release_history(champion) if champion else None
    if history:
        steps = " -> ".join(f"{s.get('weight')}%" for s in history.get("steps", []))
        print(f"\nrelease of the champion v{history['version']}: {history['outcome']} {history.get('finished_at', '')} via {history.get('where', '?')}")
        if steps:
            print(f"  steps {steps}; stable before: v{history.get('stable_before')}")


def lineage_cmd(name: str, version: str, out: Path | None) -> None:
    from registry.graph import lineage_text, plot_lineage
    from registry.lineage import NoRecord, load_record
    from registry.store import client

    c = client()
    try:
        mv = c.get_model_version(name, str(version))
    except Exception:
        raise SystemExit(f"model '{name}' has no version {version}: `lifecycle status` lists them")
    try:
        record = load_record(mv.run_id)
    except NoRecord as exc:
        raise SystemExit(f"version {version} has no lineage record ({exc}); its lineage.* tags are all there is: python -m registry.cli show")
    print(lineage_text(name, mv, record), end="")
    png = plot_lineage(name, mv, record, out or Path(f"lineage-v{mv.version}.png"))
    print(f"graph: {png}")


def reproduce_cmd(name: str, version: str, scratch: Path | None, keep: bool) -> int:
    from registry.lineage import NoRecord
    from registry.reproduce import ReproduceError, render, reproduce

    try:
        report = reproduce(name, version, scratch=scratch, keep=keep)
    except (NoRecord, ReproduceError) as exc:
        print(f"cannot reproduce version {version}: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    return 0 if report["matched"] else 1


def after_rollback(params, old: str, new: str, where: str, who: str) -> None:
    """A rollback by hand is news too: both versions' cards say it, and the webhook hears it."""
    from registry.card import refresh
    from tasks.notify import notify

    name = params.registry.model_name
    for version in (old, new):
        if version != "none":
            refresh(name, version)
    notify(params, "rolled_back", f"rolled back by hand ({who}): version {new} is champion again, version {old} taken out, via {where}", version=old, champion=new, by=who)


def rollback_plane(params, plane, reason: str = "", who: str | None = None) -> None:
    """`make rollback` on a running plane: start `previous`'s engine beside the champion, check it
    answers, move the aliases (the old champion's status: rolled_back, with `reason`), then
    switch all traffic to it; the old champion leaves rotation at once, drains and stops. No
    restart, and no request is dropped (the gateway keeps serving, queued requests included)."""
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
    who = who or getpass.getuser()
    old, new = rollback(name, reason, who)
    plane.promote()
    after_rollback(params, old, new, f"the running plane at {plane.base_url}", who)
    print(f"rolled back '{name}': version {new} now serves all traffic at {plane.base_url} (version {old} drained and stopped)")


def serve(params) -> None:
    name = params.registry.model_name
    mv = by_alias(name, CHAMPION)
    if mv is None:
        raise SystemExit(f"model '{name}' has no champion yet: run `make pipeline` first")
    model_dir = download(mv, Path(".serving/models") / f"v{mv.version}")
    served = f"{name}"
    guarded = " (requires $SERVING_API_KEY)" if auth.backend_key() else ""
    cfg = params.serve
    tls = ["--tls-certfile", cfg.tls_certfile, "--tls-keyfile", cfg.tls_keyfile] if cfg.tls_certfile else []
    print(f"serving {name} version {mv.version} as '{served}' on {'https' if tls else 'http'}://{cfg.host}:{cfg.port}/v1{guarded}")
    if cfg.engine == "cpu":
        from serving.server import main as serve_main

        offloaded = ["--tls-offloaded"] if cfg.tls_offloaded else []
        serve_main(["--model-dir", str(model_dir), "--model-name", served, "--host", cfg.host, "--port", str(cfg.port), "--max-new-tokens", str(cfg.max_new_tokens), *tls, *offloaded])
    else:
        from serving.launcher import engine_command, engine_key_env, require_engine

        require_engine(cfg.engine)
        cmd = engine_command(cfg.engine, str(model_dir), served, cfg.host, cfg.port)
        if tls and cfg.engine == "vllm":
            cmd += ["--ssl-certfile", cfg.tls_certfile, "--ssl-keyfile", cfg.tls_keyfile]  # vLLM's own uvicorn serves it
        elif tls:
            raise SystemExit(f"serve.tls_certfile: {cfg.engine} does not serve TLS itself here; terminate TLS in front of it (serve.tls_offloaded: true) or serve through the plane (make serve)")
        # $SERVING_API_KEY guards every engine alike (vLLM reads it as $VLLM_API_KEY); never in argv.
        os.execvpe(cmd[0], cmd, {**os.environ, **engine_key_env(cfg.engine, dict(os.environ))})


def record_store(params, where: str | None):
    """The record's store: --store, else $record.store_env / record.store, else the plane's file.
    A SQLite file that does not exist yet is not created here: nothing was recorded."""
    from serving.plane.operations import STATE_DIR
    from serving.record import StoreError, open_store
    from serving.record.recorder import STORE_FILE
    from serving.record.store import POSTGRES_SCHEMES

    target = where or params.record.store_url() or str(STATE_DIR / STORE_FILE)
    if not target.startswith(POSTGRES_SCHEMES) and not Path(target.removeprefix("sqlite:///")).exists():
        raise SystemExit(f"no record at {target} yet: the plane (`make serve`) records every answer there (record.store in params.yaml, or --store)")
    try:
        return open_store(target)
    except StoreError as exc:
        raise SystemExit(str(exc)) from None


def traffic_cmd(params, args) -> None:
    from serving.record import Filters, key_id
    from serving.record.report import parse_time, render
    from serving.record.schema import KEY_ID

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise SystemExit(f"--since/--until: {exc}") from None
    kid = None
    if args.key:
        kid = args.key if KEY_ID.match(args.key) else key_id(args.key)
        if kid != args.key:
            print(f"key {args.key[:6]}… has key id {kid} (for record.opt_out_keys)")
    filters = Filters(version=args.version, key_id=kid, tier=args.tier, finish_reason=args.finish_reason, since=since, until=until)
    with record_store(params, args.store) as store:
        if args.export:
            n = store.export(args.export, filters)
            print(f"exported {n:,} answered completion(s) to {args.export}: OpenAI messages JSONL, read by data.sources as "
                  f"{{name: traffic, path: {args.export}, format: openai}} (provenance: completion_id, version, tier)")
            return
        print(render(store, filters, args.limit))


def forget_cmd(params, key: str, where: str | None, who: str | None = None) -> None:
    """Delete every recorded completion of a key, given as the key itself or its key id (an
    audit entry: a deletion of users' data is a data operation someone must answer for)."""
    from serving.record import key_id
    from serving.record.schema import KEY_ID

    ids = {key_id(key)} | ({key} if KEY_ID.match(key) else set())
    with record_store(params, where) as store:
        gone = sum(store.delete_key(i) for i in sorted(ids))
        audit.record("forget", who, reason=f"deleted {gone} recorded completion(s) of key id {' or '.join(sorted(ids))}", evidence=str(store), key_ids=sorted(ids), rows=gone)
        print(f"forgot {gone:,} completion(s) of key id {' or '.join(sorted(ids))} in {store} (files exported before are not touched)")


def feedback_cmd(params, version: str | None, where: str | None) -> None:
    """Counts of the feedback (explicit and implicit) by kind, answering version, rating and
    review decision (None: not reviewed yet); VERSION: only on that version's answers."""
    from serving.record.feedback import FeedbackFilters

    filters = FeedbackFilters(kind=None, version=version)
    with record_store(params, where) as store:
        kinds = store.count_feedback_by("kind", filters)
        print(f"{sum(kinds.values()):,} feedback in {store}" + (f" on version {version}'s answers" if version else ""))
        if not kinds:
            return
        for column in ("kind", "signal", "version", "rating", "decision"):
            counts = store.count_feedback_by(column, filters)
            print(f"  by {column:<9} " + "  ".join(f"{'-' if value is None else value}: {n:,}" for value, n in counts.items()))


CHANGES = ("rollback", "approve", "forget")  # the commands that need an admin key where there are admin keys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("keys", "audit"):  # subcommands of their own (registry/access_cli.py)
        from registry.access_cli import main as access_main

        sys.exit(access_main(argv))
    parser = argparse.ArgumentParser(prog="lifecycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "lineage", "reproduce", "show", "serve", "rollback", "approve", "traffic", "forget", "feedback"])
    parser.add_argument("version", nargs="?", metavar="VERSION|KEY", help="lineage, reproduce: the version; approve: the version whose rejection a person overrides; traffic, feedback: only this version's completions; forget: the API key (or its key id) whose completions are deleted")
    parser.add_argument("--reason", default="", help="approve: why it may be released despite its status; rollback: why the champion is taken out (both recorded on the version)")
    parser.add_argument("--out", type=Path, help="lineage: where the graph image goes (default lineage-v<N>.png)")
    parser.add_argument("--scratch", type=Path, help="reproduce: the scratch worktree (default: a folder under the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="reproduce: keep the scratch worktree even when every hash matches")
    parser.add_argument("--since", help="traffic: from this time: how long ago (90s, 30min, 2h, 7d) or ISO 8601 (UTC unless zoned)")
    parser.add_argument("--until", help="traffic: before this time (same spellings)")
    parser.add_argument("--key", help="traffic: only this key's completions (the key, or its key id; the id is printed)")
    parser.add_argument("--tier", help="traffic: only this tier's completions")
    parser.add_argument("--finish-reason", help="traffic: only completions that finished so (stop, length, error, aborted)")
    parser.add_argument("--limit", type=int, default=20, help="traffic: newest rows shown (default 20)")
    parser.add_argument("--export", type=Path, help="traffic: write the matching answered completions to this file as OpenAI messages JSONL (a data source)")
    parser.add_argument("--store", help="traffic, forget, feedback: the record's store (a SQLite path or postgresql:// URL; default: record.store, else .serving/plane/record.sqlite3)")
    args = parser.parse_args(argv)
    if args.command in ("approve", "lineage", "reproduce") and not args.version:
        parser.error(f"{args.command} needs a VERSION (`lifecycle status` lists them)")
    if args.command == "forget" and not args.version:
        parser.error("forget needs a KEY: the API key whose recorded completions are deleted, or its key id")
    try:
        params = load_params()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    try:
        run_command(args, params)
    except Exception as exc:
        exit_if_unreadable(exc, f"lifecycle {args.command}: ", 2)
        raise


def run_command(args: argparse.Namespace, params) -> None:
    name = params.registry.model_name
    # What changes serving, the registry or the record asks for an admin key once the project
    # has admin keys (registry/authority.py), before anything changes.
    who = authorize(args.command, params.serve.keys_file) if args.command in CHANGES else None
    if args.command == "traffic":
        traffic_cmd(params, args)
    elif args.command == "forget":
        forget_cmd(params, args.version, args.store, who)
    elif args.command == "feedback":
        feedback_cmd(params, args.version, args.store)
    elif args.command == "status":
        status(name)
    elif args.command == "lineage":
        lineage_cmd(name, args.version, args.out)
    elif args.command == "reproduce":
        sys.exit(reproduce_cmd(name, args.version, args.scratch, args.keep))
    elif args.command == "show":
        show(name)
    elif args.command == "serve":
        serve(params)
    elif args.command == "approve":
        mv = approve(name, args.version, args.reason, who)
        print(f"approved version {mv.version} (was {mv.tags.get(STATUS)}): {args.reason}; the next run may release it again")
    elif params.serve.target == "kserve":  # rendered first: a render error moves no aliases
        from serving.kserve import write_rollback

        champ, prev = by_alias(name, CHAMPION), by_alias(name, PREVIOUS)
        if champ is None or prev is None:
            raise SystemExit(f"model '{name}' has no 'previous' version to roll back to")
        paths = write_rollback(params, str(champ.version), str(prev.version))
        old, new = rollback(name, args.reason, who)
        after_rollback(params, old, new, f"KServe manifest {paths[0]}", who)
        print(f"rolled back '{name}' to version {new}: kubectl apply -f {paths[0]} (KServe's rollback), or {paths[1]} to declare version {new} again")
    else:
        from serving.plane_client import discover

        plane = discover(params)
        if plane is not None:
            try:
                rollback_plane(params, plane, args.reason, who)
            finally:
                plane.close()
            return
        old, new = rollback(name, args.reason, who)
        after_rollback(params, old, new, "the registry's aliases (no plane was running)", who)
        print(f"rolled back '{name}': champion is now version {new} (was {old}); no plane is running, so `make serve` will serve it")


if __name__ == "__main__":
    main()
