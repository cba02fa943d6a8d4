"""The registry page reads on its own: each version's description is a model card (where its
data came from, the recipe, its scores, what the gates and the release decided) rebuilt from
the version's tags whenever one of them changes, and its model folder carries an MLmodel file
with the chat signature it is served with."""

from __future__ import annotations

import json

import yaml

from registry.graph import registered_at
from registry.lineage import NoRecord, load_record, stage_graph
from registry.models import metrics_of
from registry.store import client

# What a served version takes and returns (the OpenAI chat protocol, reduced to its columns).
SIGNATURE_INPUT = {"messages": [{"role": "user", "content": "Reverse: 3 1 4"}], "max_tokens": 16, "temperature": 0.0}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec(Array(message), "messages"), ColSpec("long", "max_tokens", required=False), ColSpec("double", "temperature", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "content")]))


def mlmodel_text(run_id: str) -> str:
    """An MLmodel file for the logged model folder: no flavour (the folder is a plain Hugging Face
    checkpoint, served by the project's engines), but a signature the registry UI shows."""
    from mlflow.models import Model

    model = Model(artifact_path="model", run_id=run_id, signature=signature())
    model.metadata = {"served_by": "serving/ (OpenAI-compatible chat completions)", "input_example": SIGNATURE_INPUT}
    return model.to_yaml()


def card(name: str, version: str) -> str:
    mv = client().get_model_version(name, str(version))
    tags = mv.tags
    lines = [f"# {name} version {mv.version}", ""]
    lines.append(f"**Status:** {tags.get('status', '?')}" + (f" ({tags['status.reason'].splitlines()[0][:300]})" if tags.get("status.reason") else ""))
    lines.append(f"**Registered:** {registered_at(mv)} from git `{tags.get('lineage.git_sha', '?')[:12]}`" + (" with uncommitted changes (recorded)" if tags.get("lineage.git_dirty") == "true" else ""))
    lines.append(f"**Recipe:** {tags.get('recipe', '?')}; **quantization:** {tags.get('quantization', '?')}")
    lines.append(f"**Model bytes (md5):** `{tags.get('lineage.model_md5', '?')}`")
    lines += ["", "## Data sources", ""]
    try:
        record = load_record(mv.run_id)
        raws = {i["path"]: i["md5"] for s in stage_graph(record["lock"], record["dag"]) for i in s["inputs"] if i["made_by"] is None}
        params = yaml.safe_load(record["params_text"]) or {}
        sources = (params.get("data") or {}).get("sources") or []
        lines += [f"- `{p}` md5 `{h}`" for p, h in raws.items()]
        lines += [f"- source `{s.get('name')}`: {s.get('path') or s.get('hub')}" + (f" ({s['format']})" if s.get("format") else "") for s in sources]
        base = (params.get("model") or {}).get("base_model", "?")
        lines += ["", f"**Base model:** {base}"]
    except NoRecord:
        lines.append("- (no lineage record: registered before records were kept; see the lineage.* tags)")
    metrics = metrics_of(mv) or {}
    if metrics:
        lines += ["", "## Scores of the served artifact", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    gates = [f"- **{k.removeprefix('gate.')}**: {v}" for k, v in sorted(tags.items()) if k.startswith("gate.")]
    if gates:
        lines += ["", "## Gate decisions", "", *gates]
    if tags.get("canary"):
        lines += ["", "## Release", "", f"canary: **{tags['canary']}**"]
        if tags.get("canary.report"):
            lines += ["", "```", tags["canary.report"][:1500], "```"]
    if tags.get("release.history"):
        lines += ["", f"Release history: `{tags['release.history']}`"]
    from registry.audit import AuditLog, markdown, of_version

    audited = of_version(str(mv.version))
    if audited:  # the local audit log's entries about this version (registry/audit.py)
        lines += ["", "## Audit log", "", f"{len(audited)} entr{'y' if len(audited) == 1 else 'ies'} in `{AuditLog().path}`, the latest:", "",
                  markdown(audited[-8:]).rstrip("\n"), "", f"All: `lifecycle audit --version {mv.version}`; check the chain: `lifecycle audit verify`"]
    lines += ["", "Lineage: `lifecycle lineage " + str(mv.version) + "`; rebuild: `lifecycle reproduce " + str(mv.version) + "`"]
    return "\n".join(lines) + "\n"


def refresh(name: str, version: str) -> str:
    """Rewrite the version's description from what is recorded now."""
    text = card(name, version)
    client().update_model_version(name, str(version), description=text[:5000])
    return text


def record_gate(name: str, version: str, gate: str, passed: bool, summary: str) -> None:
    """One line per gate decision on the version (shown in its card)."""
    verdict = "passed" if passed else "FAILED"
    client().set_model_version_tag(name, str(version), f"gate.{gate}", f"{verdict}: {summary[:4000]}")
    refresh(name, version)


def as_json(name: str, version: str) -> str:
    mv = client().get_model_version(name, str(version))
    return json.dumps({"version": mv.version, "tags": mv.tags, "description": mv.description}, indent=2)
