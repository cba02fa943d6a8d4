"""`make serve`: `python -m serving.plane` serves the champion behind the gateway and keeps it
running until Ctrl-C or SIGTERM, both of which stop its engines (see serving/plane/app.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serving import auth
from serving.launcher import ServerStartError
from serving.plane.app import STOPPED, create_plane_app
from serving.plane.operations import STATE_DIR, Plane, champion_version
from serving.plane.state import PlaneError
from serving.plane.targets import scrape_address


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from pipelines.config import ConfigError, load_params
    from serving.gateway import ADMIN_KEY_ENV, API_KEY_ENV, LEGACY_ADMIN_KEY_ENV, exposure_problem
    from serving.tls import files_problem, server_kwargs

    parser = argparse.ArgumentParser(prog="python -m serving.plane", description="Serve the champion behind the gateway and keep it running (make serve).")
    parser.add_argument("--params", default="params.yaml", help="the params file (serve:, registry:)")
    parser.add_argument("--state-dir", default=str(STATE_DIR), help="where the routing state, model copies and engine logs live")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback serve.host without client keys, an admin key or TLS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the supervisor's health checks, twice a second each
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    serve = params.serve
    api_key = auth.env_key(API_KEY_ENV) or auth.backend_key()
    admin_key = auth.env_key(ADMIN_KEY_ENV) or auth.env_key(LEGACY_ADMIN_KEY_ENV)
    tls_problem = files_problem(serve.tls_certfile, serve.tls_keyfile, ("serve.tls_certfile", "serve.tls_keyfile"))
    if tls_problem:
        parser.error(tls_problem)
    if not args.insecure:
        try:
            problem = exposure_problem(serve.host, api_key, admin_key, serve.keys_file, flag="serve.keys_file", tls=bool(serve.tls_certfile) or serve.tls_offloaded,
                                       tls_flags="serve.tls_certfile and serve.tls_keyfile, or serve.tls_offloaded behind a TLS proxy")
        except (OSError, ValueError) as exc:  # KeysFileError is a ValueError naming the file
            parser.error(f"serve.keys_file: {exc}")
        if problem:
            parser.error(f"serve.host: {problem}")
    plane = Plane(params, Path(args.state_dir))
    plane.gateway_address = scrape_address(serve.host, serve.port)  # in its scrape targets from the first save
    plane.gateway_scheme = "https" if serve.tls_certfile else "http"
    try:
        gateway = plane.start(champion_version(params))
    except (PlaneError, ServerStartError) as exc:
        print(f"the plane could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        plane.stop_all()
        sys.exit(1)

    def stopped(anything: bool) -> None:
        print(STOPPED, flush=True)

    app = create_plane_app(plane, api_key=api_key, admin_key=admin_key, on_stopped=stopped)
    canary = f", canary version {gateway.canary.version} at {gateway.weight:.0%}" if gateway.canary else ""
    guarded = " (requires $GATEWAY_API_KEY or $SERVING_API_KEY)" if api_key else ""
    print(
        f"serving '{plane.public_model}' on {'https' if serve.tls_certfile else 'http'}://{serve.host}:{serve.port}/v1{guarded}: stable version {gateway.stable.version} "
        f"x{len(gateway.stable_backends)}{canary}. Ctrl-C or SIGTERM stops it; routing is kept in {plane.state_path}.", flush=True,
    )
    try:
        uvicorn.run(app, host=serve.host, port=serve.port, log_level="warning", **server_kwargs(serve.tls_certfile, serve.tls_keyfile))
    finally:
        # The lifespan stopped the engines already; this covers a server that never got that far
        # (its port taken). On SIGTERM uvicorn re-raises the signal, so nothing here runs then.
        plane.stop_all()


if __name__ == "__main__":
    main()
