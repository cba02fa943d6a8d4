"""What the plane keeps on disk in its state folder: the routing (`state.json`, rewritten
atomically on every change, so a crash leaves the old state or the new, never half of one) and
the key its own release traffic authenticates with (`traffic.key`, readable by its owner only)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("serving.plane")
HISTORY_KEPT = 200  # events in the state file; the full release history goes to MLflow and Prefect


class PlaneError(RuntimeError):
    """An admin operation that cannot be done as asked (answered 409 with this message)."""


@dataclass
class RoutingState:
    """What `state.json` holds: enough to route exactly as before after a restart."""

    stable: str | None = None  # version
    canary: str | None = None
    weight: float = 0.0
    mirror: bool = False
    replicas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # version -> replica records
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "RoutingState | None":
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise PlaneError(f"{path} is not a routing state this plane wrote ({exc}); move it aside to start from the registry's champion") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        os.replace(tmp, path)


class History:
    """The plane's events (started, adopted, canary attached, promoted, restarted, ...), the
    latest HISTORY_KEPT of them, each logged as it happens."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events: list[dict[str, Any]] = list(events or [])

    def add(self, what: str, **detail: Any) -> None:
        entry = {"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "event": what, **detail}
        self.events.append(entry)
        del self.events[:-HISTORY_KEPT]
        log.info("%s %s", what, json.dumps(detail))


def traffic_key(state_dir: Path) -> str:
    """The key the plane's own release traffic sends (synthetic users topping up a canary's
    evidence): the gateway accepts it whatever keys clients need (a keys file, $GATEWAY_API_KEY),
    and the release reads it through the admin API. Kept across restarts of the plane."""
    path = state_dir / "traffic.key"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = "sk-plane-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key
