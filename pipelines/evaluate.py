"""Stage `evaluate`: measure the base and every policy step of the recipe on held-out data.
The recipe's last policy step is the `candidate` the gates read.

- exact match from lm-evaluation-harness, on the task declared in pipelines/eval_tasks/<task>.yaml
  (the YAML is the behaviour; this module only fills in the data file),
- validation loss (mean token NLL of the reference answers), our own metric,
- preference accuracy: how often the model gives the chosen answer of a held-out pair a higher
  log-likelihood than the rejected one. It needs no reference model, so it means the same thing
  whatever the recipe (SFT only, DPO, KTO, GRPO, ...) and for the base,
- per-item scores (lm-eval's log_samples) so gates can pair candidate and champion item by item.

metrics/evaluate.json holds one block per model; metrics/samples/<model>.jsonl the per-item rows.
Runs on the GPU when there is one (compute.device), in the plan's precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipelines.common import METRICS, PREPARED, base_model_ref, log, stage_main, write_json
from pipelines.config import ComputeParams, EvaluateParams, Params
from pipelines.formats import chat_messages
from pipelines.recipe import final_step, model_dir, policy_steps
from pipelines.training import machine_plan

TASKS_DIR = Path(__file__).parent / "eval_tasks"
TEST_FILE = PREPARED / "sft_test.parquet"
VALIDATION_FILE = PREPARED / "sft_validation.parquet"
PAIRS_FILE = PREPARED / "preference_test.parquet"
ITEMS_FILE = METRICS / "eval_items.parquet"  # the test split as single-turn items for lm-eval


def eval_items(data_file: Path) -> Path:
    """lm-eval's task reads `messages[0]` (the question) and `messages[1]` (the answer): give it
    each test conversation's last user turn and final answer, system and history aside."""
    frame = pd.read_parquet(data_file)
    ids = frame["id"] if "id" in frame else [None] * len(frame)
    rows = []
    for cell, item_id in zip(frame["messages"], ids):
        messages = chat_messages(cell)
        if len(messages) >= 2 and messages[-2]["role"] == "user":
            pair = [{"role": "user", "content": messages[-2]["content"]}, {"role": "assistant", "content": messages[-1]["content"]}]
            # The pairing key of gates: stable across runs and models, distinct for two items
            # that share a prompt but not an answer.
            rows.append({"messages": pair, "id": item_id or hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]})
    ITEMS_FILE.parent.mkdir(parents=True, exist_ok=True)
    out = ITEMS_FILE.with_name(f"{Path(data_file).stem}_items.parquet")
    pd.DataFrame(rows, columns=["messages", "id"]).to_parquet(out, index=False)
    return out


def task_config(cfg: EvaluateParams, data_file: Path) -> dict:
    path = TASKS_DIR / f"{cfg.task}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise SystemExit(f"evaluate.task: unknown task '{cfg.task}', available: {', '.join(available)}")
    task = yaml.safe_load(path.read_text())
    task["dataset_kwargs"] = {"data_files": {task["test_split"]: str(Path(data_file).resolve())}}
    task["generation_kwargs"]["max_gen_toks"] = cfg.max_new_tokens
    return task


def is_endpoint(model_ref: str) -> bool:
    return model_ref.startswith(("http://", "https://"))


def served_model_name(base_url: str) -> str:
    """The model an OpenAI-compatible server serves (its first, as /v1/models lists them)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("SERVING_API_KEY")) else {}
    listed = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30).json()["data"]
    if not listed:
        raise SystemExit(f"{base_url} serves no model")
    return listed[0]["id"]


def lm_eval_model(model_ref: str, cfg: EvaluateParams, compute: ComputeParams | None) -> dict:
    """How lm-eval reaches the model: a local folder (transformers, on the plan's device and
    precision, batched) or a served OpenAI-compatible endpoint (`http://host:port/v1`, lm-eval's
    local-chat-completions: the same suite scores a deployed version or a vLLM server)."""
    if is_endpoint(model_ref):
        args = {"model": served_model_name(model_ref), "base_url": model_ref.rstrip("/") + "/chat/completions", "num_concurrent": 4, "max_retries": 3, "tokenized_requests": False}
        if os.environ.get("SERVING_API_KEY"):
            args["auth_token"] = os.environ["SERVING_API_KEY"]
        return {"model": "local-chat-completions", "model_args": args}
    plan = machine_plan(compute or ComputeParams())
    return {"model": "hf", "model_args": {"pretrained": model_ref, "dtype": str(plan.dtype).removeprefix("torch.")}, "batch_size": cfg.batch_size, "device": plan.device}


def exact_match(model_ref: str, cfg: EvaluateParams, data_file: Path = TEST_FILE, compute: ComputeParams | None = None) -> tuple[float, list[dict]]:
    """lm-eval exact match over the test split, and the per-item scores behind it, for a local
    model folder or a served endpoint."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task = task_config(cfg, eval_items(data_file))
    out = lm_eval.simple_evaluate(
        **lm_eval_model(model_ref, cfg, compute),
        tasks=[task],
        apply_chat_template=True,
        log_samples=True,
        limit=cfg.limit,
    )
    result = out["results"][task["task"]]
    score = next(v for k, v in result.items() if k.startswith("exact_match,"))
    samples = [
        {
            "doc_id": s["doc_id"],
            "id": s["doc"]["id"],  # the pairing key across models and runs
            "prompt": s["doc"]["messages"][0]["content"],
            "target": s["target"],
            "response": s["filtered_resps"][0],
            "exact_match": s["exact_match"],
        }
        for s in out["samples"][task["task"]]
    ]
    return float(score), samples


def load_for_scoring(model_ref: str, compute: ComputeParams):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = machine_plan(compute)
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=plan.dtype).to(plan.device).eval()
    return model, tokenizer


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[float, int]:
    """Sum of log-probabilities of the answer's tokens given the prompt (teacher-forced)."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    n_prompt = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]], device=model.device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(1, ids[0, 1:, None])[:, 0][n_prompt - 1 :]
    return float(picked.sum()), int(picked.numel())


@torch.no_grad()
def validation_loss(model_ref: str, data_file: Path = VALIDATION_FILE, compute: ComputeParams | None = None) -> float:
    """Mean NLL per final-answer token (prompt tokens masked), teacher-forced, over the validation split."""
    model, tokenizer = load_for_scoring(model_ref, compute or ComputeParams())
    total, count = 0.0, 0
    for cell in pd.read_parquet(data_file)["messages"]:
        messages = chat_messages(cell)
        logp, n = answer_logprob(model, tokenizer, messages[:-1], messages[-1:])
        total, count = total - logp, count + n
    return total / max(count, 1)


@torch.no_grad()
def preference_accuracy(model_ref: str, data_file: Path = PAIRS_FILE, compute: ComputeParams | None = None) -> float | None:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected."""
    if not Path(data_file).exists():
        return None
    pairs = pd.read_parquet(data_file)
    if pairs.empty:
        return None
    model, tokenizer = load_for_scoring(model_ref, compute or ComputeParams())
    wins = 0.0
    for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        prompt = chat_messages(p)
        chosen, rejected = answer_logprob(model, tokenizer, prompt, chat_messages(c))[0], answer_logprob(model, tokenizer, prompt, chat_messages(r))[0]
        wins += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return wins / len(pairs)


def measure(name: str, model_ref: str, cfg: EvaluateParams, compute: ComputeParams | None = None) -> dict:
    score, samples = exact_match(model_ref, cfg, compute=compute)
    loss = validation_loss(model_ref, compute=compute)
    pref = preference_accuracy(model_ref, compute=compute)
    write_samples(name, samples)
    log.info("%s: exact_match=%.3f validation_loss=%.3f preference_accuracy=%s (%d items)", name, score, loss, pref, len(samples))
    return {"exact_match": score, "validation_loss": loss if math.isfinite(loss) else None, "preference_accuracy": pref, "items": len(samples)}


def write_samples(name: str, samples: list[dict]) -> None:
    samples_dir = METRICS / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    (samples_dir / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def run(params: Params) -> None:
    models = {"base": base_model_ref(params), **{s: str(model_dir(s)) for s in policy_steps(params.recipe)}}
    results = {name: measure(name, ref, params.evaluate, params.compute) for name, ref in models.items()}
    final = final_step(params.recipe)
    # The gates, quantization and registration read `candidate`, whatever the recipe's last step.
    results["candidate"] = {**results[final], "step": final}
    (METRICS / "samples/candidate.jsonl").write_bytes((METRICS / f"samples/{final}.jsonl").read_bytes())
    write_json(METRICS / "evaluate.json", results)


def score_endpoint(argv: list[str] | None = None) -> None:
    """`python -m pipelines.evaluate --endpoint http://127.0.0.1:8000/v1`: the evaluation
    suite's exact match for a served model (e.g. `make serve`, or a vLLM server)."""
    import argparse

    from pipelines.config import load_params

    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate")
    parser.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    score, items = exact_match(args.endpoint, params.evaluate, compute=params.compute)
    print(json.dumps({"endpoint": args.endpoint, "task": params.evaluate.task, "exact_match": score, "items": len(items)}))


def main() -> None:
    import sys

    if "--endpoint" in sys.argv:
        score_endpoint(sys.argv[1:])
        return
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
