"""Stage `generate`: the embedded demo data, made by a seeded generator (same seed, same bytes).

The task is one a tiny model can really learn in well under a minute on two CPU cores:
reverse a list of 3-5 digits. It is written in real-world formats, with the noise real data
has, so that `prepare` has work to do. It writes only its own folder, data/generated/ (a
user's files live in data/raw/ and are never touched):

- alpaca.jsonl      instruction / input / output rows (Alpaca style)
- chat.jsonl        {"messages": [...]} rows (OpenAI chat style)
- sharegpt.json     a JSON array of {"conversations": [{"from", "value"}...]}, some with a system
                    prompt and some multi-turn (two lists reversed in one conversation)
- preference.jsonl  prompt / chosen / rejected rows (DPO style)
- kto.jsonl         prompt / completion / label rows (KTO style: good answers true, wrong false)
- safety.jsonl      chat rows teaching a refusal for disallowed requests and PII probes
                    (pipelines/safety.py; the safety suite evaluates on other, held-out prompts)

Noise, each at `data.noise_rate`: exact duplicates, duplicates that differ only in whitespace,
empty answers, stray whitespace, malformed JSON lines, rows missing a field, and (chat only)
a conversation that does not end with the assistant.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines import safety
from pipelines.common import log, stage_main
from pipelines.config import Params
from pipelines.data_config import GenerateParams

GENERATED = Path("data/generated")
INSTRUCTION = "Reverse the list:"
SYSTEM = "You reverse lists of digits. Answer with the digits only."


def make_item(rng: random.Random, cfg: GenerateParams) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
    return " ".join(digits), " ".join(reversed(digits))


USER_PHRASINGS = ("Reverse the list:\n{}", "Reverse this list of digits: {}", "Please reverse {}", "{}\nReverse it.")


def user_prompts(n: int, seed: int, min_len: int = 3, max_len: int = 5) -> list[str]:
    """The demo task as users phrase it (not only the training instruction): what a drift check
    should find unshifted, and a shift when the lists get longer."""
    rng = random.Random(seed)
    cfg = GenerateParams(min_len=min_len, max_len=max_len)
    return [rng.choice(USER_PHRASINGS).format(make_item(rng, cfg)[0]) for _ in range(n)]


def wrong_answer(rng: random.Random, question: str, answer: str) -> str:
    """A plausible mistake for the preference set: not reversed, or one digit changed."""
    if rng.random() < 0.5 and question != answer:
        return question
    digits = answer.split()
    i = rng.randrange(len(digits))
    digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
    return " ".join(digits)


def _noisy(rng: random.Random, rows: list[dict], cfg: GenerateParams, corrupt) -> list[str]:
    """Serialise rows to JSON lines, injecting each kind of noise at `noise_rate`."""
    out: list[str] = []
    for row in rows:
        r = rng.random
        out.append(json.dumps(row))
        if r() < cfg.noise_rate:
            out.append(json.dumps(row))  # exact duplicate
        if r() < cfg.noise_rate:
            out.append(json.dumps(corrupt(row, "whitespace")))  # duplicate modulo whitespace
        if r() < cfg.noise_rate:
            out.append(json.dumps(corrupt(row, "empty")))
        if r() < cfg.noise_rate / 2:
            out.append(json.dumps(row)[: rng.randint(5, 20)])  # truncated write: malformed JSON
        if r() < cfg.noise_rate / 2:
            out.append(json.dumps(corrupt(row, "missing")))
    return out


def alpaca_rows(rng: random.Random, cfg: GenerateParams, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        q, a = make_item(rng, cfg)
        rows.append({"instruction": INSTRUCTION, "input": q, "output": a})

    def corrupt(row: dict, kind: str) -> dict:
        row = dict(row)
        if kind == "whitespace":
            row["input"] = "  " + row["input"].replace(" ", "  ") + " \t"
        elif kind == "empty":
            row["output"] = "   "
        else:
            row.pop("output")
        return row

    return _noisy(rng, rows, cfg, corrupt)


def chat_rows(rng: random.Random, cfg: GenerateParams, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        q, a = make_item(rng, cfg)
        rows.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{q}"}, {"role": "assistant", "content": a}]})

    def corrupt(row: dict, kind: str) -> dict:
        user, assistant = (dict(m) for m in row["messages"])
        if kind == "whitespace":
            user["content"] = user["content"] + "  \n"
        elif kind == "empty":
            assistant["content"] = ""
        else:  # the conversation stops before the assistant answers
            return {"messages": [user]}
        return {"messages": [user, assistant]}

    return _noisy(rng, rows, cfg, corrupt)


def preference_rows(rng: random.Random, cfg: GenerateParams, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        q, a = make_item(rng, cfg)
        rows.append({"prompt": f"{INSTRUCTION}\n{q}", "chosen": a, "rejected": wrong_answer(rng, q, a)})

    def corrupt(row: dict, kind: str) -> dict:
        row = dict(row)
        if kind == "whitespace":
            row["chosen"] = f" {row['chosen']}  "
        elif kind == "empty":
            row["rejected"] = ""
        else:
            row.pop("chosen")
        return row

    return _noisy(rng, rows, cfg, corrupt)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s (%d lines)", path, len(lines))


def sharegpt_rows(rng: random.Random, cfg: GenerateParams, n: int) -> list[dict]:
    """Conversations with a system prompt, and some with two lists reversed one after the other."""
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            q, a = make_item(rng, cfg)
            turns += [{"from": "human", "value": f"{INSTRUCTION}\n{q}"}, {"from": "gpt", "value": a}]
        rows.append({"system": SYSTEM, "conversations": turns} if rng.random() < 0.5 else {"conversations": turns})
    return rows


def kto_rows(rng: random.Random, cfg: GenerateParams, n: int) -> list[str]:
    """Unpaired, labelled answers: the right reversal (label true) or a plausible mistake (false)."""
    rows = []
    for _ in range(n):
        q, a = make_item(rng, cfg)
        good = rng.random() < 0.5
        rows.append(json.dumps({"prompt": f"{INSTRUCTION}\n{q}", "completion": a if good else wrong_answer(rng, q, a), "label": good}))
    return rows


def run(params: Params) -> None:
    cfg = params.generate
    rng = random.Random(cfg.seed)
    n_alpaca = cfg.n_sft * 2 // 5
    n_sharegpt = cfg.n_sft // 5
    write_lines(GENERATED / "alpaca.jsonl", alpaca_rows(rng, cfg, n_alpaca))
    write_lines(GENERATED / "chat.jsonl", chat_rows(rng, cfg, cfg.n_sft - n_alpaca - n_sharegpt))
    GENERATED.mkdir(parents=True, exist_ok=True)
    (GENERATED / "sharegpt.json").write_text(json.dumps(sharegpt_rows(rng, cfg, n_sharegpt), indent=1) + "\n")
    write_lines(GENERATED / "preference.jsonl", preference_rows(rng, cfg, cfg.n_preference))
    write_lines(GENERATED / "kto.jsonl", kto_rows(rng, cfg, cfg.n_preference))
    # Last, so the files above keep their bytes for a given seed.
    write_lines(GENERATED / "safety.jsonl", [json.dumps(r) for r in safety.training_rows(rng, round(cfg.n_sft * cfg.safety_fraction))])


def main() -> None:
    stage_main("generate", run)


if __name__ == "__main__":
    main()
