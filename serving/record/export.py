"""A window of the record as a dataset: OpenAI `messages` JSONL (the request's conversation, the
answer as the last, assistant, turn) that `data.sources` reads as format `openai`, with where
each row came from beside it. The key id is left out: an exported file is training data, and a
key's later `lifecycle forget` cannot reach into it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from serving.record.schema import Row


def prompt_messages(row: Row) -> list[dict]:
    """The stored prompt as messages: a chat's own, a text completion's prompt as one user turn
    (a list of prompts: the first, which the first choice answered)."""
    prompt = json.loads(row.prompt)
    if row.endpoint == "chat":
        return [m for m in prompt if isinstance(m, dict)] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return [{"role": "user", "content": prompt if isinstance(prompt, str) else json.dumps(prompt)}]


def dataset_row(row: Row) -> dict:
    out = {
        "messages": [*prompt_messages(row), {"role": "assistant", "content": row.answer or ""}],
        "completion_id": row.id,
        "version": row.version,
        "tier": row.tier,
        "model": row.model,
        "finish_reason": row.finish_reason,
        "created": datetime.fromtimestamp(row.ts, timezone.utc).isoformat(timespec="seconds"),
    }
    tools = json.loads(row.params).get("tools")
    if tools:
        out["tools"] = tools
    return out


def write_jsonl(path: Path, rows: Iterable[Row]) -> int:
    """Write the rows to `path` (replaced whole, atomically); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    n = 0
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(dataset_row(row), ensure_ascii=False) + "\n")
            n += 1
    os.replace(partial, path)
    return n
