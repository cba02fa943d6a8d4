"""The base of every params.yaml section: unknown keys are rejected and a loaded config is
frozen, so a typo fails before any work and no stage can change what the next one reads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
