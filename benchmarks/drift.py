"""`python -m benchmarks.drift`: the drift checks' false-alarm rate and their power, measured.

Windows of demo prompts from the reference's own generator (other seeds: what an unshifted day
of traffic looks like) against a fixed reference sample, at the default alpha (0.01 over the four
checks together): the share of windows flagged is the false-alarm rate, printed with its 95 %
interval (Clopper-Pearson) beside alpha. Then windows with a share of other requests mixed in
(English questions) and with longer lists: the share flagged is the power at that shift. Figures
only, never asserted (tests/pipelines/test_drift.py asserts the behaviour on fewer windows).
"""

from __future__ import annotations

import argparse
import random
import time

from scipy.stats import beta

from pipelines.drift import DriftPolicy, compare
from pipelines.generate import user_prompts as demo_prompts

ENGLISH = ["How do I bake bread?", "What is the capital of France?", "Write a poem about the sea.", "Explain photosynthesis simply.", "Translate 'hello' to Spanish."]


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    low = beta.ppf(a, k, n - k + 1) if k else 0.0
    high = beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def mixed(n: int, seed: int, share: float) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(ENGLISH) if rng.random() < share else p for p in demo_prompts(n, seed)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--size", type=int, default=200, help="prompts per window")
    args = parser.parse_args()
    policy = DriftPolicy()
    reference = demo_prompts(1000, seed=0)
    started = time.perf_counter()
    flagged = {c: 0 for c in ("any", "length", "script", "vocabulary", "domain")}
    for seed in range(1, args.windows + 1):
        report = compare(reference, demo_prompts(args.size, seed), policy)
        flagged["any"] += report.drifted
        for c in report.checks:
            flagged[c.check] += c.drifted
    seconds = (time.perf_counter() - started) / args.windows
    low, high = clopper_pearson(flagged["any"], args.windows)
    print(f"drift, {args.windows} unshifted windows of {args.size} prompts vs 1000 reference prompts ({seconds:.2f} s a window):")
    print(f"  false alarms: {flagged['any']}/{args.windows} = {flagged['any'] / args.windows:.3f} (95 % CI {low:.3f}-{high:.3f}; alpha {policy.alpha})"
          + "; by check: " + ", ".join(f"{c} {flagged[c]}" for c in ("length", "script", "vocabulary", "domain")))
    shifts = {
        "5 % English questions": lambda s: mixed(args.size, s, 0.05),
        "15 % English questions": lambda s: mixed(args.size, s, 0.15),
        "lists of 6-8 digits (3-5 in training)": lambda s: demo_prompts(args.size, s, min_len=6, max_len=8),
    }
    n = max(10, args.windows // 5)
    for name, make in shifts.items():
        hits = sum(compare(reference, make(1000 + s), policy).drifted for s in range(n))
        print(f"  power, {name}: {hits}/{n} windows flagged")


if __name__ == "__main__":
    main()
