"""The engines' own figures for the canary's analysis, scraped from their Prometheus endpoints.

The gateway sees a request from outside: its status and its latency, its own queue included.
The engine sees inside: how long a request waited for a batch, its time to first token, how
many requests are running and waiting. Each engine names these its own way; `ENGINES` maps
them to one set of figures, and the engine is recognised by what its endpoint serves, so the
controller needs no engine flag:

| engine | endpoint | requests | failures | latency | first token | queued |
|---|---|---|---|---|---|---|
| cpu (serving.server) | /metrics | serving_requests (200) | serving_requests (5xx) | serving_request_latency_seconds | serving_time_to_first_token_seconds | - |
| vLLM (`vllm serve`) | /metrics | vllm:request_success | - | vllm:e2e_request_latency_seconds | vllm:time_to_first_token_seconds | vllm:request_queue_time_seconds |
| TensorRT-LLM (`trtllm-serve`) | /prometheus/metrics | trtllm_request_success | trtllm_request_error | trtllm_e2e_request_latency_seconds | trtllm_time_to_first_token_seconds | trtllm_request_queue_time_seconds |

trtllm-serve's `/metrics` is not Prometheus: it answers JSON, a list of per-iteration statistics
(`iter`, `iterLatencyMS`, `numActiveRequests`, `kvCacheStats`, ...). Its Prometheus endpoint,
`/prometheus/metrics`, exists only when the engine runs with `return_perf_metrics: true` (and
its running/waiting gauges with `enable_iter_perf_stats: true`), which `serving.launcher`
writes into the `--extra_llm_api_options` file it starts trtllm-serve with.

A step's figures are the difference of two scrapes (counters and histogram buckets, summed
over an engine's replicas), so they cover exactly that step. Quantiles come from histogram
buckets as Prometheus' `histogram_quantile` computes them (linear within a bucket).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]
GENERATION = ("/v1/chat/completions", "/v1/completions")


def _any(_: Labels) -> bool:
    return True


@dataclass(frozen=True)
class Names:
    """Where one engine keeps each figure: metric family names (counters without `_total`),
    each with the label sets that count."""

    engine: str
    path: str
    marker: str  # a family only this engine serves: how it is recognised
    requests: tuple[str, Callable[[Labels], bool]]
    latency: tuple[str, Callable[[Labels], bool]]
    ttft: str
    failures: tuple[str, Callable[[Labels], bool]] | None = None
    queue: str | None = None
    running: str | None = None
    waiting: str | None = None


ENGINES: tuple[Names, ...] = (
    Names(
        "cpu", "/metrics", "serving_requests",
        requests=("serving_requests", lambda l: l.get("endpoint") in GENERATION and l.get("status") == "200"),
        failures=("serving_requests", lambda l: l.get("endpoint") in GENERATION and l.get("status", "").startswith("5")),
        latency=("serving_request_latency_seconds", lambda l: l.get("endpoint") in GENERATION),
        ttft="serving_time_to_first_token_seconds", running="serving_requests_running", waiting="serving_queue_depth",
    ),
    Names(
        "vllm", "/metrics", "vllm:e2e_request_latency_seconds",
        requests=("vllm:request_success", _any), latency=("vllm:e2e_request_latency_seconds", _any),
        ttft="vllm:time_to_first_token_seconds", queue="vllm:request_queue_time_seconds",
        running="vllm:num_requests_running", waiting="vllm:num_requests_waiting",
    ),
    Names(
        "trtllm", "/prometheus/metrics", "trtllm_e2e_request_latency_seconds",
        requests=("trtllm_request_success", _any), failures=("trtllm_request_error", _any),
        latency=("trtllm_e2e_request_latency_seconds", _any), ttft="trtllm_time_to_first_token_seconds",
        queue="trtllm_request_queue_time_seconds", running="trtllm_num_requests_running", waiting="trtllm_num_requests_waiting",
    ),
)


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    count: float = 0.0
    total: float = 0.0

    def add(self, other: Histogram, sign: float = 1.0) -> Histogram:
        out = Histogram(dict(self.buckets), self.count + sign * other.count, self.total + sign * other.total)
        for le, n in other.buckets.items():
            out.buckets[le] = out.buckets.get(le, 0.0) + sign * n
        return out

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: the bucket holding the q-th observation, linearly
        interpolated from its lower bound; in the +Inf bucket, the largest finite bound."""
        bounds = sorted(self.buckets)
        if not bounds or self.buckets[bounds[-1]] <= 0:
            return None
        rank = q * self.buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for le in bounds:
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
            lower, below = le, n
        return lower

    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None


@dataclass
class Scrape:
    """One engine's (or several replicas', summed) figures at one moment."""

    engine: str
    requests: float = 0.0
    failures: float | None = None
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    queue: Histogram | None = None
    running: float | None = None
    waiting: float | None = None


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _counter(families: dict, name: str, keep: Callable[[Labels], bool]) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name in (name, f"{name}_total") and keep(s.labels))


def _histogram(families: dict, name: str, keep: Callable[[Labels], bool] = _any) -> Histogram:
    h = Histogram()
    family = families.get(name)
    if family is None:
        return h
    for s in family.samples:
        if not keep({k: v for k, v in s.labels.items() if k != "le"}):
            continue
        if s.name == f"{name}_bucket":
            le = float(s.labels["le"])
            h.buckets[le] = h.buckets.get(le, 0.0) + s.value
        elif s.name == f"{name}_count":
            h.count += s.value
        elif s.name == f"{name}_sum":
            h.total += s.value
    return h


def _gauge(families: dict, name: str | None) -> float | None:
    family = families.get(name) if name else None
    return None if family is None else sum(s.value for s in family.samples)


def parse(text: str, names: Names | None = None) -> Scrape:
    """One endpoint's Prometheus text as a Scrape, by `names` or by the engine it recognises."""
    families = _families(text)
    names = names or recognise(families)
    return Scrape(
        names.engine,
        requests=_counter(families, *names.requests),
        failures=_counter(families, *names.failures) if names.failures else None,
        latency=_histogram(families, *names.latency),
        ttft=_histogram(families, names.ttft),
        queue=_histogram(families, names.queue) if names.queue else None,
        running=_gauge(families, names.running),
        waiting=_gauge(families, names.waiting),
    )


class UnknownEngine(ValueError):
    """An endpoint served metrics, but none that `ENGINES` knows how to read."""


def recognise(families: dict) -> Names:
    for names in ENGINES:
        if names.marker in families:
            return names
    raise UnknownEngine(f"no engine's metrics recognised among {sorted(families)[:12]}: expected one of " + ", ".join(n.marker for n in ENGINES))


def scrape(base_url: str, api_key: str | None = None, timeout_s: float = 5.0) -> Scrape:
    """An engine's metrics at http(s)://host:port, wherever its kind serves them. Each known
    path is tried in turn, and one that answers something other than a known engine's
    Prometheus text is passed over, not fatal: trtllm-serve answers `/metrics` with JSON (its
    per-iteration statistics) and serves Prometheus text on `/prometheus/metrics`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tried = []
    for path in dict.fromkeys(n.path for n in ENGINES):
        r = httpx.get(base_url.rstrip("/") + path, headers=headers, timeout=timeout_s)
        if r.status_code != 200:
            tried.append(f"{path}: {r.status_code}")
            continue
        if "json" in r.headers.get("content-type", ""):
            tried.append(f"{path}: JSON, not Prometheus text")
            continue
        try:
            families = _families(r.text)
        except ValueError as exc:
            tried.append(f"{path}: not Prometheus text ({str(exc)[:80]})")
            continue
        known = [n for n in ENGINES if n.path == path and n.marker in families]
        if known:
            return parse(r.text, known[0])
        tried.append(f"{path}: no known engine's metrics")
    hint = " (trtllm-serve serves them only with return_perf_metrics: true, which serving.launcher sets)" if any("JSON" in t for t in tried) else ""
    raise UnknownEngine(f"{base_url} serves no engine metrics we know ({'; '.join(tried)}){hint}")


def total(scrapes: list[Scrape]) -> Scrape:
    """Replicas of one version as one engine."""
    out = Scrape(scrapes[0].engine if scrapes else "none")
    for s in scrapes:
        out.requests += s.requests
        if s.failures is not None:
            out.failures = (out.failures or 0.0) + s.failures
        out.latency, out.ttft = out.latency.add(s.latency), out.ttft.add(s.ttft)
        if s.queue is not None:
            out.queue = (out.queue or Histogram()).add(s.queue)
        for gauge in ("running", "waiting"):
            if getattr(s, gauge) is not None:
                setattr(out, gauge, (getattr(out, gauge) or 0.0) + getattr(s, gauge))
    return out


def figures(before: Scrape, after: Scrape) -> dict[str, Any]:
    """What happened inside the engine between two scrapes, as the analysis reads it. A
    counter that went down means the engine restarted in between: its `after` is all there is."""
    restarted = after.requests < before.requests
    base = Scrape(after.engine) if restarted else before
    latency, ttft = after.latency.add(base.latency, -1), after.ttft.add(base.ttft, -1)
    queue = after.queue.add(base.queue or Histogram(), -1) if after.queue is not None else None
    failures = None if after.failures is None else after.failures - (base.failures or 0.0)
    return {
        "engine": after.engine,
        "engine_requests": int(round(after.requests - base.requests)),
        "engine_failures": None if failures is None else int(round(failures)),
        "engine_p95_latency_s": latency.quantile(0.95),
        "engine_p95_ttft_s": ttft.quantile(0.95),
        "engine_mean_queue_s": queue.mean() if queue is not None else None,
        "engine_running": after.running,
        "engine_waiting": after.waiting,
    }


class Watch:
    """Scrapes the replicas of one version at the start and the end of a step. A scrape that
    fails leaves the step's engine figures out (the gateway's own still decide)."""

    def __init__(self, backends: list) -> None:
        self.backends = backends
        self.start = self._scrape()

    def _scrape(self) -> Scrape | None:
        try:
            return total([scrape(b.base_url, b.api_key) for b in self.backends]) if self.backends else None
        except (httpx.HTTPError, UnknownEngine, ValueError):
            return None

    def figures(self) -> dict[str, Any]:
        end = self._scrape()
        if self.start is None or end is None:
            return {}
        return figures(self.start, end)
