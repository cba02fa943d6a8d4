"""Stage `prepare`: raw files in several formats -> one chat schema -> clean, deduplicated,
decontaminated, validated Parquet splits.

Every raw line ends in exactly one place: a split, or `data/prepared/quarantine.jsonl` with the
reason it was dropped. The counts go to metrics/prepare.json; a failed Great Expectations check
stops the stage with a readable report (reports/data_validation.md) and writes no splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.common import METRICS, PREPARED, RAW, REPORTS, log, stage_main, write_json
from pipelines.config import Params, PrepareParams
from pipelines.validate import DataValidationError, validate_preference, validate_sft

SPLITS = ("train", "validation", "test")


class Quarantined(ValueError):
    """A row that cannot be used; the message is the reason recorded in quarantine.jsonl."""


def clean_text(text: object) -> str:
    """Trim, and fold runs of spaces/tabs inside each line (stray whitespace is noise, not content)."""
    if not isinstance(text, str):
        raise Quarantined(f"expected text, got {type(text).__name__}")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def _require(row: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise Quarantined(f"missing field(s): {', '.join(missing)}")


def normalise_alpaca(row: dict) -> tuple[str, str]:
    _require(row, "instruction", "output")
    instruction, extra = clean_text(row["instruction"]), clean_text(row.get("input", ""))
    return (f"{instruction}\n{extra}" if extra else instruction), clean_text(row["output"])


def normalise_chat(row: dict) -> tuple[str, str]:
    _require(row, "messages")
    msgs = row["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise Quarantined("messages must hold a user turn and an assistant turn")
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    if roles[-2:] != ["user", "assistant"]:
        raise Quarantined(f"conversation must end user -> assistant, got roles {roles}")
    return clean_text(msgs[-2].get("content")), clean_text(msgs[-1].get("content"))


def normalise_preference(row: dict) -> tuple[str, str, str]:
    _require(row, "prompt", "chosen", "rejected")
    return clean_text(row["prompt"]), clean_text(row["chosen"]), clean_text(row["rejected"])


FORMATS = {"alpaca": normalise_alpaca, "chat": normalise_chat, "preference": normalise_preference}


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "instruction" in row:
        return "alpaca"
    raise Quarantined(f"unknown row format with keys {sorted(row)}")


def split_of(prompt: str, cfg: PrepareParams) -> str:
    """Deterministic split by a hash of the prompt: a prompt (and all its duplicates) lands in
    one split only, in SFT and preference data alike, and keeps its split as the data grows.
    This is what keeps test prompts out of every training set (decontamination)."""
    u = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.validation_fraction:
        return "validation"
    return "train"


@dataclass
class Ingested:
    sft: list[dict] = field(default_factory=list)
    preference: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    raw_rows: Counter = field(default_factory=Counter)

    def reject(self, source: str, line_no: int, reason: str, raw: str) -> None:
        self.quarantine.append({"source": source, "line": line_no, "reason": reason, "raw": raw[:500]})


def ingest(paths: list[Path], cfg: PrepareParams) -> Ingested:
    out = Ingested()
    seen: set[tuple] = set()
    for path in paths:
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            out.raw_rows[path.name] += 1
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise Quarantined(f"malformed JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise Quarantined("a row must be a JSON object")
                fmt = detect_format(row)
                fields = FORMATS[fmt](row)
                if any(not f for f in fields):
                    raise Quarantined("empty prompt or answer after cleaning")
                if any(len(f) > cfg.max_chars for f in fields):
                    raise Quarantined(f"longer than prepare.max_chars={cfg.max_chars}")
                key = (fmt == "preference", *fields)
                if key in seen:
                    raise Quarantined("duplicate of an earlier row")
                seen.add(key)
            except Quarantined as why:
                out.reject(path.name, line_no, str(why), line)
                continue
            if fmt == "preference":
                prompt, chosen, rejected = fields
                if chosen == rejected:
                    out.reject(path.name, line_no, "chosen and rejected are identical", line)
                    continue
                out.preference.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                out.sft.append({"prompt": fields[0], "answer": fields[1]})
    return out


def to_chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def run(params: Params) -> None:
    cfg = params.prepare
    sources = sorted(RAW.glob("*.jsonl"))
    if not sources:
        raise SystemExit(f"no raw data: expected *.jsonl files in {RAW}/ (run `dvc repro generate`)")
    data = ingest(sources, cfg)

    sft = pd.DataFrame(data.sft, columns=["prompt", "answer"])
    pref = pd.DataFrame(data.preference, columns=["prompt", "chosen", "rejected"])
    sft["split"] = [split_of(p, cfg) for p in sft["prompt"]]
    pref["split"] = ["train" if split_of(p, cfg) == "train" else "test" for p in pref["prompt"]]

    total_raw = sum(data.raw_rows.values())
    report = {
        "raw_rows": total_raw,
        "raw_rows_by_file": dict(data.raw_rows),
        "quarantined": len(data.quarantine),
        "quarantined_by_reason": dict(Counter(q["reason"].split(":")[0] for q in data.quarantine)),
        "sft_rows": {s: int((sft["split"] == s).sum()) for s in SPLITS},
        "preference_rows": {s: int((pref["split"] == s).sum()) for s in ("train", "test")},
    }
    PREPARED.mkdir(parents=True, exist_ok=True)
    with open(PREPARED / "quarantine.jsonl", "w") as fh:
        fh.writelines(json.dumps(q) + "\n" for q in data.quarantine)
    log.info("ingested %d raw rows; quarantined %d (%s)", total_raw, len(data.quarantine), report["quarantined_by_reason"])

    # The data gate: nothing is written for training unless every expectation holds.
    try:
        checks = validate_sft(sft, cfg, quarantined=len(data.quarantine), raw_rows=total_raw)
        checks += validate_preference(pref)
    except DataValidationError as exc:
        exc.write_report(REPORTS / "data_validation.md")
        write_json(METRICS / "prepare.json", {**report, "validation_passed": False})
        raise SystemExit(str(exc)) from None
    report["validation_passed"] = True
    report["expectations_checked"] = checks

    for s in SPLITS:
        part = sft[sft["split"] == s]
        pd.DataFrame({"messages": [to_chat(p, a) for p, a in zip(part["prompt"], part["answer"])]}).to_parquet(
            PREPARED / f"sft_{s}.parquet", index=False
        )
    for s in ("train", "test"):
        pref[pref["split"] == s].drop(columns="split").to_parquet(PREPARED / f"preference_{s}.parquet", index=False)
    write_json(METRICS / "prepare.json", report)
    log.info("splits: sft %s, preference %s", report["sft_rows"], report["preference_rows"])


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
