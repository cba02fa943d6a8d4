"""Gates are pure functions: metrics in, Decision out. No I/O, no MLflow, no Prefect,
so every branch is unit-testable and a gate that cannot fail is visible as a failing test.

Every metric a gate may read declares its direction: the built-in ones here, the evaluation
suite's own in params (`evaluate.tasks[].metrics`, named '<task>/<metric>'); a threshold on an
undeclared metric is rejected rather than guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipelines.config import GateParams, QuantizeParams

Direction = Literal["higher", "lower"]
Outcome = Literal["pass", "fail", "continue"]
DIRECTIONS: dict[str, Direction] = {
    "exact_match": "higher",  # the canary's golden prompts
    "preference_accuracy": "higher",
    "judge_win_rate": "higher",  # pipelines/judge.py: candidate vs champion, 0.5 = as good
    "reward_score": "higher",  # the recipe's reward model on the answers
    "validation_loss": "lower",
    "error_rate": "lower",
    "p95_latency_ratio": "lower",
    "agreement": "higher",
}


@dataclass(frozen=True)
class Check:
    metric: str
    rule: str
    value: float | None
    bound: float | None
    passed: bool
    pending: bool = False  # neither passed nor failed: the evidence so far decides nothing
    text: str = ""  # the verdict in words, for a check that is not one value against a bound

    def describe(self) -> str:
        if self.text:
            return f"{self.metric}: {self.text}"
        if self.value is None:
            return f"{self.metric}: missing ({self.rule})"
        verdict = "ok" if self.passed else f"FAILED by {abs(self.value - self.bound):.4f}"
        return f"{self.metric} = {self.value:.4f} vs {self.rule} {self.bound:.4f}: {verdict}"


@dataclass(frozen=True)
class Decision:
    gate: str
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.describe() for c in self.checks if not c.passed]

    @property
    def outcome(self) -> Outcome:
        """'pass'; 'fail' when a check failed; 'continue' when none failed but some still wait
        for evidence. `passed` is False for 'continue': a caller that cannot wait fails it."""
        if self.passed:
            return "pass"
        undecided = any(c.pending for c in self.checks) and all(c.passed or c.pending for c in self.checks)
        return "continue" if undecided else "fail"

    def summary(self) -> str:
        head = f"{self.gate} gate {({'pass': 'PASSED', 'fail': 'FAILED', 'continue': 'UNDECIDED (continue)'})[self.outcome]}"
        return "\n".join([head, *("  - " + c.describe() for c in self.checks)])


def direction(metric: str, directions: dict[str, str] | None = None) -> Direction:
    """A metric's direction: the suite's declaration (`directions`) or the built-in one."""
    known = {**DIRECTIONS, **(directions or {})}
    try:
        return known[metric]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown metric '{metric}': declare it in evaluate.tasks[].metrics (as '<task>/<metric>') or in pipelines/gates.py (known: {', '.join(known)})") from None


def better_or_equal(metric: str, value: float, bound: float, directions: dict[str, str] | None = None) -> bool:
    return value >= bound if direction(metric, directions) == "higher" else value <= bound


def no_worse_than(metric: str, value: float | None, reference: float, tolerance: float, rule: str, directions: dict[str, str] | None = None) -> Check:
    """value may trail `reference` by at most `tolerance`, in the metric's own direction."""
    bound = reference - tolerance if direction(metric, directions) == "higher" else reference + tolerance
    return Check(metric, rule, value, bound, value is not None and better_or_equal(metric, value, bound, directions))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def paired_bootstrap(candidate: list[float], reference: list[float], resamples: int, confidence: float, seed: int = 0) -> Interval:
    """Confidence interval of mean(candidate - reference) over the same items, by resampling
    items (not models): the item-level pairing removes the variance the items share."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-zero number of items, got {a.size} and {b.size}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    return Interval(float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def mean_interval(scores: list[float], resamples: int, confidence: float, seed: int = 0) -> Interval:
    """Bootstrap interval of one model's mean score (for the report's error bars)."""
    return paired_bootstrap(scores, [0.0] * len(scores), resamples, confidence, seed)


def pair_items(candidate: list[dict], reference: list[dict], metric: str, key: str = "id") -> tuple[list[float], list[float]]:
    """Per-item scores of two models on the items both were scored on, matched by a stable item
    id: two items with the same prompt and different answers stay two items."""
    ref: dict = {}
    for r in reference:
        if metric not in r:  # another task's row
            continue
        if r[key] in ref:
            raise ValueError(f"item {key} {r[key]!r} appears twice in the reference scores: pairing would be ambiguous")
        ref[r[key]] = float(r[metric])
    pairs = [(float(c[metric]), ref[c[key]]) for c in candidate if metric in c and c[key] in ref]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def noninferiority_p(metric: str, candidate: list[float], reference: list[float], tolerance: float, resamples: int, seed: int = 0, directions: dict[str, str] | None = None) -> tuple[float, str]:
    """One-sided p-value of H0 "the candidate is worse than the reference by more than
    `tolerance`" (small p: non-inferiority shown). Paired binary outcomes get McNemar's
    statistic on the discordant pairs (a Wald test with the margin); other scores a paired
    bootstrap of the mean difference."""
    sign = 1.0 if direction(metric, directions) == "higher" else -1.0
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-zero number of items, got {a.size} and {b.size}")
    d = sign * (a - b)  # > 0: the candidate is better on that item
    n = d.size
    if set(np.unique(np.concatenate([a, b]))) <= {0.0, 1.0}:
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        diff = (wins - losses) / n
        var = ((wins + losses) / n - diff**2) / n
        if var <= 0:  # no discordant pair: identical outcomes
            return (0.0 if diff + tolerance > 0 else 1.0), "mcnemar"
        return _normal_sf((diff + tolerance) / math.sqrt(var)), "mcnemar"
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = d[idx].mean(axis=1)
    return float(((means <= -tolerance).sum() + 1) / (resamples + 1)), "paired bootstrap"


def holm(pvalues: dict[str, float], alpha: float) -> dict[str, float]:
    """Holm's step-down adjusted p-values: each metric is shown non-inferior when its adjusted
    p <= alpha. Testing more metrics then never means more false promotions."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def paired_checks(
    paired: dict[str, tuple[list[float], list[float]]], policy: GateParams, directions: dict[str, str] | None = None, tolerances: dict[str, float] | None = None
) -> list[Check]:
    """Non-inferiority against the champion on every paired metric, Holm-corrected. One-sided
    alpha = (1 - confidence) / 2, the same bar as the lower end of a two-sided interval.
    `tolerances` overrides gate.champion_tolerance per metric (a task's own margin)."""
    alpha = (1 - policy.confidence) / 2
    tolerances = tolerances or {}
    raw, tests = {}, {}
    for metric, (cand, champ) in paired.items():
        tol = tolerances.get(metric, policy.champion_tolerance)
        raw[metric], tests[metric] = noninferiority_p(metric, cand, champ, tol, policy.bootstrap_resamples, directions=directions)
    adjusted = holm(raw, alpha)
    checks = []
    for metric, (cand, champ) in paired.items():
        rule = f"({tests[metric]}, Holm p={adjusted[metric]:.4f} <= {alpha:.3f})"
        if metric == "judge_win_rate":  # a win rate against 0.5: show the rate itself
            checks.append(Check(metric, f"win rate vs champion, 0.5 minus tolerance {rule}", float(np.mean(cand)), 0.5 - policy.champion_tolerance, adjusted[metric] <= alpha))
            continue
        diff = float(np.mean(cand) - np.mean(champ))
        tol = tolerances.get(metric, policy.champion_tolerance)
        bound = -tol if direction(metric, directions) == "higher" else tol
        checks.append(Check(metric, f"paired diff vs champion {rule}; tolerance", diff, bound, adjusted[metric] <= alpha))
    return checks


def paired_interval(metric: str, candidate: list[float], reference: list[float], policy: GateParams) -> Interval:
    """The paired difference with its bootstrap interval, for the report."""
    return paired_bootstrap(candidate, reference, policy.bootstrap_resamples, policy.confidence)


def decide(
    candidate: dict,
    baseline: dict | None,
    champion: dict | None,
    policy: GateParams,
    paired: dict[str, tuple[list[float], list[float]]] | None = None,
    directions: dict[str, str] | None = None,
    beat_base: set[str] | None = None,
    tolerances: dict[str, float] | None = None,
) -> Decision:
    """The quality gate: absolute thresholds, better than the untrained base, and no worse than
    the current champion: by paired tests where per-item scores of both are given
    (`paired[metric]` = (candidate items, champion items); for `judge_win_rate`, the candidate's
    points against 0.5 each), else by point values within tolerance.

    `directions`: the evaluation suite's metrics and directions (with the built-in ones);
    `beat_base`: the metrics that must beat the base (default: every metric with a direction);
    `tolerances`: per-metric margins against the champion (default: gate.champion_tolerance)."""
    tolerances = tolerances or {}
    checks: list[Check] = []
    for metric, t in policy.thresholds.items():
        direction(metric, directions)  # an undeclared metric fails loudly instead of being guessed
        value = candidate.get(metric)
        if t.min is not None:
            checks.append(Check(metric, ">=", value, t.min, value is not None and value >= t.min))
        if t.max is not None:
            checks.append(Check(metric, "<=", value, t.max, value is not None and value <= t.max))
    if policy.must_beat_base and baseline:
        for metric in sorted(beat_base if beat_base is not None else {**DIRECTIONS, **(directions or {})}):
            value, base = candidate.get(metric), baseline.get(metric)
            if value is None or base is None:
                continue
            beats = value > base if direction(metric, directions) == "higher" else value < base
            checks.append(Check(metric, "better than base", value, base, beats))
    paired = paired or {}
    checks += paired_checks(paired, policy, directions, tolerances)
    if champion:  # regressions that matter: the metrics the policy puts thresholds on
        for metric in policy.thresholds:
            if metric not in paired and champion.get(metric) is not None:
                checks.append(no_worse_than(metric, candidate.get(metric), champion[metric], tolerances.get(metric, policy.champion_tolerance), "champion within tolerance", directions))
    return Decision("quality", all(c.passed for c in checks), checks)


def decide_quantization(quantized: dict, unquantized: dict, policy: QuantizeParams, directions: dict[str, str] | None = None) -> Decision:
    """The quant gate: the quantized model keeps every suite metric within `max_drop` of the
    unquantized one (in each metric's own direction)."""
    metrics = [m for m in (directions or {"exact_match": "higher"}) if unquantized.get(m) is not None]
    checks = [no_worse_than(m, quantized.get(m), unquantized[m], policy.max_drop, "unquantized minus max_drop", directions) for m in metrics]
    return Decision("quantization", bool(checks) and all(c.passed for c in checks), checks)
