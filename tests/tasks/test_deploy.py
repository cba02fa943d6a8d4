"""The canary task against real servers and a real MLflow registry, with no plane running: each
release starts a temporary plane (serving/plane/temporary.py), releases into it as into
`make serve`'s, and stops it. A first candidate is promoted after its golden-prompt checks; a
candidate that cannot serve is rolled back and the champion keeps its alias; a candidate that
is already champion is not redeployed; a champion that cannot serve stops the release with the
registry as it was; engines that require an API key, and a gateway that requires keys from a
keys file, are rolled out through. No engine outlives its release."""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines.config import CanaryParams, NotifyParams, ServeParams
from registry import models
from registry.audit import AuditLog
from tasks.deploy import ReleaseAborted, canary_release
from tests.conftest import tiny_params
from tests.tasks.webhook import Webhook


@pytest.fixture
def registry_store(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    from registry.store import client, experiment_id

    return client(), experiment_id("test")


def register(store, model_dir, md5) -> str:
    c, exp = store
    return str(models.register("reverse-digits", model_dir, c.create_run(exp).info.run_id, md5, {}).version)


# The tiny untrained model answers garbage, so this policy checks serving health only:
# every request must succeed; exact match is not asked of it (agreement with stable is). A
# coarse error-rate effect (0.5: 4 requests a step) tests the release's mechanics; the test's
# power against a 1 % canary is tested in tests/pipelines/test_gates.py.
PARAMS = tiny_params(
    canary=CanaryParams(steps=[50, 100], step_requests=3, error_rate_effect=0.5, golden_prompts=4, shadow_prompts=2, min_exact_match=0.0, max_latency_ratio=50),
    serve=ServeParams(startup_timeout_s=60, max_new_tokens=8),
)


def alias(name):
    mv = models.by_alias("reverse-digits", name)
    return str(mv.version) if mv else None


def engines_left() -> list[int]:
    """The temporary plane's engines (from its state file) that are still running."""
    state = Path(".serving/release-plane/state.json")
    pids = [r["pid"] for reps in json.loads(state.read_text())["replicas"].values() for r in reps] if state.exists() else []

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    return [p for p in pids if alive(p)]


def test_first_candidate_promoted_then_broken_candidate_rolled_back(workspace, registry_store):
    hook = Webhook()  # the release's notifications: a promotion, then a rollback
    params = PARAMS.model_copy(update={"notify": NotifyParams(webhook_url=hook.url)})
    v1 = register(registry_store, workspace / "models/base", "good")
    outcome = canary_release.fn(params, v1)
    assert outcome["outcome"] == "promoted" and outcome["where"].startswith("a temporary plane")
    assert engines_left() == []
    (step,) = outcome["steps"]  # first release: one health + golden-prompt check
    assert step["canary"]["requests"] == 4 and step["canary"]["error_rate"] == 0.0
    assert alias("champion") == v1

    broken = workspace / "broken"
    shutil.copytree(workspace / "models/base", broken)
    (broken / "config.json").write_text("{ not json")
    v2 = register(registry_store, broken, "broken")
    outcome = canary_release.fn(params, v2)
    assert outcome["outcome"] == "rolled_back"
    assert any("error_rate" in r for r in outcome["reasons"])
    assert alias("champion") == v1 and alias("candidate") is None
    hook.close()
    assert hook.events() == ["promoted", "rolled_back"]
    promoted, rolled = hook.received
    assert promoted["version"] == v1 and rolled["version"] == v2 and rolled["champion"] == v1
    assert any("error_rate" in r for r in rolled["reasons"])
    c, _ = registry_store
    assert c.get_model_version("reverse-digits", v2).tags["canary"] == "rolled_back"
    # The audit log (registry/audit.py, in the project folder): the promotion and the canary's
    # rollback with the release history as evidence, and the release's calls to the plane.
    audit = AuditLog()
    decided = [(e["action"], e["version"], (e.get("detail") or {}).get("kind")) for e in audit.entries() if e["action"] in ("promote", "rollback")]
    assert decided == [("promote", v1, None), ("rollback", v2, "canary")]
    assert all(e["evidence"].startswith("runs:/") and e["evidence"].split(" ")[0].endswith(f"/release/v{e['version']}.json") for e in audit.entries() if e["action"] != "admin_call")
    assert ("POST", "/admin/canary", v2) in {(e["detail"]["method"], e["detail"]["route"], e["version"]) for e in audit.entries() if e["action"] == "admin_call"}
    assert audit.verify().ok

    assert canary_release.fn(PARAMS, v1)["outcome"] == "unchanged"


def test_candidate_rolled_out_through_a_temporary_plane_whose_engines_require_a_key(workspace, registry_store, monkeypatch):
    # As the README advises for a non-loopback bind: the engines then require the key, so the
    # plane, the probes and the health waits must all send it.
    monkeypatch.setenv("SERVING_API_KEY", "deploy-secret")
    v1 = register(registry_store, workspace / "models/base", "one")
    models.promote("reverse-digits", v1)
    v2 = register(registry_store, workspace / "models/base", "two")
    outcome = canary_release.fn(PARAMS, v2)
    # Same weights on both sides: identical greedy answers, so the candidate is promoted.
    assert outcome["outcome"] == "promoted", outcome["reasons"]
    assert outcome["where"].startswith("a temporary plane")
    assert [s["weight"] for s in outcome["steps"]] == [50, 100]
    assert all(s["canary"]["requests"] >= 3 and s["canary"]["agreement"] == 1.0 for s in outcome["steps"])
    assert outcome["client_errors"] == 0
    assert (alias("champion"), alias("previous")) == (v2, v1)
    assert [e["event"] for e in outcome["history"]["plane_events"]][:1] == ["canary_attached"]
    assert engines_left() == [], "the temporary plane stopped its engines"


def test_a_gateway_that_takes_keys_from_a_keys_file_lets_the_releases_own_traffic_in(workspace, registry_store, monkeypatch):
    """serve.keys_file set and no gateway key: clients need a key from the file, which the
    release's synthetic users do not hold; they send the plane's own traffic key.
    Seen red: with the synthetic users sending $GATEWAY_API_KEY or $SERVING_API_KEY as before
    (neither set), every request was answered 401 and the canary was judged on nothing: rolled
    back on "error_rate: 0 of 0 failed vs max_error_rate 0.00% (stable served nothing this
    step) ... continue (undecided ...)" (and the report's summary crashed on the missing rate)."""
    for key in ("SERVING_API_KEY", "GATEWAY_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    (workspace / "keys.yaml").write_text('tiers:\n  free: {priority: 0, rpm: 60, tpm: 100000}\nkeys:\n  "sk-someone-else": free\n')
    params = PARAMS.model_copy(update={"serve": PARAMS.serve.model_copy(update={"keys_file": str(workspace / "keys.yaml")})})
    v1 = register(registry_store, workspace / "models/base", "one")
    models.promote("reverse-digits", v1)
    v2 = register(registry_store, workspace / "models/base", "two")
    outcome = canary_release.fn(params, v2)
    assert outcome["outcome"] == "promoted", outcome["reasons"]
    assert all(s["canary"]["requests"] >= 3 for s in outcome["steps"]) and outcome["client_errors"] == 0


def test_canary_drill_with_failing_candidate_is_rolled_back(workspace, registry_store):
    v1 = register(registry_store, workspace / "models/base", "one")
    models.promote("reverse-digits", v1)
    v2 = register(registry_store, workspace / "models/base", "two")
    outcome = canary_release.fn(PARAMS, v2, drill=["--fault-error-rate", "1.0"])
    assert outcome["outcome"] == "rolled_back"
    assert outcome["client_errors"] == 0, "the gateway must retry the canary's failures on stable"
    assert any(r.startswith("error_rate") for r in outcome["reasons"])
    assert (alias("champion"), alias("candidate")) == (v1, None)


def test_champion_that_cannot_start_aborts_the_release_and_leaves_the_registry_consistent(workspace, registry_store):
    broken = workspace / "broken"
    shutil.copytree(workspace / "models/base", broken)
    (broken / "config.json").write_text("{ not json")
    v1 = register(registry_store, broken, "broken-champion")
    models.promote("reverse-digits", v1)
    v2 = register(registry_store, workspace / "models/base", "good")
    models.mark_candidate("reverse-digits", v2)

    with pytest.raises(ReleaseAborted, match=f"champion version {v1} could not be served") as err:
        canary_release.fn(PARAMS, v2)
    assert "ServerStartError" in str(err.value)  # and the server's own words, from its log
    assert (alias("champion"), alias("candidate"), alias("previous")) == (v1, None, None)
    c, _ = registry_store
    tags = c.get_model_version("reverse-digits", v2).tags
    assert tags["canary"] == "aborted" and f"champion version {v1}" in tags["canary.report"]
    # The candidate was never judged: its bytes are not blocked from the next release.
    assert tags["status"] == "registered" and models.blocked(c.get_model_version("reverse-digits", v2)) is None


def test_kserve_target_renders_the_release_instead_of_serving_it(workspace, registry_store, tmp_path, monkeypatch):
    """`serve.target: kserve`: the release task writes one validated InferenceService per canary
    step (canaryTrafficPercent from canary.steps) and starts no server; `lifecycle rollback`
    then writes KServe's rollback and moves the aliases."""
    from pipelines.config import KServeParams
    from serving.kserve import validate
    import yaml

    params = tiny_params(
        serve=ServeParams(target="kserve"), canary=CanaryParams(steps=[10, 50, 100]),
        kserve=KServeParams(storage_uri="s3://models/{name}/v{version}", out_dir=str(tmp_path / "kserve")),
    )
    v1 = register(registry_store, workspace / "models/base", "k1")
    models.promote("reverse-digits", v1)
    v2 = register(registry_store, workspace / "models/base", "k2")
    outcome = canary_release.fn(params, v2)
    assert outcome["outcome"] == "rendered" and alias("champion") == v1, "a rendered release promotes nothing by itself"
    steps = sorted(p for p in outcome["manifests"] if "step-" in p)
    percents = []
    for path in steps:
        manifest = yaml.safe_load(open(path))
        validate(manifest)
        percents.append(manifest["spec"]["predictor"]["canaryTrafficPercent"])
        assert manifest["spec"]["predictor"]["model"]["storageUri"] == f"s3://models/reverse-digits/v{v2}"
    assert sorted(percents) == [10, 50, 100] and any(p.endswith("promote.yaml") for p in outcome["manifests"])

    models.promote("reverse-digits", v2)
    from registry.cli import main

    monkeypatch.chdir(workspace)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    main(["rollback"])
    assert alias("champion") == v1 and alias("previous") == v2
    rolled = yaml.safe_load(open(tmp_path / "kserve" / f"v{v2}" / "rollback.yaml"))
    assert rolled["spec"]["predictor"]["canaryTrafficPercent"] == 0
