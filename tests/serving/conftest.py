"""Shared fixtures for the serving tests: a tiny untrained checkpoint and an in-thread server.

The model knows nothing, so tests assert on protocol behaviour (shapes, token counts, status
codes, determinism of greedy decoding), never on what the answer says.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.background import ThreadedServer


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    """Poll until `condition()` holds. The timeout only turns a hang into a failure (generous:
    the suite runs on a busy 2-core machine); no test depends on how long anything takes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


def stop(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (servers flush and close on it), then SIGKILL if it has not exited by then."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def scrape(root_url: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics, parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    response = httpx.get(f"{root_url}/metrics")
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled series that has not been touched yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class QueueWatch:
    """Samples a gateway's queue (`gateway_queue{state="waiting"}` on its /metrics) every
    `every_s` until stopped, so a test can say the queue held requests during an operation."""

    def __init__(self, root_url: str, every_s: float = 0.05, headers: dict[str, str] | None = None) -> None:
        self.root_url, self.every_s, self.headers = root_url, every_s, headers or {}
        self.samples: list[tuple[float, float]] = []  # (monotonic time, requests waiting)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.wait(self.every_s):
                try:
                    text = http.get(f"{self.root_url}/metrics", headers=self.headers).text
                except httpx.HTTPError:
                    continue  # a busy gateway may answer late; the next sample counts
                waiting = next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "gateway_queue" and s.labels.get("state") == "waiting"), 0.0)
                self.samples.append((time.monotonic(), waiting))

    def most_waiting(self, since: float, until: float) -> float:
        return max((w for t, w in self.samples if since <= t <= until), default=0.0)

    def __enter__(self) -> "QueueWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


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


@pytest.fixture(scope="session")
def serve_app() -> type[ThreadedServer]:
    """`with serve_app(app) as server:` runs `app` until the block ends."""
    return ThreadedServer
