"""A run overlay (pipelines/run_params.py): params.yaml with a run's recipe / start point on
top, written to params.run.yaml complete enough for DVC, the user's file untouched."""

from __future__ import annotations

import pytest
import yaml

from pipelines.config import ConfigError, load_params
from pipelines.dag import check_params_file
from pipelines.run_params import needs_run_file, overlay_values, parse_sets, with_overlay, write_run_params
from tests.conftest import ROOT


def test_an_overlay_recipe_runs_with_every_key_its_stages_need_and_the_users_file_untouched(tmp_path):
    """The user's file leaves the kto section to its defaults; the run's recipe [sft, kto]
    needs it written out for DVC. Seen red: with write_run_params writing only the merged
    mapping, check_params_file named 'kto: add it' for the run file."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["kto"]
    user = tmp_path / "params.yaml"
    user.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = user.read_bytes()
    values = overlay_values(["sft", "kto"], "champion", "7")
    params, merged = with_overlay(values, user)
    assert needs_run_file(params, values) and params.recipe == ["sft", "kto"] and params.model.start_version == "7"
    run_file = tmp_path / "params.run.yaml"
    written = write_run_params(merged, values, run_file)
    check_params_file(written, run_file)  # every key a stage lists is in the file DVC reads
    assert written.kto.max_steps == load_params(ROOT / "params.yaml").kto.max_steps
    assert run_file.read_text().startswith("# WRITTEN by the lifecycle flow") and "recipe=['sft', 'kto']" in run_file.read_text()
    assert user.read_bytes() == before


def test_a_bad_overlay_fails_naming_the_key_and_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)params.yaml with the run's overlay \(recipe=\['dpoo'\]\).*unknown step\(s\) \['dpoo'\]"):
        with_overlay(overlay_values(["dpoo"]), ROOT / "params.yaml")
    params, _ = with_overlay({}, ROOT / "params.yaml")
    assert not needs_run_file(params, {}), "an ordinary run writes no run file"


def test_a_runs_settings_go_over_the_steps_own_and_a_bad_one_is_named():
    """What `--set` and a feedback event's overrides do: this run's keys over params.yaml's
    sections, nested keys merged (the rest of the section kept), values read as YAML."""
    sets = parse_sets(["dpo.max_steps=120", "dpo.learning_rate=1e-3", "dpo.peft.r=16"])
    assert sets == {"dpo": {"max_steps": 120, "learning_rate": 1e-3, "peft": {"r": 16}}}
    values = overlay_values(["dpo"], "champion", overrides=sets)
    params, _ = with_overlay(values, ROOT / "params.yaml")
    own = load_params(ROOT / "params.yaml").dpo
    assert (params.dpo.max_steps, params.dpo.learning_rate, params.dpo.peft.r) == (120, 1e-3, 16)
    assert params.dpo.peft.alpha == own.peft.alpha and params.dpo.beta == own.beta, "only the keys given change"
    # A section shared by --set and a named flag keeps both (seen red when the flag's section replaced the --set one).
    assert overlay_values(start_from="champion", overrides=parse_sets(["model.start_version=3"])) == {"model": {"start_version": 3, "start_from": "champion"}}
    with pytest.raises(ConfigError, match=r"dpo\.max_step: unknown key \(did you mean 'max_steps'\?\)"):
        with_overlay(overlay_values(overrides=parse_sets(["dpo.max_step=3"])), ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_sets(["max_steps=3"])


def test_feedback_overrides_are_checked_when_params_load_not_when_a_run_starts(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["feedback_loop"]["overrides"] = {"dpo": {"learning_rat": 0.01}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"feedback_loop.overrides.dpo: learning_rat: unknown key \(did you mean 'learning_rate'\?\)"):
        load_params(tmp_path / "params.yaml")
    raw["feedback_loop"]["overrides"] = {"kto": {"max_steps": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"overrides for \['kto'\], which the feedback recipe \['dpo'\] does not run"):
        load_params(tmp_path / "params.yaml")
