"""Step `kto`: Kahneman-Tversky optimisation with TRL's KTOTrainer, on unpaired completions
labelled good or bad (data/prepared/kto_*.parquet: prompt, completion, label). The label is
the whole signal: a completion labelled bad is pushed down, never trained on as a good one.
"""

from __future__ import annotations

from pipelines.common import stage_main
from pipelines.config import KtoParams, Params
from pipelines.training import Step, offline_step, run_step, table_files, trainer_args


def kto_dataset(frame):
    from datasets import Dataset

    from pipelines.formats import chat_messages

    return Dataset.from_list(
        [{"prompt": chat_messages(p), "completion": chat_messages(c), "label": bool(lab)} for p, c, lab in zip(frame["prompt"], frame["completion"], frame["label"])]
    )


def kto_metrics(trainer) -> dict:
    m = trainer.evaluate()
    out = {"eval_loss": m["eval_loss"]}
    if "eval_rewards/chosen_sum" in m or "eval_rewards/chosen" in m:
        out["reward_chosen"] = m.get("eval_rewards/chosen", m.get("eval_rewards/chosen_sum"))
        out["reward_rejected"] = m.get("eval_rewards/rejected", m.get("eval_rewards/rejected_sum"))
    return out


def run(params: Params) -> None:
    cfg: KtoParams = params.kto

    def build(plan, ckpt, ref) -> Step:
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(
            **trainer_args(cfg, plan, ckpt), beta=cfg.beta, max_length=cfg.max_length, eval_strategy="no",
            desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
        )
        return offline_step(KTOTrainer, config, cfg, plan, ref, "kto", kto_dataset, kto_metrics)

    run_step("kto", params, cfg, table_files("kto", "train", "test"), build)


def main() -> None:
    stage_main("kto", run)


if __name__ == "__main__":
    main()
