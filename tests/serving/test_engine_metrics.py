"""The engines' own figures reach the canary's analysis (serving/engine_metrics.py): scraped
from the CPU engine's real /metrics while real clients are answered, and parsed from vLLM's and
TensorRT-LLM's Prometheus text as those engines write it (the metric names, label sets and
buckets of their collectors, written here by the same prometheus_client they use, served over
HTTP where each serves it: vLLM on /metrics; trtllm-serve on /prometheus/metrics, with its
/metrics answering JSON, a list of per-iteration statistics, as tensorrt_llm/serve/openai_server.py
does)."""

from __future__ import annotations

import http.server
import json
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
    """An engine's metrics endpoint, written with that engine's names and labels: `prefix`
    'vllm:' or 'trtllm_'. TensorRT-LLM's MetricsCollector labels every series with model_name
    and engine_type ("undefined" in trtllm-serve), its success counter with finished_reason, its
    error counter with http_code, and its gauges come out of prometheus_client's multiprocess
    collector with a pid label. Only what the Prometheus text says is imitated."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.registry = prefix, CollectorRegistry()
        r = self.registry
        trt = prefix == "trtllm_"
        self.labels = {"model_name": "undefined", "engine_type": "undefined"} if trt else {"model_name": "m"}
        names = list(self.labels)
        self.success = Counter(f"{prefix}request_success", "", [*names, "finished_reason"], registry=r)
        self.latency = Histogram(f"{prefix}e2e_request_latency_seconds", "", names, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{prefix}time_to_first_token_seconds", "", names, buckets=TTFT_BUCKETS, registry=r)
        self.queue = Histogram(f"{prefix}request_queue_time_seconds", "", names, buckets=LATENCY_BUCKETS, registry=r)
        gauge_labels = [*names, "pid"] if trt else names
        self.running = Gauge(f"{prefix}num_requests_running", "", gauge_labels, registry=r)
        self.waiting = Gauge(f"{prefix}num_requests_waiting", "", gauge_labels, registry=r)
        self.errors = Counter(f"{prefix}request_error", "", [*names, "http_code"], registry=r) if trt else None

    def serve(self, latency: float, ttft: float, queue: float, reason: str = "stop") -> None:
        self.success.labels(**self.labels, finished_reason=reason).inc()
        self.latency.labels(**self.labels).observe(latency)
        self.ttft.labels(**self.labels).observe(ttft)
        self.queue.labels(**self.labels).observe(queue)

    def set_running(self, n: int) -> None:
        extra = {"pid": "4242"} if self.prefix == "trtllm_" else {}
        self.running.labels(**self.labels, **extra).set(n)

    def fail(self, n: int, http_code: str = "500") -> None:
        assert self.errors is not None
        self.errors.labels(**self.labels, http_code=http_code).inc(n)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def iteration_stats(iteration: int) -> list[dict]:
    """What trtllm-serve's /metrics answers (JSON): the executor's latest iteration statistics,
    as IterationStats serialises them."""
    return [{
        "timestamp": "12-03-2026 14:00:00", "iter": iteration, "iterLatencyMS": 15.5, "newActiveRequestsQueueLatencyMS": 0.1,
        "numActiveRequests": 3, "numQueuedRequests": 1, "numCompletedRequests": 2, "maxNumActiveRequests": 64,
        "gpuMemUsage": 4_000_000_000, "cpuMemUsage": 2_000_000_000, "pinnedMemUsage": 500_000_000,
        "kvCacheStats": {"maxNumBlocks": 1000, "freeNumBlocks": 400, "usedNumBlocks": 600, "tokensPerBlock": 64, "cacheHitRate": 0.85},
        "inflightBatchingStats": {"numContextRequests": 1, "numGenRequests": 2, "numPausedRequests": 0, "numScheduledRequests": 3, "numCtxTokens": 256, "avgNumDecodedTokensPerIter": 1.0, "microBatchId": 0},
    }]


@pytest.fixture
def engine_endpoint():
    """Serves an engine's endpoints: `routes` maps a path to (content type, body function); 404
    elsewhere. A FakeEngineMetrics alone is served as Prometheus text at `path`."""
    servers = []

    def start(fake: FakeEngineMetrics | None, path: str = "/metrics", routes: dict | None = None) -> str:
        table = dict(routes or {})
        if fake is not None:
            table[path] = ("text/plain; version=0.0.4; charset=utf-8", fake.text)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                found = table.get(self.path)
                body = found[1]().encode() if found else b'{"detail":"Not Found"}'
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", found[0] if found else "application/json")
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
    """trtllm-serve as it runs: /metrics answers JSON (iteration statistics), Prometheus text is
    on /prometheus/metrics (with return_perf_metrics, which the launcher sets).
    Seen red: with scrape() giving up on /metrics' JSON as before (the Prometheus parser's
    ValueError), the trtllm case got no figures: KeyError 'engine' (Watch.figures() was {})."""
    fake = FakeEngineMetrics(prefix)
    iterations = iter(range(10**6))
    routes = {"/metrics": ("application/json", lambda: json.dumps(iteration_stats(next(iterations))))} if engine == "trtllm" else None
    url = engine_endpoint(fake, path, routes)
    for _ in range(5):  # before the step: not counted
        fake.serve(latency=9.0, ttft=3.0, queue=2.0)
    watch = Watch([Backend("v", url, "m")])
    rng = np.random.default_rng(0)
    ttfts = rng.uniform(0.02, 0.04, 200)
    for t in ttfts:
        fake.serve(latency=1.2, ttft=float(t), queue=0.6)
    fake.set_running(3)
    if fake.errors is not None:
        fake.fail(2)
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


def test_trtllm_serve_without_its_prometheus_endpoint_says_how_to_turn_it_on(engine_endpoint):
    """trtllm-serve started without return_perf_metrics: /metrics is JSON, /prometheus/metrics 404."""
    url = engine_endpoint(None, routes={"/metrics": ("application/json", lambda: json.dumps(iteration_stats(7)))})
    with pytest.raises(UnknownEngine, match="return_perf_metrics") as err:
        scrape(url)
    assert "/metrics: JSON, not Prometheus text" in str(err.value) and "/prometheus/metrics: 404" in str(err.value)
    assert Watch([Backend("t", url, "m")]).figures() == {}, "the gateway's own figures still decide"


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
