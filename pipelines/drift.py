"""Do today's prompts still look like what the model was trained on? Pure functions: prompts in,
a report out (the scheduled drift flow, flows/watch.py, reads the record of served traffic and
publishes the report).

A window of live prompts is compared with a reference (a sample of the training prompts, or the
previous window) by four checks, each a two-sample test with an effect size:

- length: the prompts' lengths in characters; Kolmogorov-Smirnov (scipy), effect D.
- script: the share of each prompt's letters in each writing system (Latin, Cyrillic, CJK, ...,
  digits, other) pooled per sample; chi-square on the counts, effect the total variation
  distance between the two shares.
- vocabulary: each prompt's share of words the reference never uses; Mann-Whitney U (scipy),
  effect the difference in mean share.
- domain: a classifier (scikit-learn: TF-IDF of words and character n-grams, logistic
  regression) asked to tell the two samples apart, scored out of fold; effect its ROC AUC - 0.5,
  tested against the AUC's exact null (Mann-Whitney: the same statistic) by its normal form.

A check flags drift when its p-value is below alpha / 4 (Bonferroni over the four, so a window
from the reference's own distribution raises any flag with probability <= alpha; measured in
tests/pipelines/test_drift.py) AND its effect reaches the check's floor (so a huge window does
not alarm on a difference too small to matter). The exported score is the evidence,
-log10(p), when the effect reaches the floor and 0 otherwise; the threshold is -log10(alpha / 4):
score > threshold is exactly "drift" (serving.alerts exports both; the DriftDetected alert
compares them).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as sps

CHECKS = ("length", "script", "vocabulary", "domain")
SCRIPTS = ("latin", "digit", "cyrillic", "greek", "arabic", "hebrew", "cjk", "hangul", "devanagari", "other")
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DriftPolicy:
    alpha: float = 0.01  # the chance a window from the reference's own distribution raises any flag
    min_effect: dict[str, float] = field(default_factory=lambda: {"length": 0.1, "script": 0.05, "vocabulary": 0.05, "domain": 0.1})
    folds: int = 5
    seed: int = 0


@dataclass(frozen=True)
class CheckResult:
    check: str
    statistic: float
    p: float
    effect: float
    floor: float
    drifted: bool
    score: float  # -log10(p) when the effect reaches the floor, else 0
    threshold: float  # -log10(alpha / checks): score > threshold means drifted
    detail: str


@dataclass(frozen=True)
class DriftReport:
    reference: str  # what the window was compared with: "training" or "previous window"
    n_reference: int
    n_window: int
    checks: list[CheckResult]

    @property
    def drifted(self) -> bool:
        return any(c.drifted for c in self.checks)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "n_reference": self.n_reference, "n_window": self.n_window, "drifted": self.drifted, "checks": [asdict(c) for c in self.checks]}

    def summary(self) -> str:
        head = f"drift vs {self.reference} ({self.n_window} prompts against {self.n_reference}): {'DRIFT' if self.drifted else 'no drift'}"
        return "\n".join([head, *(f"  - {c.check}: {c.detail}: {'DRIFT' if c.drifted else 'ok'}" for c in self.checks)])


def script_of(ch: str) -> str | None:
    """The writing system of one character (None for spaces and punctuation)."""
    if ch.isdigit():
        return "digit"
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    for script, marker in (("latin", "LATIN"), ("cyrillic", "CYRILLIC"), ("greek", "GREEK"), ("arabic", "ARABIC"), ("hebrew", "HEBREW"),
                           ("hangul", "HANGUL"), ("devanagari", "DEVANAGARI"), ("cjk", "CJK"), ("cjk", "HIRAGANA"), ("cjk", "KATAKANA")):
        if marker in name:
            return script
    return "other"


def script_counts(prompts: list[str]) -> np.ndarray:
    counts = Counter(s for p in prompts for s in map(script_of, p) if s is not None)
    return np.array([counts.get(s, 0) for s in SCRIPTS], dtype=float)


def _result(check: str, statistic: float, p: float, effect: float, policy: DriftPolicy, detail: str) -> CheckResult:
    floor = policy.min_effect.get(check, 0.0)
    level = policy.alpha / len(CHECKS)
    p = float(min(max(p, 1e-300), 1.0))
    drifted = p < level and effect >= floor
    score = -math.log10(p) if effect >= floor else 0.0
    return CheckResult(check, float(statistic), p, float(effect), floor, drifted, score, -math.log10(level), f"{detail}; p={p:.2g} (flag below {level:.2g}), effect {effect:.3f} (floor {floor:g})")


def length_check(reference: list[str], window: list[str], policy: DriftPolicy) -> CheckResult:
    a, b = np.array([len(p) for p in reference]), np.array([len(p) for p in window])
    res = sps.ks_2samp(a, b)
    return _result("length", res.statistic, res.pvalue, res.statistic, policy, f"median length {np.median(a):.0f} -> {np.median(b):.0f} chars, KS D={res.statistic:.3f}")


def script_check(reference: list[str], window: list[str], policy: DriftPolicy) -> CheckResult:
    """Characters are pooled per sample, so the test's unit is the character. That overstates the
    evidence when a prompt's characters share a script (they are not independent), so the counts
    are scaled to the number of prompts before the chi-square: each prompt weighs one."""
    a, b = script_counts(reference), script_counts(window)
    if a.sum() == 0 or b.sum() == 0:
        return _result("script", 0.0, 1.0, 0.0, policy, "no letters or digits to compare")
    share_a, share_b = a / a.sum(), b / b.sum()
    tvd = 0.5 * float(np.abs(share_a - share_b).sum())
    table = np.vstack([share_a * len(reference), share_b * len(window)])
    keep = table.sum(axis=0) > 0
    if keep.sum() < 2:
        return _result("script", 0.0, 1.0, tvd, policy, "one script only in both")
    chi2, p, _, _ = sps.chi2_contingency(table[:, keep], correction=False)
    top = lambda share: ", ".join(f"{SCRIPTS[i]} {share[i]:.0%}" for i in np.argsort(-share)[:3] if share[i] > 0)  # noqa: E731
    return _result("script", chi2, p, tvd, policy, f"scripts {top(share_a)} -> {top(share_b)}, distance {tvd:.3f}")


def vocabulary_check(reference: list[str], window: list[str], policy: DriftPolicy) -> CheckResult:
    """Each prompt's share of words outside a vocabulary built from half the reference; the
    other half of the reference is scored against the same vocabulary, so both sides meet it
    as strangers (scoring the reference against itself would give 0 by construction)."""
    words = [[w.lower() for w in WORD.findall(p)] for p in reference]
    half = len(words) // 2
    vocab = {w for ws in words[:half] for w in ws}

    def oov(ws: list[str]) -> float:
        return sum(w not in vocab for w in ws) / len(ws) if ws else 0.0

    ref = np.array([oov(ws) for ws in words[half:]])
    live = np.array([oov([w.lower() for w in WORD.findall(p)]) for p in window])
    if np.all(ref == ref[0]) and np.all(live == ref[0]):
        return _result("vocabulary", 0.0, 1.0, 0.0, policy, f"every prompt's unseen-word share is {ref[0]:.0%}")
    res = sps.mannwhitneyu(ref, live, alternative="two-sided")
    effect = abs(float(live.mean() - ref.mean()))
    return _result("vocabulary", res.statistic, res.pvalue, effect, policy, f"unseen words {ref.mean():.1%} -> {live.mean():.1%} of a prompt")


def domain_check(reference: list[str], window: list[str], policy: DriftPolicy) -> CheckResult:
    """Can a classifier tell the window from the reference? Out-of-fold probabilities, so its
    AUC is honest; under no drift the labels are exchangeable and the AUC is a Mann-Whitney
    statistic with mean 0.5 and variance (n1 + n2 + 1) / (12 n1 n2)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    texts = list(reference) + list(window)
    labels = np.array([0] * len(reference) + [1] * len(window))
    folds = min(policy.folds, len(reference), len(window))
    if folds < 2:
        return _result("domain", 0.5, 1.0, 0.0, policy, "too few prompts for a classifier")
    scores = np.zeros(len(texts))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=policy.seed).split(texts, labels):
        words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
        fit = [texts[i] for i in train]
        x_train = hstack([words.fit_transform(fit), chars.fit_transform(fit)]).tocsr()
        x_test = hstack([words.transform([texts[i] for i in test]), chars.transform([texts[i] for i in test])]).tocsr()
        model = LogisticRegression(max_iter=1000, C=1.0).fit(x_train, labels[train])
        scores[test] = model.predict_proba(x_test)[:, 1]
    auc = float(roc_auc_score(labels, scores))
    n1, n2 = len(reference), len(window)
    z = (auc - 0.5) / math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    p = float(sps.norm.sf(z))  # one-sided: only telling them apart better than chance is drift
    return _result("domain", auc, p, max(auc - 0.5, 0.0), policy, f"a classifier tells them apart with AUC {auc:.3f} (0.5: it cannot)")


def compare(reference: list[str], window: list[str], policy: DriftPolicy = DriftPolicy(), label: str = "training") -> DriftReport:
    """Every check of `window` against `reference` (lists of prompt texts)."""
    if len(reference) < 10 or len(window) < 10:
        raise ValueError(f"drift needs at least 10 prompts on each side, got {len(reference)} reference and {len(window)} in the window")
    checks = [length_check(reference, window, policy), script_check(reference, window, policy), vocabulary_check(reference, window, policy), domain_check(reference, window, policy)]
    return DriftReport(label, len(reference), len(window), checks)


def sample(prompts: list[str], n: int, seed: int = 0) -> list[str]:
    """A seeded sample of n prompts (all of them when there are fewer)."""
    if len(prompts) <= n:
        return list(prompts)
    idx = np.random.default_rng(seed).choice(len(prompts), size=n, replace=False)
    return [prompts[i] for i in sorted(idx)]
