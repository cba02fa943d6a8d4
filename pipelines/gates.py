"""Gates are pure functions: metrics in, Decision out. No I/O, no MLflow, no Prefect,
so every branch is unit-testable and a gate that cannot fail is visible as a failing test.

Every metric a gate may read declares its direction: the built-in ones here, the evaluation
suite's own in params (`evaluate.tasks[].metrics`, named '<task>/<metric>'); a threshold on an
undeclared metric is rejected rather than guessed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipelines.config import CanaryParams, GateParams, QuantizeParams

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


@dataclass(frozen=True)
class ErrorRateTest:
    """Wald's sequential probability ratio test (SPRT) of the canary's error rate p against
    stable's rate r over the same step, r taken as known:

        H0: p <= r + margin      H1: p >= r + effect

    Each canary answer moves the log-likelihood ratio (LLR) of H1 to H0: up by ln(p1 / p0) for
    a failure, down by ln((1 - p0) / (1 - p1)) for a success (p0 = r + margin, p1 = r + effect).
    At any look the step fails once LLR >= ln(2 / alpha), passes once LLR <= ln(beta), and
    otherwise continues. The LLR is a martingale under H0 and its inverse under H1, so by
    Ville's inequality these boundaries hold for any schedule of looks (each request, each
    batch, a single look): a canary within the margin fails by the upper boundary with
    probability <= alpha / 2, a canary worse by the effect passes with probability <= beta.

    `floor`: the fewest requests at which a step can pass (a canary without failures).
    `cap`: the requests by which every step is decided. Undecided at the cap, a step fails:
    the safe side, since a release held back costs a rerun and a bad one costs users errors;
    the cap is the fewest requests from which that costs a canary within the margin at most
    the other alpha / 2 (P(LLR > ln(beta)) <= alpha / 2 at every n >= cap, exactly, by the
    binomial distribution). So a step's false-rollback probability is <= alpha and its
    miss probability <= beta whatever the looks, as long as one of them is at or after the cap.

    Stable's own failures are what keeps one canary failure from being fatal: p0 = r + margin,
    so against a stable without failures it is the margin alone. With margin > 0 a failure
    adds ln(effect / margin) (2.30 at the defaults, below the upper boundary 3.69): it takes
    two failures within ~100 requests, or three within ~350, to fail a step. With margin = 0
    the params say no failure above stable's is acceptable, and against a spotless stable
    the first failure fails the step (p0 = 0: LLR = +inf).

    What it does not model: stable's sampling error (its rate is an estimate from the same
    step; at weights <= 50 % stable has served at least as many requests as the canary)."""

    reference: float
    margin: float
    effect: float
    alpha: float
    beta: float

    @property
    def p0(self) -> float:
        return self.reference + self.margin

    @property
    def p1(self) -> float:
        return self.reference + self.effect

    @property
    def upper(self) -> float:
        return math.log(2 / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta)

    def llr(self, requests: int, failures: int) -> float:
        successes = requests - failures
        if self.p0 == 0:
            return math.inf if failures else successes * math.log(1 - self.p1)
        return failures * math.log(self.p1 / self.p0) + successes * math.log((1 - self.p1) / (1 - self.p0))

    @property
    def floor(self) -> int:
        """ceil(ln(1 / beta) / ln((1 - p0) / (1 - p1))): CanaryParams.min_step_requests at r = 0."""
        return math.ceil(math.log(1 / self.beta) / math.log((1 - self.p0) / (1 - self.p1)))

    @property
    def cap(self) -> int:
        return _sprt_cap(self.p0, self.p1, self.beta, self.alpha / 2)

    def outcome(self, requests: int, failures: int) -> Outcome:
        llr = self.llr(requests, failures)
        if llr >= self.upper:
            return "fail"
        if llr <= self.lower:
            return "pass"
        return "fail" if requests >= self.cap else "continue"


def _binomial_sf(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p): the upper terms summed directly (numpy only), as far
    as 12 standard deviations past the larger of k and the mean."""
    if k < 0:
        return 1.0
    if k >= n or p <= 0:
        return 0.0
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    if k + 1 < mean - 12 * sd:
        return 1.0
    i = np.arange(k + 1, min(n, math.ceil(max(k + 1, mean) + 12 * sd + 30)) + 1)
    log_first = math.lgamma(n + 1) - math.lgamma(k + 2) - math.lgamma(n - k) + (k + 1) * math.log(p) + (n - k - 1) * math.log1p(-p)
    ratios = np.log(n - i[:-1]) - np.log(i[:-1] + 1) + math.log(p) - math.log1p(-p)  # pmf(i + 1) / pmf(i)
    return min(1.0, float(np.exp(log_first + np.concatenate([[0.0], np.cumsum(ratios)])).sum()))


@functools.lru_cache(maxsize=512)
def _sprt_cap(p0: float, p1: float, beta: float, tail: float) -> int:
    """The fewest requests n from which P(the LLR is still above ln(beta) at n | p0) <= tail
    at every later n. A pass at n allows at most k(n) failures, a staircase in n; within a
    stair the chance of more failures grows with n, so only each stair's last n matters. Those
    chances fall from stair to stair (the allowance grows like n times the SPRT's crossover
    rate, which is above p0): the first stair below `tail` is found by bisection, and the
    stairs after it are checked up to a quarter further on for the staircase's wobbles."""
    per_success = math.log((1 - p0) / (1 - p1))  # the LLR's fall per answered request
    first_pass = math.ceil(math.log(1 / beta) / per_success)
    if p0 == 0:  # under H0 nothing fails: every canary passes at the floor
        return first_pass
    per_failure = math.log(p1 / p0) + per_success  # a failure instead of a success

    def first(k: int) -> int:  # the fewest requests at which k failures still pass
        return max(first_pass, math.ceil((k * per_failure + math.log(1 / beta)) / per_success))

    def bad(k: int) -> bool:  # at the stair's last n, more than k failures are too likely
        return _binomial_sf(k, first(k + 1) - 1, p0) > tail

    if not bad(0):
        good = 0
    else:
        low, high = 0, 1  # bad(low), then bisect to the first good stair
        while bad(high):
            low, high = high, 2 * high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if bad(mid) else (low, mid)
        good = high
    k, until = good, max(first(good) * 5 // 4, first(good + 20))
    while first(k) <= until:
        if bad(k):
            good, until = k + 1, max(first(k + 1) * 5 // 4, first(k + 21))
        k += 1
    return first(good)


def error_rate_test(policy: CanaryParams, reference: float) -> ErrorRateTest:
    return ErrorRateTest(reference, policy.error_rate_margin, policy.error_rate_effect, policy.error_rate_alpha, policy.error_rate_beta)


def _count(d: dict, key: str) -> int | None:
    value = d.get(key)
    return None if value is None else int(value)


def error_rate_check(canary: dict, stable: dict | None, policy: CanaryParams) -> Check:
    """The canary's error rate: the sequential test against stable's counts in the same step,
    or, without a stable (a first release, judged by its golden prompts alone), at most
    max_error_rate."""
    n, k = _count(canary, "requests"), _count(canary, "failures")
    if k is None and n is not None and canary.get("error_rate") is not None:
        k = round(canary["error_rate"] * n)
    if stable is None:
        err = canary.get("error_rate")
        if err is None and n and k is not None:
            err = k / n
        return Check("error_rate", "<=", err, policy.max_error_rate, err is not None and err <= policy.max_error_rate)
    if n is None or k is None:
        return Check("error_rate", "canary requests and failures for the sequential test", None, None, False)
    ns, ks = _count(stable, "requests") or 0, _count(stable, "failures") or 0
    reference = ks / ns if ns else policy.max_error_rate
    seen = f"{k} of {n} failed" + (f" ({k / n:.2%})" if n else "")
    against = f"stable {ks} of {ns} ({reference:.2%})" if ns else f"max_error_rate {reference:.2%} (stable served nothing this step)"
    if reference + policy.error_rate_effect >= 1:
        return Check("error_rate", "", k / n if n else None, None, True, text=f"{seen} vs {against}: no room for a worse canary: ok")
    test = error_rate_test(policy, reference)
    llr, outcome = test.llr(n, k), test.outcome(n, k)
    head = f"{seen} vs {against}: SPRT log-LR {llr:+.2f}"
    if outcome == "pass":
        verdict = f" <= {test.lower:.2f}: within +{policy.error_rate_margin:g} of it: ok"
    elif llr >= test.upper:
        verdict = f" >= {test.upper:.2f}: worse than it by {policy.error_rate_effect:g} or more: FAILED"
    elif outcome == "fail":
        verdict = f" still undecided at the cap of {test.cap} requests: FAILED (an undecided step is rolled back)"
    else:
        verdict = f" between {test.lower:.2f} and {test.upper:.2f}: continue (undecided; decided by {test.cap} requests)"
    return Check("error_rate", "sequential test", k / n if n else None, None, outcome == "pass", pending=outcome == "continue", text=head + verdict)


def decide_canary(canary: dict, stable: dict | None, policy: CanaryParams) -> Decision:
    """One canary analysis, a pure function of what was collected during a step.

    `canary`: requests and failures (the gateway's counts for this step; error_rate stands in
    for failures if they are missing), p95_latency_s, exact_match (golden prompts) and, when
    shadowing ran, agreement. `stable`: its requests, failures and p95_latency_s over the same
    step, and exact_match over the same prompts. Without a stable (a first release) only the
    absolute checks apply, error_rate <= max_error_rate among them.

    The error rate is judged by `ErrorRateTest` (see there) against stable's rate in the step,
    or max_error_rate when stable served nothing (the 100% step). Its verdict makes the
    Decision's `outcome`: 'pass', 'fail', or 'continue' when no check failed but the test has
    not decided yet. A controller then keeps the weight and collects more; the test fails the
    step itself once the canary reaches the cap undecided. `passed` is False for 'continue',
    so a controller that looks only once rolls such a step back: the safe side."""
    em = canary.get("exact_match")
    checks = [
        error_rate_check(canary, stable, policy),
        Check("exact_match", ">=", em, policy.min_exact_match, em is not None and em >= policy.min_exact_match),
    ]
    if stable:
        if stable.get("exact_match") is not None:
            checks.append(no_worse_than("exact_match", em, stable["exact_match"], policy.champion_tolerance, "stable within tolerance"))
        if stable.get("p95_latency_s"):
            ratio = canary["p95_latency_s"] / stable["p95_latency_s"] if canary.get("p95_latency_s") is not None else None
            checks.append(Check("p95_latency_ratio", "<=", ratio, policy.max_latency_ratio, ratio is not None and ratio <= policy.max_latency_ratio))
        if "agreement" in canary:
            a = canary["agreement"]
            checks.append(Check("agreement", ">=", a, policy.min_agreement, a is not None and a >= policy.min_agreement))
    return Decision("canary", all(c.passed for c in checks), checks)


def rollout_action(decisions: list[Decision], step: int, policy: CanaryParams) -> Literal["advance", "promote", "rollback"]:
    """What the controller does after analysing `step` (0-based), given every analysis so far."""
    if sum(not d.passed for d in decisions) > policy.failure_limit:
        return "rollback"
    return "promote" if step == len(policy.steps) - 1 else "advance"
