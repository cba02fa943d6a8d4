"""The built-in metrics and which way is better for each. The evaluation suite declares its own
in params (`evaluate.tasks[].metrics`). A module of its own, because params validation reads
it: every stage loads params, so whatever this imports becomes a DVC dependency of every stage
(pipelines/dag.py follows imports), and gate code changing must not invalidate training."""

from __future__ import annotations

from typing import Literal

Direction = Literal["higher", "lower"]
FEEDBACK_SLICE_METRIC = "feedback_slice/preference_accuracy"  # the held-out feedback pairs (evaluate.feedback_slice)
DIRECTIONS: dict[str, Direction] = {
    "exact_match": "higher",  # the canary's golden prompts
    "preference_accuracy": "higher",
    FEEDBACK_SLICE_METRIC: "higher",
    "judge_win_rate": "higher",  # pipelines/judge.py: candidate vs champion, 0.5 = as good
    "reward_score": "higher",  # the recipe's reward model on the answers
    "validation_loss": "lower",
    "error_rate": "lower",
    "p95_latency_ratio": "lower",
    "agreement": "higher",
}
