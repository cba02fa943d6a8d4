"""Which model files are loaded: safetensors only, and no code from the checkpoint.

A pickle-based checkpoint (pytorch_model.bin, *.pt, *.pth, *.ckpt) runs arbitrary code when it
is unpickled, so a folder that offers only those is refused before transformers opens it, naming
the file and how to convert it. Every `from_pretrained` of model weights gets
`pretrained_kwargs(ref)`: `use_safetensors=True` (a Hub id without safetensors weights fails
instead of falling back to a .bin) and `trust_remote_code=False` (no params key turns it on: a
model whose architecture needs code from its repository is not loaded).

A safetensors file cut short (a copy or download that stopped, a disk that filled) is named with
its expected and actual size before transformers opens it: safetensors' own error is a Rust
traceback that names neither the file nor the fix. Only the header is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles in a Trainer checkpoint that are not weights (never loaded by from_pretrained).
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


class ModelFileError(ValueError):
    """A model folder that is not loaded; the message names the file and the fix."""


class UnsafeCheckpointError(ModelFileError):
    """A model folder whose weights are pickles only."""


class DamagedCheckpointError(ModelFileError):
    """A safetensors file whose header or data is incomplete."""


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header length, JSON header, the data its
    offsets promise), or None. Reads the header only."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{size} bytes, but its header alone claims {n + 8}"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"its header is not valid JSON ({exc.__class__.__name__})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{size} bytes where its header promises {expected}"
    return None


def require_whole(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise DamagedCheckpointError(
                f"{path} is damaged or incomplete ({problem}): copy or download the model again, "
                "or point at another checkpoint"
            )


def pickled_weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES and not p.name.startswith(NOT_WEIGHTS))


def require_safetensors(ref: str | Path) -> None:
    """Raise UnsafeCheckpointError when `ref` is a local folder whose weights are pickles with no
    safetensors beside them, DamagedCheckpointError when one of its safetensors files is cut
    short (a Hub id is left to `use_safetensors=True`)."""
    folder = Path(ref)
    if not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")):
        require_whole(folder)
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
