"""Step `dpo`: direct preference optimisation with TRL's DPOTrainer, and its loss variants
(`dpo.loss_type`: sigmoid, ipo, hinge, robust, ... or several combined).

DPO trains an adapter on the previous policy; with an adapter, TRL's reference model is the
same network with the adapter switched off, so no second copy is held in memory (full
training keeps a frozen copy instead). Held-out pairs give the preference accuracy: how often
the implicit reward ranks chosen above rejected, before and after training.
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import DpoParams, Params
from pipelines.training import Step, offline_step, pair_dataset, run_step, table_files, trainer_args


def reward_metrics(trainer) -> dict:
    # TRL names its reward metrics eval_* whatever the prefix, so read both evaluations the same way.
    m = trainer.evaluate()
    return {"preference_accuracy": m["eval_rewards/accuracies"], "reward_margin": m["eval_rewards/margins"], "eval_loss": m["eval_loss"]}


def run(params: Params) -> None:
    cfg: DpoParams = params.dpo

    def build(plan, ckpt, ref) -> Step:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**trainer_args(cfg, plan, ckpt), loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta, max_length=cfg.max_length, eval_strategy="no")
        return offline_step(DPOTrainer, config, cfg, plan, ref, "preference", pair_dataset, reward_metrics)

    run_step("dpo", params, cfg, table_files("preference", "train", "test"), build)


def main() -> None:
    stage_main("dpo", run)


if __name__ == "__main__":
    main()
