"""Run an ASGI app (the gateway, or a server in tests) under uvicorn in a background thread
of this process, so the caller can drive its in-process controller directly."""

from __future__ import annotations

import threading
import time

import uvicorn

from serving.launcher import free_port


class ThreadedServer:
    """A real uvicorn server for `app` on a loopback port, in a daemon thread.
    `with ThreadedServer(app) as s:` serves until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 60) -> None:
        self.app, self.host = app, host
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:  # set once the lifespan has run and the port is bound
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server for {type(self.app).__name__} did not start on {self.root_url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
