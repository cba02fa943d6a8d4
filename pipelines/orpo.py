"""Step `orpo`: odds-ratio preference optimisation (TRL's ORPOTrainer): an SFT loss on the
chosen answer plus a term that raises its odds over the rejected one. No reference model.
TRL keeps ORPO under `trl.experimental`; its import is confined to this module.
"""

from __future__ import annotations

import os

from pipelines.common import stage_main
from pipelines.config import OrpoParams, Params
from pipelines.training import Step, offline_step, pair_dataset, run_step, table_files, trainer_args

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def pair_metrics(trainer) -> dict:
    m = trainer.evaluate()
    return {"preference_accuracy": m["eval_rewards/accuracies"], "reward_margin": m["eval_rewards/margins"], "eval_loss": m["eval_loss"]}


def run(params: Params) -> None:
    cfg: OrpoParams = params.orpo

    def build(plan, ckpt, ref) -> Step:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config = ORPOConfig(**trainer_args(cfg, plan, ckpt), beta=cfg.beta, max_length=cfg.max_length, eval_strategy="no")
        return offline_step(ORPOTrainer, config, cfg, plan, ref, "preference", pair_dataset, pair_metrics)

    run_step("orpo", params, cfg, table_files("preference", "train", "test"), build)


def main() -> None:
    stage_main("orpo", run)


if __name__ == "__main__":
    main()
