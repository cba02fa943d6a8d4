"""Evaluation: a suite of lm-eval tasks (the project's YAML, a stock task read from local
files, the safety suite) scores a model folder and the same model served behind the
OpenAI-compatible server (lm-eval's local-chat-completions), item for item; items carry a stable
id; preference accuracy needs no reference model; a typo in the suite fails with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import EvalTask, EvaluateParams
from pipelines.evaluate import preference_accuracy, run_suite

EM = "reverse_digits/exact_match"
DIGITS = EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=12, batch_size=12, max_new_tokens=12)


@pytest.fixture
def trained(trained_dir, monkeypatch) -> Path:
    monkeypatch.chdir(trained_dir)
    return trained_dir


def test_a_served_model_scores_like_its_folder(trained):
    from serving.launcher import free_port, launch

    local, local_items, _ = run_suite("models/sft", DIGITS)
    with launch("cpu", "models/sft", "served-sft", "127.0.0.1", free_port(), trained / "served.log", 120) as server:
        remote, remote_items, _ = run_suite(server.base_url, DIGITS)
    assert len(remote_items) == len(local_items) == 12
    assert [i["id"] for i in remote_items] == [i["id"] for i in local_items]
    assert [i["response"] for i in remote_items] == [i["response"] for i in local_items], "greedy answers must agree"
    assert remote[EM] == local[EM] >= 0.9
    assert len({i["id"] for i in local_items}) == len(local_items), "ids are unique per item"


ARC = [
    {"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
    for i, (q, c, k) in enumerate([
        ("Reverse the list: 1 2 3", ["3 2 1", "1 2 3", "2 1 3"], "A"),
        ("Reverse the list: 4 5 6", ["5 4 6", "6 5 4", "4 5 6"], "B"),
        ("Reverse the list: 7 8 9", ["7 8 9", "8 9 7", "9 8 7"], "C"),
        ("Reverse the list: 2 4 6 8", ["8 6 4 2", "2 4 6 8", "6 8 2 4"], "A"),
        ("Reverse the list: 9 1 5", ["9 1 5", "5 1 9", "1 5 9"], "B"),
        ("Reverse the list: 3 3 7", ["3 7 3", "3 3 7", "7 3 3"], "C"),
    ])
]


def test_a_suite_of_tasks_each_with_its_own_settings(trained, tmp_path):
    """A stock lm-eval task (ARC-Easy's YAML, a multiple-choice loglikelihood task) run offline
    from a local file with its own metrics, few-shot and no chat template, beside the project's
    generation task and the safety suite: every metric named '<task>/<metric>', rows per task."""
    arc = tmp_path / "arc.jsonl"
    arc.write_text("".join(json.dumps(r) + "\n" for r in ARC))
    cfg = EvaluateParams(
        tasks=[
            EvalTask(name="reverse_digits", limit=6, gen_kwargs={"max_gen_toks": 12}),
            EvalTask(name="arc_easy", metrics={"acc": "higher", "acc_norm": "higher"}, num_fewshot=0, apply_chat_template=False, dataset_path="json", data_files={"test": str(arc)}),
            EvalTask(name="safety", metrics={"refusal_rate": "higher", "pii_leak_rate": "lower"}, scorer="safety", limit=8),
        ],
        batch_size=8,
    )
    metrics, rows, seconds = run_suite("models/sft", cfg)
    assert set(metrics) == {EM, "arc_easy/acc", "arc_easy/acc_norm", "safety/refusal_rate", "safety/pii_leak_rate"}
    assert set(seconds) == {"reverse_digits", "arc_easy", "safety"}
    by_task = {t: [r for r in rows if r["task"] == t] for t in seconds}
    assert len(by_task["reverse_digits"]) == 6 and len(by_task["arc_easy"]) == 6 and len(by_task["safety"]) == 8
    assert {r["id"] for r in by_task["arc_easy"]} == {f"arc_easy:q{i}" for i in range(6)}
    assert metrics["arc_easy/acc"] == sum(r["arc_easy/acc"] for r in by_task["arc_easy"]) / 6
    # safety items carry the score of their kind only: refusals for requests, leaks for probes
    assert all(("safety/refusal_rate" in r) != ("safety/pii_leak_rate" in r) for r in by_task["safety"])


def test_suite_typos_fail_with_the_fix(trained):
    with pytest.raises(SystemExit, match="unknown task 'reverse_digit'.*Did you mean 'reverse_digits'"):
        run_suite("models/sft", EvaluateParams(tasks=[EvalTask(name="reverse_digit")], limit=2))
    with pytest.raises(SystemExit, match="reports no 'exact_matches'; it reports exact_match"):
        run_suite("models/sft", EvaluateParams(tasks=[EvalTask(name="reverse_digits", metrics={"exact_matches": "higher"})], limit=2))


def test_preference_accuracy_ranks_the_likelier_answer_first(trained, tmp_path):
    """A model's own greedy answer is likelier to it than an arbitrary string: with those as
    chosen the accuracy is high, and swapping chosen and rejected turns it low."""
    import pandas as pd

    _, items, _ = run_suite("models/sft", EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=10, batch_size=10, max_new_tokens=12))
    msg = lambda role, text: [{"role": role, "content": text, "tool_calls": None}]  # noqa: E731
    rows = [(msg("user", i["prompt"]), msg("assistant", i["response"]), msg("assistant", "zq~ xv ## plough")) for i in items if i["response"]]
    frame = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])
    frame.to_parquet(tmp_path / "pairs.parquet")
    frame.rename(columns={"chosen": "rejected", "rejected": "chosen"}).to_parquet(tmp_path / "swapped.parquet")
    assert preference_accuracy("models/sft", tmp_path / "pairs.parquet") >= 0.9
    assert preference_accuracy("models/sft", tmp_path / "swapped.parquet") <= 0.1


def test_the_feedback_slice_is_scored_per_item_and_kept_out_of_the_standard_figure(trained, tmp_path):
    """The held-out feedback pairs (source evaluate.feedback_slice) become one right/wrong row
    per pair, keyed by the prepared row's id, and leave preference_accuracy to the other pairs.
    Seen red: `split_slice` returning (pairs, pairs[mask]) -> the standard accuracy fell to 0.75
    (the swapped slice rows counted in it)."""
    import pandas as pd

    from pipelines.evaluate import SLICE_METRIC, preference_scores

    _, items, _ = run_suite("models/sft", EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=10, batch_size=10, max_new_tokens=12))
    msg = lambda role, text: [{"role": role, "content": text, "tool_calls": None}]  # noqa: E731
    answered = [i for i in items if i["response"]]
    junk = "zq~ xv ## plough"
    rows = [(msg("user", i["prompt"]), msg("assistant", i["response"]), msg("assistant", junk), "demo", f"d{n}") for n, i in enumerate(answered)]
    # The slice: the model's own answer as the correction on the even rows, as the served
    # (rejected) answer on the odd ones.
    for n, i in enumerate(answered):
        good, bad = (i["response"], junk) if n % 2 == 0 else (junk, i["response"])
        rows.append((msg("user", i["prompt"]), msg("assistant", good), msg("assistant", bad), "feedback_test", f"f{n}"))
    pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "source", "id"]).to_parquet(tmp_path / "pairs.parquet")
    accuracy, slice_rows = preference_scores("models/sft", tmp_path / "pairs.parquet", slice_source="feedback_test")
    assert accuracy >= 0.9
    assert [r["id"] for r in slice_rows] == [f"feedback_slice:f{n}" for n in range(len(answered))]
    assert [r[SLICE_METRIC] for r in slice_rows] == [1.0 if n % 2 == 0 else 0.0 for n in range(len(answered))]
    assert all(r["task"] == "feedback_slice" and r["prompt"] for r in slice_rows)
    assert preference_scores("models/sft", tmp_path / "pairs.parquet", slice_source=None)[1] == [], "null: no slice, every pair is standard"


def test_a_reward_model_scores_every_answer(trained, tmp_path):
    """With a reward model in the recipe, each answer of the suite's first task gets its score
    (`reward_score`, per item and on average) for the gate to pair with the champion's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.evaluate import measure

    rm = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained("models/sft", num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained("models/sft").pad_token_id
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained("models/sft").save_pretrained(rm)
    block = measure("sft", "models/sft", EvaluateParams(tasks=[EvalTask(name="reverse_digits")], limit=6, batch_size=6, max_new_tokens=12), reward_model=str(rm))
    rows = [json.loads(line) for line in Path("metrics/samples/sft.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["reward_score"], float) for r in rows)
    assert block["reward_score"] == pytest.approx(sum(r["reward_score"] for r in rows) / 6)
    assert len({round(r["reward_score"], 6) for r in rows}) > 1, "scores depend on the answer"
