"""Accepted feedback -> training rows in a declared source folder, and the policy that decides
whether they start the next lifecycle run (`make feedback-export`).

    python -m pipelines.feedback_export [--store URL] [--no-trigger] [--no-dvc]

Reads the explicit feedback a reviewer accepted or edited (`flows/review.py`) from the record's
store and writes, under `feedback_loop.out_dir` (data/feedback):

    train/preference.jsonl   a correction or a preferred answer: chosen = it, rejected = the served answer
    train/kto.jsonl          a rating: label True for +1 (or 4-5 stars), False for -1 (or 1-2); 3 stars is skipped
    train/sft.jsonl          a correction as an SFT row, with feedback_loop.sft_rows
    test/preference.jsonl, test/kto.jsonl   the held-out feedback set (never SFT: it is not what the slice scores)

in the shapes `pipelines/formats.py` reads (`prompt`/`chosen`/`rejected`, `prompt`/`completion`/
`label`, `messages`), each row with its provenance beside it (feedback and completion ids, the
answering model version, the feedback key's tier, the review decision, reviewer and time),
which prepare ignores. The folders are sources like any (params.yaml `data.sources`): prepare
cleans, redacts, deduplicates and decontaminates them, and the held-out folder, declared with
`split: test`, is an evaluation set the training rows are decontaminated against.

Rows are held out by a hash of the prompt (normal form), so a completion, every completion of
the same prompt and every row they make stay on one side, and a row keeps its side as feedback
grows (a row moving from test to train would leak the evaluation). Rows are written sorted and
texts redacted again, so the same feedback gives the same bytes: DVC sees no change on a rerun.

Not a DVC stage: its input is the live record, outside the workspace. Its output folder is a
dependency of `prepare` (and `dvc add`-ed here), so the bytes that made a model are in dvc.lock.
This module reads the store and writes files only; starting a run goes through the `announce`
callable `main` passes in (`flows.deployments.announce_data`), so no Prefect import lives here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipelines.clean import normal_form, redact
from pipelines.common import METRICS, PREPARED, write_json
from pipelines.config import ConfigError, Params, load_params
from pipelines.data_config import FeedbackLoopParams

TABLES = ("preference", "kto", "sft")
HELD_OUT_TABLES = ("preference", "kto")  # the slice scores pairs and labelled answers, not SFT
DAY_S = 86_400


# ---------------------------------------------------------------- rows


def stars_label(rating: int, scale: str | None) -> bool | None:
    """A rating's KTO label: the sign of a thumbs rating; 4-5 stars good, 1-2 bad, 3 None (no label)."""
    if scale == "stars":
        return True if rating >= 4 else False if rating <= 2 else None
    return rating > 0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _redacted(messages: list[dict]) -> list[dict]:
    return [{**m, "content": redact(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]


def provenance(item) -> dict:
    """Where a row came from: prepare ignores these keys, lineage and the slice gate read them.
    The key id is left out (as in the record's export): a key's later `lifecycle forget` cannot
    reach into training data."""
    f, c, r = item.feedback, item.completion, item.review
    return {
        "feedback_id": f.id, "feedback_revision": f.revision, "completion_id": c.id, "version": c.version, "model": c.model,
        "tier": f.tier, "decision": r.decision, "reviewer": r.reviewer, "decided": _when(r.decided),
    }


@dataclass
class Export:
    """What one export made: rows per (split, table), and what it skipped, with the reason."""

    rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    used: list = field(default_factory=list)  # the feedback items that made at least one row

    def add(self, split: str, table: str, row: dict) -> None:
        self.rows.setdefault((split, table), []).append(row)

    def counts(self) -> dict:
        n = lambda split, table: len(self.rows.get((split, table), []))  # noqa: E731
        return {
            "pairs": n("train", "preference"), "kto_rows": n("train", "kto"), "sft_rows": n("train", "sft"),
            "held_out": {t: n("test", t) for t in HELD_OUT_TABLES}, "held_out_rows": sum(n("test", t) for t in HELD_OUT_TABLES),
            "feedback_used": len(self.used), "skipped": dict(sorted(self.skipped.items())),
        }


def held_out(prompt: list[dict], cfg: FeedbackLoopParams) -> bool:
    """Whether a prompt's rows are the feedback evaluation set's: a hash of its normal form."""
    text = normal_form("\n".join(m.get("content") or "" for m in prompt if m.get("role") != "system"))
    u = int(hashlib.sha256(f"{cfg.seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return u < cfg.test_fraction


def rows_of(item, cfg: FeedbackLoopParams) -> tuple[list[tuple[str, dict]], list[str]]:
    """(table, row) for every training row one reviewed feedback makes, and why parts were skipped."""
    from serving.record.export import prompt_messages

    f, c = item.feedback, item.completion
    if not c.answer:
        return [], ["no_served_answer"]
    prompt = _redacted(prompt_messages(c))
    served = [{"role": "assistant", "content": redact(c.answer)}]
    origin = provenance(item)
    rows, skipped = [], []
    if (correction := item.correction) is not None:
        corrected = [{"role": "assistant", "content": redact(correction)}]
        if normal_form(correction) == normal_form(c.answer):
            skipped.append("correction_equals_answer")
        else:
            rows.append(("preference", {"prompt": prompt, "chosen": corrected, "rejected": served, "signal": "correction", **origin}))
            if cfg.sft_rows:
                rows.append(("sft", {"messages": [*prompt, *corrected], "signal": "correction", **origin}))
    if f.preferred is not None:
        if not item.preferred_answer:
            skipped.append("preferred_answer_missing")
        elif normal_form(item.preferred_answer) == normal_form(c.answer):
            skipped.append("preferred_equals_answer")
        else:
            chosen = [{"role": "assistant", "content": redact(item.preferred_answer)}]
            rows.append(("preference", {"prompt": prompt, "chosen": chosen, "rejected": served, "signal": "preferred", "preferred_completion_id": f.preferred, **origin}))
    if f.rating is not None:
        label = stars_label(f.rating, f.scale)
        if label is None:
            skipped.append("neutral_rating")
        else:
            rows.append(("kto", {"prompt": prompt, "completion": served, "label": label, "signal": "rating", "rating": f.rating, "scale": f.scale, **origin}))
    if not rows and not skipped:
        skipped.append("no_label")  # only a reason or tags: nothing to train on
    return rows, skipped


def build(items: Iterable, cfg: FeedbackLoopParams) -> Export:
    """Every explicit feedback item -> rows (accepted or edited ones) or a skip reason."""
    out = Export()
    for item in items:
        if item.review is None:
            out.skipped["unreviewed"] += 1
            continue
        if item.review.decision == "rejected":
            out.skipped["rejected"] += 1
            continue
        rows, skipped = rows_of(item, cfg)
        out.skipped.update(skipped)
        if rows:
            out.used.append(item)
        for table, row in rows:
            split = "test" if held_out(row.get("prompt") or row["messages"][:-1], cfg) else "train"
            if split == "test" and table not in HELD_OUT_TABLES:
                continue  # an SFT row of a held-out prompt would teach the answer the slice asks for
            out.add(split, table, row)
    for rows in out.rows.values():  # deterministic bytes, whatever order the store returns
        rows.sort(key=lambda r: (r["feedback_id"], r["signal"]))
    return out


def write(export: Export, out_dir: Path) -> list[Path]:
    """<out_dir>/{train,test}/<table>.jsonl, each replaced only when its bytes change (an
    unchanged file keeps its mtime too); a table with no rows leaves no file behind."""
    written = []
    for split in ("train", "test"):
        for table in TABLES:
            path = out_dir / split / f"{table}.jsonl"
            rows = export.rows.get((split, table), [])
            if not rows:
                path.unlink(missing_ok=True)
                continue
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            if not (path.is_file() and path.read_bytes() == data):
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                partial.write_bytes(data)
                os.replace(partial, path)
            written.append(path)
    return written


# ---------------------------------------------------------------- trigger policy


@dataclass(frozen=True)
class TriggerDecision:
    fire: bool
    reasons: list[str]


def decide_trigger(new_rows: int, now: float, runs: list[float], policy: FeedbackLoopParams) -> TriggerDecision:
    """Whether the export starts a lifecycle run: `new_rows` accepted feedback rows decided since
    the last run it started, the times (Unix s) of the runs it started, at `now`. Every rule
    that fails is named; a run starts only when none does."""
    why_not = []
    if not policy.trigger:
        why_not.append("feedback_loop.trigger is false")
    if new_rows < policy.min_new_rows:
        why_not.append(f"{new_rows} new accepted feedback row(s), fewer than min_new_rows {policy.min_new_rows}")
    last = max(runs, default=None)
    if last is not None and now - last < policy.cooldown_s:
        why_not.append(f"cooldown: the last run started {now - last:.0f} s ago, cooldown_s is {policy.cooldown_s:.0f} (next after {_when(last + policy.cooldown_s)})")
    today = sum(1 for t in runs if now - DAY_S < t <= now)
    if today >= policy.max_runs_per_day:
        why_not.append(f"budget: {today} run(s) started in the last 24 h, max_runs_per_day is {policy.max_runs_per_day}")
    if why_not:
        return TriggerDecision(False, why_not)
    return TriggerDecision(True, [f"{new_rows} new accepted feedback row(s) >= min_new_rows {policy.min_new_rows}", f"{today} of {policy.max_runs_per_day} run(s) in the last 24 h",
                                  "no run started yet" if last is None else f"last run {now - last:.0f} s ago >= cooldown_s {policy.cooldown_s:.0f}"])


def read_state(path: Path) -> dict:
    if not path.is_file():
        return {"runs": [], "watermark": None}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc.msg}); it holds the runs the feedback export started (feedback_loop.state_file): fix or delete it") from None
    return {"runs": [float(t) for t in state.get("runs", [])], "watermark": state.get("watermark")}


def new_since(used: list, watermark: float | None) -> int:
    """Feedback rows decided after the last triggered run's newest decision."""
    return sum(1 for i in used if watermark is None or i.review.decided > watermark)


# ---------------------------------------------------------------- lineage


def feedback_sources(params: Params) -> dict[str, list]:
    """The declared sources that read the export's folders: {'train': [...], 'test': [...]}."""
    out: dict[str, list] = {"train": [], "test": []}
    for split in out:
        folder = (Path(params.feedback_loop.out_dir) / split).resolve()
        out[split] = [s for s in params.data.sources if s.path and Path(s.path.split("*")[0]).resolve() == folder]
    return out


def provenance_summary(files: Iterable[Path]) -> dict:
    """What exported rows came from, read from their provenance: rows per table, the model
    versions whose answers they judge or correct, and the review decisions behind them."""
    tables, versions, decisions, feedback = Counter(), Counter(), Counter(), set()
    for path in files:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            tables[Path(path).stem] += 1
            versions[str(row.get("version") or "unknown")] += 1
            decisions[row.get("decision") or "unknown"] += 1
            feedback.add(row.get("feedback_id"))
    return {"rows": sum(tables.values()), "tables": dict(tables), "versions": dict(versions), "decisions": dict(decisions), "feedback": len(feedback - {None})}


def _counts(c: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0])))


def feedback_lineage(params: Params, prepared: Path | None = None) -> dict[str, str]:
    """The version's lineage tags for the feedback it was trained and gated on (empty without
    any): the sources, how many rows (exported, and kept by prepare in the training split),
    the model versions whose answers users corrected or rated, and the review decisions."""
    from pipelines.sources import files_of

    prepared = PREPARED if prepared is None else prepared
    tags: dict[str, str] = {}
    for split, key in (("train", "feedback"), ("test", "feedback_slice")):
        sources = [s for s in feedback_sources(params)[split] if files_of(s)]
        if not sources:
            continue
        summary = provenance_summary(f for s in sources for f in files_of(s))
        if not summary["rows"]:
            continue
        tags |= {
            f"lineage.{key}.source": ",".join(s.label for s in sources), f"lineage.{key}.rows": str(summary["rows"]),
            f"lineage.{key}.tables": _counts(summary["tables"]), f"lineage.{key}.feedback": str(summary["feedback"]),
            f"lineage.{key}.versions": _counts(summary["versions"]), f"lineage.{key}.decisions": _counts(summary["decisions"]),
        }
        if split == "train":  # what survived cleaning into the training split
            import pandas as pd

            names = {s.label for s in sources}
            kept = sum(int(pd.read_parquet(f, columns=["source"])["source"].isin(names).sum()) for f in sorted(Path(prepared).glob("*_train.parquet")))
            tags[f"lineage.{key}.rows_trained"] = str(kept)
    return tags


# ---------------------------------------------------------------- the command


def declared(params: Params, out_dir: Path) -> list[str]:
    """Problems with how out_dir's folders are declared as sources (empty when both are)."""
    problems = []
    for split in ("train", "test"):
        folder = (out_dir / split).resolve()
        srcs = [s for s in params.data.sources if s.path and (Path(s.path.split("*")[0]).resolve() == folder)]
        if not srcs:
            problems.append(f"{out_dir / split} is not a declared source: add {{name: feedback{'' if split == 'train' else '_test'}, path: {out_dir / split}/*.jsonl, split: {split}, required: false}} to data.sources in params.yaml")
        elif srcs[0].split != split:
            problems.append(f"source '{srcs[0].label}' reads {out_dir / split} with split {srcs[0].split}: set split: {split}")
    return problems


def open_record(params: Params, where: str | None):
    from serving.record import open_store
    from serving.record.recorder import STORE_FILE

    target = where or params.record.store_url()
    if target is None:
        from serving.plane.operations import STATE_DIR

        target = str(STATE_DIR / STORE_FILE)
        if not Path(target).exists():
            raise SystemExit(f"no record at {target} yet: the plane (`make serve`) records every answer and its feedback there (record.store in params.yaml), or pass --store")
    return open_store(target)


def export(params: Params, store, announce: Callable[[dict], str] | None = None, now: float | None = None) -> dict:
    """Export the store's reviewed feedback into feedback_loop.out_dir and, when `announce` is
    given and the policy holds, start a run with it. Returns the report (also metrics/feedback_export.json)."""
    from serving.record.feedback import FeedbackFilters

    cfg = params.feedback_loop
    out_dir = Path(cfg.out_dir)
    started = time.perf_counter()
    result = build(store.iter_feedback(FeedbackFilters()), cfg)
    files = write(result, out_dir)
    elapsed = time.perf_counter() - started
    report = {**result.counts(), "implicit_signals_ignored": store.count_feedback_by("kind", FeedbackFilters(kind="implicit")).get("implicit", 0),
              "files": [str(p) for p in files], "undeclared": declared(params, out_dir)}
    write_json(METRICS / "feedback_export.json", report)  # no times in it: the same feedback, the same file
    rows = sum(len(r) for r in result.rows.values())
    report["rows_per_s"] = rows / elapsed if elapsed > 0 else None
    state_path = Path(cfg.state_file)
    state = read_state(state_path)
    now = time.time() if now is None else now
    new = new_since(result.used, state["watermark"])
    decision = decide_trigger(new, now, state["runs"], cfg)
    report["new_rows"], report["trigger"] = new, {"fire": decision.fire, "reasons": decision.reasons}
    if decision.fire and announce is not None:
        said = announce({"source": "feedback", "new_rows": new, "recipe": list(cfg.recipe), "start_from": cfg.start_from, "overrides": cfg.overrides, **{k: v for k, v in result.counts().items() if k != "skipped"}})
        report["trigger"]["announced"] = said
        if said.startswith("emitted"):  # a run was asked for: the next one waits for newer feedback
            state = {"runs": [t for t in state["runs"] if now - t < DAY_S] + [now], "watermark": max(i.review.decided for i in result.used)}
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state) + "\n")
    return report


def dvc_add(out_dir: Path) -> str:
    """Track the exported folders with DVC, as `make data-add` tracks a file (best effort: the
    files are read from the folder either way)."""
    folders = [str(out_dir / s) for s in ("train", "test") if (out_dir / s).is_dir()]
    if not folders:
        return "nothing to track"
    done = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", *folders], capture_output=True, text=True)
    if done.returncode:
        return f"not tracked by DVC ({(done.stderr.strip().splitlines() or ['dvc add failed'])[-1]}); prepare still reads {out_dir}"
    return f"tracked by DVC: commit {' '.join(f + '.dvc' for f in folders)} and {out_dir}/.gitignore"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.feedback_export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="the record's store (default: record.store, $record.store_env, or the plane's file)")
    parser.add_argument("--no-trigger", action="store_true", help="export only: never start a run")
    parser.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the exported folders")
    args = parser.parse_args(argv)
    try:
        params = load_params()
    except ConfigError as exc:
        sys.exit(str(exc))
    announce = None
    if not args.no_trigger:
        def announce(payload: dict) -> str:  # Prefect only here, at the command's edge
            from flows.deployments import announce_data

            return announce_data(params, params.feedback_loop.out_dir, payload)

    with open_record(params, args.store) as store:
        report = export(params, store, None if args.no_trigger else announce)
    c = report
    print(f"feedback export: {c['pairs']} pairs, {c['kto_rows']} KTO rows, {c['sft_rows']} SFT rows; held out {c['held_out_rows']} {c['held_out']}; "
          f"from {c['feedback_used']} feedback; skipped {c['skipped'] or 'none'}; implicit signals ignored {c['implicit_signals_ignored']}")
    for problem in c["undeclared"]:
        print(f"warning: {problem}", file=sys.stderr)
    if not args.no_dvc:
        print(dvc_add(Path(params.feedback_loop.out_dir)))
    t = c["trigger"]
    print(("run: " + t.get("announced", "policy holds (--no-trigger: not started)")) if t["fire"] else "no run: " + "; ".join(t["reasons"]))


if __name__ == "__main__":
    main()
