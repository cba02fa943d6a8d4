"""Stage `start_model` (only when model.start_from is champion): fetch the trainable weights of
the registered version model.start_version into models/start, where the recipe's first step
starts from (e.g. a feedback run's [dpo] on top of the champion, not the base).

The version is a param, not the alias: the flow pins `champion` to its version before DVC runs
(pipelines/run_params.py), so DVC's cache and dvc.lock are keyed by which weights were used and
`dvc repro` rebuilds from the same ones after the champion has moved on.
"""

from __future__ import annotations

import sys

from pipelines.common import file_digest, log, stage_main, write_json
from pipelines.config import Params
from pipelines.recipe import START_DIR


def run(params: Params) -> None:
    from registry.models import NoStartPoint, download_trainable, start_point

    m = params.model
    if m.start_from != "champion":
        sys.exit(f"start_model: model.start_from is '{m.start_from}': this stage only runs for start_from: champion (re-render dvc.yaml: python -m pipelines.dag)")
    if m.start_version is None:
        sys.exit("start_model: model.start_version is not set, and a stage does not follow the moving champion alias; nothing was fetched. "
                 "Run the flow (`make pipeline`), which pins the champion's version for the run, or set model.start_version: N to rebuild from version N")
    try:
        mv = start_point(params.registry.model_name, m.start_version)
        START_DIR.parent.mkdir(parents=True, exist_ok=True)
        download_trainable(mv, START_DIR)
    except NoStartPoint as exc:
        sys.exit(f"start_model: {exc}")
    # What the first step trained from, for the person reading the run (not a DVC metric: the out's hash is the record).
    write_json(START_DIR / "START.json", {"model": params.registry.model_name, "version": str(mv.version), "source": mv.tags.get("trainable"), "weights_digest": file_digest(*sorted(START_DIR.glob("*.safetensors")))})
    log.info("start model: %s version %s -> %s", params.registry.model_name, mv.version, START_DIR)


def main() -> None:
    stage_main("start_model", run)


if __name__ == "__main__":
    main()
