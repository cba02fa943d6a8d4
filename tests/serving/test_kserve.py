"""The cluster path: KServe InferenceService manifests rendered from params and a registered
version, validated with the kserve SDK's models. Rendered and validated here, never applied."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from pipelines.config import CanaryParams, KServeParams, Params, RegistryParams, ServeParams

MISSING = "kserve SDK not installed: pip install --no-deps -c constraints.txt kserve==0.21.0 (make setup installs it)"
try:
    import kserve  # noqa: F401
except ImportError:  # pragma: no cover - make setup installs it; CI must not skip
    if os.environ.get("CI"):
        raise
    pytest.skip(MISSING, allow_module_level=True)

from serving import kserve as K  # noqa: E402

TEMPLATE = "s3://models/{name}/v{version}"


def params(**kserve) -> Params:
    return Params(
        registry=RegistryParams(model_name="reverse-digits"),
        serve=ServeParams(target="kserve"),
        canary=CanaryParams(steps=[5, 25, 50, 100]),
        kserve=KServeParams(**({"storage_uri": TEMPLATE} | kserve)),
    )


def predictor(manifest: dict) -> dict:
    return manifest["spec"]["predictor"]


def read(path: Path) -> dict:
    docs = K.load_manifests(path)
    assert len(docs) == 1
    K.validate(docs[0])  # every file the release writes is a valid InferenceService
    return docs[0]


def test_the_release_writes_one_manifest_per_canary_step_then_promote_and_rollback(tmp_path):
    p = params()
    files = K.write_release(p, "8", champion="7", out_dir=tmp_path)
    folder = tmp_path / "v8"
    assert [f.name for f in files] == ["step-5.yaml", "step-25.yaml", "step-50.yaml", "step-100.yaml", "promote.yaml", "rollback.yaml", "restore.yaml"]
    steps = [read(folder / f"step-{w}.yaml") for w in p.canary.steps]
    assert [predictor(m)["canaryTrafficPercent"] for m in steps] == [5, 25, 50, 100]
    assert {predictor(m)["model"]["storageUri"] for m in steps} == {"s3://models/reverse-digits/v8"}
    # One InferenceService whose spec changes only in its traffic share from step to step:
    # KServe starts the new revision once, at the first step, and only moves traffic after.
    assert all({**predictor(m), "canaryTrafficPercent": None} == {**predictor(steps[0]), "canaryTrafficPercent": None} for m in steps)
    promoted = read(folder / "promote.yaml")
    assert "canaryTrafficPercent" not in predictor(promoted)
    assert predictor(promoted)["model"]["storageUri"] == "s3://models/reverse-digits/v8"
    patches = json.loads((folder / "patches.json").read_text())
    assert [patches[f"step-{w}"][0]["value"] for w in p.canary.steps] == [5, 25, 50, 100]
    assert patches["promote"] == [{"op": "remove", "path": "/spec/predictor/canaryTrafficPercent"}]
    assert patches["rollback"][0]["value"] == 0


def test_rollback_pins_the_live_spec_at_zero_and_restore_points_at_the_previous_version(tmp_path):
    K.write_release(params(), "8", champion="7", out_dir=tmp_path)
    step = read(tmp_path / "v8" / "step-5.yaml")
    pin = read(tmp_path / "v8" / "rollback.yaml")
    # KServe's rollback: the spec that is live with canaryTrafficPercent 0, so no new revision
    # starts and all traffic returns to the previous rolled-out revision (version 7).
    assert predictor(pin)["canaryTrafficPercent"] == 0
    assert {**predictor(pin), "canaryTrafficPercent": 5} == predictor(step)
    restore = read(tmp_path / "v8" / "restore.yaml")
    assert predictor(restore)["model"]["storageUri"] == "s3://models/reverse-digits/v7"
    assert restore["metadata"]["annotations"][K.VERSION_ANNOTATION] == "7"
    assert "canaryTrafficPercent" not in predictor(restore)


def test_the_strategy_decides_the_weights(tmp_path):
    blue_green = params().model_copy(update={"canary": CanaryParams(strategy="blue_green")})
    names = [f.name for f in K.write_release(blue_green, "8", champion="7", out_dir=tmp_path / "bg")]
    assert names[:2] == ["step-0.yaml", "promote.yaml"]  # up beside stable at 0 %, analysed, then all at once
    shadow = params().model_copy(update={"canary": CanaryParams(strategy="shadow")})
    names = [f.name for f in K.write_release(shadow, "8", champion="7", out_dir=tmp_path / "sh")]
    assert "promote.yaml" not in names and names[0] == "step-0.yaml"  # never promoted


def test_the_first_release_has_no_canary(tmp_path):
    files = K.write_release(params(), "1", champion=None, out_dir=tmp_path)
    assert [f.name for f in files] == ["create.yaml"]
    assert "canaryTrafficPercent" not in predictor(read(files[0]))


def test_the_api_key_comes_from_a_secret_and_never_appears(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVING_API_KEY", "sk-do-not-leak-4d1c")
    monkeypatch.setenv("VLLM_API_KEY", "sk-do-not-leak-4d1c")
    p = params(api_key_secret="serving-keys", api_key_secret_key="vllm")
    files = K.write_release(p, "8", champion="7", out_dir=tmp_path)
    for f in files:
        assert "sk-do-not-leak" not in f.read_text()
        env = predictor(read(f))["model"]["env"]
        assert env == [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"key": "vllm", "name": "serving-keys"}}}]


def test_gpus_and_runtime_follow_params():
    m = K.step(params(gpus=2, cpu="8", memory="40Gi"), "3", "s3://b/m", 10)
    model = predictor(m)["model"]
    assert model["resources"]["limits"] == model["resources"]["requests"] == {"cpu": "8", "memory": "40Gi", "nvidia.com/gpu": "2"}
    assert model["modelFormat"] == {"name": "huggingface"} and "runtime" not in model
    assert model["args"] == ["--model_name=reverse-digits", "--backend=vllm", "--tensor-parallel-size=2"]
    K.validate(m)

    m = K.step(params(gpus=0, runtime="vllm-openai", extra_args=["--max-model-len=4096"]), "3", "s3://b/m", 10)
    model = predictor(m)["model"]
    assert "nvidia.com/gpu" not in model["resources"]["limits"]
    assert model["runtime"] == "vllm-openai"  # a ClusterServingRuntime named in params
    assert model["args"] == ["--model_name=reverse-digits", "--max-model-len=4096"]
    assert m["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"  # canary needs Knative
    K.validate(m)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: predictor(m).update(canaryTraficPercent=10), "spec.predictor.canaryTraficPercent: unknown field of V1beta1PredictorSpec"),
        (lambda m: predictor(m).update(canaryTrafficPercent="ten"), "spec.predictor.canaryTrafficPercent: expected int"),
        (lambda m: predictor(m).update(canaryTrafficPercent=150), "must be within 0..100"),
        (lambda m: predictor(m)["model"]["env"][0].pop("name"), "spec.predictor.model.env[0]: Invalid value for `name`"),
        (lambda m: predictor(m)["model"]["env"].__setitem__(0, {"name": "VLLM_API_KEY", "value": "sk-1"}), "a secret as a literal value"),
        (lambda m: predictor(m)["model"].update(storageURI="s3://x"), "spec.predictor.model.storageURI: unknown field of V1beta1ModelSpec"),
        (lambda m: m["metadata"].update(labels=["a"]), "metadata.labels: expected a mapping"),
        (lambda m: m.update(kind="Deployment"), "apiVersion/kind must be"),
    ],
)
def test_validation_fails_on_a_bad_field(change, message):
    good = K.step(params(), "8", "s3://b/m", 10)
    K.validate(good)
    bad = copy.deepcopy(good)
    change(bad)
    with pytest.raises(K.KServeError, match=None) as err:
        K.validate(bad)
    assert message in str(err.value)


def test_a_local_model_location_is_refused_naming_the_setting():
    p = params(storage_uri=None)
    assert K.storage_uri(p, "4", "s3://bucket/1/abc/artifacts/model") == "s3://bucket/1/abc/artifacts/model"
    assert K.storage_uri(p, "4", "gs://bucket/m") == "gs://bucket/m"
    for local in ("file:///work/main/mlartifacts/1/abc/artifacts/model", "mlflow-artifacts:/1/abc/artifacts/model", "/tmp/model"):
        with pytest.raises(K.KServeError, match="set kserve.storage_uri"):
            K.storage_uri(p, "4", local)
    with pytest.raises(K.KServeError, match="set kserve.name"):
        K.isvc_name(params(name="Reverse_Digits"))


# ---------------------------------------------------------------- through the CLI, on a real registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry: version 1 and 2 in object storage (as a tracking server with an
    s3 artifact root records them), 2 the champion and 1 the previous; version 3 local."""
    tmp = tmp_path_factory.mktemp("kserve-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        Path("params.yaml").write_text("registry:\n  model_name: reverse-digits\nserve:\n  target: kserve\ncanary:\n  steps: [10, 50, 100]\nkserve:\n  namespace: llm\n  gpus: 1\n  out_dir: out\n")
        from registry.models import promote
        from registry.store import client

        c = client()
        c.create_registered_model("reverse-digits")
        for i in (1, 2):
            c.create_model_version("reverse-digits", f"s3://lifecycle/mlflow/1/run{i}/artifacts/model")
            promote("reverse-digits", str(i))
        c.create_model_version("reverse-digits", f"file://{tmp}/mlartifacts/1/run3/artifacts/model")
        yield tmp


def test_render_a_canary_step_from_the_registry(registry, capsys):
    assert K.main(["render", "--version", "2", "--step", "10"]) == 0
    m = yaml.safe_load(capsys.readouterr().out)
    K.validate(m)
    assert predictor(m)["canaryTrafficPercent"] == 10
    assert predictor(m)["model"]["storageUri"] == "s3://lifecycle/mlflow/1/run2/artifacts/model"
    assert m["metadata"]["namespace"] == "llm" and m["metadata"]["name"] == "reverse-digits"


def test_rollback_from_the_registry_pins_the_champion(registry, capsys):
    assert K.main(["rollback"]) == 0
    out = capsys.readouterr().out
    m = yaml.safe_load(out)
    K.validate(m)
    assert predictor(m)["canaryTrafficPercent"] == 0
    assert predictor(m)["model"]["storageUri"] == "s3://lifecycle/mlflow/1/run2/artifacts/model"  # champion's live spec
    assert "(version 1)" in out.splitlines()[0]  # traffic goes back to the previous version


def test_release_and_rollback_files_from_the_registry(registry):
    files = K.write_release(K.load_params(), "2", champion="1")
    assert [f.parent.name for f in files] == ["v2"] * len(files)
    assert [predictor(read(f)).get("canaryTrafficPercent") for f in files if f.name.startswith("step-")] == [10, 50, 100]
    assert predictor(read(Path("out/v2/restore.yaml")))["model"]["storageUri"] == "s3://lifecycle/mlflow/1/run1/artifacts/model"
    pin, restore = K.write_rollback(K.load_params(), "2", "1")
    assert pin.name == "rollback-v2-to-v1.yaml" and predictor(read(pin))["canaryTrafficPercent"] == 0
    assert predictor(read(restore))["model"]["storageUri"] == "s3://lifecycle/mlflow/1/run1/artifacts/model"


def test_the_cli_fails_clearly(registry, capsys, tmp_path):
    assert K.main(["render", "--version", "3"]) == 1  # a local file:// artifact: the cluster cannot read it
    assert "set kserve.storage_uri" in capsys.readouterr().err
    assert K.main(["render", "--version", "99"]) == 1
    assert "version 99 not found in the registry" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    good = tmp_path / "good.yaml"
    m = K.step(params(), "2", "s3://b/m", 10)
    good.write_text(K.to_yaml(m))
    predictor(m)["canaryTrafficPercnt"] = 10
    bad.write_text(K.to_yaml(m))
    assert K.main(["validate", str(good)]) == 0
    assert K.main(["validate", str(bad)]) == 1
    assert "canaryTrafficPercnt: unknown field" in capsys.readouterr().err


def test_the_commented_kserve_section_in_params_yaml_is_valid():
    """The section params.yaml documents (commented out) is what a user uncomments."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "params.yaml").read_text().split("\n# kserve:\n", 1)[1]
    block = "\n".join(line.removeprefix("# ") for line in text.splitlines() if line.startswith("#   "))
    section = yaml.safe_load(block)
    assert len(section) >= 5
    KServeParams.model_validate(section)  # unknown keys and bad values raise
