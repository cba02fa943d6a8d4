"""The data sections of params.yaml: `data` (declared sources), `generate` (the demo data
generator) and `prepare` (cleaning, splits, the data gate). Unknown keys are rejected.

Sources are declared in the spirit of LLaMA-Factory's dataset_info.json: a file, a folder, a
glob or a Hugging Face dataset id, each with its format, split, column mapping and mixing
weight. The pipeline only ever reads them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.section import Section

FormatName = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "preference", "kto", "text"]


class SourceParams(Section):
    name: str = Field("", description="Name recorded with every row and in the data card (default: the path or hub id).")
    path: str | None = Field(None, description="A file, a folder (every data file in it) or a glob, relative to the project root.")
    hub: str | None = Field(None, description="A Hugging Face dataset id (needs a network), instead of a path.")
    hub_split: str = Field("train", description="Which split of the hub dataset to read.")
    format: FormatName = Field("auto", description="Row format; 'auto' detects it per row from the keys.")
    split: Literal["auto", "train", "validation", "test"] = Field("auto", description="'auto' splits by a hash of the prompt; otherwise every row of the source goes to that split (e.g. a held-out evaluation set).")
    columns: dict[str, str] = Field(default_factory=dict, description="Canonical field -> this source's column, e.g. {instruction: question, output: answer}.")
    weight: float = Field(1.0, gt=0, description="Mixing weight of the training rows: 0.5 keeps a deterministic half, 2 repeats every row twice, 1.5 repeats a deterministic half.")
    required: bool = Field(True, description="A required source that is missing or empty stops the stage; an optional one is skipped.")

    @model_validator(mode="after")
    def _one_place(self) -> "SourceParams":
        if (self.path is None) == (self.hub is None):
            raise ValueError("a source needs exactly one of 'path' or 'hub'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path or self.hub or "?"


class DataParams(Section):
    sources: list[SourceParams] = Field(
        default_factory=lambda: [
            SourceParams(name="demo", path="data/generated"),
            SourceParams(name="user", path="data/raw", required=False),
        ],
        description="Where the raw data comes from; read, never written. `make data-add FILE=...` puts files in data/raw.",
    )

    @model_validator(mode="after")
    def _unique(self) -> "DataParams":
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"source names must be unique, got {labels}")
        if not self.sources:
            raise ValueError("declare at least one source")
        return self


class GenerateParams(Section):
    seed: int = Field(1234, description="Seed of the demo-data generator (same seed, same bytes).")
    n_sft: int = Field(3000, ge=10, description="Instruction rows generated (before noise).")
    n_preference: int = Field(600, ge=10, description="Preference pairs generated (before noise); as many labelled KTO rows too.")
    min_len: int = Field(3, ge=1, description="Shortest digit list in the demo task.")
    max_len: int = Field(5, ge=1, description="Longest digit list in the demo task.")
    noise_rate: float = Field(0.06, ge=0, le=0.5, description="Share of rows turned into each kind of noise.")
    safety_fraction: float = Field(0.05, ge=0, le=0.5, description="Refusal rows (disallowed requests, PII probes) added, as a share of n_sft (pipelines/safety.py).")

    @model_validator(mode="after")
    def _lengths(self) -> "GenerateParams":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        return self


class PrepareParams(Section):
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of unique prompts held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of unique prompts held out for the test set.")
    max_chars: int = Field(8000, ge=16, description="Rows with a message longer than this are quarantined (too_long).")
    max_tokens: int = Field(1024, ge=8, description="Rows longer than this many tokens of the target tokenizer are quarantined (too_long). The bootstrapped tokenizer does not exist yet when data is prepared, so there one byte counts as one token (a byte-level BPE never needs more).")
    pii: Literal["redact", "quarantine", "off"] = Field("redact", description="Rows with e-mail addresses, phone numbers, IPs, card numbers (Luhn-checked) or API keys: replace them with <KIND> placeholders, quarantine the row, or leave them.")
    max_repetition: float = Field(0.5, gt=0, le=1, description="Rows whose share of repeated word 3-grams exceeds this are quarantined (repetitive).")
    near_dup_threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity (MinHash LSH over word 3-grams) above which a row is a near-duplicate of an earlier one.")
    near_dup_min_words: int = Field(16, ge=4, description="Texts shorter than this many words are deduplicated exactly only (MinHash on a few shingles is noise, and short templated prompts look alike).")
    decontamination_ngram: int = Field(10, ge=3, description="A training row sharing a word n-gram this long with an evaluation item (case and punctuation folded) is quarantined (contaminated).")
    min_rows: int = Field(50, ge=1, description="Data gate: fewest training rows in each table the recipe trains on.")
    max_quarantine_fraction: float = Field(0.4, ge=0, le=1, description="Data gate: most raw rows that may be quarantined.")
    seed: int = Field(0, description="Seed of the deterministic choices (mixing weights).")
