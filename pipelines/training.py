"""What every training step shares: where it runs and in which precision, how its model is
loaded and adapted (full or any PEFT method), its resumable checkpoints, its distributed
launch, and how it saves a plain merged checkpoint with its metrics.

Each algorithm module (sft.py, dpo.py, kto.py, orpo.py, cpo.py, rm.py, grpo.py, rloo.py) only
builds its dataset and its TRL trainer; `run_step` does the rest the same way for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from pipelines.common import METRICS, MODELS, PREPARED, base_model_ref, file_digest, log, write_json
from pipelines.config import ComputeParams, Params, PeftParams, TrainParams
from pipelines.model_files import pretrained_kwargs
from pipelines.recipe import input_model, model_dir

# A drill for the resume path: the process dies (as under SIGKILL or an OOM kill) right after
# this optimizer step, wherever the last checkpoint was. Used by the kill-and-resume test.
CRASH_ENV = "LIFECYCLE_CRASH_AT_STEP"


# ---------------------------------------------------------------- device and precision


@dataclass(frozen=True)
class DevicePlan:
    device: Literal["cuda", "cpu"]
    precision: Literal["bf16", "fp16", "fp32"]

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    def trainer_args(self) -> dict:
        """TrainingArguments fields: mixed precision and the device."""
        return {"use_cpu": self.device == "cpu", "bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}


def plan_device(cfg: ComputeParams, cuda_available: bool, bf16_supported: bool) -> DevicePlan:
    """Pure: the machine's facts in, the plan out (tested for the CUDA and CPU cases alike).
    auto = CUDA with bf16 when the GPU supports it (fp16 otherwise), CPU with fp32."""
    if cfg.device == "cuda" and not cuda_available:
        raise ValueError("compute.device is 'cuda' but no CUDA GPU is visible: set compute.device to auto or cpu")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda_available) else "cpu"
    if cfg.precision == "auto":
        precision = ("bf16" if bf16_supported else "fp16") if device == "cuda" else "fp32"
    else:
        precision = cfg.precision
    if device == "cpu" and precision == "fp16":
        raise ValueError("compute.precision 'fp16' needs a GPU (mixed fp16 is not supported on the CPU): use fp32 or bf16")
    if device == "cuda" and precision == "bf16" and not bf16_supported:
        raise ValueError("compute.precision 'bf16' is not supported by this GPU: use fp16 or auto")
    return DevicePlan(device, precision)


def machine_plan(cfg: ComputeParams) -> DevicePlan:
    """The plan for this machine; also gives torch the configured CPU thread count, so every
    stage that asks where to run (training, evaluation, quantization) runs with it."""
    use_cpu_threads(cfg)
    cuda = torch.cuda.is_available()
    return plan_device(cfg, cuda, cuda and torch.cuda.is_bf16_supported())


def use_cpu_threads(cfg: ComputeParams) -> None:
    """`compute.cpu_threads` torch threads, unless the environment already says (OMP_NUM_THREADS)."""
    if cfg.cpu_threads and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)


# Optional packages that transformers, accelerate and TRL import only to ask whether a model is
# wrapped by them, or for a feature no stage here uses: DeepSpeed (and through its autotuner
# MLflow and FastAPI) on every trainer start and model save, scikit-learn (and SciPy) for
# assisted generation's confidence threshold. 3-4 s of CPU in every stage process on this
# machine (measured: ARCHITECTURE.md). A stage that does not use them runs as if they were not
# installed, which every one of those libraries supports.
OPTIONAL_UNUSED = ("deepspeed", "sklearn")


def skip_unused_imports(*names: str) -> None:
    """Make `import name` fail as for a package that is not installed (libraries then take
    their path without it), unless this process already imported it. Only in a stage's own
    process (`python -m pipelines.<stage>`): a process that runs stages as a library (the
    tests, the flow) may need these packages afterwards."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name.startswith("pipelines."):
        return
    for name in names:
        sys.modules.setdefault(name, None)


# ---------------------------------------------------------------- models and adapters


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    if tokenizer.pad_token is None:  # many released checkpoints ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, plan: DevicePlan, peft: PeftParams, seed: int, model_cls=None, **kwargs):
    """Trained weights stay fp32 (the optimizer's master copy; autocast gives the speed), while
    weights a PEFT method freezes are loaded in the plan's precision to save memory. QLoRA loads
    them in 4 bits, which bitsandbytes does on CUDA only. The step's seed is set first: what
    loading creates (a reward model's new score head) is drawn from it, not from whatever the
    process's random state happened to be (the reward model's held-out accuracy once depended
    on whether SFT had run earlier in the same process)."""
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)

    model_cls = model_cls or AutoModelForCausalLM
    frozen = peft.method != "full"
    extra: dict = {}
    if peft.method == "qlora":
        if plan.device != "cuda":
            raise ValueError("peft.method 'qlora' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU: use 'lora' on the CPU")
        extra["quantization_config"] = qlora_quantization(plan)
    dtype = plan.dtype if frozen and plan.device == "cuda" else torch.float32
    return model_cls.from_pretrained(ref, dtype=dtype, **extra, **pretrained_kwargs(ref), **kwargs)  # safetensors only, no repository code


def qlora_quantization(plan: DevicePlan):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=plan.dtype)


def linear_module_names(model) -> list[str]:
    """The projection layers 'all-linear' means, spelled out for methods that need names
    (IA3, VeRA): every nn.Linear leaf except the output head."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head", "score"})


def peft_config(cfg: PeftParams, model, task_type: str = "CAUSAL_LM", total_steps: int | None = None):
    """The PEFT config for `cfg.method`, or None for full training."""
    import peft as P

    m = cfg.method
    if m == "full":
        return None
    targets = cfg.target_modules
    named = linear_module_names(model) if targets == "all-linear" else targets
    common = {"modules_to_save": cfg.modules_to_save or None, "task_type": task_type}
    if m in ("lora", "qlora", "dora", "rslora", "pissa", "olora"):
        init = {"pissa": "pissa", "olora": "olora"}.get(m, True)
        return P.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            use_dora=m == "dora", use_rslora=m == "rslora", init_lora_weights=init, **common,
        )
    if m == "adalora":
        steps = total_steps or 100
        # Rank budget: start at 2r and prune towards r over the middle of training.
        return P.AdaLoraConfig(
            init_r=2 * cfg.r, target_r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            total_step=steps, tinit=max(steps // 10, 1), tfinal=max(steps // 5, 1), deltaT=max(steps // 20, 1), **common,
        )
    if m == "ia3":
        ff = [n for n in named if any(k in n for k in ("mlp", "fc", "up", "down", "gate", "w1", "w2", "w3"))]
        return P.IA3Config(target_modules=named, feedforward_modules=ff, **common)
    if m == "loha":
        return P.LoHaConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=targets, **common)
    if m == "lokr":
        return P.LoKrConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=targets, **common)
    if m == "vera":
        return P.VeraConfig(r=cfg.r, vera_dropout=cfg.dropout, target_modules=named, **common)
    raise ValueError(f"unknown peft.method '{m}'")


def adapter_callbacks(cfg: PeftParams) -> list:
    """AdaLoRA reallocates rank from gradient sensitivity; the trainer must call it once per
    optimizer step, after the backward pass and before the gradients are cleared."""
    if cfg.method != "adalora":
        return []
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            inner = getattr(model, "base_model", None)
            if inner is not None and hasattr(inner, "update_and_allocate"):
                inner.update_and_allocate(state.global_step)

    return [AdaLoraBudget()]


def steps_counter():
    """A callback counting the optimizer steps this process runs: a resumed run's own work,
    whatever its checkpoint is called and wherever its step counter starts."""
    from transformers import TrainerCallback

    class StepsRun(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1

    return StepsRun()


def crash_drill_callbacks() -> list:
    at = os.environ.get(CRASH_ENV)
    if not at:
        return []
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(at):
                print(f"{CRASH_ENV}={at}: dying after step {at}", flush=True)
                os._exit(137)  # no cleanup, no final save: as a SIGKILL would leave it

    return [Crash()]


# ---------------------------------------------------------------- data, checkpoints, launch


def read_table(table: str, split: str) -> pd.DataFrame:
    path = PREPARED / f"{table}_{split}.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the prepare stage (dvc repro prepare)")
    return pd.read_parquet(path)


def table_files(table: str, *splits: str) -> list[Path]:
    return [PREPARED / f"{table}_{s}.parquet" for s in splits]


def checkpoint_dir(stage: str, *fingerprint: object) -> Path:
    """Checkpoints live under a hash of everything that shapes the run, so a rerun after a crash
    resumes (same hash) while a changed config or dataset starts fresh (new hash). They are not
    DVC outputs: DVC would wipe them before rerunning the stage, exactly when they are needed."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return MODELS / "checkpoints" / stage / digest


def last_checkpoint(path: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(path)) if path.is_dir() else None


def maybe_relaunch_distributed(cfg: TrainParams, module: str) -> bool:
    """Re-run this stage under torch.distributed.run when more than one process is asked for,
    or when DeepSpeed is on (even with one process: without a launcher's env vars DeepSpeed
    falls back to MPI discovery). Returns True in the launcher, which has nothing left to do."""
    if (cfg.nproc <= 1 and not cfg.deepspeed) or "LOCAL_RANK" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}", "-m", module, *sys.argv[1:]]
    log.info("launching %d processes: %s", cfg.nproc, " ".join(cmd))
    subprocess.run(cmd, check=True)
    return True


def trainer_args(cfg: TrainParams, plan: DevicePlan, output_dir: Path) -> dict:
    """The TrainingArguments every algorithm shares; each adds its own fields."""
    return {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": 1,
        "logging_steps": max(1, min(10, cfg.max_steps // 10)),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": [],  # metrics reach MLflow through the flow, not from inside the stage
        "deepspeed": cfg.deepspeed,
        "fsdp": cfg.fsdp or "",
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **plan.trainer_args(),
    }


# ---------------------------------------------------------------- the step runner


@dataclass
class Step:
    """What an algorithm module hands to `run_step`."""

    trainer: object
    tokenizer: object
    evaluate: Callable[[object], dict] | None = None  # its own held-out metrics, before and after
    save: Callable[[object, Path], None] | None = None  # default: merge adapters, save_pretrained


def offline_step(trainer_cls, config, cfg: TrainParams, plan: DevicePlan, ref: str, table: str, to_dataset: Callable, evaluate: Callable, model_cls=None, **model_kw) -> Step:
    """What every offline algorithm builds alike: tokenizer and model from `ref`, its TRL
    trainer on `table`'s train and test splits, and the PEFT config of `cfg`."""
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, plan, cfg.peft, cfg.seed, model_cls=model_cls, **model_kw)
    if model.config.pad_token_id is None:  # a classifier reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    task_type = "SEQ_CLS" if model_cls is not None and "SequenceClassification" in model_cls.__name__ else "CAUSAL_LM"
    trainer = trainer_cls(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=to_dataset(read_table(table, "train")), eval_dataset=to_dataset(read_table(table, "test")),
        peft_config=peft_config(cfg.peft, model, task_type=task_type, total_steps=cfg.max_steps),
    )
    return Step(trainer, tokenizer, evaluate=evaluate)


def step_inputs(params: Params, step: str) -> tuple[str, str]:
    """(model to start from, its digest): the previous policy step's output or the base."""
    ref = input_model(params.recipe, step, params.model.start_from) or base_model_ref(params)
    digest = file_digest(Path(ref)) if Path(ref).exists() else ref  # a hub id pins itself by name
    return ref, digest


def run_step(step: str, params: Params, cfg: TrainParams, data_files: list[Path], build: Callable[[DevicePlan, Path, str], Step]) -> dict | None:
    """Train one recipe step: relaunch under torch.distributed.run when asked, resume from the
    last checkpoint of an identical run, train, evaluate before/after, save models/<step> as a
    plain checkpoint, write metrics/<step>.json, and drop the checkpoints once done."""
    if maybe_relaunch_distributed(cfg, f"pipelines.{step}"):
        return None
    skip_unused_imports(*(n for n in OPTIONAL_UNUSED if not (n == "deepspeed" and cfg.deepspeed)))
    plan = machine_plan(params.compute)
    ref, digest = step_inputs(params, step)
    ckpt = checkpoint_dir(step, cfg.model_dump(mode="json"), plan.precision, digest, file_digest(*data_files))
    built = build(plan, ckpt, ref)
    trainer = built.trainer
    counter = steps_counter()
    for cb in [counter, *adapter_callbacks(cfg.peft), *crash_drill_callbacks()]:
        trainer.add_callback(cb)
    # Under DeepSpeed the engine is built by train(); an evaluation before it would ask for a
    # ZeRO inference engine, which only stage 3 offers. The "before" figures are then skipped.
    before = built.evaluate(trainer) if built.evaluate and not cfg.deepspeed else {}
    resume = last_checkpoint(ckpt)
    if resume:
        log.info("resuming %s from %s", step, resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    after = built.evaluate(trainer) if built.evaluate else {}
    out = model_dir(step)
    if is_zero3(trainer):
        export_zero3(trainer, ckpt / "final", out, cfg.peft)  # a collective: every rank takes part
    if not trainer.is_world_process_zero():
        close_distributed()
        return None
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if not is_zero3(trainer):
        (built.save or save_merged)(trainer, out)
    built.tokenizer.save_pretrained(out)
    summary = write_training_metrics(
        step,
        trainer,
        {
            **after,
            **{f"{k}_before": v for k, v in before.items()},
            "train_seconds": seconds,
            "trainable_parameters": trainable,
            "peft_method": cfg.peft.method,
            "device": plan.device,
            "precision": plan.precision,
            "world_size": trainer.args.world_size,
            "input_model": ref,
            "resumed_from": resume,
            "steps_run": counter.steps,  # optimizer steps this process ran: a resumed run shows only what was left
        },
    )
    shutil.rmtree(ckpt, ignore_errors=True)  # finished: the checkpoint has done its job
    log.info("%s done: %s", step, summary)
    close_distributed()
    return summary


def close_distributed() -> None:
    """Every rank waits here until rank 0 has saved, then leaves the process group itself. A rank
    that simply exited while another still held the group was once killed by SIGABRT at
    interpreter exit (ZeRO-3, 2 processes, in CI), failing a run whose work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def save_merged(trainer, out_dir: Path) -> None:
    """Save a plain Hugging Face checkpoint (adapters merged) so every later stage, lm-eval,
    llm-compressor and every serving engine can load it without knowing about PEFT."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = getattr(model, "module", model)  # DDP/DeepSpeed wrappers
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)


def is_zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def export_zero3(trainer, tmp: Path, out_dir: Path, peft: PeftParams) -> None:
    """ZeRO-3 shards every weight across processes: `save_model` gathers them (all ranks must
    call it); rank 0 then merges the adapter into a fresh copy of the base and saves it."""
    if peft.method in ("pissa", "olora"):
        raise ValueError(f"peft.method '{peft.method}' rewrites the base weights at init and cannot be exported from ZeRO-3 here: use lora, or ZeRO-2")
    trainer.save_model(str(tmp))
    if not trainer.is_world_process_zero():
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if peft.method == "full":
        shutil.copytree(tmp, out_dir)
    else:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # The live ZeRO-3 config would make from_pretrained partition the copy across ranks
        # (a collective that only this rank joins): load it as a plain model instead.
        unset_hf_deepspeed_config()
        seq_cls = "SequenceClassification" in type(getattr(trainer.model, "base_model", trainer.model).model).__name__
        loader = AutoPeftModelForSequenceClassification if seq_cls else AutoPeftModelForCausalLM
        loader.from_pretrained(str(tmp), dtype=torch.float32).merge_and_unload().save_pretrained(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)


def write_training_metrics(stage: str, trainer, extra: dict) -> dict:
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "final_train_loss": train_logs[-1]["loss"] if train_logs else None, **extra}
    write_json(METRICS / f"{stage}.json", summary)
    write_json(METRICS / f"{stage}_history.json", [h for h in history if "step" in h])
    return summary


# ---------------------------------------------------------------- datasets shared by algorithms


def pair_dataset(frame: pd.DataFrame):
    """Preference pairs as TRL's conversational explicit-prompt rows."""
    from datasets import Dataset

    from pipelines.formats import chat_messages

    return Dataset.from_list(
        [{"prompt": chat_messages(p), "chosen": chat_messages(c), "rejected": chat_messages(r)} for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])]
    )


def prompt_dataset(frame: pd.DataFrame):
    """SFT conversations as RL prompts: the conversation up to its last assistant turn, with
    that turn's text as the reference `answer` rule-based rewards compare against."""
    from datasets import Dataset

    from pipelines.formats import chat_messages

    rows = []
    for cell in frame["messages"]:
        messages = chat_messages(cell)
        rows.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
    return Dataset.from_list(rows)
