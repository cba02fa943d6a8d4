"""What made a registered version, for people: as text (`lifecycle lineage VERSION`) and as a
graph image (logged to MLflow beside the version's model), both read from the record kept with
the version (registry/lineage.py): the dvc.lock of the run that made it, its params, its tags."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from registry.lineage import stage_graph


def _short(md5: str) -> str:
    return md5.removesuffix(".dir")[:8] + ("/" if md5.endswith(".dir") else "")


def _params_line(params: dict, width: int = 110) -> str:
    flat = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            flat.append(f"{prefix}={json.dumps(v) if not isinstance(v, str) else v}")

    walk("", params)
    line = ", ".join(flat)
    return line if len(line) <= width else line[: width - 3] + "..."


def registered_at(mv: ModelVersion) -> str:
    ts = datetime.datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, datetime.UTC)
    return ts.strftime("%Y-%m-%d %H:%M UTC")


def feedback_lines(tags: dict) -> list[str]:
    """Users' feedback behind the version (tags from pipelines/feedback_export.feedback_lineage):
    what it trained on and the held-out slice it was gated on."""
    lines = []
    for key, what in (("feedback", "trained on"), ("feedback_slice", "gated on (held out)")):
        if f"lineage.{key}.source" not in tags:
            continue
        t = lambda name: tags.get(f"lineage.{key}.{name}", "?")  # noqa: E731
        kept = f", {t('rows_trained')} kept by prepare" if f"lineage.{key}.rows_trained" in tags else ""
        lines += ["", f"feedback {what}: source {t('source')}, {t('rows')} rows ({t('tables')}){kept} from {t('feedback')} feedback",
                  f"  answers of model versions {t('versions')}   review decisions {t('decisions')}"]
    return lines


def lineage_text(name: str, mv: ModelVersion, record: dict) -> str:
    tags = mv.tags
    steps = stage_graph(record["lock"], record["dag"])
    patch_lines = len(record["patch"].splitlines())
    code = f"git {tags.get('lineage.git_sha', '?')[:12]}" + (f" + uncommitted changes ({patch_lines} patch lines, recorded)" if patch_lines else " (clean)")
    lines = [
        f"{name} version {mv.version}  status {tags.get('status', '?')}  registered {registered_at(mv)}",
        f"  model md5 {tags.get('lineage.model_md5', '?')}   {code}",
        f"  Prefect flow run {tags.get('lineage.prefect_flow_run_id', '?')}   MLflow run {mv.run_id}",
        "",
        "raw sources",
    ]
    raws = {i["path"]: i["md5"] for s in steps for i in s["inputs"] if i["made_by"] is None}
    lines += [f"  {path:<40} {_short(md5)}" for path, md5 in raws.items()] or ["  (none: every input is made by a stage)"]
    lines += feedback_lines(tags)
    if tags.get("lineage.start_from") == "champion":
        lines += ["", f"trained from version {tags.get('lineage.start_version', '?')} (the champion's trainable weights, stage start_model)"]
    for s in steps:
        run = tags.get(f"lineage.stage_run.{s['stage']}", "")
        lines.append("")
        lines.append(f"{s['stage']:<12} run {run[:12] or '-':<12} code {len(s['code'])} file(s)")
        if s["params"]:
            lines.append(f"  params  {_params_line(s['params'])}")
        made = sorted({i["made_by"] or "raw" for i in s["inputs"]})
        if made:
            lines.append(f"  from    {', '.join(made)}")
        for o in s["outs"]:
            if o["artifact"]:
                mark = "   = the version's model" if o["md5"] == tags.get("lineage.model_md5") else ""
                lines.append(f"  ->      {o['path']:<40} {_short(o['md5'])}{mark}")
    lines += ["", f"version {mv.version} <- {next((o['path'] for s in steps for o in s['outs'] if o['md5'] == tags.get('lineage.model_md5')), '?')}"]
    return "\n".join(lines) + "\n"


def plot_lineage(name: str, mv: ModelVersion, record: dict, out: Path) -> Path:
    """Raw sources on the left, each stage in a column by its depth in the DAG, the version on
    the right; a box per stage names its run and its outputs' hashes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = stage_graph(record["lock"], record["dag"])
    depth: dict[str, int] = {}
    nodes: dict[str, tuple[str, str]] = {}  # id -> (label, colour)
    edges: set[tuple[str, str]] = set()
    for s in steps:
        for i in s["inputs"]:
            if i["made_by"] is None:
                rid = f"raw:{i['path']}"
                depth[rid] = 0
                nodes[rid] = (f"{i['path']}\n{_short(i['md5'])}", "#e0e0e0")
                edges.add((rid, s["stage"]))
            else:
                edges.add((i["made_by"], s["stage"]))
        depth[s["stage"]] = 1 + max([depth.get(f"raw:{i['path']}", 0) if i["made_by"] is None else depth.get(i["made_by"], 0) for i in s["inputs"]], default=0)
        run = mv.tags.get(f"lineage.stage_run.{s['stage']}", "")
        outs = "\n".join(f"{o['path']} {_short(o['md5'])}" for o in s["outs"] if o["artifact"])
        nodes[s["stage"]] = (f"{s['stage']}" + (f"  run {run[:8]}" if run else "") + (f"\n{outs}" if outs else ""), "#cfe2f3")
    model_md5 = mv.tags.get("lineage.model_md5")
    version_id = f"version {mv.version}"
    nodes[version_id] = (f"{name}\nversion {mv.version}\n{mv.tags.get('status', '')}\ngit {mv.tags.get('lineage.git_sha', '?')[:8]}", "#fce5cd")
    for s in steps:
        if any(o["md5"] == model_md5 for o in s["outs"]):
            edges.add((s["stage"], version_id))
            depth[version_id] = depth[s["stage"]] + 1
    depth.setdefault(version_id, max(depth.values(), default=0) + 1)

    columns: dict[int, list[str]] = {}
    for node in nodes:
        columns.setdefault(depth[node], []).append(node)
    pos = {n: (d, -(i - (len(col) - 1) / 2)) for d, col in columns.items() for i, n in enumerate(col)}
    width = max(columns) + 1
    height = max(len(c) for c in columns.values())
    fig, ax = plt.subplots(figsize=(2.9 * width, 1.6 * height + 1.2))
    for a, b in sorted(edges):
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x1 - 0.36, y1), xytext=(x0 + 0.36, y0), arrowprops={"arrowstyle": "->", "color": "#555", "lw": 1})
    for n, (label, colour) in nodes.items():
        x, y = pos[n]
        ax.text(x, y, label, ha="center", va="center", fontsize=7, family="monospace", bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "#444"})
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height / 2 - 0.3, height / 2 + 0.3)
    ax.axis("off")
    ax.set_title(f"lineage of {name} version {mv.version} (registered {registered_at(mv)})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
