"""What `lifecycle traffic` prints: counts of the matching completions and a table of the newest,
and the time arguments it takes (`2h` ago, or an ISO 8601 time)."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

from serving.record.schema import Filters, Row
from serving.record.store import Store

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|min|h|d)$")
_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds of `90s`, `30min`, `2h`, `7d` (that long ago) or an ISO 8601 time (without a
    zone: UTC). ValueError says which spellings work."""
    m = _AGO.match(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: write how long ago (90s, 30min, 2h, 7d) or an ISO 8601 time (2026-12-01T08:00, UTC unless it names a zone)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def prompt_excerpt(row: Row, width: int = 40) -> str:
    """The last user turn of a chat (or a text prompt), on one line, cut to `width`."""
    try:
        prompt = json.loads(row.prompt)
    except ValueError:
        prompt = row.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"] or prompt
        content = users[-1].get("content")
        prompt = content if isinstance(content, str) else json.dumps(content)
    elif isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    text = " ".join(str(prompt).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def describe(filters: Filters) -> str:
    parts = [f"{name.replace('_', ' ')} {value}" for name, value in (("version", filters.version), ("key id", filters.key_id), ("tier", filters.tier), ("finish reason", filters.finish_reason)) if value is not None]
    if filters.since is not None:
        parts.append(f"since {when(filters.since)}")
    if filters.until is not None:
        parts.append(f"until {when(filters.until)}")
    return ", ".join(parts) or "all"


def render(store: Store, filters: Filters, shown: int) -> str:
    """Counts by version, finish reason, tier and status, then the newest `shown` rows."""
    total = store.count(filters)
    lines = [f"{total:,} completion(s) in {store} ({describe(filters)})"]
    if not total:
        return "\n".join(lines)
    for column in ("version", "finish_reason", "tier", "status"):
        counts = store.counts_by(column, filters)
        lines.append(f"  by {column.replace('_', ' '):<14} " + "  ".join(f"{value}: {n:,}" for value, n in counts.items()))
    rows = store.query(Filters(**{**filters.__dict__, "limit": shown}))
    lines.append(f"\nnewest {len(rows)}:")
    header = f"  {'time (UTC)':<19}  {'id':<41}  {'version':<7}  {'tier':<9}  {'key id':<16}  {'finish':<7}  {'tokens':>9}  {'latency':>8}  {'cache':<5}  {'status':<6}  prompt"
    lines.append(header)
    for r in rows:
        tokens = f"{r.prompt_tokens if r.prompt_tokens is not None else '?'}+{r.completion_tokens if r.completion_tokens is not None else '?'}"
        lines.append(
            f"  {when(r.ts):<19}  {r.id:<41}  {str(r.version):<7}  {r.tier:<9}  {r.key_id or '-':<16}  {str(r.finish_reason):<7}  {tokens:>9}  "
            f"{1000 * r.latency_s:6.0f}ms  {'hit' if r.cache_hit else '-':<5}  {r.status:<6}  {prompt_excerpt(r)}"
        )
    return "\n".join(lines)
