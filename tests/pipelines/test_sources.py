"""Bringing your own data: `make data-add` (python -m pipelines.sources add) copies a file into
data/raw/ and tracks it with DVC, recording its format (FORMAT=..., or the LLaMA-Factory entry
beside it) in data/raw/dataset_info.json for prepare; a bad file is refused with its name; and
no stage ever writes over a user's file (the generator used to check its output out over
data/raw/)."""

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
from tests.pipelines import llamafactory_rows as lf

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


def test_add_accepts_llamafactory_demo_files_and_carries_their_declaration(repo, tmp_path_factory, capsys):
    """`make data-add FILE=LLaMA-Factory/data/dpo_en_demo.json`: the pairs are read (main: 0 of
    300, all bad_type, and the file refused), and the entry of the dataset_info.json beside
    it (ranking, sharegpt) is recorded for prepare."""
    home = tmp_path_factory.mktemp("lf")
    lf.write_demo_folder(home)
    dest = sources.add(home / "dpo_en_demo.json")
    out = capsys.readouterr().out
    assert "added data/raw/dpo_en_demo.json (preference 3)" in out and "format 'sharegpt' (ranking) recorded in data/raw/dataset_info.json" in out
    info = json.loads(Path("data/raw/dataset_info.json").read_text())
    assert info == {"dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True, "columns": lf.DATASET_INFO["dpo_en_demo"]["columns"]}}
    assert "data/raw/dataset_info.json" in out.split("commit ", 1)[1], "the declaration is committed with git"
    bare = tmp_path_factory.mktemp("bare") / "kto_en_demo.json"
    bare.write_text(json.dumps(lf.KTO))
    sources.add(bare)  # no dataset_info.json beside it: auto-detection alone
    assert "added data/raw/kto_en_demo.json (kto 3)" in capsys.readouterr().out
    assert set(json.loads(Path("data/raw/dataset_info.json").read_text())) == {"dpo_en_demo"}, "auto records nothing"
    assert dest.exists()


def test_add_records_the_format_and_prepare_reads_the_file_so(repo, tmp_path_factory, capsys):
    """FORMAT used to affect the parse check only: prepare read the file as `auto`.
    Seen red: read_source ignoring the recorded entry (reading as the source's `auto`, as main
    did) -> "read as recorded, not as auto: assert {} == {'missing_field': 2}"."""
    rows = [*lf.ALPACA_PREFERENCE, {"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": "Bye."}]
    src = tmp_path_factory.mktemp("home") / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources.add(src, "preference")
    out = capsys.readouterr().out
    assert "added data/raw/pairs.jsonl (preference 2, quarantined: missing_field 2)" in out
    assert json.loads(Path("data/raw/dataset_info.json").read_text())["pairs"] == {"file_name": "pairs.jsonl", "formatting": "preference"}
    sources.list_sources(Params())
    assert "data/raw/pairs.jsonl (format preference: data/raw/dataset_info.json entry 'pairs')" in capsys.readouterr().out
    params = Params(generate=GenerateParams(n_sft=300, n_preference=100))
    generate.run(params)
    prepare.run(params)
    report = json.loads(Path("metrics/prepare.json").read_text())
    assert report["quarantined_by_file_and_reason"]["data/raw/pairs.jsonl"] == {"missing_field": 2}, "read as recorded, not as auto"
    assert report["rows_by_file"]["data/raw/pairs.jsonl"] == {"raw": 4, "kept": 2, "quarantined": 2}
