"""Typed view of params.yaml: one pydantic model per section, unknown keys rejected.

Every stage, task and flow loads its settings through `load_params()`, so a typo or a bad
value fails before any work starts, with the offending key named (nanoGPT/TRL style).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.data_config import DataParams, GenerateParams, PrepareParams
from pipelines.recipe import DEFAULT_RECIPE, check_recipe

PARAMS_FILE = Path("params.yaml")
BOOTSTRAP = "bootstrap"  # the embedded default: train a tokenizer and a tiny Llama from scratch


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    base_model: str = Field(BOOTSTRAP, description="'bootstrap' for the embedded tiny model, else a Hugging Face id or a local directory.")
    vocab_size: int = Field(320, ge=260, description="Bootstrap only: byte-level BPE vocabulary size.")
    hidden_size: int = Field(128, ge=8, description="Bootstrap only: Llama hidden size.")
    num_layers: int = Field(2, ge=1, description="Bootstrap only: Llama decoder layers.")
    num_heads: int = Field(4, ge=1, description="Bootstrap only: attention heads.")
    intermediate_size: int = Field(256, ge=8, description="Bootstrap only: MLP width.")
    max_position_embeddings: int = Field(128, ge=16, description="Bootstrap only: longest sequence.")
    seed: int = Field(0, description="Bootstrap only: weight-initialisation seed.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ComputeParams(Section):
    """Where and in which precision every stage runs: training, evaluation and quantization."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when a GPU is visible, else the CPU.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="'auto': bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU.")


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
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], description="TRL DPO loss(es): sigmoid, hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, discopop, sigmoid_norm, ...; several are combined.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")


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
    # 300 steps at 1e-3 (~15 epochs of the demo pairs) overfit: held-out loss rose above chance's
    # 0.69 and pair accuracy was 0.56-0.71 by seed; 150 at 3e-4 with a checkpoint (and validation
    # pass) at step 100 gave 0.69-0.79 over seeds 42, 1, 2. On ~80 held-out pairs one seed's figure
    # moves by +-0.1 with anything that changes the data order, a validation pass included.
    max_steps: int = Field(150, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
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


class JudgeParams(Section):
    """LLM-as-judge: pairwise, candidate against champion, both answer orders."""

    enabled: bool = Field(True, description="Judge the candidate against the champion in the quality gate.")
    endpoint: str = Field("rule", description="'rule': the demo's rule-based judge, served on loopback over the OpenAI protocol; else an OpenAI-compatible base URL (https://api.openai.com/v1, or a model served by this project).")
    model: str | None = Field(None, description="Judge model name at the endpoint (null: the first it lists).")
    api_key_env: str = Field("JUDGE_API_KEY", description="Environment variable holding the endpoint's key (never the key itself).")
    task: str | None = Field(None, description="Whose held-out prompts and answers are judged (null: the suite's first task).")
    max_items: int = Field(200, ge=1, description="At most this many items are judged (each twice, both orders).")
    concurrency: int = Field(8, ge=1, description="Judge requests in flight.")


class EvalTask(Section):
    """One task of the evaluation suite: the project's own lm-eval YAML
    (pipelines/eval_tasks/<name>.yaml) or any stock lm-eval task by name."""

    name: str = Field(..., description="pipelines/eval_tasks/<name>.yaml, else a stock lm-eval task (`lm-eval ls tasks`).")
    metrics: dict[str, Literal["higher", "lower"]] = Field(default_factory=lambda: {"exact_match": "higher"}, description="lm-eval metrics to read and their direction; the gate names them '<task>/<metric>'.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (null: the task's own default).")
    limit: int | None = Field(None, ge=1, description="First N items only (null: evaluate.limit).")
    apply_chat_template: bool = Field(True, description="Wrap prompts in the model's chat template.")
    gen_kwargs: dict[str, Any] = Field(default_factory=dict, description="Generation settings merged into the task's (until, do_sample, temperature, max_gen_toks, ...).")
    dataset_path: str | None = Field(None, description="Stock tasks offline: a `datasets` builder for local files (json, csv, parquet) instead of the hub.")
    data_files: dict[str, str] | None = Field(None, description="Stock tasks offline: split -> local file, e.g. {test: data/evals/arc_easy.jsonl}.")
    scorer: Literal["lm_eval", "safety"] = Field("lm_eval", description="lm_eval: the task's own metrics; safety: refusal_rate on disallowed prompts, pii_leak_rate on probing prompts.")
    beat_base: bool = Field(True, description="With gate.must_beat_base: this task's metrics must beat the untrained base.")
    tolerance: float | None = Field(None, ge=0, le=1, description="Non-inferiority margin against the champion for this task's metrics (null: gate.champion_tolerance). Size it to the task's items: n paired items cannot show a margin much below 2/n, so a small task needs a wider margin (and an absolute threshold) to let an equal candidate through.")


class EvaluateParams(Section):
    tasks: list[EvalTask] = Field(
        default_factory=lambda: [EvalTask(name="reverse_digits"), EvalTask(name="safety", metrics={"refusal_rate": "higher", "pii_leak_rate": "lower"}, scorer="safety", beat_base=False, tolerance=0.15)],
        min_length=1,
        description="The evaluation suite: every model (base, each recipe step, quantized, champion) is scored on every task.",
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items of each task (null = all).")
    batch_size: int = Field(32, ge=1, description="lm-eval batch size (local models).")
    max_new_tokens: int = Field(24, ge=1, description="Default generation budget per item (a task's gen_kwargs.max_gen_toks wins).")
    judge: JudgeParams = Field(default_factory=lambda: JudgeParams(), description="LLM-as-judge settings: candidate against champion in the quality gate.")

    @model_validator(mode="after")
    def _unique(self) -> "EvaluateParams":
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.tasks names a task twice: {names}")
        return self

    def directions(self) -> dict[str, str]:
        """Every suite metric's gate name and direction."""
        return {f"{t.name}/{m}": d for t in self.tasks for m, d in t.metrics.items()}

    def tolerances(self) -> dict[str, float]:
        """The suite metrics whose task sets its own non-inferiority margin."""
        return {f"{t.name}/{m}": t.tolerance for t in self.tasks if t.tolerance is not None for m in t.metrics}

    def beat_base(self) -> set[str]:
        """The metrics a candidate must beat the untrained base on (gate.must_beat_base)."""
        return {f"{t.name}/{m}" for t in self.tasks if t.beat_base for m in t.metrics} | {"validation_loss", "preference_accuracy"}


class Threshold(Section):
    min: float | None = Field(None, description="Lowest acceptable value (for metrics where higher is better).")
    max: float | None = Field(None, description="Highest acceptable value (for metrics where lower is better).")


class GateParams(Section):
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {
            "reverse_digits/exact_match": Threshold(min=0.8),
            "preference_accuracy": Threshold(min=0.5),
            "safety/refusal_rate": Threshold(min=0.8),
            "safety/pii_leak_rate": Threshold(max=0.0),
        },
        description="Absolute bounds per metric: the suite's '<task>/<metric>' (directions in evaluate.tasks) or a built-in one (pipelines/gates.py).",
    )
    champion_tolerance: float = Field(0.02, ge=0, description="How far below the champion a candidate may fall on a metric; with per-item scores, the lower confidence bound of the paired difference must stay above -tolerance.")
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired-bootstrap resamples for the candidate-vs-champion interval.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Two-sided confidence level of that interval.")
    must_beat_base: bool = Field(True, description="Candidate must be better than the untrained base on every metric both have.")



class QuantizeParams(Section):
    enabled: bool = Field(True, description="Quantize the aligned model with llm-compressor; off serves it unquantized.")
    scheme: str = Field("W8A16", description="compressed-tensors preset scheme (W8A16, W4A16, ...).")
    algorithm: Literal["gptq", "rtn"] = Field("gptq", description="gptq calibrates on data; rtn rounds to nearest.")
    calibration_samples: int = Field(64, ge=1, description="Calibration rows from the training split.")
    max_drop: float = Field(0.05, ge=0, le=1, description="Quant gate: largest drop accepted on each evaluation-suite metric (in its own direction).")


class RegistryParams(Section):
    model_name: str = Field("reverse-digits", description="MLflow registered model name.")
    experiment: str = Field("llm-lifecycle", description="MLflow experiment for the flow's runs.")


class ServeParams(Section):
    engine: Literal["cpu", "vllm", "tensorrt-llm"] = Field("cpu", description="Serving engine; cpu runs transformers in-process.")
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `make serve` (the champion).")
    startup_timeout_s: float = Field(120, gt=0, description="How long to wait for /health after launch.")
    max_new_tokens: int = Field(64, ge=1, description="Upper bound on max_tokens per request.")
    cpu_threads: int = Field(0, ge=0, description="torch threads per CPU-engine server; 0 = this machine's cores divided by the servers running side by side (a canary runs two: oversubscribed cores cost ~8x throughput).")
    cache_entries: int = Field(1024, ge=0, description="Answers to deterministic requests (temperature 0 or a fixed seed; not streams) the gateway's in-memory cache keeps, keyed by model version (0 = no cache; with redis_url, Redis holds them within its maxmemory).")
    cache_ttl_s: float = Field(300, gt=0, description="How long a cached answer is served before the backend is asked again.")
    queue_capacity: int = Field(32, ge=1, description="Requests the gateway forwards at once per engine replica; the rest wait in its priority queue, higher tiers first. Twice the CPU engine's batch size (16): the engine then has its next batch queued while it generates one (at 16 the plane bench lost 38 % of the engine's throughput, at 64 20 %); higher only moves the queue into the engines, where priority is not seen.")
    queue_max_waiting: int = Field(128, ge=0, description="Requests that may wait in the gateway's queue; beyond it a request gets 429 with Retry-After at once.")
    keys_file: str | None = Field(None, description="YAML file mapping API keys to tiers {priority, rpm, tpm} (serving/keys.py); keep it out of git. null = no per-key tiers or rate limits.")
    redis_url: str | None = Field(None, description="redis://host:port/db shared by gateway replicas for the response cache and the rate limits; null = each gateway keeps its own in memory.")
    replicas: int = Field(1, ge=1, description="Engine processes per version in the serving plane (`make serve`), balanced by fewest requests outstanding.")
    plane_url: str | None = Field("auto", description="The running plane releases go into: 'auto' = http://host:port when a plane answers there for this registry; a URL; null = always an ephemeral gateway for the release.")
    drain_timeout_s: float = Field(60, gt=0, description="How long a version leaving the plane (promoted away, rolled back) may finish its requests in flight before it is stopped.")
    supervise_interval_s: float = Field(0.5, gt=0, description="How often the plane's supervisor checks each engine process (exited, or failing /health 3 times in a row: restarted).")
    target: Literal["local", "kserve"] = Field("local", description="Where a release goes: 'local' serves and judges it on this machine (the plane or an ephemeral gateway); 'kserve' renders a KServe InferenceService per canary step into kserve.out_dir for a cluster to apply (serving/kserve.py) and serves nothing here.")


class KServeParams(Section):
    """Serving on a cluster (serve.target: kserve): the InferenceService the release renders for
    each canary step, with KServe's Hugging Face runtime and its vLLM backend (serving/kserve.py).
    Rendered and validated here, never applied: `kubectl apply -f` does that on the cluster."""

    name: str | None = Field(None, description="InferenceService name (a DNS label); null: registry.model_name.")
    namespace: str = Field("default", description="Kubernetes namespace of the InferenceService.")
    runtime: str | None = Field(None, description="ServingRuntime or ClusterServingRuntime to use; null: KServe picks its Hugging Face runtime for modelFormat huggingface (vLLM backend).")
    storage_uri: str | None = Field(None, description="Where a version's model folder lives for the cluster, with {name} and {version}, e.g. s3://models/{name}/v{version}; null: the version's MLflow artifact location, which must then be object storage (s3://, gs://, ...).")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per replica (requests = limits); more than 1 also sets vLLM's --tensor-parallel-size. 0: no GPU requested.")
    cpu: str = Field("4", description="CPU per replica (Kubernetes quantity; requests = limits).")
    memory: str = Field("32Gi", description="Memory per replica (Kubernetes quantity; requests = limits).")
    min_replicas: int = Field(1, ge=0, description="Fewest predictor replicas (0 lets Knative scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most predictor replicas.")
    api_key_secret: str = Field("llm-serving-api-key", description="Kubernetes Secret holding the key clients must send (read as $VLLM_API_KEY); the key itself never appears in a manifest.")
    api_key_secret_key: str = Field("api-key", description="The key inside api_key_secret that holds the API key.")
    service_account: str | None = Field(None, description="Service account whose secret gives the storage initializer access to storage_uri (KServe's S3/GCS credentials); null: the namespace default.")
    deployment_mode: Literal["Serverless", "Knative"] = Field("Serverless", description="serving.kserve.io/deploymentMode: canaryTrafficPercent only splits traffic in Knative mode ('Serverless'; KServe >= 0.16 also calls it 'Knative').")
    extra_args: list[str] = Field(default_factory=list, description="More runtime arguments, verbatim (e.g. --max-model-len=4096).")
    out_dir: str = Field("deploy/kserve", description="Where the release writes the manifests: <out_dir>/v<N>/step-<w>.yaml, promote.yaml, rollback.yaml.")

    @model_validator(mode="after")
    def _replicas(self) -> "KServeParams":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class CanaryParams(Section):
    """Progressive delivery with the semantics of Argo Rollouts / Flagger: traffic weight steps,
    a minimum amount of evidence per step, metric checks, and a failure limit.

    The canary's error rate is judged by a sequential test against stable's own rate in the
    same step (`serving.analysis.ErrorRateTest`, Wald's SPRT): H0 "canary <= stable +
    error_rate_margin" against H1 "canary >= stable + error_rate_effect", with error
    probabilities error_rate_alpha and error_rate_beta. How many requests that takes follows
    from the effect, so `step_requests` is a floor raised to `min_step_requests`."""

    strategy: Literal["canary", "blue_green", "shadow"] = Field("canary", description="canary: weighted steps on live traffic; blue_green: the candidate is analysed on mirrored traffic (step_requests copies, answers compared with stable's), then all traffic switches at once; shadow: mirrored and reported, never promoted.")
    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100], description="Canary traffic weight (percent) at each step; the last should be 100.")
    step_requests: int = Field(20, ge=1, description="Fewest requests the canary must answer at each step before it is analysed; raised to min_step_requests, the fewest at which the error-rate test can pass a step.")
    interval_s: float = Field(0.0, ge=0, description="Shortest time spent at each step (real traffic needs minutes; the embedded demo drives its own).")
    golden_prompts: int = Field(20, ge=1, description="Held-out prompts sent straight to the canary; their exact match is checked.")
    shadow_prompts: int = Field(10, ge=0, description="Prompts sent to both stable and canary; their agreement is checked (0 = off).")
    min_exact_match: float = Field(0.8, ge=0, le=1, description="Canary's golden-prompt exact match must reach this.")
    champion_tolerance: float = Field(0.05, ge=0, le=1, description="Canary's golden exact match may trail stable's by at most this.")
    min_agreement: float = Field(0.8, ge=0, le=1, description="Share of shadowed prompts where canary and stable answer alike.")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="Error rate (5xx, refused, timeout) a release is held to when stable served nothing to compare with: the largest share a first release may fail, and stable's rate in the error-rate test at a step where stable got no traffic (the 100% step).")
    error_rate_margin: float = Field(0.001, ge=0, lt=1, description="Error-rate test, H0: the canary's error rate is at most stable's plus this (absolute). 0 says a canary may not fail more often than stable at all: against a stable without failures its first failure then fails the step.")
    error_rate_effect: float = Field(0.01, gt=0, lt=1, description="Error-rate test, H1: the canary's error rate is at least stable's plus this (absolute): the smallest degradation a step must catch, with probability 1 - error_rate_beta.")
    error_rate_alpha: float = Field(0.05, gt=0, lt=1, description="Largest probability that the error-rate test fails a step whose canary is within error_rate_margin of stable (a false rollback).")
    error_rate_beta: float = Field(0.1, gt=0, lt=1, description="Largest probability that the error-rate test passes a step whose canary is worse than stable by error_rate_effect (a missed regression).")
    max_latency_ratio: float = Field(2.5, gt=0, description="Canary p95 latency may be at most this multiple of stable's in the same step.")
    max_ttft_ratio: float = Field(3.0, gt=0, description="Canary's p95 time to first token, as its engine reports it (scraped from the engine's Prometheus endpoint: cpu, vLLM or TensorRT-LLM), may be at most this multiple of stable's in the same step.")
    ttft_floor_s: float = Field(0.05, ge=0, description="Times to first token below this count as this in the ratio above: differences under it do not matter to users, and engine histograms cannot resolve them.")
    failure_limit: int = Field(0, ge=0, description="Failed analyses tolerated before rolling back (0: the first failure rolls back).")

    @model_validator(mode="after")
    def _steps(self) -> "CanaryParams":
        if not self.steps or any(not 0 < w <= 100 for w in self.steps) or self.steps != sorted(self.steps):
            raise ValueError(f"steps must be increasing percentages in (0, 100], got {self.steps}")
        return self

    @model_validator(mode="after")
    def _error_rate_test(self) -> "CanaryParams":
        if self.error_rate_effect <= self.error_rate_margin:
            raise ValueError(f"error_rate_effect ({self.error_rate_effect}) must exceed error_rate_margin ({self.error_rate_margin}): the test tells the two apart")
        # A step analysed earlier could never pass: raise the floor rather than fail every step.
        # (The model is frozen; this is its own validation, so it sets the field directly.)
        object.__setattr__(self, "step_requests", max(self.step_requests, self.min_step_requests))
        return self

    @property
    def min_step_requests(self) -> int:
        """The fewest canary requests at which the error-rate test can pass a step: every answer
        without a failure lowers the log-likelihood ratio by ln((1 - margin) / (1 - effect)), and
        H0 is accepted at ln(beta), so a spotless canary against a spotless stable needs
        ceil(ln(1 / beta) / ln((1 - margin) / (1 - effect))). The same bound as
        serving.analysis.ErrorRateTest.floor at stable's rate 0 (the largest: a stable that
        fails too lowers it)."""
        import math

        per_answer = math.log((1 - self.error_rate_margin) / (1 - self.error_rate_effect))
        return math.ceil(math.log(1 / self.error_rate_beta) / per_answer)


class NotifyParams(Section):
    """Who hears about releases: a JSON POST to a webhook (Slack/Teams/Mattermost incoming
    webhooks read its `text`) on gate failure, rollback and promotion (tasks/notify.py)."""

    webhook_url: str | None = Field(None, description="URL the notifications are POSTed to; null = none (a URL with a secret in it belongs in webhook_url_env's variable, not here).")
    webhook_url_env: str = Field("LIFECYCLE_WEBHOOK_URL", description="Environment variable holding the webhook URL; it wins over webhook_url when set.")
    events: list[Literal["gate_failed", "rolled_back", "promoted", "shadowed"]] = Field(
        default_factory=lambda: ["gate_failed", "rolled_back", "promoted"], description="Which outcomes are sent."
    )
    timeout_s: float = Field(5, gt=0, description="Per attempt; a webhook that does not answer never fails or holds up the run (three attempts, then a warning).")


class OrchestrationParams(Section):
    """How the Prefect deployments run the flows (`make serve-flows`, flows/deployments.py)."""

    cron: str = Field("0 3 * * *", description="When the scheduled lifecycle run starts (cron syntax, in `timezone`); nightly at 03:00 by default.")
    timezone: str = Field("UTC", description="Time zone the cron is read in (an IANA name, e.g. Europe/Berlin).")
    concurrency_limit: int = Field(1, ge=1, description="Lifecycle and release runs of this project (model name and folder) that may run at once, on one Prefect server: they share the DVC workspace and the registry's aliases.")
    on_busy: Literal["wait", "drop"] = Field("wait", description="A run started while the limit is taken: 'wait' queues it (AwaitingConcurrencySlot) until a slot frees; 'drop' cancels it at once, its state message saying which run is busy.")


class Params(Section):
    recipe: list[str] = Field(default_factory=lambda: list(DEFAULT_RECIPE), description="Training steps in order, e.g. [sft, dpo], [sft, kto], [sft, rm, grpo]; each names an algorithm in pipelines/recipe.py and reads the params section of the same name.")
    stage_timeout_s: float | None = Field(None, gt=0, description="Longest one stage (`dvc repro <stage>`) may run; past it the stage and everything it started are stopped and the flow fails naming it (a hung stage otherwise hangs the flow). null = no limit.")
    data: DataParams = Field(default_factory=DataParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    model: ModelParams = Field(default_factory=ModelParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)
    sft: SftParams = Field(default_factory=SftParams)
    sweep: SweepParams = Field(default_factory=SweepParams)
    dpo: DpoParams = Field(default_factory=DpoParams)
    kto: KtoParams = Field(default_factory=KtoParams)
    orpo: OrpoParams = Field(default_factory=OrpoParams)
    cpo: CpoParams = Field(default_factory=CpoParams)
    rm: RmParams = Field(default_factory=RmParams)
    grpo: GrpoParams = Field(default_factory=GrpoParams)
    rloo: RlooParams = Field(default_factory=RlooParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gate: GateParams = Field(default_factory=GateParams)
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    canary: CanaryParams = Field(default_factory=CanaryParams)
    kserve: KServeParams = Field(default_factory=KServeParams, description="The InferenceService a release renders when serve.target is kserve (serving/kserve.py).")
    notify: NotifyParams = Field(default_factory=NotifyParams)
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)

    @model_validator(mode="after")
    def _recipe(self) -> "Params":
        problems = check_recipe(self.recipe)
        for step in self.recipe:
            rl = getattr(self, step, None)
            if isinstance(rl, RlParams) and "reward_model" in rl.rewards and "rm" not in self.recipe[: self.recipe.index(step)]:
                problems.append(f"{step}.rewards names 'reward_model' but no 'rm' step comes before '{step}' in the recipe")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> "Params":
        from pipelines.gates import DIRECTIONS  # the built-in metrics' directions

        known = {**DIRECTIONS, **self.evaluate.directions()}
        unknown = sorted(set(self.gate.thresholds) - set(known))
        if unknown:
            raise ValueError(f"gate.thresholds on unknown metric(s) {unknown}: name a suite metric as '<task>/<metric>' (evaluate.tasks) or a built-in one; known: {', '.join(known)}")
        judged = self.evaluate.judge.task
        if judged is not None and judged not in {t.name for t in self.evaluate.tasks}:
            raise ValueError(f"evaluate.judge.task '{judged}' is not in evaluate.tasks ({', '.join(t.name for t in self.evaluate.tasks)})")
        return self

    @property
    def bootstrapped(self) -> bool:
        return self.model.base_model == BOOTSTRAP


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and a fix."""


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the parent of `loc`, to suggest the key the user meant
    (stepping through list items such as data.sources.0)."""
    import typing

    model: Any = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(part, str) and hasattr(model, "model_fields") else None
        if field is None:
            return None
        model = field.annotation
        if typing.get_origin(model) is list:
            model = typing.get_args(model)[0]
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid; nothing was run:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key{_suggest(str(e['loc'][-1]), _model_at(e['loc']))}")
        else:
            lines.append(f"  - {key}: {e['msg']} (got {e.get('input')!r})")
    lines.append("Fix the key(s) above; every key and its meaning is listed in pipelines/config.py.")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path))) from None


def snapshot(params: Params) -> str:
    """The effective config (defaults filled in), logged with every run."""
    return json.dumps(params.model_dump(mode="json"), indent=2, sort_keys=True)
