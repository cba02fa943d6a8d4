"""The training sections of params.yaml: the model to start from (or bootstrap), device and
precision, PEFT, and one section per algorithm of the recipe (pipelines/recipe.py), with the
SFT sweep. Every field has a default and a description; cross-field checks sit on their model."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipelines.section import Section

BOOTSTRAP = "bootstrap"  # the embedded default: train a tokenizer and a tiny Llama from scratch


class ModelParams(Section):
    base_model: str = Field(BOOTSTRAP, description="'bootstrap' for the embedded tiny model, else a Hugging Face id or a local directory.")
    vocab_size: int = Field(320, ge=260, description="Bootstrap only: byte-level BPE vocabulary size.")
    hidden_size: int = Field(128, ge=8, description="Bootstrap only: Llama hidden size.")
    num_layers: int = Field(2, ge=1, description="Bootstrap only: Llama decoder layers.")
    num_heads: int = Field(4, ge=1, description="Bootstrap only: attention heads.")
    intermediate_size: int = Field(256, ge=8, description="Bootstrap only: MLP width.")
    max_position_embeddings: int = Field(128, ge=16, description="Bootstrap only: longest sequence.")
    seed: int = Field(0, description="Bootstrap only: weight-initialisation seed.")
    start_from: Literal["base", "champion"] = Field("base", description="What the recipe's first step trains from: 'base' (base_model above) or 'champion' (the registered champion's trainable weights, e.g. a feedback run's [dpo]). For champion, the flow pins the alias to a version in start_version before DVC runs (stage start_model fetches it); the base model is still built and scored.")
    start_version: str | None = Field(None, description="The registered version whose trainable weights start_from: champion trains from. null: the flow pins the champion's current version for the run (in params.run.yaml); set it to rebuild from one version with `dvc repro`.")

    @field_validator("start_version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # `start_version: 3` in YAML

    @model_validator(mode="after")
    def _heads(self) -> "ModelParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ComputeParams(Section):
    """Where and in which precision every stage runs: training, evaluation and quantization."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when a GPU is visible, else the CPU.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="'auto': bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU.")
    cpu_threads: int = Field(0, ge=0, description="Torch threads of each stage's process (0: torch's default, one per core). An OMP_NUM_THREADS in the environment wins (the sweep sets it per trial). The embedded default uses 1: its tiny matrices gain ~25 % from a second thread on an idle machine and lose 4x when another process holds a core (measured: ARCHITECTURE.md).")


PEFT_METHODS = ("full", "lora", "qlora", "dora", "rslora", "pissa", "olora", "adalora", "ia3", "loha", "lokr", "vera")


class PeftParams(Section):
    """Which weights a training step updates. Adapters are merged on save, so every later
    consumer loads a plain checkpoint."""

    method: Literal[PEFT_METHODS] = Field("lora", description=f"One of {', '.join(PEFT_METHODS)}. 'full' trains every weight; qlora loads the base in 4 bits (bitsandbytes, CUDA only); pissa/olora are LoRA initialisations; rslora scales by alpha/sqrt(r); dora decomposes magnitude and direction.")
    r: int = Field(16, ge=1, description="Adapter rank (LoRA family, AdaLoRA's target rank, LoHa/LoKr, VeRA).")
    alpha: int = Field(32, ge=1, description="Scaling numerator (LoRA family, LoHa, LoKr).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Adapter dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get adapters (IA3 and VeRA need explicit names; 'all-linear' picks the attention and MLP projections for them).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the adapters (e.g. embed_tokens, lm_head for a new tokenizer).")


class TrainParams(Section):
    """What every training step shares; each algorithm's section adds its own knobs."""

    peft: PeftParams = Field(default_factory=PeftParams, description="Full training or a PEFT method.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~30 % slower.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant, ...).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_length: int = Field(64, ge=8, description="Tokens per example; longer ones are truncated.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; a killed run resumes from the last one.")
    seed: int = Field(42, description="Training seed (data order and initialisation).")
    nproc: int = Field(1, ge=1, description="Processes under torch.distributed.run (one per GPU; CPU: gloo).")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json, *_offload.json); null for none.")
    fsdp: str | None = Field(None, description="FSDP mode passed to the trainer (e.g. 'full_shard auto_wrap'); needs a GPU and nproc > 1. Exclusive with deepspeed.")

    @model_validator(mode="after")
    def _parallel(self) -> "TrainParams":
        if self.deepspeed and self.fsdp:
            raise ValueError("deepspeed and fsdp are exclusive: set one of them to null")
        return self


class SftParams(TrainParams):
    peft: PeftParams = Field(
        default_factory=lambda: PeftParams(modules_to_save=["embed_tokens", "lm_head"]),
        description="Full training or a PEFT method; the bootstrapped model trains its fresh embeddings in full.",
    )
    max_steps: int = Field(500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Per-device batch size.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate (linear decay).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    save_steps: int = Field(100, ge=1, description="Validation loss and a checkpoint every N steps; a killed run resumes from the last one.")
    loss_on: Literal["all_assistant", "last_assistant"] = Field("all_assistant", description="Which tokens carry the loss in a multi-turn conversation: every assistant turn, or only the last.")
    packing: bool = Field(False, description="Pack several short examples into one sequence (TRL packing).")


class SweepParams(Section):
    """An SFT hyperparameter sweep (`make sweep`, flows/sweep.py): every combination of `grid`
    over the sft section is one trial, trained from the prepared data and the base model in its
    own folder (models/sweeps/); every trial is recorded in MLflow and only the best by `metric`
    is registered, under its own registered model."""

    grid: dict[str, list[Any]] = Field(default_factory=lambda: {"learning_rate": [1e-3, 3e-3, 1e-2]}, description="sft keys and the values to try, e.g. {learning_rate: [1e-3, 3e-3], peft: [{method: lora}, {method: full}]}; the trials are every combination, each applied over the sft section.")
    metric: str = Field("eval_loss", description="What picks the winner: a number in the trial's training metrics (eval_loss: validation loss after training, final_train_loss) or, with evaluate on, in its evaluation (validation_loss, preference_accuracy, '<task>/<metric>').")
    direction: Literal["lower", "higher"] = Field("lower", description="Whether a lower or a higher `metric` wins.")
    evaluate: bool = Field(False, description="Also run the evaluation suite (the evaluate section) on every trial's model, fanned out like the training.")
    runner: Literal["local", "ray"] = Field("local", description="local: trials side by side in this process's thread pool (each trains in its own process); ray: Ray tasks through prefect-ray (`pip install -e '.[ray]'`), on a local Ray instance or the cluster at ray_address. $RAY_ADDRESS set means ray too.")
    ray_address: str | None = Field(None, description="Ray cluster to join (ray://head:10001, host:6379, or auto: the one `ray start` runs on this machine); null: $RAY_ADDRESS when set, else a Ray instance started for the sweep. A multi-node cluster must see the project folder at the same path (shared storage).")
    cpus_per_trial: int = Field(1, ge=1, description="Cores per trial: its torch threads and its Ray num_cpus. The local runner runs cores // cpus_per_trial trials at once.")
    max_trials: int = Field(16, ge=1, description="Refuse a grid with more combinations than this (a typo in a list should not start a hundred trainings).")
    registered_model: str | None = Field(None, description="Registered model that receives the winner; null: '<registry.model_name>-sweep'. Never the lifecycle's model: a sweep winner is an unquantized, ungated SFT checkpoint, not a release candidate.")

    @model_validator(mode="after")
    def _grid(self) -> "SweepParams":
        import math

        problems = []
        for key, values in self.grid.items():
            if key not in SftParams.model_fields:
                close = difflib.get_close_matches(key, list(SftParams.model_fields), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"sft keys: {', '.join(SftParams.model_fields)}"
                problems.append(f"grid key '{key}' is not an sft setting ({hint})")
                continue
            if not values:
                problems.append(f"grid key '{key}' has no values to try")
            for value in values:
                try:
                    SftParams.model_validate({key: value})
                except ValidationError as exc:
                    problems.append(f"grid value {key}={value!r}: {exc.errors()[0]['msg']}")
        trials = math.prod(len(v) for v in self.grid.values())
        if trials > self.max_trials:
            problems.append(f"grid makes {trials} trials, more than max_trials ({self.max_trials}): trim it or raise max_trials")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AlignParams(TrainParams):
    """What the offline preference steps (dpo, kto, orpo, cpo) share: a small adapter on the
    previous policy (for DPO and KTO the reference is that adapter switched off)."""

    peft: PeftParams = Field(default_factory=lambda: PeftParams(r=8, alpha=16), description="Adapter settings.")
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps.")


class DpoParams(AlignParams):
    # sigmoid alone lowers the chosen answers' likelihood along with the rejected ones': on the
    # demo it took held-out exact match from 1.000 (sft) to 0.918 with preference accuracy 1.0.
    # With the chosen answers' NLL added (RPO; TRL's "sft" loss) it stays at 1.000.
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid", "sft"], description="TRL DPO loss(es): sigmoid, hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, discopop, sigmoid_norm, sft (the chosen answers' NLL, as in RPO), ...; several are combined.")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type entry (null: all 1).")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")

    @model_validator(mode="after")
    def _weights(self) -> "DpoParams":
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} loss types {self.loss_type}")
        return self


class KtoParams(AlignParams):
    beta: float = Field(0.1, gt=0, description="KTO beta.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of completions labelled good.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of completions labelled bad (raise it when bad ones are rarer).")


class OrpoParams(AlignParams):
    beta: float = Field(0.1, gt=0, description="ORPO lambda: weight of the odds-ratio term beside the SFT loss.")


class CpoParams(AlignParams):
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = Field("sigmoid", description="'simpo' gives SimPO (length-normalised, reference-free, with a margin).")
    beta: float = Field(0.1, gt=0, description="CPO/SimPO beta.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the behaviour-cloning (NLL) term; 0 with loss_type simpo is pure SimPO.")


class RmParams(TrainParams):
    peft: PeftParams = Field(default_factory=lambda: PeftParams(method="full"), description="The reward model is a sequence classifier on the previous policy; the tiny default trains it in full.")
    # 300 steps at 1e-3 (~15 epochs of the demo pairs) overfit (held-out loss above chance's 0.69).
    # 150 at 3e-4 looked right only in a process where SFT had run first: its score head was drawn
    # from that state. Seeded, 150 steps gave 0.50-0.57 held-out pair accuracy (seeds 42, 1, 2),
    # 400 gave 0.60-0.74 and 600 gives 0.73-0.82 with held-out loss 0.69 -> 0.33-0.58.
    max_steps: int = Field(600, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    save_steps: int = Field(300, ge=1, description="Checkpoint every N steps.")
    center_rewards_coefficient: float | None = Field(0.01, ge=0, description="Pulls rewards towards zero mean (TRL); null for none.")


class RlParams(TrainParams):
    """Online RL: the policy samples `num_generations` answers per prompt, rewards score them."""

    peft: PeftParams = Field(default_factory=lambda: PeftParams(method="full"), description="Full or PEFT; on the tiny demo model full training learns and LoRA barely moves the reward.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    batch_size: int = Field(64, ge=2, description="Completions per device per step (a multiple of num_generations): prompts per step = batch_size / num_generations.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    num_generations: int = Field(8, ge=2, description="Answers sampled per prompt (the group).")
    max_completion_length: int = Field(16, ge=1, description="Tokens sampled per answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference policy (0: none, no reference kept).")
    rewards: list[str] = Field(default_factory=lambda: ["token_overlap"], description="Reward functions by name (pipelines/rewards.py), and 'reward_model' for the recipe's rm step.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward (null: all 1).")

    @model_validator(mode="after")
    def _rl(self) -> "RlParams":
        from pipelines.rewards import check_rewards  # the registry of reward functions

        problems = check_rewards(self.rewards)
        if self.batch_size % self.num_generations:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of num_generations ({self.num_generations})")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GrpoParams(RlParams):
    """GRPO: each answer's advantage is its reward against its group's mean."""


class RlooParams(RlParams):
    """RLOO: each answer's baseline is the mean reward of the others in its group."""
