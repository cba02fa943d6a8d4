"""The audit log (registry/audit.py): hash-chained JSON lines that `lifecycle audit verify`
checks, written by the registry at every promotion, rollback and approval, by concurrent
processes without breaking the chain, and listed and filtered by `lifecycle audit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry import models
from registry.access_cli import main as lifecycle
from registry.audit import AUDIT_ENV, AuditLog

ROOT = Path(__file__).resolve().parents[2]


def filled(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(1, n + 1):
        log.append("promote", f"user{i}", version=str(i), reason=f"reason {i}", evidence=f"runs:/r{i}/release/v{i}.json")
    return log


def verify_cli(log: AuditLog) -> subprocess.CompletedProcess:
    """`lifecycle audit verify` as a person runs it: its exit code and what it says."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), AUDIT_ENV: str(log.path)}
    return subprocess.run([sys.executable, "-m", "registry.cli", "audit", "verify"], capture_output=True, text=True, env=env, cwd=log.path.parent, timeout=120)


def test_an_intact_log_verifies_and_each_entry_carries_the_hash_of_the_one_before(tmp_path, capsys):
    log = filled(tmp_path / "audit.jsonl")
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5] and entries[0]["prev"] == "0" * 64
    assert entries[1]["prev"] != entries[2]["prev"]
    assert lifecycle(["audit", "verify", "--log", str(log.path)]) == 0
    assert "5 entries, chain intact" in capsys.readouterr().out


def test_editing_one_entry_is_detected_by_verify_naming_the_line(tmp_path):
    """Seen red: verify without its `prev` comparison (seq and head only) -> an edited reason
    in line 3 verified as intact (exit 0)."""
    log = filled(tmp_path / "audit.jsonl")
    lines = log.path.read_text().splitlines()
    lines[2] = lines[2].replace("reason 3", "reason 3, nothing to see")
    log.path.write_text("\n".join(lines) + "\n")
    done = verify_cli(log)
    assert done.returncode == 1, done.stdout
    assert "line 4" in done.stderr and "line 3 was edited" in done.stderr


@pytest.mark.parametrize("gone, names", [(2, "line 3"), (0, "line 1 does not start the chain"), (4, "1 entry(ies) after line 4 were deleted")])
def test_deleting_one_entry_anywhere_is_detected_by_verify(tmp_path, capsys, gone, names):
    """Deleting the last entry leaves a valid chain: the head file beside the log catches it.
    Seen red: verify without the head check -> deleting line 5 verified as intact (exit 0)."""
    log = filled(tmp_path / "audit.jsonl")
    lines = log.path.read_text().splitlines()
    del lines[gone]
    log.path.write_text("\n".join(lines) + "\n")
    assert lifecycle(["audit", "verify", "--log", str(log.path)]) == 1
    assert names in capsys.readouterr().err


def test_editing_the_last_entry_is_detected(tmp_path):
    log = filled(tmp_path / "audit.jsonl")
    text = log.path.read_text().replace("reason 5", "reason 6")
    log.path.write_text(text)
    verdict = log.verify()
    assert not verdict.ok and verdict.line == 5 and "line 5 (the last) was edited" in verdict.message


APPEND = """
import sys
from registry.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.append("admin_call", f"writer {sys.argv[3]}", route="/admin/weight", i=i)
"""


def test_processes_appending_at_once_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), "40", str(w)], env=env) for w in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    log = AuditLog(path)
    assert log.verify().ok and [e["seq"] for e in log.entries()] == list(range(1, 161))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    from registry.store import client, experiment_id

    return client(), experiment_id("test")


def version(store, tmp_path, md5: str) -> str:
    c, exp = store
    model = tmp_path / f"model-{md5}"
    model.mkdir()
    (model / "config.json").write_text("{}")
    v = str(models.register("m", model, c.create_run(exp).info.run_id, md5, {}).version)
    models.mark_candidate("m", v)
    return v


def test_promotions_rollbacks_and_approvals_in_the_registry_are_audited_with_who_why_and_evidence(store, tmp_path, capsys):
    v1, v2 = version(store, tmp_path, "a"), version(store, tmp_path, "b")
    models.promote("m", v1, evidence="runs:/r1/release/v1.json", reason="first release")
    models.promote("m", v2, evidence="runs:/r2/release/v2.json")
    models.rollback("m", "p95 doubled", "alice")
    models.approve("m", v2, "the canary host was flaky", "bob")
    v3 = version(store, tmp_path, "c")
    models.reject("m", v3, "error rate 0.5 > 0.05", evidence="runs:/r3/release/v3.json")

    entries = list(AuditLog().entries())
    seen = [(e["action"], e["version"], e["who"], (e.get("detail") or {}).get("kind")) for e in entries]
    me = entries[0]["who"]
    assert seen == [("promote", v1, me, None), ("promote", v2, me, None), ("rollback", v2, "alice", "by hand"), ("approve", v2, "bob", "rollback override"), ("rollback", v3, me, "canary")]
    assert entries[1]["evidence"] == "runs:/r2/release/v2.json" and entries[1]["detail"]["replaces"] == v1
    assert entries[2]["reason"] == "p95 doubled" and entries[3]["reason"] == "the canary host was flaky"
    assert entries[4]["reason"] == "error rate 0.5 > 0.05" and AuditLog().verify().ok
    from registry.card import card

    assert "## Audit log" in card("m", v2) and "the canary host was flaky" in card("m", v2), "the model card links the version's entries"

    assert lifecycle(["audit", "--action", "rollback", "--json"]) == 0
    assert [json.loads(line)["version"] for line in capsys.readouterr().out.splitlines()] == [v2, v3]
    assert lifecycle(["audit", "--who", "bob"]) == 0
    out = capsys.readouterr().out
    assert "1 entry" in out and "approve v" + v2 in out and "the canary host was flaky" in out
