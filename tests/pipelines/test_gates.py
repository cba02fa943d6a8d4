import pytest

from pipelines.config import CanaryParams, GateParams, QuantizeParams, Threshold
from pipelines.gates import decide, decide_canary, decide_quantization, direction

GOOD = {"exact_match": 0.95, "validation_loss": 0.4, "preference_accuracy": 0.8}
BASE = {"exact_match": 0.0, "validation_loss": 5.6}


def test_good_candidate_passes():
    d = decide(GOOD, BASE, None, GateParams())
    assert d.passed and not d.reasons


def test_threshold_failure_says_which_metric_and_by_how_much():
    d = decide({**GOOD, "exact_match": 0.5}, BASE, None, GateParams())
    assert not d.passed
    assert d.reasons == ["exact_match = 0.5000 vs >= 0.8000: FAILED by 0.3000"]


def test_missing_metric_fails_rather_than_passes():
    d = decide({"exact_match": 0.95}, BASE, None, GateParams())
    assert not d.passed and any("preference_accuracy: missing" in r for r in d.reasons)


def test_direction_matters_for_loss():
    worse_than_base = {**GOOD, "validation_loss": 6.0}
    assert not decide(worse_than_base, BASE, None, GateParams()).passed
    assert decide(GOOD, BASE, None, GateParams(thresholds={"validation_loss": Threshold(max=1.0)})).passed
    assert direction("validation_loss") == "lower"
    with pytest.raises(ValueError, match="unknown metric"):
        direction("bleu")


def test_champion_within_tolerance():
    champion = {"exact_match": 0.99, "validation_loss": 0.3, "preference_accuracy": 0.8}
    assert not decide(GOOD, BASE, champion, GateParams(champion_tolerance=0.02)).passed
    assert decide(GOOD, BASE, champion, GateParams(champion_tolerance=0.2)).passed


def test_quantization_gate_bounds_the_drop():
    assert decide_quantization({"exact_match": 0.93}, {"exact_match": 0.95}, QuantizeParams(max_drop=0.05)).passed
    d = decide_quantization({"exact_match": 0.80}, {"exact_match": 0.95}, QuantizeParams(max_drop=0.05))
    assert not d.passed and "FAILED by 0.1000" in d.reasons[0]


def test_canary_decisions():
    policy = CanaryParams(min_exact_match=0.8, max_error_rate=0.0, champion_tolerance=0.05, max_latency_ratio=3.0)
    champion = {"exact_match": 0.95, "error_rate": 0.0, "p95_latency_s": 0.01}
    good = {"exact_match": 0.95, "error_rate": 0.0, "p95_latency_s": 0.012}
    assert decide_canary(good, champion, policy).passed
    assert decide_canary(good, None, policy).passed  # first release: absolute checks only
    assert not decide_canary({**good, "error_rate": 0.1}, champion, policy).passed
    assert not decide_canary({**good, "p95_latency_s": 0.05}, champion, policy).passed
    assert not decide_canary({**good, "exact_match": 0.85}, champion, policy).passed
    assert not decide_canary({"exact_match": 0.0, "error_rate": 1.0, "p95_latency_s": None}, champion, policy).passed
