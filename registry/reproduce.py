"""`lifecycle reproduce VERSION`: rebuild a registered version from its record and check that
every data and model hash comes out the same.

The record (registry/lineage.py) holds the git commit, the uncommitted changes as a patch, the
params, the DAG and the dvc.lock of the run that made the version, and the `.dvc` pointers of
its raw inputs, whose bytes the flow pushed to the DVC remote. Reproducing restores the code into
a scratch git worktree (the user's checkout is not touched), pulls the raw inputs from the
remote, reruns every stage with an empty cache (so nothing is restored instead of rebuilt), and
compares the new dvc.lock with the recorded one. On the deterministic CPU default every hash
must match; a GPU run or a hub model may legitimately differ, and the report says where."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from registry.lineage import artifact_hashes, load_record, stage_graph
from registry.store import client


class ReproduceError(RuntimeError):
    """The version cannot be rebuilt from its record; the message says what is missing."""


def _run(cmd: list[str], cwd: Path, what: str, quiet: bool = False) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(cmd, cwd=cwd, env=env, text=True, **({"capture_output": True} if quiet else {}))
    if r.returncode != 0:
        detail = (r.stderr or r.stdout or "")[-2000:] if quiet else "(its output is above)"
        raise ReproduceError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{detail}")


def default_remote_url(project: Path) -> tuple[str, str] | None:
    """(name, url) of the project's default DVC remote; a relative local path is resolved the
    way DVC does (against .dvc/), so the scratch worktree reaches the same remote."""
    def cfg(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", "config", *args], cwd=project, capture_output=True, text=True).stdout.strip()

    name = cfg("core.remote")
    if not name:
        return None
    url = cfg(f"remote.{name}.url")
    if url and "://" not in url and not os.path.isabs(url):
        url = str((project / ".dvc" / url).resolve())
    return name, url


def prepare_worktree(project: Path, sha: str, scratch: Path, record: dict) -> None:
    if scratch.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(scratch)], cwd=project, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    _run(["git", "worktree", "add", "--detach", "--force", str(scratch), sha], project, f"restoring commit {sha[:12]} (is it still in this repository?)", quiet=True)
    if record["patch"].strip():
        patch = scratch / ".lineage.patch"
        patch.write_text(record["patch"])
        _run(["git", "apply", "--binary", str(patch)], scratch, "applying the recorded uncommitted changes", quiet=True)
        patch.unlink()
    if record["params_text"]:
        (scratch / "params.yaml").write_text(record["params_text"])
    if record.get("run_params_text"):  # a run overlay's params, which its dvc.yaml names
        (scratch / "params.run.yaml").write_text(record["run_params_text"])
    if record["dag"] is not None:
        (scratch / "dvc.yaml").write_text(yaml.safe_dump(record["dag"], sort_keys=False))
    for rel, text in record["dvcfiles"].items():
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_text(text)
    (scratch / "dvc.lock").unlink(missing_ok=True)  # rebuilt from scratch, compared with the recorded one


def compare(recorded: dict, rebuilt: dict, dag: dict | None) -> list[dict]:
    want, got = artifact_hashes(recorded, dag), artifact_hashes(rebuilt, dag)
    return [{"path": p, "recorded": md5, "reproduced": got.get(p, "(missing)"), "match": got.get(p) == md5} for p, md5 in want.items()]


def code_differences(recorded: dict, scratch: Path) -> list[str]:
    """Code files whose bytes in the restored worktree differ from what the lock recorded (an
    untracked file at build time, for instance): the likeliest reason for a mismatch."""
    import hashlib

    out = []
    for step in stage_graph(recorded):
        for c in step["code"]:
            path = scratch / c["path"]
            if path.is_file() and c["md5"] and hashlib.md5(path.read_bytes()).hexdigest() != c["md5"]:
                out.append(c["path"])
            elif not path.exists():
                out.append(f"{c['path']} (missing)")
    return sorted(set(out))


def reproduce(name: str, version: str, scratch: Path | None = None, keep: bool = False, project: Path = Path(".")) -> dict:
    project = project.resolve()
    mv = client().get_model_version(name, str(version))
    sha = mv.tags.get("lineage.git_sha", "unknown")
    if sha == "unknown":
        raise ReproduceError(f"version {version} records no git commit: it was not built from a git checkout")
    record = load_record(mv.run_id)
    scratch = (scratch or Path(tempfile.gettempdir()) / "lifecycle-reproduce" / f"{name}-v{version}").resolve()
    print(f"restoring {name} version {version}: commit {sha[:12]}{' + recorded changes' if record['patch'].strip() else ''} into {scratch}", flush=True)
    prepare_worktree(project, sha, scratch, record)
    try:
        remote = default_remote_url(project)
        if remote is not None:
            _run([sys.executable, "-m", "dvc", "remote", "modify", "--local", remote[0], "url", remote[1]], scratch, "pointing the worktree at the DVC remote", quiet=True)
        pointers = [f for f in record["dvcfiles"] if f.endswith(".dvc")]
        if pointers:
            print(f"pulling {len(pointers)} raw input(s) from the DVC remote", flush=True)
            _run([sys.executable, "-m", "dvc", "pull", "--quiet", *pointers], scratch, "dvc pull of the raw inputs (were they pushed? `dvc push` runs in every flow)", quiet=True)
        mismatched_code = code_differences(record["lock"], scratch)
        print("rerunning every stage with an empty cache (dvc repro) ...", flush=True)
        _run([sys.executable, "-m", "dvc", "repro"], scratch, "dvc repro in the scratch worktree")
        rebuilt = yaml.safe_load((scratch / "dvc.lock").read_text())
        rows = compare(record["lock"], rebuilt, record["dag"])
    except BaseException:
        print(f"kept the scratch worktree for inspection: {scratch}", file=sys.stderr)
        raise
    matched = all(r["match"] for r in rows)
    report = {"model": name, "version": str(version), "git_sha": sha, "scratch": str(scratch), "matched": matched, "hashes": rows, "code_differences": mismatched_code}
    if matched and not keep:
        subprocess.run(["git", "worktree", "remove", "--force", str(scratch)], cwd=project, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
        report["scratch"] = None
    return report


def render(report: dict) -> str:
    lines = [f"{'path':<34} {'recorded':<14} {'reproduced':<14} match"]
    for r in report["hashes"]:
        lines.append(f"{r['path']:<34} {r['recorded'].removesuffix('.dir')[:12]:<14} {r['reproduced'].removesuffix('.dir')[:12]:<14} {'yes' if r['match'] else 'NO'}")
    n, ok = len(report["hashes"]), sum(r["match"] for r in report["hashes"])
    lines.append("")
    if report["matched"]:
        lines.append(f"reproduced {report['model']} version {report['version']}: all {n} data and model hashes match")
    else:
        lines.append(f"NOT reproduced: {n - ok} of {n} hashes differ; the rebuild is kept in {report['scratch']}")
        if report["code_differences"]:
            lines.append("  code that differs from what was recorded: " + ", ".join(report["code_differences"]))
    return "\n".join(lines)
