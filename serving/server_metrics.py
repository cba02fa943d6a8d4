"""The CPU engine server's Prometheus metrics (GET /metrics): requests and errors by endpoint,
latency to the last byte, time to first token, tokens, queue depth, running requests and batch
sizes. The canary reads them back through serving/engine_metrics.py, as it reads vLLM's."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.engine import Generation
from serving.limits import StatusNote

ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
# Latency and time-to-first-token bucket bounds; a TTFT SLO (monitor.slo_p95_ttft_s) must be one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def endpoint_label(path: str) -> str:
    """The metrics label for a request path; unknown paths share one label to bound cardinality."""
    return path if path in ENDPOINTS else "other"


class Metrics:
    """The server's Prometheus metrics, in a registry of their own: several apps can then live in
    one process (the tests) without their counters colliding in the global registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        latency_buckets = LATENCY_BUCKETS
        self.requests = Counter("serving_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.errors = Counter("serving_errors", "Error answers (also those sent inside a stream), by endpoint and OpenAI error code.", ["endpoint", "code"], registry=r)
        self.latency = Histogram("serving_request_latency_seconds", "From receiving a request to the last byte of its answer.", ["endpoint"], buckets=latency_buckets, registry=r)
        self.ttft = Histogram("serving_time_to_first_token_seconds", "From receiving a generation request to its first generated token (server-side).", buckets=latency_buckets, registry=r)
        self.tokens = Counter("serving_tokens", "Tokens of answered generation requests, by kind: prompt or completion.", ["kind"], registry=r)
        self.queue_depth = Gauge("serving_queue_depth", "Requests waiting for the engine, not yet generating.", registry=r)
        self.running = Gauge("serving_requests_running", "Requests in the batch being generated.", registry=r)
        self.batch_size = Histogram("serving_batch_size", "Requests generated together in one batch.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def answered(self, generations: list[Generation], arrived: float) -> None:
        self.tokens.labels("prompt").inc(sum(g.prompt_tokens for g in generations))
        self.tokens.labels("completion").inc(sum(g.completion_tokens for g in generations))
        for g in generations:
            if g.first_token_at is not None:
                self.ttft.observe(max(0.0, g.first_token_at - arrived))


class MetricsMiddleware:
    """Counts every HTTP answer and times it to its last byte (so a stream is timed whole)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        noted = StatusNote(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            endpoint = endpoint_label(scope["path"])
            self.metrics.requests.labels(endpoint, str(noted.status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
