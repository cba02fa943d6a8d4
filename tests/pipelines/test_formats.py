"""Every row format and file type reaches the canonical schema through the prepare stage's own
readers; multi-turn, system and tool turns survive; KTO labels stay labels; LLaMA-Factory's
demo shapes and dataset_info.json conventions are understood; a bad byte, a byte-order mark or
one bad element of a JSON array costs at most its own row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.data_config import SourceParams
from pipelines.formats import Convention, RowError, chat_messages, normalise, normaliser, tool_calls_of
from pipelines.sources import SourceError, read_source
from tests.pipelines import llamafactory_rows as lf

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


# ---------------------------------------------------------------- LLaMA-Factory's conventions


def test_llamafactory_demo_shapes_are_detected_into_their_tables():
    """Seen red: detection sending chosen/rejected rows to the old preference normaliser (OpenAI
    messages only) -> bad_type on the first dpo row, as on main (0 of 300 pairs)."""
    pairs = [normalise(r)["preference"] for r in lf.DPO]
    assert len(pairs) == 3
    assert [m["role"] for m in pairs[1]["prompt"]] == ["system", "user"] and pairs[1]["chosen"][0]["content"].startswith("No:")
    assert [m["role"] for m in pairs[2]["prompt"]] == ["user", "assistant", "user"], "the whole conversation is the prompt"
    assert pairs[0]["chosen"][0]["role"] == pairs[0]["rejected"][0]["role"] == "assistant"

    kto = [normalise(r)["kto"] for r in lf.KTO]
    assert [k["label"] for k in kto] == [True, False, True]
    assert [m["content"] for m in kto[2]["prompt"]] == ["Give me a word that rhymes with cat.", "Hat.", "Another one, please."] and kto[2]["completion"][0]["content"] == "Mat."

    tool = normalise(lf.GLAIVE[0])["sft"]
    assert [m["role"] for m in tool["messages"]] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    call = json.loads(tool["messages"][1]["tool_calls"])[0]["function"]
    assert call["name"] == "search_recipes" and json.loads(call["arguments"]) == {"ingredients": ["chicken", "rice"]}
    assert json.loads(tool["tools"])[0]["name"] == "search_recipes"

    alpaca_pairs = [normalise(r)["preference"] for r in lf.ALPACA_PREFERENCE]
    assert alpaca_pairs[0]["prompt"][0]["content"] == "Rewrite the sentence in the passive voice.\nThe committee approved the budget."
    assert alpaca_pairs[1]["chosen"][0]["content"] == "23"

    sharegpt_kto = [normalise(r) for r in lf.SHAREGPT_KTO]
    assert [set(r) for r in sharegpt_kto] == [{"kto"}, {"kto"}], "a labelled ShareGPT row is a KTO row, never SFT"
    assert sharegpt_kto[1]["kto"]["label"] is False and sharegpt_kto[1]["kto"]["completion"][0]["content"] == "Toronto."
    alpaca_kto = normalise({"instruction": "2 + 2?", "output": "5", "kto_tag": "false"})
    assert alpaca_kto["kto"]["label"] is False and alpaca_kto["kto"]["completion"][0]["content"] == "5"


def test_declared_conventions_ranking_tags_and_llamafactory_column_names():
    # a ranking source: a row without a pair is refused, not trained as SFT
    with pytest.raises(RowError, match="missing_field: a ranking source's rows need 'chosen' and 'rejected'"):
        normalise({"instruction": "x", "output": "y"}, Convention.declared("alpaca", ranking=True))
    # custom ShareGPT tags
    conv = Convention.declared("sharegpt", tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"})
    row = {"conversations": [{"speaker": "customer", "text": "Where is my order?"}, {"speaker": "agent", "text": "It ships today."}]}
    assert [m["role"] for m in normalise(row, conv)["sft"]["messages"]] == ["user", "assistant"]
    with pytest.raises(RowError, match="bad_role: unknown ShareGPT speaker 'bot'"):
        normalise({"conversations": [{"speaker": "customer", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}, conv)
    # LLaMA-Factory's column names: prompt/query/response for alpaca, messages for sharegpt
    alpaca = Convention.declared("alpaca", columns={"prompt": "question", "query": "context", "response": "answer"})
    raw = alpaca.rename({"question": "Summarise:", "context": "A long text.", "answer": "Short."})
    assert [m["content"] for m in normalise(raw, alpaca)["sft"]["messages"]] == ["Summarise:\nA long text.", "Short."]
    kto = Convention.declared("sharegpt", columns={"messages": "messages", "kto_tag": "label"}, tags=lf.DATASET_INFO["kto_en_demo"]["tags"])
    assert normalise(kto.rename(lf.KTO[1]), kto)["kto"]["label"] is False


def test_a_folders_dataset_info_json_declares_its_files(tmp_path):
    """LLaMA-Factory's data folder, read as a source: each file by its entry."""
    lf.write_demo_folder(tmp_path / "lf")
    (tmp_path / "lf" / "c4_demo.jsonl").write_text(json.dumps({"text": "A document for pre-training."}) + "\n")
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    info["c4_demo"] = {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}}  # LLaMA-Factory's pre-training declaration
    (tmp_path / "lf" / "dataset_info.json").write_text(json.dumps(info))
    got = list(read_source(SourceParams(name="lf", path=str(tmp_path / "lf"))))
    assert not any(r.error for r in got) and not any(r.file.endswith("dataset_info.json") for r in got), "the declarations are not data"
    tables = {}
    for r in got:
        (table,) = normalise(r.row, r.convention)
        tables.setdefault(Path(r.file).name, []).append(table)
    assert tables == {"c4_demo.jsonl": ["text"], "dpo_en_demo.json": ["preference"] * 3, "glaive_toolcall_en_demo.json": ["sft"] * 2, "kto_en_demo.json": ["kto"] * 3}
    dpo = next(r for r in got if r.file.endswith("dpo_en_demo.json"))
    assert dpo.convention.ranking and dpo.convention.format == "sharegpt"
    # a bad entry names the file and the key
    info["c4_demo"]["colums"] = {}
    (tmp_path / "lf" / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(SourceError, match=r"dataset_info.json: entry 'c4_demo': colums: Extra inputs"):
        list(read_source(SourceParams(name="lf", path=str(tmp_path / "lf"))))


# ---------------------------------------------------------------- what a file may hold


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_dropped_not_a_bad_first_row(tmp_path, kind):
    """Seen red: _decode without removeprefix(BOM) -> red for jsonl, json and csv alike."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    path = write_all_types(tmp_path, rows)[kind]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    got = list(read_source(SourceParams(name="t", path=str(path))))
    assert [r.error for r in got] == [None] * 3
    assert [normalise(r.row if kind != "csv" else {"messages": r.row["messages"]})["sft"]["messages"][0]["content"] for r in got] == ["q0", "q1", "q2"]


def test_one_bad_element_of_a_json_array_costs_only_itself(tmp_path):
    """Seen red: the old read_json (the whole file one malformed row) -> "one raw row per
    element: assert 1 == 5000"."""
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(5000)]
    text = json.dumps(rows, indent=2)
    bad = text.replace('"instruction": "Question 1234?",', '"instruction": "Question 1234?" "oops",', 1)  # a missing comma inside one element
    path = tmp_path / "big.json"
    path.write_text(bad)
    got = list(read_source(SourceParams(name="t", path=str(path))))
    assert len(got) == 5000, "one raw row per element"
    errors = [r for r in got if r.error]
    assert len(errors) == 1 and errors[0].line == 1235 and errors[0].error[0] == "malformed_json"
    assert "array element 1235 (line" in errors[0].error[1] and "Question 1234" in errors[0].raw
    assert [r.row["output"] for r in got if not r.error][1233:1235] == ["Answer 1233.", "Answer 1235."]
    # a compact one-line array and a trailing comma recover the same way
    path.write_text('[{"text": "a"}, {"text": "b",}, {"text": "c"},]')
    assert [(r.error or ("ok",))[0] for r in read_source(SourceParams(name="t", path=str(path)))] == ["ok", "malformed_json", "ok"]


def test_a_json_file_whose_rows_cannot_be_told_apart_stops_the_source(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": "unterminated}]\n')
    with pytest.raises(SourceError, match=r"broken.json: not valid JSON \(.*\), and its brackets or quotes do not balance, so its rows cannot be told apart \(2 array element\(s\) before that point\)"):
        list(read_source(SourceParams(name="t", path=str(path))))
    path.write_text('{"data": [1, 2,, 3]}')
    with pytest.raises(SourceError, match="the file is not a JSON array"):
        list(read_source(SourceParams(name="t", path=str(path))))


def test_stored_cells_with_pandas_gaps_read_as_empty(tmp_path):
    """pandas 3 reads a string column with gaps as str dtype holding NaN (truthy)."""
    pd.DataFrame({"tools": ['[{"name": "x"}]', None]}).to_parquet(tmp_path / "t.parquet")
    column = pd.read_parquet(tmp_path / "t.parquet")["tools"]
    assert isinstance(column.iloc[1], float), "the shape this guards against"
    assert [tool_calls_of(c) for c in column] == [[{"name": "x"}], None]
    assert chat_messages([{"role": "assistant", "content": "hi", "tool_calls": float("nan")}]) == [{"role": "assistant", "content": "hi"}]
