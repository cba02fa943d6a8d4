"""The scheduled checks over the record of every answer (serving/record/): online quality and
drift, each a Prefect flow with a deployment on its own schedule (`make serve-flows`:
monitor.quality_cron, monitor.drift_cron), an MLflow run and a Prefect artifact per run, and
its latest result written where the receiver's exporter serves it to Prometheus
(serving.alerts.write_check), which the OnlineQualityDrop and DriftDetected alerts read.

    python -m flows.watch quality [--window 1h]   # score a sample of the recorded answers
    python -m flows.watch drift [--window 1d]     # the window's prompts vs training and vs the window before

Only users' traffic counts: the plane's own `service` tier (a release's synthetic users), cache
hits (the same answer again) and answers that failed or were cut short are left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipelines.config import ConfigError, Params, load_params
from pipelines.serve_config import seconds

SERVICE_TIER = "service"  # the plane's own traffic key (serving/keys.py): synthetic, not users
PROMPTS_FILE = Path("data/prepared/sft_train.parquet")  # the training prompts drift compares with
RM_DIR = Path("models/rm")


# ---------------------------------------------------------------- the record's rows


def open_record(params: Params, where: str | None = None):
    """The record's store (as `lifecycle traffic` finds it): `where`, else record.store /
    $record.store_env, else the plane's file. A missing SQLite file is an error that says so."""
    from serving.plane.operations import STATE_DIR
    from serving.record import open_store
    from serving.record.recorder import STORE_FILE
    from serving.record.store import POSTGRES_SCHEMES

    target = where or params.record.store_url() or str(STATE_DIR / STORE_FILE)
    if not target.startswith(POSTGRES_SCHEMES) and not Path(target.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(f"no record at {target} yet: the plane (`make serve`) records every answer there (record.store in params.yaml)")
    return open_store(target)


def users_rows(store, since: float, until: float) -> list:
    """The users' answered completions in [since, until): not the service tier, not cache hits,
    not failures or streams cut short."""
    from serving.record import Filters
    from serving.record.store import CUT_SHORT

    return [
        r for r in store.iter_rows(Filters(status=200, since=since, until=until))
        if r.tier != SERVICE_TIER and not r.cache_hit and r.answer and r.finish_reason not in CUT_SHORT
    ]


def last_user_text(messages: list[dict]) -> str:
    """The text a user asked: the last user turn's content (what a prompt distribution is)."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):  # OpenAI content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else json.dumps(content)


def row_prompt(row) -> str:
    from serving.record.export import prompt_messages

    return last_user_text(prompt_messages(row))


def training_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    import pandas as pd

    from pipelines.formats import chat_messages

    if not path.exists():
        raise FileNotFoundError(f"{path} not found: drift compares live prompts with the training prompts, which `make pipeline` prepares")
    texts = []
    for cell in pd.read_parquet(path, columns=["messages"])["messages"]:
        messages = chat_messages(cell)
        asked = [m for m in messages[:-1] if m["role"] == "user"] if messages and messages[-1]["role"] == "assistant" else [m for m in messages if m["role"] == "user"]
        if asked:
            texts.append(asked[-1]["content"])
    return texts


def now_iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def log_run(params: Params, name: str, metrics: dict[str, float], report: dict, tags: dict[str, str]) -> str | None:
    """One MLflow run in the `<model>-monitoring` experiment; None when tracking fails (the
    check's result still reaches Prometheus: monitoring must not depend on the tracker)."""
    try:
        from registry.store import client, experiment_id

        c = client()
        run = c.create_run(experiment_id(f"{params.registry.model_name}-monitoring"), run_name=name, tags={"check": name, **tags})
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                c.log_metric(run.info.run_id, key, value)
        c.log_dict(run.info.run_id, report, f"{name}.json")
        c.set_terminated(run.info.run_id)
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        print(f"MLflow: the {name} run was not logged ({type(exc).__name__}: {exc})")
        return None


def nothing_recorded(why: str, key: str, params: Params) -> dict:
    print(why)
    create_markdown_artifact(key=key, markdown=f"# {key} of {params.registry.model_name}\n\nNothing to check: {why}.", description=why)
    return {"skipped": why}


# ---------------------------------------------------------------- online quality


def sample_per_version(rows: list, rate: float, cap: int, seed: int) -> dict[str, list]:
    """A seeded sample of each version's rows: `rate` of them (at least one), at most `cap`."""
    by_version: dict[str, list] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.id):  # the store's order must not decide the sample
        by_version[r.version or "?"].append(r)
    rng = random.Random(seed)
    return {v: rng.sample(rs, min(cap, max(1, round(rate * len(rs))))) for v, rs in sorted(by_version.items())}


def reward_scores(items: list[dict], model_dir: Path = RM_DIR) -> list[float]:
    """The recipe's reward model on each (prompt messages, answer): sigmoid of its reward, 0..1."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.model_files import pretrained_kwargs

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, **pretrained_kwargs(model_dir)).eval()
    out = []
    with torch.no_grad():
        for item in items:
            text = tokenizer.apply_chat_template([*item["messages"], {"role": "assistant", "content": item["answer"]}], tokenize=False)
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
            out.append(float(torch.sigmoid(model(**ids).logits[0, 0])))
    return out


@task(name="score-answers")
def score_answers(params: Params, samples: dict[str, list]) -> dict[str, dict]:
    from pipelines.judge import judge_scores
    from serving.record.export import prompt_messages

    use_rm = "rm" in params.recipe and RM_DIR.exists()
    scored = {}
    for version, rows in samples.items():
        items = [{"prompt": row_prompt(r), "messages": prompt_messages(r), "answer": r.answer} for r in rows]
        judged = judge_scores(items, params.evaluate.judge)
        entry = {"samples": len(items), "score": sum(judged) / len(judged), "scores": judged, "ids": [r.id for r in rows]}
        if use_rm:
            rewards = reward_scores(items)
            entry["reward_model"] = sum(rewards) / len(rewards)
        scored[version] = entry
    return scored


@flow(name="online-quality", log_prints=True)
def online_quality(window: str | None = None, until: float | None = None) -> dict:
    """Score a seeded sample of each version's recorded answers with the judge (and the reward
    model when the recipe has one); each version with enough scored answers gets its mean,
    0..1, exported as lifecycle_online_quality_score{model, version}."""
    from serving.alerts import MONITOR_DIR, write_check

    params = load_params()
    cfg = params.monitor
    window = window or cfg.quality_window
    until = until or time.time()
    since = until - seconds(window)
    try:
        store = open_record(params)
    except FileNotFoundError as exc:  # nothing served yet: a completed run that says so
        return nothing_recorded(str(exc), "online-quality", params)
    try:
        rows = users_rows(store, since, until)
    finally:
        store.close()
    samples = sample_per_version(rows, cfg.quality_sample_rate, cfg.quality_max_samples, seed=int(since))
    scored = score_answers(params, samples)
    name = params.registry.model_name
    results: dict[str, dict] = {}
    for version, entry in scored.items():
        enough = entry["samples"] >= cfg.quality_min_samples
        results[version] = {k: v for k, v in entry.items() if k not in ("scores", "ids")} | {"exported": enough}
        if enough:
            write_check({"kind": "online_quality", "model": name, "version": version, "score": entry["score"], "at": now_iso(until), "samples": entry["samples"], "window": window}, MONITOR_DIR / "checks")
    report = {"window": window, "since": now_iso(since), "until": now_iso(until), "answers": len(rows), "min_samples": cfg.quality_min_samples, "quality_min": cfg.quality_min, "versions": results}
    metrics = {f"v{v}/score": r["score"] for v, r in results.items()} | {f"v{v}/samples": r["samples"] for v, r in results.items()}
    metrics |= {f"v{v}/reward_model": r["reward_model"] for v, r in results.items() if "reward_model" in r}
    report["mlflow_run"] = log_run(params, "online-quality", metrics, report, {"window": window})
    lines = [f"# Online quality of {name}", "", f"{len(rows)} users' answers recorded from {report['since']} to {report['until']}; judge: {params.evaluate.judge.endpoint}.", "",
             "| version | scored | mean score (0-1) | reward model | exported | below quality_min |", "| --- | --- | --- | --- | --- | --- |"]
    for v, r in results.items():
        rm = f"{r['reward_model']:.3f}" if "reward_model" in r else "-"
        low = "yes" if r["exported"] and r["score"] < cfg.quality_min else "no"
        lines.append(f"| {v} | {r['samples']} | {r['score']:.3f} | {rm} | {'yes' if r['exported'] else f'no (< {cfg.quality_min_samples})'} | {low} |")
    if not results:
        lines.append("| - | 0 | - | - | no answers in the window | - |")
    create_markdown_artifact(key="online-quality", markdown="\n".join(lines), description=f"online quality of {name} over {window}")
    for v, r in results.items():
        print(f"version {v}: {r['samples']} answers scored, mean {r['score']:.3f}" + (" (exported)" if r["exported"] else f" (not exported: fewer than {cfg.quality_min_samples})"))
    return report


# ---------------------------------------------------------------- drift


@task(name="compare-prompts")
def compare_prompts(reference: list[str], window: list[str], alpha: float, label: str, seed: int) -> dict:
    from pipelines.drift import DriftPolicy, compare

    return compare(reference, window, DriftPolicy(alpha=alpha, seed=seed), label).to_dict()


@flow(name="drift", log_prints=True)
def drift(window: str | None = None, until: float | None = None) -> dict:
    """The users' prompts of the window against the training prompts and against the window
    before it (pipelines/drift.py: length, script, vocabulary, a domain classifier). Each check's
    evidence is exported as lifecycle_drift_score{model, check} beside its threshold."""
    from pipelines.drift import sample
    from serving.alerts import MONITOR_DIR, write_check

    params = load_params()
    cfg = params.monitor
    window = window or cfg.drift_window
    until = until or time.time()
    span = seconds(window)
    try:
        store = open_record(params)
    except FileNotFoundError as exc:
        return nothing_recorded(str(exc), "drift", params)
    try:
        live = [row_prompt(r) for r in users_rows(store, until - span, until)]
        previous = [row_prompt(r) for r in users_rows(store, until - 2 * span, until - span)]
    finally:
        store.close()
    name = params.registry.model_name
    report: dict = {"window": window, "since": now_iso(until - span), "until": now_iso(until), "prompts": len(live), "previous_prompts": len(previous), "comparisons": {}}
    if len(live) < cfg.drift_min_prompts:
        report["skipped"] = f"{len(live)} prompts in the window, fewer than monitor.drift_min_prompts ({cfg.drift_min_prompts}): not judged"
        print(report["skipped"])
        create_markdown_artifact(key="drift", markdown=f"# Drift of {name}\n\n{report['skipped']}.", description=f"drift of {name} over {window}")
        return report
    n, seed = cfg.drift_reference_size, int(until // span)
    live_sample = sample(live, n, seed)
    references = {"training": sample(training_prompts(), n, seed)}
    if len(previous) >= cfg.drift_min_prompts:
        references["previous window"] = sample(previous, n, seed)
    for label, reference in references.items():
        result = compare_prompts(reference, live_sample, cfg.drift_alpha, label, seed)
        report["comparisons"][label] = result
        for c in result["checks"]:
            check = c["check"] if label == "training" else f"{c['check']}-vs-previous"
            write_check({"kind": "drift", "model": name, "check": check, "score": c["score"], "threshold": c["threshold"], "at": now_iso(until), "p": c["p"], "effect": c["effect"]}, MONITOR_DIR / "checks")
    report["drifted"] = any(r["drifted"] for r in report["comparisons"].values())
    metrics = {f"{label.replace(' ', '_')}/{c['check']}/score": c["score"] for label, r in report["comparisons"].items() for c in r["checks"]}
    metrics |= {f"{label.replace(' ', '_')}/{c['check']}/effect": c["effect"] for label, r in report["comparisons"].items() for c in r["checks"]}
    metrics["drifted"] = float(report["drifted"])
    report["mlflow_run"] = log_run(params, "drift", metrics, report, {"window": window, "drifted": str(report["drifted"]).lower()})
    from pipelines.plots import plot_lengths

    png = plot_lengths(references["training"], live_sample, references.get("previous window", []), MONITOR_DIR / "drift" / "lengths.png")
    if report["mlflow_run"]:
        from registry.store import client

        client().log_artifact(report["mlflow_run"], str(png))
    lines = [f"# Drift of {name}: {'DRIFT' if report['drifted'] else 'no drift'}", "", f"{len(live)} users' prompts from {report['since']} to {report['until']} ({len(previous)} in the window before).", ""]
    for label, r in report["comparisons"].items():
        lines += [f"## Against {label} ({r['n_reference']} prompts vs {r['n_window']})", "", "| check | p | effect (floor) | score / threshold | verdict |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c['check']} | {c['p']:.2g} | {c['effect']:.3f} ({c['floor']}) | {c['score']:.2f} / {c['threshold']:.2f} | {'DRIFT' if c['drifted'] else 'ok'} |" for c in r["checks"]]
        lines.append("")
    create_markdown_artifact(key="drift", markdown="\n".join(lines), description=f"drift of {name} over {window}")
    print("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.watch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["quality", "drift"])
    parser.add_argument("--window", help="a Prometheus-style duration (default: monitor.quality_window / monitor.drift_window)")
    args = parser.parse_args(argv)
    try:
        load_params()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    try:
        (online_quality if args.check == "quality" else drift)(window=args.window)
    except FileNotFoundError as exc:  # the training prompts drift compares with
        print(exc, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
