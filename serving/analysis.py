"""The canary's analysis, beside the release controller that uses it (`serving.rollout`): pure
functions of what a step collected. `decide_canary` checks the canary's error rate (a sequential
test against stable's in the same step; a 4xx only the canary gave counts there as a failure),
its p95 latency against stable's, and its correctness on the golden prompts, absolutely and
against stable's prompt by prompt; `rollout_action` then advances, promotes or rolls back. No
I/O: every branch is unit-tested (tests/serving/test_analysis.py).

Agreement with stable is reported, never held against the canary: a candidate exists to answer
differently (a better one answered 30 % of the prompts differently from the champion it beat),
so where the two differ, only a reference answer can say which is right. On the golden prompts
it can: the paired comparison counts the prompts only the canary gets right against those only
stable gets right. On mirrored real traffic there is no reference, and agreement is a figure for
a person to read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines.config import CanaryParams
from pipelines.gates import Check, Decision

Outcome = Literal["pass", "fail", "continue"]


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
    for failures if they are missing; a 4xx only the canary gave is a failure), p95_latency_s,
    exact_match and golden_correct (golden prompts, prompt by prompt) and, when shadowing or
    mirroring ran, agreement (reported only). `stable`: its requests, failures and
    p95_latency_s over the same step, and exact_match and golden_correct on the same prompts. Both may carry the engines' own figures
    (`engine_p95_ttft_s` and the rest, serving.engine_metrics): the canary's p95 time to first
    token is then held to max_ttft_ratio of stable's. Without a stable (a first release) only
    the absolute checks apply, error_rate <= max_error_rate among them.

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
            checks.append(golden_against_stable(canary, stable, policy.champion_tolerance))
        if stable.get("p95_latency_s"):
            ratio = canary["p95_latency_s"] / stable["p95_latency_s"] if canary.get("p95_latency_s") is not None else None
            checks.append(Check("p95_latency_ratio", "<=", ratio, policy.max_latency_ratio, ratio is not None and ratio <= policy.max_latency_ratio))
        if canary.get("engine_p95_ttft_s") is not None and stable.get("engine_p95_ttft_s") is not None:
            # The engines' own view (serving.engine_metrics): queueing and prefill inside them.
            ratio = max(canary["engine_p95_ttft_s"], policy.ttft_floor_s) / max(stable["engine_p95_ttft_s"], policy.ttft_floor_s)
            checks.append(Check("engine_p95_ttft_ratio", "<=", ratio, policy.max_ttft_ratio, ratio <= policy.max_ttft_ratio))
        if canary.get("requests"):
            checks.append(client_errors_report(canary, stable))
    if canary.get("agreement") is not None:
        a = canary["agreement"]
        where = f"on {canary['mirrored_compared']} mirrored requests" if canary.get("mirrored_compared") else "on the shadowed prompts"
        checks.append(Check("agreement", "report", a, None, True, text=f"{a:.2f} with stable {where} (reported: a candidate may answer differently; correctness decides)"))
    return Decision("canary", all(c.passed for c in checks), checks)


def golden_against_stable(canary: dict, stable: dict, tolerance: float) -> Check:
    """The canary's golden-prompt exact match may trail stable's by at most `tolerance`. With
    both sides' answers prompt by prompt (`golden_correct`), the difference is read off the
    prompts where they differ in correctness: the canary alone right on `wins`, stable alone on
    `losses`; (losses - wins) / n <= tolerance. Prompts both get right or both get wrong say
    nothing about which is better, however differently the two worded them."""
    em_c, em_s = canary.get("exact_match"), stable["exact_match"]
    ours, theirs = canary.get("golden_correct"), stable.get("golden_correct")
    bound = em_s - tolerance
    if ours is not None and theirs is not None and len(ours) == len(theirs) and ours:
        wins = sum(a and not b for a, b in zip(ours, theirs))
        losses = sum(b and not a for a, b in zip(ours, theirs))
        deficit = (losses - wins) / len(ours)
        passed = deficit <= tolerance + 1e-12
        text = (
            f"of {len(ours)} golden prompts, the canary alone is right on {wins}, stable alone on {losses}: "
            f"{em_c:.2f} vs stable {em_s:.2f}, may trail by at most {tolerance:g}: " + ("ok" if passed else "FAILED")
        )
        return Check("exact_match_vs_stable", ">=", em_c, bound, passed, text=text)
    return Check("exact_match_vs_stable", ">= stable within tolerance", em_c, bound, em_c is not None and em_c >= bound - 1e-12)


def client_errors_report(canary: dict, stable: dict) -> Check:
    """4xx on the same requests: a canary's 4xx is asked of stable too (serving.proxy); one that
    stable answered is the canary's failure (`refused_valid`, in the error-rate test above),
    one that stable refused as well is the request's own, counted alike for both."""
    refused = int(canary.get("refused_valid") or 0)
    own_c, own_s = canary.get("client_error_rate"), stable.get("client_error_rate")
    fmt = lambda r: "-" if r is None else f"{r:.2%}"  # noqa: E731
    text = f"{refused} refused that stable answered (counted as failures); 4xx the requests caused: canary {fmt(own_c)}, stable {fmt(own_s)}"
    return Check("client_errors", "report", float(refused), None, True, text=text)


def rollout_action(decisions: list[Decision], step: int, policy: CanaryParams) -> Literal["advance", "promote", "rollback"]:
    """What the controller does after analysing `step` (0-based), given every analysis so far."""
    if sum(not d.passed for d in decisions) > policy.failure_limit:
        return "rollback"
    return "promote" if step == len(policy.steps) - 1 else "advance"
