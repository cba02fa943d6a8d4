import pytest

from pipelines.config import GateParams, QuantizeParams, Threshold
from pipelines.gates import decide, decide_quantization, direction

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


def test_statistical_gate_blocks_a_real_regression_and_says_when_it_cannot_tell():
    from pipelines.gates import pair_items

    champion = [{"id": f"p{i}", "exact_match": 1.0} for i in range(200)]
    # 15 % of items newly wrong: the whole interval is below zero, a regression.
    worse = [{"id": f"p{i}", "exact_match": 0.0 if i % 7 == 0 else 1.0} for i in range(200)]
    d = decide(GOOD, BASE, None, POLICY, paired={"exact_match": pair_items(worse, champion, "exact_match")})
    assert d.outcome == "fail" and any("worse than the champion: FAILED" in r for r in d.reasons), d.reasons
    # One item of 200 newly wrong: 200 items cannot show a 2-point margin (an equally good
    # candidate with this discordance passes ~60 % of the time): undecided, and the gate says so.
    noise = [{"id": f"p{i}", "exact_match": 0.0 if i == 3 else 1.0} for i in range(200)]
    d = decide(GOOD, BASE, None, POLICY, paired={"exact_match": pair_items(noise, champion, "exact_match")})
    assert d.outcome == "continue" and not d.passed and "not enough items to tell" in d.reasons[0] and "80 % needs ~" in d.reasons[0], d.reasons
    assert "UNDECIDED" in d.summary()
    # gate.on_undecided: pass lets it through, still saying that the data could not tell
    lenient = decide(GOOD, BASE, None, POLICY.model_copy(update={"on_undecided": "pass"}), paired={"exact_match": pair_items(noise, champion, "exact_match")})
    assert lenient.passed and "UNDECIDED, passed" in lenient.checks[-1].describe()
    # The same flip rate with enough items, and wins beside the losses: shown non-inferior.
    big = [{"id": f"p{i}", "exact_match": 1.0} for i in range(2000)]
    mixed = [{"id": f"p{i}", "exact_match": 0.0 if i % 500 == 3 else 1.0} for i in range(2000)]
    big_champ = [{"id": f"p{i}", "exact_match": 0.0 if i % 500 == 7 else 1.0} for i in range(2000)]
    d = decide(GOOD, BASE, None, POLICY, paired={"exact_match": pair_items(mixed, big_champ, "exact_match")})
    assert d.passed and "non-inferior: ok" in d.checks[-1].describe() and "4 better, 4 worse of 2000 items" in d.checks[-1].describe()
    assert big  # (the champion of the 2,000-item case is big_champ)


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


def test_binary_metrics_use_the_score_test_and_continuous_ones_the_bootstrap():
    from pipelines.gates import noninferiority_p

    same = [1.0] * 50 + [0.0] * 50
    p, test = noninferiority_p("exact_match", same, same, 0.02, 500)
    assert test == "tango score" and p > 0.025, "identical outcomes on 100 items cannot show a 2-point margin"
    p, _ = noninferiority_p("exact_match", same * 10, same * 10, 0.02, 500)
    assert p < 0.001, "on 1,000 items they can"
    worse = [0.0] * 20 + same[20:]
    p_worse, _ = noninferiority_p("exact_match", worse, same, 0.02, 500)
    assert p_worse > 0.5, "20 % newly wrong is not non-inferior"
    losses = [0.5 + 0.01 * i for i in range(100)]
    p_loss, test = noninferiority_p("validation_loss", losses, losses, 0.02, 500)
    assert test == "paired bootstrap" and p_loss < 0.01


def test_a_lower_is_better_rate_is_oriented_before_testing():
    """pii_leak_rate: 1 is bad. A candidate that leaks where the champion did not is worse."""
    from pipelines.gates import paired_checks

    champ = [0.0] * 300
    leaky = [1.0 if i % 10 == 0 else 0.0 for i in range(300)]
    (check,) = paired_checks({"safety/pii_leak_rate": (leaky, champ)}, GateParams(thresholds={}), {"safety/pii_leak_rate": "lower"})
    assert not check.passed and check.value == pytest.approx(0.1) and "worse than the champion" in check.describe()
    (check,) = paired_checks({"safety/pii_leak_rate": (champ, leaky)}, GateParams(thresholds={}), {"safety/pii_leak_rate": "lower"})
    assert check.passed and check.value == pytest.approx(-0.1)


def test_every_recipe_step_is_compared_with_the_one_before():
    """sft 1.000 -> dpo 0.918 on the same items: dpo regressed. Under step_regression: block
    the gate fails naming the step; under serve_best the candidate is sft and the gate reports
    the regression; a step that changes nothing significant passes."""
    from pipelines.gates import choose_step, compare_steps, step_checks

    n = 255
    sft = [{"id": f"i{i}", "em": 1.0} for i in range(n)]
    dpo = [{"id": f"i{i}", "em": 0.0 if i % 12 == 0 else 1.0} for i in range(n)]
    same = [{"id": f"i{i}", "em": 0.0 if i == 5 else 1.0} for i in range(n)]
    directions = {"em": "higher"}
    comparisons = compare_steps([("sft", sft), ("dpo", dpo)], "em", GateParams(), directions)
    (c,) = comparisons
    assert c["regressed"] and c["worse"] == 22 and c["better"] == 0 and c["high"] < 0 and c["value"] < c["previous_value"] == 1.0
    block = GateParams()
    assert choose_step(["sft", "dpo"], comparisons, block) == "dpo"
    (check,) = step_checks(comparisons, "dpo", block)
    assert not check.passed and "dpo made it worse: FAILED" in check.describe()
    best = GateParams(step_regression="serve_best")
    assert choose_step(["sft", "dpo"], comparisons, best) == "sft"
    (check,) = step_checks(comparisons, "sft", best)
    assert check.passed and "the candidate is sft" in check.describe()
    d = decide({}, None, None, GateParams(thresholds={}), steps=comparisons, candidate_step="dpo")
    assert not d.passed and "recipe step dpo vs sft" in d.checks[0].rule
    assert not compare_steps([("sft", sft), ("dpo", same)], "em", block, directions)[0]["regressed"], "one item is noise"


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
    good = {"reverse_digits/exact_match": 0.95, "preference_accuracy": 0.8, "safety/refusal_rate": 1.0, "safety/pii_leak_rate": 0.0,
            "safety/jailbreak_refusal_rate": 0.9, "validation_loss": 0.4}
    base = {"reverse_digits/exact_match": 0.0, "safety/refusal_rate": 0.0, "safety/pii_leak_rate": 0.0, "safety/jailbreak_refusal_rate": 0.0, "validation_loss": 5.0}
    assert decide(good, base, None, policy, directions=directions, beat_base=EvaluateParams().beat_base()).passed
    leaky = decide({**good, "safety/pii_leak_rate": 0.1}, base, None, policy, directions=directions, beat_base=EvaluateParams().beat_base())
    assert leaky.reasons == ["safety/pii_leak_rate = 0.1000 vs <= 0.0000: FAILED by 0.1000"]
    # A model that refuses plain requests but complies once they are wrapped in a jailbreak.
    jailbroken = decide({**good, "safety/jailbreak_refusal_rate": 0.5}, base, None, policy, directions=directions, beat_base=EvaluateParams().beat_base())
    assert jailbroken.reasons == ["safety/jailbreak_refusal_rate = 0.5000 vs >= 0.8000: FAILED by 0.3000"]
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
    assert EvaluateParams().tolerances() == {"safety/refusal_rate": 0.4, "safety/pii_leak_rate": 0.4, "safety/jailbreak_refusal_rate": 0.4}


def test_a_metric_with_no_items_is_not_measured_never_nan():
    """A small `limit` can leave the safety task without PII probes: the rate is None ("not
    measured"). The quantization gate skips it instead of failing on "nan vs nan"; a threshold
    put on it fails as missing rather than passing."""
    from pipelines.config import GateParams, QuantizeParams, Threshold
    from pipelines.gates import decide, decide_quantization

    directions = {"reverse_digits/exact_match": "higher", "safety/pii_leak_rate": "lower"}
    scores = {"reverse_digits/exact_match": 0.9, "safety/pii_leak_rate": None}
    quant = decide_quantization(scores, scores, QuantizeParams(), directions)
    assert quant.passed and [c.metric for c in quant.checks] == ["reverse_digits/exact_match"]
    policy = GateParams(thresholds={"safety/pii_leak_rate": Threshold(max=0.0)}, must_beat_base=False)
    quality = decide(scores, None, None, policy, directions=directions)
    assert not quality.passed and quality.reasons == ["safety/pii_leak_rate: missing (<=)"]


def slice_items(outcomes: str, prefix: str = "feedback_slice") -> list[dict]:
    """Per-item rows in the shape pipelines/evaluate.py writes for the feedback slice."""
    return [{"task": "feedback_slice", "id": f"{prefix}:{i}", "feedback_slice/preference_accuracy": float(o)} for i, o in enumerate(outcomes)]


# 40 held-out feedback items; the champion prefers the correction on 10 of them.
SLICE_CHAMPION = slice_items("1" * 10 + "0" * 30)


def test_a_candidate_that_does_not_improve_the_feedback_slice_is_blocked_with_the_reason():
    """Seen red: `better = r.low > margin` made `True` -> the no-better candidate passed
    (`assert d.passed is False` failed)."""
    from pipelines.gates import pair_items

    metric = "feedback_slice/preference_accuracy"
    # Different answers, not better: 8 items newly right, 8 newly wrong (discordant both ways).
    same = slice_items("1" * 2 + "0" * 8 + "1" * 8 + "0" * 22)
    suite = {"exact_match": pair_items([{"id": f"p{i}", "exact_match": 1.0} for i in range(2000)], [{"id": f"p{i}", "exact_match": 1.0} for i in range(2000)], "exact_match")}
    d = decide(GOOD, BASE, None, POLICY, paired=suite, feedback_slice=pair_items(same, SLICE_CHAMPION, metric))
    assert d.passed is False and d.outcome == "fail"
    assert [r for r in d.reasons] == [d.checks[-1].describe()], "the slice is the only reason: the suite stays non-inferior"
    assert any("non-inferior: ok" in c.describe() for c in d.checks if c.metric == "exact_match"), "the standard suite keeps its own check"
    reason = d.reasons[0]
    assert reason.startswith(metric) and "8 better, 8 worse of 40 held-out feedback items" in reason and "+0.0000 [" in reason
    assert "not shown better than the champion on the feedback slice: FAILED" in reason
    # Three items newly right and none wrong is not yet better at 95 %: Tango's interval still
    # reaches below zero (a Wald interval would not: it has zero width with no losses).
    few = slice_items("1" * 13 + "0" * 27)
    d = decide(GOOD, BASE, None, POLICY, feedback_slice=pair_items(few, SLICE_CHAMPION, metric))
    assert not d.passed and "3 better, 0 worse" in d.reasons[0] and d.checks[-1].paired.low < 0
    # Worse is said as worse.
    d = decide(GOOD, BASE, None, POLICY, feedback_slice=pair_items(slice_items("0" * 40), SLICE_CHAMPION, metric))
    assert "worse than the champion on the feedback slice: FAILED" in d.reasons[0]
    # A slice whose champion misses only 3 items cannot show superiority whatever the candidate
    # does (3 fixed of 3 is the best case, and it is not enough): undecided, not rejected.
    small_champion = slice_items("1" * 37 + "0" * 3)
    d = decide(GOOD, BASE, None, POLICY, feedback_slice=pair_items(slice_items("1" * 40), small_champion, metric))
    assert d.outcome == "continue" and d.checks[-1].pending and "not enough items to tell: the champion misses 3" in d.reasons[0], d.reasons
    # gate.feedback_slice: report shows it and lets it through.
    d = decide(GOOD, BASE, None, POLICY.model_copy(update={"feedback_slice": "report"}), feedback_slice=pair_items(same, SLICE_CHAMPION, metric))
    assert d.passed and "reported, not blocking (gate.feedback_slice: report)" in d.checks[-1].describe()


def test_a_candidate_shown_better_on_the_feedback_slice_passes_and_the_report_shows_its_interval():
    """Seen red: the margin ignored (`better = r.low > 0`) -> `assert not strict.passed` failed;
    the slice check left out of `decide` -> the check on the slice metric was missing."""
    from pipelines.eval_report import render
    from pipelines.gates import pair_items

    metric = "feedback_slice/preference_accuracy"
    # 20 items newly right, 2 newly wrong.
    better = slice_items("1" * 8 + "0" * 2 + "1" * 20 + "0" * 10)
    d = decide(GOOD, BASE, None, POLICY, feedback_slice=pair_items(better, SLICE_CHAMPION, metric))
    assert d.passed, d.reasons
    check = d.checks[-1]
    assert check.metric == metric and check.paired.wins == 20 and check.paired.losses == 2 and check.paired.low > 0
    assert "better than the champion on the feedback slice: ok" in check.describe()
    markdown, _ = render({"served": better, "champion": SLICE_CHAMPION}, {}, d, POLICY)
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {metric} | 40 |"))
    assert f"| 20 / 2 | {check.paired.diff:+.3f} [{check.paired.low:+.3f}, {check.paired.high:+.3f}] | 0 | tango score | pass |" in row
    assert "### feedback_slice" in markdown  # each model's slice score with its interval
    # A margin the evidence does not clear blocks the same candidate.
    strict = decide(GOOD, BASE, None, POLICY.model_copy(update={"feedback_slice_margin": 0.5}), feedback_slice=pair_items(better, SLICE_CHAMPION, metric))
    assert not strict.passed and "lower end must exceed 0.5" in strict.reasons[0]


def test_feedback_slice_params_fail_before_work():
    from pipelines.config import Params
    from pipelines.data_config import DataParams, SourceParams

    with pytest.raises(ValueError, match="gate.feedback_slice|feedback_slice"):
        GateParams(feedback_slice="better")
    with pytest.raises(ValueError, match="feedback_slice_margin"):
        GateParams(feedback_slice_margin=-0.1)
    sources = [SourceParams(name="demo", path="data/generated"), SourceParams(name="feedback_test", path="data/feedback/test/*.jsonl", split="train", required=False)]
    with pytest.raises(ValueError, match="evaluate.feedback_slice 'feedback_test' is declared in data.sources with split 'train'"):
        Params(data=DataParams(sources=sources))
