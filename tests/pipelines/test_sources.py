"""Bringing your own data: `make data-add` (python -m pipelines.sources add) copies a file into
data/raw/ and tracks it with DVC; a bad file is refused with its name; and no stage ever
writes over a user's file (the generator used to check its output out over data/raw/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import generate, prepare, sources
from pipelines.config import ConfigError, Params, load_params
from pipelines.data_config import GenerateParams
from tests.conftest import ROOT

USER_ROWS = [{"conversations": [{"from": "human", "value": f"Reverse the list:\n{i} 8 1"}, {"from": "gpt", "value": f"1 8 {i}"}]} for i in range(10)]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    return tmp_path


def test_add_copies_tracks_and_counts(repo, tmp_path_factory, capsys):
    src = tmp_path_factory.mktemp("home") / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in USER_ROWS))
    dest = sources.add(src)
    assert dest == Path("data/raw/mine.jsonl") and dest.read_bytes() == src.read_bytes()
    assert Path("data/raw/mine.jsonl.dvc").exists(), "DVC tracks it: the .dvc file is what git commits"
    assert "mine.jsonl" in Path("data/raw/.gitignore").read_text()
    out = capsys.readouterr().out
    assert "added data/raw/mine.jsonl (sft 10)" in out and "tracked by DVC" in out


def test_a_bad_file_is_refused_by_name(repo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"colour\": 1}\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl: no usable rows in format 'auto' \(malformed_json x1, unknown_format x1\)"):
        sources.add(bad)
    with pytest.raises(SystemExit, match="unsupported file type '.txt'"):
        (tmp_path / "notes.txt").write_text("hi")
        sources.add(tmp_path / "notes.txt")
    assert not Path("data/raw/bad.jsonl").exists()


def test_a_user_file_survives_the_generator_and_prepare(repo):
    Path("data/raw").mkdir(parents=True)
    mine = Path("data/raw/mine.jsonl")
    mine.write_text("".join(json.dumps(r) + "\n" for r in USER_ROWS))
    before = mine.read_bytes()
    params = Params(generate=GenerateParams(n_sft=300, n_preference=100))
    generate.run(params)
    prepare.run(params)
    assert mine.read_bytes() == before
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["rows_by_file"]["data/raw/mine.jsonl"]["raw"] == 10, "the user's rows were read"
    assert set(Path("data/generated").iterdir()) and not (Path("data/raw") / "alpaca.jsonl").exists()


def test_a_missing_required_source_and_bad_source_config_name_the_problem(repo):
    Path("params.yaml").write_text("data:\n  sources:\n    - {name: corp, path: corpora/*.csv}\n")
    with pytest.raises(SystemExit, match="source 'corp': no data files at 'corpora/\\*.csv'"):
        prepare.run(load_params())
    Path("params.yaml").write_text("data:\n  sources:\n    - {name: corp, paths: x}\n")
    with pytest.raises(ConfigError, match=r"data.sources.0.paths: unknown key \(did you mean 'path'"):
        load_params()
    Path("params.yaml").write_text("data:\n  sources:\n    - {name: corp, path: x, format: sharegtp}\n")
    with pytest.raises(ConfigError, match="data.sources.0.format"):
        load_params()


def make_dry_run(*args: str) -> list[str]:
    """`make -n` as a user runs it (not as a child of `make test`, whose MAKEFLAGS add lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, env=env).stdout.splitlines()


def test_make_data_add_runs_exactly_this_command():
    assert any(line.endswith('-m pipelines.sources add "some file.jsonl" --format auto') for line in make_dry_run("data-add", "FILE=some file.jsonl"))


def test_make_clean_leaves_the_users_files_alone():
    out = "\n".join(make_dry_run("clean"))
    assert "data/generated" in out and "data/raw" not in out
    assert not any(store in out for store in ("mlflow.db", "mlartifacts", ".dvc-remote")), "the registry and the DVC remote are the only copies of released models"


def test_make_clean_all_deletes_the_registry_only_when_confirmed(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def stores() -> list[Path]:
        for name in ("mlflow.db", "mlartifacts/m", ".dvc-remote/x"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).touch()
        return [tmp_path / "mlflow.db", tmp_path / "mlartifacts", tmp_path / ".dvc-remote"]

    kept = stores()
    refused = subprocess.run(["make", "clean-all"], cwd=tmp_path, input="yes\n", capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "kept the registry" in refused.stdout and all(p.exists() for p in kept)
    confirmed = subprocess.run(["make", "clean-all"], cwd=tmp_path, input="delete\n", capture_output=True, text=True, env=env)
    assert confirmed.returncode == 0 and not any(p.exists() for p in kept)
    kept = stores()
    forced = subprocess.run(["make", "clean-all", "FORCE=1"], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    assert forced.returncode == 0 and not any(p.exists() for p in kept)
