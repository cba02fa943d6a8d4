"""The Grafana dashboards' views without Grafana: every panel of `monitoring/dashboards/*.json`
queried from Prometheus (`query_range`) and drawn with matplotlib, one PNG per dashboard.

A flow calls `publish_dashboards(prometheus_url, run_id)` (after a release, say): the PNGs go to
the MLflow run as artifacts under `monitoring/` and to the Prefect run page as one markdown
artifact with the pictures inline. `panel_data` is what tests/monitoring/ checks: every panel's
queries, with the series Prometheus returned for each.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"


def dashboards(folder: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus_url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30, trust_env=False)
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or json.dumps(labels)


def panel_data(prometheus_url: str, dashboard: dict[str, Any], minutes: float = 60, end: float | None = None) -> list[dict[str, Any]]:
    """[{title, unit, targets: [{expr, series: [(legend, [(t, value)...])]}]}] for every panel."""
    end = end or time.time()
    start = end - 60 * minutes
    step = max(1.0, 60 * minutes / 240)  # ~240 points a line
    out = []
    for p in dashboard["panels"]:
        targets = []
        for t in p.get("targets", []):
            series = []
            for s in query_range(prometheus_url, t["expr"], start, end, step):
                points = [(float(ts), float(v)) for ts, v in s["values"]]
                series.append((legend(t.get("legendFormat", ""), s["metric"]), points))
            targets.append({"expr": t["expr"], "series": series})
        out.append({"title": p["title"], "unit": p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""), "targets": targets})
    return out


def render(prometheus_url: str, dashboard: dict[str, Any], out: Path, minutes: float = 60, end: float | None = None) -> Path:
    """One PNG of a dashboard: its panels in a grid of two columns, like Grafana's layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import UTC, datetime

    panels = panel_data(prometheus_url, dashboard, minutes, end)
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    fig.suptitle(dashboard["title"], fontsize=13)
    for ax, p in zip(axes.flat, panels):
        drawn = 0
        for t in p["targets"]:
            for name, points in t["series"]:
                finite = [(datetime.fromtimestamp(ts, UTC), v) for ts, v in points if math.isfinite(v)]
                if finite:
                    ax.plot(*zip(*finite), label=name[:60], linewidth=1.2)
                    drawn += 1
        ax.set_title(p["title"] + (f" ({p['unit']})" if p["unit"] not in ("", "short") else ""), fontsize=9)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def render_all(prometheus_url: str, out_dir: Path, minutes: float = 60, end: float | None = None) -> list[Path]:
    return [render(prometheus_url, d, Path(out_dir) / f"{name}.png", minutes, end) for name, d in dashboards().items()]


def publish_dashboards(prometheus_url: str, run_id: str | None = None, out_dir: Path = Path(".serving/monitoring/png"), minutes: float = 60) -> list[Path]:
    """Render every dashboard; log them to the MLflow run `run_id` (under monitoring/) and, inside
    a Prefect run, as one markdown artifact with the pictures inline."""
    paths = render_all(prometheus_url, out_dir, minutes)
    if run_id:
        from registry.store import client

        for p in paths:
            client().log_artifact(run_id, str(p), "monitoring")
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        from prefect.artifacts import create_markdown_artifact

        images = "\n\n".join(f"### {p.stem}\n\n![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})" for p in paths)
        create_markdown_artifact(key="monitoring", markdown=f"## serving, the last {minutes:g} minutes\n\n{images}\n", description="dashboards rendered from Prometheus")
    return paths
