"""The engines' own figures reach the canary's analysis (serving/engine_metrics.py): scraped
from the CPU engine's real /metrics while real clients are answered, and parsed from vLLM's and
TensorRT-LLM's Prometheus text as those engines write it (the metric names, label sets and
buckets of their collectors, written here by the same prometheus_client they use, served over
HTTP where each serves it: vLLM on /metrics, trtllm-serve on /prometheus/metrics)."""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.client import chat_once, client
from serving.engine_metrics import Histogram as Buckets
from serving.engine_metrics import UnknownEngine, Watch, figures, parse, scrape
from serving.routing import Backend
from serving.server import create_app

# vLLM's and TensorRT-LLM's request-latency buckets, as their collectors declare them.
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]


class FakeEngineMetrics:
    """An engine's metrics endpoint, written with that engine's names: `prefix` 'vllm:' or
    'trtllm_'. Only what the Prometheus text says is imitated; nothing else is served."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.registry = prefix, CollectorRegistry()
        r, model = self.registry, ["model_name"]
        self.success = Counter(f"{prefix}request_success", "", ["finished_reason", "model_name"], registry=r)
        self.latency = Histogram(f"{prefix}e2e_request_latency_seconds", "", model, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{prefix}time_to_first_token_seconds", "", model, buckets=TTFT_BUCKETS, registry=r)
        self.queue = Histogram(f"{prefix}request_queue_time_seconds", "", model, buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge(f"{prefix}num_requests_running", "", model, registry=r)
        self.waiting = Gauge(f"{prefix}num_requests_waiting", "", model, registry=r)
        self.errors = Counter(f"{prefix}request_error", "", model, registry=r) if prefix == "trtllm_" else None

    def serve(self, latency: float, ttft: float, queue: float, reason: str = "stop") -> None:
        self.success.labels(reason, "m").inc()
        self.latency.labels("m").observe(latency)
        self.ttft.labels("m").observe(ttft)
        self.queue.labels("m").observe(queue)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


@pytest.fixture
def engine_endpoint():
    """Serves a FakeEngineMetrics at the path its engine uses; 404 elsewhere."""
    servers = []

    def start(fake: FakeEngineMetrics, path: str) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = fake.text().encode() if self.path == path else b"not found"
                self.send_response(200 if self.path == path else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the test output quiet
                return None

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(("prefix", "path", "engine"), [("vllm:", "/metrics", "vllm"), ("trtllm_", "/prometheus/metrics", "trtllm")])
def test_vllm_and_trtllm_figures_over_a_step(engine_endpoint, prefix, path, engine):
    fake = FakeEngineMetrics(prefix)
    url = engine_endpoint(fake, path)
    for _ in range(5):  # before the step: not counted
        fake.serve(latency=9.0, ttft=3.0, queue=2.0)
    watch = Watch([Backend("v", url, "m")])
    rng = np.random.default_rng(0)
    ttfts = rng.uniform(0.02, 0.04, 200)
    for t in ttfts:
        fake.serve(latency=1.2, ttft=float(t), queue=0.6)
    fake.running.labels("m").set(3)
    if fake.errors is not None:
        fake.errors.labels("m").inc(2)
    got = watch.figures()
    assert got["engine"] == engine and got["engine_requests"] == 200
    assert got["engine_failures"] == (2 if engine == "trtllm" else None)
    assert got["engine_p95_latency_s"] == pytest.approx(1.0 + 0.5 * 0.95, abs=0.05)  # inside the (1.0, 1.5] bucket, interpolated
    assert 0.02 <= got["engine_p95_ttft_s"] <= 0.04  # the (0.02, 0.04] bucket holds every one of them
    assert got["engine_mean_queue_s"] == pytest.approx(0.6)
    assert got["engine_running"] == 3


def test_the_cpu_engines_own_endpoint_over_real_requests(model_dir, serve_app):
    app = create_app(model_dir, "m", max_new_tokens_limit=8)
    with serve_app(app) as server:
        api = client(server.base_url)
        chat_once(api, "m", "1 2 3", 4)  # before the step: not counted
        watch = Watch([Backend("cpu", server.root_url, "m")])
        for i in range(6):
            chat_once(api, "m", f"{i} 2 3", 4)
        with pytest.raises(Exception):
            api.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)  # a 400: neither answered nor failed
        got = watch.figures()
    assert got["engine"] == "cpu" and got["engine_requests"] == 6 and got["engine_failures"] == 0
    assert got["engine_p95_ttft_s"] > 0 and got["engine_p95_latency_s"] > 0
    assert got["engine_waiting"] == 0


def test_an_engine_that_restarted_counts_from_its_restart():
    fake = FakeEngineMetrics("vllm:")
    for _ in range(50):
        fake.serve(1.2, 0.03, 0.6)
    before = parse(fake.text())
    restarted = FakeEngineMetrics("vllm:")
    for _ in range(4):
        restarted.serve(1.2, 0.03, 0.6)
    assert figures(before, parse(restarted.text()))["engine_requests"] == 4


def test_an_endpoint_without_engine_metrics_is_named(engine_endpoint):
    fake = FakeEngineMetrics("other_")
    url = engine_endpoint(fake, "/metrics")
    with pytest.raises(UnknownEngine, match="serves no engine metrics we know"):
        scrape(url)
    assert Watch([Backend("x", url, "m")]).figures() == {}, "the gateway's own figures still decide"


def test_histogram_quantile_interpolates_as_prometheus_does():
    h = Buckets({0.1: 10, 0.2: 30, 0.4: 40, float("inf"): 40}, 40, 7.0)
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.1 * (20 - 10) / 20)
    assert h.quantile(0.95) == pytest.approx(0.2 + 0.2 * (38 - 30) / 10)
    assert Buckets({1.0: 1, float("inf"): 5}, 5, 0).quantile(0.95) == 1.0  # in +Inf: the largest finite bound
    assert Buckets().quantile(0.95) is None and Buckets().mean() is None
