"""The canary's golden prompts: held-out prompts a probe can send alone, with their answers."""

from __future__ import annotations

import pandas as pd

from serving.canary import golden_prompts


def turn(role: str, content: str, tool_calls=None) -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls}


# Seen red: the old `(m[0], m[1])` took the system prompt as the question and the user's turn as
# the answer for the second row, and the first turns of the multi-turn one.
def test_only_single_turn_conversations_are_golden(tmp_path):
    rows = [
        [turn("user", "Reverse the list:\n1 2 3"), turn("assistant", "3 2 1")],
        [turn("system", "Digits only."), turn("user", "Reverse the list:\n4 5 6"), turn("assistant", "6 5 4")],
        [turn("user", "Reverse the list:\n1 2"), turn("assistant", "2 1"), turn("user", "And 7 8 9?"), turn("assistant", "9 8 7")],
        [turn("user", "Weather in Paris?"), turn("assistant", "", tool_calls='[{"name": "weather", "arguments": "{}"}]')],
        [turn("user", "Reverse the list:\n0 9 8"), turn("assistant", "8 9 0")],
    ]
    path = tmp_path / "sft_test.parquet"
    pd.DataFrame({"messages": rows}).to_parquet(path, index=False)
    assert golden_prompts(path, 5) == [("Reverse the list:\n1 2 3", "3 2 1"), ("Reverse the list:\n0 9 8", "8 9 0")]
    assert golden_prompts(path, 1) == [("Reverse the list:\n1 2 3", "3 2 1")]
