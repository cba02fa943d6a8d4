"""Serving on a cluster: the release as KServe InferenceService manifests.

With `serve.target: kserve` a release is not served on this machine: for each canary step it
writes the InferenceService a cluster should apply (`<kserve.out_dir>/v<N>/step-<w>.yaml`),
then `promote.yaml` and `rollback.yaml`. They are built with the `kserve` SDK's models and
checked by `validate()` (every field known to the SDK's models, types, secrets by reference);
nothing here talks to a cluster. `kubectl apply -f` is the cluster's side.

KServe's canary semantics (Knative mode, which `kserve.deployment_mode` sets): KServe keeps
the last revision rolled out at 100 % as stable; applying a new storageUri with
`canaryTrafficPercent: w` starts a new revision and sends it w % of the traffic. Promotion
removes the field (the new revision takes everything); rollback sets it to 0 on the spec that
is live, so traffic goes back to the previous rolled-out revision without a new one starting.
`restore.yaml` is the previous version's own manifest, for whoever keeps the cluster's state
declared in git: applying it starts that version as a new revision.

    python -m serving.kserve render --version 7 --step 10 > isvc.yaml
    python -m serving.kserve render --version 7              # no canary: the promoted/first manifest
    python -m serving.kserve release --version 7             # every step's manifest, as the release writes them
    python -m serving.kserve rollback                        # champion -> previous (before `make rollback`)
    python -m serving.kserve validate deploy/kserve/v7/*.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import CanaryParams, ConfigError, Params, load_params

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
# The Hugging Face serving runtime is selected by this model format; its vLLM backend serves
# text generation (KServe falls back to plain transformers for models vLLM cannot load).
MODEL_FORMAT = "huggingface"
API_KEY_ENV = "VLLM_API_KEY"  # what `vllm serve` reads (serving/launcher.py sets the same)
VERSION_ANNOTATION = "llm-lifecycle/model-version"
# Schemes KServe's storage initializer downloads a model folder from (not file://, not MLflow's
# proxied mlflow-artifacts:, which only this machine or the tracking server can read).
STORAGE_SCHEMES = ("s3", "gs", "pvc", "hf", "oci", "hdfs", "webhdfs")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Environment variables whose value must come from a Secret, never a literal in a manifest.
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.IGNORECASE)


class KServeError(ValueError):
    """A manifest that cannot be rendered or does not validate; the message names the field."""


# ---------------------------------------------------------------- rendering (SDK models)


def isvc_name(params: Params) -> str:
    name = params.kserve.name or params.registry.model_name
    if len(name) > 63 or not DNS_LABEL.match(name):
        raise KServeError(f"InferenceService name '{name}' is not a DNS label (lower-case letters, digits, '-'): set kserve.name")
    return name


def storage_uri(params: Params, version: str, source: str | None) -> str:
    """Where the cluster downloads version `version` from: kserve.storage_uri's template, else
    the version's MLflow artifact location when that is object storage."""
    if params.kserve.storage_uri:
        return params.kserve.storage_uri.format(name=params.registry.model_name, version=version)
    scheme = (source or "").split("://", 1)[0] if "://" in (source or "") else ""
    if scheme in STORAGE_SCHEMES or (scheme == "https" and ".blob.core.windows.net/" in (source or "")):
        return str(source)
    raise KServeError(
        f"version {version}'s model is at '{source}', which a cluster cannot download: set kserve.storage_uri "
        "(e.g. s3://models/{name}/v{version}, where you copied it), or log models to object storage "
        "(an MLflow tracking server with an s3:// or gs:// artifact root)"
    )


def registry_source(params: Params, version: str) -> str:
    """The storage location of a registered version (MLflow resolves models:/ to it)."""
    from registry.store import client

    c = client()
    try:
        return c.get_model_version_download_uri(params.registry.model_name, str(version))
    except Exception as exc:  # MlflowException: unknown version, unreachable store
        raise KServeError(f"model '{params.registry.model_name}' version {version} not found in the registry: {exc}") from exc


def inference_service(params: Params, version: str, uri: str, canary_percent: int | None):
    """The InferenceService serving `uri` as version `version`, built from the SDK's models;
    `canary_percent` None means no canary (the first release, or promoted)."""
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1ModelFormat,
        V1beta1ModelSpec,
        V1beta1PredictorSpec,
    )
    from kubernetes.client import V1EnvVar, V1EnvVarSource, V1ObjectMeta, V1ResourceRequirements, V1SecretKeySelector

    k = params.kserve
    if canary_percent is not None and not 0 <= canary_percent <= 100:
        raise KServeError(f"canaryTrafficPercent must be within 0..100, got {canary_percent}")
    resources = {"cpu": k.cpu, "memory": k.memory} | ({"nvidia.com/gpu": str(k.gpus)} if k.gpus else {})
    args = [f"--model_name={params.registry.model_name}"]  # one public name for every revision, as the gateway's
    if k.runtime is None:
        args.append("--backend=vllm")  # the Hugging Face runtime's vLLM backend, explicitly
    if k.gpus > 1:
        args.append(f"--tensor-parallel-size={k.gpus}")
    args += k.extra_args
    api_key = V1EnvVar(name=API_KEY_ENV, value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=k.api_key_secret, key=k.api_key_secret_key)))
    model = V1beta1ModelSpec(
        name="kserve-container",  # the predictor container's name in KServe (the SDK would write '')
        model_format=V1beta1ModelFormat(name=MODEL_FORMAT),
        runtime=k.runtime,
        storage_uri=uri,
        args=args,
        env=[api_key],
        resources=V1ResourceRequirements(requests=resources, limits=resources),
    )
    predictor = V1beta1PredictorSpec(
        model=model,
        min_replicas=k.min_replicas,
        max_replicas=k.max_replicas,
        service_account_name=k.service_account,
        canary_traffic_percent=canary_percent,
    )
    meta = V1ObjectMeta(
        name=isvc_name(params),
        namespace=k.namespace,
        labels={"app.kubernetes.io/name": isvc_name(params), "app.kubernetes.io/managed-by": "llm-lifecycle"},
        annotations={
            "serving.kserve.io/deploymentMode": k.deployment_mode,
            # latest-<name> and prev-<name> URLs reach each revision: golden prompts can go
            # straight to the canary while users get the split.
            "serving.kserve.io/enable-tag-routing": "true",
            VERSION_ANNOTATION: str(version),
        },
    )
    return V1beta1InferenceService(api_version=API_VERSION, kind=KIND, metadata=meta, spec=V1beta1InferenceServiceSpec(predictor=predictor))


def to_dict(obj) -> dict:
    """The SDK object as the JSON/YAML a cluster receives (camelCase, no nulls)."""
    from kserve import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def step(params: Params, version: str, uri: str, weight: int) -> dict:
    """A canary step: the new version's storageUri with `weight` % of the traffic."""
    return to_dict(inference_service(params, version, uri, weight))


def promote(params: Params, version: str, uri: str) -> dict:
    """The new version takes all traffic: canaryTrafficPercent removed (also the first release)."""
    return to_dict(inference_service(params, version, uri, None))


@dataclass
class Rollback:
    """KServe's rollback of `from_version` to `to_version`. `pin` is the live spec with
    canaryTrafficPercent 0: no new revision starts and all traffic returns to the previous
    rolled-out revision. `restore` re-points the spec at the previous version (a new revision)."""

    from_version: str
    to_version: str | None
    pin: dict
    restore: dict | None


def rollback(params: Params, from_version: str, from_uri: str, to_version: str | None = None, to_uri: str | None = None) -> Rollback:
    pin = to_dict(inference_service(params, from_version, from_uri, 0))
    restore = promote(params, to_version, to_uri) if to_version is not None and to_uri is not None else None
    return Rollback(str(from_version), None if to_version is None else str(to_version), pin, restore)


def weight_patch(weight: int) -> list[dict]:
    """JSON patch (kubectl patch --type=json) that moves traffic to `weight` % ("add" also
    replaces an existing value, and works after a promotion removed the field)."""
    return [{"op": "add", "path": "/spec/predictor/canaryTrafficPercent", "value": weight}]


PROMOTE_PATCH = [{"op": "remove", "path": "/spec/predictor/canaryTrafficPercent"}]


def release_weights(canary: CanaryParams) -> tuple[list[int], bool]:
    """The canaryTrafficPercent of each step for the release strategy, and whether it ends in a
    promotion. KServe cannot mirror traffic: blue_green and shadow start the candidate at 0 %
    (reachable at its latest- tag URL for the analysis), blue_green then switches all at once."""
    if canary.strategy == "canary":
        return list(canary.steps), True
    return [0], canary.strategy == "blue_green"


def to_yaml(manifest: dict, comment: str = "") -> str:
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump(manifest, sort_keys=False)


def write_release(params: Params, version: str, champion: str | None, out_dir: str | Path | None = None, source: str | None = None, champion_source: str | None = None) -> list[Path]:
    """What the release task writes instead of serving when serve.target is kserve: one
    manifest per canary step, then promote.yaml and rollback.yaml (to the champion), and
    patches.json (the same moves as `kubectl patch --type=json` bodies). The first release
    (no champion) is one manifest, create.yaml. Every file is validated before it is written.
    `source`/`champion_source` default to the registry's storage location of each version."""
    version = str(version)
    uri = storage_uri(params, version, source if source is not None or params.kserve.storage_uri else registry_source(params, version))
    folder = Path(out_dir or params.kserve.out_dir) / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[dict, str]] = {}
    if champion is None:
        files["create.yaml"] = (promote(params, version, uri), f"first release of version {version}: all traffic")
    else:
        champion = str(champion)
        weights, promotes = release_weights(params.canary)
        for w in weights:
            files[f"step-{w}.yaml"] = (step(params, version, uri, w), f"version {version} beside {champion}: {w}% of the traffic")
        if promotes:
            files["promote.yaml"] = (promote(params, version, uri), f"version {version} promoted: all traffic")
        champion_uri = storage_uri(params, champion, champion_source if champion_source is not None or params.kserve.storage_uri else registry_source(params, champion))
        back = rollback(params, version, uri, champion, champion_uri)
        files["rollback.yaml"] = (back.pin, f"roll back version {version}: all traffic to the previous rolled-out revision (version {champion})")
        files["restore.yaml"] = (back.restore, f"version {champion} declared again (a new revision; after rollback.yaml)")
        patches = {f"step-{w}": weight_patch(w) for w in weights} | ({"promote": PROMOTE_PATCH} if promotes else {}) | {"rollback": weight_patch(0)}
        (folder / "patches.json").write_text(json.dumps(patches, indent=2) + "\n")
    written = []
    for filename, (manifest, comment) in files.items():
        validate(manifest)
        path = folder / filename
        path.write_text(to_yaml(manifest, comment))
        written.append(path)
    return written


def write_rollback(params: Params, from_version: str, to_version: str, out_dir: str | Path | None = None) -> list[Path]:
    """`make rollback` on the cluster path: rollback-v<from>-to-v<to>.yaml (the pin) and
    restore-v<to>.yaml, from the registry's storage locations of both versions."""
    from_uri = storage_uri(params, str(from_version), None if params.kserve.storage_uri else registry_source(params, str(from_version)))
    to_uri = storage_uri(params, str(to_version), None if params.kserve.storage_uri else registry_source(params, str(to_version)))
    back = rollback(params, str(from_version), from_uri, str(to_version), to_uri)
    folder = Path(out_dir or params.kserve.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path, manifest, comment in (
        (folder / f"rollback-v{from_version}-to-v{to_version}.yaml", back.pin, f"KServe rollback: version {from_version} pinned at 0%, traffic to the previous rolled-out revision (version {to_version})"),
        (folder / f"restore-v{to_version}.yaml", back.restore, f"version {to_version} declared again (a new revision)"),
    ):
        validate(manifest)
        path.write_text(to_yaml(manifest, comment))
        out.append(path)
    return out


# ---------------------------------------------------------------- validation (SDK models)


def _model_class(name: str):
    """An OpenAPI model class by name: KServe's own, else the Kubernetes client's (KServe's
    models refer to V1ObjectMeta, V1EnvVar, ... without shipping them)."""
    import kserve.models
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise KServeError(f"no SDK model named {name}")


_PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def from_dict(data: Any, klass: str, path: str = "") -> Any:
    """Build the SDK object of type `klass` from a manifest, strictly: an unknown field, a
    wrong type or a required field missing raises KServeError naming its path. (The SDK's own
    deserializer silently drops unknown fields, so a typo would pass; this one does not.)"""
    where = path or "(top)"
    if klass.startswith("list["):
        if not isinstance(data, list):
            raise KServeError(f"{where}: expected a list, got {type(data).__name__}")
        return [from_dict(item, klass[5:-1], f"{path}[{i}]") for i, item in enumerate(data)]
    if klass.startswith(("dict(", "dict[")):  # KServe's generator writes dict(str, T), Kubernetes' dict[str, T]
        if not isinstance(data, dict):
            raise KServeError(f"{where}: expected a mapping, got {type(data).__name__}")
        value_type = klass[5:-1].split(",", 1)[1].strip()
        quantities = path.endswith(("limits", "requests"))  # Kubernetes quantities may be numbers in YAML
        return {k: (str(v) if quantities and isinstance(v, (int, float)) and not isinstance(v, bool) else from_dict(v, value_type, f"{path}.{k}")) for k, v in data.items()}
    if klass == "object":
        return data
    if klass in ("datetime", "date"):
        if not isinstance(data, str):
            raise KServeError(f"{where}: expected a timestamp string, got {data!r}")
        return data
    if klass in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[klass]) or (klass in ("int", "float") and isinstance(data, bool)):
            raise KServeError(f"{where}: expected {klass}, got {data!r}")
        return data
    cls = _model_class(klass)
    if not isinstance(data, dict):
        raise KServeError(f"{where}: expected a {klass} mapping, got {data!r}")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if key not in by_json:
            raise KServeError(f"{path + '.' if path else ''}{key}: unknown field of {klass} (known: {', '.join(sorted(by_json))})")
        attr = by_json[key]
        kwargs[attr] = None if value is None else from_dict(value, cls.openapi_types[attr], f"{path + '.' if path else ''}{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the SDK's own checks: required fields, allowed values
        raise KServeError(f"{where}: {exc}") from None


def validate(manifest: dict) -> Any:
    """The manifest as a V1beta1InferenceService, or KServeError naming what is wrong: fields
    and types against the SDK's models, the SDK's serialization must give the manifest back,
    canaryTrafficPercent within 0..100, and no secret-looking variable given as a literal."""
    if not isinstance(manifest, dict):
        raise KServeError(f"a manifest is a mapping, got {type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise KServeError(f"apiVersion/kind must be {API_VERSION}/{KIND}, got {manifest.get('apiVersion')}/{manifest.get('kind')}")
    isvc = from_dict(manifest, "V1beta1InferenceService")
    if isvc.spec is None or isvc.spec.predictor is None:
        raise KServeError("spec.predictor: missing (every InferenceService has a predictor)")
    predictor = isvc.spec.predictor
    if predictor.canary_traffic_percent is not None and not 0 <= predictor.canary_traffic_percent <= 100:
        raise KServeError(f"spec.predictor.canaryTrafficPercent: must be within 0..100, got {predictor.canary_traffic_percent}")
    if predictor.model is None or (predictor.model.model_format is None and predictor.model.runtime is None):
        raise KServeError("spec.predictor.model: needs modelFormat or runtime (which runtime serves it)")
    for i, env in enumerate(predictor.model.env or []):
        if SECRET_NAME.search(env.name) and env.value is not None:
            raise KServeError(f"spec.predictor.model.env[{i}] ({env.name}): a secret as a literal value; use valueFrom.secretKeyRef")
    difference = _first_difference(_normalised(json.loads(json.dumps(manifest))), to_dict(isvc))
    if difference is not None:
        raise KServeError(f"{difference}: the SDK's models do not give this field back as written")
    return isvc


def _normalised(data: Any, parent: str = "") -> Any:
    """The manifest as the SDK writes it: no nulls, Kubernetes quantities as strings."""
    if isinstance(data, dict):
        if parent in ("limits", "requests"):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in data.items() if v is not None}
        return {k: _normalised(v, k) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_normalised(v) for v in data]
    return data


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else (path or "(top)")


def load_manifests(path: str | Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.kserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="one InferenceService for a registered version, to stdout")
    render.add_argument("--version", required=True)
    render.add_argument("--step", type=int, help="canaryTrafficPercent (a canary step); omitted: no canary (promoted or first release)")
    release = sub.add_parser("release", help="every manifest of a release into kserve.out_dir/v<N>/")
    release.add_argument("--version", required=True)
    release.add_argument("--champion", help="the version serving now (default: the registry's champion)")
    back = sub.add_parser("rollback", help="KServe's rollback of the champion to the previous version, to stdout")
    back.add_argument("--from", dest="from_version", help="default: the registry's champion")
    back.add_argument("--to", dest="to_version", help="default: the registry's previous")
    check = sub.add_parser("validate", help="check manifests against the kserve SDK's models")
    check.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            for f in args.files:
                for doc in load_manifests(f):
                    validate(doc)
                print(f"{f}: valid")
            return 0
        params = load_params(args.params)
        if args.command == "render":
            uri = storage_uri(params, args.version, None if params.kserve.storage_uri else registry_source(params, args.version))
            sys.stdout.write(to_yaml(to_dict(inference_service(params, args.version, uri, args.step))))
        elif args.command == "release":
            champion = args.champion if args.champion is not None else _alias(params, "champion")
            for path in write_release(params, args.version, None if champion == args.version else champion):
                print(path)
        else:
            from_version = args.from_version or _alias(params, "champion")
            to_version = args.to_version or _alias(params, "previous")
            if from_version is None or to_version is None:
                raise KServeError(f"model '{params.registry.model_name}' needs a champion and a previous version to roll back (or pass --from and --to)")
            from_uri = storage_uri(params, from_version, None if params.kserve.storage_uri else registry_source(params, from_version))
            to_uri = storage_uri(params, to_version, None if params.kserve.storage_uri else registry_source(params, to_version))
            back_ = rollback(params, from_version, from_uri, to_version, to_uri)
            sys.stdout.write(to_yaml(back_.pin, f"KServe rollback: version {from_version} pinned at 0%, traffic to the previous rolled-out revision (version {to_version})"))
        return 0
    except (KServeError, ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _alias(params: Params, alias: str) -> str | None:
    from registry.models import by_alias

    mv = by_alias(params.registry.model_name, alias)
    return None if mv is None else str(mv.version)


if __name__ == "__main__":
    sys.exit(main())
