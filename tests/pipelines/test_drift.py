"""Drift checks on windows of prompts: quiet on windows drawn from the training distribution
(false alarms counted over repeated windows), loud on windows from another one, and each shift
named by the check that should see it."""

from __future__ import annotations

import random

import pytest

from pipelines.drift import DriftPolicy, compare, sample
from pipelines.generate import user_prompts as demo_prompts

ENGLISH = ["How do I bake bread?", "What is the capital of France?", "Write a poem about the sea.", "Explain photosynthesis simply.", "Translate 'hello' to Spanish."]


@pytest.fixture(scope="module")
def reference() -> list[str]:
    return demo_prompts(400, seed=0)


# Seen red: with the domain classifier scored on the prompts it was fitted on (no folds), its AUC
# was ~0.61 on unshifted windows (p ~ 5e-6) and windows were flagged as drift.
def test_windows_from_the_training_distribution_raise_no_alarm(reference):
    """12 windows of 200 prompts from the reference's own generator: with alpha = 0.01 over the
    four checks, two or more flagged windows would happen with probability below 0.01."""
    reports = [compare(reference, demo_prompts(200, seed)) for seed in range(1, 13)]
    flagged = [r.summary() for r in reports if r.drifted]
    assert len(flagged) <= 1, "\n".join(flagged)
    assert all(c.score <= c.threshold for r in reports if not r.drifted for c in r.checks)


def test_longer_lists_are_a_length_drift(reference):
    report = compare(reference, demo_prompts(200, 99, min_len=7, max_len=9))
    by = {c.check: c for c in report.checks}
    assert report.drifted and by["length"].drifted and by["length"].score > by["length"].threshold, report.summary()


def test_another_kind_of_request_is_a_vocabulary_and_domain_drift(reference):
    rng = random.Random(5)
    window = [rng.choice(ENGLISH) if rng.random() < 0.3 else p for p in demo_prompts(200, 7)]
    by = {c.check: c for c in compare(reference, window).checks}
    assert by["vocabulary"].drifted and by["domain"].drifted, by


def test_another_language_is_a_script_drift(reference):
    window = [p.replace("Reverse the list", "Переверни список") for p in demo_prompts(200, 8)]
    by = {c.check: c for c in compare(reference, window).checks}
    assert by["script"].drifted and "cyrillic" in by["script"].detail, by["script"]


def test_a_tiny_difference_in_a_huge_window_is_not_an_alarm():
    """Significance alone is not drift: a 3-point shift in one phrasing's share, on windows so
    large that the classifier can see it, stays below the domain check's effect floor."""
    rng = random.Random(3)
    big_ref = demo_prompts(3000, 1)
    window = [p if rng.random() > 0.03 else "Please reverse " + p.split()[-1] for p in demo_prompts(3000, 2)]
    report = compare(big_ref, window, DriftPolicy(folds=3))
    assert not report.drifted, report.summary()


def test_too_few_prompts_is_an_error_that_says_how_many():
    with pytest.raises(ValueError, match="at least 10 prompts"):
        compare(["a"] * 5, ["b"] * 50)
    assert sample(list("abcdef"), 3, seed=1) == sample(list("abcdef"), 3, seed=1) and len(sample(list("abcdef"), 3)) == 3
