"""Shared fixtures for the serving tests: a tiny untrained checkpoint and an in-thread server.

The model knows nothing, so tests assert on protocol behaviour (shapes, token counts, status
codes, determinism of greedy decoding), never on what the answer says.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from serving.launcher import free_port


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer Llama with a chat template, built by the project's own bootstrap code."""
    from pipelines.bootstrap import build_model, train_tokenizer
    from pipelines.config import ModelParams

    texts = [f"Reverse the list:\n{i % 10} {(i * 7) % 10} {(i * 3) % 10}" for i in range(200)] + ["1 2 3", "3 2 1"]
    tokenizer = train_tokenizer(iter(texts), 300)
    model = build_model(ModelParams(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), tokenizer)
    path = Path(tmp_path_factory.mktemp("tiny-model"))
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


class ThreadedServer:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # set once the lifespan (model load) is done and the port is bound
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start; see the log above")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_app() -> type[ThreadedServer]:
    """`with serve_app(app) as server:` runs `app` until the block ends."""
    return ThreadedServer
