"""`make rollback` / `python -m registry.cli rollback` and `show` against a real MLflow store."""

from pathlib import Path

import pytest

from registry import cli, models
from tests.serving.postgres_server import postgres_url  # noqa: F401  (a module-scoped real PostgreSQL, for the record commands)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Path("params.yaml").write_text("registry:\n  model_name: m\n")
    return promoted_versions(tmp_path)


def promoted_versions(tmp_path: Path) -> list[str]:
    """Model 'm' with versions a then b registered and promoted in turn (b is champion)."""
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


# --- the record of every answer: `lifecycle traffic` and `lifecycle forget` ----------------------


def recorded_rows(now: float) -> list:
    import json

    from serving.record import Row, key_id

    def one(i: int, key: str, version: str, finish: str, age_s: float) -> Row:
        prompt = json.dumps([{"role": "user", "content": f"Reverse the list: {i} 2 3, mail <EMAIL>"}])
        return Row(f"chatcmpl-{i:03d}", now - age_s, key_id(key), "gold" if key == GOLD else "free", "m", version, "v1-r0", "chat",
                   prompt, f"3 2 {i}", '{"temperature": 0}', finish, 9, 3, 0.05, False, 200, False)

    return [one(0, GOLD, "1", "stop", 3 * 86400), one(1, GOLD, "2", "stop", 60), one(2, FREE, "2", "length", 30), one(3, FREE, "2", "stop", 10)]


GOLD, FREE = "sk-gold-cli-0123456789", "sk-free-cli-0123456789"


@pytest.fixture
def record(tmp_path, monkeypatch):
    """A project folder whose plane has recorded four completions (the default SQLite file)."""
    import time

    from serving.record import open_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFECYCLE_RECORD_URL", raising=False)
    Path("params.yaml").write_text("registry:\n  model_name: m\n")
    with open_store(".serving/plane/record.sqlite3") as s:
        s.write_batch(recorded_rows(time.time()))
    return tmp_path / ".serving/plane/record.sqlite3"


def test_traffic_counts_and_lists_what_matches_by_version_time_key_and_finish_reason(record, capsys):
    from serving.record import key_id

    cli.main(["traffic", "--since", "1d"])
    out = capsys.readouterr().out
    assert out.startswith("3 completion(s) in SQLiteStore(.serving/plane/record.sqlite3) (since ")
    assert "by version        2: 3" in out and "by finish reason  stop: 2  length: 1" in out and "by tier           free: 2  gold: 1" in out
    table = out.split("newest 3:")[1].splitlines()[2:]
    assert [line.split()[2] for line in table] == ["chatcmpl-003", "chatcmpl-002", "chatcmpl-001"], "newest first"
    assert "Reverse the list: 3 2 3, mail <EMAIL>" in table[0]

    cli.main(["traffic", "2", "--key", FREE, "--finish-reason", "length"])
    out = capsys.readouterr().out
    assert f"key sk-fre… has key id {key_id(FREE)}" in out and FREE not in out.replace("sk-fre…", "")
    assert "1 completion(s)" in out and "chatcmpl-002" in out and "chatcmpl-003" not in out
    cli.main(["traffic", "--key", key_id(GOLD)])
    assert "2 completion(s)" in capsys.readouterr().out, "a key id works as well as the key"
    with pytest.raises(SystemExit, match="cannot read the time 'yesterday'"):
        cli.main(["traffic", "--since", "yesterday"])


def test_feedback_counts_by_kind_version_rating_and_decision(record, capsys):
    """Seen red: with feedback_cmd counting explicit feedback only (FeedbackFilters' default
    kind), the implicit signal was missing from the counts (2 feedback, not 3)."""
    from serving.record import key_id, open_store
    from serving.record.feedback import Feedback, Review, feedback_id

    def fb(cid: str, key: str, kind: str = "explicit", **fields) -> Feedback:
        base = dict(id=feedback_id(cid, key_id(key), kind, fields.get("signal")), completion_id=cid, key_id=key_id(key), tier="gold", kind=kind, signal=None, rating=None,
                    scale=None, correction=None, preferred=None, reason=None, tags=None, created=1.0, updated=1.0, revision=1)
        return Feedback(**{**base, **fields})

    with open_store(record) as s:
        first, _ = s.put_feedback(fb("chatcmpl-001", GOLD, rating=-1, scale="thumbs", correction="3 2 1"))
        s.put_feedback(fb("chatcmpl-002", FREE, rating=1, scale="thumbs"))
        s.put_feedback(fb("chatcmpl-002", FREE, "implicit", signal="copied"))
        s.put_reviews([Review(first.id, 1, "accepted", None, "ann", 2.0)])
    cli.main(["feedback"])
    out = capsys.readouterr().out
    assert "3 feedback in" in out and "by kind      explicit: 2  implicit: 1" in out and "by decision  -: 2  accepted: 1" in out
    assert "by rating" in out and "-1: 1" in out and "copied: 1" in out
    cli.main(["feedback", "1"])
    assert "0 feedback in" in capsys.readouterr().out


def test_traffic_exports_a_window_that_the_prepare_stage_reads(record, tmp_path, capsys):
    import json

    from pipelines.sources import check_file

    cli.main(["traffic", "2", "--since", "2min", "--export", "data/raw/traffic.jsonl"])
    assert "exported 3 answered completion(s) to data/raw/traffic.jsonl" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "data/raw/traffic.jsonl").read_text().splitlines()]
    assert [r["completion_id"] for r in rows] == ["chatcmpl-003", "chatcmpl-002", "chatcmpl-001"]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "3 2 3"} and rows[0]["tier"] == "free" and rows[0]["version"] == "2"
    assert check_file(tmp_path / "data/raw/traffic.jsonl", "openai") == {"sft": 3}


def test_forget_deletes_a_keys_rows_given_the_key_or_its_id(record, capsys):
    """Seen red: with forget_cmd deleting by the argument alone (no key_id() of it), `forget KEY`
    reported 0 rows and the key's completions stayed."""
    from serving.record import Filters, key_id, open_store

    cli.main(["forget", GOLD])
    assert f"forgot 2 completion(s) of key id {key_id(GOLD)}" in capsys.readouterr().out
    cli.main(["forget", key_id(FREE)])
    assert "forgot 2 completion(s)" in capsys.readouterr().out
    with open_store(record) as s:
        assert s.count(Filters()) == 0
    with pytest.raises(SystemExit) as exit_:
        cli.main(["forget"])
    assert exit_.value.code == 2 and "forget needs a KEY" in capsys.readouterr().err


def test_forget_and_traffic_on_postgresql(tmp_path, monkeypatch, capsys, postgres_url):  # noqa: F811
    import time

    from serving.record import open_store

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("registry:\n  model_name: m\n")
    monkeypatch.setenv("LIFECYCLE_RECORD_URL", postgres_url)  # record.store_env: the URL stays out of params.yaml
    with open_store(postgres_url) as s:
        s.write_batch(recorded_rows(time.time()))
    cli.main(["traffic", "--tier", "gold"])
    assert "2 completion(s) in PostgresStore(postgresql://postgres@127.0.0.1:" in capsys.readouterr().out
    cli.main(["forget", FREE])
    assert "forgot 2 completion(s)" in capsys.readouterr().out
    cli.main(["traffic"])
    assert capsys.readouterr().out.startswith("2 completion(s)")


def test_traffic_without_a_record_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFECYCLE_RECORD_URL", raising=False)
    Path("params.yaml").write_text("registry:\n  model_name: m\n")
    with pytest.raises(SystemExit, match=r"no record at .serving/plane/record.sqlite3 yet: the plane \(`make serve`\) records every answer there"):
        cli.main(["traffic"])
    assert not Path(".serving").exists(), "looking does not create an empty record"


def test_a_damaged_registry_store_is_one_line_naming_it_and_the_fix(store, tmp_path, monkeypatch, capsys):
    """A half-written mlflow.db (a disk filled mid-write, a copy cut short) must not greet the user
    with SQLAlchemy's traceback. Seen red: without run_command's handler the SystemExit never came
    and sqlalchemy's DatabaseError escaped."""
    good = (tmp_path / "mlflow.db").read_bytes()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(good[: len(good) // 2])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{damaged}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["show"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lifecycle show: the MLflow registry at sqlite:///{damaged} cannot be read (")
    assert "restore it from a backup, or point MLFLOW_TRACKING_URI at a good store" in err


class Exec(Exception):
    """os.execvpe reached: the process boundary, with what the engine would have been given."""


@pytest.mark.parametrize("engine", ["vllm", "tensorrt-llm"])
def test_serve_hands_a_gpu_engine_the_tls_pair_and_its_key_at_the_process_boundary(store, tmp_path, monkeypatch, engine):
    """`lifecycle serve` with serve.tls_*: vLLM gets its own --ssl-* flags and $VLLM_API_KEY from
    $SERVING_API_KEY; trtllm-serve, which has no TLS flags here, is refused naming the setting.
    Seen red: with the env line reading `params.cfg.engine` (a rename gone wrong) -> AttributeError
    instead of the exec."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("vllm", "trtllm-serve"):
        (bin_dir / exe).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("SERVING_API_KEY", "sk-serve-0123456789")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    Path("params.yaml").write_text(f"registry:\n  model_name: m\nserve:\n  engine: {engine}\n  port: 8123\n  tls_certfile: {cert}\n  tls_keyfile: {key}\n")

    def execvpe(file, argv, env):
        raise Exec(argv, env)

    monkeypatch.setattr(cli.os, "execvpe", execvpe)
    if engine == "tensorrt-llm":
        with pytest.raises(SystemExit, match="serve.tls_certfile: tensorrt-llm does not serve TLS itself here"):
            cli.main(["serve"])
        return
    with pytest.raises(Exec) as reached:
        cli.main(["serve"])
    argv, env = reached.value.args
    assert argv[0] == "vllm" and argv[argv.index("--ssl-certfile") + 1] == str(cert) and argv[argv.index("--ssl-keyfile") + 1] == str(key)
    assert env["VLLM_API_KEY"] == "sk-serve-0123456789" and "sk-serve-0123456789" not in argv
