"""The prepare stage on a deliberately messy file: every raw row ends in exactly one place and
the counts reconcile per file and per reason; nothing that should be caught reaches a split;
the data gate asks for exactly the tables the recipe trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines import generate, prepare
from pipelines.clean import find_pii, normal_form
from pipelines.config import Params
from pipelines.data_config import DataParams, GenerateParams, PrepareParams, SourceParams
from pipelines.prepare import split_of

LONG = "The committee reviewed the quarterly budget and agreed that the new library wing should open before the winter holidays this year"
HELD_OUT = [("What is the boiling point of water at sea level in degrees Celsius?", "100"), ("Name the largest planet in the solar system.", "Jupiter")]


def row(q: str, a: str) -> str:
    return json.dumps({"instruction": q, "output": a})


def messy_lines() -> tuple[list[str], dict[str, int], int]:
    """(lines, expected quarantine count per reason, expected kept rows)."""
    good = [row(f"Question number {i}: what is {i} plus {i}?", str(2 * i)) for i in range(12)]
    lines = good + [
        row("Question number 0: what is 0 plus 0?", "0"),  # exact duplicate
        row("question NUMBER 1 -- what is 1 plus 1", "2"),  # duplicate modulo case and punctuation
        row(LONG, "Approved."),
        row(LONG.replace("quarterly", "annual"), "Approved."),  # near duplicate
        row(LONG.replace("winter", "summer"), "Approved."),  # near duplicate
        row("Contact me at jane.doe@example.com about the invoice", "Sure."),  # PII
        row("My card is 4111 1111 1111 1111, charge it", "Done."),  # PII (passes Luhn)
        row("Order 4111 1111 1111 1112 has shipped", "Thanks."),  # not a card: kept
        row("Say nothing", "   "),  # empty answer
        '{"instruction": "broken',  # malformed JSON
        "not json at all",  # malformed JSON
        json.dumps({"instruction": "x", "output": 123}),  # wrong type
        json.dumps({"messages": "not a list"}),  # wrong type
        json.dumps({"colour": "blue"}),  # unknown format
        row("WHAT is the boiling point of water at sea level, in degrees celsius", "It is 100 degrees."),  # contaminated
        row("name the largest planet in the solar system!!", "Jupiter, the gas giant"),  # contaminated (prompt)
    ]
    expected = {"duplicate": 2, "near_duplicate": 2, "pii": 2, "empty": 1, "malformed_json": 2, "bad_type": 2, "unknown_format": 1, "contaminated": 2}
    return lines, expected, 12 + 1 + 1  # good rows, the long original, the non-card number


@pytest.fixture
def messy(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    lines, _, _ = messy_lines()
    Path("in/messy.jsonl").write_text("\n".join(lines) + "\n")
    Path("in/heldout.jsonl").write_text("".join(row(q, a) + "\n" for q, a in HELD_OUT))
    return tmp_path


def messy_params(recipe=("sft",), **prepare_kw) -> Params:
    return Params(
        recipe=list(recipe),
        data=DataParams(sources=[
            SourceParams(name="messy", path="in/messy.jsonl", split="train"),
            SourceParams(name="heldout", path="in/heldout.jsonl", split="test"),
        ]),
        prepare=PrepareParams(pii="quarantine", min_rows=5, max_quarantine_fraction=0.9, **prepare_kw),
    )


def test_messy_file_reconciles_exactly_and_nothing_caught_reaches_a_split(messy):
    prepare.run(messy_params())
    _, expected, kept = messy_lines()
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["quarantined_by_file_and_reason"]["in/messy.jsonl"] == expected
    assert report["rows_by_file"]["in/messy.jsonl"] == {"raw": len(messy_lines()[0]), "kept": kept, "quarantined": sum(expected.values())}
    assert report["rows_by_file"]["in/heldout.jsonl"] == {"raw": 2, "kept": 2, "quarantined": 0}
    quarantine = [json.loads(q) for q in Path("data/prepared/quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == sum(expected.values())
    assert all(q["source"] == "messy" and q["line"] >= 1 and q["reason"] for q in quarantine)

    train = pd.read_parquet("data/prepared/sft_train.parquet")
    test = pd.read_parquet("data/prepared/sft_test.parquet")
    assert len(train) == kept and len(test) == 2
    texts = ["\n".join(m["content"] for m in msgs) for msgs in train["messages"]]
    assert not any(find_pii(t) for t in texts), "no PII may reach a split"
    held = {normal_form(q) for q, _ in HELD_OUT}
    assert not any(normal_form(msgs[0]["content"]) in held for msgs in train["messages"]), "no test prompt may reach training"
    assert len({normal_form(t) for t in texts}) == len(texts), "no duplicates"
    assert sum(LONG[:40] in t for t in texts) == 1, "one of the near-duplicate family is kept"
    assert any("4111 1111 1111 1112" in t for t in texts), "a number failing the Luhn check is not a card"
    assert train["id"].is_unique and set(train["source"]) == {"messy"}


def test_pii_can_be_redacted_instead(messy):
    prepare.run(messy_params(recipe=("sft",)).model_copy(update={"prepare": PrepareParams(pii="redact", min_rows=5, max_quarantine_fraction=0.9)}))
    train = pd.read_parquet("data/prepared/sft_train.parquet")
    texts = [m["content"] for msgs in train["messages"] for m in msgs]
    assert any("<EMAIL>" in t for t in texts) and any("<CARD>" in t for t in texts)
    assert not any(find_pii(t) for t in texts)


def test_the_gate_demands_the_tables_the_recipe_trains_on(messy):
    with pytest.raises(SystemExit) as err:
        prepare.run(messy_params(recipe=("sft", "kto")))
    assert "kto" in str(err.value) and "needs at least 5" in str(err.value)
    assert "kto" in Path("reports/data_validation.md").read_text()
    assert not Path("data/prepared/sft_train.parquet").exists(), "no table is written when the gate fails"
    assert (Path("reports/data/data_docs") / "index.html").exists(), "the Data Docs are built either way"
    prepare.run(messy_params(recipe=("sft",)))  # the same data is enough for SFT alone
    assert Path("data/prepared/sft_train.parquet").exists()


def test_demo_data_loses_almost_nothing_to_near_dup_and_decontamination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params(generate=GenerateParams(n_sft=1000, n_preference=200))
    generate.run(params)
    first = Path("data/generated/alpaca.jsonl").read_bytes()
    generate.run(params)
    assert Path("data/generated/alpaca.jsonl").read_bytes() == first, "same seed, same bytes"
    prepare.run(params)
    report = json.loads(Path("metrics/prepare.json").read_text())
    lost = report["quarantined_by_reason"].get("near_duplicate", 0) + report["quarantined_by_reason"].get("contaminated", 0)
    assert lost / report["raw_rows"] < 0.02, report["quarantined_by_reason"]
    assert report["rows"]["kto"]["train"] > 0 and report["rows"]["preference"]["train"] > 0
    roles = {" ".join(m["role"] for m in msgs) for msgs in pd.read_parquet("data/prepared/sft_train.parquet")["messages"]}
    assert "system user assistant user assistant" in roles, "multi-turn conversations with a system prompt are kept whole"
    labels = pd.read_parquet("data/prepared/kto_train.parquet")["label"]
    assert labels.any() and not labels.all()
    for t in ("sft", "preference", "kto"):  # one prompt, one split, across tables
        assert split_of("Reverse the list:\n1 2 3", params.prepare) in ("train", "validation", "test")


def test_mixing_weights_scale_a_sources_training_rows_deterministically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    Path("in/a.jsonl").write_text("".join(row(f"Alpha question {i}?", f"a{i}") + "\n" for i in range(40)))
    Path("in/b.jsonl").write_text("".join(row(f"Beta question {i}?", f"b{i}") + "\n" for i in range(40)))

    def train_rows(weight_a: float, weight_b: float) -> pd.Series:
        params = Params(recipe=["sft"], data=DataParams(sources=[
            SourceParams(name="a", path="in/a.jsonl", split="train", weight=weight_a),
            SourceParams(name="b", path="in/b.jsonl", split="train", weight=weight_b),
        ]), prepare=PrepareParams(min_rows=5))
        prepare.run(params)
        return pd.read_parquet("data/prepared/sft_train.parquet")["source"].value_counts()

    counts = train_rows(2.0, 0.5)
    assert counts["a"] == 80, "weight 2 repeats every row twice"
    assert 10 <= counts["b"] <= 30, "weight 0.5 keeps about half"
    assert train_rows(2.0, 0.5).equals(counts), "the same rows every time"
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["rows_by_file"]["in/b.jsonl"] == {"raw": 40, "kept": 40, "quarantined": 0}, "weights act after the reconciliation"
