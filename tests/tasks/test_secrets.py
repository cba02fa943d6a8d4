"""Planted secrets never leak (issue 18): an admin key, an engine key and a keys-file key (with
the keys file's own HMAC secret), a webhook URL with a token in its path and query, and a
database password in the record's store URL go through a real release (the first one of a tiny
model, on a temporary plane: one engine) and the lifecycle's MLflow bookkeeping; then every record
it produced is searched for them: the files it wrote (engine logs, the audit log, the plane's
state, MLflow's database and artifacts), MLflow params and tags (through MlflowClient), Prefect
artifacts (through the Prefect client), the argv of every process it spawned (watched with psutil
while they ran), what it printed and logged, and the plane's /admin/state.

The database password cannot reach a live database here, so the record is off (nothing opens
the store); the URL still travels with the params into every place params go. The tracking URI
cannot hold a password without a live server either: /admin/state's redaction is tested on a
plane whose MLFLOW_TRACKING_URI names a PostgreSQL server with a password (registry_uri() reads
it, nothing connects to it)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from pipelines.config import CanaryParams, NotifyParams, RecordParams, ServeParams
from registry import models
from serving.keys import KeysDocument
from tasks.deploy import canary_release
from tests.conftest import tiny_params
from tests.tasks.webhook import Webhook

ADMIN_KEY = "sk-admin-PLANTED-a1b2c3d4e5"
ENGINE_KEY = "sk-engine-PLANTED-f6a7b8c9d0"
HOOK_TOKEN = "hookPLANTEDtoken0123456789"
HOOK_QUERY_TOKEN = "queryPLANTEDtoken98765"
DB_PASSWORD = "dbPLANTEDpassword4242"


def plant_keys_file(path: Path, capfd) -> tuple[str, str]:
    """A key made by `lifecycle keys create` (its audit entry included): (the key, which the
    command shows once by design, and the file's HMAC secret). What it printed is taken out of
    the capture here; everything printed afterwards is searched."""
    from registry.access_cli import main as keys_main

    assert keys_main(["keys", "create", "--file", str(path), "--scopes", "inference,admin", "--reason", "planted"]) == 0
    shown = capfd.readouterr().out
    key = shown.split("the key (shown once, not stored): ", 1)[1].split()[0]
    return key, KeysDocument.open(path).raw["secret"]


class ChildArgv:
    """The argv of every process this one spawns, seen while they run (polled with psutil)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, ...]] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self.stopping.wait(0.05):
            for child in me.children(recursive=True):
                try:
                    self.seen.add(tuple(child.cmdline()))
                except psutil.Error:  # it ended between the listing and the read
                    pass

    def stop(self) -> set[tuple[str, ...]]:
        self.stopping.set()
        self.thread.join()
        return self.seen


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def files_with(root: Path, secrets: dict[str, str], except_: set[Path]) -> dict[str, list[str]]:
    """Every file under `root` (bytes, so SQLite databases too) that holds a secret."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and path.resolve() not in except_:
            data = path.read_bytes()
            names = [name for name, value in secrets.items() if value.encode() in data]
            if names:
                found[str(path.relative_to(root))] = names
    return found


def test_a_release_with_planted_secrets_leaves_none_in_any_record(workspace, monkeypatch, capfd, caplog):
    """Seen red: (1) before notify.HideURL, httpx's own INFO line "HTTP Request: POST <url>" held
    the webhook's path and query tokens -> {'logged': [('httpx', ['webhook path token', 'webhook
    query token'])]}; (2) with tasks/tracking.py logging the config unredacted (as before) ->
    'mlflow runs' named params record.store and notify.webhook_url, and 'files' named
    mlflow.db and the run's effective_config.json."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    monkeypatch.setenv("SERVING_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("SERVING_API_KEY", ENGINE_KEY)  # the engines require it: the plane and the probes send it
    keys_file = workspace / "secrets" / "keys.yaml"
    client_key, hmac_secret = plant_keys_file(keys_file, capfd)
    hook = Webhook()
    hook_url = f"{hook.url}/services/T0/B0/{HOOK_TOKEN}?token={HOOK_QUERY_TOKEN}"
    secrets = {
        "admin key": ADMIN_KEY, "engine key": ENGINE_KEY, "keys-file key": client_key, "keys-file HMAC secret": hmac_secret,
        "webhook path token": HOOK_TOKEN, "webhook query token": HOOK_QUERY_TOKEN, "database password": DB_PASSWORD,
    }
    params = tiny_params(
        canary=CanaryParams(golden_prompts=4, min_exact_match=0.0, max_latency_ratio=50),
        serve=ServeParams(startup_timeout_s=120, max_new_tokens=8, keys_file=str(keys_file)),
        notify=NotifyParams(webhook_url=hook_url),
        record=RecordParams(enabled=False, store=f"postgresql://lifecycle:{DB_PASSWORD}@db.internal:5432/records"),
    )

    from registry.store import client, experiment_id
    from tasks.tracking import start_parent_run

    c = client()
    start_parent_run.fn(params, None)  # the lifecycle's MLflow run: the effective config as params and an artifact
    v1 = str(models.register("reverse-digits", workspace / "models/base", c.create_run(experiment_id("test")).info.run_id, "md5", {}).version)
    watch = ChildArgv()
    try:
        outcome = canary_release.fn(params, v1)
    finally:
        argvs = watch.stop()
        hook.close()
    assert outcome["outcome"] == "promoted", outcome["reasons"]
    assert hook.events() == ["promoted"], "the planted webhook was used"
    assert any("serving.server" in a for argv in argvs for a in argv), f"an engine was spawned and watched: {argvs}"

    problems: dict[str, object] = {}
    # Argv of the spawned processes (keys go by environment).
    problems["argv"] = [(argv, leaks(" ".join(argv), secrets)) for argv in argvs if leaks(" ".join(argv), secrets)]
    # MLflow, through its client: every run's params and tags, every model version's tags.
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    problems["mlflow runs"] = [(r.info.run_id, k, leaks(f"{k}={v}", secrets)) for r in runs for k, v in {**r.data.params, **r.data.tags}.items() if leaks(f"{k}={v}", secrets)]
    versions = c.search_model_versions("name='reverse-digits'")
    problems["mlflow versions"] = [(v.version, k, leaks(f"{k}={t}", secrets)) for v in versions for k, t in v.tags.items() if leaks(f"{k}={t}", secrets)]
    assert {"record.store", "notify.webhook_url"} <= set(runs[-1].data.params) | {k for r in runs for k in r.data.params}, "the params were logged"
    # Prefect artifacts, through the client.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts()
    assert {"release-history", "canary", "audit"} <= {a.key for a in artifacts}
    problems["prefect artifacts"] = [(a.key, leaks(f"{a.data} {a.description}", secrets)) for a in artifacts if leaks(f"{a.data} {a.description}", secrets)]
    # Every file the release and MLflow wrote in the project: engine logs, the audit log, the
    # plane's state, mlflow.db, the MLflow artifacts (the keys file holds its HMAC secret by design).
    assert "key_create" in Path(".serving/audit.jsonl").read_text() and list(Path(".serving").rglob("*.log")), "the audit log and engine logs were written"
    problems["files"] = files_with(workspace, {k: v for k, v in secrets.items()}, except_={keys_file.resolve()})
    keys_text = keys_file.read_text()
    problems["keys file"] = leaks(keys_text, {"keys-file key": client_key})  # stored hashed
    # What it printed (stdout/stderr at the descriptors) and logged.
    out, err = capfd.readouterr()
    problems["printed"] = leaks(out + err, secrets)
    problems["logged"] = [(r.name, leaks(r.getMessage(), secrets)) for r in caplog.records if leaks(r.getMessage(), secrets)]
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_admin_state_names_the_registry_without_its_password(workspace, tmp_path, monkeypatch, capfd):
    """/admin/state returns the tracking URI (the plane's clients compare it with their own): a
    password in it is masked, and a client with the same URI still recognises the plane.
    Seen red: with registry_uri() returning tracking_uri() unredacted (as before) -> the answer
    was 'postgresql://mlflow:dbPLANTEDpassword4242@db.internal:5432/mlflow?sslpassword=...'."""
    from serving.background import ThreadedServer
    from serving.plane import Plane, create_plane_app
    from serving.plane.operations import registry_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{DB_PASSWORD}@db.internal:5432/mlflow?sslpassword={DB_PASSWORD}")
    keys_file = tmp_path / "keys.yaml"
    client_key, _ = plant_keys_file(keys_file, capfd)
    params = tiny_params(serve=ServeParams(startup_timeout_s=120, max_new_tokens=4, keys_file=str(keys_file)), record=RecordParams(enabled=False))
    plane = Plane(params, tmp_path / "plane", resolve=lambda version: workspace / "models/base")
    plane.start(champion="1")
    try:
        app = create_plane_app(plane, admin_key=ADMIN_KEY, supervise=False)
        with ThreadedServer(app) as server:
            state = httpx.get(f"{server.root_url}/admin/state", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            by_key = httpx.get(f"{server.root_url}/admin/state", headers={"authorization": f"Bearer {client_key}"}, timeout=30)
    finally:
        plane.stop_all()
    assert state.status_code == 200 and by_key.status_code == 200
    assert state.json()["registry_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow?sslpassword=***" == registry_uri()
    assert DB_PASSWORD not in state.text and ADMIN_KEY not in state.text and client_key not in state.text
    assert os.environ["MLFLOW_TRACKING_URI"] != registry_uri()
