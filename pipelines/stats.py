"""Paired statistics for the gates: is the candidate no worse than the champion on the same
items, and could this many items have told?

Right/wrong outcomes on the same items make a paired 2x2 table; only the discordant items
carry information: `wins` (candidate right, champion wrong) and `losses` (the reverse). The
difference in accuracy is (wins - losses) / n, and non-inferiority with margin `delta` is

    H0: p_win - p_loss <= -delta     against     H1: p_win - p_loss > -delta.

It is tested with Tango's score test (Tango 1998, Stat Med 17:891): the difference standardised
by its variance *under H0*, with the nuisance rates at their maximum-likelihood values
restricted to the null boundary. Unlike the Wald statistic (variance from the observed table),
it stays honest when there are few or no discordant items: with none at all it still needs
n >= z^2 (1 - delta) / delta items to show a margin (about 190 at delta = 0.02), where a Wald
test declared p = 0 at any n. Its error rates are checked by simulation in
tests/pipelines/test_stats.py for n in {40, 100, 300, 1000} and discordance 1-20 %.

Continuous per-item scores (the judge's points, a reward model's scores) get a paired
bootstrap of the mean difference instead; their power is the normal approximation.

Power is reported for the case that matters to a release: a candidate exactly as good as the
champion (p_win = p_loss) with the discordance seen. It is computed exactly, by summing the
trinomial distribution over the tables the test would pass, so "power 0.43" means that an
equally good candidate would pass 43 % of the time at this n, and `items_for_power` says how
many items would make it 80 %.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq

_N = NormalDist()


def z_quantile(p: float) -> float:
    return _N.inv_cdf(p)


def _xlogy(count: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """count * log(prob) with 0 * log(0) = 0 and count > 0 at prob 0 giving -inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, count * np.log(np.where(prob > 0, prob, 1.0)) - np.where(prob > 0, 0.0, np.inf), 0.0)


def restricted_loss_rate(wins, losses, n, delta0: float) -> np.ndarray:
    """Maximum-likelihood p_loss given p_win - p_loss = delta0 (vectorised over tables).

    The log-likelihood b log(x + d) + c log(x) + m log(1 - 2x - d), with x = p_loss, d = delta0,
    b wins, c losses, m concordant items, has its stationary points at the roots of
    2n x^2 - (b (1 - d) + c (1 - 3d) - 2 m d) x - c d (1 - d) = 0. The maximum is a feasible
    root or an end of x's range [max(0, -d), (1 - d) / 2]; all are compared."""
    b, c = np.asarray(wins, dtype=float), np.asarray(losses, dtype=float)
    n = np.asarray(n, dtype=float) + 0 * b
    d = float(delta0)
    m = n - b - c
    lo, hi = max(0.0, -d), (1 - d) / 2
    big_b = b * (1 - d) + c * (1 - 3 * d) - 2 * m * d
    disc = np.maximum(big_b**2 + 8 * n * c * d * (1 - d), 0.0)
    roots = [(big_b + np.sqrt(disc)) / (4 * n), (big_b - np.sqrt(disc)) / (4 * n)]
    candidates = np.stack([np.clip(r, lo, hi) for r in roots] + [np.full_like(b, lo), np.full_like(b, hi)])
    ll = _xlogy(b, candidates + d) + _xlogy(c, candidates) + _xlogy(m, 1 - 2 * candidates - d)
    return np.take_along_axis(candidates, np.argmax(ll, axis=0)[None], axis=0)[0]


def tango_z(wins, losses, n, delta0: float) -> np.ndarray:
    """Tango's score statistic for H0: p_win - p_loss = delta0 (large: the difference is above
    delta0). Vectorised over tables of the same n."""
    b, c = np.asarray(wins, dtype=float), np.asarray(losses, dtype=float)
    x = restricted_loss_rate(b, c, n, delta0)
    var = n * (2 * x + delta0 - delta0**2)
    num = b - c - n * delta0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(var)
    return np.where(var > 0, z, np.where(num > 0, np.inf, np.where(num < 0, -np.inf, 0.0)))


def noninferiority_p(wins: int, losses: int, n: int, margin: float) -> float:
    """One-sided p-value of H0 "worse by `margin` or more" (small: non-inferiority shown)."""
    return float(_N.cdf(-float(tango_z(wins, losses, n, -margin))))


def score_interval(wins: int, losses: int, n: int, confidence: float) -> tuple[float, float]:
    """The two-sided interval of p_win - p_loss that inverts Tango's test: every delta0 the
    test does not reject at (1 - confidence) / 2 on either side. Its lower end is above
    -margin exactly when `noninferiority_p` is below (1 - confidence) / 2."""
    z = z_quantile(1 - (1 - confidence) / 2)
    eps = 1e-9

    def f(d0: float, target: float) -> float:
        return float(tango_z(wins, losses, n, d0)) - target

    lo = -1 + eps if f(-1 + eps, z) <= 0 else brentq(f, -1 + eps, 1 - eps, args=(z,), xtol=1e-7)
    hi = 1 - eps if f(1 - eps, -z) >= 0 else brentq(f, -1 + eps, 1 - eps, args=(-z,), xtol=1e-7)
    return lo, hi


@functools.lru_cache(maxsize=4096)
def pass_probability(n: int, p_win: float, p_loss: float, margin: float, alpha: float) -> float:
    """Exact probability that Tango's test shows non-inferiority (margin, one-sided alpha) when
    the true rates are p_win and p_loss: the trinomial summed over every table it passes.
    Discordant counts k ~ Binomial(n, p_win + p_loss), wins | k ~ Binomial(k, share of wins);
    both are cut where the remaining mass is below 1e-12."""
    d = p_win + p_loss
    crit = z_quantile(1 - alpha)
    if d <= 0:
        return float(tango_z(0, 0, n, -margin) >= crit)
    ks = np.arange(int(sps.binom.ppf(1e-12, n, d)), int(sps.binom.isf(1e-12, n, d)) + 1)
    pk = sps.binom.pmf(ks, n, d)
    share = p_win / d
    total = 0.0
    for k, w in zip(ks, pk):
        if w < 1e-15:
            continue
        bs = np.arange(int(sps.binom.ppf(1e-12, k, share)), int(sps.binom.isf(1e-12, k, share)) + 1)
        passes = tango_z(bs, k - bs, n, -margin) >= crit
        total += w * float(sps.binom.pmf(bs[passes], k, share).sum())
    return min(1.0, total)


def power_equal(n: int, discordance: float, margin: float, alpha: float) -> float:
    """Probability that a candidate exactly as good as the champion passes, at this n and
    this discordance (share of items the two answer differently)."""
    return pass_probability(int(n), discordance / 2, discordance / 2, margin, alpha)


def items_for_power(discordance: float, margin: float, alpha: float, power: float = 0.8, limit: int = 1_000_000) -> int | None:
    """The fewest items (to within 2 %) at which an equally good candidate passes with at least
    `power`; None beyond `limit`. Power rises with n up to the test's discreteness, so the
    search doubles n, then bisects."""
    if margin <= 0:
        return None
    # the normal approximation as a starting point: var under H0 ~ discordance + margin
    z_a, z_b = z_quantile(1 - alpha), z_quantile(power)
    guess = max(8, int(((z_a * math.sqrt(max(discordance, margin)) + z_b * math.sqrt(max(discordance, 1e-9))) / margin) ** 2 / 2))
    lo, hi = 1, guess
    while power_equal(hi, discordance, margin, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > max(1, hi // 50):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_equal(mid, discordance, margin, alpha) >= power else (mid, hi)
    return hi


@dataclass(frozen=True)
class PairedResult:
    """One metric's paired comparison, with what the data could decide."""

    test: str  # "tango score" | "paired bootstrap"
    n: int
    diff: float  # mean(candidate - reference), in the metric's own units
    low: float  # the two-sided interval of diff at the gate's confidence
    high: float
    p: float  # one-sided p of H0 "worse by the margin or more"
    power: float  # an equally good candidate passes with this probability (at `power_alpha`)
    items_needed: int | None  # items for 80 % of that power (None: more than a million)
    wins: int | None = None  # binary outcomes: candidate right where the reference is wrong
    losses: int | None = None


def paired_binary(candidate: np.ndarray, reference: np.ndarray, margin: float, confidence: float, power_alpha: float) -> PairedResult:
    """0/1 outcomes (already oriented: 1 is good) of two models on the same items."""
    wins, losses, n = int(((candidate == 1) & (reference == 0)).sum()), int(((candidate == 0) & (reference == 1)).sum()), candidate.size
    low, high = score_interval(wins, losses, n, confidence)
    discordance = (wins + losses) / n
    return PairedResult(
        "tango score", n, (wins - losses) / n, low, high, noninferiority_p(wins, losses, n, margin),
        power_equal(n, discordance, margin, power_alpha), items_for_power(discordance, margin, power_alpha), wins, losses,
    )


def paired_continuous(diff: np.ndarray, margin: float, confidence: float, power_alpha: float, resamples: int, seed: int = 0) -> PairedResult:
    """Per-item differences (oriented: positive is better) of two models on the same items: a
    paired bootstrap of the mean, resampling items. Power by the normal approximation with the
    items' own spread: an equal candidate's mean difference is ~N(0, sd^2 / n)."""
    n = diff.size
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    p = float(((means <= -margin).sum() + 1) / (resamples + 1))
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    z_a = z_quantile(1 - power_alpha)
    if margin <= 0:
        power, needed = 0.0, None
    elif sd == 0:
        power, needed = 1.0, 2
    else:
        power = float(_N.cdf(margin * math.sqrt(n) / sd - z_a))
        needed = math.ceil(((z_a + z_quantile(0.8)) * sd / margin) ** 2)
    return PairedResult("paired bootstrap", n, float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), p, power, needed)
