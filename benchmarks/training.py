"""`make bench`: SFT through the pipeline's `sft` stage against a plain TRL script with the same
model, data, steps, batch size and thread count.

Both train the same number of optimizer steps on batches of the same number of
conversations, so they are compared by optimizer steps per second and by CPU seconds per
step. The pipeline adds the tokenisation with assistant masks, checkpoints, validation and
metrics, and packs each batch's conversations into shared rows (pipelines/sft.py,
BatchPacker) where plain TRL pads every one to the batch's longest: the tokens a batch costs
each way are printed beside the real ones, from the same sampled batches. The target is that
the stage's training loop is no slower than plain TRL's (ratio >= 0.95). Figures are printed,
never asserted.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.95
PLAIN = '''
import json, sys, time
import pandas as pd
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from pipelines.config import load_params
cfg = load_params().sft
tok = AutoTokenizer.from_pretrained("models/base")
model = AutoModelForCausalLM.from_pretrained("models/base")
def rows(f):
    return Dataset.from_list([{"prompt": [dict(m) for m in ms[:-1]], "completion": [dict(ms[-1])]} for ms in pd.read_parquet(f)["messages"]])
args = SFTConfig(output_dir="plain-out", max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                 warmup_steps=cfg.warmup_steps, max_length=cfg.max_length, logging_steps=10, save_strategy="no", eval_strategy="no",
                 use_cpu=True, report_to=[], seed=cfg.seed, disable_tqdm=True)
from peft import LoraConfig
peft = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, target_modules=cfg.peft.target_modules, modules_to_save=cfg.peft.modules_to_save or None, task_type="CAUSAL_LM")
t = SFTTrainer(model=model, args=args, train_dataset=rows("data/prepared/sft_train.parquet"), processing_class=tok, peft_config=peft)
started = time.perf_counter(); cpu = time.process_time(); t.train(); seconds = time.perf_counter() - started; cpu = time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "steps": t.state.global_step}))
'''


def env(threads: int) -> dict:
    extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **extra}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tokens_per_batch(params, batches: int = 200) -> dict[str, float]:
    """Mean tokens of a training batch: real ones, padded to the longest (plain TRL), packed
    (the stage), over the same random batches of the prepared training split."""
    import pandas as pd
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipelines.sft import BatchPacker, to_dataset
    from pipelines.training import load_tokenizer

    cfg = params.sft
    tok = load_tokenizer("models/base")
    rows = to_dataset(pd.read_parquet("data/prepared/sft_train.parquet"), tok, cfg.loss_on)
    examples = [{"input_ids": r["input_ids"][: cfg.max_length], "labels": r["input_ids"][: cfg.max_length]} for r in rows]
    padded, packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id), BatchPacker(tok.pad_token_id, cfg.max_length)
    rng = random.Random(0)
    totals = {"real": 0, "padded": 0, "packed": 0}
    for _ in range(batches):
        batch = rng.sample(examples, cfg.batch_size)
        totals["real"] += sum(len(e["input_ids"]) for e in batch)
        totals["padded"] += padded(batch)["input_ids"].numel()
        totals["packed"] += packed(batch)["input_ids"].numel()
    return {k: v / batches for k, v in totals.items()}


def main() -> None:
    from pipelines import bootstrap, generate, prepare
    from pipelines.config import load_params

    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-sft-"))
    params_text = (ROOT / "params.yaml").read_text()
    (work / "params.yaml").write_text(params_text)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        params = load_params()
        generate.run(params)
        prepare.run(params)
        bootstrap.run(params)
        tokens = tokens_per_batch(params)
    finally:
        os.chdir(cwd)
    threads = params.compute.cpu_threads
    # The pipeline's stage, with checkpoints and evaluation as configured, as DVC runs it.
    started, cpu_before = time.perf_counter(), children_cpu()
    subprocess.run([sys.executable, "-m", "pipelines.sft"], cwd=work, env=env(threads), check=True, capture_output=True)
    stage_wall, stage_cpu = time.perf_counter() - started, children_cpu() - cpu_before
    ours = json.loads((work / "metrics/sft.json").read_text())
    plain_out = subprocess.run([sys.executable, "-c", PLAIN], cwd=work, env=env(threads), check=True, capture_output=True, text=True).stdout
    plain = json.loads(plain_out.strip().splitlines()[-1])
    steps = ours["steps_run"]
    ours_sps, plain_sps = steps / ours["train_seconds"], plain["steps"] / plain["seconds"]
    ratio = ours_sps / plain_sps
    print(f"\nSFT ({params.sft.max_steps} steps, batch {params.sft.batch_size}, {params.sft.peft.method}, {threads or 'all'} torch thread(s)):")
    print(f"  tokens a batch : {tokens['real']:.0f} real; packed {tokens['packed']:.0f} (stage), padded to the longest {tokens['padded']:.0f} (plain TRL)")
    print(f"  pipeline stage : {ours_sps:6.1f} steps/s  ({steps} steps in {ours['train_seconds']:.1f} s; whole stage {stage_wall:.1f} s wall, {stage_cpu:.1f} s CPU)")
    print(f"  plain TRL      : {plain_sps:6.1f} steps/s  ({plain['steps']} steps in {plain['seconds']:.1f} s, {1000 * plain['cpu'] / plain['steps']:.0f} ms CPU a step)")
    print(f"  ratio          : {ratio:.2f}  (target >= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
