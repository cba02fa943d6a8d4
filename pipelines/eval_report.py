"""The evaluation report of a run, as a person reads it: a table per task (every model's score
with its interval), the paired differences against the champion with their intervals and the
test that decided, the judge's win rate, and a chart. Pure: numbers in, markdown and chart
data out (tasks/gates.py publishes them to MLflow and Prefect)."""

from __future__ import annotations

from collections import Counter

from pipelines.config import GateParams
from pipelines.directions import FEEDBACK_SLICE_METRIC
from pipelines.gates import Check, Decision, Interval, direction, mean_interval


def _interval(rows: list[dict], metric: str, policy: GateParams) -> Interval | None:
    values = [float(r[metric]) for r in rows if r.get(metric) is not None]
    return mean_interval(values, policy.bootstrap_resamples, policy.confidence) if values else None


def _fmt(i: Interval | None) -> str:
    return "" if i is None else f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def model_intervals(items: dict[str, list[dict]], metrics: list[str], policy: GateParams) -> dict[str, dict[str, Interval | None]]:
    """Each model's mean per metric with its bootstrap interval, from its per-item rows."""
    return {model: {m: _interval(rows, m, policy) for m in metrics} for model, rows in items.items()}


def render(
    items: dict[str, list[dict]],
    paired: dict[str, tuple[list[float], list[float]]],
    decision: Decision,
    policy: GateParams,
    judged: list[dict] | None = None,
    scalars: dict[str, dict[str, float | None]] | None = None,
    directions: dict[str, str] | None = None,
) -> tuple[str, dict]:
    """`items`: per-item rows by model (base, candidate, served, champion); `paired`: the
    gate's paired scores; `scalars`: per-model numbers without items (validation loss, ...).
    Returns (markdown, chart data for pipelines.plots.plot_gate)."""
    metrics = sorted({k for rows in items.values() for r in rows for k in r if "/" in k or k == "reward_score"})
    per_model = model_intervals(items, metrics, policy)
    models = list(items)
    lines = [f"## Evaluation report: quality gate {'passed' if decision.passed else 'FAILED'}", ""]
    for task in sorted({m.split("/")[0] for m in metrics if "/" in m}):
        lines += [f"### {task}", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for m in (m for m in metrics if m.startswith(task + "/")):
            lines.append(f"| {m.split('/', 1)[1]} | " + " | ".join(_fmt(per_model[n][m]) for n in models) + " |")
        lines.append("")
    if "reward_score" in metrics:
        lines += ["### reward model", "", "| " + " | ".join(models) + " |", "|" + "---|" * len(models), "| " + " | ".join(_fmt(per_model[n]["reward_score"]) for n in models) + " |", ""]
    if scalars:
        names = sorted({k for v in scalars.values() for k in v})
        lines += ["### other metrics", "", "| metric | " + " | ".join(scalars) + " |", "|---|" + "---|" * len(scalars)]
        for k in names:
            lines.append(f"| {k} | " + " | ".join("" if scalars[n].get(k) is None else f"{scalars[n][k]:.3f}" for n in scalars) + " |")
        lines.append("")
    checks: dict[str, Check] = {c.metric: c for c in decision.checks if c.paired is not None and "Holm p=" in c.rule}  # the suite's non-inferiority
    superiority = [c for c in decision.checks if c.metric == FEEDBACK_SLICE_METRIC and c.paired is not None]
    steps = [c for c in decision.checks if c.rule.startswith("recipe step ")]
    if steps:
        lines += ["### Each recipe step against the one before", "", *("- " + c.describe() + ("" if c.passed else " **FAIL**") for c in steps), ""]
    if checks:
        lines += [
            "### Paired against the champion",
            "",
            "What the data can decide: power is the chance that a candidate exactly as good as the champion passes at this many items "
            f"and this discordance; below {policy.min_power:g} a metric that is not shown non-inferior is 'not enough items', not a regression.",
            "",
            "| metric | items | better / worse | mean difference [interval] | margin | test | Holm p | power | items for 80 % | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for metric, c in checks.items():
            r = c.paired
            sign = 1 if metric == "judge_win_rate" or direction(metric, directions) == "higher" else -1  # back to the metric's own units
            low, high = sorted((sign * r.low, sign * r.high))
            counts = f"{r.wins} / {r.losses}" if r.wins is not None else ""
            margin = abs(c.bound - 0.5) if metric == "judge_win_rate" else abs(c.bound)
            needed = f"{r.items_needed:,}" if r.items_needed is not None else "> 1,000,000"
            p = c.rule.split("Holm p=")[1].split(" ")[0]
            result = "pass" if c.passed and not c.pending else "undecided (passed)" if c.passed else "**undecided**" if c.pending else "**FAIL**"
            lines.append(f"| {metric} | {r.n} | {counts} | {sign * r.diff:+.3f} [{low:+.3f}, {high:+.3f}] | {margin:g} | {r.test} | {p} | {r.power:.2f} | {needed} | {result} |")
        lines.append("")
    for c in superiority:
        r = c.paired
        result = "pass" if c.passed and r.low > c.bound else "**undecided**" if c.pending and not c.passed else "undecided (passed)" if c.pending else "reported (not blocking)" if c.passed else "**FAIL**"
        lines += [
            "### Feedback slice: better than the champion",
            "",
            "The held-out items users corrected (1: the model prefers the correction to the answer that was served). "
            "Superiority, not non-inferiority: the lower end of the paired interval must exceed the margin.",
            "",
            "| metric | items | better / worse | mean difference [interval] | margin | test | result |",
            "|---|---|---|---|---|---|---|",
            f"| {c.metric} | {r.n} | {r.wins} / {r.losses} | {r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}] | {c.bound:g} | {r.test} | {result} |",
            "",
        ]
    if judged:
        win = mean_interval([j["judge_win_rate"] for j in judged], policy.bootstrap_resamples, policy.confidence)
        verdicts = Counter(v for j in judged for v in j["verdicts"])
        lines += [
            "### Judge",
            "",
            f"candidate's win rate against the champion: **{win.mean:.3f}** [{win.low:.3f}, {win.high:.3f}] over {len(judged)} prompts, "
            f"each judged in both orders (0.5: as good; verdicts A {verdicts['A']}, B {verdicts['B']}, tie {verdicts['tie']}).",
            "",
        ]
    lines += ["### Decision", "", *("- " + c.describe() for c in decision.checks), ""]
    chart: dict[str, dict[str, tuple[float, float, float] | None]] = {
        n: {m: (i.mean, i.low, i.high) for m, i in per.items() if i is not None} for n, per in per_model.items()
    }
    if judged:
        chart.setdefault("served", {})["judge_win_rate"] = (win.mean, win.low, win.high)
    return "\n".join(lines), chart
