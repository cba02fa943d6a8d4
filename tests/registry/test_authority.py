"""Every CLI action that changes serving, the registry, the record or the keys asks for the admin
scope once the project has admin keys (registry/authority.py): without $LIFECYCLE_KEY, with an
unknown, expired or inference-only key it is refused (exit 3, "forbidden (403)") before anything
changes, and the attempt is in the audit log; with an admin key it runs and its audit entry names
the key. A project without admin keys runs them as the OS user (tests/registry/test_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from registry import cli, models
from registry.access_cli import main as lifecycle
from registry.audit import AuditLog, os_user
from registry.authority import CLI_KEY_ENV
from serving.keys import load_keys
from tests.registry.test_cli import promoted_versions

TIERS = {"free": {"priority": 0, "rpm": 60, "tpm": 10000}}


@pytest.fixture
def project(tmp_path, monkeypatch, capsys):
    """A registry with two promoted versions, a keys file with an inference key, an admin key
    and an expired admin key; (versions, keys by name, audit log)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LIFECYCLE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv(CLI_KEY_ENV, raising=False)
    monkeypatch.delenv("SERVING_ADMIN_KEY", raising=False)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tiers": TIERS, "keys": {}}))
    Path("params.yaml").write_text(f"registry:\n  model_name: m\nserve:\n  keys_file: {keys_file}\n")
    keys = {}
    # The first admin key is made as the OS user: the file holds no admin key yet.
    for name, scopes in (("admin", "admin"), ("user", "inference,feedback")):
        if keys:
            monkeypatch.setenv(CLI_KEY_ENV, keys["admin"])
        assert lifecycle(["keys", "create", "--file", str(keys_file), "--scopes", scopes]) == 0
        keys[name] = re.search(r"\(shown once, not stored\): (\S+)", capsys.readouterr().out).group(1)
    assert lifecycle(["keys", "create", "--file", str(keys_file), "--scopes", "admin", "--expires", "1min"]) == 0
    keys["expired"] = re.search(r"\(shown once, not stored\): (\S+)", capsys.readouterr().out).group(1)
    raw = yaml.safe_load(keys_file.read_text())  # it expires in a minute; make that now
    for entry in raw["keys"].values():
        if entry.get("expires"):
            entry["expires"] = "2020-01-01T00:00:00+00:00"
    keys_file.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv(CLI_KEY_ENV)
    versions = promoted_versions(tmp_path)
    capsys.readouterr()
    return versions, keys, keys_file, AuditLog(tmp_path / "audit.jsonl")


CHANGES = [
    ["rollback", "--reason", "p95 doubled"],
    ["approve", "1", "--reason", "flaky canary host"],
    ["forget", "sk-someone"],
    ["keys", "create", "--scopes", "admin"],
    ["keys", "revoke", "KID"],
    ["keys", "rotate", "KID"],
    ["keys", "migrate"],
]


def run(argv: list[str], keys_file: Path) -> int:
    """Exit code of `lifecycle <argv>` (the keys commands get --file)."""
    if argv[0] == "keys":
        argv = [*argv, "--file", str(keys_file)]
    try:
        cli.main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("holder", ["none", "user", "expired", "unknown"])
def test_every_changing_command_is_refused_without_an_admin_key_and_the_attempt_is_audited(project, holder, monkeypatch, capsys):
    """Seen red: with run_command's and keys_cmd's authorize calls removed, the rollback moved
    the champion to v1 with only an inference key, and `keys create --scopes admin` minted one."""
    (v1, v2), keys, keys_file, log = project
    if holder != "none":
        monkeypatch.setenv(CLI_KEY_ENV, keys.get(holder, "sk-not-a-key"))
    user_id = next(e.id for e in load_keys(keys_file).entries() if "admin" not in e.scopes)
    before_keys, before_entries = keys_file.read_text(), len(list(log.entries()))
    for argv in CHANGES:
        argv = [user_id if a == "KID" else a for a in argv]
        assert run(argv, keys_file) == 3, argv
        err = capsys.readouterr().err
        assert err.startswith(f"lifecycle {' '.join(argv[:2]) if argv[0] == 'keys' else argv[0]}: forbidden (403): "), err
        assert {"none": "$LIFECYCLE_KEY is not set", "user": "lacks the 'admin' scope (it has feedback, inference)",
                "expired": "expired at 2020-01-01", "unknown": "$LIFECYCLE_KEY is not a key of"}[holder] in err
        assert "lifecycle keys create --scopes admin" in err, "the refusal says how to fix it"
    # Nothing changed: the champion, its status, the keys file.
    assert str(models.by_alias("m", "champion").version) == v2
    assert models.client().get_model_version("m", v2).tags["status"] == "promoted"
    assert keys_file.read_text() == before_keys
    refused = list(log.entries())[before_entries:]
    assert [e["detail"]["command"] for e in refused] == ["rollback", "approve", "forget", "keys create", "keys revoke", "keys rotate", "keys migrate"]
    assert all(e["action"] == "cli_call" and e["detail"]["outcome"] == "refused" and e["detail"]["status"] == 403 for e in refused)
    who = {"user": f"key {user_id} ({os_user()})", "expired": "key ", "none": os_user(), "unknown": os_user()}[holder]
    assert all(e["who"].startswith(who) for e in refused), [e["who"] for e in refused]
    assert log.verify().ok


def test_an_admin_key_runs_them_and_their_audit_entries_name_it(project, monkeypatch, capsys):
    (v1, v2), keys, keys_file, log = project
    admin_id = next(e.id for e in load_keys(keys_file).entries() if "admin" in e.scopes and not e.expired())
    monkeypatch.setenv(CLI_KEY_ENV, keys["admin"])
    cli.main(["rollback", "--reason", "p95 doubled"])
    assert f"champion is now version {v1} (was {v2})" in capsys.readouterr().out
    cli.main(["approve", v2, "--reason", "the p95 was the host"])
    assert lifecycle(["keys", "create", "--file", str(keys_file), "--scopes", "inference"]) == 0
    capsys.readouterr()
    entries = list(log.entries())
    by = f"key {admin_id} ({os_user()})"
    assert [(e["action"], e["who"]) for e in entries[-3:]] == [("rollback", by), ("approve", by), ("key_create", by)]
    # $SERVING_ADMIN_KEY, the plane's admin key, is an admin key here too.
    monkeypatch.setenv("SERVING_ADMIN_KEY", "sk-plane-admin-key-0123456789")
    monkeypatch.setenv(CLI_KEY_ENV, "sk-plane-admin-key-0123456789")
    cli.main(["rollback", "--reason", "again"])
    assert list(log.entries())[-1]["who"] == f"$SERVING_ADMIN_KEY ({os_user()})"
