"""`make monitor`: `python -m monitoring` runs Prometheus, Alertmanager and the receiver against the
plane(s) under .serving/ until Ctrl-C or SIGTERM, both of which stop all three."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from monitoring.stack import MONITOR_DIR, PLANE_DIRS, MonitorError, Stack
from pipelines.config import ConfigError, load_params
from serving.alerts import Receiver, create_receiver_app

STOPPED = "the monitor stopped Prometheus, Alertmanager and the receiver"


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m monitoring", description="Prometheus + Alertmanager + the alert receiver for the serving plane (make monitor).")
    parser.add_argument("--params", default="params.yaml", help="the params file (monitor:, serve:, registry:, notify:)")
    parser.add_argument("--dir", type=Path, default=MONITOR_DIR, help="configuration, data, logs, the record of actions and the checks' files")
    parser.add_argument("--plane-dir", type=Path, action="append", help=f"a plane's state folder whose targets.json is scraped (repeatable; default: {', '.join(map(str, PLANE_DIRS))})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        params = load_params(args.params)
        stack = Stack(params, args.dir, tuple(args.plane_dir or PLANE_DIRS))
        stack.render()
    except (ConfigError, MonitorError) as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    receiver = Receiver(params, stack.dir, prometheus_url=stack.prometheus_url)
    app = create_receiver_app(receiver)

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        # Started and stopped here, not around uvicorn.run: on SIGTERM nothing after it runs.
        stack.start()
        print(
            f"monitoring '{params.registry.model_name}': Prometheus {stack.prometheus_url}  Alertmanager {stack.alertmanager_url}  "
            f"receiver {stack.receiver_url} (/actions, /metrics); scraping {', '.join(str(d / 'targets.json') for d in stack.plane_dirs)}. "
            f"Ctrl-C or SIGTERM stops it; data in {stack.dir}.", flush=True,
        )
        try:
            yield
        finally:
            receiver.close()
            stack.stop()
            print(STOPPED, flush=True)

    app.router.lifespan_context = lifespan
    try:
        uvicorn.run(app, host="127.0.0.1", port=params.monitor.receiver_port, log_level="warning")
    except MonitorError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    finally:
        stack.stop()  # a lifespan that never got that far (the port taken)


if __name__ == "__main__":
    main()
