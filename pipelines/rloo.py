"""Step `rloo`: online RL with TRL's RLOOTrainer (REINFORCE leave-one-out). For each prompt
the policy samples `num_generations` answers; each answer's baseline is the mean reward of the
others in its group. Rewards as for grpo: rule functions and/or the recipe's reward model.
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import Params, RlooParams
from pipelines.rl import build_rl, data_files
from pipelines.training import run_step


def run(params: Params) -> None:
    cfg: RlooParams = params.rloo

    def build(plan, ckpt, ref):
        from trl import RLOOConfig, RLOOTrainer

        return build_rl("rloo", params, cfg, RLOOTrainer, RLOOConfig, plan, ckpt, ref)

    run_step("rloo", params, cfg, data_files(cfg), build)


def main() -> None:
    stage_main("rloo", run)


if __name__ == "__main__":
    main()
