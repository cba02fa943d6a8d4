"""Row formats: one small pure normaliser per row shape, each turning a raw row into one
canonical record, and a registry that answers a typo with the formats it knows.

Canonical records (what prepare writes to data/prepared/, see data/README.md):
  sft         {"messages": [...], "tools": json|None}     a whole conversation ending with the assistant
  preference  {"prompt": [...], "chosen": [...], "rejected": [...]}
  kto         {"prompt": [...], "completion": [...], "label": bool}
  text        {"text": str}
Messages are {"role", "content", "tool_calls"} with roles system/user/assistant/tool and
tool_calls kept as JSON text (one parquet schema for every row); `chat_messages` turns a stored
cell back into what a chat template expects.

A row's shape (Alpaca `instruction`, ShareGPT `conversations`, OpenAI `messages`, `prompt` /
`completion`, bare `chosen`/`rejected` pairs, `text`) says how its turns are spelled; its keys
say which table it belongs to, whatever the shape, as in LLaMA-Factory's dataset_info.json
conventions: `chosen` + `rejected` make a preference pair, a `kto_tag` (or `label`) makes a
KTO row, anything else is SFT. A `Convention` carries the rest of those conventions for a
source: `ranking` (every row must be a pair), the ShareGPT `tags` (which keys hold a turn's
speaker and text, which speaker names mean user, assistant, tool result, function call and
system) and the column names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
FUNCTION_CALL = "function_call"  # a ShareGPT speaker whose turn is the assistant's tool call
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": FUNCTION_CALL, "observation": "tool", "tool": "tool", "function": "tool"}
# LLaMA-Factory's column names, per formatting, for the fields our normalisers read.
LF_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"}, "sharegpt": {"messages": "conversations"}}
LF_COLUMN_NAMES = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag")


class RowError(ValueError):
    """A raw row that cannot be used. `code` is the quarantine reason; the message the detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True)
class Tags:
    """LLaMA-Factory's ShareGPT `tags` (defaults: its own). The common spellings (human/user,
    gpt/assistant, observation/tool, function_call, system) are understood whatever the tags."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"

    def speakers(self) -> dict[str, str]:
        return {**SHAREGPT_ROLES, self.user_tag: "user", self.assistant_tag: "assistant", self.observation_tag: "tool",
                self.function_tag: FUNCTION_CALL, self.system_tag: "system"}


@dataclass(frozen=True)
class Convention:
    """How one source (or one file, by its dataset_info.json entry) spells its rows."""

    format: str = "auto"
    ranking: bool = False  # every row is a preference pair: one without chosen/rejected is refused
    tags: Tags = Tags()
    renames: dict[str, str] = field(default_factory=dict, hash=False)  # our field -> the file's column

    @classmethod
    def declared(cls, fmt: str = "auto", ranking: bool = False, tags: dict | None = None, columns: dict | None = None) -> "Convention":
        """From LLaMA-Factory-style declarations: column keys may be LLaMA-Factory's names
        (prompt/query/response for Alpaca, messages for ShareGPT) or our own field names."""
        aliases = {"query": "input", "response": "output", **LF_COLUMNS.get(fmt, {})}  # query/response are unambiguous
        renames = {aliases.get(k, k): v for k, v in (columns or {}).items()}
        return cls(fmt, ranking, Tags(**(tags or {})), renames)

    def rename(self, row: object) -> object:
        """The row with the file's column names turned into ours (all at once: swaps work)."""
        if not self.renames or not isinstance(row, dict):
            return row
        moved = {ours: row[theirs] for ours, theirs in self.renames.items() if theirs in row}
        kept = {k: v for k, v in row.items() if k not in self.renames.values()}
        return {**kept, **moved}


DEFAULT = Convention()


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
    calls = tool_calls if isinstance(tool_calls, str) and tool_calls else json.dumps(tool_calls, sort_keys=True) if tool_calls else None
    return {"role": role, "content": content, "tool_calls": calls}


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(row: dict, key: str) -> str:
    if not _present(row, key):
        raise RowError("missing_field", f"missing field: {key}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError("bad_type", f"{key} must be text, got {type(value).__name__}")
    return value


def _require(row: dict, *keys: str) -> None:
    missing = [k for k in keys if not _present(row, k)]
    if missing:
        raise RowError("missing_field", f"missing field(s): {', '.join(missing)}")


def _label(row: dict) -> bool | None:
    """The KTO label (`kto_tag`, LLaMA-Factory's name, or `label`), None when the row has none."""
    key = "kto_tag" if _present(row, "kto_tag") else "label" if _present(row, "label") else None
    if key is None:
        return None
    label = row[key]
    if isinstance(label, bool):
        return label
    if label in (0, 1) and not isinstance(label, float):
        return bool(label)
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        return label.strip().lower() == "true"
    raise RowError("bad_type", f"{key} must be a boolean, got {label!r}")


def _tools(row: dict) -> str | None:
    tools = row.get("tools")
    if tools is None or (isinstance(tools, float) and math.isnan(tools)) or tools == "" or tools == []:
        return None
    return tools if isinstance(tools, str) else json.dumps(tools)


def _function_call(value: object) -> dict:
    """A ShareGPT function_call turn ({"name", "arguments"} or a list of them, as JSON text or
    objects) as an assistant message with OpenAI tool calls."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise RowError("bad_type", "a function_call turn must hold JSON") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise RowError("bad_type", "a function_call turn must hold a JSON object (or a list of them)")
    out = []
    for c in calls:
        args = c.get("arguments", {})
        out.append({"type": "function", "function": {"name": c.get("name", ""), "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return message("assistant", "", out)


def _turn(t: object, tags: Tags) -> dict:
    """One ShareGPT turn as a message."""
    if not isinstance(t, dict) or tags.role_tag not in t or tags.content_tag not in t:
        raise RowError("missing_field", f"every ShareGPT turn needs '{tags.role_tag}' and '{tags.content_tag}'")
    speaker = t[tags.role_tag]
    role = tags.speakers().get(speaker)
    if role is None:
        raise RowError("bad_role", f"unknown ShareGPT speaker {speaker!r} (user_tag {tags.user_tag!r}, assistant_tag {tags.assistant_tag!r}, observation_tag {tags.observation_tag!r}, function_tag {tags.function_tag!r})")
    if role == FUNCTION_CALL:
        return _function_call(t[tags.content_tag])
    return message(role, t[tags.content_tag])


def _messages(raw: object, tags: Tags, default_role: str) -> list[dict]:
    """A prompt or an answer given as text, one message or a list of messages, in OpenAI
    ({role, content}) or ShareGPT ({from, value}, per `tags`) spelling."""
    if isinstance(raw, str):
        return [message(default_role, raw)]
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise RowError("bad_type", f"messages must be a list, got {type(raw).__name__}")
    out = []
    for m in items:
        if isinstance(m, dict) and "role" in m:
            out.append(message(m["role"], m.get("content"), m.get("tool_calls")))
        elif isinstance(m, dict) and tags.role_tag in m:
            out.append(_turn(m, tags))
        else:
            raise RowError("bad_type", f"every message must be an object with a role ('role' or '{tags.role_tag}')")
    return out


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    if _present(row, "system") and not any(m["role"] == "system" for m in messages):
        return [message("system", _text(row, "system")), *messages]
    return messages


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Anthropic-HH style pairs: two whole conversations that share everything but the end."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _table(row: dict, prompt: list[dict], answer: list[dict] | None, conv: Convention) -> dict:
    """Which table the row belongs to, by its keys: a pair, a labelled answer, or SFT. With no
    separate answer the conversation's last turn is the answer."""
    label = _label(row)
    if _present(row, "chosen") or _present(row, "rejected"):
        _require(row, "chosen", "rejected")
        chosen, rejected = _messages(row["chosen"], conv.tags, "assistant"), _messages(row["rejected"], conv.tags, "assistant")
        if not prompt and len(chosen) > 1:
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        return {"preference": {"prompt": prompt, "chosen": chosen, "rejected": rejected}}
    if conv.ranking:
        raise RowError("missing_field", "a ranking source's rows need 'chosen' and 'rejected'")
    if label is not None:
        if answer is None:
            if not prompt or prompt[-1]["role"] != "assistant":
                raise RowError("bad_turns", "a labelled conversation must end with the assistant turn that is judged")
            prompt, answer = prompt[:-1], prompt[-1:]
        return {"kto": {"prompt": prompt, "completion": answer, "label": label}}
    return {"sft": {"messages": [*prompt, *(answer or [])], "tools": _tools(row)}}


# ---------------------------------------------------------------- shapes


def alpaca(row: dict, conv: Convention = DEFAULT) -> dict:
    """instruction [+ input] with output (SFT), chosen/rejected (a pair) or output + kto_tag."""
    _require(row, "instruction")
    instruction, extra = _text(row, "instruction"), _text(row, "input") if _present(row, "input") else ""
    messages = []
    for turn in row["history"] if _present(row, "history") else []:  # [[user, assistant], ...]
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RowError("bad_type", "history must be a list of [instruction, answer] pairs")
        messages += [message("user", turn[0]), message("assistant", turn[1])]
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    prompt = _with_system(row, [*messages, message("user", user)])
    pair = _present(row, "chosen") or _present(row, "rejected")
    answer = None if pair else [message("assistant", _text(row, "output"))]
    return _table(row, prompt, answer, conv)


def sharegpt(row: dict, conv: Convention = DEFAULT) -> dict:
    """`conversations` of {from, value} turns (or `messages` spelled so); a first turn from the
    system tag is the system prompt and wins over a `system` column."""
    key = "conversations" if "conversations" in row else "messages"
    _require(row, key)
    turns = row[key]
    if not isinstance(turns, list):
        raise RowError("bad_type", f"{key} must be a list")
    messages = [_turn(t, conv.tags) for t in turns]
    return _table(row, _with_system(row, messages), None, conv)


def openai(row: dict, conv: Convention = DEFAULT) -> dict:
    _require(row, "messages")
    turns = row["messages"]
    if not isinstance(turns, list):
        raise RowError("bad_type", f"messages must be a list, got {type(turns).__name__}")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" not in turns[0] and conv.tags.role_tag in turns[0]:
        return sharegpt(row, conv)  # ShareGPT turns under a `messages` column
    return _table(row, _with_system(row, _messages(turns, conv.tags, "user")), None, conv)


def prompt_completion(row: dict, conv: Convention = DEFAULT) -> dict:
    _require(row, "prompt")
    prompt = _with_system(row, _messages(row["prompt"], conv.tags, "user"))
    pair = _present(row, "chosen") or _present(row, "rejected")
    answer = None if pair else _messages(row["completion"], conv.tags, "assistant") if _present(row, "completion") else None
    if answer is None and not pair:
        raise RowError("missing_field", "missing field(s): completion")
    return _table(row, prompt, answer, conv)


def pairs(row: dict, conv: Convention = DEFAULT) -> dict:
    """Bare chosen/rejected conversations (Anthropic HH): the shared beginning is the prompt."""
    _require(row, "chosen", "rejected")
    return _table(row, [], None, conv)


def text(row: dict, conv: Convention = DEFAULT) -> dict:
    return {"text": {"text": _text(row, "text")}}


SHAPES: dict[str, Callable[[dict, Convention], dict]] = {
    "alpaca": alpaca, "sharegpt": sharegpt, "openai": openai, "prompt_completion": prompt_completion, "text": text,
}


def shape(row: dict) -> str:
    """The shape of a row, by its keys (the table is decided by the normaliser)."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "text" in row:
        return "text"
    raise RowError("unknown_format", f"unknown row format with keys {sorted(row)[:8]}; known formats: {', '.join(FORMATS)}")


def _as_table(table: str, key: str) -> Callable[[dict, Convention], dict]:
    """A format that names a table (preference, kto): any shape, and the row must belong there."""

    def normalise_as(row: dict, conv: Convention = DEFAULT) -> dict:
        kind = shape(row)
        out = (pairs if kind == "pairs" else SHAPES[kind])(row, conv)
        if table not in out:
            raise RowError("missing_field", f"a {table} row needs {key}")
        return out

    return normalise_as


preference = _as_table("preference", "'chosen' and 'rejected'")
kto = _as_table("kto", "a boolean 'label' (or 'kto_tag')")

FORMATS: dict[str, Callable[[dict, Convention], dict]] = {**SHAPES, "preference": preference, "kto": kto}


def detect(row: dict) -> str:
    """The format name auto-detection picks for a row."""
    kind = shape(row)
    return "preference" if kind == "pairs" else kind


def normaliser(name: str) -> Callable[[dict, Convention], dict] | None:
    """The normaliser of a format name, None for 'auto'; a typo names the known formats."""
    if name == "auto":
        return None
    if name not in FORMATS:
        raise ValueError(f"unknown format '{name}', available: auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def normalise(row: object, fmt: str | Convention = "auto") -> dict:
    """{table: record} for one raw row, read with a format name or a whole Convention."""
    conv = fmt if isinstance(fmt, Convention) else Convention(format=fmt)
    if not isinstance(row, dict):
        raise RowError("bad_type", f"a row must be an object, got {type(row).__name__}")
    return (normaliser(conv.format) or FORMATS[detect(row)])(row, conv)


def tool_calls_of(cell: object) -> list | None:
    """A stored tool_calls (or tools) cell as JSON, None when empty: pandas 3 reads a string
    column with gaps as str dtype holding NaN, a float that is truthy."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell == "":
        return None
    return json.loads(cell) if isinstance(cell, str) else cell


def chat_messages(cell) -> list[dict]:
    """A stored messages cell (parquet list of structs) as chat-template-ready dicts: role and
    content, and tool_calls parsed back from JSON only when present."""
    out = []
    for m in cell:
        m = dict(m)
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if (calls := tool_calls_of(m.get("tool_calls"))) is not None:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def strings_in(obj: object) -> list[str]:
    """Every string leaf of a JSON value, JSON text inside it parsed too."""
    if isinstance(obj, str):
        try:  # tool-call arguments are JSON text inside JSON
            inner = json.loads(obj) if obj[:1] in "[{" else None
        except json.JSONDecodeError:
            inner = None
        return strings_in(inner) if isinstance(inner, (dict, list)) else [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_in(v)]
    return []


def message_texts(m: dict) -> list[str]:
    """Every text a message carries: its content and each string inside its tool calls (names
    and arguments, which are JSON inside JSON)."""
    calls = tool_calls_of(m.get("tool_calls"))
    return [m.get("content") or "", *(strings_in(calls) if calls else [])]


def map_strings(obj: object, fn: Callable[[str], str]) -> object:
    """`obj` with `fn` applied to every string leaf, JSON text inside it included (re-encoded)."""
    if isinstance(obj, str):
        try:
            inner = json.loads(obj) if obj[:1] in "[{" else None
        except json.JSONDecodeError:
            inner = None
        return json.dumps(map_strings(inner, fn), sort_keys=True) if isinstance(inner, (dict, list)) else fn(obj)
    if isinstance(obj, dict):
        return {k: map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_strings(v, fn) for v in obj]
    return obj
