"""A run overlay: the params of one flow run that differ from params.yaml, without touching it.

A feedback-triggered run trains the feedback recipe (e.g. [dpo]) from the champion; a run with
model.start_from: champion trains from a version the flow pins before DVC runs. Both need
values that are not in the user's params.yaml. The flow writes params.yaml with those values
over it to params.run.yaml (git-ignored, rewritten per run) and renders dvc.yaml so every stage
reads that file (`--params params.run.yaml`) and DVC keys every stage on that file's values:
exactly what each stage read. An ordinary run (no overlay, start_from: base or a pinned
start_version) writes no such file and renders dvc.yaml as before: `make pipeline` and
`dvc repro` behave as they always did.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.config import PARAMS_FILE, ConfigError, Params, format_errors, load_params

RUN_PARAMS = Path("params.run.yaml")
HEADER = """\
# WRITTEN by the lifecycle flow for one run (pipelines/run_params.py): params.yaml with this
# run's overlay ({overlay}) on top. The stages of that run read this file; edit params.yaml instead.
"""


def overlay_values(recipe: list[str] | None = None, start_from: str | None = None, start_version: str | None = None,
                   overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """The flow's run parameters as params keys (None: not overridden). `overrides`: sections'
    keys for this run, e.g. {"dpo": {"max_steps": 120}} (a feedback run's training settings);
    the named parameters win over them, and the rest of a section they share is kept."""
    named: dict[str, Any] = {}
    if recipe is not None:
        named["recipe"] = list(recipe)
    model = {k: v for k, v in (("start_from", start_from), ("start_version", start_version)) if v is not None}
    if model:
        named["model"] = model
    return merged(overrides or {}, named)


def parse_sets(sets: list[str]) -> dict[str, dict]:
    """`--set dpo.max_steps=120 --set dpo.peft.r=16` -> {"dpo": {"max_steps": 120, "peft": {"r": 16}}};
    values are read as YAML (numbers, booleans, lists)."""
    out: dict[str, dict] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set dpo.max_steps=120")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = read_value(value)
    return out


def read_value(text: str) -> Any:
    """YAML's reading of a value, and 1e-3 a number (YAML 1.1 wants 1.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def merged(raw: dict, values: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in values.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def described(values: dict) -> str:
    flat = [f"{k}.{kk}={vv}" for k, v in values.items() for kk, vv in (v.items() if isinstance(v, dict) else [])]
    flat[:0] = [f"{k}={v}" for k, v in values.items() if not isinstance(v, dict)]  # the recipe first
    return ", ".join(flat) or "none"


def with_overlay(values: dict, path: str | Path = PARAMS_FILE) -> tuple[Params, dict]:
    """params.yaml with `values` over it, validated like params.yaml (a bad recipe in an event
    fails before any work, naming the key): (params, the raw mapping)."""
    own = load_params(path)  # the user's file on its own first: its own errors name only it
    raw = merged(yaml.safe_load(Path(path).read_text()) or {}, values)
    if not values:
        return own, raw
    try:
        return Params.model_validate(raw), raw
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, f"{path} with the run's overlay ({described(values)})")) from None


def needs_run_file(params: Params, values: dict) -> bool:
    """An overlay, or a champion start that the flow must pin to a version for DVC."""
    return bool(values) or (params.model.start_from == "champion" and params.model.start_version is None)


def write_run_params(raw: dict, values: dict, path: Path = RUN_PARAMS) -> Params:
    """Write the run's params file, complete: every key a stage lists is written out (DVC reads
    the file itself, and a recipe from an event may name a section params.yaml leaves to its
    defaults)."""
    from pipelines.dag import render

    params = Params.model_validate(raw)
    full = copy.deepcopy(raw)
    dumped = params.model_dump(mode="json")
    for stage in render(params)["stages"].values():
        for key in stage.get("params", []):
            node, value = full, dumped
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                value = value[part]
            node.setdefault(parts[-1], value[parts[-1]])
    path.write_text(HEADER.format(overlay=described(values)) + yaml.safe_dump(full, sort_keys=False, width=200))
    return load_params(path)
