"""The canary's analysis (serving/analysis.py), a pure function of what a step collected: the
sequential error-rate test against stable's rate, latency, golden-prompt exact match (absolute,
and prompt by prompt against stable's), agreement (reported only), and the rollout's next action."""

import math

import numpy as np
import pytest

from pipelines.config import CanaryParams
from pipelines.gates import Decision
from serving.analysis import decide_canary, error_rate_test, rollout_action


def test_canary_decisions():
    policy = CanaryParams(min_exact_match=0.8, max_error_rate=0.0, champion_tolerance=0.05, max_latency_ratio=2.0)
    stable = {"requests": 2700, "failures": 0, "exact_match": 0.95, "p95_latency_s": 0.01}
    good = {"requests": 300, "failures": 0, "error_rate": 0.0, "exact_match": 0.95, "p95_latency_s": 0.012, "agreement": 1.0}
    assert decide_canary(good, stable, policy).outcome == "pass"
    assert decide_canary(good, None, policy).passed  # first release: absolute checks only
    assert not decide_canary({**good, "error_rate": 0.1}, None, policy).passed
    assert decide_canary({**good, "failures": 30, "error_rate": 0.1}, stable, policy).outcome == "fail"
    slow = decide_canary({**good, "p95_latency_s": 0.03}, stable, policy)
    assert not slow.passed and slow.reasons == ["p95_latency_ratio = 3.0000 vs <= 2.0000: FAILED by 1.0000"]
    assert not decide_canary({**good, "exact_match": 0.85}, stable, policy).passed
    reported = decide_canary({**good, "agreement": 0.5}, stable, policy)
    assert reported.passed and any(c.metric == "agreement" and "reported" in c.describe() for c in reported.checks)
    dead = decide_canary({"exact_match": None, "error_rate": 1.0, "p95_latency_s": None}, stable, policy)
    assert dead.outcome == "fail" and any(r.startswith("error_rate: missing") for r in dead.reasons)
    # The engines' own time to first token (scraped from their /metrics): held to max_ttft_ratio
    # of stable's, with times under ttft_floor_s counted as the floor.
    engines = CanaryParams(max_ttft_ratio=3.0, ttft_floor_s=0.05)
    fast = {**stable, "engine_p95_ttft_s": 0.02}
    assert decide_canary({**good, "engine_p95_ttft_s": 0.12}, fast, engines).passed  # 0.12 / 0.05 = 2.4
    queued = decide_canary({**good, "engine_p95_ttft_s": 0.4}, fast, engines)
    assert not queued.passed and queued.reasons == ["engine_p95_ttft_ratio = 8.0000 vs <= 3.0000: FAILED by 5.0000"]
    assert decide_canary({**good, "engine_p95_ttft_s": 0.4}, {**stable, "engine_p95_ttft_s": 0.2}, engines).passed
    unscraped = decide_canary({**good, "engine_p95_ttft_s": 0.4}, stable, engines)  # stable's engine said nothing
    assert unscraped.passed and all(c.metric != "engine_p95_ttft_ratio" for c in unscraped.checks)
    # What tasks/deploy.py reports for a candidate that never started: no stable, no requests.
    assert decide_canary({"requests": 0, "error_rate": 1.0, "exact_match": 0.0, "p95_latency_s": None}, None, CanaryParams(min_exact_match=0.0)).outcome == "fail"


def golden(right: str) -> list[bool]:
    """Per-prompt outcomes from a string: 'x' right, '.' wrong."""
    return [c == "x" for c in right]


def test_a_better_candidate_that_answers_differently_passes_and_a_worse_one_fails():
    """Agreement with the champion is no rollback reason: the better candidate below answers 30 %
    of the prompts differently (the issue's v2: agreement 0.70, golden EM 1.00 against 0.918).
    Where the two differ in correctness, the reference decides.
    Seen red: with the old `agreement >= min_agreement` check restored in decide_canary, the
    better candidate failed: ["agreement = 0.7000 vs >= 0.8000: FAILED by 0.1000"]."""
    policy = CanaryParams(min_exact_match=0.8, champion_tolerance=0.05)
    stable = {"requests": 2700, "failures": 0, "p95_latency_s": 0.467, "exact_match": 0.7, "golden_correct": golden("xxxxxxx...")}
    better = {"requests": 300, "failures": 0, "p95_latency_s": 0.09, "exact_match": 1.0, "golden_correct": golden("xxxxxxxxxx"), "agreement": 0.7}
    decision = decide_canary(better, stable, policy)
    assert decision.outcome == "pass", decision.reasons
    paired = next(c for c in decision.checks if c.metric == "exact_match_vs_stable")
    assert "the canary alone is right on 3, stable alone on 0" in paired.describe()
    # Different, and wrong where stable was right: 2 of 10 golden prompts lost, none won.
    worse = {**better, "exact_match": 0.8, "golden_correct": golden("xxxxx..xxx"), "agreement": 0.6}
    stable_right = {**stable, "exact_match": 1.0, "golden_correct": golden("xxxxxxxxxx")}
    failed = decide_canary(worse, stable_right, policy)
    assert failed.outcome == "fail" and [r.split(":")[0] for r in failed.reasons] == ["exact_match_vs_stable"]
    assert "the canary alone is right on 0, stable alone on 2" in failed.reasons[0]
    # Wins and losses offset: as good as stable on the golden prompts, though different.
    swapped = {**better, "exact_match": 0.7, "golden_correct": golden("..xxxxxxxx"), "agreement": 0.4}
    assert decide_canary({**swapped, "exact_match": 0.8}, {**stable, "exact_match": 0.8, "golden_correct": golden("xxxxxxxx..")}, policy).passed


def test_4xx_only_the_canary_gave_are_failures_and_the_requests_own_are_reported():
    """The gateway asks stable every request the canary refused (serving/proxy.py): refusals
    stable answered arrive as failures (refused_valid), so the error-rate test sees them."""
    policy = CanaryParams(min_exact_match=0.0)
    stable = {"requests": 2700, "failures": 0, "p95_latency_s": 0.1, "exact_match": 1.0, "client_error_rate": 0.02}
    refusing = {"requests": 300, "failures": 30, "refused_valid": 30, "client_error_rate": 0.02, "p95_latency_s": 0.1, "exact_match": 1.0}
    decision = decide_canary(refusing, stable, policy)
    assert decision.outcome == "fail" and decision.reasons[0].startswith("error_rate")
    report = next(c for c in decision.checks if c.metric == "client_errors").describe()
    assert "30 refused that stable answered" in report and "canary 2.00%, stable 2.00%" in report


# The canary's error rate: a sequential test against stable's rate in the same step. The defaults
# (margin 0.001, effect 0.01, alpha 0.05, beta 0.1) are what these tests pin down by hand.
DEFAULTS = CanaryParams()
PER_SUCCESS = math.log(0.999 / 0.99)  # 0.0090498: the log-LR's fall per answer, against a spotless stable
PER_FAILURE = math.log(0.01 / 0.001)  # 2.302585: its rise per failure


def analyse(requests: int, failures: int, stable: tuple[int, int] | None = (2700, 0), policy: CanaryParams = DEFAULTS):
    """One step's decision on the error rate alone (the other checks pass)."""
    canary = {"requests": requests, "failures": failures, "exact_match": 1.0, "p95_latency_s": 0.01}
    ref = {"exact_match": 1.0, "p95_latency_s": 0.01}
    if stable is not None:
        ref |= {"requests": stable[0], "failures": stable[1]}
    return decide_canary(canary, ref, policy)


def test_min_step_requests_is_where_a_spotless_canary_can_first_pass():
    # By hand: H0 is accepted at ln(beta) = ln(0.1) = -2.302585; each answer without a failure
    # lowers the log-LR by ln(0.999 / 0.99) = 0.0090498; 2.302585 / 0.0090498 = 254.43 -> 255.
    assert PER_SUCCESS == pytest.approx(0.0090498, abs=1e-7)
    assert DEFAULTS.min_step_requests == 255 == error_rate_test(DEFAULTS, 0.0).floor
    assert analyse(254, 0).outcome == "continue" and analyse(255, 0).outcome == "pass"
    assert CanaryParams(step_requests=20).step_requests == 255, "step_requests is a floor, raised to what the test needs"
    assert CanaryParams(step_requests=400).step_requests == 400
    # A coarser test needs fewer: effect 0.5 -> ln(10) / ln(0.999 / 0.5) = 3.33 -> 4.
    assert CanaryParams(step_requests=1, error_rate_effect=0.5).step_requests == 4
    # margin 0: ln(10) / -ln(0.99) = 229.1 -> 230.
    assert CanaryParams(error_rate_margin=0.0).min_step_requests == 230
    with pytest.raises(ValueError, match="must exceed error_rate_margin"):
        CanaryParams(error_rate_margin=0.01, error_rate_effect=0.01)


def binomial_sf(k: int, n: int, p: float) -> float:
    return 1 - sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_cap_is_where_an_undecided_step_costs_at_most_half_alpha():
    # A pass at n requests allows k(n) = floor((0.0090498 n - 2.302585) / 2.311635) failures.
    # At n = 1276, k = 3 and P(Binomial(1276, 0.001) > 3) = 0.041 > alpha / 2; from 1277 on,
    # k = 4 and P(> 4) = 0.010, and it stays below 0.025 for every larger n.
    test = error_rate_test(DEFAULTS, 0.0)
    assert test.cap == 1277

    def allowed(n: int) -> int:
        return math.floor((n * PER_SUCCESS - math.log(10)) / (PER_FAILURE + PER_SUCCESS))

    assert (allowed(1276), allowed(1277)) == (3, 4)
    assert binomial_sf(3, 1276, 0.001) == pytest.approx(0.0407, abs=5e-4)
    assert binomial_sf(4, 1277, 0.001) == pytest.approx(0.0101, abs=5e-4)
    assert all(binomial_sf(allowed(n), n, 0.001) <= 0.025 for n in range(1277, 4000, 7))
    # Undecided at the cap fails: 5 failures in 1277 leave the log-LR at +0.001.
    assert analyse(1276, 5).outcome == "continue"
    at_cap = analyse(1277, 5)
    assert at_cap.outcome == "fail" and "undecided at the cap of 1277" in at_cap.reasons[0]


def run_steps(p_canary: float, stable: tuple[int, int], trials: int, every: int = 5, seed: int = 0) -> dict[str, float]:
    """The step as a controller that keeps collecting runs it: a look after every `every`
    canary requests until the test passes or fails (it fails by itself at the cap). Stable's
    counts are fixed. Returns the share of each outcome."""
    rng = np.random.default_rng(seed)
    test = error_rate_test(DEFAULTS, stable[1] / stable[0])
    failures = np.cumsum(rng.random((trials, test.cap)) < p_canary, axis=1)
    looks = [*range(every, test.cap, every), test.cap]
    outcomes = {"pass": 0, "fail": 0}
    for row in failures:
        outcome = next(o for n in looks if (o := test.outcome(n, int(row[n - 1]))) != "continue")
        outcomes[outcome] += 1
    return {o: c / trials for o, c in outcomes.items()}


def test_a_one_percent_canary_against_a_spotless_stable_is_caught():
    trials, slack = 2000, 0.02
    rng = np.random.default_rng(0)
    # One look at the derived step size (what the controller does today): it passes only
    # without a single failure, 0.99^255 = 7.7 % of the time.
    floor = DEFAULTS.step_requests
    outcomes = [analyse(floor, int(k), (9 * floor, 0)).outcome for k in rng.binomial(floor, 0.01, trials)]
    assert np.mean([o != "pass" for o in outcomes]) >= 1 - DEFAULTS.error_rate_beta - slack
    assert set(outcomes) == {"pass", "fail", "continue"}
    # Collecting on until the test decides (at the cap at the latest), it fails the step.
    assert run_steps(0.01, (9 * 1277, 0), trials)["fail"] >= 1 - DEFAULTS.error_rate_beta - slack


def test_an_equal_canary_passes():
    trials, slack = 2000, 0.02
    # Spotless like stable: passes at the derived step size, every time.
    assert analyse(DEFAULTS.step_requests, 0, (9 * DEFAULTS.step_requests, 0)).outcome == "pass"
    # At the edge of H0 (stable's 0 % + the margin), and both at 0.5 %: the test passes it.
    assert run_steps(0.001, (100_000, 0), trials)["pass"] >= 1 - DEFAULTS.error_rate_alpha - slack
    assert run_steps(0.005, (100_000, 500), trials)["pass"] >= 1 - DEFAULTS.error_rate_alpha - slack
    # ... and the same 0.5 % stable still catches a canary at 1.5 %.
    assert run_steps(0.015, (100_000, 500), trials)["fail"] >= 1 - DEFAULTS.error_rate_beta - slack


def test_undecided_step_continues_and_says_so():
    d = analyse(300, 1)  # log-LR = 2.30 - 299 * 0.00905 = -0.40: between -2.30 and 3.69
    assert d.outcome == "continue" and not d.passed, "a controller that cannot wait rolls it back"
    assert "continue" in d.reasons[0] and "decided by 1277 requests" in d.reasons[0]
    assert "UNDECIDED" in d.summary()
    # Another check failing makes the step a failure, whatever the error rate still needs.
    slow = decide_canary({"requests": 300, "failures": 1, "exact_match": 1.0, "p95_latency_s": 1.0}, {"requests": 2700, "failures": 0, "p95_latency_s": 0.01}, DEFAULTS)
    assert slow.outcome == "fail"


def test_a_spotless_stable_makes_one_canary_failure_fatal_only_with_margin_zero():
    assert analyse(1, 1).outcome == "continue"  # +2.30 < ln(2 / 0.05) = 3.69
    assert analyse(2, 2).outcome == "fail"
    assert analyse(100, 2).outcome == "fail"  # 4.61 - 98 * 0.00905 = 3.72
    assert analyse(255, 1).outcome == "continue"
    strict = CanaryParams(error_rate_margin=0.0)
    assert analyse(5000, 1, policy=strict).outcome == "fail"
    # Stable's own failures raise what is expected of the canary: 1 in 255 is then no worse.
    assert analyse(400, 1, (2700, 27)).outcome == "pass"


def test_with_no_stable_traffic_the_canary_is_held_to_max_error_rate():
    # The 100% step: stable served nothing, so its rate is taken as max_error_rate.
    policy = CanaryParams(max_error_rate=0.01)
    assert analyse(1000, 10, (0, 0), policy).outcome == "pass"
    assert "max_error_rate" in analyse(300, 3, (0, 0), policy).reasons[0]
    assert analyse(300, 30, (0, 0), policy).outcome == "fail"
    assert analyse(300, 0, None).outcome == "pass"  # a stable without counts: no traffic either


def test_rollout_actions_follow_steps_and_failure_limit():
    ok, bad = Decision("canary", True), Decision("canary", False)
    strict = CanaryParams(steps=[10, 50, 100], failure_limit=0)
    assert rollout_action([ok], 0, strict) == "advance"
    assert rollout_action([ok, ok, ok], 2, strict) == "promote"
    assert rollout_action([ok, bad], 1, strict) == "rollback"
    lenient = CanaryParams(steps=[10, 50, 100], failure_limit=1)
    assert rollout_action([ok, bad], 1, lenient) == "advance"
    assert rollout_action([bad, ok, bad], 2, lenient) == "rollback"


def test_canary_steps_must_be_increasing_percentages():
    with pytest.raises(ValueError, match="increasing percentages"):
        CanaryParams(steps=[50, 10])
    with pytest.raises(ValueError, match="increasing percentages"):
        CanaryParams(steps=[0, 100])
