"""`make bench`: the evaluation suite's time per task and per model, and the quality gate's
false-block rate over 20 reruns of an equally good candidate.

A tiny champion is trained here (default model size, full SFT); each "rerun" retrains the same
recipe with another seed, so the candidate is as good as the champion in distribution but not
item for item, which is the noise the paired tests must not mistake for a regression. Every
candidate goes through the same `decide()` the gate task calls, with the suite's metrics paired
against the champion's, Holm-corrected, and the rule judge over the OpenAI protocol.
Target (issue #7): false-block rate <= 5 %. Printed, never asserted.
"""

from __future__ import annotations

import os
import tempfile
import time

RERUNS = int(os.environ.get("BENCH_GATE_RERUNS", "20"))
# Trained to convergence: at 250 steps and lr 3e-3, some seeds had not learned the task yet
# (exact match 0.1 to 0.87 against the champion's 0.91): worse candidates, rightly blocked,
# not equal ones. At 800 steps and lr 1e-3 every seed tried reached the champion's level.
STEPS = int(os.environ.get("BENCH_SFT_STEPS", "800"))
LR = float(os.environ.get("BENCH_SFT_LR", "1e-3"))
TARGET = 0.05


def main() -> None:
    from pipelines import bootstrap, generate, prepare, sft
    from pipelines.config import EvaluateParams, GenerateParams, ModelParams, PeftParams, SftParams
    from pipelines.evaluate import run_suite
    from pipelines.gates import decide, pair_items
    from pipelines.judge import judge_pairs
    from tests.conftest import tiny_params

    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        evaluate = EvaluateParams(batch_size=64, max_new_tokens=12)

        def params(seed: int):
            sft_cfg = SftParams(peft=PeftParams(method="full"), max_steps=STEPS, batch_size=32, save_steps=STEPS, learning_rate=LR, seed=seed, warmup_steps=0)
            return tiny_params(model=ModelParams(), generate=GenerateParams(), sft=sft_cfg, evaluate=evaluate)  # the demo's full data

        base = params(0)
        for stage in (generate, prepare, bootstrap):
            stage.run(base)
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
        print(f"  champion: {', '.join(f'{k} {v:.3f}' for k, v in champ_metrics.items())} over {len(champ_rows)} items")

        directions = evaluate.directions()
        blocked, judge_s = [], 0.0
        for seed in range(1, RERUNS + 1):
            p = params(seed)
            sft.run(p)
            metrics, rows, _ = run_suite("models/sft", evaluate)
            paired = {m: pair_items(rows, champ_rows, m) for m in directions}
            task = evaluate.tasks[0].name
            champ = {r["id"]: r for r in champ_rows if r["task"] == task}
            started = time.perf_counter()
            judged = judge_pairs([{"id": r["id"], "prompt": r["prompt"], "candidate": r["raw"] or "", "champion": champ[r["id"]]["raw"] or ""} for r in rows if r["task"] == task], evaluate.judge)
            judge_s += time.perf_counter() - started
            paired["judge_win_rate"] = ([j["judge_win_rate"] for j in judged], [0.5] * len(judged))
            # Absolute thresholds aside (this tiny recipe is not tuned to pass them): only the
            # paired comparison with the champion, which is what noise could trip.
            decision = decide({}, None, None, p.gate.model_copy(update={"thresholds": {}}), paired=paired, directions=directions, tolerances=evaluate.tolerances())
            em = metrics[f"{task}/exact_match"]
            print(f"  rerun {seed:2d}: {task}/exact_match {em:.3f} (champion {champ_metrics[f'{task}/exact_match']:.3f}), judge {sum(j['judge_win_rate'] for j in judged) / len(judged):.3f}: {'BLOCKED ' + '; '.join(decision.reasons) if not decision.passed else 'passed'}")
            blocked.append(not decision.passed)
        rate = sum(blocked) / len(blocked)
        print(f"gate false-block rate: {sum(blocked)}/{len(blocked)} = {rate:.1%} (target <= {TARGET:.0%}, {'met' if rate <= TARGET else 'MISSED'}); judge {judge_s / len(blocked):.2f} s per candidate")


if __name__ == "__main__":
    main()
