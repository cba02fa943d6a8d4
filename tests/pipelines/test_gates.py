import math

import numpy as np
import pytest

from pipelines.config import CanaryParams, GateParams, QuantizeParams, Threshold
from pipelines.gates import decide, decide_canary, decide_quantization, direction, error_rate_test

# The built-in `exact_match` direction keeps these unit tests short; a suite's own metrics are
# tested below with the directions params declares.
T = {"exact_match": Threshold(min=0.8), "preference_accuracy": Threshold(min=0.5)}
POLICY = GateParams(thresholds=T)
GOOD = {"exact_match": 0.95, "validation_loss": 0.4, "preference_accuracy": 0.8}
BASE = {"exact_match": 0.0, "validation_loss": 5.6}


def test_good_candidate_passes():
    d = decide(GOOD, BASE, None, POLICY)
    assert d.passed and not d.reasons


def test_threshold_failure_says_which_metric_and_by_how_much():
    d = decide({**GOOD, "exact_match": 0.5}, BASE, None, POLICY)
    assert not d.passed
    assert d.reasons == ["exact_match = 0.5000 vs >= 0.8000: FAILED by 0.3000"]


def test_missing_metric_fails_rather_than_passes():
    d = decide({"exact_match": 0.95}, BASE, None, POLICY)
    assert not d.passed and any("preference_accuracy: missing" in r for r in d.reasons)


def test_direction_matters_for_loss():
    worse_than_base = {**GOOD, "validation_loss": 6.0}
    assert not decide(worse_than_base, BASE, None, POLICY).passed
    assert decide(GOOD, BASE, None, GateParams(thresholds={"validation_loss": Threshold(max=1.0)})).passed
    assert direction("validation_loss") == "lower"
    with pytest.raises(ValueError, match="unknown metric"):
        direction("bleu")


def test_champion_within_tolerance():
    champion = {"exact_match": 0.99, "validation_loss": 0.3, "preference_accuracy": 0.8}
    d = decide(GOOD, BASE, champion, GateParams(thresholds=T, champion_tolerance=0.02))
    assert not d.passed and d.reasons == ["exact_match = 0.9500 vs champion within tolerance 0.9700: FAILED by 0.0200"]
    assert decide(GOOD, BASE, champion, GateParams(thresholds=T, champion_tolerance=0.2)).passed


def test_champion_missing_a_metric_is_not_compared_on_it():
    assert decide(GOOD, BASE, {"exact_match": 0.9}, POLICY).passed


def test_quantization_gate_bounds_the_drop():
    assert decide_quantization({"exact_match": 0.93}, {"exact_match": 0.95}, QuantizeParams(max_drop=0.05)).passed
    d = decide_quantization({"exact_match": 0.80}, {"exact_match": 0.95}, QuantizeParams(max_drop=0.05))
    assert not d.passed and "FAILED by 0.1000" in d.reasons[0]


def test_canary_decisions():
    policy = CanaryParams(min_exact_match=0.8, max_error_rate=0.0, champion_tolerance=0.05, max_latency_ratio=2.0, min_agreement=0.8)
    stable = {"requests": 2700, "failures": 0, "exact_match": 0.95, "p95_latency_s": 0.01}
    good = {"requests": 300, "failures": 0, "error_rate": 0.0, "exact_match": 0.95, "p95_latency_s": 0.012, "agreement": 1.0}
    assert decide_canary(good, stable, policy).outcome == "pass"
    assert decide_canary(good, None, policy).passed  # first release: absolute checks only
    assert not decide_canary({**good, "error_rate": 0.1}, None, policy).passed
    assert decide_canary({**good, "failures": 30, "error_rate": 0.1}, stable, policy).outcome == "fail"
    slow = decide_canary({**good, "p95_latency_s": 0.03}, stable, policy)
    assert not slow.passed and slow.reasons == ["p95_latency_ratio = 3.0000 vs <= 2.0000: FAILED by 1.0000"]
    assert not decide_canary({**good, "exact_match": 0.85}, stable, policy).passed
    assert not decide_canary({**good, "agreement": 0.5}, stable, policy).passed
    dead = decide_canary({"exact_match": None, "error_rate": 1.0, "p95_latency_s": None}, stable, policy)
    assert dead.outcome == "fail" and any(r.startswith("error_rate: missing") for r in dead.reasons)
    # What tasks/deploy.py reports for a candidate that never started: no stable, no requests.
    assert decide_canary({"requests": 0, "error_rate": 1.0, "exact_match": 0.0, "p95_latency_s": None}, None, CanaryParams(min_exact_match=0.0)).outcome == "fail"


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
    from pipelines.gates import Decision, rollout_action

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


def test_paired_bootstrap_interval_brackets_the_mean_difference():
    from pipelines.gates import paired_bootstrap

    cand = [1.0] * 90 + [0.0] * 10
    ref = [1.0] * 95 + [0.0] * 5
    ci = paired_bootstrap(cand, ref, resamples=2000, confidence=0.95, seed=0)
    assert ci.mean == pytest.approx(-0.05)
    assert ci.low < -0.05 < ci.high
    assert paired_bootstrap(cand, ref, 2000, 0.95, seed=0) == ci, "seeded: reproducible"
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_bootstrap([1.0], [1.0, 0.0], 100, 0.95)


def test_statistical_gate_blocks_a_real_regression_but_not_noise():
    from pipelines.gates import pair_items

    champion = [{"id": f"p{i}", "exact_match": 1.0} for i in range(200)]
    # 15 % of items newly wrong: a regression the interval must see.
    worse = [{"id": f"p{i}", "exact_match": 0.0 if i % 7 == 0 else 1.0} for i in range(200)]
    d = decide(GOOD, BASE, None, POLICY, paired={"exact_match": pair_items(worse, champion, "exact_match")})
    assert not d.passed and any("paired diff vs champion" in r for r in d.reasons)
    # One flipped item out of 200 is within tolerance.
    noise = [{"id": f"p{i}", "exact_match": 0.0 if i == 3 else 1.0} for i in range(200)]
    assert decide(GOOD, BASE, None, POLICY, paired={"exact_match": pair_items(noise, champion, "exact_match")}).passed


def test_pairing_uses_only_items_both_models_saw():
    from pipelines.gates import pair_items

    a = [{"id": "x", "exact_match": 1}, {"id": "y", "exact_match": 0}, {"id": "new", "exact_match": 1}]
    b = [{"id": "y", "exact_match": 1}, {"id": "x", "exact_match": 1}]
    assert pair_items(a, b, "exact_match") == ([1.0, 0.0], [1.0, 1.0])


def test_items_with_the_same_prompt_stay_two_items():
    from pipelines.gates import pair_items

    # Same prompt, two different reference answers: distinct ids, so neither is dropped.
    champ = [{"id": "a1", "prompt": "q", "exact_match": 1}, {"id": "a2", "prompt": "q", "exact_match": 1}]
    cand = [{"id": "a1", "prompt": "q", "exact_match": 1}, {"id": "a2", "prompt": "q", "exact_match": 0}]
    assert pair_items(cand, champ, "exact_match") == ([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="twice"):
        pair_items(cand, champ + champ[:1], "exact_match")


def test_binary_metrics_use_mcnemar_and_continuous_ones_the_bootstrap():
    from pipelines.gates import noninferiority_p

    same = [1.0] * 50 + [0.0] * 50
    p, test = noninferiority_p("exact_match", same, same, 0.02, 500)
    assert test == "mcnemar" and p == 0.0, "identical outcomes are within any positive tolerance"
    worse = [0.0] * 20 + same[20:]
    p_worse, _ = noninferiority_p("exact_match", worse, same, 0.02, 500)
    assert p_worse > 0.5, "20 % newly wrong is not non-inferior"
    losses = [0.5 + 0.01 * i for i in range(100)]
    p_loss, test = noninferiority_p("validation_loss", losses, losses, 0.02, 500)
    assert test == "paired bootstrap" and p_loss < 0.01


def test_holm_makes_more_metrics_harder_not_easier_to_pass():
    from pipelines.gates import holm

    assert holm({"a": 0.02}, 0.025) == {"a": 0.02}
    adjusted = holm({"a": 0.02, "b": 0.01, "c": 0.3}, 0.025)
    assert adjusted == {"b": 0.03, "a": 0.04, "c": 0.3}, "each p is multiplied by the number still in play, monotone"


def test_suite_metrics_carry_the_direction_params_declares():
    from pipelines.config import EvaluateParams, Params

    directions = EvaluateParams().directions()
    assert directions["safety/pii_leak_rate"] == "lower"
    policy = GateParams()  # the default thresholds name suite metrics
    good = {"reverse_digits/exact_match": 0.95, "preference_accuracy": 0.8, "safety/refusal_rate": 1.0, "safety/pii_leak_rate": 0.0, "validation_loss": 0.4}
    base = {"reverse_digits/exact_match": 0.0, "safety/refusal_rate": 0.0, "safety/pii_leak_rate": 0.0, "validation_loss": 5.0}
    assert decide(good, base, None, policy, directions=directions, beat_base=EvaluateParams().beat_base()).passed
    leaky = decide({**good, "safety/pii_leak_rate": 0.1}, base, None, policy, directions=directions, beat_base=EvaluateParams().beat_base())
    assert leaky.reasons == ["safety/pii_leak_rate = 0.1000 vs <= 0.0000: FAILED by 0.1000"]
    with pytest.raises(ValueError, match="unknown metric"):
        decide(good, base, None, policy)  # without the suite's directions nothing is guessed
    with pytest.raises(ValueError, match=r"gate.thresholds on unknown metric\(s\) \['reverse_digits/exact_matches'\].*'<task>/<metric>'"):
        Params.model_validate({"gate": {"thresholds": {"reverse_digits/exact_matches": {"min": 0.8}}}})


def test_quantization_gate_bounds_every_suite_metric_in_its_direction():
    d = {"reverse_digits/exact_match": "higher", "safety/pii_leak_rate": "lower"}
    before = {"reverse_digits/exact_match": 0.95, "safety/pii_leak_rate": 0.0}
    assert decide_quantization({"reverse_digits/exact_match": 0.93, "safety/pii_leak_rate": 0.0}, before, QuantizeParams(max_drop=0.05), d).passed
    leaks = decide_quantization({"reverse_digits/exact_match": 0.95, "safety/pii_leak_rate": 0.2}, before, QuantizeParams(max_drop=0.05), d)
    assert not leaks.passed and leaks.reasons[0].startswith("safety/pii_leak_rate = 0.2000 vs unquantized minus max_drop 0.0500")


def test_a_small_task_gets_its_own_margin_and_the_default_params_give_safety_one():
    # 20 safety items, the candidate better on one: 20 items cannot show a 0.02 margin, so the
    # gate's default margin blocks a candidate that is no worse; the task's own margin lets it pass.
    from pipelines.config import EvaluateParams

    champ = [1.0] * 19 + [0.0]
    cand = [1.0] * 20
    paired = {"safety/refusal_rate": (cand, champ)}
    directions = {"safety/refusal_rate": "higher"}
    policy = GateParams(thresholds={})
    assert not decide({}, None, None, policy, paired=paired, directions=directions).passed
    assert decide({}, None, None, policy, paired=paired, directions=directions, tolerances={"safety/refusal_rate": 0.15}).passed
    worse = [1.0] * 14 + [0.0] * 6  # 5 items worse: beyond even the wider margin
    assert not decide({}, None, None, policy, paired={"safety/refusal_rate": (worse, champ)}, directions=directions, tolerances={"safety/refusal_rate": 0.15}).passed
    assert EvaluateParams().tolerances() == {"safety/refusal_rate": 0.15, "safety/pii_leak_rate": 0.15}
