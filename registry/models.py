"""The one module that knows MLflow's model registry: versions and aliases.

Aliases replace the deprecated registry stages:
  candidate  the version under evaluation/canary,
  champion   the version serving users,
  previous   the champion before the current one (what `make rollback` restores).

Every promotion, rollback and approval made here is also an entry of the audit log
(registry/audit.py): who, why, the version, and the evidence the caller names.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry import audit
from registry.store import client

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
MODEL_HASH_TAG = "lineage.model_md5"
# Where a version's trainable (unquantized) weights are: an artifact URI under its run. The
# served model is usually quantized (compressed-tensors), which later training cannot start from.
TRAINABLE_TAG, TRAINABLE_ARTIFACT = "trainable", "trainable"
# A version's status sticks to its bytes: a version rejected by a gate or rolled back by a
# canary is never promoted again, however often a rerun produces the same bytes, unless a
# person approves it with a stated reason (recorded beside the status).
STATUS, REJECTED, ROLLED_BACK, PROMOTED = "status", "rejected", "rolled_back", "promoted"
UNDECIDED = "undecided"  # the quality gate could not tell on this many items: not blocking, judged again on a rerun
BLOCKING = (REJECTED, ROLLED_BACK)
log = logging.getLogger("registry")


# MLflow returns versions as int or str depending on the call: this module and its callers
# always compare them as strings.
def by_alias(name: str, alias: str) -> ModelVersion | None:
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_by_model_hash(name: str, model_md5: str) -> ModelVersion | None:
    """A version already registered from the same bytes (a rerun that changed nothing)."""
    try:
        found = client().search_model_versions(f"name='{name}' and tag.`{MODEL_HASH_TAG}`='{model_md5}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def metrics_of(mv: ModelVersion | None) -> dict[str, float] | None:
    """The evaluation metrics a version was registered with (tags `metric.<name>`)."""
    if mv is None:
        return None
    return {k.removeprefix("metric."): float(v) for k, v in mv.tags.items() if k.startswith("metric.")}


def register(name: str, model_dir: Path, run_id: str, model_md5: str, tags: dict[str, str], trainable_dir: Path | None = None) -> ModelVersion:
    """Log the model folder to `run_id` and register it as a new version. It gets no alias
    yet: `candidate` comes only once the quality gate has passed (`mark_candidate`), and a
    gate failure leaves the version as the record of what was rejected and why.
    `trainable_dir`: the unquantized weights the served model was made from, logged beside it
    (artifact trainable/) and named by the version's `trainable` tag, so a later run can train
    from this version; `model_dir` itself when they are the same bytes (no second copy)."""
    from registry.card import mlmodel_text

    c = client()
    c.log_artifacts(run_id, str(model_dir), "model")
    artifact_uri = c.get_run(run_id).info.artifact_uri
    if trainable_dir is not None and Path(trainable_dir).resolve() != Path(model_dir).resolve():
        c.log_artifacts(run_id, str(trainable_dir), TRAINABLE_ARTIFACT)
        tags = {**tags, TRAINABLE_TAG: f"{artifact_uri}/{TRAINABLE_ARTIFACT}"}
    elif trainable_dir is not None:
        tags = {**tags, TRAINABLE_TAG: f"{artifact_uri}/model"}
    c.log_text(run_id, mlmodel_text(run_id), "model/MLmodel")  # its signature, for the registry UI
    try:
        c.create_registered_model(name, description="Managed by the LLM lifecycle flow (flows/lifecycle.py).")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{artifact_uri}/model"
    return c.create_model_version(name, source, run_id=run_id, tags={**tags, MODEL_HASH_TAG: model_md5, STATUS: "registered"})


def mark_candidate(name: str, version: str) -> None:
    client().set_registered_model_alias(name, CANDIDATE, str(version))


def set_status(name: str, version: str, status: str, reason: str) -> None:
    """Record what happened to a version; `status.at` tells one rejection from the next."""
    c = client()
    c.set_model_version_tag(name, str(version), STATUS, status)
    c.set_model_version_tag(name, str(version), f"{STATUS}.reason", reason[:4900])
    c.set_model_version_tag(name, str(version), f"{STATUS}.at", _now())
    candidate = by_alias(name, CANDIDATE)
    if status in BLOCKING and candidate is not None and str(candidate.version) == str(version):
        # Only this version's alias: another version waiting for release keeps its own.
        c.delete_registered_model_alias(name, CANDIDATE)


def blocked(mv: ModelVersion) -> str | None:
    """Why these bytes may not be released again, or None. An approval lifts the block once:
    a later rejection of the same bytes (a new gate failure or rollback) blocks them again."""
    status = mv.tags.get(STATUS)
    if status not in BLOCKING or mv.tags.get("approval.for") == mv.tags.get(f"{STATUS}.at", status):
        return None
    why = mv.tags.get(f"{STATUS}.reason") or mv.tags.get("canary.report", "")
    return (
        f"version {mv.version} has exactly these bytes and was {status.replace('_', ' ')}: {why.splitlines()[0] if why else 'no reason recorded'}\n"
        f"  it is not released again unless a person approves it: python -m registry.cli approve {mv.version} --reason '...'"
    )


def approve(name: str, version: str, reason: str, by: str) -> ModelVersion:
    """A person overrides a version's rejection (a gate's or a canary's), with a reason; both
    are recorded on it and in the audit log."""
    if not reason.strip():
        raise SystemExit("approve needs --reason: say why this version may be released despite its status")
    c = client()
    mv = c.get_model_version(name, str(version))
    status = mv.tags.get(STATUS)
    if status not in BLOCKING:
        raise SystemExit(f"version {version} is '{status}', not rejected or rolled back: nothing to approve")
    tags = {"approval.for": mv.tags.get(f"{STATUS}.at", status), "approval.reason": reason, "approval.by": by, "approval.at": _now()}
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, v)
    audit.record("approve", by or None, version=str(version), reason=reason, evidence=f"models:/{name}/{version} tag {STATUS}.reason",
                 model=name, overrides=status, kind="gate override" if status == REJECTED else "rollback override", was=mv.tags.get(f"{STATUS}.reason", "")[:500])
    return c.get_model_version(name, str(version))


def promote(name: str, version: str, *, evidence: str | None = None, reason: str | None = None, by: str | None = None) -> ModelVersion | None:
    """Make `version` the champion; the old champion becomes `previous`. Returns the old one.
    `evidence`, `reason`, `by` (default: the OS user) go to the audit log."""
    c = client()
    old = by_alias(name, CHAMPION)
    if old is not None and str(old.version) != str(version):
        c.set_registered_model_alias(name, PREVIOUS, str(old.version))
    c.set_registered_model_alias(name, CHAMPION, str(version))
    _drop_alias(name, CANDIDATE)
    set_status(name, version, PROMOTED, "promoted to champion" + (f" (replacing version {old.version})" if old is not None and str(old.version) != str(version) else ""))
    audit.record("promote", by, version=str(version), reason=reason or "passed its canary", evidence=evidence, model=name, replaces=str(old.version) if old is not None else None)
    return old


def reject(name: str, version: str, report: str, *, evidence: str | None = None) -> None:
    """A candidate that failed its canary: tag it with why, and take away its alias (and an
    audit entry: a rollback by the canary)."""
    c = client()
    c.set_model_version_tag(name, str(version), "canary", "rolled_back")
    c.set_model_version_tag(name, str(version), "canary.report", report[:4900])
    set_status(name, version, ROLLED_BACK, "canary rolled back: " + report[:4800])
    audit.record("rollback", None, version=str(version), reason=report[:2000], evidence=evidence, model=name, kind="canary")


def shadowed(name: str, version: str, report: str) -> None:
    """A candidate released in shadow (mirrored traffic, never promoted): the comparison is its
    record; it is no longer under evaluation, and may be released for real later."""
    c = client()
    c.set_model_version_tag(name, str(version), "canary", "shadowed")
    c.set_model_version_tag(name, str(version), "canary.report", report[:4900])
    _drop_alias(name, CANDIDATE)


def rollback(name: str, reason: str = "", by: str = "") -> tuple[str, str]:
    """Move `champion` back to `previous` by hand; returns (from_version, to_version). The
    version taken out gets status rolled_back with the reason, as a canary's rollback does, so a
    rerun that produces the same bytes is refused until a person approves them again."""
    current, previous = by_alias(name, CHAMPION), by_alias(name, PREVIOUS)
    if previous is None:
        raise SystemExit(f"model '{name}' has no 'previous' version to roll back to")
    c = client()
    c.set_registered_model_alias(name, CHAMPION, str(previous.version))
    if current is not None:
        c.set_registered_model_alias(name, PREVIOUS, str(current.version))
        c.set_model_version_tag(name, str(current.version), "rolled_back_by_hand", "true")
        who = f" by {by}" if by else ""
        why = f": {reason.strip()}" if reason.strip() else " (no reason given: --reason says why)"
        set_status(name, str(current.version), ROLLED_BACK, f"rolled back by hand{who}, version {previous.version} serves again{why}")
    audit.record("rollback", by or None, version=str(current.version) if current is not None else None, reason=reason.strip() or None,
                 evidence=f"models:/{name}@{CHAMPION} -> version {previous.version}", model=name, kind="by hand", to=str(previous.version))
    return (str(current.version) if current else "none"), str(previous.version)


def log_release(name: str, version: str, history: dict, markdown: str) -> None:
    """The release history of a version (what went where, when, why, each step's analysis),
    stored with the version's run: release/v<N>.json and .md; the tag points at them."""
    c = client()
    mv = c.get_model_version(name, str(version))
    if mv.run_id:
        c.log_dict(mv.run_id, history, f"release/v{version}.json")
        c.log_text(mv.run_id, markdown, f"release/v{version}.md")
        c.set_model_version_tag(name, str(version), "release.history", f"runs:/{mv.run_id}/release/v{version}.json")


def download(mv: ModelVersion, dst: Path) -> Path:
    """Fetch a version's model folder (what serving loads)."""
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=client().tracking_uri))


class NoStartPoint(ValueError):
    """No registered weights to train from (model.start_from: champion); the message names the
    key and the fix."""


def start_point(name: str, version: str | None = None) -> ModelVersion:
    """The version a run trains from (model.start_from: champion): `version` when pinned, else
    the champion's; refused, naming the key and the fix, when there is none or it kept no
    trainable weights."""
    if version is None:
        mv = by_alias(name, CHAMPION)
        if mv is None:
            raise NoStartPoint(f"model.start_from is 'champion' but model '{name}' has no champion yet; nothing was run. "
                               "Release a first champion from the base (model.start_from: base, the default), or run this recipe with start_from=base")
    else:
        try:
            mv = client().get_model_version(name, str(version))
        except MlflowException:
            raise NoStartPoint(f"model.start_version {version}: model '{name}' has no such version; nothing was run. "
                               "Set model.start_version to a registered version (`lifecycle status`), or null for the champion") from None
    if not mv.tags.get(TRAINABLE_TAG):
        raise NoStartPoint(f"model.start_from is 'champion' but version {mv.version} of '{name}' kept no trainable weights (registered before they were kept, "
                           "or with registry.keep_trainable: false); nothing was run. Set model.start_version to a version registered with them, or model.start_from: base")
    return mv


def download_trainable(mv: ModelVersion, dst: Path) -> Path:
    """Fetch a version's trainable weights (tag `trainable`) into `dst`, as a plain folder."""
    import shutil
    import tempfile

    if not mv.tags.get(TRAINABLE_TAG):
        raise NoStartPoint(f"version {mv.version} has no trainable weights (tag '{TRAINABLE_TAG}')")
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.tags[TRAINABLE_TAG], dst_path=tmp, tracking_uri=client().tracking_uri))
        (got / "MLmodel").unlink(missing_ok=True)  # the served folder's registry card, not a weight file
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(got), dst)
    return dst


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _drop_alias(name: str, alias: str) -> None:
    if by_alias(name, alias) is not None:
        client().delete_registered_model_alias(name, alias)
