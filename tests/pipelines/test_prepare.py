import json

import pandas as pd
import pytest

from pipelines import generate, prepare
from pipelines.config import DataParams, Params, PrepareParams
from pipelines.prepare import Quarantined, clean_text, ingest, normalise_chat, split_of


def test_clean_text_folds_whitespace_but_keeps_lines():
    assert clean_text("  Reverse the list:\t \n  1  2\t3  ") == "Reverse the list:\n1 2 3"
    with pytest.raises(Quarantined):
        clean_text(None)


def test_chat_must_end_with_assistant():
    with pytest.raises(Quarantined, match="user -> assistant"):
        normalise_chat({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]})


def test_split_is_deterministic_and_keeps_duplicates_together():
    cfg = PrepareParams()
    splits = [split_of(f"Reverse the list:\n{i} {i}", cfg) for i in range(2000)]
    assert splits == [split_of(f"Reverse the list:\n{i} {i}", cfg) for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert 0.05 < share["test"] < 0.15 and 0.05 < share["validation"] < 0.15


def test_every_raw_row_is_kept_or_quarantined_with_a_reason(tmp_path):
    raw = tmp_path / "mixed.jsonl"
    rows = [
        json.dumps({"instruction": "Reverse the list:", "input": "1 2 3", "output": "3 2 1"}),
        json.dumps({"messages": [{"role": "user", "content": "Reverse the list:\n1  2 3 "}, {"role": "assistant", "content": "3 2 1"}]}),  # dup modulo whitespace
        '{"instruction": "Rev',  # malformed
        json.dumps({"instruction": "Reverse the list:", "input": "4 5 6", "output": "  "}),  # empty answer
        json.dumps({"prompt": "Reverse the list:\n7 8 9", "chosen": "9 8 7", "rejected": "9 8 7"}),  # no preference
        json.dumps({"prompt": "Reverse the list:\n7 8 9", "chosen": "9 8 7", "rejected": "7 8 9"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "unknown format"}),
    ]
    raw.write_text("\n".join(rows) + "\n")
    out = ingest([raw], PrepareParams())
    assert len(out.sft) == 1 and len(out.preference) == 1
    reasons = [q["reason"] for q in out.quarantine]
    assert len(out.sft) + len(out.preference) + len(reasons) == len(rows)
    assert any("duplicate" in r for r in reasons)
    assert any("malformed JSON" in r for r in reasons)
    assert any("empty" in r for r in reasons)
    assert any("identical" in r for r in reasons)
    assert any("unknown row format" in r for r in reasons)
    assert all(q["source"] == "mixed.jsonl" and q["line"] >= 1 for q in out.quarantine)


def test_generate_then_prepare_writes_clean_disjoint_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params(data=DataParams(n_sft=400, n_preference=120))
    generate.run(params)
    first = (tmp_path / "data/raw/alpaca.jsonl").read_bytes()
    generate.run(params)
    assert (tmp_path / "data/raw/alpaca.jsonl").read_bytes() == first, "same seed must give the same bytes"
    prepare.run(params)
    report = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert report["validation_passed"] and report["quarantined"] > 0
    prompts = {}
    for s in ("train", "validation", "test"):
        df = pd.read_parquet(tmp_path / f"data/prepared/sft_{s}.parquet")
        prompts[s] = {m[0]["content"] for m in df["messages"]}
        assert all(m[-1]["role"] == "assistant" and m[-1]["content"] for m in df["messages"])
    assert not prompts["train"] & prompts["test"], "test prompts leaked into training"
    pref_train = pd.read_parquet(tmp_path / "data/prepared/preference_train.parquet")
    assert not set(pref_train["prompt"]) & prompts["test"], "test prompts leaked into preference training"
    quarantined = (tmp_path / "data/prepared/quarantine.jsonl").read_text().splitlines()
    assert len(quarantined) == report["quarantined"]


def test_data_gate_stops_with_a_readable_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params(data=DataParams(n_sft=60, n_preference=20), prepare=PrepareParams(min_rows=5000))
    generate.run(params)
    with pytest.raises(SystemExit) as err:
        prepare.run(params)
    assert "data gate failed" in str(err.value) and "train_rows" in str(err.value)
    assert "train_rows" in (tmp_path / "reports/data_validation.md").read_text()
    assert not (tmp_path / "data/prepared/sft_train.parquet").exists(), "no split may be written when the gate fails"
