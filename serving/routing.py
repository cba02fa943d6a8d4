"""The gateway's routing state: which version is stable, which is the canary and with what share
of traffic, the replicas serving each, and what each version did (the statistics the canary
controller analyses). Plain data behind one lock, driven from any thread; no I/O here.

A version is a `Slot` of one or more replicas (`Backend`s). A request is routed and attributed
when it is dispatched, after any wait in the gateway's queue: the slot, its role (stable or
canary) and the statistics window it counts in are fixed then, so a promotion or a new window
while it is in flight does not move its record to another version. A slot that leaves the
routing (promoted away, rolled back) gives no replica to anyone from that moment (`SlotRetired`):
a request that was about to be sent there goes to the current stable instead, so a drain that
waits for its replicas' requests in flight to finish can then stop them. Within a slot, each
request goes to the healthy replica with the fewest requests outstanding (ties in turn); a
replica the supervisor took out of rotation gets none.

With `mirror` on, requests stable answers are also sent to the canary in the background (the
client gets stable's answer only): blue-green's analysis before the switch, and shadow
releases, see the candidate on real traffic without any client depending on it.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_SAMPLES = 10_000  # per version and window: enough for a stable p95, bounded memory
# Bucket bounds, shared with the rules' renderer (monitoring/render.py): a latency SLO threshold
# must be one of them, since the share of requests under it is read off a bucket.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# What a backend is blamed for, and what a canary's request is retried on stable after.
FAILURES = frozenset({"server_error", "overloaded", "connection_error", "timeout", "refused_valid_request"})
# A canary's 4xx that stable, asked the same request, answered: the canary's fault (a smaller
# context, a changed template), not the client's. A 4xx both give is the request's own.
REFUSED_VALID = "refused_valid_request"
# The caller's key tier (serving.keys; "untiered" without a keys file, or for the gateway's own
# key), set once per request by the gateway and read wherever that request is recorded: its
# attempts, retries, a stream's end, a mirrored copy (a task started from the request copies
# it). A context variable, so the tier does not have to travel through every call on the way.
UNTIERED = "untiered"
CALLER_TIER: ContextVar[str] = ContextVar("caller_tier", default=UNTIERED)


@dataclass(frozen=True)
class Backend:
    """One OpenAI-compatible server: `base_url` is its root (http://host:port; a trailing /v1 is
    dropped), `model` the name it serves, `api_key` the Bearer key it requires, if any, and
    `version` the registered model version it serves (None when the caller does not track one)."""

    name: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    version: str | None = None

    def __post_init__(self) -> None:
        root = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", root[: -len("/v1")] if root.endswith("/v1") else root)

    def describe(self) -> dict[str, str | None]:
        return {"name": self.name, "base_url": self.base_url, "model": self.model, "version": self.version}


def version_of(backend: Backend) -> str:
    """The registered version a replica serves, else its served model name (distinct per
    version wherever this project starts the engines): the `version` label of its series."""
    return backend.version if backend.version is not None else f"model:{backend.model}"


# --- statistics: plain counters the controller reads without scraping Prometheus ----------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (as serving.canary computes p95)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def classify(status: int) -> str:
    """The outcome of an answered request: 4xx are the caller's fault, 5xx the backend's, and so
    is 429 (a full queue says the backend cannot carry its share, not that the request was bad)
    and so are 401/403 (a misconfigured backend key: a canary with the wrong key is retried on
    stable and counted against itself, never blamed on the client)."""
    if status < 400:
        return "ok"
    if status == 429:
        return "overloaded"
    if status in (401, 403):  # the client passed the gateway's check: the gateway's key to the backend is wrong
        return "server_error"
    return "client_error" if status < 500 else "server_error"


@dataclass
class Stats:
    """What one version did. Latencies are of successful answers only (a timeout's "latency" is
    the timeout); failures show up in error_rate instead."""

    requests: int = 0
    failures: int = 0
    client_errors: int = 0  # 4xx the request itself caused (stable refused it too, or stable gave it)
    refused_valid: int = 0  # 4xx for requests stable answered: counted in failures as well
    # This version's failures that were retried: a canary's on stable, stable's own dropped
    # connections on a new connection or another replica.
    retried_to_stable: int = 0
    retries_served: int = 0  # requests this version answered after another attempt failed
    compared: int = 0  # mirrored deterministic requests whose answer was compared with stable's
    agreed: int = 0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def record(self, outcome: str, latency_s: float | None, retry: bool) -> None:
        self.requests += 1
        self.failures += outcome in FAILURES
        self.client_errors += outcome == "client_error"
        self.refused_valid += outcome == REFUSED_VALID
        self.retries_served += retry
        if outcome == "ok" and latency_s is not None:
            self.latencies_s.append(latency_s)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "requests": self.requests,
            "failures": self.failures,
            # None, not 0, without requests: no evidence must not pass an error-rate check.
            "error_rate": self.failures / self.requests if self.requests else None,
            "client_errors": self.client_errors,
            "client_error_rate": self.client_errors / self.requests if self.requests else None,
            "refused_valid": self.refused_valid,
            "retried_to_stable": self.retried_to_stable,
            "retries_served": self.retries_served,
            "p50_latency_s": percentile(lat, 0.50),
            "p95_latency_s": percentile(lat, 0.95),
            "mirrored_compared": self.compared,
            "agreement": self.agreed / self.compared if self.compared else None,
        }


@dataclass
class Slot:
    """A version's replicas, with its statistics since it joined (`total`) and since the last
    window()."""

    backends: list[Backend]
    total: Stats = field(default_factory=Stats)
    window: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("a version needs at least one replica")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must differ: {names}")

    @property
    def backend(self) -> Backend:
        """The first replica: the version's name, model and URL for callers with one replica."""
        return self.backends[0]


@dataclass(frozen=True)
class Target:
    """A version as it stood when a request was dispatched to it: its slot, its role then, and
    the statistics (since it joined, this window) open then. The request is recorded there
    however the gateway changes while it is in flight (a promotion, a new window)."""

    slot: Slot
    role: str  # "stable" | "canary" | "shadow" (a mirrored copy)
    stats: tuple[Stats, Stats]

    @property
    def backend(self) -> Backend:
        return self.slot.backend


class Metrics:
    """The gateway's Prometheus series, in a registry of their own so several apps (tests) coexist.

    Per model version (`version`: the registered version, see `version_of`) and per key tier
    (`tier`): what Prometheus' recording rules (monitoring/) aggregate into the service levels,
    the cost view and canary vs stable. `role` is the version's part when the request was
    dispatched (stable, canary, shadow). The cache counter has a tier but no version: a hit is
    answered by no version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["role", "backend", "version", "tier"]
        self.requests = Counter("gateway_backend_requests", "Requests sent to a backend, by outcome.", [*labels, "outcome"], registry=self.registry)
        self.latency = Histogram(
            "gateway_backend_latency_seconds", "Latency of successful backend answers (a stream until its end).", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Streams: from sending to the backend to its first event, as the gateway sees it (the engines report their own for every request).",
            ["role", "version", "tier"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter("gateway_tokens", "Tokens of answered requests, from the answer's usage (a stream's when it asked for it), by kind: prompt or completion.", ["role", "version", "tier", "kind"], registry=self.registry)
        self.retries = Counter("gateway_retries", "Failures retried: a canary's on stable, stable's dropped connections on a new connection or replica.", ["backend"], registry=self.registry)
        self.lost = Counter("gateway_client_visible_errors", "Requests the client saw fail (every retry failed too).", registry=self.registry)
        self.weight = Gauge("gateway_canary_weight", "Share of requests routed to the canary.", registry=self.registry)
        self.outstanding = Gauge("gateway_outstanding_requests", "Requests in flight on a replica.", ["backend"], registry=self.registry)
        self.healthy = Gauge("gateway_replica_healthy", "1 while a replica is in rotation, 0 while it is out (restarting, draining).", ["backend"], registry=self.registry)
        self.cache = Counter("gateway_cache_requests", "Cacheable requests by result: hit (answered from the cache) or miss.", ["result", "tier"], registry=self.registry)
        self.refused = Counter("gateway_refused_requests", "Requests refused before any backend: QueueFull, RateLimited, BadPriority.", ["reason"], registry=self.registry)
        self.limits_unavailable = Counter(
            "gateway_rate_limits_unavailable", "Keyed requests whose rate limits could not be read (Redis down), by what the gateway did: served them (open) or refused them (closed).",
            ["mode"], registry=self.registry,
        )
        self.queue = Gauge("gateway_queue", "The admission queue: in_flight, waiting, and its running totals (admitted, rejected_full, dropped_disconnected, cancelled; admitted_by_age: of admitted, those served ahead of higher priorities after waiting serve.queue_max_overtake_s).", ["state"], registry=self.registry)
        self.queue_wait = Gauge("gateway_queue_wait_p95_seconds", "p95 wait in the queue by priority (recent requests).", ["priority"], registry=self.registry)
        self.queue_wait_seconds = Histogram("gateway_queue_wait_seconds", "Time a request waited in the admission queue for its slot, by key tier.", ["tier"], buckets=QUEUE_WAIT_BUCKETS, registry=self.registry)

    def observe_queue(self, stats: dict[str, Any]) -> None:
        for state in ("in_flight", "waiting", "admitted", "rejected_full", "dropped_disconnected", "cancelled", "admitted_by_age"):
            self.queue.labels(state).set(stats[state])
        for priority, wait in stats["wait_s"].items():
            if wait["p95"] is not None:
                self.queue_wait.labels(str(priority)).set(wait["p95"])


class NoCanaryError(LookupError):
    """A canary operation was asked for while no canary is set."""


class SlotRetired(LookupError):
    """The version a request was routed to left the routing before a replica was taken: the
    request must be routed again (to the current stable)."""


def slot_of(backends: Backend | list[Backend]) -> Slot:
    return Slot(list(backends) if isinstance(backends, (list, tuple)) else [backends])


class Gateway:
    """Routing state and statistics, safe to drive from any thread while the app serves."""

    def __init__(
        self, stable: Backend | list[Backend], canary: Backend | list[Backend] | None = None, canary_weight: float = 0.0,
        seed: int | None = None, public_model: str | None = None,
    ) -> None:
        self._stable = slot_of(stable)
        self.public_model = public_model or self._stable.backend.model
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # seeded: a test or a drill routes the same way every run
        self._canary: Slot | None = None
        self._weight = 0.0
        self.mirror = False
        self._outstanding: dict[str, int] = {}
        self._down: set[str] = set()
        self._turn = 0
        for b in self._stable.backends:
            self.metrics.healthy.labels(b.name).set(1)
        if canary is not None:
            self.set_canary(canary, canary_weight)
        elif canary_weight:
            raise NoCanaryError(f"canary_weight={canary_weight} needs a canary")

    # --- traffic control ---

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def stable(self) -> Backend:
        return self._stable.backend

    @property
    def canary(self) -> Backend | None:
        slot = self._canary
        return None if slot is None else slot.backend

    @property
    def stable_backends(self) -> list[Backend]:
        return list(self._stable.backends)

    @property
    def canary_backends(self) -> list[Backend]:
        slot = self._canary
        return [] if slot is None else list(slot.backends)

    def set_canary(self, backend: Backend | list[Backend], weight: float = 0.0) -> None:
        """Put `backend` (one replica or several) beside stable, replacing any canary, with fresh
        statistics."""
        check_weight(weight)
        slot = slot_of(backend)
        with self._lock:
            clash = {b.name for b in slot.backends} & {b.name for b in self._stable.backends}
            if clash:
                raise ValueError(f"the canary needs names other than stable's ({', '.join(sorted(clash))}): statistics are kept by name")
            self._canary = slot
            self._set_weight(weight)
        for b in slot.backends:
            self.metrics.healthy.labels(b.name).set(0 if b.name in self._down else 1)

    def set_weight(self, weight: float) -> None:
        check_weight(weight)
        with self._lock:
            if weight > 0 and self._canary is None:
                raise NoCanaryError(f"cannot send {weight:g} of the traffic to a canary: none is set")
            self._set_weight(weight)

    def set_mirror(self, on: bool) -> None:
        with self._lock:
            if on and self._canary is None:
                raise NoCanaryError("cannot mirror traffic to a canary: none is set")
            self.mirror = on

    def remove_canary(self) -> Backend | None:
        """Roll back: stable takes all traffic. Returns the removed canary (for the caller to stop)."""
        with self._lock:
            slot, self._canary = self._canary, None
            self._set_weight(0.0)
            self.mirror = False
        return None if slot is None else slot.backend

    def promote_canary(self) -> Backend:
        """The canary becomes stable, keeping its statistics; returns the old stable to stop
        (all its replicas: `retired`)."""
        with self._lock:
            if self._canary is None:
                raise NoCanaryError("no canary to promote")
            old, self._stable, self._canary = self._stable, self._canary, None
            self._set_weight(0.0)
            self.mirror = False
            self.retired = list(old.backends)
        return old.backend

    def set_stable_backends(self, backends: list[Backend]) -> None:
        """Scale stable: its replicas are now `backends` (statistics kept)."""
        with self._lock:
            self._stable.backends[:] = backends

    def set_canary_backends(self, backends: list[Backend]) -> None:
        """Scale the canary (before its promotion: the new stable has its full count of
        replicas before the old one stops)."""
        with self._lock:
            if self._canary is None:
                raise NoCanaryError("no canary to scale")
            self._canary.backends[:] = backends
        for b in backends:
            self.metrics.healthy.labels(b.name).set(0 if self.is_down(b.name) else 1)

    def _set_weight(self, weight: float) -> None:
        self._weight = weight
        self.metrics.weight.set(weight)

    # --- replicas: health and load ---

    def set_healthy(self, name: str, healthy: bool) -> None:
        """The supervisor takes a replica out of rotation (False) and puts it back (True)."""
        with self._lock:
            (self._down.discard if healthy else self._down.add)(name)
        self.metrics.healthy.labels(name).set(1 if healthy else 0)

    def replace_replica(self, old_name: str, new: Backend) -> bool:
        """Swap a replica for its replacement (a restarted process on a new port), in whichever
        version holds it. False if no version holds `old_name` any more (promoted away)."""
        with self._lock:
            for slot in (self._stable, self._canary):
                if slot is None:
                    continue
                for i, b in enumerate(slot.backends):
                    if b.name == old_name:
                        slot.backends[i] = new
                        self._down.discard(new.name)
                        return True
        return False

    def acquire(self, slot: Slot, exclude: frozenset[str] = frozenset()) -> Backend | None:
        """The healthy replica of `slot` with the fewest requests outstanding (ties in turn), now
        counted as busy with one more; None if every replica is down or excluded. Raises
        SlotRetired once `slot` is no longer stable or canary: checked under the same lock as a
        promotion or rollback, so no request reaches a version after it left the routing."""
        with self._lock:
            if slot is not self._stable and slot is not self._canary:
                raise SlotRetired(f"version {slot.backend.version or slot.backend.name} left the routing")
            ready = [b for b in slot.backends if b.name not in self._down and b.name not in exclude]
            if not ready:
                return None
            self._turn += 1
            ready = ready[self._turn % len(ready):] + ready[: self._turn % len(ready)]
            chosen = min(ready, key=lambda b: self._outstanding.get(b.name, 0))
            self._outstanding[chosen.name] = self._outstanding.get(chosen.name, 0) + 1
            n = self._outstanding[chosen.name]
        self.metrics.outstanding.labels(chosen.name).set(n)
        return chosen

    def release(self, backend: Backend) -> None:
        with self._lock:
            n = self._outstanding[backend.name] = max(0, self._outstanding.get(backend.name, 0) - 1)
        self.metrics.outstanding.labels(backend.name).set(n)

    def outstanding(self, names: list[str] | None = None) -> int:
        """Requests in flight on the named replicas (all, by default): a drain waits for 0."""
        with self._lock:
            return sum(v for k, v in self._outstanding.items() if names is None or k in names)

    def is_down(self, name: str) -> bool:
        with self._lock:
            return name in self._down

    # --- routing and recording (called by the proxy) ---

    def route(self) -> Target:
        """The version a request goes to now, by the canary's weight: called when the request is
        dispatched (after its wait in the queue), so it is attributed where it is served."""
        with self._lock:
            canary = self._canary
            # random() < 1 always and < 0 never, so weights 1 and 0 are exact.
            if canary is not None and self._rng.random() < self._weight:
                return Target(canary, "canary", (canary.total, canary.window))
            return Target(self._stable, "stable", (self._stable.total, self._stable.window))

    def stable_target(self) -> Target:
        """The current stable, for a retry or a fallback: stable as it is now, not as it was when
        the request was first routed (a promotion may have happened since)."""
        with self._lock:
            return Target(self._stable, "stable", (self._stable.total, self._stable.window))

    def mirror_target(self) -> Target | None:
        """Where a copy of a request stable answered goes while mirroring is on."""
        with self._lock:
            canary = self._canary
            if not self.mirror or canary is None:
                return None
            return Target(canary, "shadow", (canary.total, canary.window))

    def record(self, target: Target, outcome: str, latency_s: float | None, retry: bool = False, backend: Backend | None = None) -> None:
        with self._lock:
            for stats in target.stats:
                stats.record(outcome, latency_s, retry)
        chosen = backend or target.backend
        labels = (target.role, chosen.name, version_of(chosen), CALLER_TIER.get())
        self.metrics.requests.labels(*labels, outcome).inc()
        if outcome == "ok" and latency_s is not None:
            self.metrics.latency.labels(*labels).observe(latency_s)

    def record_tokens(self, target: Target, usage: Any, backend: Backend | None = None) -> None:
        """The tokens an answer's `usage` reports (OpenAI's shape), for the cost view per tier."""
        if not isinstance(usage, dict):
            return
        labels = (target.role, version_of(backend or target.backend), CALLER_TIER.get())
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self.metrics.tokens.labels(*labels, kind).inc(n)

    def record_first_token(self, target: Target, seconds: float, backend: Backend | None = None) -> None:
        self.metrics.ttft.labels(target.role, version_of(backend or target.backend), CALLER_TIER.get()).observe(seconds)

    def record_agreement(self, target: Target, same: bool) -> None:
        with self._lock:
            for stats in target.stats:
                stats.compared += 1
                stats.agreed += same

    def record_retry(self, target: Target, backend: Backend | None = None) -> None:
        with self._lock:
            for stats in target.stats:
                stats.retried_to_stable += 1
        self.metrics.retries.labels((backend or target.backend).name).inc()

    # --- what the canary controller reads ---

    def snapshot(self) -> dict[str, Any]:
        """Statistics since each version joined: {"stable": {...}, "canary": {...} or None, ...}."""
        with self._lock:
            return self._report(lambda s: s.total)

    def window(self) -> dict[str, Any]:
        """Statistics since the previous window() call (same shape as snapshot()), then start a new
        window: a controller calls it when a weight step begins and again when it ends."""
        with self._lock:
            report = self._report(lambda s: s.window)
            for slot in (self._stable, self._canary):
                if slot is not None:
                    slot.window = Stats()
            return report

    def canary_requests(self) -> int:
        """Requests the canary got in the current window (0 without a canary)."""
        with self._lock:
            return 0 if self._canary is None else self._canary.window.requests

    def _report(self, pick) -> dict[str, Any]:
        def one(slot: Slot | None) -> dict[str, Any] | None:
            if slot is None:
                return None
            replicas = [{**b.describe(), "healthy": b.name not in self._down, "outstanding": self._outstanding.get(b.name, 0)} for b in slot.backends]
            return {**slot.backend.describe(), "replicas": replicas, **pick(slot).summary()}

        return {"public_model": self.public_model, "canary_weight": self._weight, "mirror": self.mirror, "stable": one(self._stable), "canary": one(self._canary)}


def check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the canary weight is a share of traffic between 0 and 1, got {weight}")
