"""`make bench`: prepare-stage throughput on ~200k generated raw rows, with near-duplicate
removal (MinHash LSH) and PII redaction on, on this machine's cores.

Two figures: the demo generator scaled up (short rows: most fall under near_dup_min_words and
are deduplicated exactly), and the same plus 50k long paragraphs that all go through MinHash.
Target (issue #6): >= 10,000 rows/s on 2 cores. Printed, never asserted.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

TARGET = 10_000
WORDS = "data model train serve metric gate canary token batch cache queue replica shard index query answer prompt review budget library winter river school road village morning".split()


def paragraphs(n: int, seed: int = 0) -> list[str]:
    """Long Alpaca rows; every tenth is a one-word edit of an earlier one (a near duplicate)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 10 == 9:
            words = rows[i - 5]["instruction"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            text = " ".join(words)
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(40))
        rows.append({"instruction": text, "output": f"contact ops-{i}@example.com" if i % 50 == 0 else "noted"})
    return [json.dumps(r) for r in rows]


def timed_prepare(params) -> tuple[float, dict]:
    from pipelines import prepare

    started = time.perf_counter()
    prepare.run(params)
    seconds = time.perf_counter() - started
    return seconds, json.loads(Path("metrics/prepare.json").read_text())


def main() -> None:
    from pipelines import generate
    from pipelines.config import Params
    from pipelines.data_config import DataParams, GenerateParams, PrepareParams, SourceParams

    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-prepare-"))
    os.chdir(work)
    params = Params(generate=GenerateParams(n_sft=150_000, n_preference=15_000), prepare=PrepareParams(pii="redact", min_rows=1, max_quarantine_fraction=1.0))  # the digit-list space is small: many duplicates at this size
    generate.run(params)
    seconds, report = timed_prepare(params)
    rows = report["raw_rows"]
    print(f"\nprepare, demo rows   : {rows:,} raw rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s (target >= {TARGET:,}, ratio {rows / seconds / TARGET:.2f})")
    print(f"  quarantined by reason: {report['quarantined_by_reason']}")

    Path("long").mkdir()
    Path("long/paragraphs.jsonl").write_text("\n".join(paragraphs(50_000)) + "\n")
    sources = [*params.data.sources, SourceParams(name="long", path="long")]
    params = params.model_copy(update={"data": DataParams(sources=sources)})
    seconds, report = timed_prepare(params)
    rows = report["raw_rows"]
    print(f"prepare, + 50k long  : {rows:,} raw rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s (target >= {TARGET:,}, ratio {rows / seconds / TARGET:.2f})")
    print(f"  near duplicates found: {report['quarantined_by_reason'].get('near_duplicate', 0):,} (5,000 planted); PII redacted in place")


if __name__ == "__main__":
    main()
