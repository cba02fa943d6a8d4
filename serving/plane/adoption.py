"""Engines a previous plane left running, found through its state file.

A plane that crashed (SIGKILL, an OOM kill) leaves its engines serving: they run in their own
process groups. The next plane adopts them when every replica of a version still answers for
that version's served name, and routes exactly as before; it stops those of versions it no
longer routes, so a crash never leaks an engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from serving import auth
from serving.plane.engines import Replica, healthy
from serving.routing import Backend


class Adopted:
    """An engine process this plane did not start: watched and stopped through its pid and
    process group, like a ServerProcess."""

    def __init__(self, pid: int, root_url: str) -> None:
        self.pid, self.root_url = pid, root_url

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return -1
        except PermissionError:  # alive, another user's: not ours to adopt, but alive
            return None
        return None

    def stop(self, timeout_s: float = 10) -> int | None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + timeout_s
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.poll() is not None:
                return -1
        return -1


def adopt(version: str, records: list[dict[str, Any]]) -> list[Replica] | None:
    """The engines a previous plane left running for `version`, if every one still answers."""
    adopted = []
    for rec in records:
        if not rec.get("pid") or not healthy(rec["url"], rec["model"]):
            return None
        backend = Backend(rec["name"], rec["url"], rec["model"], api_key=auth.backend_key(), version=version)
        adopted.append(Replica(version, backend, Adopted(int(rec["pid"]), backend.base_url), rec.get("restarts", 0)))
    return adopted or None


def stop_orphans(records: dict[str, list[dict[str, Any]]], keep: set[str | None]) -> None:
    """Engines a crashed plane left for versions no longer routed: stopped, not leaked."""
    for version, recs in records.items():
        if version in keep:
            continue
        for rec in recs:
            if rec.get("pid") and healthy(rec["url"], rec["model"]):
                Adopted(int(rec["pid"]), rec["url"]).stop()
