"""The gate's paired tests keep their promises: error rates checked by simulation, power that
matches what an equally good candidate actually gets, and no shortcut when nothing differs.

The calibration runs the test itself over simulated paired outcomes; `_wald_p` below is the
statistic the gate used before (a Wald test with p = 0 when no item differed), kept here so the
same calibration shows that it would have caught it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines import stats

ALPHA = 0.025  # one-sided, the gate's default (confidence 0.95)
REPS = 4000
CELLS = [(n, d) for n in (40, 100, 300, 1000) for d in (0.01, 0.05, 0.20)]


def margin_for(discordance: float) -> float:
    """The gate's default margin, 0.02. A candidate can be at most `discordance` worse, so at
    1 % discordance the margin examined is half of it (0.005): all that the cell can hold."""
    return min(0.02, discordance / 2)


def simulate(n: int, p_win: float, p_loss: float, rng: np.random.Generator, reps: int = REPS) -> tuple[np.ndarray, np.ndarray]:
    draws = rng.multinomial(n, [p_win, p_loss, 1 - p_win - p_loss], size=reps)
    return draws[:, 0], draws[:, 1]


def tango_passes(wins, losses, n, margin) -> np.ndarray:
    return stats.tango_z(wins, losses, n, -margin) >= stats.z_quantile(1 - ALPHA)


def _wald_p(wins: int, losses: int, n: int, margin: float) -> float:
    """The gate's old statistic, for the calibration's own check (see the module docstring)."""
    diff = (wins - losses) / n
    var = ((wins + losses) / n - diff**2) / n
    if var <= 0:
        return 0.0 if diff + margin > 0 else 1.0
    return 0.5 * math.erfc((diff + margin) / math.sqrt(var) / math.sqrt(2))


def mc_bound(rate: float, reps: int = REPS) -> float:
    """rate plus three Monte-Carlo standard errors."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / reps)


def test_the_restricted_estimate_is_the_maximum_of_the_likelihood():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(5, 300))
        b, c = (int(x) for x in rng.multinomial(n, [0.1, 0.1, 0.8]) [:2])
        d0 = float(rng.uniform(-0.2, 0.2))
        xs = np.linspace(max(0, -d0), (1 - d0) / 2, 40001)
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = sum(k * np.log(p) for k, p in ((b, xs + d0), (c, xs), (n - b - c, 1 - 2 * xs - d0)) if k)
        best = xs[np.nanargmax(np.where(np.isfinite(ll), ll, -np.inf))]
        assert float(stats.restricted_loss_rate(b, c, n, d0)) == pytest.approx(best, abs=3e-5), (n, b, c, d0)


def test_no_differing_item_still_needs_enough_items_to_show_a_margin():
    """No discordant pair says nothing at n = 40: a candidate worse by 2 points would show no
    difference on 40 items 45 % of the time. The old statistic returned p = 0 at any n."""
    assert _wald_p(0, 0, 40, 0.02) == 0.0
    assert stats.noninferiority_p(0, 0, 40, 0.02) > 0.1
    # with no discordance the score test needs n >= z^2 (1 - margin) / margin: ~189 at 0.02
    assert stats.noninferiority_p(0, 0, 180, 0.02) > ALPHA > stats.noninferiority_p(0, 0, 200, 0.02)


@pytest.mark.parametrize("n, discordance", CELLS)
def test_false_promotion_at_the_margin_is_at_most_alpha(n, discordance):
    """A candidate worse than the champion by exactly the margin passes with probability at
    most alpha (plus Monte-Carlo error), at every n and discordance; the exact figure (the
    trinomial summed) agrees with the simulation."""
    margin = margin_for(discordance)
    p_win, p_loss = (discordance - margin) / 2, (discordance + margin) / 2
    wins, losses = simulate(n, p_win, p_loss, np.random.default_rng(n * 1000 + int(discordance * 100)))
    rate = float(tango_passes(wins, losses, n, margin).mean())
    assert rate <= mc_bound(ALPHA), f"n={n} discordance={discordance}: {rate:.4f} of candidates worse by the margin passed"
    exact = stats.pass_probability(n, p_win, p_loss, margin, ALPHA)
    assert exact <= ALPHA + 1e-3 and abs(rate - exact) <= 4 * math.sqrt(max(exact, 1e-3) / REPS) + 1e-3


# Seen red: tango_z computed with the observed (Wald) variance -> the calibration failed in 8 of
# 12 cells (n=40, 1 % discordance: 0.67 of candidates worse by the margin promoted) and the
# no-discordance test failed; restored, all pass.
def test_the_calibration_catches_the_old_wald_statistic():
    """The same check, run on the statistic the gate used to have, fails: at n = 40 with 5 %
    discordance it promotes a candidate worse by the margin far more often than alpha."""
    n, discordance = 40, 0.05
    margin = margin_for(discordance)
    wins, losses = simulate(n, (discordance - margin) / 2, (discordance + margin) / 2, np.random.default_rng(7))
    rate = float(np.mean([_wald_p(int(b), int(c), n, margin) <= ALPHA for b, c in zip(wins, losses)]))
    assert rate > mc_bound(ALPHA), rate


@pytest.mark.parametrize("n, discordance", CELLS)
def test_reported_power_is_the_pass_rate_of_an_equal_candidate(n, discordance):
    margin = margin_for(discordance)
    wins, losses = simulate(n, discordance / 2, discordance / 2, np.random.default_rng(n + int(discordance * 1000)))
    simulated = float(tango_passes(wins, losses, n, margin).mean())
    reported = stats.power_equal(n, discordance, margin, ALPHA)
    assert abs(simulated - reported) <= 4 * math.sqrt(max(reported * (1 - reported), 1e-3) / REPS) + 1e-3, (simulated, reported)


def test_items_for_power_gives_the_power_it_promises():
    for discordance, margin in ((0.05, 0.02), (0.2, 0.05), (0.02, 0.02)):
        n = stats.items_for_power(discordance, margin, ALPHA)
        assert stats.power_equal(n, discordance, margin, ALPHA) >= 0.8
        assert stats.power_equal(int(n * 0.9), discordance, margin, ALPHA) < 0.8, "not far more than needed"


def test_the_interval_and_the_test_agree():
    """The interval's lower end clears -margin exactly when the test shows non-inferiority."""
    for wins, losses, n in ((0, 0, 290), (3, 5, 290), (10, 4, 100), (0, 4, 40), (20, 20, 1000)):
        low, high = stats.score_interval(wins, losses, n, 0.95)
        assert low <= (wins - losses) / n <= high
        for margin in (0.005, 0.02, 0.05, 0.1):
            assert (low > -margin) == (stats.noninferiority_p(wins, losses, n, margin) < ALPHA), (wins, losses, n, margin)


@pytest.mark.parametrize("n", [40, 100, 300])
def test_the_bootstrap_for_scores_keeps_its_error_rates(n):
    """Continuous per-item differences (a reward model's scores): a candidate worse by the
    margin passes at most alpha of the time, and the reported power is the simulated pass rate
    of an equal candidate (normal approximation)."""
    rng = np.random.default_rng(n)
    margin, sd, reps = 0.2, 1.0, 800
    alpha = ALPHA
    worse = [stats.paired_continuous(rng.normal(-margin, sd, n), margin, 0.95, alpha, 400, seed=i).p <= alpha for i in range(reps)]
    assert np.mean(worse) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps) + 0.005, np.mean(worse)
    equal = [stats.paired_continuous(rng.normal(0, sd, n), margin, 0.95, alpha, 400, seed=i) for i in range(reps)]
    simulated = np.mean([r.p <= alpha for r in equal])
    reported = np.mean([r.power for r in equal])
    assert abs(simulated - reported) <= 4 * math.sqrt(reported * (1 - reported) / reps) + 0.02, (simulated, reported)
