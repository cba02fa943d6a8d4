"""The scheduled checks over the record of every answer (flows/watch.py), run as Prefect flows
on a record written through the record's own store: online quality scores users' answers by
version with the judge and leaves the plane's own traffic out; drift stays quiet on windows of
the test split and flags prompts from another distribution. Both write what the receiver's
exporter serves to Prometheus, an MLflow run and a Prefect artifact. The path from those files
through Prometheus and Alertmanager to the receiver is tests/monitoring/test_alert_path.py."""

from __future__ import annotations

import json
import random
import shutil

import pandas as pd
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from pipelines.config import Params
from pipelines.data_config import GenerateParams
from pipelines.formats import chat_messages
from pipelines.generate import make_item
from serving.alerts import read_checks
from serving.record import Row, open_store
from tests.conftest import ROOT, build_workspace, tiny_params

T0 = 1_780_000_000.0  # a fixed hour: the flows are given `until`, so nothing depends on the clock
HOUR = 3600.0
ENGLISH = ["How do I bake bread at home?", "What is the capital of France?", "Write a short poem about the sea.", "Explain photosynthesis simply.", "Translate 'good morning' to Spanish.", "Summarise the plot of Hamlet."]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipelines import generate, prepare

    params = tiny_params(generate=GenerateParams(n_sft=1500, n_preference=160))
    return build_workspace(tmp_path_factory.mktemp("watch"), params, generate, prepare)


@pytest.fixture
def project(prepared, tmp_path, monkeypatch):
    shutil.copytree(prepared / "data", tmp_path / "data")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["monitor"].update(quality_sample_rate=1.0, quality_min_samples=10, drift_min_prompts=20, drift_reference_size=400)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LIFECYCLE_RECORD_URL", raising=False)
    return tmp_path


def test_split_prompts(split: str = "test") -> list[list[dict]]:
    """The prepared split's conversations up to their last user turn."""
    out = []
    for cell in pd.read_parquet(f"data/prepared/sft_{split}.parquet")["messages"]:
        messages = chat_messages(cell)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


test_split_prompts.__test__ = False  # a helper, not a test


def row(i: int, messages: list[dict], answer: str, version: str = "1", ts: float = T0 + 60, **kw) -> Row:
    fields = dict(id=f"chatcmpl-{version}-{i:05d}", ts=ts, key_id="k1", tier="free", model="reverse-digits", version=version, replica=f"v{version}-r0",
                  endpoint="chat", prompt=json.dumps(messages), answer=answer, params="{}", finish_reason="stop", prompt_tokens=10, completion_tokens=5,
                  latency_s=0.05, cache_hit=False, status=200, stream=False)
    return Row(**{**fields, **kw})


def record(rows: list[Row]) -> None:
    store = open_store(".serving/plane/record.sqlite3")  # where the plane records by default
    try:
        store.write_batch(rows)
    finally:
        store.close()


def reverse_prompts(n: int, seed: int) -> list[tuple[list[dict], list[str]]]:
    rng = random.Random(seed)
    cfg = GenerateParams(min_len=3, max_len=5)
    out = []
    for _ in range(n):
        digits = make_item(rng, cfg)[0]
        out.append(([{"role": "user", "content": f"Reverse the list:\n{digits}"}], digits.split()))
    return out


def test_online_quality_scores_each_versions_users_answers_and_leaves_the_planes_own_out(project):
    """v1 answers users right; the plane's own service traffic to v1, a cache hit and a failed
    answer are wrong and must not count. v2 answers wrong; v3 has too few answers to score.
    Seen red: with users_rows keeping the service tier, v1 scored 0.773 on 45 answers."""
    from flows.watch import online_quality

    rows = []
    for i, (messages, digits) in enumerate(reverse_prompts(30, seed=1)):
        rows.append(row(i, messages, " ".join(reversed(digits))))
    for i, (messages, digits) in enumerate(reverse_prompts(15, seed=2)):
        rows.append(row(100 + i, messages, " ".join(digits), tier="service", key_id="plane"))
    rows += [row(200, *_wrong(3), cache_hit=True, replica="cache"), row(201, _wrong(4)[0], None, status=500), row(202, *_wrong(5), finish_reason="aborted", stream=True)]
    for i, (messages, digits) in enumerate(reverse_prompts(30, seed=6)):
        rows.append(row(i, messages, " ".join(digits), version="2"))  # not reversed
    rows += [row(i, m, " ".join(reversed(d)), version="3") for i, (m, d) in enumerate(reverse_prompts(5, seed=7))]
    rows.append(row(999, *_wrong(8), ts=T0 - 10))  # before the window
    record(rows)

    report = online_quality(window="1h", until=T0 + HOUR)

    v = report["versions"]
    assert (v["1"]["samples"], v["1"]["score"], v["1"]["exported"]) == (30, 1.0, True)
    assert v["2"]["samples"] == 30 and v["2"]["score"] < 0.5 and v["2"]["exported"]
    assert v["3"]["samples"] == 5 and not v["3"]["exported"], "fewer than quality_min_samples: no score"
    checks, bad = read_checks(project / ".serving/monitoring/checks", max_age_s=1e12)
    assert bad == []
    assert {(c.version, round(c.score, 3)) for c in checks} == {("1", 1.0), ("2", round(v["2"]["score"], 3))}
    from mlflow import MlflowClient

    run = MlflowClient().get_run(report["mlflow_run"])
    assert run.data.metrics["v1/score"] == 1.0 and run.data.metrics["v2/samples"] == 30


def _wrong(seed: int) -> tuple[list[dict], str]:
    (messages, digits), = reverse_prompts(1, seed)
    return messages, " ".join(digits) + " 0"


def test_nothing_recorded_yet_is_a_completed_run_that_says_so(project):
    from flows.watch import drift, online_quality

    assert "no record at" in online_quality(window="1h", until=T0)["skipped"]
    assert "no record at" in drift(window="1h", until=T0)["skipped"]


def test_drift_is_quiet_on_the_test_split_and_flags_prompts_from_another_distribution(project):
    """Four consecutive hours of users sending the test split's prompts: none of the last three is flagged
    against the training prompts or against the hour before (6 comparisons at alpha = 0.01).
    Then an hour of other requests (English questions, the task in Russian): flagged against
    both, by the checks that should see it, and exported above the threshold.
    Seen red: with a row's prompt read as the stored JSON of its messages instead of the user's
    last turn, every test-split hour was flagged against training (length p ~ 1e-76,
    vocabulary, domain)."""
    from flows.watch import drift

    prompts = test_split_prompts()
    assert len(prompts) >= 100, len(prompts)
    rng = random.Random(0)
    quiet = []
    for hour in range(4):
        window = rng.sample(prompts, 60)
        record([row(hour * 1000 + i, m, "ok", ts=T0 + hour * HOUR + i) for i, m in enumerate(window)])
        if hour:
            report = drift(window="1h", until=T0 + (hour + 1) * HOUR)
            assert set(report["comparisons"]) == {"training", "previous window"}
            quiet.append(report)
    flagged = [(label, c["check"], c["p"]) for r in quiet for label, comp in r["comparisons"].items() for c in comp["checks"] if c["drifted"]]
    assert flagged == [], flagged

    other = [[{"role": "user", "content": rng.choice(ENGLISH)}] for _ in range(40)]
    other += [[{"role": "user", "content": m[-1]["content"].replace("Reverse the list", "Переверни список")}] for m, _ in reverse_prompts(30, seed=11)]
    record([row(9000 + i, m, "ok", ts=T0 + 4 * HOUR + i) for i, m in enumerate(other)])
    report = drift(window="1h", until=T0 + 5 * HOUR)
    assert report["drifted"]
    by = {c["check"]: c for c in report["comparisons"]["training"]["checks"]}
    assert by["script"]["drifted"] and by["vocabulary"]["drifted"] and by["domain"]["drifted"], by
    checks, bad = read_checks(project / ".serving/monitoring/checks", max_age_s=1e12)
    exported = {c.check: c for c in checks}
    assert bad == [] and {"length", "script", "vocabulary", "domain", "domain-vs-previous"} <= set(exported)
    assert exported["domain"].score > exported["domain"].threshold and exported["script"].score > exported["script"].threshold
    assert (project / ".serving/monitoring/drift/lengths.png").stat().st_size > 5_000
    from mlflow import MlflowClient

    run = MlflowClient().get_run(report["mlflow_run"])
    assert run.data.tags["drifted"] == "true" and run.data.metrics["training/domain/score"] > 2


def test_params_for_the_checks_are_validated_before_any_work():
    with pytest.raises(ValueError, match="drift_min_prompts"):
        Params.model_validate({"monitor": {"drift_min_prompts": 3}})
