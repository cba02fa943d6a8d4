"""Paths and small helpers shared by the stages. Paths are relative to the project root
(the directory holding dvc.yaml), which is where DVC runs every stage command."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, Params, load_params

PREPARED = Path("data/prepared")
MODELS = Path("models")
METRICS = Path("metrics")
REPORTS = Path("reports")

BASE_DIR = MODELS / "base"
QUANT_DIR = MODELS / "quantized"

log = logging.getLogger("pipelines")


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a crash never leaves half a metrics file for DVC to hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def base_model_ref(params: Params) -> str:
    """What to load as the base model: the bootstrapped checkpoint or the user's id/path."""
    return str(BASE_DIR) if params.bootstrapped else params.model.base_model


def stage_main(name: str, run: Callable[[Params], Any]) -> None:
    """Entry point shared by `python -m pipelines.<stage>`: parse --params, validate, run."""
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    if params.bootstrapped:  # the embedded path never downloads; a real base_model may
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipelines.model_files import ModelFileError

    try:
        run(params)
    except ModelFileError as exc:  # a refused or damaged checkpoint: the file and the fix, not a traceback
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)
    if "LOCAL_RANK" in os.environ:
        exit_rank()


def exit_rank() -> None:
    """A torch.distributed.run rank whose work is done (saved, metrics written, process group left)
    leaves without the interpreter's teardown. That teardown runs C++ destructors while a
    communication thread may still be joinable, and std::terminate then kills a finished rank with
    SIGABRT ("terminate called without an active exception"; DPO, ZeRO-2, 2 processes, in CI),
    which torchrun reports as a failed stage."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def file_digest(*paths: Path) -> str:
    """A digest of files and folders (a model folder: its weight and config files)."""
    h = hashlib.sha256()
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
