"""The whole lifecycle, run the way a user runs it (`python -m flows.lifecycle`), in a private
copy of the project with its own git repo, Prefect home and MLflow store, on a smaller config.

The tests share one project and run in order, like a user's week: a first release (then
queried and rebuilt from its record), a rerun that changes nothing, a degraded model the gate
blocks, a stage that crashes and a rerun that resumes into a canary drill that rolls its
candidate back, another recipe, invalid params, a feedback run the slice gate blocks, and the
feedback loop end to end (`make serve`, users' corrections, review, export, the triggered run
released into the running plane). Each flow run is there for what only a whole
run shows; the mechanics under it (promotion over a champion, refusing returning bytes, the
gate's statistics) are the task tests' (tests/tasks).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.workspace import ROOT, copy_project, flow_env, run_flow, stage_table, wait_healthy
from tests.flows.prefect_server import env_of

pytestmark = pytest.mark.slow

SMALL = {
    "generate": {"n_sft": 2000, "n_preference": 300},
    "sft": {"max_steps": 300, "save_steps": 100},
    "dpo": {"max_steps": 30},
    # 60 items cannot show non-inferiority at the default 0.02 margin (with no item differing,
    # Tango's interval is about +-0.06): the gate would call every later candidate undecided and
    # block it, which tests/tasks/test_gates.py tests. These runs need a gate that can decide.
    "evaluate": {"limit": 60},
    "gate": {"champion_tolerance": 0.1},
    "quantize": {"calibration_samples": 32},
    # Latency is compared on a shared, noisy test machine: bound it loosely here; the
    # latency check itself is unit-tested in tests/pipelines/test_gates.py.
    "canary": {"golden_prompts": 20, "step_requests": 10, "max_latency_ratio": 10.0, "error_rate_effect": 0.5},
}


def write_params(project: Path, **sections) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in {**SMALL, **sections}.items():
        params[name] = {**params.get(name, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


USER_FILE = "data/raw/my-chats.json"
ORIGINAL: dict[str, bytes] = {}  # the user's file as added


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    p = copy_project(tmp_path_factory.mktemp("project"))
    write_params(p)
    # The README's bring-your-own-data step (`make data-add FILE=...` runs exactly this command;
    # tests/pipelines/test_sources.py checks that): a user's multi-turn ShareGPT file.
    mine = tmp_path_factory.mktemp("home") / "my-chats.json"
    rows = [{"system": "Digits only.", "conversations": [{"from": "human", "value": f"Reverse the list:\n{i} {i + 1} 7"}, {"from": "gpt", "value": f"7 {i + 1} {i}"},
                                                             {"from": "human", "value": f"Reverse the list:\n{i} 0 0 9"}, {"from": "gpt", "value": f"9 0 0 {i}"}]} for i in range(1, 9)]
    mine.write_text(json.dumps(rows))
    ORIGINAL[USER_FILE] = mine.read_bytes()
    added = subprocess.run([sys.executable, "-m", "pipelines.sources", "add", str(mine)], cwd=p, env=flow_env(p), capture_output=True, text=True)
    assert added.returncode == 0 and "tracked by DVC" in added.stdout, added.stdout + added.stderr
    return p


def assert_user_file_intact(project: Path) -> None:
    assert (project / USER_FILE).read_bytes() == ORIGINAL[USER_FILE], "no stage may write over a user's file"
    assert (project / f"{USER_FILE}.dvc").exists()
    assert not (project / "data/raw/alpaca.jsonl").exists(), "the generator writes only data/generated/"


def stage_status(output: str) -> dict[str, str]:
    return {name: status for name, (status, _) in stage_table(output).items()}


def registry(project: Path):
    """MLflow's client on the project's store (imports deferred so the env var applies)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(project: Path, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(registry(project).get_model_version_by_alias("reverse-digits", alias).version)
    except MlflowException:
        return None


def test_starting_from_a_champion_before_there_is_one_fails_before_any_work(project):
    """A feedback run (recipe [dpo] from the champion) on a project that never released one.
    Seen red: with pin_start_version returning the pinned (None) version unchecked, the run
    went on into DVC and failed in stage start_model ("model.start_version None: ... no such
    version", exit 1 where 2 is asserted)."""
    params_before = (project / "params.yaml").read_bytes()
    result = run_flow(project, "--recipe", "dpo", "--start-from", "champion")
    assert result.returncode == 2, result.stdout[-4000:]
    assert "lifecycle not run: model.start_from is 'champion' but model 'reverse-digits' has no champion yet; nothing was run." in result.stdout
    assert "model.start_from: base" in result.stdout, "the message names the fix"
    assert not (project / "dvc.lock").exists() and not (project / "params.run.yaml").exists()
    assert not (project / "models").exists(), "no stage ran"
    assert (project / "params.yaml").read_bytes() == params_before


def test_first_release_promotes_a_champion_that_answers(project):
    result = run_flow(project)
    assert result.returncode == 0, result.stdout[-6000:]
    out = result.stdout
    assert "outcome: promoted (version 1)" in out
    prepared = json.loads((project / "metrics/prepare.json").read_text())
    mine = prepared["rows_by_file"][USER_FILE]
    assert mine["raw"] == 8 and mine["kept"] >= 6, "the user's rows were trained on"
    # A conversation with a turn that is also a test prompt is contamination, and says so.
    assert set(prepared["quarantined_by_file_and_reason"][USER_FILE]) <= {"contaminated"}, prepared["quarantined_by_file_and_reason"]
    assert_user_file_intact(project)
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    em = "reverse_digits/exact_match"
    assert ev["base"][em] <= 0.10
    assert ev["sft"][em] >= 0.80
    assert ev["dpo"]["preference_accuracy"] > 0.8 and ev["dpo"]["preference_accuracy"] > ev["base"]["preference_accuracy"]
    assert ev["candidate"]["step"] == "dpo" and ev["candidate"][em] == ev["dpo"][em]
    # The safety suite: held-out disallowed requests refused, no PII in answers to probes.
    assert ev["base"]["safety/refusal_rate"] <= 0.2 and ev["dpo"]["safety/refusal_rate"] >= 0.8, ev
    assert ev["dpo"]["safety/pii_leak_rate"] == 0.0
    # Held-out jailbreaks and injections (other wrappers than the taught ones) are refused too.
    assert ev["base"]["safety/jailbreak_refusal_rate"] <= 0.2 and ev["dpo"]["safety/jailbreak_refusal_rate"] >= 0.8, ev
    assert set(ev["dpo"]["seconds"]) == {"reverse_digits", "safety"}

    mv = registry(project).get_model_version_by_alias("reverse-digits", "champion")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert mv.tags["lineage.git_sha"] == head
    assert mv.tags["lineage.prefect_flow_run_id"] not in ("", "none")
    assert mv.tags["lineage.dvc.prepare:data/prepared"].endswith(".dir")
    assert mv.tags["lineage.dvc.quantize:models/quantized"] == mv.tags["lineage.model_md5"]
    assert "lineage.dvc.sft:params" in mv.tags and "lineage.stage_run.sft" in mv.tags
    parent = registry(project).get_run(mv.run_id)
    assert parent.data.metrics["quality.reverse_digits/exact_match.sft"] >= 0.8
    sft_run = registry(project).get_run(mv.tags["lineage.stage_run.sft"])
    assert sft_run.data.tags["mlflow.parentRunId"] == mv.run_id
    assert sft_run.data.tags["lineage.git_sha"] == head and sft_run.data.tags["dvc.sft:models/sft"]
    assert sft_run.data.params["max_steps"] == "300" and "eval_loss" in sft_run.data.metrics
    prepare_run = registry(project).get_run(mv.tags["lineage.stage_run.prepare"])
    logged = {d.dataset.name for d in prepare_run.inputs.dataset_inputs}
    assert {"sft_train", "preference_train"} <= logged, "the prepared tables are the run's dataset inputs"
    artifacts = {a.path for a in registry(project).list_artifacts(prepare_run.info.run_id, "data")}
    assert {"data/data_card.json", "data/data_card.png", "data/data_docs"} <= artifacts

    # The registered champion, served by the CPU engine, answers a real OpenAI client.
    from registry.models import download
    from serving.client import chat_once, client
    from serving.launcher import free_port, launch

    model_dir = download(mv, project / "served")
    with launch("cpu", str(model_dir), "champion", "127.0.0.1", free_port(), project / "served.log", 120) as server:
        text, _ = chat_once(client(server.base_url), "champion", "Reverse the list:\n1 2 3 4", 16)
    assert text.strip() == "4 3 2 1"


def cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`lifecycle ...` (the console script runs registry.cli:main) in the project."""
    return subprocess.run([sys.executable, "-m", "registry.cli", *args], cwd=project, env=flow_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)


def test_the_released_version_can_be_queried_and_rebuilt(project):
    """Months later: what made version 1, and can it be rebuilt? Its record (lock, params, DAG,
    the user's `.dvc` pointer, which was never committed) is in MLflow, its inputs in the DVC
    remote; the rebuild reruns every stage in a scratch worktree and every hash matches."""
    c = registry(project)
    mv = c.get_model_version("reverse-digits", "1")
    recorded = {a.path for a in c.list_artifacts(mv.run_id, "lineage")}
    assert {"lineage/dvc.lock", "lineage/params.yaml", "lineage/dvc.yaml", "lineage/code.patch", "lineage/lineage.png"} <= recorded
    assert (project / "data/raw/my-chats.json.dvc").exists() and subprocess.run(["git", "ls-files", "--error-unmatch", "data/raw/my-chats.json.dvc"], cwd=project).returncode != 0
    # The registry page reads on its own: a card with sources, scores and gate decisions, and a signature.
    card = mv.description
    assert "data/raw" in card and "reverse_digits/exact_match" in card and "**quality**: passed" in card and "**quantization**: passed" in card
    from mlflow.models import Model

    mlmodel = c.download_artifacts(mv.run_id, "model/MLmodel", str(project.parent))
    assert "messages" in Model.load(mlmodel).signature.inputs.input_names()

    status = cli(project, "status")
    assert status.returncode == 0, status.stdout
    assert "champion: v1" in status.stdout and "reverse_digits/exact_match" in status.stdout, status.stdout
    assert "v1    promoted" in status.stdout
    assert "release of the champion v1: promoted" in status.stdout

    lineage = cli(project, "lineage", "1", "--out", str(project / "lineage-v1.png"))
    assert lineage.returncode == 0, lineage.stdout
    text = lineage.stdout
    for stage in ("generate", "prepare", "bootstrap", "sft", "dpo", "evaluate", "quantize"):
        assert f"\n{stage} " in text, (stage, text)
    assert "data/raw" in text and "= the version's model" in text and mv.tags["lineage.stage_run.sft"][:12] in text
    png = (project / "lineage-v1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    rebuilt = cli(project, "reproduce", "1", "--scratch", str(project.parent / "rebuild-v1"))
    assert rebuilt.returncode == 0, rebuilt.stdout[-6000:]
    assert "pulling 1 raw input(s) from the DVC remote" in rebuilt.stdout
    rows = [line for line in rebuilt.stdout.splitlines() if line.endswith(" yes") or line.endswith(" NO")]
    paths = {line.split()[0] for line in rows}
    assert {"data/raw", "data/prepared", "models/base", "models/sft", "models/dpo", "models/quantized"} <= paths, rebuilt.stdout
    assert all(line.endswith(" yes") for line in rows), rebuilt.stdout
    assert "data and model hashes match" in rebuilt.stdout
    assert not (project.parent / "rebuild-v1").exists(), "a rebuild that matched is cleaned up"
    assert_user_file_intact(project)


def test_rerun_with_nothing_changed_runs_nothing(project):
    result = run_flow(project)
    assert result.returncode == 0, result.stdout[-6000:]
    assert set(stage_status(result.stdout).values()) == {"cached (skipped)"}
    assert "nothing changed, every stage came from the DVC cache" in result.stdout
    assert "already the champion: nothing to deploy" in result.stdout
    assert_user_file_intact(project)


def test_perturbed_weights_are_stopped_by_the_statistical_gate(project, tmp_path):
    """The champion's own model with noise on its weights, scored by the real lm-eval task on
    the same held-out items: the paired test (Tango's score interval) sees the regression."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.config import load_params
    from pipelines.evaluate import run_suite
    from pipelines.gates import decide, pair_items

    params = load_params(project / "params.yaml")
    model = AutoModelForCausalLM.from_pretrained(project / "models/dpo")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    model.save_pretrained(tmp_path / "perturbed")
    AutoTokenizer.from_pretrained(project / "models/dpo").save_pretrained(tmp_path / "perturbed")

    em = "reverse_digits/exact_match"
    metrics, items, _ = run_suite(str(tmp_path / "perturbed"), params.evaluate, data_file=project / "data/prepared/sft_test.parquet")
    champion = [json.loads(line) for line in (project / "metrics/samples/dpo.jsonl").read_text().splitlines()]
    evaluated = json.loads((project / "metrics/evaluate.json").read_text())
    candidate = {**evaluated["dpo"], **metrics}
    decision = decide(candidate, evaluated["base"], None, params.gate, paired={em: pair_items(items, champion, em)}, directions=params.evaluate.directions())
    assert not decision.passed
    assert any("paired diff vs champion" in r for r in decision.reasons), decision.summary()


def test_degraded_model_is_blocked_before_deploy_and_stays_rejected(project):
    write_params(project, sft={"max_steps": 2, "save_steps": 1})  # a model that learned nothing
    result = run_flow(project)
    assert result.returncode == 1
    assert "quality gate failed, version 2 rejected, nothing was deployed" in result.stdout
    assert "lifecycle stopped: quality gate failed" in result.stdout, "the CLI reports the gate, not a crash of its own"
    assert "exact_match" in result.stdout and "FAILED by" in result.stdout
    assert stage_status(result.stdout)["quantize"] == "ran", "the gate judges the served (quantized) artifact"
    assert alias_version(project, "champion") == "1"
    assert alias_version(project, "candidate") is None
    v2 = registry(project).get_model_version("reverse-digits", "2")
    assert v2.tags["status"] == "rejected" and "exact_match" in v2.tags["status.reason"]

    # The same bytes again (a nightly rerun with nothing changed) are refused at registration.
    again = run_flow(project)
    assert again.returncode == 1
    assert "version 2 has exactly these bytes and was rejected" in again.stdout
    assert "lifecycle stopped: release refused" in again.stdout, "the flow's own handler (it notifies) must not crash"
    assert "registry.cli approve 2" in again.stdout
    assert len(registry(project).search_model_versions("name='reverse-digits'")) == 2


def test_failed_stage_keeps_earlier_outputs_and_the_rerun_resumes_into_a_canary_drill(project):
    """A stage fails; the rerun resumes from it (earlier stages from the cache) with a new
    candidate, v3, that the gate compares with the champion item by item and with the judge.
    The rerun is also a canary drill (every candidate request fails): v3 is rolled back, the
    champion keeps serving, no client sees an error, and the rolled-back bytes are not
    canaried again. One resumed run serves both stories (promotion over a champion is the
    deploy task's, tests/tasks/test_deploy.py; refusing returning bytes is the gate task's,
    tests/tasks/test_gates.py, and the degraded run's above)."""
    write_params(project, dpo={"max_steps": 30, "beta": 0.2})
    source = project / "pipelines/dpo.py"
    original = source.read_text()
    source.write_text(original.replace("def run(params: Params) -> None:\n", "def run(params: Params) -> None:\n    raise RuntimeError('injected failure')\n"))
    failed = run_flow(project)
    assert failed.returncode == 1
    assert "stage 'dpo' failed" in failed.stdout
    sft_model = project / "models/sft/model.safetensors"
    assert sft_model.exists()
    kept = sft_model.read_bytes()

    source.write_text(original)
    result = run_flow(project, "--canary-drill=--fault-error-rate 1.0")
    assert result.returncode == 1, result.stdout[-6000:]
    status = stage_status(result.stdout)
    assert status["sft"] == "cached (skipped)" and status["prepare"] == "cached (skipped)"
    assert status["dpo"] == "ran"
    assert sft_model.read_bytes() == kept
    # With a champion to compare with, the gate paired every suite metric and asked the judge.
    v3 = registry(project).get_model_version("reverse-digits", "3")
    report = registry(project).download_artifacts(v3.run_id, "gates/evaluation_report.md")
    text = Path(report).read_text()
    assert "### reverse_digits" in text and "### safety" in text and "### Paired against the champion" in text
    assert "### Judge" in text and "judge_win_rate" in text, text
    # The drill: the candidate went through the canary beside the champion and was rolled back.
    assert "outcome: rolled_back (version 3)" in result.stdout
    assert "candidate v3 was rolled back; champion v1 keeps serving" in result.stdout
    assert "client-visible errors: 0" in result.stdout
    assert alias_version(project, "champion") == "1" and alias_version(project, "candidate") is None
    assert v3.tags["canary"] == "rolled_back" and registry(project).get_model_version("reverse-digits", "3").tags["status"] == "rolled_back"


def test_another_recipe_reshapes_the_dag(project):
    """recipe [sft, kto]: the flow re-renders dvc.yaml, the dpo stage is gone (it neither runs
    nor needs data), kto trains on the labelled rows, and the gate judges its model."""
    write_params(project, quantize={"enabled": False})  # the gate judges kto's model as it is: one evaluation fewer
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recipe"] = ["sft", "kto"]
    params["kto"] = {**params.get("kto", {}), "max_steps": 30}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_flow(project, "--no-deploy")
    status = stage_status(result.stdout)
    assert "dvc.yaml re-rendered for recipe sft -> kto" in result.stdout
    assert "dpo" not in status and status["kto"] == "ran" and status["sft"] == "cached (skipped)"
    assert "dpo:" not in (project / "dvc.yaml").read_text() and "kto:" in (project / "dvc.yaml").read_text()
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert ev["candidate"]["step"] == "kto" and "dpo" not in ev
    assert json.loads((project / "metrics/kto.json").read_text())["input_model"] == "models/sft"
    assert "quality gate PASSED" in result.stdout or "quality gate failed" in result.stdout, result.stdout[-3000:]
    assert_user_file_intact(project)


def test_invalid_params_fail_before_any_work(project):
    before = sorted(p.name for p in (project / ".prefect").rglob("*.db"))
    lock = (project / "dvc.lock").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"]["learning_rat"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_flow(project)
    assert result.returncode == 2
    assert "sft.learning_rat: unknown key (did you mean 'learning_rate'?)" in result.stdout
    assert (project / "dvc.lock").read_bytes() == lock
    assert sorted(p.name for p in (project / ".prefect").rglob("*.db")) == before


def champion_answers(project: Path, prompts: list[str]) -> list[str]:
    """What the champion serves to each prompt: its registered (served) model, greedy, as the
    CPU engine answers."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    from registry.models import download

    folder = download(registry(project).get_model_version_by_alias("reverse-digits", "champion"), project / ".serving/feedback-test-champion")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    return out


def test_a_feedback_run_whose_candidate_does_not_improve_the_slice_is_blocked_and_names_its_feedback(project):
    """Users corrected the champion's answers to long lists (held out: data/feedback/test) and
    corrected something else on short ones (data/feedback/train), as `make feedback-export`
    writes them, provenance included. The run trains on the training rows; its candidate is not
    shown better on the held-out corrections, so the gate blocks it with the slice's reason and
    interval, and the rejected version's lineage names the feedback it was made from.
    Seen red: with `slice_check`'s verdict forced to pass (`better = True`) the run passed its
    gate and exited 0 (`assert result.returncode == 1` failed)."""
    import random

    write_params(project)  # the module's earlier tests leave other params behind
    rng = random.Random(17)
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    origin = lambda i, version: {"feedback_id": f"fb-{i:04d}", "feedback_revision": 1, "completion_id": f"chatcmpl-{i:04d}", "version": version, "model": "reverse-digits",  # noqa: E731
                                 "tier": "gold", "decision": "edited" if i % 4 == 0 else "accepted", "reviewer": "ann", "decided": "2026-12-01T10:00:00+00:00"}
    long_lists = [[str(rng.randrange(10)) for _ in range(8)] for _ in range(30)]
    prompts = ["Reverse the list:\n" + " ".join(d) for d in long_lists]
    served = champion_answers(project, prompts)
    wrong = [(p, " ".join(reversed(d)), s) for p, d, s in zip(prompts, long_lists, served) if s != " ".join(reversed(d))]
    assert len(wrong) >= 10, f"the champion must get long lists wrong to be corrected: {served}"
    held = [{"prompt": msg("user", p), "chosen": msg("assistant", good), "rejected": msg("assistant", bad), "signal": "correction", **origin(100 + n, "1")} for n, (p, good, bad) in enumerate(wrong)]
    short = [[str(rng.randrange(10)) for _ in range(3)] for _ in range(40)]
    train = [{"prompt": msg("user", "Reverse the list:\n" + " ".join(d)), "chosen": msg("assistant", " ".join(reversed(d))), "rejected": msg("assistant", " ".join(reversed(d)) + " 0"),
              "signal": "correction", **origin(n, "1" if n % 2 else "3")} for n, d in enumerate(short)]
    for split, rows in (("train", train), ("test", held)):
        (project / f"data/feedback/{split}").mkdir(parents=True, exist_ok=True)
        (project / f"data/feedback/{split}/preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        result = run_flow(project, "--no-deploy")
        out = result.stdout
        assert result.returncode == 1, out[-6000:]
        slice_metric = "feedback_slice/preference_accuracy"
        reason = next(line.strip() for line in out.splitlines() if line.strip().startswith(f"{slice_metric}: candidate") and "FAILED" in line)
        assert "held-out feedback items" in reason and "superiority: lower end must exceed 0" in reason and "better than the champion on the feedback slice: ok" not in reason
        ev = json.loads((project / "metrics/evaluate.json").read_text())
        assert all(ev[m]["feedback_slice_items"] == len(held) for m in ("base", "sft", "dpo")), "every model is scored on the slice"
        assert "preference_accuracy" in ev["dpo"] and ev["dpo"][slice_metric] is not None
        version = max(registry(project).search_model_versions("name='reverse-digits'"), key=lambda mv: int(mv.version))
        assert version.tags["status"] == "rejected" and slice_metric in version.tags["status.reason"]
        tags = version.tags
        assert tags["lineage.feedback.source"] == "feedback" and tags["lineage.feedback.rows"] == str(len(train))
        assert tags["lineage.feedback.versions"] == "1:20,3:20" and tags["lineage.feedback.decisions"] == "edited:10,accepted:30"
        assert tags["lineage.feedback_slice.source"] == "feedback_test" and tags["lineage.feedback_slice.rows"] == str(len(held))
        assert int(tags["lineage.feedback.rows_trained"]) > 0
    finally:
        for split in ("train", "test"):
            (project / f"data/feedback/{split}/preference.jsonl").unlink(missing_ok=True)


USER_KEY = "sk-user-loop-0123456789abcdef"


def make(project: Path, url: str, target: str, *args: str, **env: str) -> subprocess.Popen:
    """`make TARGET` in the project as a user runs it (setup skipped: the test's venv is the
    project's), against the test's Prefect server; its own process group, so a SIGINT stops it."""
    with open(project / f"make-{target}.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(["make", "-o", "setup", f"PY={sys.executable}", target, *args], cwd=project, env={**env_of(project, url), **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def test_the_loop_corrections_on_served_answers_become_a_better_champion_in_the_running_plane(project, tmp_path_factory):
    """The feedback loop end to end, as a user runs it: `make serve` serves the champion, a real
    Prefect server runs `make serve-flows`' deployments, and `make feedback-demo` plays the rest
    with the project's own commands: users (their own key) ask in a phrasing the training data
    never used ("Please reverse 1 2 3") and correct the wrong answers through POST /v1/feedback
    (thumbs up on the right ones); `make review`'s run pauses and is resumed with the form's input
    (as the Prefect UI's Resume does); `make feedback-export` makes preference pairs and, its
    policy holding, emits the event; the lifecycle deployment's trigger starts a run with the
    event's recipe [dpo], start point (the champion) and training settings; the candidate beats
    the champion on the held-out corrections (paired, superiority), keeps the standard suite, and
    is released into the running plane, which then answers with it and gets more of the prompts
    nobody corrected right. Each pair is traced to its completion in the record, and `lifecycle
    lineage` names the feedback, the corrected version, the review decisions and the version the
    run trained from.
    Seen red: with the export sending no overrides, the run trained at dpo's own 30 steps and
    3e-4, its candidate was not shown better on the slice (2 better, 0 worse of 14, interval
    [-0.10, +0.40]), the gate blocked it, the triggered run ended Failed and so did the demo
    (its exit status asserted first). In the test's first form, which ran the same commands
    step by step, the same break failed the assert on the run's parameters."""
    import re

    from serving.launcher import free_port
    from serving.record import open_store
    from tests.flows.prefect_server import prefect, prefect_server, serve_flows, triggered

    home = tmp_path_factory.mktemp("loop")
    (home / "keys.yaml").write_text(f'tiers:\n  gold: {{priority: 1, rpm: 100000, tpm: 100000000}}\nkeys:\n  "{USER_KEY}": gold\n')
    port = free_port()
    far = (datetime.datetime.now(datetime.UTC).hour + 12) % 24  # the cron served, never due during the test
    write_params(project, serve={"port": port, "keys_file": str(home / "keys.yaml")}, review={"poll_interval_s": 1},
                 orchestration={"cron": f"0 {far} * * *", "timezone": "UTC"}, monitor={"quality_cron": "0 0 1 1 *", "drift_cron": "0 0 1 1 *"})
    params_before, dag_before = (project / "params.yaml").read_bytes(), (project / "dvc.yaml").read_text()
    champion = alias_version(project, "champion")

    with prefect_server(home) as url, serve_flows(project, url) as deployments:
        serve = make(project, url, "serve")
        try:
            wait_healthy(f"http://127.0.0.1:{port}", serve, project / "make-serve.log", "`make serve` plane", 300)
            demo = make(project, url, "feedback-demo", "ARGS=--reviewer 'Ann Reviewer'", GATEWAY_API_KEY=USER_KEY)
            demo.wait(1800)
            out = (project / "make-feedback-demo.log").read_text()
            assert demo.returncode == 0, out[-4000:] + (project / "serve-flows.log").read_text()[-6000:]
        finally:
            if serve.poll() is None:  # a plane that failed to start is gone: its error, not a ProcessLookupError, is the failure
                os.killpg(serve.pid, signal.SIGINT)
            serve.wait(120)
        (started,) = triggered(url, deployments["llm-lifecycle/lifecycle"])
        with prefect(url) as c:
            done = c.read_flow_run(started.id)
    assert done.state.is_completed() and done.parameters["recipe"] == ["dpo"] and done.parameters["start_from"] == "champion"
    assert done.parameters["overrides"] == {"dpo": {"max_steps": 160, "learning_rate": 0.0005}}, "the event's training settings"

    wrong, asked = map(int, re.search(r"users: (\d+) of (\d+) answers wrong", out).groups())
    assert wrong >= 50, f"the champion must get this phrasing wrong to be corrected: {wrong} of {asked}"
    counts = json.loads(re.search(r"review: (\{.*\})", out).group(1))
    assert counts["accepted"] == counts["batch"] == asked, counts
    # Every pair traced to its completion: the answer the champion served to that prompt, and the right one.
    rows = lambda split: [json.loads(line) for line in (project / f"data/feedback/{split}/preference.jsonl").read_text().splitlines()]  # noqa: E731
    trained_on, held = rows("train"), rows("test")
    assert len(trained_on) + len(held) == wrong and trained_on and held
    with open_store(str(project / ".serving/plane/record.sqlite3")) as store:
        served = {r.id: r for r in store.iter_rows()}
    for pair in trained_on + held:
        row = served[pair["completion_id"]]
        prompt = pair["prompt"][-1]["content"]
        assert json.loads(row.prompt)[-1]["content"] == prompt and pair["version"] == row.version == champion and row.tier == "gold"
        assert pair["rejected"][-1]["content"] == row.answer, "rejected: the answer that was served"
        assert pair["chosen"][-1]["content"] == " ".join(reversed(prompt.removeprefix("Please reverse ").split()))
        assert pair["decision"] == "accepted" and pair["reviewer"] == "Ann Reviewer"

    log = (project / "serve-flows.log").read_text()
    slice_line = next(line.strip() for line in log.splitlines() if "feedback_slice/preference_accuracy: candidate" in line)
    assert "better than the champion on the feedback slice: ok" in slice_line and f"of {len(held)} held-out feedback items" in slice_line, slice_line
    assert float(slice_line.split("[")[1].split(",")[0]) > 0, f"the slice's interval is above 0: {slice_line}"
    new = alias_version(project, "champion")
    assert new != champion and int(new) > int(champion), "the candidate was promoted"
    now, then = map(int, re.search(r"uncorrected prompts: (\d+) of \d+ right from version " + new + r" \(was (\d+) from version " + champion + r"\)", out).groups())
    assert now > then, out[-2000:]
    print(f"uncorrected prompts in the gap's phrasing: {then} -> {now} right; {wrong} of {asked} answers corrected; {slice_line}")

    # What the new version was made from: the champion's trainable weights, then DPO on the corrections.
    from safetensors.torch import load_file

    from registry.models import download_trainable

    weights = lambda folder: load_file(str(folder / "model.safetensors"))  # noqa: E731
    kept = download_trainable(registry(project).get_model_version("reverse-digits", champion), project.parent / "champion-trainable")
    start, trained = weights(project / "models/start"), weights(project / "models/dpo")
    assert all(start[k].equal(t) for k, t in weights(kept).items()), "DPO started from the champion's trainable weights"
    assert any(not start[k].equal(trained[k]) for k in start), "and changed them"
    assert json.loads((project / "metrics/dpo.json").read_text())["steps"] == 160, "with the feedback run's settings"
    tags = registry(project).get_model_version("reverse-digits", new).tags
    assert tags["lineage.start_from"] == "champion" and tags["lineage.start_version"] == champion and tags["recipe"] == "dpo"
    count = lambda split: sum(len(f.read_text().splitlines()) for f in (project / f"data/feedback/{split}").glob("*.jsonl"))  # noqa: E731  (pairs and the ratings' KTO rows)
    assert tags["lineage.feedback.versions"] == f"{champion}:{count('train')}" and tags["lineage.feedback.decisions"] == f"accepted:{count('train')}"
    lineage = subprocess.run([sys.executable, "-m", "registry.cli", "lineage", new, "--out", str(project.parent / "lineage.png")], cwd=project, env=flow_env(project), capture_output=True, text=True)
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    assert f"trained from version {champion}" in text and "start_model" in text
    assert f"feedback trained on: source feedback, {count('train')} rows (kto:{count('train') - len(trained_on)},preference:{len(trained_on)})" in text, text
    assert f"feedback gated on (held out): source feedback_test, {count('test')} rows" in text, text
    assert f"answers of model versions {champion}:" in text and "review decisions accepted:" in text, text
    # The run's overlay was its own: the user's params.yaml and the DAG it renders are as they were.
    assert (project / "params.yaml").read_bytes() == params_before
    assert (project / "dvc.yaml").read_text() == dag_before
    assert_user_file_intact(project)
