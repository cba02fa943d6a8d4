"""Rows in the shapes of LLaMA-Factory's demo sets (data/*.json and their dataset_info.json
entries in hiyouga/LLaMA-Factory), a few each, written here: no network.

- dpo_en_demo.json: a JSON array; `conversations` of {from, value} turns (human/gpt, some
  starting with a `system` turn, some multi-turn ending with the human), `chosen` and
  `rejected` as single {from: gpt, value} objects. Entry: formatting sharegpt, ranking true.
- kto_en_demo.json: `messages` of {role, content} (user/assistant, some multi-turn) and a
  boolean `label`. Entry: formatting sharegpt, columns {messages: messages, kto_tag: label},
  tags role/content/user/assistant.
- glaive_toolcall_en_demo.json: `conversations` with human/gpt/function_call/observation turns
  (function_call values are JSON text {"name", "arguments": {...}}), `tools` as JSON text.
- Alpaca preference (README "Preference Dataset"): instruction, input, chosen, rejected strings.
- KTO in ShareGPT (README "KTO Dataset"): conversations + a boolean kto_tag.
"""

from __future__ import annotations

import json

SIGN_OFF = "You're welcome! If you have any other questions, feel free to ask."

DPO = [
    {"conversations": [{"from": "human", "value": "Suggest a name for a bakery that sells sourdough."}],
     "chosen": {"from": "gpt", "value": "How about 'Rise & Crumb'? It hints at the slow rise of sourdough."},
     "rejected": {"from": "gpt", "value": "Bakery."}},
    {"conversations": [{"from": "system", "value": "You are a careful travel assistant."},
                       {"from": "human", "value": "Is a passport needed to fly from Lisbon to Porto?"}],
     "chosen": {"from": "gpt", "value": "No: it is a domestic flight, though the airline may ask for photo ID."},
     "rejected": {"from": "gpt", "value": "Yes, always, for every flight anywhere."}},
    {"conversations": [{"from": "human", "value": "What is the plural of cactus?"},
                       {"from": "gpt", "value": "Cacti, or cactuses."},
                       {"from": "human", "value": "And of octopus?"}],
     "chosen": {"from": "gpt", "value": "Octopuses is standard; octopodes is rare, octopi is common but disputed."},
     "rejected": {"from": "gpt", "value": "Octopussies."}},
]

KTO = [
    {"messages": [{"content": "Classify the headline 'Stocks rally after rate cut' as World, Sports, Business or Sci/Tech.", "role": "user"},
                  {"content": "Business.", "role": "assistant"}], "label": True},
    {"messages": [{"content": "Translate 'good night' into French.", "role": "user"},
                  {"content": "Bonjour.", "role": "assistant"}], "label": False},
    {"messages": [{"content": "Give me a word that rhymes with cat.", "role": "user"}, {"content": "Hat.", "role": "assistant"},
                  {"content": "Another one, please.", "role": "user"}, {"content": "Mat.", "role": "assistant"}], "label": True},
]

GLAIVE = [
    {"conversations": [
        {"from": "human", "value": "Can you find a recipe with chicken and rice?"},
        {"from": "function_call", "value": json.dumps({"name": "search_recipes", "arguments": {"ingredients": ["chicken", "rice"]}})},
        {"from": "observation", "value": json.dumps({"recipes": [{"name": "Chicken fried rice"}]})},
        {"from": "gpt", "value": "I found one: chicken fried rice."},
        {"from": "human", "value": "Thanks for the help."},
        {"from": "gpt", "value": SIGN_OFF}],
     "tools": json.dumps([{"name": "search_recipes", "description": "Search recipes by ingredients", "parameters": {"type": "object", "properties": {"ingredients": {"type": "array", "items": {"type": "string"}}}}}])},
    {"conversations": [
        {"from": "human", "value": "Please call my dentist and book a cleaning."},
        {"from": "gpt", "value": "I'm sorry, but I can't make phone calls: my functions are limited to the tools provided."}],
     "tools": json.dumps([{"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])},
]

ALPACA_PREFERENCE = [
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the budget.",
     "chosen": "The budget was approved by the committee.", "rejected": "The committee approves budgets."},
    {"instruction": "Name a prime number between 20 and 30.", "input": "", "chosen": "23", "rejected": "25"},
]

SHAREGPT_KTO = [
    {"conversations": [{"from": "human", "value": "What is the capital of Australia?"}, {"from": "gpt", "value": "Canberra."}], "kto_tag": True},
    {"conversations": [{"from": "human", "value": "What is the capital of Canada?"}, {"from": "gpt", "value": "Toronto."}], "kto_tag": False},
]

# dataset_info.json entries as LLaMA-Factory declares its demo sets.
DATASET_INFO = {
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt", "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
}

FILES = {"dpo_en_demo.json": DPO, "kto_en_demo.json": KTO, "glaive_toolcall_en_demo.json": GLAIVE}


def write_demo_folder(folder, with_info: bool = True) -> None:
    """LLaMA-Factory's data/ folder in miniature: its demo files as pretty-printed JSON arrays
    (as they ship) and, optionally, their dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in FILES.items():
        (folder / name).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    if with_info:
        (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
