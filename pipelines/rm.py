"""Step `rm`: a reward model trained on the preference pairs with TRL's RewardTrainer.

It is a sequence classifier with one output (the reward), initialised from the policy the
recipe has trained so far, and saved in models/rm for a later online-RL step (grpo, rloo)
that names `reward_model` among its rewards. Its held-out accuracy (chosen scored above
rejected on the preference test split) is measured before and after training.
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import Params, RmParams
from pipelines.training import Step, offline_step, pair_dataset, run_step, table_files, trainer_args


def rm_metrics(trainer) -> dict:
    m = trainer.evaluate()
    return {"reward_accuracy": m["eval_accuracy"], "reward_margin": m.get("eval_margin"), "eval_loss": m["eval_loss"]}


def run(params: Params) -> None:
    cfg: RmParams = params.rm

    def build(plan, ckpt, ref) -> Step:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        config = RewardConfig(
            **trainer_args(cfg, plan, ckpt), max_length=cfg.max_length, eval_strategy="no",
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        return offline_step(RewardTrainer, config, cfg, plan, ref, "preference", pair_dataset, rm_metrics, model_cls=AutoModelForSequenceClassification, num_labels=1)

    run_step("rm", params, cfg, table_files("preference", "train", "test"), build)


def main() -> None:
    stage_main("rm", run)


if __name__ == "__main__":
    main()
