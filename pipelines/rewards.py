"""Rule-based reward functions for online RL (GRPO, RLOO), declared here by name.

Each has TRL's reward signature: `f(prompts, completions, answer, **columns) -> list[float]`,
where `answer` is the reference answer column the RL stages add to their prompt dataset and
completions are chat messages (conversational data) or strings. `reward_model` is not a
function: it names the recipe's `rm` step, whose model TRL scores completions with.
"""

from __future__ import annotations

import re
from collections.abc import Callable

REWARD_MODEL = "reward_model"


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content") or "" for m in completion)
    return str(completion)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1 for an answer equal to the reference (case and whitespace folded), else 0."""
    return [float(_norm(_text(c)) == _norm(a)) for c, a in zip(completions, answer)]


def token_overlap(prompts, completions, answer, **_) -> list[float]:
    """Partial credit: the share of reference tokens produced at the right position.
    Denser than exact match, so a weak policy still sees a gradient."""
    scores = []
    for c, a in zip(completions, answer):
        got, want = _norm(_text(c)).split(), _norm(a).split()
        hits = sum(g == w for g, w in zip(got, want))
        scores.append(hits / max(len(want), len(got), 1))
    return scores


REWARDS: dict[str, Callable] = {"exact_match": exact_match, "token_overlap": token_overlap}


def check_rewards(names: list[str]) -> list[str]:
    if not names:
        return ["rewards: name at least one reward"]
    unknown = [n for n in names if n not in REWARDS and n != REWARD_MODEL]
    return [f"unknown reward(s) {unknown}; available: {', '.join([*REWARDS, REWARD_MODEL])}"] if unknown else []
