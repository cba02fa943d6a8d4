"""What the online-RL steps (grpo, rloo) share: prompts from the SFT conversations with
their reference answers, rewards by name (pipelines/rewards.py) and/or the recipe's reward
model, and a held-out measure of the policy's mean rule reward, greedy, before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.config import Params, RlParams
from pipelines.recipe import model_dir
from pipelines.rewards import REWARD_MODEL, REWARDS
from pipelines.training import Step, load_model, load_tokenizer, peft_config, prompt_dataset, read_table, table_files, trainer_args

EVAL_PROMPTS = 64  # held-out prompts for the before/after reward (validation split)


def reward_funcs(cfg: RlParams) -> list:
    """Functions by name; the reward model by its folder (TRL loads it as a classifier)."""
    return [str(model_dir("rm")) if name == REWARD_MODEL else REWARDS[name] for name in cfg.rewards]


def data_files(cfg: RlParams) -> list[Path]:
    """What the step's result depends on besides its params and start model."""
    files = table_files("sft", "train", "validation")
    return files + ([model_dir("rm")] if REWARD_MODEL in cfg.rewards else [])


@torch.no_grad()
def mean_rule_reward(trainer, tokenizer, cfg: RlParams) -> dict:
    """Greedy answers to held-out prompts, scored by every rule reward the step uses."""
    rules = [n for n in cfg.rewards if n in REWARDS] or ["exact_match"]
    data = prompt_dataset(read_table("sft", "validation").head(EVAL_PROMPTS))
    model = trainer.model
    was_training = model.training
    model.eval()
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    for i in range(0, len(data), 16):
        batch = data[i : i + 16]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch["prompt"]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=cfg.max_completion_length, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = old_side
    model.train(was_training)
    return {f"mean_reward_{n}": sum(REWARDS[n](data["prompt"], completions, data["answer"])) / max(len(completions), 1) for n in rules}


def build_rl(step: str, params: Params, cfg: RlParams, trainer_cls, config_cls, plan, ckpt, ref) -> Step:
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, plan, cfg.peft, cfg.seed)
    args = config_cls(
        **trainer_args(cfg, plan, ckpt),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        reward_weights=cfg.reward_weights,
        eval_strategy="no",
    )
    trainer = trainer_cls(
        model=model, args=args, processing_class=tokenizer,
        reward_funcs=reward_funcs(cfg),
        train_dataset=prompt_dataset(read_table("sft", "train")),
        peft_config=peft_config(cfg.peft, model, total_steps=cfg.max_steps),
    )
    return Step(trainer, tokenizer, evaluate=lambda t: mean_rule_reward(t, tokenizer, cfg))
