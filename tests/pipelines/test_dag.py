"""The DAG follows the recipe: dvc.yaml is rendered from params, the committed one is current,
a step the recipe does not name is not a stage, DVC itself accepts what is rendered, and every
project file a stage loads is one of its dependencies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, Params, load_params
from pipelines.dag import check_params_file, code_deps, missing_params, render, render_text, stage_names
from tests.conftest import ROOT


def test_committed_dvc_yaml_is_the_rendering_of_params_yaml():
    rendered = render_text(load_params(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == rendered, "dvc.yaml is stale: run `python -m pipelines.dag`"


def test_default_recipe_runs_sft_then_dpo():
    names = stage_names(load_params(ROOT / "params.yaml"))
    assert names == ["generate", "prepare", "bootstrap", "sft", "dpo", "evaluate", "quantize"]


def test_a_recipe_without_dpo_has_no_dpo_stage_and_chains_its_models():
    stages = render(Params(recipe=["sft", "kto"]))["stages"]
    assert "dpo" not in stages and "kto" in stages
    assert "models/sft" in stages["kto"]["deps"] and "data/prepared/kto_train.parquet" in stages["kto"]["deps"]
    assert stages["kto"]["params"] == ["kto", "compute"]
    assert "models/kto" in stages["evaluate"]["deps"] and "models/kto" in stages["quantize"]["deps"]
    assert "metrics/samples/kto.jsonl" in stages["evaluate"]["outs"]


def test_starting_from_the_champion_fetches_it_first_and_the_first_step_trains_from_it():
    """Seen red: with step_stage calling input_model without start_from, dpo's deps listed
    models/base, not models/start (the assert on dpo's deps failed)."""
    stages = render(Params.model_validate({"recipe": ["dpo"], "model": {"start_from": "champion"}}))["stages"]
    assert list(stages) == ["generate", "prepare", "bootstrap", "start_model", "dpo", "evaluate", "quantize"]
    assert stages["start_model"]["outs"] == ["models/start"] and "model.start_version" in stages["start_model"]["params"]
    assert "models/start" in stages["dpo"]["deps"] and "models/base" not in stages["dpo"]["deps"]
    assert "start_model" not in render(Params())["stages"], "an ordinary run has no such stage"


def test_a_run_params_file_is_what_every_stage_reads_and_dvc_keys_on(tmp_path):
    """A run overlay (pipelines/run_params.py): each command reads the run's file and DVC
    tracks that file's values; DVC itself accepts the rendering.
    Seen red: with render() leaving each stage's params keyed on params.yaml, dpo's params were
    ['dpo', 'compute'] (the first assert on them failed)."""
    params = Params.model_validate({"recipe": ["dpo"], "model": {"start_from": "champion", "start_version": "3"}})
    stages = render(params, "params.run.yaml")["stages"]
    assert all(s["cmd"].endswith(" --params params.run.yaml") for s in stages.values())
    assert stages["dpo"]["params"] == [{"params.run.yaml": ["dpo", "compute"]}]
    (tmp_path / "dvc.yaml").write_text(render_text(params, "params.run.yaml"))
    (tmp_path / "params.run.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "run 1"], cwd=tmp_path, check=True)
    pinned = params.model_copy(update={"model": params.model.model_copy(update={"start_version": "4"})})  # the champion moved on
    (tmp_path / "params.run.yaml").write_text(yaml.safe_dump(pinned.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "dvc", "params", "diff", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params.run.yaml"]["model.start_version"] == {"old": "3", "new": "4"}, "DVC keys the stages on the run file's pinned version"


def test_rl_after_a_reward_model_depends_on_it_and_starts_from_the_policy():
    params = Params.model_validate({"recipe": ["sft", "rm", "grpo"], "grpo": {"rewards": ["reward_model", "exact_match"]}})
    stages = render(params)["stages"]
    assert "models/sft" in stages["rm"]["deps"]
    assert "models/rm" in stages["grpo"]["deps"] and "models/sft" in stages["grpo"]["deps"]
    assert "metrics/samples/rm.jsonl" not in stages["evaluate"]["outs"], "a reward model is not a candidate"
    assert "models/rm" in stages["evaluate"]["deps"], "it scores every model's answers (reward_score)"
    assert "models/grpo" in stages["quantize"]["deps"]


def test_dvc_accepts_the_rendered_stages(tmp_path):
    params = Params.model_validate({"recipe": ["sft", "rm", "grpo"], "grpo": {"rewards": ["reward_model"]}})
    (tmp_path / "dvc.yaml").write_text(render_text(params))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([*dvc, "stage", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert listed == stage_names(params)
    assert Path(tmp_path / "dvc.yaml").read_text().startswith("# GENERATED")


# Imports each stage module in one interpreter, forgetting the project's modules between them
# (third-party ones stay loaded: one torch import for all), and prints the project files each
# module loaded.
LOADED_BY = """
import importlib, json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()

def project(module):
    f = getattr(module, "__file__", None)  # (torch's _ops and _classes name relative files that do not exist)
    return f and Path(f).is_absolute() and root in Path(f).resolve().parents and ".venv" not in Path(f).resolve().relative_to(root).parts

out = {}
for name in sys.argv[2:]:
    for loaded in [n for n, m in sys.modules.items() if project(m)]:
        del sys.modules[loaded]
    importlib.import_module(name)
    out[name] = sorted(Path(m.__file__).resolve().relative_to(root).as_posix() for m in list(sys.modules.values()) if project(m))
print(json.dumps(out))
"""


def test_every_project_file_a_stage_loads_is_among_its_deps():
    """A module a stage loads but does not list (config defaults, common helpers, the training
    loop for evaluate and quantize) would change results without invalidating DVC's cache.
    Seen red: code_deps returning only the stage's own file -> evaluate's missing deps listed
    pipelines/training.py, pipelines/config.py, pipelines/common.py, ... and the test failed."""
    recipes = [load_params(ROOT / "params.yaml"), Params(recipe=["sft", "kto"]), Params(recipe=["sft", "orpo"]), Params(recipe=["sft", "cpo"]),
               Params.model_validate({"recipe": ["sft", "rm", "grpo"], "grpo": {"rewards": ["reward_model"]}}), Params(recipe=["sft", "rloo"]),
               Params.model_validate({"recipe": ["dpo"], "model": {"start_from": "champion"}})]
    deps = {}
    for params in recipes:
        for stage in render(params)["stages"].values():
            deps[stage["cmd"].removeprefix("python -m ")] = set(stage["deps"])
    out = subprocess.run([sys.executable, "-c", LOADED_BY, str(ROOT), *deps], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert set(loaded) == set(deps) and all(f"{m.replace('.', '/')}.py" in loaded[m] for m in deps), "every stage module was imported"
    missing = {module: sorted(set(files) - deps[module]) for module, files in loaded.items() if set(files) - deps[module]}
    assert not missing, f"stages load project files their dvc.yaml deps omit: {missing}"


def test_code_deps_follow_imports_inside_functions_and_packages(tmp_path):
    """Static, so imports a stage only runs later (inside a function) count too."""
    deps = code_deps("pipelines.prepare")
    assert "pipelines/tokenizer.py" in deps, "imported inside Lengths.fit only: the runtime check cannot see it"
    assert "pipelines/__init__.py" in deps and "pipelines/prepare.py" in deps
    assert not any(d.startswith((".venv", "tests/")) for d in deps)
    stages = render(load_params(ROOT / "params.yaml"))["stages"]
    assert {"pipelines/training.py", "pipelines/config.py", "pipelines/common.py"} <= set(stages["evaluate"]["deps"]) & set(stages["quantize"]["deps"])
    assert "pipelines/eval_tasks" in stages["prepare"]["deps"] and "evaluate.tasks" in stages["prepare"]["params"], "prepare decontaminates against the suite"


def test_a_file_sources_dataset_info_json_is_a_prepare_dependency(tmp_path, monkeypatch):
    """It says how the file is read: a changed entry must rerun prepare."""
    monkeypatch.chdir(tmp_path)
    Path("lf").mkdir()
    Path("lf/dpo_en_demo.json").write_text("[]")
    Path("lf/dataset_info.json").write_text("{}")
    params = Params.model_validate({"data": {"sources": [{"name": "dpo", "path": "lf/dpo_en_demo.json"}]}})
    assert render(params)["stages"]["prepare"]["deps"][-2:] == ["lf/dpo_en_demo.json", "lf/dataset_info.json"]


def test_every_param_a_stage_lists_is_written_in_the_committed_params_files():
    """DVC reads params.yaml itself and fails a stage mid-run on a listed key the file leaves to
    its default (CI once failed in evaluate on `gate.confidence`). Seen red: with
    `confidence` deleted from params.yaml's gate section, this listed ['gate.confidence']."""
    for path in (ROOT / "params.yaml", ROOT / "configs/real-model.yaml"):
        assert missing_params(load_params(path), path) == [], path


def test_a_params_file_without_a_key_dvc_needs_fails_before_any_work_naming_it(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["gate"]["confidence"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"gate\.confidence: add it \(the default is 0\.95\)"):
        check_params_file(load_params(tmp_path / "params.yaml"), tmp_path / "params.yaml")
