"""A run overlay (pipelines/run_params.py): params.yaml with a run's recipe / start point on
top, written to params.run.yaml complete enough for DVC, the user's file untouched."""

from __future__ import annotations

import pytest
import yaml

from pipelines.config import ConfigError, load_params
from pipelines.dag import check_params_file
from pipelines.run_params import needs_run_file, overlay_values, with_overlay, write_run_params
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
