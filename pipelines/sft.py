"""Step `sft`: supervised fine-tuning with TRL's SFTTrainer, full or with any PEFT method.

Conversations are kept whole (system, multi-turn, tool turns) and tokenised here with the
model's chat template, with a mask that puts the loss on every assistant turn
(`sft.loss_on: all_assistant`) or on the last one only. TRL turns the mask into labels,
truncates and packs. The mask comes from rendering each conversation prefix, which works for
any template whose rendering of a prefix is a prefix of the whole (true of the common ones;
checked per row, and a row where it does not hold falls back to last-turn loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from pipelines.common import log, stage_main
from pipelines.config import Params, SftParams
from pipelines.formats import chat_messages, tool_calls_of
from pipelines.training import Step, load_model, load_tokenizer, peft_config, read_table, run_step, table_files, trainer_args


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict], tools=None, loss_on: str = "all_assistant") -> dict:
    """input_ids and assistant_masks (1 on the tokens that carry the loss)."""
    ids = _render(tokenizer, messages, tools)
    mask = [0] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    for i in turns:
        start = _render(tokenizer, messages[:i], tools, generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], tools)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            if loss_on == "all_assistant":  # this template re-renders history: train the last turn only
                return tokenize_conversation(tokenizer, messages, tools, "last_assistant")
            raise ValueError("the chat template does not render a conversation prefix as a prefix of the whole")
        mask[len(start) : len(end)] = [1] * (len(end) - len(start))
    return {"input_ids": ids, "assistant_masks": mask}


def to_dataset(frame: pd.DataFrame, tokenizer, loss_on: str):
    from datasets import Dataset

    tools = frame["tools"] if "tools" in frame else [None] * len(frame)
    rows = [
        tokenize_conversation(tokenizer, chat_messages(m), tool_calls_of(t), loss_on)  # a gap in a pandas-3 str column is NaN, not None
        for m, t in zip(frame["messages"], tools)
    ]
    return Dataset.from_list(rows)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity`: longest first, each into the bin
    it fills most tightly (an item longer than `capacity` gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: room[b])
            bins[best].append(i)
            room[best] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class BatchPacker:
    """Collates one batch of conversations into as few rows of `row_length` tokens as hold
    them (best-fit decreasing), each conversation with its own positions from 0 and no
    attention mask: transformers then builds a block-diagonal causal mask from the restarting
    position_ids, so attention never crosses from one conversation into the next. Each step
    still trains on the same `batch_size` conversations with the same loss as one padded row
    each; only the padding goes. On the demo's mix (one- and two-turn chats, system prompts,
    safety rows: 20 tokens on average, up to 52) a batch of 32 is ~750 tokens instead of
    ~1,450 padded to its longest row."""

    pad_token_id: int
    row_length: int

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Which examples share a row: best-fit decreasing into rows of `row_length`, or of the
        longest example when that costs fewer tokens (a batch of near-equal lengths is cheapest
        one to a row, padded)."""
        longest = max(lengths)
        layouts = [best_fit_decreasing(lengths, capacity) for capacity in sorted({longest, max(longest, self.row_length)})]
        return min(layouts, key=lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows))

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        # Padding gets position 0 at every token: each pad is a sequence of its own, seen by nothing else.
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                input_ids[r, at : at + n] = torch.tensor(examples[i]["input_ids"])
                labels[r, at : at + n] = torch.tensor(examples[i]["labels"])
                labels[r, at] = -100  # the token before it belongs to another conversation
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def run(params: Params) -> None:
    cfg: SftParams = params.sft
    files = table_files("sft", "train", "validation")

    def build(plan, ckpt, ref) -> Step:
        from trl import SFTConfig, SFTTrainer

        tokenizer = load_tokenizer(ref)
        model = load_model(ref, plan, cfg.peft, cfg.seed)
        args = SFTConfig(
            **trainer_args(cfg, plan, ckpt),
            max_length=cfg.max_length,
            packing=cfg.packing,
            eval_strategy="steps",
            eval_steps=cfg.save_steps,
        )
        train = to_dataset(read_table("sft", "train"), tokenizer, cfg.loss_on)
        val = to_dataset(read_table("sft", "validation"), tokenizer, cfg.loss_on)
        log.info("sft: %d training conversations, %d validation", len(train), len(val))
        # TRL's own packing (sft.packing) packs across the dataset, changing what a step is; else
        # each step's conversations are packed among themselves (BatchPacker).
        collator = None if cfg.packing else BatchPacker(tokenizer.pad_token_id, cfg.max_length)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer, data_collator=collator,
            peft_config=peft_config(cfg.peft, model, total_steps=cfg.max_steps),
        )
        return Step(trainer, tokenizer, evaluate=lambda t: {"eval_loss": t.evaluate()["eval_loss"]})

    run_step("sft", params, cfg, files, build)


def main() -> None:
    stage_main("sft", run)


if __name__ == "__main__":
    main()
