"""`make bench`: SFT throughput (trained tokens per second) through the pipeline's `sft` stage
against a plain TRL script with the same model, data and settings. The pipeline adds the
tokenisation with assistant masks, checkpoints and metrics; the target is that it costs no
more than 5 % (ratio >= 0.95). Figures are printed, never asserted.
"""

from __future__ import annotations

import json
import os
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
started = time.perf_counter(); t.train(); seconds = time.perf_counter() - started
tokens = max(h.get("num_tokens", 0) for h in t.state.log_history)
print(json.dumps({"seconds": seconds, "tokens": tokens}))
'''


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


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
    finally:
        os.chdir(cwd)
    # The pipeline's stage, with checkpoints and evaluation as configured, as DVC runs it.
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.sft"], cwd=work, env=env(), check=True, capture_output=True)
    stage_wall = time.perf_counter() - started
    ours = json.loads((work / "metrics/sft.json").read_text())
    history = json.loads((work / "metrics/sft_history.json").read_text())
    our_tokens = max(h.get("num_tokens", 0) for h in history)
    plain_out = subprocess.run([sys.executable, "-c", PLAIN], cwd=work, env=env(), check=True, capture_output=True, text=True).stdout
    plain = json.loads(plain_out.strip().splitlines()[-1])
    ours_tps, plain_tps = our_tokens / ours["train_seconds"], plain["tokens"] / plain["seconds"]
    ratio = ours_tps / plain_tps
    print(f"\nSFT throughput ({params.sft.max_steps} steps, batch {params.sft.batch_size}, {params.sft.peft.method}):")
    print(f"  pipeline stage : {ours_tps:9.0f} tokens/s  ({our_tokens:.0f} tokens in {ours['train_seconds']:.1f} s; whole stage {stage_wall:.1f} s)")
    print(f"  plain TRL      : {plain_tps:9.0f} tokens/s  ({plain['tokens']:.0f} tokens in {plain['seconds']:.1f} s)")
    print(f"  ratio          : {ratio:.2f}  (target >= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
