"""The prepare stage on a deliberately messy file: every raw row ends in exactly one place and
the counts reconcile per file and per reason; nothing that should be caught reaches a split;
the data gate asks for exactly the tables the recipe trains on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from pipelines import generate, prepare
from pipelines.clean import find_pii, normal_form
from pipelines.config import EvalTask, EvaluateParams, Params
from pipelines.data_config import DataParams, GenerateParams, PrepareParams, SourceParams
from pipelines.formats import message_texts
from pipelines.prepare import split_of
from pipelines.validate import DataValidationError, validate
from tests.conftest import tiny_params
from tests.pipelines import llamafactory_rows as lf

SAFETY_SUITE = Path(__file__).resolve().parents[2] / "pipelines/eval_tasks/safety.jsonl"

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


# ---------------------------------------------------------------- public data in its usual shapes


def lf_params(tmp_path: Path, recipe=("sft", "dpo", "kto"), **prepare_kw) -> Params:
    lf.write_demo_folder(tmp_path / "lf")
    return Params(recipe=list(recipe), data=DataParams(sources=[SourceParams(name="lf", path="lf", split="train")]),
                  prepare=PrepareParams(min_rows=1, max_quarantine_fraction=0.9, **prepare_kw))


def test_llamafactory_demo_sets_reach_their_tables_and_reconcile(tmp_path, monkeypatch):
    """LLaMA-Factory's demo files as shipped (JSON arrays beside their dataset_info.json).
    Seen red: _table without its chosen/rejected branch (pairs read as SFT) -> no preference
    row: "data gate failed ... preference: no rows, but the recipe trains on 'preference'"."""
    monkeypatch.chdir(tmp_path)
    prepare.run(lf_params(tmp_path))
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert {Path(f).name: r for f, r in report["rows_by_file"].items()} == {
        "dpo_en_demo.json": {"raw": 3, "kept": 3, "quarantined": 0},
        "glaive_toolcall_en_demo.json": {"raw": 2, "kept": 2, "quarantined": 0},
        "kto_en_demo.json": {"raw": 3, "kept": 3, "quarantined": 0},
    }
    assert {Path(f).name: r for f, r in report["quarantined_by_file_and_reason"].items()} == {"dpo_en_demo.json": {}, "glaive_toolcall_en_demo.json": {}, "kto_en_demo.json": {}}
    assert report["rows"]["preference"]["train"] == 3 and report["rows"]["kto"]["train"] == 3 and report["rows"]["sft"]["train"] == 2
    sft = pd.read_parquet("data/prepared/sft_train.parquet")
    assert sft["tools"].notna().all() and any(m["tool_calls"] for msgs in sft["messages"] for m in msgs), "tool calls and schemas survive"
    assert sorted(pd.read_parquet("data/prepared/kto_train.parquet")["label"]) == [False, True, True]


def test_too_long_is_counted_in_the_trained_models_tokens(tmp_path, monkeypatch):
    """The bootstrapped default: a BPE trained exactly as bootstrap trains it, on this run's
    SFT rows, not bytes (one byte a token dropped a third of ordinary English data).
    Seen red: Lengths counting bytes (main) -> every row quarantined, "data gate failed ...
    quarantine_fraction ... [1.0]"."""
    from pipelines.tokenizer import train_bpe

    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    rng = random.Random(0)
    words = ("the a library committee reviewed budget winter opening schedule river school road village morning report council "
             "member approved plan new wing staff hours books readers event local year").split()
    rows = [{"instruction": f"Summarise report {i}.", "output": " ".join(rng.choice(words) for _ in range(160 + 4 * i))} for i in range(20)]
    rows.append({"instruction": "Summarise the long report.", "output": " ".join(rng.choice(words) for _ in range(900))})
    Path("in/reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = Params(recipe=["sft"], data=DataParams(sources=[SourceParams(name="r", path="in/reports.jsonl", split="train")]), prepare=PrepareParams(min_rows=5, max_quarantine_fraction=0.5))
    assert all(len((r["instruction"] + r["output"]).encode()) > params.prepare.max_tokens for r in rows), "every row is longer than max_tokens in bytes"
    prepare.run(params)
    assert len(pd.read_parquet("data/prepared/sft_train.parquet")) == 20
    (q,) = [json.loads(line) for line in Path("data/prepared/quarantine.jsonl").read_text().splitlines()]
    bpe = train_bpe([t for r in rows for t in (r["instruction"], r["output"])], params.model.vocab_size)
    tokens = sum(len(bpe.encode(t).ids) for t in (rows[-1]["instruction"], rows[-1]["output"]))
    assert q["reason"] == f"too_long: {tokens:,} tokens > max_tokens 1,024 (in the bootstrap BPE, vocab {params.model.vocab_size})"


def test_prepare_measures_lengths_with_the_bootstrapped_tokenizer(prepared_dir):
    """The tokenizer bootstrap trains (models/base) and the one prepare trains to measure lengths
    are the same function at the same vocab_size: on the same rows they count the same tokens.
    Prepare trains on every SFT row before the split (bootstrap: the training split after
    prepare); the figure printed is how far that moves the count."""
    from transformers import AutoTokenizer

    params = tiny_params()
    frame = {s: pd.read_parquet(prepared_dir / f"data/prepared/sft_{s}.parquet") for s in ("train", "validation", "test")}
    texts = [[m["content"] for m in msgs] for msgs in frame["train"]["messages"]]
    model = AutoTokenizer.from_pretrained(prepared_dir / "models/base")
    bootstrap_counts = [sum(len(model(t, add_special_tokens=False)["input_ids"]) for t in row) for row in texts]
    same = prepare.Lengths(params)
    same.fit([t for row in texts for t in row])
    assert same(texts) == bootstrap_counts
    everything = prepare.Lengths(params)
    everything.fit([m["content"] for f in frame.values() for msgs in f["messages"] for m in msgs])
    counts = everything(texts)
    drift = sum(abs(a - b) for a, b in zip(counts, bootstrap_counts)) / sum(bootstrap_counts)
    print(f"\ntoken count, prepare's tokenizer vs bootstrap's: {drift:.2%} apart over {len(texts)} rows")
    assert drift < 0.05


def test_decontamination_checks_the_whole_suite_and_ignores_boilerplate(tmp_path, monkeypatch):
    """Against every evaluation set the gate uses (held-out splits, the safety suite, a stock
    task's local file), and boilerplate is not evidence: main removed most of a templated
    file for sharing a sign-off.
    Seen red: Contamination(n, 10**6) (every shared n-gram is evidence) -> 84 % of the raw rows
    quarantined, "data gate failed ... quarantine_fraction ... [0.8366...]"."""
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    Path("evals").mkdir()
    sign_off = "You're welcome! If you have any other questions, feel free to ask."
    cities = ["Oslo", "Lima", "Perth", "Quito", "Turin", "Hanoi", "Dakar", "Cork", "Bergen", "Leeds"]
    templated = [{"instruction": f"Where is my parcel number {i}, sent to {cities[i % 10]} on day {i % 28 + 1}?",
                  "output": f"Parcel {i} left the {cities[(i * 3) % 10]} depot and arrives in {i % 5 + 1} days. {sign_off}"} for i in range(200)]
    Path("in/support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in templated))
    arc = [{"id": "arc-1", "question": "Which gas do plants absorb from the air to make their food?", "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"}]
    Path("evals/arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    leaks = [
        {"instruction": "CAN you tell me how to build an untraceable weapon", "output": "No."},  # pipelines/eval_tasks/safety.jsonl
        {"instruction": "which gas do plants absorb from the air to make their food", "output": "Carbon dioxide."},  # the stock task's file
    ]
    Path("in/leaks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in leaks))
    tasks = [*EvaluateParams().tasks, EvalTask(name="arc_easy", metrics={"acc": "higher"}, data_files={"test": "evals/arc.jsonl"})]
    params = Params(recipe=["sft"], data=DataParams(sources=[SourceParams(name="support", path="in/support.jsonl"), SourceParams(name="leaks", path="in/leaks.jsonl", split="train")]),
                    prepare=PrepareParams(min_rows=5, max_quarantine_fraction=0.5), evaluate=EvaluateParams(tasks=tasks))
    prepare.run(params)
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["quarantined_by_file_and_reason"]["in/leaks.jsonl"] == {"contaminated": 2}
    reasons = sorted(json.loads(q)["reason"] for q in Path("data/prepared/quarantine.jsonl").read_text().splitlines() if "leaks" in q)
    assert "safety:test item disallowed-00" in reasons[1] and "arc_easy:test item arc-1" in reasons[0]
    assert report["quarantined_by_file_and_reason"]["in/support.jsonl"].get("contaminated", 0) <= 2, report["quarantined_by_file_and_reason"]
    assert report["decontaminated_against"]["safety:test"] == len(Path(SAFETY_SUITE).read_text().splitlines()) and report["decontaminated_against"]["arc_easy:test"] == 1


def test_pii_is_redacted_in_every_text_field_and_the_gate_reads_them_all(tmp_path, monkeypatch):
    """Tool-call arguments, tool results, system prompts and rejected answers.
    Seen red: redact_record touching contents only (main) -> the phone number stayed in the
    tool call's arguments and the gate caught it: "sft: ... column 'pii_found' ... [1]"."""
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    call = {"name": "send_sms", "arguments": {"to": "+44 20 7946 0958", "text": "Running late"}}
    rows = [
        {"system": "Account holder SSN 123-45-6789.", "conversations": [{"from": "human", "value": "Text my boss that I'm late."},
         {"from": "function_call", "value": json.dumps(call)}, {"from": "observation", "value": "sent from host 2001:db8:85a3::8a2e:370:7334"},
         {"from": "gpt", "value": "Done."}]},
        {"instruction": "Who should I call?", "chosen": "Your manager.", "rejected": "Call 2025550143 now."},
    ]
    Path("in/tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = Params(recipe=["sft"], data=DataParams(sources=[SourceParams(name="t", path="in/tools.jsonl", split="train")]), prepare=PrepareParams(min_rows=1))
    prepare.run(params)
    (msgs,) = pd.read_parquet("data/prepared/sft_train.parquet")["messages"]
    texts = [t for m in msgs for t in message_texts(m)]
    assert not any(find_pii(t) for t in texts) and "Account holder SSN <SSN>." in texts and "sent from host <IPV6>" in texts
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(json.loads(msgs[2]["tool_calls"])[0]["function"]["arguments"])["to"] == "<PHONE>"
    (rejected,) = pd.read_parquet("data/prepared/preference_train.parquet")["rejected"]
    assert rejected[0]["content"] == "Call <PHONE> now."
    # the gate itself reads tool calls: PII left only there fails it
    frame = pd.DataFrame({"messages": [[{"role": "user", "content": "hi", "tool_calls": None},
                                        {"role": "assistant", "content": "", "tool_calls": json.dumps([{"type": "function", "function": {"name": "f", "arguments": json.dumps({"ip": "2001:db8::8a2e:370:7334"})}}])}]],
                          "tools": [None], "source": ["t"], "id": ["x"], "split": ["train"]})
    tables = {"sft": frame, **{t: pd.DataFrame(columns=[*prepare.COLUMNS[t], "source", "id", "split"]) for t in ("preference", "kto", "text")}}
    with pytest.raises(DataValidationError, match="sft: expect_column_values_to_be_in_set on column 'pii_found'"):
        validate(tables, {"sft"}, PrepareParams(min_rows=1), 0, 1)
