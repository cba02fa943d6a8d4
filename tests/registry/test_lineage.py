"""The lineage record kept with a version, read back through a real MLflow store; the lineage
graph, text and image; the comparison a rebuild is judged by (a changed hash is caught); the
model card and signature; the CLI's clear refusals. The full rebuild of a released version runs in
tests/flows/test_lifecycle.py."""

import subprocess
from pathlib import Path

import pytest
import yaml

from registry import card, lineage, models
from registry.graph import lineage_text, plot_lineage
from registry.reproduce import compare, render

LOCK = {
    "schema": "2.0",
    "stages": {
        "prepare": {
            "cmd": "python -m pipelines.prepare",
            "deps": [{"path": "pipelines/prepare.py", "md5": "c0de"}, {"path": "data/raw", "md5": "raw1.dir"}, {"path": "data/generated", "md5": "gen1.dir"}],
            "params": {"params.yaml": {"prepare": {"test_fraction": 0.1}}},
            "outs": [{"path": "data/prepared", "md5": "prep1.dir"}, {"path": "metrics/prepare.json", "md5": "m1"}],
        },
        "generate": {"cmd": "python -m pipelines.generate", "deps": [{"path": "pipelines/generate.py", "md5": "c1"}], "outs": [{"path": "data/generated", "md5": "gen1.dir"}]},
        "sft": {
            "cmd": "python -m pipelines.sft",
            "deps": [{"path": "data/prepared/sft_train.parquet", "md5": "t1"}, {"path": "pipelines/sft.py", "md5": "c2"}],
            "params": {"params.yaml": {"sft": {"max_steps": 5, "learning_rate": 0.003}}},
            "outs": [{"path": "models/sft", "md5": "model1.dir"}, {"path": "metrics/sft.json", "md5": "timing1"}],
        },
    },
}
DAG = {"stages": {"prepare": {"metrics": [{"metrics/prepare.json": {"cache": False}}]}, "sft": {"metrics": [{"metrics/sft.json": {"cache": False}}]}}}


def test_stage_graph_links_outputs_to_the_stages_that_read_them():
    steps = {s["stage"]: s for s in lineage.stage_graph(LOCK, DAG)}
    prep_inputs = {i["path"]: i["made_by"] for i in steps["prepare"]["inputs"]}
    assert prep_inputs == {"data/raw": None, "data/generated": "generate"}
    assert [c["path"] for c in steps["prepare"]["code"]] == ["pipelines/prepare.py"]
    assert {i["path"]: i["made_by"] for i in steps["sft"]["inputs"]} == {"data/prepared/sft_train.parquet": "prepare"}
    assert steps["sft"]["params"] == {"sft": {"max_steps": 5, "learning_rate": 0.003}}
    # metrics hold timings: not artifacts a rebuild must reproduce
    assert lineage.artifact_hashes(LOCK, DAG) == {"data/raw": "raw1.dir", "data/prepared": "prep1.dir", "data/generated": "gen1.dir", "models/sft": "model1.dir"}


def test_a_rebuild_with_one_changed_hash_is_not_reproduced():
    rebuilt = yaml.safe_load(yaml.safe_dump(LOCK))
    rebuilt["stages"]["sft"]["outs"][0]["md5"] = "model2.dir"
    rebuilt["stages"]["sft"]["outs"][1]["md5"] = "timing2"  # a timing changed too: ignored
    rows = compare(LOCK, rebuilt, DAG)
    assert [r["path"] for r in rows if not r["match"]] == ["models/sft"]
    report = {"model": "m", "version": "1", "matched": False, "hashes": rows, "scratch": "/tmp/x", "code_differences": ["pipelines/sft.py"]}
    text = render(report)
    assert "NOT reproduced: 1 of 4 hashes differ" in text and "pipelines/sft.py" in text
    assert all(r["match"] for r in compare(LOCK, LOCK, DAG))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    return client(), experiment_id("test")


def test_record_round_trips_through_mlflow_with_pointers_and_patch(store, tmp_path):
    c, exp = store
    subprocess.run(["git", "init", "-q"], check=True)
    Path("params.yaml").write_text("sft: {max_steps: 5}\n")
    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    Path("params.yaml").write_text("sft: {max_steps: 7}\n")  # uncommitted: must travel as a patch
    Path("dvc.lock").write_text(yaml.safe_dump(LOCK))
    Path("dvc.yaml").write_text(yaml.safe_dump(DAG))
    (Path("data/raw")).mkdir(parents=True)
    Path("data/raw/mine.jsonl.dvc").write_text("outs:\n- md5: abc\n  path: mine.jsonl\n")
    Path("data/raw/.gitignore").write_text("/mine.jsonl\n")
    run = c.create_run(exp).info.run_id
    logged = lineage.log_record(run)
    assert {"dvc.lock", "params.yaml", "dvc.yaml", "code.patch", "dvcfiles/data/raw/mine.jsonl.dvc", "dvcfiles/data/raw/.gitignore"} <= set(logged)
    record = lineage.load_record(run)
    assert record["lock"] == LOCK and record["dag"] == DAG and "max_steps: 7" in record["params_text"]
    assert "+sft: {max_steps: 7}" in record["patch"]
    assert record["dvcfiles"]["data/raw/mine.jsonl.dvc"].startswith("outs:")
    with pytest.raises(lineage.NoRecord):
        lineage.load_record(c.create_run(exp).info.run_id)


def test_text_image_card_and_signature_of_a_registered_version(store, tmp_path):
    c, exp = store
    Path("dvc.lock").write_text(yaml.safe_dump(LOCK))
    Path("params.yaml").write_text(yaml.safe_dump({"data": {"sources": [{"name": "demo", "path": "data/generated"}]}, "model": {"base_model": "bootstrap"}}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    run = c.create_run(exp).info.run_id
    lineage.log_record(run)
    feedback = {"lineage.feedback.source": "feedback", "lineage.feedback.rows": "24", "lineage.feedback.tables": "preference:24", "lineage.feedback.feedback": "24",
                "lineage.feedback.versions": "3:17,4:7", "lineage.feedback.decisions": "edited:8,accepted:16", "lineage.feedback.rows_trained": "23"}  # as feedback_lineage writes them
    mv = models.register("m", tmp_path / "m", run, "model1.dir", {"lineage.git_sha": "abc123def4567", "lineage.stage_run.sft": "run-of-sft-0001", "metric.exact_match": "0.95", "recipe": "sft", **feedback})
    card.record_gate("m", str(mv.version), "quality", False, "exact_match = 0.5 vs >= 0.8")
    mv = c.get_model_version("m", str(mv.version))
    text = lineage_text("m", mv, lineage.load_record(run))
    assert "data/raw" in text and "run-of-sft-0" in text and "models/sft" in text and "= the version's model" in text
    assert "params  sft.learning_rate=0.003, sft.max_steps=5" in text, text
    assert "feedback trained on: source feedback, 24 rows (preference:24), 23 kept by prepare from 24 feedback" in text, text
    assert "answers of model versions 3:17,4:7   review decisions edited:8,accepted:16" in text and "gated on (held out)" not in text
    png = plot_lineage("m", mv, lineage.load_record(run), tmp_path / "g.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5_000
    assert "**quality**: FAILED: exact_match = 0.5 vs >= 0.8" in mv.description
    assert "| exact_match | 0.9500 |" in mv.description and "`data/raw` md5 `raw1.dir`" in mv.description and "bootstrap" in mv.description
    import mlflow
    from mlflow.models import Model

    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/MLmodel", dst_path=str(tmp_path / "dl"))
    assert Model.load(mlmodel).signature.inputs.input_names() == ["messages", "max_tokens", "temperature"]


def test_cli_refuses_clearly(store, tmp_path, capsys):
    from registry.cli import main

    with pytest.raises(SystemExit) as err:
        main(["lineage"])
    assert err.value.code == 2 and "lineage needs a VERSION" in capsys.readouterr().err
    Path("params.yaml").write_text("{}\n")
    with pytest.raises(SystemExit, match="has no version 9"):
        main(["lineage", "9"])
