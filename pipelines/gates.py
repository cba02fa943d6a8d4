"""Gates are pure functions: metrics in, Decision out. No I/O, no MLflow, no Prefect,
so every branch is unit-testable and a gate that cannot fail is visible as a failing test.

Every metric a gate may read declares its direction: the built-in ones here, the evaluation
suite's own in params (`evaluate.tasks[].metrics`, named '<task>/<metric>'); a threshold on an
undeclared metric is rejected rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipelines import stats
from pipelines.directions import DIRECTIONS, FEEDBACK_SLICE_METRIC, Direction
from pipelines.config import GateParams, QuantizeParams

Outcome = Literal["pass", "fail", "continue"]


@dataclass(frozen=True)
class Check:
    metric: str
    rule: str
    value: float | None
    bound: float | None
    passed: bool
    pending: bool = False  # neither passed nor failed: the evidence so far decides nothing
    text: str = ""  # the verdict in words, for a check that is not one value against a bound
    paired: "stats.PairedResult | None" = None  # a paired comparison's figures, for the report

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
        head = f"{self.gate} gate {({'pass': 'PASSED', 'fail': 'FAILED', 'continue': 'UNDECIDED (more evidence needed)'})[self.outcome]}"
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


def is_binary(*scores: list[float]) -> bool:
    """Right/wrong outcomes (every score 0 or 1): Tango's test; anything else is a score."""
    return set(np.unique(np.concatenate([np.asarray(s, dtype=float) for s in scores]))) <= {0.0, 1.0}


def paired_result(metric: str, candidate: list[float], reference: list[float], tolerance: float, confidence: float, power_alpha: float, resamples: int, directions: dict[str, str] | None = None) -> stats.PairedResult:
    """The paired comparison of one metric, oriented so that a positive difference is better
    for the candidate: Tango's score test for 0/1 outcomes, a paired bootstrap otherwise (see
    pipelines/stats.py). `power_alpha` is the level the power is computed at."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-zero number of items, got {a.size} and {b.size}")
    higher = direction(metric, directions) == "higher"
    if is_binary(a, b):
        return stats.paired_binary(a if higher else 1 - a, b if higher else 1 - b, tolerance, confidence, power_alpha)
    return stats.paired_continuous(a - b if higher else b - a, tolerance, confidence, power_alpha, resamples)


def noninferiority_p(metric: str, candidate: list[float], reference: list[float], tolerance: float, resamples: int, seed: int = 0, directions: dict[str, str] | None = None) -> tuple[float, str]:
    """One-sided p-value of H0 "the candidate is worse than the reference by `tolerance` or
    more" (small p: non-inferiority shown), and the test that gave it."""
    r = paired_result(metric, candidate, reference, tolerance, 0.95, 0.025, resamples, directions)
    return r.p, r.test


def holm(pvalues: dict[str, float], alpha: float) -> dict[str, float]:
    """Holm's step-down adjusted p-values: each metric is shown non-inferior when its adjusted
    p <= alpha. Testing more metrics then never means more false promotions."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def _paired_text(metric: str, r: stats.PairedResult, tol: float, adjusted: float, alpha: float, verdict: str, higher: bool) -> str:
    sign = 1 if higher else -1  # back to the metric's own units
    low, high = sorted((sign * r.low, sign * r.high))
    counts = f"; {r.wins} better, {r.losses} worse of {r.n} items" if r.wins is not None else f" over {r.n} items"
    needed = f"{r.items_needed:,}" if r.items_needed is not None else "over 1,000,000"
    if metric == "judge_win_rate":  # the candidate's points against an as-good 0.5
        head = f"win rate vs champion {0.5 + r.diff:.4f} [{0.5 + r.low:.4f}, {0.5 + r.high:.4f}]{counts}; margin {tol:g} below 0.5 "
    else:
        head = f"paired diff vs champion {sign * r.diff:+.4f} [{low:+.4f}, {high:+.4f}]{counts}; margin {tol:g} "
    return head + (
        f"({r.test}, Holm p={adjusted:.4f} vs {alpha:.3f}); power {r.power:.2f} for an equally good candidate "
        f"(80 % needs ~{needed} items): {verdict}"
    )


def paired_checks(
    paired: dict[str, tuple[list[float], list[float]]], policy: GateParams, directions: dict[str, str] | None = None, tolerances: dict[str, float] | None = None
) -> list[Check]:
    """Non-inferiority against the champion on every paired metric, Holm-corrected. One-sided
    alpha = (1 - confidence) / 2, the same bar as the lower end of a two-sided interval.
    `tolerances` overrides gate.champion_tolerance per metric (a task's own margin).

    A metric not shown non-inferior is one of three things, and the check says which:
    - worse: the whole interval of the difference is below zero, so the candidate is worse than
      the champion, not merely unproven: FAILED;
    - not enough items: an equally good candidate would have passed with probability below
      gate.min_power at this n and this discordance, so the data could not tell; the check is
      pending (undecided) and gate.on_undecided says whether that blocks (default) or passes;
    - not shown non-inferior, though the data could have shown it: FAILED.
    Power is computed at alpha / (number of paired metrics): the bar Holm holds the first metric
    to, so the figure is a lower bound for the others."""
    alpha = (1 - policy.confidence) / 2
    tolerances = tolerances or {}
    if not paired:
        return []
    power_alpha = alpha / len(paired)
    results = {
        metric: paired_result(metric, cand, champ, tolerances.get(metric, policy.champion_tolerance), policy.confidence, power_alpha, policy.bootstrap_resamples, directions)
        for metric, (cand, champ) in paired.items()
    }
    adjusted = holm({m: r.p for m, r in results.items()}, alpha)
    checks = []
    for metric, r in results.items():
        tol = tolerances.get(metric, policy.champion_tolerance)
        higher = direction(metric, directions) == "higher"
        pending = False
        if adjusted[metric] <= alpha:
            passed, verdict = True, "non-inferior: ok"
        elif r.high < 0:
            passed, verdict = False, "worse than the champion: FAILED"
        elif r.power < policy.min_power:
            pending = True
            passed = policy.on_undecided == "pass"
            verdict = f"not enough items to tell (power below {policy.min_power:g}): " + ("UNDECIDED, passed as gate.on_undecided says" if passed else "UNDECIDED, blocked (gate.on_undecided: block)")
        else:
            passed, verdict = False, "not shown non-inferior: FAILED"
        text = _paired_text(metric, r, tol, adjusted[metric], alpha, verdict, higher)
        if metric == "judge_win_rate":  # a win rate against 0.5: show the rate itself
            checks.append(Check(metric, f"win rate vs champion, 0.5 minus tolerance ({r.test}, Holm p={adjusted[metric]:.4f} <= {alpha:.3f})", 0.5 + r.diff, 0.5 - tol, passed, pending=pending, text=text, paired=r))
            continue
        bound = -tol if higher else tol
        sign = 1 if higher else -1
        checks.append(Check(metric, f"paired diff vs champion ({r.test}, Holm p={adjusted[metric]:.4f} <= {alpha:.3f}); tolerance", sign * r.diff, bound, passed, pending=pending, text=text, paired=r))
    return checks


def slice_check(candidate: list[float], champion: list[float], policy: GateParams) -> Check:
    """The feedback slice: the held-out items users corrected, candidate and champion paired
    item by item (1: the model prefers the user's correction to the answer that was served).
    Unlike the standard suite's non-inferiority, the candidate must be shown *better*: the
    lower end of the two-sided interval of candidate minus champion at gate.confidence (Tango's
    score interval, the same machinery, margin turned around) must exceed
    gate.feedback_slice_margin; so the one-sided error of promoting a candidate that is not
    better is (1 - confidence) / 2. Only the discordant items move it: a candidate that flips
    as many items one way as the other is not better, however many it flips.
    Under gate.feedback_slice: report the check is shown and never blocks."""
    margin = policy.feedback_slice_margin
    alpha = (1 - policy.confidence) / 2
    r = paired_result(FEEDBACK_SLICE_METRIC, candidate, champion, -margin, policy.confidence, alpha, policy.bootstrap_resamples)
    better = r.low > margin
    counts = f"{r.wins} better, {r.losses} worse of {r.n} held-out feedback items" if r.wins is not None else f"{r.n} held-out feedback items"
    head = (f"candidate {float(np.mean(candidate)):.4f} vs champion {float(np.mean(champion)):.4f}; paired diff {r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}] "
            f"({counts}; {r.test}, {policy.confidence:.0%} interval); superiority: lower end must exceed {margin:g}")
    # The best a candidate can do is fix every item the champion misses and break none: when
    # even that could not clear the bar, the slice is too small to tell, not a verdict on this
    # candidate (undecided, as gate.on_undecided says, like the suite's low-power checks).
    misses = int(round(len(champion) - float(np.sum(champion))))
    best_low = stats.score_interval(misses, 0, len(champion), policy.confidence)[0] if r.wins is not None else float("inf")
    pending = False
    if better:
        verdict, passed = "better than the champion on the feedback slice: ok", True
    elif r.high < 0:
        verdict, passed = "worse than the champion on the feedback slice: FAILED", False
    elif best_low <= margin:
        pending = True
        passed = policy.on_undecided == "pass"
        verdict = (f"not enough items to tell: the champion misses {misses}, and even fixing all of them would leave the lower end at {best_low:+.4f}: "
                   + ("UNDECIDED, passed as gate.on_undecided says" if passed else "UNDECIDED, blocked (gate.on_undecided: block)"))
    else:
        verdict, passed = "not shown better than the champion on the feedback slice: FAILED", False
    if not passed and policy.feedback_slice == "report":
        passed, verdict = True, verdict.replace(": FAILED", ": reported, not blocking (gate.feedback_slice: report)").replace("UNDECIDED, blocked (gate.on_undecided: block)", "reported, not blocking (gate.feedback_slice: report)")
    return Check(FEEDBACK_SLICE_METRIC, f"superiority vs champion on the feedback slice ({r.test}, interval's lower end > margin)", r.low, margin, passed, pending=pending, text=f"{head}: {verdict}", paired=r)


def compare_steps(steps: list[tuple[str, list[dict]]], metric: str, policy: GateParams, directions: dict[str, str] | None = None) -> list[dict]:
    """Each recipe step against the step before it on `metric`, paired item by item: a step
    has `regressed` when the whole interval of its difference lies below zero (it is worse
    than the step it started from, beyond what the items' noise explains). JSON-ready rows for
    metrics/evaluate.json; `steps` is [(step name, its per-item rows)] in recipe order."""
    rows = []
    for (before, before_items), (step, items) in zip(steps, steps[1:]):
        cand, ref = pair_items(items, before_items, metric)
        if not cand:
            continue
        r = paired_result(metric, cand, ref, 0.0, policy.confidence, (1 - policy.confidence) / 2, policy.bootstrap_resamples, directions)
        sign = 1 if direction(metric, directions) == "higher" else -1
        low, high = sorted((sign * r.low, sign * r.high))
        rows.append({
            "step": step, "previous": before, "metric": metric, "items": r.n, "test": r.test,
            "value": float(np.mean(cand)), "previous_value": float(np.mean(ref)),
            "diff": sign * r.diff, "low": low, "high": high, "better": r.wins, "worse": r.losses, "regressed": bool(r.high < 0),
        })
    return rows


def choose_step(steps: list[str], comparisons: list[dict], policy: GateParams) -> str:
    """The recipe step that becomes the candidate: the last one, unless gate.step_regression
    is serve_best and a step regressed; then the last step before the first regression."""
    if policy.step_regression == "serve_best":
        for c in comparisons:
            if c["regressed"]:
                return c["previous"]
    return steps[-1]


def step_checks(comparisons: list[dict], candidate_step: str | None, policy: GateParams) -> list[Check]:
    """The gate's view of each recipe step against the one before (see `compare_steps`): a
    regression fails the gate under gate.step_regression: block; under serve_best it is
    reported and the candidate is the step before it."""
    checks = []
    for c in comparisons:
        head = f"{c['step']} {c['value']:.4f} vs {c['previous']} {c['previous_value']:.4f}: {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] over {c['items']} items"
        if c["better"] is not None:
            head += f" ({c['better']} better, {c['worse']} worse)"
        if not c["regressed"]:
            verdict, passed = "not worse than the step before: ok", True
        elif policy.step_regression == "block":
            verdict, passed = f"{c['step']} made it worse: FAILED (gate.step_regression: block; serve_best would serve {c['previous']})", False
        else:
            verdict, passed = f"{c['step']} made it worse: reported; the candidate is {candidate_step} (gate.step_regression: serve_best)", True
        checks.append(Check(c["metric"], f"recipe step {c['step']} vs {c['previous']}", c["diff"], 0.0, passed, text=f"{head}: {verdict}"))
    return checks


def decide(
    candidate: dict,
    baseline: dict | None,
    champion: dict | None,
    policy: GateParams,
    paired: dict[str, tuple[list[float], list[float]]] | None = None,
    directions: dict[str, str] | None = None,
    beat_base: set[str] | None = None,
    tolerances: dict[str, float] | None = None,
    steps: list[dict] | None = None,
    candidate_step: str | None = None,
    feedback_slice: tuple[list[float], list[float]] | None = None,
) -> Decision:
    """The quality gate: absolute thresholds, better than the untrained base, and no worse than
    the current champion: by paired tests where per-item scores of both are given
    (`paired[metric]` = (candidate items, champion items); for `judge_win_rate`, the candidate's
    points against 0.5 each), else by point values within tolerance.

    `directions`: the evaluation suite's metrics and directions (with the built-in ones);
    `beat_base`: the metrics that must beat the base (default: every metric with a direction);
    `tolerances`: per-metric margins against the champion (default: gate.champion_tolerance);
    `steps`: each recipe step against the one before (`compare_steps`, from the evaluate stage),
    `candidate_step` the one that was served;
    `feedback_slice`: (candidate items, champion items) on the held-out feedback set, which the
    candidate must be shown better on (`slice_check`), apart from the suite's non-inferiority."""
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
    checks += step_checks(steps or [], candidate_step, policy)
    paired = paired or {}
    checks += paired_checks(paired, policy, directions, tolerances)
    if feedback_slice and feedback_slice[0]:
        checks.append(slice_check(*feedback_slice, policy))
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
