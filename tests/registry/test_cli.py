"""`make rollback` / `python -m registry.cli rollback` and `show` against a real MLflow store."""

from pathlib import Path

import pytest

from registry import cli, models


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Path("params.yaml").write_text("registry:\n  model_name: m\n")
    from registry.store import client, experiment_id

    c, exp = client(), experiment_id("test")
    versions = []
    for tag in ("a", "b"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "config.json").write_text("{}")
        mv = models.register("m", tmp_path / tag, c.create_run(exp).info.run_id, tag, {"metric.exact_match": "0.9"})
        models.promote("m", str(mv.version))
        versions.append(str(mv.version))
    return versions


def test_rollback_command_restores_previous(store, capsys):
    v1, v2 = store
    cli.main(["rollback"])
    assert f"champion is now version {v1} (was {v2})" in capsys.readouterr().out
    assert str(models.by_alias("m", "champion").version) == v1
    cli.main(["show"])
    out = capsys.readouterr().out
    assert f"champion: version {v1}" in out and f"previous: version {v2}" in out


def test_a_rollback_by_hand_marks_the_version_so_its_bytes_do_not_come_back(store, capsys):
    """`make rollback` takes the champion out for a reason; a rerun that produces the same bytes
    must be refused as it is after a canary's rollback (tasks/registry.py asks `blocked`).
    Seen red: with rollback() leaving the status alone (as before), v2's status stayed
    'promoted' and blocked() returned None."""
    v1, v2 = store
    cli.main(["rollback", "--reason", "p95 latency doubled after the release"])
    mv = models.client().get_model_version("m", v2)
    assert mv.tags["status"] == "rolled_back" and mv.tags["rolled_back_by_hand"] == "true"
    assert "rolled back by hand by " in mv.tags["status.reason"] and mv.tags["status.reason"].endswith(": p95 latency doubled after the release")
    why = models.blocked(models.find_by_model_hash("m", "b"))
    assert why and f"version {v2} has exactly these bytes and was rolled back: rolled back by hand" in why
    assert models.blocked(models.client().get_model_version("m", v1)) is None, "the champion it went back to is untouched"


def test_bad_params_file_fails_with_the_key(store, capsys):
    Path("params.yaml").write_text("registry:\n  modelname: m\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["show"])
    assert exit_.value.code == 2
    assert "registry.modelname: unknown key (did you mean 'model_name'?)" in capsys.readouterr().err


def test_approve_command_records_who_and_why(store, capsys):
    v1, v2 = store
    models.reject("m", v2, "canary gate FAILED: error_rate 0.5")
    cli.main(["approve", v2, "--reason", "the canary host was overloaded"])
    assert f"approved version {v2}" in capsys.readouterr().out
    mv = models.client().get_model_version("m", v2)
    assert mv.tags["approval.reason"] == "the canary host was overloaded" and mv.tags["approval.by"]
    assert models.blocked(mv) is None
