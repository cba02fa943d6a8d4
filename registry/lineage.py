"""Lineage: what a registered model was made from, as MLflow tags.

The git commit of the code, the dvc.lock hash of every artifact and every params section each
stage read, and the Prefect flow run. With these, `git checkout <sha> && dvc checkout` gives
back the exact bytes that made the model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

DVC_LOCK = Path("dvc.lock")


def git_commit() -> tuple[str, bool]:
    """(sha, dirty). 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
        return sha, dirty
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", False


def dvc_lock_hashes(lock: Path = DVC_LOCK) -> dict[str, str]:
    """{'<stage>:<path>': md5} for every output, and {'<stage>:params': digest} per stage."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    hashes: dict[str, str] = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            hashes[f"{name}:{out['path']}"] = out.get("md5", "")
        if stage.get("params"):
            digest = hashlib.md5(json.dumps(stage["params"], sort_keys=True).encode()).hexdigest()
            hashes[f"{name}:params"] = digest
    return hashes


def lineage_tags(flow_run_id: str | None, parent_run_id: str | None, stage_runs: dict[str, str]) -> dict[str, str]:
    sha, dirty = git_commit()
    tags = {
        "lineage.git_sha": sha,
        "lineage.git_dirty": str(dirty).lower(),
        "lineage.prefect_flow_run_id": flow_run_id or "none",
        "lineage.mlflow_parent_run_id": parent_run_id or "none",
    }
    tags.update({f"lineage.dvc.{k}": v for k, v in dvc_lock_hashes().items()})
    tags.update({f"lineage.stage_run.{k}": v for k, v in stage_runs.items()})
    return tags


# ---- the record kept with every registered version, and reading it back -------------------

LINEAGE_ARTIFACTS = "lineage"  # folder of the version's MLflow run
RECORDED = ("dvc.lock", "params.yaml", "dvc.yaml", "params.run.yaml")  # the last: a run overlay's params (pipelines/run_params.py), when the run had one


def dvc_tracked_inputs(root: Path = Path(".")) -> list[Path]:
    """The `.dvc` files of raw inputs (`make data-add`), what `dvc pull` needs to restore them,
    and the `.gitignore` files `dvc add` writes beside them (part of the folder's hash)."""
    return sorted(p for p in (root / "data").rglob("*") if p.is_file() and (p.suffix == ".dvc" or p.name == ".gitignore"))


def code_patch() -> str:
    """Uncommitted changes to tracked files, so a version built from a dirty tree can still be
    rebuilt (`git apply` on top of its commit). Untracked files are not in it."""
    try:
        return subprocess.run(["git", "diff", "HEAD", "--binary"], capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def record_files(root: Path = Path(".")) -> dict[str, str]:
    """{artifact path under lineage/: text}: the lock, the params and the DAG that made the
    artifacts, the raw inputs' `.dvc` pointers, and the uncommitted code changes."""
    files = {name: (root / name).read_text() for name in RECORDED if (root / name).exists()}
    files.update({f"dvcfiles/{p.relative_to(root).as_posix()}": p.read_text() for p in dvc_tracked_inputs(root)})
    files["code.patch"] = code_patch()
    return files


def stage_graph(lock: dict, dag: dict | None = None) -> list[dict]:
    """The lock as lineage steps in order: per stage, its data inputs (with the stage that made
    each, or None for a raw source), its outputs and their hashes, and its params. Code files
    (deps ending in .py, or folders of task YAML) are listed apart."""
    stages = lock.get("stages", {})
    producers = {out["path"]: name for name, st in stages.items() for out in st.get("outs", [])}
    non_artifacts = set()
    for st in (dag or {}).get("stages", {}).values():
        for kind in ("metrics", "plots"):
            for entry in st.get(kind, []):
                non_artifacts.add(next(iter(entry)) if isinstance(entry, dict) else entry)

    def producer(path: str) -> str | None:
        for out, name in producers.items():
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return name
        return None

    steps = []
    for name, st in stages.items():
        inputs, code = [], []
        for dep in st.get("deps", []):
            made_by = producer(dep["path"])
            if made_by is None and (dep["path"].endswith(".py") or dep["path"].startswith("pipelines/")):
                code.append({"path": dep["path"], "md5": dep.get("md5", "")})
            else:
                inputs.append({"path": dep["path"], "md5": dep.get("md5", ""), "made_by": made_by})
        # Reports (HTML data docs) and metrics/plots carry timestamps and timings: records, not
        # artifacts a rebuild must reproduce byte for byte.
        outs = [{"path": o["path"], "md5": o.get("md5", ""), "artifact": o["path"] not in non_artifacts and not o["path"].startswith("reports/")} for o in st.get("outs", [])]
        params = {k: v for f in (st.get("params") or {}).values() for k, v in f.items()}
        steps.append({"stage": name, "inputs": inputs, "outs": outs, "code": code, "params": params})
    return steps


def artifact_hashes(lock: dict, dag: dict | None = None) -> dict[str, str]:
    """{path: md5} of every data and model output (metrics and plots, which hold timings, aside)
    and of every raw source: what a rebuild must reproduce byte for byte."""
    out: dict[str, str] = {}
    for step in stage_graph(lock, dag):
        out.update({i["path"]: i["md5"] for i in step["inputs"] if i["made_by"] is None})
        out.update({o["path"]: o["md5"] for o in step["outs"] if o["artifact"]})
    return out


def log_record(run_id: str, root: Path = Path(".")) -> list[str]:
    """Store the record with the run the version's model was logged to (lineage/...)."""
    from registry.store import client

    c = client()
    files = record_files(root)
    for name, text in files.items():
        c.log_text(run_id, text, f"{LINEAGE_ARTIFACTS}/{name}")
    return sorted(files)


class NoRecord(LookupError):
    """A version registered before its lineage was recorded (or a run whose artifacts are gone)."""


def load_record(run_id: str) -> dict:
    """{'lock': dict, 'dag': dict|None, 'params_text': str, 'run_params_text': str, 'patch': str, 'dvcfiles': {path: text}}
    from the run's lineage/ artifacts."""
    import tempfile

    import mlflow

    from registry.store import client

    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LINEAGE_ARTIFACTS, dst_path=tmp, tracking_uri=client().tracking_uri))
        except Exception as exc:  # MLflow raises several types for "not there"
            raise NoRecord(f"run {run_id} has no {LINEAGE_ARTIFACTS}/ artifacts ({type(exc).__name__})") from None
        if not (got / "dvc.lock").exists():
            raise NoRecord(f"run {run_id} has no {LINEAGE_ARTIFACTS}/dvc.lock")
        dvcfiles = {p.relative_to(got / "dvcfiles").as_posix(): p.read_text() for p in (got / "dvcfiles").rglob("*") if p.is_file()} if (got / "dvcfiles").exists() else {}
        return {
            "lock": yaml.safe_load((got / "dvc.lock").read_text()) or {},
            "dag": yaml.safe_load((got / "dvc.yaml").read_text()) if (got / "dvc.yaml").exists() else None,
            "params_text": (got / "params.yaml").read_text() if (got / "params.yaml").exists() else "",
            "run_params_text": (got / "params.run.yaml").read_text() if (got / "params.run.yaml").exists() else "",
            "patch": (got / "code.patch").read_text() if (got / "code.patch").exists() else "",
            "dvcfiles": dvcfiles,
        }
