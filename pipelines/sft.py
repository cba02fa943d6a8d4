"""Step `sft`: supervised fine-tuning with TRL's SFTTrainer, full or with any PEFT method.

Conversations are kept whole (system, multi-turn, tool turns) and tokenised here with the
model's chat template, with a mask that puts the loss on every assistant turn
(`sft.loss_on: all_assistant`) or on the last one only. TRL turns the mask into labels,
truncates and packs. The mask comes from rendering each conversation prefix, which works for
any template whose rendering of a prefix is a prefix of the whole (true of the common ones;
checked per row, and a row where it does not hold falls back to last-turn loss).
"""

from __future__ import annotations

import pandas as pd

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
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
            peft_config=peft_config(cfg.peft, model, total_steps=cfg.max_steps),
        )
        return Step(trainer, tokenizer, evaluate=lambda t: {"eval_loss": t.evaluate()["eval_loss"]})

    run_step("sft", params, cfg, files, build)


def main() -> None:
    stage_main("sft", run)


if __name__ == "__main__":
    main()
