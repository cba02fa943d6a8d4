"""Evaluation: the same lm-eval suite scores a model folder and the same model served behind
the OpenAI-compatible server (lm-eval's local-chat-completions), item for item; items carry
a stable id; preference accuracy needs no reference model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import EvaluateParams
from pipelines.evaluate import exact_match, preference_accuracy


@pytest.fixture
def trained(trained_dir, monkeypatch) -> Path:
    monkeypatch.chdir(trained_dir)
    return trained_dir


def test_a_served_model_scores_like_its_folder(trained):
    from serving.launcher import free_port, launch

    cfg = EvaluateParams(limit=12, batch_size=12, max_new_tokens=12)
    local, local_items = exact_match("models/sft", cfg)
    with launch("cpu", "models/sft", "served-sft", "127.0.0.1", free_port(), trained / "served.log", 120) as server:
        remote, remote_items = exact_match(server.base_url, cfg)
    assert len(remote_items) == len(local_items) == 12
    assert [i["id"] for i in remote_items] == [i["id"] for i in local_items]
    assert [i["response"] for i in remote_items] == [i["response"] for i in local_items], "greedy answers must agree"
    assert remote == local
    assert len({i["id"] for i in local_items}) == len(local_items), "ids are unique per item"


def test_preference_accuracy_ranks_the_likelier_answer_first(trained, tmp_path):
    """A model's own greedy answer is likelier to it than an arbitrary string: with those as
    chosen the accuracy is high, and swapping chosen and rejected turns it low."""
    import pandas as pd

    _, items = exact_match("models/sft", EvaluateParams(limit=10, batch_size=10, max_new_tokens=12))
    msg = lambda role, text: [{"role": role, "content": text, "tool_calls": None}]  # noqa: E731
    rows = [(msg("user", i["prompt"]), msg("assistant", i["response"]), msg("assistant", "zq~ xv ## plough")) for i in items if i["response"]]
    frame = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])
    frame.to_parquet(tmp_path / "pairs.parquet")
    frame.rename(columns={"chosen": "rejected", "rejected": "chosen"}).to_parquet(tmp_path / "swapped.parquet")
    assert preference_accuracy("models/sft", tmp_path / "pairs.parquet") >= 0.9
    assert preference_accuracy("models/sft", tmp_path / "swapped.parquet") <= 0.1
