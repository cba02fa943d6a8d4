"""SFT reads the prepared table as pandas 3 gives it back: a `tools` column with gaps is str
dtype holding NaN, and a row without tools must train like one with None (recipe [sft, kto]
with tool-calling data crashed on json.loads(NaN))."""

from __future__ import annotations

import json

import pandas as pd

from pipelines.bootstrap import train_tokenizer
from pipelines.sft import to_dataset


def test_a_tools_column_with_gaps_tokenises(tmp_path):
    """Seen red: to_dataset with `json.loads(t) if t else None` (main) -> "TypeError: the JSON
    object must be str, bytes or bytearray, not float"."""
    tools = json.dumps([{"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}])
    call = json.dumps([{"type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}])
    rows = [
        {"messages": [{"role": "user", "content": "Look up x", "tool_calls": None}, {"role": "assistant", "content": "", "tool_calls": call},
                      {"role": "tool", "content": "42", "tool_calls": None}, {"role": "assistant", "content": "It is 42.", "tool_calls": None}], "tools": tools},
        {"messages": [{"role": "user", "content": "Reverse the list:\n1 2", "tool_calls": None}, {"role": "assistant", "content": "2 1", "tool_calls": None}], "tools": None},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "sft_train.parquet", index=False)
    frame = pd.read_parquet(tmp_path / "sft_train.parquet")
    assert isinstance(frame["tools"].iloc[1], float), "pandas 3 gives the gap back as NaN"
    tokenizer = train_tokenizer(["Look up x", "It is 42.", "Reverse the list:\n1 2", "2 1"], 300)
    data = to_dataset(frame, tokenizer, "all_assistant")
    assert len(data) == 2 and all(sum(mask) > 0 for mask in data["assistant_masks"]), "both rows carry the loss on their answers"
