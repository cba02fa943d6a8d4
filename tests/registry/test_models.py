"""The registry against a real MLflow (SQLite store in a temp folder): versions, aliases,
promotion keeps `previous`, rejection tags the report, rollback by hand, lineage tags."""

from pathlib import Path

import pytest
import yaml

from registry import lineage, models


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from registry.store import client, experiment_id

    exp = experiment_id("test")
    return client(), exp


def new_version(store, tmp_path, md5: str, metrics: dict | None = None) -> str:
    c, exp = store
    run = c.create_run(exp)
    model = tmp_path / f"model-{md5}"
    model.mkdir()
    (model / "config.json").write_text('{"md5": "%s"}' % md5)
    tags = {f"metric.{k}": str(v) for k, v in (metrics or {}).items()}
    return str(models.register("m", model, run.info.run_id, md5, tags).version)


def alias(name: str) -> str | None:
    mv = models.by_alias("m", name)
    return str(mv.version) if mv else None


def test_promote_moves_champion_and_keeps_previous(store, tmp_path):
    v1 = new_version(store, tmp_path, "a", {"exact_match": 0.9})
    assert alias("candidate") == v1 and alias("champion") is None
    assert models.promote("m", v1) is None
    assert (alias("champion"), alias("previous"), alias("candidate")) == (v1, None, None)
    v2 = new_version(store, tmp_path, "b")
    old = models.promote("m", v2)
    assert str(old.version) == v1
    assert (alias("champion"), alias("previous")) == (v2, v1)
    assert models.metrics_of(models.by_alias("m", "previous")) == {"exact_match": 0.9}


def test_promoting_the_champion_again_does_not_make_it_its_own_previous(store, tmp_path):
    v1 = new_version(store, tmp_path, "a")
    models.promote("m", v1)
    models.promote("m", v1)
    assert alias("champion") == v1 and alias("previous") is None


def test_reject_tags_the_report_and_leaves_champion(store, tmp_path):
    v1 = new_version(store, tmp_path, "a")
    models.promote("m", v1)
    v2 = new_version(store, tmp_path, "b")
    models.reject("m", v2, "canary gate FAILED: error_rate 1.0")
    c, _ = store
    tags = c.get_model_version("m", v2).tags
    assert tags["canary"] == "rolled_back" and "error_rate" in tags["canary.report"]
    assert (alias("champion"), alias("candidate")) == (v1, None)


def test_rollback_by_hand_swaps_champion_and_previous(store, tmp_path):
    v1 = new_version(store, tmp_path, "a")
    models.promote("m", v1)
    with pytest.raises(SystemExit, match="no 'previous'"):
        models.rollback("m")
    v2 = new_version(store, tmp_path, "b")
    models.promote("m", v2)
    assert models.rollback("m") == (v2, v1)
    assert (alias("champion"), alias("previous")) == (v1, v2)


def test_same_bytes_are_found_again_and_download_round_trips(store, tmp_path):
    v1 = new_version(store, tmp_path, "abc.dir")
    assert str(models.find_by_model_hash("m", "abc.dir").version) == v1
    assert models.find_by_model_hash("m", "other") is None
    got = models.download(models.by_alias("m", "candidate"), tmp_path / "dl")
    assert (Path(got) / "config.json").read_text() == '{"md5": "abc.dir"}'


def test_lineage_reads_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = {
        "schema": "2.0",
        "stages": {
            "sft": {
                "cmd": "python -m pipelines.sft",
                "params": {"params.yaml": {"sft": {"max_steps": 5}}},
                "outs": [{"path": "models/sft", "md5": "123.dir", "size": 1}],
            }
        },
    }
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    hashes = lineage.dvc_lock_hashes()
    assert hashes["sft:models/sft"] == "123.dir" and len(hashes["sft:params"]) == 32
    tags = lineage.lineage_tags("flow-1", "run-1", {"sft": "r-sft"})
    assert tags["lineage.dvc.sft:models/sft"] == "123.dir"
    assert tags["lineage.prefect_flow_run_id"] == "flow-1" and tags["lineage.stage_run.sft"] == "r-sft"
    assert tags["lineage.git_sha"] == "unknown"  # not a git checkout
