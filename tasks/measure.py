"""The worker process of the fan-out evaluation (`tasks.sweep.evaluate_candidate`): one model
folder through the evaluation stage's own `measure` (the suite, validation loss, preference
accuracy), run in the candidate's work folder so its per-item rows land there and never in the
project's DVC-owned metrics/.

    python -m tasks.measure --name trial-1 --model /abs/models/sweeps/.../models/sft --out metrics/evaluation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipelines.common import write_json
from pipelines.config import load_params
from pipelines.evaluate import measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.measure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="what the candidate is called in the results (metrics/samples/<name>.jsonl)")
    parser.add_argument("--model", required=True, help="a model folder (a plain Hugging Face checkpoint)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="metrics/evaluation.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [evaluate {args.name}] %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = load_params(args.params)
    if params.bootstrapped:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"{args.model} is not a model folder (no config.json)")
    block = measure(args.name, args.model, params.evaluate, params.compute)
    write_json(Path(args.out), block)
    print(json.dumps({"name": args.name, **{k: v for k, v in block.items() if k != "seconds"}}))


if __name__ == "__main__":
    main()
