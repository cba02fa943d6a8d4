"""Who may change serving, the registry or the record from the command line.

`lifecycle rollback`, `approve`, `forget` and `lifecycle keys create|revoke|rotate|migrate` change
what users are served, which versions may come back, what is kept of their traffic and who may
call. The admin routes ask a key for the `admin` scope (serving/gateway.py); these commands ask the
same once the project has admin keys, that is once its keys file (serve.keys_file, or --file for
`lifecycle keys`) holds an unexpired key with the admin scope:

- `$LIFECYCLE_KEY` must be such a key (checked by its HMAC, scopes and expiry), or equal
  `$SERVING_ADMIN_KEY`; an environment variable, never an argument, since argv shows in `ps`;
- a missing, unknown or expired key, or one without the admin scope, is refused ("forbidden",
  exit 3) before anything changes, and the attempt is an audit entry (`cli_call`, outcome
  refused) naming the key's id or the OS user;
- an allowed command's own audit entries name the key's id beside the OS user.

A project without admin keys (a single-user machine, the embedded default) has nobody to tell
apart: the OS user acts, as the audit log's `who` says. The first admin key is made that way.
"""

from __future__ import annotations

import hmac
import os
import sys
from pathlib import Path

from registry.audit import AuditLog, os_user
from serving import auth

CLI_KEY_ENV = "LIFECYCLE_KEY"
FORBIDDEN_EXIT = 3


def admin_entries(keys_file: str | Path | None) -> list:
    """The unexpired admin-scoped entries of `keys_file` (none when it is unset or absent)."""
    if not keys_file or not Path(keys_file).is_file():
        return []
    from serving.keys import load_keys

    return [e for e in load_keys(keys_file).entries() if e.allows("admin") and not e.expired()]


def refusal(keys_file: str | Path | None) -> tuple[str | None, str | None]:
    """(who, None) when the caller may change things, else (who, why)."""
    if not admin_entries(keys_file):
        return os_user(), None
    key = os.environ.get(CLI_KEY_ENV, "").strip()
    how = (f"set ${CLI_KEY_ENV} to a key with the admin scope (`lifecycle keys create --scopes admin` by someone who holds one), "
           f"or to ${auth.ADMIN_KEY_ENV}")
    if not key:
        return os_user(), f"{keys_file} holds admin keys, so this command needs one and ${CLI_KEY_ENV} is not set: {how}"
    admin_key = auth.env_key(auth.ADMIN_KEY_ENV)
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        return f"${auth.ADMIN_KEY_ENV} ({os_user()})", None
    from serving.keys import load_keys

    entry = load_keys(keys_file).entry(key)
    if entry is None:
        return os_user(), f"${CLI_KEY_ENV} is not a key of {keys_file}: {how}"
    who = f"key {entry.id} ({os_user()})"
    if entry.expired():
        return who, f"key {entry.id} expired at {entry.expires.isoformat(timespec='seconds')}: {how}"
    if not entry.allows("admin"):
        return who, f"key {entry.id} lacks the 'admin' scope (it has {', '.join(sorted(entry.scopes))}): {how}"
    return who, None


def authorize(command: str, keys_file: str | Path | None, log: AuditLog | None = None) -> str:
    """Who runs `command`, or exit 3 ("forbidden") with the reason after auditing the attempt."""
    from serving.keys import KeysFileError

    try:
        who, why = refusal(keys_file)
    except KeysFileError as exc:  # a keys file that does not load guards nothing we could check
        print(f"lifecycle {command}: {exc}", file=sys.stderr)
        sys.exit(2)
    if why is None:
        return who
    try:
        (log or AuditLog()).append("cli_call", who, reason=why, command=command, outcome="refused", status=403)
    except OSError as exc:
        print(f"lifecycle {command}: the refused attempt could not be audited ({exc})", file=sys.stderr)
    print(f"lifecycle {command}: forbidden (403): {why}", file=sys.stderr)
    sys.exit(FORBIDDEN_EXIT)
