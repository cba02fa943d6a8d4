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
    version = str(models.register("m", model, run.info.run_id, md5, tags).version)
    models.mark_candidate("m", version)  # as the quality gate does once it passes
    return version


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


def test_registration_alone_gives_no_alias(store, tmp_path):
    c, exp = store
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "config.json").write_text("{}")
    mv = models.register("m", tmp_path / "m0", c.create_run(exp).info.run_id, "x", {})
    assert alias("candidate") is None and mv.tags["status"] == "registered"


def test_rejection_sticks_to_the_bytes_until_a_person_approves(store, tmp_path):
    v1 = new_version(store, tmp_path, "bad")
    models.set_status("m", v1, models.REJECTED, "quality gate: exact_match = 0.1 vs >= 0.8")
    assert alias("candidate") is None, "a rejected version loses its candidate alias"
    mv = models.find_by_model_hash("m", "bad")
    why = models.blocked(mv)
    assert f"version {v1} has exactly these bytes and was rejected: quality gate: exact_match" in why
    assert f"registry.cli approve {v1}" in why
    with pytest.raises(SystemExit, match="--reason"):
        models.approve("m", v1, " ", "alice")
    approved = models.approve("m", v1, "threshold was mis-set; re-gate it", "alice")
    assert models.blocked(approved) is None
    assert approved.tags["approval.reason"] == "threshold was mis-set; re-gate it" and approved.tags["approval.by"] == "alice"
    # A new rejection of the same bytes blocks them again: an approval is spent once.
    models.reject("m", v1, "canary gate FAILED: error_rate 1.0")
    again = models.find_by_model_hash("m", "bad")
    assert "was rolled back: canary rolled back" in models.blocked(again)
    with pytest.raises(SystemExit, match="nothing to approve"):
        models.approve("m", new_version(store, tmp_path, "fine"), "why not", "bob")


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


def test_registration_keeps_the_trainable_weights_beside_the_served_model(store, tmp_path):
    """The served folder is quantized; the weights it was made from are logged beside it
    (artifact trainable/, tag `trainable`) and come back byte for byte: what a run with
    model.start_from: champion trains from. Unquantized, the served folder is the trainable one.
    Seen red: with register() ignoring trainable_dir, the version had no `trainable` tag and
    start_point refused the champion ("kept no trainable weights")."""
    c, exp = store
    served, trainable = tmp_path / "quantized", tmp_path / "dpo"
    for folder, text in ((served, "int8"), (trainable, "fp32")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
        (folder / "config.json").write_text("{}")
    v1 = str(models.register("m", served, c.create_run(exp).info.run_id, "q1", {}, trainable_dir=trainable).version)
    models.promote("m", v1)
    mv = models.start_point("m")
    assert str(mv.version) == v1 and mv.tags["trainable"].endswith("/trainable")
    got = models.download_trainable(mv, tmp_path / "start")
    assert (got / "model.safetensors").read_text() == "fp32" and not (got / "MLmodel").exists()
    assert (models.download(mv, tmp_path / "served") / "model.safetensors").read_text() == "int8"
    # Not quantized: no second copy, the tag names the served folder.
    v2 = str(models.register("m", trainable, c.create_run(exp).info.run_id, "f2", {}, trainable_dir=trainable).version)
    assert models.start_point("m", v2).tags["trainable"].endswith("/model")
    assert (models.download_trainable(models.start_point("m", v2), tmp_path / "start2") / "model.safetensors").read_text() == "fp32"


def test_no_start_point_is_refused_naming_the_key_and_the_fix(store, tmp_path):
    """No champion yet, a champion registered without trainable weights (keep_trainable off),
    a pinned version that does not exist: each refused before any work, with the fix."""
    with pytest.raises(models.NoStartPoint, match=r"model.start_from is 'champion' but model 'm' has no champion yet.*model.start_from: base"):
        models.start_point("m")
    v1 = new_version(store, tmp_path, "a")  # registered without trainable_dir
    models.promote("m", v1)
    with pytest.raises(models.NoStartPoint, match=r"version 1 of 'm' kept no trainable weights.*registry.keep_trainable: false.*model.start_version"):
        models.start_point("m")
    with pytest.raises(models.NoStartPoint, match=r"model.start_version 9: model 'm' has no such version"):
        models.start_point("m", "9")


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


def test_artifacts_follow_the_tracking_store(monkeypatch, tmp_path):
    """Local SQLite: a folder beside it; a tracking server: the server's artifact root; an
    object-store URL in $MLFLOW_ARTIFACT_ROOT: that URL, unchanged."""
    from registry.store import artifact_location

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_ARTIFACT_ROOT", raising=False)
    assert artifact_location() == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert artifact_location() is None
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", "s3://bucket/mlflow")
    assert artifact_location() == "s3://bucket/mlflow"
