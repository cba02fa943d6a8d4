"""Stage `preference`: preference alignment of the SFT model with TRL's DPOTrainer.

DPO trains a LoRA adapter on top of the SFT model; with an adapter, TRL's reference model is
the same network with the adapter switched off, so no second copy is held in memory.
Held-out pairs give the preference accuracy (how often the aligned model's implicit reward
ranks chosen above rejected), the metric the gate reads.
"""

from __future__ import annotations

import shutil
import time

import pandas as pd

from pipelines.common import DPO_DIR, PREPARED, SFT_DIR, log, stage_main
from pipelines.config import Params
from pipelines.training import (
    checkpoint_dir,
    file_digest,
    last_checkpoint,
    load_model_and_tokenizer,
    lora_config,
    save_final,
    trainable_parameters,
    write_training_metrics,
)


def to_conversational(frame: pd.DataFrame):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r.prompt}],
                "chosen": [{"role": "assistant", "content": r.chosen}],
                "rejected": [{"role": "assistant", "content": r.rejected}],
            }
            for r in frame.itertuples()
        ]
    )


def run(params: Params) -> None:
    from trl import DPOConfig, DPOTrainer

    cfg = params.preference
    train_file, test_file = PREPARED / "preference_train.parquet", PREPARED / "preference_test.parquet"
    ckpt = checkpoint_dir("preference", cfg.model_dump(), file_digest(SFT_DIR / "model.safetensors", train_file))
    model, tokenizer = load_model_and_tokenizer(str(SFT_DIR))
    args = DPOConfig(
        output_dir=str(ckpt),
        loss_type=[cfg.loss_type],
        beta=cfg.beta,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        max_length=cfg.max_length,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=max(cfg.max_steps // 3, 1),
        save_total_limit=1,
        logging_steps=5,
        seed=cfg.seed,
        use_cpu=True,
        report_to=[],
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=to_conversational(pd.read_parquet(train_file)),
        eval_dataset=to_conversational(pd.read_parquet(test_file)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
    )
    # TRL names its reward metrics eval_* whatever the prefix, so read both evaluations the same way.
    before = trainer.evaluate()
    resume = last_checkpoint(ckpt)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    after = trainer.evaluate()
    trainable = trainable_parameters(trainer.model)
    save_final(trainer, tokenizer, DPO_DIR, merge_lora=True)
    summary = write_training_metrics(
        "preference",
        trainer,
        {
            "preference_accuracy": after["eval_rewards/accuracies"],
            "reward_margin": after["eval_rewards/margins"],
            "preference_accuracy_before": before["eval_rewards/accuracies"],
            "eval_loss": after["eval_loss"],
            "train_seconds": seconds,
            "trainable_parameters": trainable,
            "resumed_from": resume,
        },
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("dpo done: %s", summary)


def main() -> None:
    stage_main("preference", run)


if __name__ == "__main__":
    main()
