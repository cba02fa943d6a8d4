"""Step `grpo`: online RL with TRL's GRPOTrainer. For each prompt the policy samples a group
of `num_generations` answers; each answer's advantage is its reward against the group's mean,
so no value model is needed. Rewards: rule functions (pipelines/rewards.py; the embedded task
has an exact one) and/or the recipe's reward model (`rewards: [reward_model]` after an `rm` step).
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import GrpoParams, Params
from pipelines.rl import build_rl, data_files
from pipelines.training import run_step


def run(params: Params) -> None:
    cfg: GrpoParams = params.grpo

    def build(plan, ckpt, ref):
        from trl import GRPOConfig, GRPOTrainer

        return build_rl("grpo", params, cfg, GRPOTrainer, GRPOConfig, plan, ckpt, ref)

    run_step("grpo", params, cfg, data_files(cfg), build)


def main() -> None:
    stage_main("grpo", run)


if __name__ == "__main__":
    main()
