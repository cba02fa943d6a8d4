"""`make bench`: the evaluation suite's time per task and per model, and what the quality gate
does with equally good candidates that answer differently item by item.

A tiny champion is trained here (default model size, full SFT, seed 0); each candidate retrains
the same recipe with another seed (another initialisation and data order), so it is as good as
the champion in distribution but not item for item. Trained to convergence, every seed answers
the 3-5 digit lists alike, so the evaluation set also holds lists of 6 and 7 digits, longer than
any in training: there the seeds generalise differently, which gives the discordant items a
real candidate has. Every candidate goes through the same `decide()` the gate task calls (the
suite's metrics paired against the champion's, Holm-corrected, and the rule judge over the
OpenAI protocol), at the default margin and at a margin these items can show.

Printed per candidate: exact match, items that differ, the reported power and the verdict;
then the false-block rate (failed or undecided) at each margin against the mean reported power.
Target (issue #7): false-block rate <= 5 % where the items can decide. Printed, never asserted.
"""

from __future__ import annotations

import os
import random
import tempfile
import time

RERUNS = int(os.environ.get("BENCH_GATE_RERUNS", "20"))
# Trained to convergence: at 250 steps and lr 3e-3 some seeds had not learned the task yet
# (exact match 0.1 to 0.87 against the champion's 0.91): worse candidates, rightly blocked,
# not equal ones. At 800 steps and lr 1e-3 every seed tried reached the champion's level.
STEPS = int(os.environ.get("BENCH_SFT_STEPS", "800"))
LR = float(os.environ.get("BENCH_SFT_LR", "1e-3"))
LONGER = int(os.environ.get("BENCH_LONG_ITEMS", "150"))  # 6-7 digit lists added to the test split
TARGET = 0.05
MARGINS = (0.02, 0.05)  # the default champion_tolerance, and one ~400 items can show


def add_longer_lists(n: int, seed: int = 11) -> int:
    """Append n lists of 6-7 digits to the prepared test split (the suite's reverse_digits task
    reads it); returns the split's new size."""
    import pandas as pd

    path = "data/prepared/sft_test.parquet"
    frame = pd.read_parquet(path)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        digits = [str(rng.randrange(10)) for _ in range(rng.choice((6, 7)))]
        rows.append({"messages": [{"role": "user", "content": "Reverse the list:\n" + " ".join(digits), "tool_calls": None}, {"role": "assistant", "content": " ".join(reversed(digits)), "tool_calls": None}], "tools": None, "source": "bench-long", "id": f"long{i:04d}"})
    pd.concat([frame, pd.DataFrame(rows)], ignore_index=True).to_parquet(path, index=False)
    return len(frame) + n


def main() -> None:
    from pipelines import bootstrap, generate, prepare, sft
    from pipelines.config import EvaluateParams, GenerateParams, ModelParams, PeftParams, SftParams
    from pipelines.evaluate import run_suite
    from pipelines.gates import decide, pair_items
    from pipelines.judge import judge_pairs
    from tests.conftest import tiny_params

    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        evaluate = EvaluateParams(batch_size=64)

        def params(seed: int):
            sft_cfg = SftParams(peft=PeftParams(method="full"), max_steps=STEPS, batch_size=32, save_steps=STEPS, learning_rate=LR, seed=seed, warmup_steps=0)
            return tiny_params(model=ModelParams(), generate=GenerateParams(), sft=sft_cfg, evaluate=evaluate)  # the demo's full data

        base = params(0)
        for stage in (generate, prepare, bootstrap):
            stage.run(base)
        items = add_longer_lists(LONGER)
        sft.run(base)
        os.rename("models/sft", "champion")

        times: dict[str, dict[str, float]] = {}
        for name, ref in (("base", "models/base"), ("champion", "champion")):
            started = time.perf_counter()
            metrics, rows, seconds = run_suite(ref, evaluate)
            times[name] = {**seconds, "total": time.perf_counter() - started}
            if name == "champion":
                champ_metrics, champ_rows = metrics, rows
        print("evaluation time per task and model (s):")
        for name, per in times.items():
            print(f"  {name:9s} " + "  ".join(f"{task} {s:6.2f}" for task, s in per.items()))
        task = evaluate.tasks[0].name
        em_key = f"{task}/exact_match"
        print(f"  champion: {', '.join(f'{k} {v:.3f}' for k, v in champ_metrics.items())} over {len(champ_rows)} items ({items} of them {task}, {LONGER} longer than training's)")

        directions = evaluate.directions()
        verdicts: dict[float, list[str]] = {m: [] for m in MARGINS}
        powers: dict[float, list[float]] = {m: [] for m in MARGINS}
        judge_s = 0.0
        print(f"\n{RERUNS} candidates, the same recipe with another seed:")
        for seed in range(1, RERUNS + 1):
            p = params(seed)
            sft.run(p)
            metrics, rows, _ = run_suite("models/sft", evaluate)
            paired = {m: pair_items(rows, champ_rows, m) for m in directions}
            champ = {r["id"]: r for r in champ_rows if r["task"] == task}
            started = time.perf_counter()
            judged = judge_pairs([{"id": r["id"], "prompt": r["prompt"], "candidate": r["raw"] or "", "champion": champ[r["id"]]["raw"] or ""} for r in rows if r["task"] == task], evaluate.judge.model_copy(update={"max_items": items}))
            judge_s += time.perf_counter() - started
            paired["judge_win_rate"] = ([j["judge_win_rate"] for j in judged], [0.5] * len(judged))
            line = f"  seed {seed:2d}: {em_key} {metrics[em_key]:.3f} (champion {champ_metrics[em_key]:.3f})"
            for margin in MARGINS:
                # Absolute thresholds aside (this recipe is not tuned to pass them): only the
                # paired comparison with the champion, which is what noise could trip.
                policy = p.gate.model_copy(update={"thresholds": {}, "champion_tolerance": margin})
                decision = decide({}, None, None, policy, paired=paired, directions=directions)
                em = next(c for c in decision.checks if c.metric == em_key)
                verdicts[margin].append(decision.outcome)
                powers[margin].append(em.paired.power)
                line += f" | margin {margin}: {em.paired.wins}+/{em.paired.losses}- power {em.paired.power:.2f} {decision.outcome}"
            print(line, flush=True)
        print()
        for margin in MARGINS:
            v = verdicts[margin]
            blocked = sum(x != "pass" for x in v)
            undecided = sum(x == "continue" for x in v)
            rate = blocked / len(v)
            mean_power = sum(powers[margin]) / len(powers[margin])
            print(
                f"gate at margin {margin}: false-block rate {blocked}/{len(v)} = {rate:.1%} ({undecided} of them undecided: 'not enough items'), "
                f"mean reported power {mean_power:.2f} (expected pass rate {mean_power:.0%}); target <= {TARGET:.0%} where the items can decide: "
                + ("met" if rate <= TARGET else "missed" + (" (the items cannot decide this margin: see the power)" if mean_power < 1 - TARGET else ""))
            )
        print(f"judge: {judge_s / RERUNS:.2f} s per candidate")


if __name__ == "__main__":
    main()
