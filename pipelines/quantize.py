"""Stage `quantize`: one-shot post-training quantization with llm-compressor.

The candidate (the recipe's last policy step, or the step the evaluate stage chose) is quantized with GPTQ (calibrated on training prompts) or plain
round-to-nearest, to the compressed-tensors format that transformers, vLLM and our CPU engine
all load. The quantized model is then measured exactly like the others, so the quant gate can
bound the quality it lost (metrics/quantize.json).
"""

from __future__ import annotations

import shutil
import time

import pandas as pd

from pipelines.common import METRICS, PREPARED, QUANT_DIR, log, read_json, stage_main, write_json
from pipelines.config import Params, QuantizeParams
from pipelines.evaluate import measure, reward_model_of
from pipelines.formats import chat_messages
from pipelines.recipe import final_step, model_dir
from pipelines.training import skip_unused_imports, use_cpu_threads


def recipe(cfg: QuantizeParams):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    # lm_head stays in full precision: it is small here and the most sensitive layer anywhere.
    if cfg.algorithm == "gptq":
        return GPTQModifier(targets="Linear", scheme=cfg.scheme, ignore=["lm_head"])
    return QuantizationModifier(targets="Linear", scheme=cfg.scheme, ignore=["lm_head"])


def calibration_set(tokenizer, n: int):
    from datasets import Dataset

    rows = pd.read_parquet(PREPARED / "sft_train.parquet")["messages"].head(n)
    texts = [tokenizer.apply_chat_template(chat_messages(msgs), tokenize=False) for msgs in rows]
    return Dataset.from_dict({"text": texts})


def quantize(src: str, out_dir, cfg: QuantizeParams) -> float:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.model_files import pretrained_kwargs

    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", **pretrained_kwargs(src))
    started = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=recipe(cfg),
        dataset=calibration_set(tokenizer, cfg.calibration_samples),
        num_calibration_samples=cfg.calibration_samples,
        max_seq_length=128,
        # Its default draws the calibration order from torch's unseeded RNG: the Hessians then sum
        # in another order each run and a few weights round the other way, so a rebuild of the
        # same inputs gave other bytes (`lifecycle reproduce`). Length-aware order is fixed.
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - started
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return seconds


def run(params: Params) -> None:
    cfg = params.quantize
    use_cpu_threads(params.compute)  # GPTQ's calibration runs before anything asks for the device plan
    skip_unused_imports("deepspeed")  # scikit-learn stays: lm-eval's metrics may need it
    before = read_json(METRICS / "evaluate.json")["candidate"]
    # The evaluate stage chose the candidate: the recipe's last step, or under
    # gate.step_regression: serve_best the last step before a regression.
    source = model_dir(before.get("step") or final_step(params.recipe))
    if not cfg.enabled:
        # Keep the stage's outputs well defined: the "quantized" model is the candidate itself.
        if QUANT_DIR.exists():
            shutil.rmtree(QUANT_DIR)
        shutil.copytree(source, QUANT_DIR)
        (METRICS / "samples/quantized.jsonl").write_bytes((METRICS / "samples/candidate.jsonl").read_bytes())
        write_json(METRICS / "quantize.json", {"enabled": False, **before, "drop": {m: 0.0 for m in params.evaluate.directions()}})
        return
    seconds = quantize(str(source), QUANT_DIR, cfg)
    after = measure("quantized", str(QUANT_DIR), params.evaluate, params.compute, reward_model_of(params))
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    result = {
        "enabled": True,
        "scheme": cfg.scheme,
        "algorithm": cfg.algorithm,
        "quantize_seconds": seconds,
        **after,
        # How much worse, in each suite metric's own direction (the quant gate bounds these).
        "drop": {m: (before[m] - after[m]) * (1 if d == "higher" else -1) for m, d in params.evaluate.directions().items() if before.get(m) is not None and after.get(m) is not None},
        "size_bytes": size(QUANT_DIR),
        "size_ratio": size(QUANT_DIR) / max(size(source), 1),
    }
    write_json(METRICS / "quantize.json", result)
    log.info("quantized %s with %s: %s", cfg.scheme, cfg.algorithm, result)


def main() -> None:
    stage_main("quantize", run)


if __name__ == "__main__":
    main()
