"""Typed view of params.yaml: one pydantic model per section, unknown keys rejected.

Every stage, task and flow loads its settings through `load_params()`, so a typo or a bad
value fails before any work starts, with the offending key named (nanoGPT/TRL style).

The sections live beside their ideas: data (pipelines/data_config.py), training
(train_config.py), evaluation and gates (eval_config.py), release and operations
(serve_config.py). This module holds the whole file's model, the cross-section checks and the
loader, and re-exports every section so `from pipelines.config import X` keeps working.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipelines.data_config import DataParams, FeedbackLoopParams, GenerateParams, PrepareParams
from pipelines.eval_config import EvalTask, EvaluateParams, GateParams, JudgeParams, QuantizeParams, Threshold
from pipelines.recipe import DEFAULT_RECIPE, check_recipe
from pipelines.section import Section
from pipelines.serve_config import CanaryParams, FeedbackParams, KServeParams, MonitorParams, NotifyParams, OrchestrationParams, RecordParams, RegistryParams, ReviewParams, ServeParams
from pipelines.train_config import (
    BOOTSTRAP,
    PEFT_METHODS,
    AlignParams,
    ComputeParams,
    CpoParams,
    DpoParams,
    GrpoParams,
    KtoParams,
    ModelParams,
    OrpoParams,
    PeftParams,
    RlooParams,
    RlParams,
    RmParams,
    SftParams,
    SweepParams,
    TrainParams,
)

__all__ = [
    "BOOTSTRAP", "PEFT_METHODS", "PARAMS_FILE", "AlignParams", "CanaryParams", "ComputeParams", "ConfigError", "CpoParams", "DataParams", "DpoParams", "EvalTask",
    "EvaluateParams", "FeedbackLoopParams", "FeedbackParams", "GateParams", "GenerateParams", "GrpoParams", "JudgeParams", "KServeParams", "KtoParams", "ModelParams", "MonitorParams", "NotifyParams", "OrchestrationParams",
    "OrpoParams", "Params", "PeftParams", "PrepareParams", "QuantizeParams", "RecordParams", "RegistryParams", "ReviewParams", "RlParams", "RlooParams", "RmParams", "Section", "ServeParams",
    "SftParams", "SweepParams", "Threshold", "TrainParams", "format_errors", "load_params", "snapshot",
]

PARAMS_FILE = Path("params.yaml")


class Params(Section):
    recipe: list[str] = Field(default_factory=lambda: list(DEFAULT_RECIPE), description="Training steps in order, e.g. [sft, dpo], [sft, kto], [sft, rm, grpo]; each names an algorithm in pipelines/recipe.py and reads the params section of the same name.")
    stage_timeout_s: float | None = Field(None, gt=0, description="Longest one stage (`dvc repro <stage>`) may run; past it the stage and everything it started are stopped and the flow fails naming it (a hung stage otherwise hangs the flow). null = no limit.")
    data: DataParams = Field(default_factory=DataParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    model: ModelParams = Field(default_factory=ModelParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)
    sft: SftParams = Field(default_factory=SftParams)
    sweep: SweepParams = Field(default_factory=SweepParams)
    dpo: DpoParams = Field(default_factory=DpoParams)
    kto: KtoParams = Field(default_factory=KtoParams)
    orpo: OrpoParams = Field(default_factory=OrpoParams)
    cpo: CpoParams = Field(default_factory=CpoParams)
    rm: RmParams = Field(default_factory=RmParams)
    grpo: GrpoParams = Field(default_factory=GrpoParams)
    rloo: RlooParams = Field(default_factory=RlooParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gate: GateParams = Field(default_factory=GateParams)
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    record: RecordParams = Field(default_factory=RecordParams, description="The record of every answer the gateway gives (serving/record/).")
    feedback: FeedbackParams = Field(default_factory=FeedbackParams, description="POST /v1/feedback on the gateway: ratings, corrections, preferred answers and implicit signals on recorded completions (serving/feedback.py).")
    review: ReviewParams = Field(default_factory=ReviewParams, description="The review flow: people accept, edit or reject feedback in the Prefect UI (flows/review.py).")
    feedback_loop: FeedbackLoopParams = Field(default_factory=FeedbackLoopParams, description="Accepted feedback -> training rows in a declared source, and when they start a lifecycle run (pipelines/feedback_export.py).")
    canary: CanaryParams = Field(default_factory=CanaryParams)
    kserve: KServeParams = Field(default_factory=KServeParams, description="The InferenceService a release renders when serve.target is kserve (serving/kserve.py).")
    notify: NotifyParams = Field(default_factory=NotifyParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams, description="Prometheus, its rules, Alertmanager and the receiver that acts on alerts (`make monitor`, monitoring/).")
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)

    @model_validator(mode="after")
    def _recipe(self) -> "Params":
        problems = check_recipe(self.recipe)
        for step in self.recipe:
            rl = getattr(self, step, None)
            if isinstance(rl, RlParams) and "reward_model" in rl.rewards and "rm" not in self.recipe[: self.recipe.index(step)]:
                problems.append(f"{step}.rewards names 'reward_model' but no 'rm' step comes before '{step}' in the recipe")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _feedback_overrides(self) -> "Params":
        """Each feedback-run override is checked as the step's own section would be, now: a
        typo would otherwise surface only when a triggered run starts."""
        for step, values in self.feedback_loop.overrides.items():
            section = getattr(self, step)
            try:
                type(section).model_validate({**section.model_dump(), **values})
            except ValidationError as exc:
                problems = "; ".join(error_text(e, type(section)) for e in exc.errors())
                raise ValueError(f"feedback_loop.overrides.{step}: {problems}") from None
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> "Params":
        from pipelines.directions import DIRECTIONS  # the built-in metrics' directions

        known = {**DIRECTIONS, **self.evaluate.directions()}
        unknown = sorted(set(self.gate.thresholds) - set(known))
        if unknown:
            raise ValueError(f"gate.thresholds on unknown metric(s) {unknown}: name a suite metric as '<task>/<metric>' (evaluate.tasks) or a built-in one; known: {', '.join(known)}")
        primary = self.gate.primary_metric
        if primary is not None and primary not in self.evaluate.directions():
            raise ValueError(f"gate.primary_metric '{primary}' is not a metric of the evaluation suite: name one as '<task>/<metric>' ({', '.join(self.evaluate.directions())})")
        slice_source = next((s for s in self.data.sources if s.label == self.evaluate.feedback_slice), None)
        if slice_source is not None and slice_source.split != "test":
            raise ValueError(f"evaluate.feedback_slice '{slice_source.label}' is declared in data.sources with split '{slice_source.split}': the feedback slice must be held out, set split: test on it (or name the held-out source, e.g. feedback_test)")
        judged = self.evaluate.judge.task
        if judged is not None and judged not in {t.name for t in self.evaluate.tasks}:
            raise ValueError(f"evaluate.judge.task '{judged}' is not in evaluate.tasks ({', '.join(t.name for t in self.evaluate.tasks)})")
        return self

    @property
    def primary_metric(self) -> str:
        """The metric every recipe step must not make worse (gate.primary_metric, else the first
        metric of the first suite task)."""
        return self.gate.primary_metric or next(iter(self.evaluate.directions()))

    @property
    def bootstrapped(self) -> bool:
        return self.model.base_model == BOOTSTRAP


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and a fix."""


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the parent of `loc`, to suggest the key the user meant
    (stepping through list items such as data.sources.0)."""
    import typing

    model: Any = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(part, str) and hasattr(model, "model_fields") else None
        if field is None:
            return None
        model = field.annotation
        if typing.get_origin(model) is list:
            model = typing.get_args(model)[0]
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def error_text(e: dict, model: type[BaseModel] | None) -> str:
    """One validation error as 'key: what is wrong', an unknown key with the nearest known one of
    `model` (the model the error's last key belongs to)."""
    key = ".".join(str(p) for p in e["loc"]) or "(top level)"
    if e["type"] == "extra_forbidden":
        return f"{key}: unknown key{_suggest(str(e['loc'][-1]), model)}"
    return f"{key}: {e['msg']} (got {e.get('input')!r})"


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid; nothing was run:"]
    lines += [f"  - {error_text(e, _model_at(e['loc']))}" for e in err.errors()]
    lines.append("Fix the key(s) above; every key and its meaning is listed in pipelines/*_config.py (data, train, eval, serve).")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path))) from None


def snapshot(params: Params) -> str:
    """The effective config (defaults filled in), logged with every run: URLs without their
    credentials, webhook URLs as their host (pipelines/redact.py)."""
    from pipelines.redact import redacted

    return json.dumps(redacted(params.model_dump(mode="json")), indent=2, sort_keys=True)
