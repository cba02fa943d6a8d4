"""Which model files are loaded: safetensors only, and no code from the checkpoint.

A pickle-based checkpoint (pytorch_model.bin, *.pt, *.pth, *.ckpt) runs arbitrary code when it
is unpickled, so a folder that offers only those is refused before transformers opens it, naming
the file and how to convert it. Every `from_pretrained` of model weights gets
`pretrained_kwargs(ref)`: `use_safetensors=True` (a Hub id without safetensors weights fails
instead of falling back to a .bin) and `trust_remote_code=False` (no params key turns it on: a
model whose architecture needs code from its repository is not loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles in a Trainer checkpoint that are not weights (never loaded by from_pretrained).
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


class UnsafeCheckpointError(ValueError):
    """A model folder whose weights are pickles only."""


def pickled_weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES and not p.name.startswith(NOT_WEIGHTS))


def require_safetensors(ref: str | Path) -> None:
    """Raise UnsafeCheckpointError when `ref` is a local folder whose weights are pickles with no
    safetensors beside them (a Hub id is left to `use_safetensors=True`)."""
    folder = Path(ref)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = pickled_weights(folder)
    if pickles:
        raise UnsafeCheckpointError(
            f"refusing to load {pickles[0]}: a pickle-based checkpoint can run code when it is loaded. Convert it to safetensors "
            f"(load it once where you trust it and save it with `model.save_pretrained('{folder}', safe_serialization=True)`), "
            "then remove the pickle files"
        )


def pretrained_kwargs(ref: str | Path) -> dict[str, Any]:
    """What every `from_pretrained` of weights adds, after checking `ref`'s files."""
    require_safetensors(ref)
    return {"use_safetensors": True, "trust_remote_code": False}
