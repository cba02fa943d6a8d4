"""Step `cpo`: contrastive preference optimisation (TRL's CPOTrainer), reference-free.
`cpo.loss_type: simpo` gives SimPO (length-normalised reward with a target margin
`simpo_gamma`; `cpo_alpha: 0` drops the behaviour-cloning term for pure SimPO).
TRL keeps CPO under `trl.experimental`; its import is confined to this module.
"""

from __future__ import annotations

import os

from pipelines.common import stage_main
from pipelines.config import CpoParams, Params
from pipelines.orpo import pair_metrics
from pipelines.training import Step, offline_step, pair_dataset, run_step, table_files, trainer_args

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def run(params: Params) -> None:
    cfg: CpoParams = params.cpo

    def build(plan, ckpt, ref) -> Step:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config = CPOConfig(
            **trainer_args(cfg, plan, ckpt), loss_type=cfg.loss_type, beta=cfg.beta, simpo_gamma=cfg.simpo_gamma,
            cpo_alpha=cfg.cpo_alpha, max_length=cfg.max_length, eval_strategy="no",
        )
        return offline_step(CPOTrainer, config, cfg, plan, ref, "preference", pair_dataset, pair_metrics)

    run_step("cpo", params, cfg, table_files("preference", "train", "test"), build)


def main() -> None:
    stage_main("cpo", run)


if __name__ == "__main__":
    main()
