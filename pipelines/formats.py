"""Row formats: one small pure normaliser per format, each turning a raw row into canonical
records, and a registry that answers a typo with the formats it knows.

Canonical records (what prepare writes to data/prepared/, see data/README.md):
  sft         {"messages": [...], "tools": json|None}     a whole conversation ending with the assistant
  preference  {"prompt": [...], "chosen": [...], "rejected": [...]}
  kto         {"prompt": [...], "completion": [...], "label": bool}
  text        {"text": str}
Messages are {"role", "content", "tool_calls"} with roles system/user/assistant/tool and
tool_calls kept as JSON text (one parquet schema for every row); `chat_messages` turns a stored
cell back into what a chat template expects.
"""

from __future__ import annotations

import json
from collections.abc import Callable

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}


class RowError(ValueError):
    """A raw row that cannot be used. `code` is the quarantine reason; the message the detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


def message(role: str, content: object, tool_calls: object = None) -> dict:
    if role not in ROLES:
        raise RowError("bad_role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if content is None:
        content = ""
    if not isinstance(content, str):
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        else:
            raise RowError("bad_type", f"{role} content must be text, got {type(content).__name__}")
    calls = json.dumps(tool_calls, sort_keys=True) if tool_calls else None
    return {"role": role, "content": content, "tool_calls": calls}


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError("missing_field", f"missing field: {key}")
    if not isinstance(value, str):
        raise RowError("bad_type", f"{key} must be text, got {type(value).__name__}")
    return value


def _require(row: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise RowError("missing_field", f"missing field(s): {', '.join(missing)}")


def _openai_messages(raw: object) -> list[dict]:
    if not isinstance(raw, list):
        raise RowError("bad_type", f"messages must be a list, got {type(raw).__name__}")
    out = []
    for m in raw:
        if not isinstance(m, dict) or "role" not in m:
            raise RowError("bad_type", "every message must be an object with a role")
        out.append(message(m["role"], m.get("content"), m.get("tool_calls")))
    return out


def _as_messages(value: object, role: str) -> list[dict]:
    """A prompt/answer given as a string or as a list of messages."""
    if isinstance(value, str):
        return [message(role, value)]
    if isinstance(value, dict) and "role" in value:
        return _openai_messages([value])
    return _openai_messages(value)


def alpaca(row: dict) -> dict:
    _require(row, "instruction", "output")
    instruction, extra = _text(row, "instruction"), row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("bad_type", f"input must be text, got {type(extra).__name__}")
    messages = [message("system", row["system"])] if row.get("system") else []
    for turn in row.get("history") or []:  # [[user, assistant], ...]
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RowError("bad_type", "history must be a list of [instruction, answer] pairs")
        messages += [message("user", turn[0]), message("assistant", turn[1])]
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    return {"sft": {"messages": [*messages, message("user", user), message("assistant", _text(row, "output"))], "tools": None}}


def sharegpt(row: dict) -> dict:
    _require(row, "conversations")
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("bad_type", "conversations must be a list")
    messages = [message("system", row["system"])] if row.get("system") else []
    for t in turns:
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RowError("missing_field", "every ShareGPT turn needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise RowError("bad_role", f"unknown ShareGPT speaker {t['from']!r}")
        if t["from"] == "function_call":  # the call itself, as an OpenAI tool call
            call = t["value"] if isinstance(t["value"], dict) else _json_or(t["value"])
            messages.append(message("assistant", "", [{"type": "function", "function": {"name": call.get("name", ""), "arguments": json.dumps(call.get("arguments", {}))}}]))
        else:
            messages.append(message(role, t["value"]))
    tools = row.get("tools")
    return {"sft": {"messages": messages, "tools": tools if isinstance(tools, str) or tools is None else json.dumps(tools)}}


def _json_or(value: object) -> dict:
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise RowError("bad_type", "a function_call turn must hold JSON") from None
    if not isinstance(parsed, dict):
        raise RowError("bad_type", "a function_call turn must hold a JSON object")
    return parsed


def openai(row: dict) -> dict:
    _require(row, "messages")
    messages = _openai_messages(row["messages"])
    tools = row.get("tools")
    if "label" in row:  # unpaired preference (KTO): the last assistant turn is judged
        return kto(row)
    return {"sft": {"messages": messages, "tools": tools if isinstance(tools, str) or tools is None else json.dumps(tools)}}


def prompt_completion(row: dict) -> dict:
    _require(row, "prompt", "completion")
    if "label" in row:
        return kto(row)
    return {"sft": {"messages": [*_as_messages(row["prompt"], "user"), *_as_messages(row["completion"], "assistant")], "tools": None}}


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Anthropic-HH style pairs: two whole conversations that share everything but the end."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def preference(row: dict) -> dict:
    _require(row, "chosen", "rejected")
    chosen, rejected = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "user")
    elif len(chosen) > 1:
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
    else:
        raise RowError("missing_field", "missing field(s): prompt")
    if row.get("system") and not any(m["role"] == "system" for m in prompt):
        prompt = [message("system", row["system"]), *prompt]
    return {"preference": {"prompt": prompt, "chosen": chosen, "rejected": rejected}}


def kto(row: dict) -> dict:
    label = row.get("label")
    if not isinstance(label, bool):
        if label in (0, 1) and not isinstance(label, float):
            label = bool(label)
        elif isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        else:
            raise RowError("bad_type", f"label must be a boolean, got {label!r}")
    if "messages" in row:
        messages = _openai_messages(row["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("bad_turns", "a labelled conversation must end with the assistant turn that is judged")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        _require(row, "prompt", "completion")
        prompt, completion = _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
    return {"kto": {"prompt": prompt, "completion": completion, "label": label}}


def text(row: dict) -> dict:
    return {"text": {"text": _text(row, "text")}}


FORMATS: dict[str, Callable[[dict], dict]] = {
    "alpaca": alpaca, "sharegpt": sharegpt, "openai": openai, "prompt_completion": prompt_completion,
    "preference": preference, "kto": kto, "text": text,
}


def detect(row: dict) -> str:
    """The format of a row, by its keys."""
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "label" in row:
        return "kto"
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise RowError("unknown_format", f"unknown row format with keys {sorted(row)[:8]}; known formats: {', '.join(FORMATS)}")


def normaliser(name: str) -> Callable[[dict], dict] | None:
    """The normaliser of a format name, None for 'auto'; a typo names the known formats."""
    if name == "auto":
        return None
    if name not in FORMATS:
        raise ValueError(f"unknown format '{name}', available: auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def normalise(row: object, fmt: str = "auto") -> dict:
    """{table: record} for one raw row."""
    if not isinstance(row, dict):
        raise RowError("bad_type", f"a row must be an object, got {type(row).__name__}")
    return (normaliser(fmt) or FORMATS[detect(row)])(row)


def chat_messages(cell) -> list[dict]:
    """A stored messages cell (parquet list of structs) as chat-template-ready dicts: role and
    content, and tool_calls parsed back from JSON only when present."""
    out = []
    for m in cell:
        m = dict(m)
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = json.loads(m["tool_calls"])
        out.append(msg)
    return out
