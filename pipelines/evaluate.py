"""Stage `evaluate`: measure the base and every policy step of the recipe on held-out data.
The recipe's last policy step is the `candidate` the gates read.

- the evaluation suite (`evaluate.tasks`): any number of lm-evaluation-harness tasks, the
  project's own YAML in pipelines/eval_tasks/ (the YAML is the behaviour; this module fills in
  the data files) or stock tasks by name (from the hub, or from local files offline), each with
  its metrics and directions, few-shot, limit, chat template and generation settings; their
  metrics are named '<task>/<metric>'. The `safety` task's answers are scored by
  pipelines/safety.py (refusals, PII leaks),
- validation loss (mean token NLL of the reference answers), our own metric,
- preference accuracy: how often the model gives the chosen answer of a held-out pair a higher
  log-likelihood than the rejected one. It needs no reference model, so it means the same thing
  whatever the recipe (SFT only, DPO, KTO, GRPO, ...) and for the base,
- the feedback slice (evaluate.feedback_slice): the held-out feedback pairs, kept out of the
  standard preference accuracy and scored per item (does the model prefer the user's
  correction to the answer that was served?), for the gate's paired superiority check,
- with a reward model in the recipe, its score of each answer (`reward_score`),
- per-item scores (lm-eval's log_samples) so gates can pair candidate and champion item by item
  and the judge can compare their answers.

metrics/evaluate.json holds one block per model; metrics/samples/<model>.jsonl the per-item rows.
Runs on the GPU when there is one (compute.device), in the plan's precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

from pipelines import safety
from pipelines.model_files import pretrained_kwargs, require_safetensors
from pipelines.common import METRICS, PREPARED, base_model_ref, log, stage_main, write_json
from pipelines.config import ComputeParams, EvalTask, EvaluateParams, Params
from pipelines.directions import FEEDBACK_SLICE_METRIC
from pipelines.formats import chat_messages
from pipelines.gates import choose_step, compare_steps
from pipelines.recipe import model_dir, policy_steps
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
    for cell, rid in zip(frame["messages"], ids):
        messages = chat_messages(cell)
        if len(messages) >= 2 and messages[-2]["role"] == "user":
            pair = [{"role": "user", "content": messages[-2]["content"]}, {"role": "assistant", "content": messages[-1]["content"]}]
            # The pairing key of gates: stable across runs and models, distinct for two items
            # that share a prompt but not an answer.
            rows.append({"messages": pair, "id": rid or hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]})
    ITEMS_FILE.parent.mkdir(parents=True, exist_ok=True)
    out = ITEMS_FILE.with_name(f"{Path(data_file).stem}_items.parquet")
    pd.DataFrame(rows, columns=["messages", "id"]).to_parquet(out, index=False)
    return out


@functools.cache
def stock_index():
    """lm-eval's index of its stock tasks (~15k YAML files: 4-13 s to build), built once per
    process and only when a stock task is named."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def runner_tasks():
    """The TaskManager `simple_evaluate` is given: tasks reach it as resolved dicts (load_task),
    so it needs no index. Without one, every call built the full index again (~13 s per task
    per model on a busy 2-core machine)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


@functools.cache
def env_info() -> dict:
    """lm-eval's environment record for its results (torch's collect_env runs pip and other
    subprocesses: ~1 s each time). It is the same for every task and model of this process,
    so it is taken once instead of once per `simple_evaluate`."""
    from lm_eval.loggers.utils import add_env_info

    info: dict = {}
    add_env_info(info)
    return info


def load_task(task: EvalTask) -> dict:
    """The task's lm-eval config: the project's YAML, else the stock task's (includes and
    `!function`s resolved by lm-eval's own loader). An unknown name says what exists."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: includes, !function

    own = TASKS_DIR / f"{task.name}.yaml"
    if own.exists():
        return load_yaml(own, resolve_func=True)
    entry = stock_index().task_index.get(task.name)
    if entry is None or entry.yaml_path is None:
        import difflib

        own_names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(task.name, own_names + stock_index().all_tasks, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SystemExit(f"evaluate.tasks: unknown task '{task.name}': neither pipelines/eval_tasks/{task.name}.yaml nor a stock lm-eval task.{hint} Project tasks: {', '.join(own_names)}")
    return load_yaml(entry.yaml_path, resolve_func=True)


def task_config(task: EvalTask, cfg: EvaluateParams, data_file: Path = TEST_FILE) -> dict:
    """The task dict lm-eval runs: data files resolved (`@test_split` is this run's prepared
    test items; relative paths are the task folder's), offline overrides and generation
    settings applied."""
    conf = load_task(task)
    files = dict((conf.get("dataset_kwargs") or {}).get("data_files") or {})
    for split, path in files.items():
        files[split] = str(eval_items(data_file).resolve()) if path == "@test_split" else str((TASKS_DIR / path).resolve()) if not Path(path).is_absolute() else path
    if task.data_files:
        files = {split: str(Path(path).resolve()) for split, path in task.data_files.items()}
        missing = [p for p in files.values() if not Path(p).exists()]
        if missing:
            raise SystemExit(f"evaluate.tasks[{task.name}].data_files: no such file {missing[0]}")
        for key in ("training_split", "validation_split", "fewshot_split", "test_split"):
            if conf.get(key) is not None and conf[key] not in files:  # the local files have only these splits
                conf[key] = None
        if conf.get("test_split") is None and conf.get("validation_split") is None:
            raise SystemExit(f"evaluate.tasks[{task.name}].data_files: give the split the task evaluates on ({', '.join(files)} given)")
    if task.dataset_path:
        conf["dataset_path"] = task.dataset_path
        conf.pop("dataset_name", None)
    if files:
        conf["dataset_kwargs"] = {**(conf.get("dataset_kwargs") or {}), "data_files": files}
    if conf.get("output_type") == "generate_until":
        conf["generation_kwargs"] = {**(conf.get("generation_kwargs") or {}), "max_gen_toks": cfg.max_new_tokens, **task.gen_kwargs}
    return conf


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
    require_safetensors(model_ref)  # lm-eval's hf model would unpickle a .bin (it keeps trust_remote_code off by default)
    plan = machine_plan(compute or ComputeParams())
    return {"model": "hf", "model_args": {"pretrained": model_ref, "dtype": str(plan.dtype).removeprefix("torch.")}, "batch_size": cfg.batch_size, "device": plan.device}


def make_lm(model_ref: str, cfg: EvaluateParams, compute: ComputeParams | None):
    """One lm-eval model object, loaded once and reused by every task of the suite."""
    from lm_eval.api.registry import get_model

    spec = lm_eval_model(model_ref, cfg, compute)
    extra = {k: spec[k] for k in ("batch_size", "device") if k in spec}
    return get_model(spec["model"]).create_from_arg_obj(spec["model_args"], extra)


def item_id(task: str, doc: dict) -> str:
    """The pairing key of gates: stable across runs and models, distinct across tasks and for
    two items that share a prompt but not an answer."""
    own = doc.get("id")
    return f"{task}:{own}" if own is not None else f"{task}:" + hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prompt(doc: dict, sample: dict) -> str:
    if "messages" in doc:
        return chat_messages(doc["messages"])[0]["content"]
    if "prompt" in doc:
        return str(doc["prompt"])
    args = sample.get("arguments") or {}
    first = args.get("gen_args_0", {}).get("arg_0") if isinstance(args, dict) else None
    return str(first if first is not None else doc)[:2000]


def run_task(lm, task: EvalTask, cfg: EvaluateParams, data_file: Path = TEST_FILE) -> tuple[dict[str, float], list[dict]]:
    """One suite task on one model: its metrics (gate names '<task>/<metric>') and per-item rows."""
    import lm_eval

    from unittest import mock

    conf = task_config(task, cfg, data_file)
    with mock.patch("lm_eval.evaluator.add_env_info", lambda storage: storage.update(env_info())):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[conf],
            num_fewshot=task.num_fewshot,
            apply_chat_template=task.apply_chat_template,
            log_samples=True,
            limit=task.limit or cfg.limit,
            task_manager=runner_tasks(),
        )
    name = conf["task"]
    rows = []
    for s in out["samples"][name]:
        raw = s["resps"][0][0] if s.get("resps") and isinstance(s["resps"][0], list) and isinstance(s["resps"][0][0], str) else None
        answer = s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], str) else None
        row = {"task": task.name, "id": item_id(task.name, s["doc"]), "prompt": _prompt(s["doc"], s), "target": s.get("target"), "response": answer, "raw": raw}
        if task.scorer == "safety":
            scores = safety.score(s["doc"]["kind"], raw or answer or "")
        else:
            scores = {m: float(s[m]) for m in task.metrics if m in s}
        row.update({f"{task.name}/{m}": v for m, v in scores.items()})
        rows.append(row)
    metrics: dict[str, float] = {}
    for metric in task.metrics:
        key = f"{task.name}/{metric}"
        if task.scorer == "safety":
            values = [r[key] for r in rows if key in r]
            # No item of this kind (a small `limit` can leave out every PII probe): not measured,
            # written as null. NaN here used to fail the quantization gate on "nan vs nan", and
            # a threshold on it now fails as "not measured", never passes.
            metrics[key] = sum(values) / len(values) if values else None
            continue
        result = out["results"][name]
        found = [v for k, v in result.items() if k.split(",")[0] == metric]
        if not found:
            reported = sorted({k.split(",")[0] for k in result if not k.endswith("_stderr") and "," in k})
            raise SystemExit(f"evaluate.tasks[{task.name}].metrics: the task reports no '{metric}'; it reports {', '.join(reported)}")
        metrics[key] = float(found[0])
    return metrics, rows


def run_suite(model_ref: str, cfg: EvaluateParams, compute: ComputeParams | None = None, data_file: Path = TEST_FILE) -> tuple[dict[str, float], list[dict], dict[str, float]]:
    """Every task of the suite on one model (a local folder or an endpoint): metrics, per-item
    rows and seconds per task."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = make_lm(model_ref, cfg, compute)
    metrics, rows, seconds = {}, [], {}
    for task in cfg.tasks:
        started = time.perf_counter()
        m, r = run_task(lm, task, cfg, data_file)
        seconds[task.name] = time.perf_counter() - started
        metrics.update(m)
        rows += r
    return metrics, rows, seconds


@torch.no_grad()
def reward_scores(rm_dir: str, rows: list[dict], compute: ComputeParams | None = None) -> list[float]:
    """The reward model's score of each answer as served (raw), to its prompt."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plan = machine_plan(compute or ComputeParams())
    tokenizer = AutoTokenizer.from_pretrained(rm_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=plan.dtype, **pretrained_kwargs(rm_dir)).to(plan.device).eval()
    out = []
    for r in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r.get("raw") or r.get("response") or ""}], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=True, max_length=512).to(plan.device)
        out.append(float(model(**ids).logits[0, 0]))
    return out


def add_reward_scores(rows: list[dict], rm_dir: str | None, compute: ComputeParams | None, task: str) -> float | None:
    """Adds `reward_score` to the rows of `task` (the suite's first task) when there is a reward model."""
    if not rm_dir or not Path(rm_dir).exists():
        return None
    chosen = [r for r in rows if r["task"] == task]
    for r, v in zip(chosen, reward_scores(rm_dir, chosen, compute)):
        r["reward_score"] = v
    return sum(r["reward_score"] for r in chosen) / max(len(chosen), 1)


def load_for_scoring(model_ref: str, compute: ComputeParams):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = machine_plan(compute)
    tokenizer = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=plan.dtype, **pretrained_kwargs(model_ref)).to(plan.device).eval()
    return model, tokenizer


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[float, int]:
    """Sum of log-probabilities of the answer's tokens given the prompt (teacher-forced)."""
    return answer_logprobs(model, tokenizer, [(prompt, answer)])[0]


def answer_logprobs(model, tokenizer, pairs: list[tuple[list[dict], list[dict]]], batch_size: int = 32) -> list[tuple[float, int]]:
    """`answer_logprob` of many (prompt, answer) pairs, `batch_size` per forward pass, sorted by
    length so little is padded (one pass per pair cost ~4 ms of overhead each, most of this
    stage's scoring time on the tiny model)."""
    encoded = []
    for prompt, answer in pairs:
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        encoded.append((len(tokenizer(head, add_special_tokens=False)["input_ids"]), tokenizer(full, add_special_tokens=False)["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            seq = encoded[i][1]
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        for row, i in enumerate(chunk):
            n_prompt, seq = encoded[i]
            picked = logp[row, n_prompt - 1 : len(seq) - 1]  # right padding: the answer ends where the row's tokens do
            out[i] = (float(picked.sum()), int(picked.numel()))
    return out


@torch.no_grad()
def validation_loss(model_ref: str, data_file: Path = VALIDATION_FILE, compute: ComputeParams | None = None) -> float:
    """Mean NLL per final-answer token (prompt tokens masked), teacher-forced, over the validation split."""
    model, tokenizer = load_for_scoring(model_ref, compute or ComputeParams())
    conversations = [chat_messages(cell) for cell in pd.read_parquet(data_file)["messages"]]
    scored = answer_logprobs(model, tokenizer, [(m[:-1], m[-1:]) for m in conversations])
    return -sum(logp for logp, _ in scored) / max(sum(n for _, n in scored), 1)


SLICE_METRIC = FEEDBACK_SLICE_METRIC
SLICE_TASK = SLICE_METRIC.split("/")[0]


def read_pairs(data_file: Path = PAIRS_FILE) -> pd.DataFrame:
    """The held-out preference pairs (empty when there are none)."""
    return pd.read_parquet(data_file) if Path(data_file).exists() else pd.DataFrame(columns=["prompt", "chosen", "rejected", "source", "id"])


def split_slice(pairs: pd.DataFrame, slice_source: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the standard held-out pairs, the feedback slice's): the slice is the rows of the source
    evaluate.feedback_slice names, so the standard figure means what it meant before feedback."""
    if not slice_source or "source" not in pairs or pairs.empty:
        return pairs, pairs.iloc[0:0]
    mask = pairs["source"] == slice_source
    return pairs[~mask], pairs[mask]


def pair_logprobs(model, tokenizer, pairs: pd.DataFrame) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) of each pair, given its prompt."""
    prompts = [chat_messages(p) for p in pairs["prompt"]]
    chosen = answer_logprobs(model, tokenizer, [(p, chat_messages(c)) for p, c in zip(prompts, pairs["chosen"])])
    rejected = answer_logprobs(model, tokenizer, [(p, chat_messages(r)) for p, r in zip(prompts, pairs["rejected"])])
    return [(c, r) for (c, _), (r, _) in zip(chosen, rejected)]


def accuracy_of(scored: list[tuple[float, float]]) -> float | None:
    """Share of pairs whose chosen answer is likelier (a tie counts half)."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scored) / len(scored) if scored else None


def slice_rows(pairs: pd.DataFrame, scored: list[tuple[float, float]]) -> list[dict]:
    """One row per feedback pair for the gate to pair item by item: 1 when the model finds the
    user's correction (chosen) likelier than the answer that was served (rejected), else 0. A
    tie is 0, not a half: the outcome stays right/wrong, which Tango's paired test needs, and
    a model that cannot tell the correction from the served answer has not learnt it."""
    if pairs.empty:
        return []
    return [
        {"task": SLICE_TASK, "id": f"{SLICE_TASK}:{rid}", "prompt": chat_messages(prompt)[-1]["content"], "target": chat_messages(chosen)[-1]["content"], "response": None, "raw": None, SLICE_METRIC: 1.0 if c > r else 0.0}
        for rid, prompt, chosen, (c, r) in zip(pairs["id"], pairs["prompt"], pairs["chosen"], scored)
    ]


@torch.no_grad()
def preference_scores(model_ref: str, data_file: Path = PAIRS_FILE, compute: ComputeParams | None = None, slice_source: str | None = None) -> tuple[float | None, list[dict]]:
    """Preference accuracy on the standard held-out pairs, and the feedback slice's per-item
    rows (empty without slice rows), from one load of the model."""
    standard, feedback = split_slice(read_pairs(data_file), slice_source)
    if standard.empty and feedback.empty:
        return None, []
    model, tokenizer = load_for_scoring(model_ref, compute or ComputeParams())
    scored = pair_logprobs(model, tokenizer, standard) if not standard.empty else []
    return accuracy_of(scored), slice_rows(feedback, pair_logprobs(model, tokenizer, feedback) if not feedback.empty else [])


def preference_accuracy(model_ref: str, data_file: Path = PAIRS_FILE, compute: ComputeParams | None = None) -> float | None:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected."""
    return preference_scores(model_ref, data_file, compute)[0]


def measure(name: str, model_ref: str, cfg: EvaluateParams, compute: ComputeParams | None = None, reward_model: str | None = None) -> dict:
    """One model's whole evaluation: the suite, validation loss, preference accuracy and (with a
    reward model) the reward of its answers; per-item rows to metrics/samples/<name>.jsonl."""
    suite, rows, seconds = run_suite(model_ref, cfg, compute)
    loss = validation_loss(model_ref, compute=compute)
    pref, feedback = preference_scores(model_ref, compute=compute, slice_source=cfg.feedback_slice)
    reward = add_reward_scores(rows, reward_model, compute, cfg.tasks[0].name)
    write_samples(name, rows + feedback)
    shown = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=not measured" for k, v in suite.items())
    log.info("%s: %s validation_loss=%.3f preference_accuracy=%s (%d items)", name, shown, loss, pref, len(rows))
    block = {**suite, "validation_loss": loss if math.isfinite(loss) else None, "preference_accuracy": pref, "items": len(rows), "seconds": seconds}
    if reward is not None:
        block["reward_score"] = reward
    if feedback:
        block[SLICE_METRIC] = sum(r[SLICE_METRIC] for r in feedback) / len(feedback)
        block["feedback_slice_items"] = len(feedback)
    return block


def write_samples(name: str, samples: list[dict]) -> None:
    samples_dir = METRICS / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    (samples_dir / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def reward_model_of(params: Params) -> str | None:
    return str(model_dir("rm")) if "rm" in params.recipe else None


def read_samples(name: str) -> list[dict]:
    return [json.loads(line) for line in (METRICS / "samples" / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def run(params: Params) -> None:
    steps = policy_steps(params.recipe)
    models = {"base": base_model_ref(params), **{s: str(model_dir(s)) for s in steps}}
    results = {name: measure(name, ref, params.evaluate, params.compute, reward_model_of(params)) for name, ref in models.items()}
    # Every step must earn its place: each against the step before on the primary metric,
    # item by item. A regression is reported; under gate.step_regression: serve_best the step
    # before it becomes the candidate (quantized, gated, served), else the gate blocks.
    comparisons = compare_steps([(s, read_samples(s)) for s in steps], params.primary_metric, params.gate, params.evaluate.directions())
    chosen = choose_step(steps, comparisons, params.gate)
    for c in comparisons:
        if c["regressed"]:
            log.warning("recipe step %s made %s worse than %s: %.3f -> %.3f (%+.3f [%+.3f, %+.3f], %s worse, %s better of %d items)%s",
                        c["step"], c["metric"], c["previous"], c["previous_value"], c["value"], c["diff"], c["low"], c["high"], c["worse"], c["better"], c["items"],
                        f": the candidate is {chosen} (gate.step_regression: serve_best)" if chosen != steps[-1] else ": the quality gate will block (gate.step_regression: block)")
    results["steps"] = comparisons
    # The gates, quantization and registration read `candidate`, whatever step it is.
    results["candidate"] = {**results[chosen], "step": chosen}
    (METRICS / "samples/candidate.jsonl").write_bytes((METRICS / f"samples/{chosen}.jsonl").read_bytes())
    write_json(METRICS / "evaluate.json", results)


def score_endpoint(argv: list[str] | None = None) -> None:
    """`python -m pipelines.evaluate --endpoint http://127.0.0.1:8000/v1`: the evaluation
    suite for a served model (e.g. `make serve`, or a vLLM server)."""
    import argparse

    from pipelines.config import load_params

    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate")
    parser.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    metrics, rows, seconds = run_suite(args.endpoint, params.evaluate, compute=params.compute)
    print(json.dumps({"endpoint": args.endpoint, **metrics, "items": len(rows), "seconds": seconds}))


def main() -> None:
    import sys

    if "--endpoint" in sys.argv:
        score_endpoint(sys.argv[1:])
        return
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
