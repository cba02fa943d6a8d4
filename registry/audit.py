"""The audit log: who changed what users are served, when, why, and on what evidence.

One JSON object a line, appended, never rewritten: every promotion, rollback (by a canary, an
alert or by hand), approval (a person lifting a gate's or a canary's rejection: this project's
gate override), key change (`lifecycle keys`) and admin call to a gateway or plane (refused
ones too; allowed reads are not logged: the release polls them every second). An entry:

    {"seq": 7, "at": "2026-12-03T22:41:07.123456+00:00", "who": "key 3f9a2c1d0b7e6a55" | "alice" | "alertmanager",
     "action": "promote", "version": "4", "reason": "...", "evidence": "runs:/<run>/release/v4.json",
     "detail": {...}, "prev": "<sha256 of the previous line>"}

Each entry carries the SHA-256 of the line before it (the first: 64 zeros), so editing or
deleting an entry breaks the chain at the next line; `audit.jsonl.head` beside the log holds
the count and the last line's hash, so cutting entries off the end is seen too (`lifecycle audit
verify`). This makes tampering evident, not impossible: whoever can rewrite the whole file and
its head can forge a chain. Copy the head elsewhere (an MLflow tag, a ticket) to pin it.

Writers are several processes (the plane, the CLI, the alert receiver, a release flow): each
append holds an exclusive `flock` on the log while it reads the last hash and writes its line.

The log is `$LIFECYCLE_AUDIT_LOG`, else `.serving/audit.jsonl` in the project folder (beside the
plane's state). This module uses only the standard library: the gateway imports it.
"""

from __future__ import annotations

import datetime
import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUDIT_ENV = "LIFECYCLE_AUDIT_LOG"
DEFAULT_PATH = Path(".serving/audit.jsonl")
GENESIS = "0" * 64
ACTIONS = ("promote", "rollback", "approve", "key_create", "key_revoke", "key_rotate", "key_migrate", "admin_call", "cli_call", "forget")


def default_path() -> Path:
    return Path(os.environ.get(AUDIT_ENV) or DEFAULT_PATH)


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name (a container with an unnamed uid)
        return f"uid {os.getuid()}"


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class AuditLog:
    """An append-only, hash-chained JSON-lines file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.head_path = self.path.with_name(self.path.name + ".head")

    def __repr__(self) -> str:
        return f"AuditLog({self.path})"

    def append(self, action: str, who: str | None = None, *, version: str | None = None, reason: str | None = None,
               evidence: str | None = None, **detail: Any) -> dict[str, Any]:
        """Write one entry (who defaults to the OS user); returns it as written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            seq, prev = self._tail(f)
            entry = {"seq": seq + 1, "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"), "who": who or os_user(),
                     "action": action, "version": None if version is None else str(version), "reason": reason or None, "evidence": evidence or None}
            if detail:
                entry["detail"] = detail
            entry["prev"] = prev
            line = json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
            self._write_head(entry["seq"], line_hash(line))
        return entry

    def _tail(self, f) -> tuple[int, str]:
        """(seq, hash) of the last line, read backwards from the end (the log only grows)."""
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end == 0:
            return 0, GENESIS
        with open(self.path, "rb") as raw:
            size, chunk = end, 4096
            while True:
                start = max(0, size - chunk)
                raw.seek(start)
                data = raw.read(size - start).rstrip(b"\n")
                if b"\n" in data or start == 0:
                    last = data.rsplit(b"\n", 1)[-1].decode()
                    break
                chunk *= 4
        try:
            seq = int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError):
            with open(self.path, "rb") as counted:  # a damaged last line: verify reports it; the chain goes on
                seq = sum(1 for _ in counted)
        return seq, line_hash(last)

    def _write_head(self, count: int, last: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"entries": count, "last_sha256": last}) + "\n")
        os.replace(tmp, self.head_path)

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text(encoding="utf-8").splitlines()

    def entries(self) -> Iterator[dict[str, Any]]:
        for line in self.lines():
            try:
                yield json.loads(line)
            except ValueError:
                continue  # verify names it

    def verify(self) -> "Verdict":
        """Walk the chain; the first break names its line."""
        lines = self.lines()
        prev = GENESIS
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                return Verdict(False, n, f"line {n} of {self.path} is not valid JSON: it was edited or cut", len(lines))
            if not isinstance(entry, dict) or entry.get("prev") != prev:
                what = "line 1 does not start the chain" if n == 1 else f"line {n - 1} was edited, or an entry between lines {n - 1} and {n} was deleted"
                return Verdict(False, n, f"line {n} of {self.path}: its 'prev' hash does not match the line before it ({what})", len(lines))
            if entry.get("seq") != n:
                return Verdict(False, n, f"line {n} of {self.path} has seq {entry.get('seq')}, expected {n}: entries were deleted or reordered", len(lines))
            prev = line_hash(line)
        if self.head_path.exists():
            try:
                head = json.loads(self.head_path.read_text())
            except ValueError:
                return Verdict(False, len(lines), f"{self.head_path} is not valid JSON", len(lines))
            if head.get("entries") != len(lines) or head.get("last_sha256") != prev:
                if isinstance(head.get("entries"), int) and head["entries"] > len(lines):
                    why = f"{head['entries'] - len(lines)} entry(ies) after line {len(lines)} were deleted"
                else:
                    why = f"line {len(lines)} (the last) was edited, or the head was"
                return Verdict(False, len(lines), f"{self.path} does not end where {self.head_path} says (entries {head.get('entries')}, found {len(lines)}): {why}", len(lines))
        elif lines:
            return Verdict(False, len(lines), f"{self.head_path} is missing: the end of the log cannot be checked (was it deleted?)", len(lines))
        return Verdict(True, None, f"{self.path}: {len(lines)} entries, chain intact", len(lines))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: int | None  # the first line where the chain breaks
    message: str
    entries: int


def of_version(version: str, log: AuditLog | None = None) -> list[dict[str, Any]]:
    """The entries about one model version (a model card's and a release artifact's links)."""
    return [e for e in (log or AuditLog()).entries() if e.get("version") == str(version)]


def markdown(entries: list[dict[str, Any]]) -> str:
    """Entries as a Markdown table (seq, when, who, what, why, evidence)."""
    cell = lambda v: str(v or "").replace("|", "/").replace("\n", " ")[:200]  # noqa: E731
    rows = [f"| {e.get('seq')} | {cell(e.get('at'))[:19]} | {cell(e.get('who'))} | {cell(e.get('action'))} | {cell(e.get('reason'))} | {cell(e.get('evidence'))} |" for e in entries]
    return "\n".join(["| # | at (UTC) | who | what | why | evidence |", "|---|---|---|---|---|---|", *rows]) + "\n"


def record(action: str, who: str | None = None, **fields: Any) -> dict[str, Any] | None:
    """Append to the default log. An audit write that fails must not undo what was done (the
    change happened), so the failure is logged loudly and None returned."""
    import logging

    try:
        return AuditLog().append(action, who, **fields)
    except OSError as exc:
        logging.getLogger("registry.audit").error("audit log %s could not be written (%s): %s by %s was NOT recorded", default_path(), exc, action, who or os_user())
        return None
