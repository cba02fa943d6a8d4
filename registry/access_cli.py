"""`lifecycle keys ...` and `lifecycle audit ...`: who may call the gateway, and what was done.

    lifecycle keys create --tier gold --scopes inference,feedback [--expires 90d|2027-01-01] [--note "team a"]
    lifecycle keys list                         # ids, tiers, scopes, expiry: never a key
    lifecycle keys revoke 3f9a2c1d0b7e6a55      # by id; refused on the next request
    lifecycle keys rotate 3f9a2c1d0b7e6a55      # a new key, same tier/scopes/expiry; the old one stops working
    lifecycle keys migrate                      # hash a plain-text keys file in place (clients keep their keys)
    lifecycle audit [--action promote] [--who alice] [--version 4] [--since 2d] [--limit 50]
    lifecycle audit verify                      # exit 1 and the line where the chain breaks

The keys file is --file, else serve.keys_file in params.yaml. A new key is printed once, at
create and rotate; the file keeps its HMAC only (serving/keys.py). Every change is an audit
entry (registry/audit.py) by the OS user. A running gateway reloads the file on its next request.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from registry.audit import AuditLog, os_user
from registry.authority import authorize
from serving.keys import SCOPES, KeysDocument, KeysFileError, load_keys, migrate

DURATION = re.compile(r"^(\d+)\s*(min|h|d)$")


def parse_when(text: str, *, future: bool) -> datetime.datetime:
    """A duration (90min, 12h, 30d) from now (ahead if `future`, else back), or an ISO 8601 time (UTC unless zoned)."""
    m = DURATION.match(text.strip())
    now = datetime.datetime.now(datetime.UTC)
    if m:
        unit = {"min": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        delta = datetime.timedelta(**{unit: int(m.group(1))})
        return now + delta if future else now - delta
    try:
        stamp = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise SystemExit(f"{text!r} is neither a duration (90min, 12h, 30d) nor an ISO 8601 time (2027-01-01T00:00:00+00:00)") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)


def keys_path(args) -> Path:
    if args.file:
        return Path(args.file)
    from pipelines.config import ConfigError, load_params

    try:
        found = load_params().serve.keys_file
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if not found:
        raise SystemExit("no keys file: set serve.keys_file in params.yaml (e.g. .serving/keys.yaml, out of git) or pass --file")
    return Path(found)


def keys_cmd(args, audit: AuditLog) -> int:
    path = keys_path(args)
    # A change of who may call asks for an admin key once the file holds one (the first admin
    # key is made by the OS user): registry/authority.py.
    who = None if args.action == "list" else authorize(f"keys {args.action}", path, audit)
    try:
        if args.action == "list":
            table = load_keys(path)
            if table.legacy:
                print(f"{path} holds plain-text keys: `lifecycle keys migrate --file {path}` hashes them")
            print(f"{len(table)} key(s) in {path}")
            for e in sorted(table.entries(), key=lambda e: e.id):
                expiry = "" if e.expires is None else (" EXPIRED " if e.expired() else " expires ") + e.expires.isoformat(timespec="seconds")
                print(f"  {e.id}  tier {e.tier.name:<8} scopes {','.join(sorted(e.scopes, key=SCOPES.index)):<36}{expiry}" + (f"  ({e.note})" if e.note else ""))
            return 0
        if args.action == "migrate":
            ids = migrate(path)
            audit.append("key_migrate", who, reason=args.reason, evidence=str(path), keys=ids)
            print(f"hashed {len(ids)} key(s) in {path} (scopes inference, feedback); the clients keep their keys")
            return 0
        if args.action == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            expires = parse_when(args.expires, future=True) if args.expires else None
            doc = KeysDocument.open(path, create=True)
            kid, key = doc.add(args.tier, scopes, expires, args.note)
            doc.save()
            audit.append("key_create", who, reason=args.reason, evidence=str(path), key_id=kid, tier=args.tier, scopes=scopes, expires=expires and expires.isoformat(timespec="seconds"))
            print(f"created key {kid} (tier {args.tier}, scopes {','.join(scopes)}{', expires ' + expires.isoformat(timespec='seconds') if expires else ''}) in {path}")
            print(f"the key (shown once, not stored): {key}")
            return 0
        if not args.key_id:
            raise SystemExit(f"keys {args.action} needs a key id (`lifecycle keys list` shows them)")
        doc = KeysDocument.open(path)
        old = doc.remove(args.key_id)
        if args.action == "revoke":
            doc.save()
            audit.append("key_revoke", who, reason=args.reason, evidence=str(path), key_id=args.key_id, tier=old["tier"], scopes=old["scopes"])
            print(f"revoked key {args.key_id} in {path}: gateways reading it refuse it from their next request")
            return 0
        expires = old.get("expires")
        kid, key = doc.add(old["tier"], old["scopes"], None, old.get("note"))
        if expires:
            doc.raw["keys"][kid]["expires"] = str(expires)
        doc.save()
        audit.append("key_rotate", who, reason=args.reason, evidence=str(path), key_id=kid, replaces=args.key_id, tier=old["tier"], scopes=old["scopes"])
        print(f"rotated key {args.key_id} -> {kid} (tier {old['tier']}, scopes {','.join(old['scopes'])}) in {path}; the old key stops working now")
        print(f"the new key (shown once, not stored): {key}")
        return 0
    except KeysFileError as exc:
        print(exc, file=sys.stderr)
        return 2


def audit_cmd(args, audit: AuditLog) -> int:
    if args.action == "verify":
        verdict = audit.verify()
        print(verdict.message, file=sys.stdout if verdict.ok else sys.stderr)
        return 0 if verdict.ok else 1
    since = parse_when(args.since, future=False) if args.since else None
    shown = []
    for e in audit.entries():
        if args.action_filter and e.get("action") != args.action_filter:
            continue
        if args.who and args.who not in str(e.get("who", "")):
            continue
        if args.version and str(e.get("version")) != args.version:
            continue
        if since and datetime.datetime.fromisoformat(e["at"]) < since:
            continue
        shown.append(e)
    shown = shown[-args.limit:] if args.limit else shown
    if args.json:
        for e in shown:
            print(json.dumps(e))
        return 0
    print(f"{len(shown)} entr{'y' if len(shown) == 1 else 'ies'} of {audit.path}")
    for e in shown:
        extra = "  ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items() if v not in (None, [], ""))
        print(f"  #{e.get('seq')} {e.get('at', '')[:19]} {e.get('who')}: {e.get('action')}" + (f" v{e['version']}" if e.get("version") else "")
              + (f"  why: {e['reason']}" if e.get("reason") else "") + (f"  evidence: {e['evidence']}" if e.get("evidence") else "") + (f"  {extra}" if extra else ""))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lifecycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create, list, revoke, rotate or migrate API keys")
    keys.add_argument("action", choices=["create", "list", "revoke", "rotate", "migrate"])
    keys.add_argument("key_id", nargs="?", help="revoke, rotate: the key's id (`lifecycle keys list`)")
    keys.add_argument("--file", help="the keys file (default: serve.keys_file in params.yaml)")
    keys.add_argument("--tier", default="free", help="create: the key's tier (a name under 'tiers' in the file; default free)")
    keys.add_argument("--scopes", default="inference,feedback", help=f"create: comma-separated, of {', '.join(SCOPES)} (default inference,feedback)")
    keys.add_argument("--expires", help="create: when the key stops working: a duration from now (90min, 12h, 30d) or an ISO 8601 time")
    keys.add_argument("--note", help="create: who or what the key is for (kept in the file)")
    keys.add_argument("--reason", help="why (recorded in the audit log)")
    aud = sub.add_parser("audit", help="list or verify the audit log")
    aud.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    aud.add_argument("--action", dest="action_filter", help="only this action (promote, rollback, approve, key_create, admin_call, ...)")
    aud.add_argument("--who", help="only entries whose 'who' contains this")
    aud.add_argument("--version", help="only this model version's entries")
    aud.add_argument("--since", help="only entries newer than this: how long ago (90min, 2h, 7d) or an ISO 8601 time")
    aud.add_argument("--limit", type=int, default=50, help="newest entries shown (0: all; default 50)")
    aud.add_argument("--json", action="store_true", help="the entries as JSON lines")
    for p in (keys, aud):
        p.add_argument("--log", help=f"the audit log (default: $LIFECYCLE_AUDIT_LOG, else .serving/audit.jsonl); who: {os_user()}")
    args = parser.parse_args(argv)
    audit = AuditLog(args.log)
    return keys_cmd(args, audit) if args.command == "keys" else audit_cmd(args, audit)
