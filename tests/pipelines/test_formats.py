"""Every row format and file type reaches the canonical schema through the prepare stage's own
readers; multi-turn, system and tool turns survive; KTO labels stay labels; a bad byte costs
only its own row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.data_config import SourceParams
from pipelines.formats import RowError, chat_messages, normalise, normaliser
from pipelines.sources import read_source

SYSTEM = {"role": "system", "content": "Be brief.", "tool_calls": None}
CALL = [{"type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]

ROWS = {
    "alpaca": {"instruction": "Reverse the list:", "input": "1 2 3", "output": "3 2 1", "system": "Be brief.", "history": [["Reverse the list:\n4 5", "5 4"]]},
    "sharegpt": {"system": "Be brief.", "tools": [{"name": "lookup"}], "conversations": [
        {"from": "human", "value": "Look up x"}, {"from": "function_call", "value": "{\"name\": \"lookup\", \"arguments\": {\"q\": \"x\"}}"},
        {"from": "observation", "value": "x is 42"}, {"from": "gpt", "value": "It is 42."}]},
    "openai": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Look up x"},
                            {"role": "assistant", "content": None, "tool_calls": CALL}, {"role": "tool", "content": "42"},
                            {"role": "assistant", "content": "It is 42."}]},
    "prompt_completion": {"prompt": "Reverse the list:\n1 2", "completion": "2 1"},
    "preference": {"prompt": [{"role": "user", "content": "Reverse the list:\n1 2"}], "chosen": [{"role": "assistant", "content": "2 1"}], "rejected": "1 2"},
    "hh": {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    "kto": {"messages": [{"role": "user", "content": "Reverse the list:\n1 2"}, {"role": "assistant", "content": "1 2"}], "label": False},
    "text": {"text": "Plain text for continued pretraining."},
}


def test_each_format_normalises_with_every_turn_kept():
    sft = normalise(ROWS["alpaca"])["sft"]["messages"]
    assert [m["role"] for m in sft] == ["system", "user", "assistant", "user", "assistant"], "system and history survive"
    assert sft[3]["content"] == "Reverse the list:\n1 2 3"

    share = normalise(ROWS["sharegpt"])["sft"]
    assert [m["role"] for m in share["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(share["messages"][2]["tool_calls"])[0]["function"]["name"] == "lookup"
    assert json.loads(share["tools"]) == [{"name": "lookup"}]

    oa = chat_messages(normalise(ROWS["openai"])["sft"]["messages"])
    assert [m["role"] for m in oa] == ["system", "user", "assistant", "tool", "assistant"]
    assert oa[2]["tool_calls"] == CALL and "tool_calls" not in oa[1], "tool calls parsed back, no None left"

    assert [m["role"] for m in normalise(ROWS["prompt_completion"])["sft"]["messages"]] == ["user", "assistant"]
    pref = normalise(ROWS["preference"])["preference"]
    assert pref["rejected"][0]["content"] == "1 2" and pref["prompt"][0]["role"] == "user"
    hh = normalise(ROWS["hh"])["preference"]
    assert [m["content"] for m in hh["prompt"]] == ["Hi"] and hh["chosen"][0]["content"] == "Hello!", "the shared prompt is split off"
    kto = normalise(ROWS["kto"])
    assert set(kto) == {"kto"} and kto["kto"]["label"] is False, "a labelled row is never an SFT row"
    assert normalise(ROWS["text"]) == {"text": {"text": "Plain text for continued pretraining."}}


def test_unknown_and_bad_rows_say_why():
    with pytest.raises(RowError, match="unknown_format"):
        normalise({"foo": 1})
    with pytest.raises(RowError, match="bad_type"):
        normalise({"instruction": "x", "output": 3})
    with pytest.raises(RowError, match="bad_type: label must be a boolean"):
        normalise({"prompt": "a", "completion": "b", "label": "maybe"})
    with pytest.raises(ValueError, match="unknown format 'sharegtp', available: auto, alpaca, sharegpt"):
        normaliser("sharegtp")


def write_all_types(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as JSONL, a JSON array, CSV (JSON cells), Parquet and a saved dataset."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": folder / "rows.jsonl", "json": folder / "rows.json", "csv": folder / "rows.csv", "parquet": folder / "rows.parquet", "datasets": folder / "saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps({"data": rows}))
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["messages"])
        w.writeheader()
        w.writerows({"messages": json.dumps(r["messages"])} for r in rows)
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_parquet(paths["parquet"])
    Dataset.from_list([{"messages": r["messages"]} for r in rows]).save_to_disk(str(paths["datasets"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_every_file_type_round_trips(tmp_path, kind):
    rows = [{"messages": [{"role": "user", "content": f"Reverse the list:\n{i} 9"}, {"role": "assistant", "content": f"9 {i}"}]} for i in range(5)]
    path = write_all_types(tmp_path, rows)[kind]
    got = list(read_source(SourceParams(name="t", path=str(path))))
    assert [r.error for r in got] == [None] * 5
    records = []
    for r in got:
        row = r.row if kind != "parquet" else {"messages": json.loads(r.row["messages"])}
        records.append(normalise(row)["sft"]["messages"])
    assert [m[1]["content"] for m in records] == [f"9 {i}" for i in range(5)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_bad_byte_loses_only_its_row(tmp_path, kind):
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    path = write_all_types(tmp_path, good)[kind]
    data = path.read_bytes()
    marker = b"q2"
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, b"q\xff2"))  # one invalid UTF-8 byte in row 3
    got = list(read_source(SourceParams(name="t", path=str(path))))
    assert len(got) == 4
    bad = [r for r in got if r.error]
    assert len(bad) == 1 and bad[0].error[0] == "invalid_utf8"
    assert "q\ufffd2" in bad[0].raw, "the quarantined raw text shows where the byte was"
    assert sorted(r.row["messages"][0]["content"] if kind != "csv" else json.loads(json.dumps(r.row["messages"]))[0]["content"] for r in got if not r.error) == ["q0", "q1", "q3"]


def test_column_mapping_renames_a_sources_columns(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("question,answer\nWhat is 2+2?,4\n")
    (row,) = read_source(SourceParams(name="faq", path=str(path), format="alpaca", columns={"instruction": "question", "output": "answer"}))
    assert normalise(row.row, "alpaca")["sft"]["messages"][-1]["content"] == "4"
