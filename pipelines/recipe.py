"""The recipe: which training algorithms run, in which order (`recipe:` in params.yaml).

One table says, for every algorithm, what it produces (a policy that the next step and the
gates use, or a reward model that a later RL step reads) and which prepared tables it trains
on. The data gate asks for exactly those tables, the DVC stages and the Prefect flow are
derived from the same list, and a step the recipe does not name neither runs nor needs data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MODELS = Path("models")
START_DIR = MODELS / "start"  # a registered version's trainable weights (stage start_model), when model.start_from is champion


@dataclass(frozen=True)
class Algorithm:
    kind: Literal["policy", "reward"]
    tables: tuple[str, ...]  # prepared tables it trains on (data/prepared/<table>_<split>.parquet)
    summary: str


ALGORITHMS: dict[str, Algorithm] = {
    "sft": Algorithm("policy", ("sft",), "supervised fine-tuning (TRL SFTTrainer), full or PEFT"),
    "dpo": Algorithm("policy", ("preference",), "direct preference optimisation and its loss variants (TRL DPOTrainer)"),
    "kto": Algorithm("policy", ("kto",), "KTO on unpaired, labelled completions (TRL KTOTrainer)"),
    "orpo": Algorithm("policy", ("preference",), "odds-ratio preference optimisation, no reference model (TRL ORPOTrainer)"),
    "cpo": Algorithm("policy", ("preference",), "contrastive preference optimisation; loss_type simpo gives SimPO (TRL CPOTrainer)"),
    "rm": Algorithm("reward", ("preference",), "a reward model trained on preference pairs (TRL RewardTrainer)"),
    "grpo": Algorithm("policy", ("sft",), "online RL, group-relative advantages (TRL GRPOTrainer)"),
    "rloo": Algorithm("policy", ("sft",), "online RL, leave-one-out baseline (TRL RLOOTrainer)"),
}

DEFAULT_RECIPE = ["sft", "dpo"]


def check_recipe(recipe: list[str]) -> list[str]:
    """Every problem with a recipe, as sentences naming the step (empty when it is fine)."""
    problems = []
    unknown = [s for s in recipe if s not in ALGORITHMS]
    if unknown:
        problems.append(f"unknown step(s) {unknown}; available: {', '.join(ALGORITHMS)}")
    if len(set(recipe)) != len(recipe):
        problems.append(f"a step may appear once, got {recipe}")
    known = [s for s in recipe if s in ALGORITHMS]
    if not any(ALGORITHMS[s].kind == "policy" for s in known):
        problems.append("the recipe needs at least one step that trains the policy (e.g. sft)")
    elif ALGORITHMS[known[-1]].kind != "policy":
        problems.append(f"the last step must train the policy; '{known[-1]}' trains a reward model for a later RL step")
    return problems


def policy_steps(recipe: list[str]) -> list[str]:
    return [s for s in recipe if ALGORITHMS[s].kind == "policy"]


def model_dir(step: str) -> Path:
    return MODELS / step


def input_model(recipe: list[str], step: str, start_from: str = "base") -> str | None:
    """The policy a step starts from: the previous policy step's output; for the first, the
    fetched champion (model.start_from: champion) or None for the base."""
    before = policy_steps(recipe[: recipe.index(step)])
    if before:
        return str(model_dir(before[-1]))
    return str(START_DIR) if start_from == "champion" else None


def final_step(recipe: list[str]) -> str:
    """The step whose model becomes the candidate (evaluated, quantized, registered)."""
    return policy_steps(recipe)[-1]


def required_tables(recipe: list[str]) -> set[str]:
    """Prepared tables the recipe trains on; the data gate demands rows in each."""
    return {t for s in recipe for t in ALGORITHMS[s].tables}
