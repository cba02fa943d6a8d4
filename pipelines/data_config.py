"""The data sections of params.yaml: `data` (declared sources), `generate` (the demo data
generator) and `prepare` (cleaning, splits, the data gate). Unknown keys are rejected.

Sources are declared with LLaMA-Factory's dataset_info.json conventions: a file, a folder, a
glob or a Hugging Face dataset id, each with its format (LLaMA-Factory's `formatting`),
`ranking`, column mapping (LLaMA-Factory's column names or ours) and ShareGPT `tags`, plus a
split and a mixing weight. A `dataset_info.json` in a source's folder (LLaMA-Factory's own
file, or the one `make data-add FORMAT=...` writes) declares its files one by one
(`DatasetInfoEntry`). The pipeline only ever reads them.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.section import Section

FormatName = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "preference", "kto", "text"]
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
# Our own field names a column may be mapped to, besides LLaMA-Factory's (pipelines/formats.py).
FIELD_NAMES = ("instruction", "input", "output", "history", "system", "tools", "conversations", "messages", "prompt",
               "completion", "chosen", "rejected", "label", "kto_tag", "text", "query", "response", "images", "videos", "audios")
MEDIA_COLUMNS = ("images", "videos", "audios")  # accepted in a dataset_info.json entry, not read: the tables are text


def _check_tags(tags: dict[str, str]) -> dict[str, str]:
    for key in tags:
        if key not in TAG_NAMES:
            close = difflib.get_close_matches(key, TAG_NAMES, n=1)
            raise ValueError(f"unknown tag '{key}'{f' (did you mean {close[0]!r}?)' if close else ''}; tags are {', '.join(TAG_NAMES)}")
    return tags


def _check_columns(columns: dict[str, str]) -> dict[str, str]:
    for key in columns:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            raise ValueError(f"unknown column role '{key}'{f' (did you mean {close[0]!r}?)' if close else ''}; columns map one of {', '.join(FIELD_NAMES)} to the file's column")
    return columns


class _NamesChecked(BaseModel):
    """LLaMA-Factory's column roles and ShareGPT tags, checked by name (a typo says which)."""

    @field_validator("tags", check_fields=False)
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        return _check_tags(tags)

    @field_validator("columns", check_fields=False)
    @classmethod
    def _columns(cls, columns: dict[str, str]) -> dict[str, str]:
        return _check_columns(columns)


class SourceParams(_NamesChecked, Section):
    name: str = Field("", description="Name recorded with every row and in the data card (default: the path or hub id).")
    path: str | None = Field(None, description="A file, a folder (every data file in it) or a glob, relative to the project root.")
    hub: str | None = Field(None, description="A Hugging Face dataset id (needs a network), instead of a path.")
    hub_split: str = Field("train", description="Which split of the hub dataset to read.")
    format: FormatName = Field("auto", description="Row format; 'auto' detects it per row from the keys.")
    split: Literal["auto", "train", "validation", "test"] = Field("auto", description="'auto' splits by a hash of the prompt; otherwise every row of the source goes to that split (e.g. a held-out evaluation set).")
    ranking: bool = Field(False, description="LLaMA-Factory's `ranking`: every row is a preference pair (chosen/rejected); a row without one is quarantined instead of trained as SFT.")
    columns: dict[str, str] = Field(default_factory=dict, description="Field -> this source's column, e.g. {instruction: question, output: answer}; LLaMA-Factory's column names work too (prompt, query, response for alpaca; messages for sharegpt; kto_tag, chosen, rejected, system, tools, history).")
    tags: dict[str, str] = Field(default_factory=dict, description="LLaMA-Factory's ShareGPT tags: role_tag, content_tag (the keys of a turn) and user_tag, assistant_tag, observation_tag, function_tag, system_tag (the speaker names), e.g. {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}.")
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


class DatasetInfoEntry(_NamesChecked):
    """One entry of a LLaMA-Factory dataset_info.json (data/README.md of LLaMA-Factory): how the
    file it names is read. `formatting` also takes this project's format names (what
    `make data-add FORMAT=...` records). Keys that locate data elsewhere (hub, script, cloud)
    are accepted and ignored: an entry is used for the file it names in its own folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_name: str | None = Field(None, description="The data file (or folder) in the dataset_info.json's folder.")
    formatting: FormatName = Field("alpaca", description="alpaca, sharegpt or openai (LLaMA-Factory's default: alpaca), or any format of this project.")
    ranking: bool = Field(False, description="Every row is a preference pair.")
    columns: dict[str, str] = Field(default_factory=dict, description="LLaMA-Factory column name -> the file's column.")
    tags: dict[str, str] = Field(default_factory=dict, description="ShareGPT tags.")
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    subset: str | None = None
    split: str | None = None
    folder: str | None = None
    num_samples: int | None = None


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
    max_tokens: int = Field(1024, ge=8, description="Rows longer than this many tokens of the model being trained are quarantined (too_long): the base model's tokenizer, or for the bootstrapped default a BPE trained here exactly as bootstrap trains it (same code, same model.vocab_size, on the SFT rows).")
    pii: Literal["redact", "quarantine", "off"] = Field("redact", description="Rows with e-mail addresses, phone numbers (libphonenumber: national or international, with or without separators), IPv4/IPv6 addresses, card numbers (Luhn-checked), US SSNs, UK NI numbers or API keys, in any text field (content, tool-call arguments, tool results, system prompts, answers): replace them with <KIND> placeholders, quarantine the row, or leave them.")
    max_repetition: float = Field(0.5, gt=0, le=1, description="Rows whose share of repeated word 3-grams exceeds this are quarantined (repetitive).")
    near_dup_threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity (MinHash LSH over word 3-grams) above which a row is a near-duplicate of an earlier one.")
    near_dup_min_words: int = Field(16, ge=4, description="Texts shorter than this many words are deduplicated exactly only (MinHash on a few shingles is noise, and short templated prompts look alike).")
    decontamination_ngram: int = Field(10, ge=3, description="A training row sharing a word n-gram this long with an evaluation item (case and punctuation folded) is quarantined (contaminated). Evaluation items: the prepared test and validation splits, the safety suite and every local data file of evaluate.tasks.")
    decontamination_common: int = Field(5, ge=1, description="An n-gram found in more than this many training rows, or in more than this many evaluation items, is boilerplate (a sign-off, a shared template), not evidence of a leak, and is ignored.")
    min_rows: int = Field(50, ge=1, description="Data gate: fewest training rows in each table the recipe trains on.")
    max_quarantine_fraction: float = Field(0.4, ge=0, le=1, description="Data gate: most raw rows that may be quarantined.")
    seed: int = Field(0, description="Seed of the deterministic choices (mixing weights).")


class FeedbackLoopParams(Section):
    """From accepted feedback to the next run (`make feedback-export`, pipelines/feedback_export.py):
    the export that turns reviewed feedback into training rows in a declared source folder, and
    the trigger policy that decides whether those rows start a lifecycle run."""

    out_dir: str = Field("data/feedback", description="Where the export writes: <out_dir>/train/*.jsonl and <out_dir>/test/*.jsonl (the held-out feedback set). Declare both as sources in data.sources (params.yaml shows how) so prepare cleans them like any data.")
    sft_rows: bool = Field(False, description="A correction also makes an SFT row (prompt + the corrected answer), for a recipe with an sft step; it always makes a preference pair.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of feedback prompts held out as the feedback evaluation set, by a hash of the prompt: every completion of a prompt (and so every row of a completion) lands on one side, and keeps its side as feedback grows.")
    seed: int = Field(0, description="Salt of the held-out hash (another seed, another held-out set).")
    trigger: bool = Field(True, description="Let the export start a lifecycle run (the `lifecycle.data.added` event) when the policy below holds; false: export only.")
    min_new_rows: int = Field(20, ge=1, description="Fewest accepted (or edited) feedback rows decided since the last run the export started.")
    cooldown_s: float = Field(6 * 3600, ge=0, description="Shortest time between two runs the export starts.")
    max_runs_per_day: int = Field(2, ge=0, description="Most runs the export starts in any 24 hours (0: never).")
    recipe: list[str] = Field(default_factory=lambda: ["dpo"], description="The recipe of the runs the export starts, sent in the event's payload: the lifecycle deployment runs it instead of params.yaml's `recipe` (a run overlay, params.run.yaml; params.yaml is left as it is).")
    start_from: Literal["base", "champion"] = Field("champion", description="What the runs the export starts train from (model.start_from for that run): the champion, whose answers the feedback is about, or the base.")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"dpo": {"max_steps": 160, "learning_rate": 0.0005}},
        description="Training settings of the runs the export starts, by recipe step, over params.yaml's section for that step (sent in the event with the recipe: a run overlay, params.yaml is left as it is). "
        "A few dozen corrections taught to the champion need more steps at a higher rate than polishing an SFT model, and not too high a rate: measured on the embedded default (a phrasing the champion got wrong, ~60 corrections), [dpo] at its own 30 steps and 3e-4 made 1 of 14 held-out corrections likelier than the served answer; 160 steps at 5e-4 made 13-14 of 14, refusals intact; 120 at 1e-3 made 13 of 14 but, in one data order, cut held-out jailbreak refusals from 1.0 to 0.75 (the gate blocked it). {}: the steps' own settings.",
    )
    state_file: str = Field(".serving/feedback_loop.json", description="Where the export remembers the runs it started and the last decision time they covered (not data; not in DVC).")

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, recipe: list[str]) -> list[str]:
        from pipelines.recipe import check_recipe

        if problems := check_recipe(recipe):
            raise ValueError("; ".join(problems))
        return recipe

    @model_validator(mode="after")
    def _overrides_name_steps(self) -> "FeedbackLoopParams":
        stray = sorted(set(self.overrides) - set(self.recipe))
        if stray:
            raise ValueError(f"overrides for {stray}, which the feedback recipe {self.recipe} does not run: name a step of feedback_loop.recipe, or drop them")
        return self
