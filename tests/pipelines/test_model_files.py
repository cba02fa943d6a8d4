"""Model files from a user path (pipelines/model_files.py): a pickle-only checkpoint is refused by
training, evaluation and the serving engine with a message naming the file and the fix; the same
weights as safetensors load; a checkpoint that needs its repository's code is not run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipelines.config import ComputeParams, PeftParams
from pipelines.model_files import DamagedCheckpointError, UnsafeCheckpointError, require_safetensors
from pipelines.training import load_model, machine_plan


@pytest.fixture(scope="module")
def checkpoints(prepared_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the bootstrapped tiny model as saved: safetensors, the same weights as a pickle only)."""
    safe = prepared_dir / "models/base"
    pickled = tmp_path_factory.mktemp("pickled")
    for f in safe.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pickled / f.name)
    # transformers 5 writes safetensors only (save_pretrained lost safe_serialization=False):
    # the pickle is written as older releases and torch checkpoints do.
    from safetensors.torch import load_file

    torch.save(load_file(str(next(safe.glob("*.safetensors")))), pickled / "pytorch_model.bin")
    return safe, pickled


def test_a_pickle_only_checkpoint_is_refused_naming_the_file_and_the_fix(checkpoints):
    """Seen red: with require_safetensors returning at once -> load_model failed with
    transformers' "OSError: Error no file named model.safetensors found in directory ...",
    naming neither the pickle nor the conversion."""
    safe, pickled = checkpoints
    plan = machine_plan(ComputeParams(device="cpu"))
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*safetensors.*save_pretrained"):
        load_model(str(pickled), plan, PeftParams(method="full"), 0)
    from serving.engine import CpuEngine

    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin"):
        CpuEngine(str(pickled))
    from pipelines.evaluate import lm_eval_model
    from pipelines.eval_config import EvaluateParams

    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin"):
        lm_eval_model(str(pickled), EvaluateParams(), ComputeParams(device="cpu"))
    # The same weights as safetensors load, and a Trainer checkpoint's own pickles (optimizer,
    # training args) beside safetensors weights are not weights.
    model = load_model(str(safe), plan, PeftParams(method="full"), 0)
    assert sum(p.numel() for p in model.parameters()) > 0
    require_safetensors(safe)


def test_code_shipped_with_a_checkpoint_is_not_run(checkpoints, tmp_path):
    """A config naming its own modeling code (auto_map): the load refuses instead of importing it.
    Seen red: with pretrained_kwargs giving trust_remote_code=True -> the checkpoint's
    modeling file ran (the marker file was written)."""
    import json

    safe, _ = checkpoints
    folder = tmp_path / "remote-code"
    shutil.copytree(safe, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\nclass CustomModel(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    plan = machine_plan(ComputeParams(device="cpu"))
    model = None
    try:
        model = load_model(str(folder), plan, PeftParams(method="full"), 0)
    except ValueError as exc:
        assert "trust_remote_code" in str(exc)
    assert not marker.exists(), "the checkpoint's code ran"
    assert model is None or type(model).__name__ == "LlamaForCausalLM"


def test_a_checkpoint_cut_short_is_one_line_naming_the_file(checkpoints, tmp_path, monkeypatch, capsys):
    """A model.safetensors cut at half (a copy that stopped, a full disk): the load names the
    file, both sizes and the fix, before safetensors' own traceback; a stage prints it as one line.
    Seen red: with require_whole skipped -> safetensors_rust.SafetensorError "incomplete metadata,
    file not fully covered", naming no file."""
    safe, _ = checkpoints
    folder = tmp_path / "cut"
    shutil.copytree(safe, folder)
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    plan = machine_plan(ComputeParams(device="cpu"))
    with pytest.raises(DamagedCheckpointError, match=rf"{weights.name} is damaged or incomplete \({len(data) // 2} bytes where its header promises {len(data)}\): copy or download"):
        load_model(str(folder), plan, PeftParams(method="full"), 0)
    from serving.engine import CpuEngine

    with pytest.raises(DamagedCheckpointError, match=weights.name):
        CpuEngine(str(folder))
    weights.write_bytes(data[:5])
    with pytest.raises(DamagedCheckpointError, match="shorter than a safetensors header"):
        require_safetensors(folder)
    weights.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    with pytest.raises(DamagedCheckpointError, match="header is not valid JSON"):
        require_safetensors(folder)

    from pipelines import common

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.setattr("sys.argv", ["python -m pipelines.evaluate"])
    with pytest.raises(SystemExit) as exit_:
        common.stage_main("evaluate", lambda params: load_model(str(folder), plan, PeftParams(method="full"), 0))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evaluate: {weights} is damaged or incomplete") and err.count("\n") == 1 and "Traceback" not in err
