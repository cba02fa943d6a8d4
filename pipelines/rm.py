"""Step `rm`: a reward model trained on the preference pairs with TRL's RewardTrainer.

It is a sequence classifier with one output (the reward), initialised from the policy the
recipe has trained so far, and saved in models/rm for a later online-RL step (grpo, rloo)
that names `reward_model` among its rewards. Its held-out accuracy (chosen scored above
rejected on the preference test split) is measured before and after training.
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import Params, RmParams
from pipelines.training import Step, load_model, load_tokenizer, pair_dataset, peft_config, read_table, run_step, table_files, trainer_args


def rm_metrics(trainer) -> dict:
    m = trainer.evaluate()
    return {"reward_accuracy": m["eval_accuracy"], "reward_margin": m.get("eval_margin"), "eval_loss": m["eval_loss"]}


def run(params: Params) -> None:
    cfg: RmParams = params.rm

    def build(plan, ckpt, ref) -> Step:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        tokenizer = load_tokenizer(ref)
        model = load_model(ref, plan, cfg.peft, model_cls=AutoModelForSequenceClassification, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
        args = RewardConfig(
            **trainer_args(cfg, plan, ckpt), max_length=cfg.max_length, eval_strategy="no",
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=pair_dataset(read_table("preference", "train")),
            eval_dataset=pair_dataset(read_table("preference", "test")),
            peft_config=peft_config(cfg.peft, model, task_type="SEQ_CLS", total_steps=cfg.max_steps),
        )
        return Step(trainer, tokenizer, evaluate=rm_metrics)

    run_step("rm", params, cfg, table_files("preference", "train", "test"), build)


def main() -> None:
    stage_main("rm", run)


if __name__ == "__main__":
    main()
