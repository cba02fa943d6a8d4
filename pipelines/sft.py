"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer, LoRA (PEFT) or full.

Rows are fed as conversational prompt/completion pairs, so TRL renders them with the model's
chat template and computes the loss on the assistant answer only. LoRA adapters are merged
on save. Checkpoints every `eval_steps` let a crashed run resume where it stopped.
`sft.nproc > 1` relaunches the stage under torch.distributed.run; `sft.deepspeed` hands a
DeepSpeed config (e.g. ZeRO-2) to the trainer.
"""

from __future__ import annotations

import shutil
import time

import pandas as pd

from pipelines.common import PREPARED, SFT_DIR, base_model_ref, log, stage_main
from pipelines.config import Params
from pipelines.training import (
    checkpoint_dir,
    file_digest,
    last_checkpoint,
    load_model_and_tokenizer,
    lora_config,
    maybe_relaunch_distributed,
    save_final,
    trainable_parameters,
    write_training_metrics,
)


def to_prompt_completion(frame: pd.DataFrame):
    from datasets import Dataset

    rows = [{"prompt": list(m[:-1]), "completion": [m[-1]]} for m in frame["messages"]]
    return Dataset.from_list(rows)


def run(params: Params) -> None:
    from trl import SFTConfig, SFTTrainer

    cfg = params.sft
    if maybe_relaunch_distributed(cfg.nproc, "pipelines.sft", cfg.deepspeed):
        return
    train_file, val_file = PREPARED / "sft_train.parquet", PREPARED / "sft_validation.parquet"
    ckpt = checkpoint_dir("sft", cfg.model_dump(), base_model_ref(params), file_digest(train_file, val_file))
    model, tokenizer = load_model_and_tokenizer(base_model_ref(params))
    args = SFTConfig(
        output_dir=str(ckpt),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        max_length=cfg.max_length,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=1,
        logging_steps=10,
        seed=cfg.seed,
        use_cpu=True,
        report_to=[],  # metrics reach MLflow through the flow, not from inside the stage
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_prompt_completion(pd.read_parquet(train_file)),
        eval_dataset=to_prompt_completion(pd.read_parquet(val_file)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora) if cfg.method == "lora" else None,
    )
    resume = last_checkpoint(ckpt)
    if resume:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        trainable = trainable_parameters(trainer.model)
        save_final(trainer, tokenizer, SFT_DIR, merge_lora=cfg.method == "lora")
        summary = write_training_metrics(
            "sft",
            trainer,
            {
                "eval_loss": eval_loss,
                "train_seconds": seconds,
                "trainable_parameters": trainable,
                "world_size": trainer.args.world_size,
                "resumed_from": resume,
            },
        )
        shutil.rmtree(ckpt, ignore_errors=True)  # finished: the checkpoint has done its job
        log.info("sft done: %s", summary)


def main() -> None:
    stage_main("sft", run)


if __name__ == "__main__":
    main()
