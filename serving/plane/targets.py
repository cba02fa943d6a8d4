"""What Prometheus scrapes in a plane: its gateway and every engine replica, as a file-based
service-discovery list (Prometheus' `file_sd` JSON), `<state_dir>/targets.json`.

The plane rewrites it whenever its replicas or routing change (start, a canary attached,
promoted or rolled back, a replica restarted by the supervisor or drained, a scale-up, stop),
atomically, so Prometheus (monitoring/, `make monitor`) picks up a restarted replica's new port
without a reload: it watches the file. Each target carries the labels the recording rules
aggregate by: `model` (the public model name), `plane` (the state folder's name) and, for an
engine, `version`, `replica` and `role` (stable, canary, or leaving while a version drains).
The engines' own series have no version: these labels give them one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from serving.netaddr import local_address

TARGETS_FILE = "targets.json"


def scrape_targets(
    public_model: str, plane: str, gateway_address: str | None, replicas: list[tuple[str, str, str]], stable: str | None, canary: str | None,
    gateway_scheme: str = "http",
) -> list[dict[str, Any]]:
    """file_sd target groups: the gateway (when its address is known) and one group per replica,
    given as (replica name, version, root URL). A gateway serving TLS carries `__scheme__:
    https`, which Prometheus scrapes it with (the job's tls_config says what to trust:
    monitoring/render.py); the engines behind it are on loopback, in plain http."""
    groups: list[dict[str, Any]] = []
    if gateway_address:
        labels = {"job": "gateway", "model": public_model, "plane": plane}
        if gateway_scheme != "http":
            labels["__scheme__"] = gateway_scheme
        groups.append({"targets": [gateway_address], "labels": labels})
    for name, version, url in replicas:
        role = "stable" if version == stable else "canary" if version == canary else "leaving"
        groups.append({
            "targets": [url.split("://", 1)[-1].rstrip("/")],
            "labels": {"job": "engine", "model": public_model, "plane": plane, "version": version, "role": role, "replica": name},
        })
    return groups


def write_targets(path: Path, groups: list[dict[str, Any]]) -> None:
    """Replace the file in one step: Prometheus never reads half a list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    os.replace(tmp, path)


def scrape_address(host: str, port: int) -> str:
    """host:port Prometheus reaches a listener on (a wildcard bind is reached on loopback)."""
    return f"{local_address(host)}:{port}"
