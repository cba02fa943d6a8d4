"""Stage `evaluate`: measure base, SFT and DPO models on the held-out test split.

- exact match from lm-evaluation-harness, on the task declared in pipelines/eval_tasks/<task>.yaml
  (the YAML is the behaviour; this module only fills in the data file),
- validation loss (mean token NLL of the reference answers), our own metric,
- per-item scores (lm-eval's log_samples) so gates can pair candidate and champion item by item.

metrics/evaluate.json holds one block per model; metrics/samples/<model>.jsonl the per-item rows.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipelines.common import DPO_DIR, METRICS, PREPARED, SFT_DIR, base_model_ref, log, stage_main, write_json
from pipelines.config import EvaluateParams, Params

TASKS_DIR = Path(__file__).parent / "eval_tasks"
TEST_FILE = PREPARED / "sft_test.parquet"
VALIDATION_FILE = PREPARED / "sft_validation.parquet"


def task_config(cfg: EvaluateParams, data_file: Path) -> dict:
    path = TASKS_DIR / f"{cfg.task}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise SystemExit(f"evaluate.task: unknown task '{cfg.task}', available: {', '.join(available)}")
    task = yaml.safe_load(path.read_text())
    task["dataset_kwargs"] = {"data_files": {task["test_split"]: str(Path(data_file).resolve())}}
    task["generation_kwargs"]["max_gen_toks"] = cfg.max_new_tokens
    return task


def exact_match(model_ref: str, cfg: EvaluateParams, data_file: Path = TEST_FILE) -> tuple[float, list[dict]]:
    """lm-eval exact match over the test split, and the per-item scores behind it."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task = task_config(cfg, data_file)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_ref, "dtype": "float32"},
        tasks=[task],
        batch_size=cfg.batch_size,
        apply_chat_template=True,
        log_samples=True,
        limit=cfg.limit,
        device="cpu",
    )
    result = out["results"][task["task"]]
    score = next(v for k, v in result.items() if k.startswith("exact_match,"))
    samples = [
        {
            "doc_id": s["doc_id"],
            "prompt": s["doc"]["messages"][0]["content"],  # the pairing key across models and runs
            "target": s["target"],
            "response": s["filtered_resps"][0],
            "exact_match": s["exact_match"],
        }
        for s in out["samples"][task["task"]]
    ]
    return float(score), samples


@torch.no_grad()
def validation_loss(model_ref: str, data_file: Path = VALIDATION_FILE) -> float:
    """Mean NLL per answer token (prompt tokens masked), teacher-forced, over the validation split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for messages in pd.read_parquet(data_file)["messages"]:
        messages = [dict(m) for m in messages]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[0, :n_prompt] = -100
        n = int((labels[0, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / max(count, 1)


def measure(name: str, model_ref: str, cfg: EvaluateParams) -> dict:
    score, samples = exact_match(model_ref, cfg)
    loss = validation_loss(model_ref)
    samples_dir = METRICS / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    (samples_dir / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    log.info("%s: exact_match=%.3f validation_loss=%.3f (%d items)", name, score, loss, len(samples))
    return {"exact_match": score, "validation_loss": loss if math.isfinite(loss) else None, "items": len(samples)}


def run(params: Params) -> None:
    models = {"base": base_model_ref(params), "sft": str(SFT_DIR), "dpo": str(DPO_DIR)}
    results = {name: measure(name, ref, params.evaluate) for name, ref in models.items()}
    pref = json.loads((METRICS / "preference.json").read_text())
    results["dpo"]["preference_accuracy"] = pref["preference_accuracy"]
    write_json(METRICS / "evaluate.json", results)


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
