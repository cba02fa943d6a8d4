"""The canary controller: progressive traffic shifting with analysis at every step.

Semantics of Argo Rollouts / Flagger, driven from params (`canary:`): for each weight step
the gateway sends that share of traffic to the canary; once the canary has answered
`step_requests` requests (and `interval_s` has passed), the step is analysed by the pure
`serving.analysis.decide_canary` over what was collected: the gateway's per-backend error
rate (a 4xx only the canary gave included) and p95 latency for this step, golden-prompt exact
match (absolute, and prompt by prompt against stable's), and agreement with stable on shadowed
prompts (reported only). `rollout_action` then advances, promotes (canary becomes stable) or rolls
back (canary removed; stable keeps all traffic).

With no real users (the embedded default), the controller drives synthetic traffic through
the gateway with the real OpenAI client; every client-visible error is counted, and there
must be none: canary failures are retried on stable by the gateway.
"""

from __future__ import annotations

import datetime
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipelines.config import CanaryParams
from pipelines.gates import Decision
from serving.analysis import decide_canary, rollout_action
from serving.canary import probe
from serving.client import client
from serving.engine_metrics import Watch
from serving.gateway import Backend, Gateway, shadow_agreement


@dataclass
class StepReport:
    weight: int
    canary: dict
    stable: dict
    decision: Decision
    client_requests: int
    client_errors: int
    at: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))

    def as_dict(self) -> dict:
        return {
            "at": self.at,
            "weight": self.weight,
            "canary": self.canary,
            "stable": self.stable,
            "passed": self.decision.passed,
            "reasons": self.decision.reasons,
            "client_requests": self.client_requests,
            "client_errors": self.client_errors,
        }


@dataclass
class RolloutResult:
    outcome: str  # "promoted" | "rolled_back" | "shadowed" (strategy shadow: compared, never promoted)
    steps: list[StepReport] = field(default_factory=list)

    @property
    def client_errors(self) -> int:
        return sum(s.client_errors for s in self.steps)

    @property
    def reasons(self) -> list[str]:
        return [r for s in self.steps for r in s.decision.reasons]

    def summary(self) -> str:
        lines = [f"canary {self.outcome} after {len(self.steps)} step(s); client-visible errors: {self.client_errors}"]
        for s in self.steps:
            verdict = "ok" if s.decision.passed else "FAILED: " + "; ".join(s.decision.reasons)
            c = s.canary
            lines.append(
                f"  {s.weight:>3}% canary: {c.get('requests', 0)} req, error rate {fmt(c.get('error_rate'))}, "
                f"p95 {fmt_s(c.get('p95_latency_s'))} vs stable {fmt_s(s.stable.get('p95_latency_s'))}, "
                f"golden EM {fmt(c.get('exact_match'))}, agreement {fmt(c.get('agreement'))} (reported) -> {verdict}"
            )
        return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


def drive_traffic(
    base_url: str, model: str, prompts: list[str], done: Callable[[], bool], max_requests: int, max_tokens: int,
    concurrency: int = 4, api_key: str | None = None,
) -> tuple[int, int]:
    """Synthetic users: send prompts through the gateway (with its `api_key`, if it needs one)
    until `done()` or `max_requests`. Returns (requests sent, client-visible errors)."""
    api = client(base_url, api_key=api_key, timeout=60)
    counter = itertools.count()
    lock = threading.Lock()
    sent = errors = 0

    def user() -> None:
        nonlocal sent, errors
        while not done():
            n = next(counter)
            if n >= max_requests:
                return
            try:
                api.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[n % len(prompts)]}], max_tokens=max_tokens, temperature=0,
                    extra_headers={"cache-control": "no-cache"},  # evidence for the analysis: a cached answer shows nothing
                )
                ok = True
            except Exception:  # a client-visible failure: exactly what the gateway must prevent
                ok = False
            with lock:
                sent += 1
                errors += not ok

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(user)
    return sent, errors


def step_metrics(
    stats: dict, stable: Backend, canary: Backend, golden: list[tuple[str, str]], golden_stable: dict, shadow: list[str], max_tokens: int,
    engines: dict[str, dict] | None = None,
) -> tuple[dict, dict]:
    """What `decide_canary` reads about a step: the gateway's window for both versions, the
    engines' own figures over the step (`engines`, from `watch_engines`), the canary's
    golden-prompt exact match, and its agreement with stable (on mirrored real traffic when
    there was any, else on the shadowed golden prompts)."""
    engines = engines or {}
    golden_canary = probe({"canary": v1(canary)}, golden, max_tokens, api_key=canary.api_key)["canary"]
    c, s = stats["canary"], stats["stable"]
    canary_metrics = {
        "requests": c["requests"], "failures": c["failures"], "error_rate": c["error_rate"], "p95_latency_s": c["p95_latency_s"],
        "exact_match": golden_canary["exact_match"], "golden_correct": golden_canary.get("golden_correct"),
        "client_error_rate": c.get("client_error_rate"), "refused_valid": c.get("refused_valid", 0),
    }
    if c.get("agreement") is not None:
        canary_metrics["agreement"] = c["agreement"]
        canary_metrics["mirrored_compared"] = c["mirrored_compared"]
    elif shadow:
        canary_metrics["agreement"] = shadow_agreement(stable, canary, shadow, max_tokens)
    stable_metrics = {
        "requests": s["requests"], "failures": s["failures"], "p95_latency_s": s["p95_latency_s"], "client_error_rate": s.get("client_error_rate"),
        "exact_match": golden_stable["exact_match"], "golden_correct": golden_stable.get("golden_correct"),
    }
    canary_metrics.update(engines.get("canary", {}))
    stable_metrics.update(engines.get("stable", {}))
    return canary_metrics, stable_metrics


def watch_engines(gateway) -> dict[str, Watch]:
    """Start scraping both versions' engines for a step (before its traffic and probes)."""
    return {"stable": Watch(gateway.stable_backends), "canary": Watch(gateway.canary_backends)}


def engine_figures(watches: dict[str, Watch]) -> dict[str, dict]:
    """The engines' figures since `watch_engines`, scraped now, before this analysis' golden
    probes go straight to the canary (a step that needs more evidence counts the earlier
    analysis' probes too: 20-odd unloaded requests among hundreds)."""
    return {role: w.figures() for role, w in watches.items()}


def merge_windows(before: dict, after: dict) -> dict:
    """One step's statistics over two windows: counts add up, latency is the later window's."""
    merged = dict(after)
    for role in ("stable", "canary"):
        a, b = before.get(role), after.get(role)
        if not a or not b:
            continue
        m = dict(b)
        for key in ("requests", "failures", "client_errors", "refused_valid", "mirrored_compared"):
            m[key] = (a.get(key) or 0) + (b.get(key) or 0)
        m["error_rate"] = m["failures"] / m["requests"] if m["requests"] else None
        m["client_error_rate"] = m["client_errors"] / m["requests"] if m["requests"] else None
        for key in ("p50_latency_s", "p95_latency_s", "agreement"):
            m[key] = b.get(key) if b.get(key) is not None else a.get(key)
        merged[role] = m
    return merged


def mirrored_release(
    gateway, gateway_url: str, canary: Backend, golden: list[tuple[str, str]], golden_stable: dict, policy: CanaryParams,
    max_tokens: int, gateway_api_key: str | None, top_up_concurrency: int,
) -> RolloutResult:
    """blue_green and shadow: the candidate takes no client traffic; a copy of what stable
    answers is mirrored to it and the answers compared, for `step_requests` requests. Then one
    analysis: blue_green promotes on a pass (the caller switches all traffic at once), shadow
    only reports (outcome "shadowed"); a failure rolls back either way."""
    stable = gateway.stable
    gateway.set_mirror(True)
    gateway.window()
    watches = watch_engines(gateway)
    started = time.monotonic()

    def done() -> bool:
        return gateway.canary_requests() >= policy.step_requests and time.monotonic() - started >= policy.interval_s

    sent, errors = drive_traffic(gateway_url, gateway.public_model, [p for p, _ in golden], done, 4 * policy.step_requests + 50, max_tokens, top_up_concurrency, api_key=gateway_api_key)
    # Mirrored copies finish after the answers clients got: wait a little for the stragglers.
    deadline = time.monotonic() + 30
    while gateway.canary_requests() < min(policy.step_requests, sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    window, engines = gateway.window(), engine_figures(watches)
    canary_metrics, stable_metrics = step_metrics(window, stable, canary, golden, golden_stable, [p for p, _ in golden[: policy.shadow_prompts]], max_tokens, engines)
    decision = decide_canary(canary_metrics, stable_metrics, policy)
    result = RolloutResult("rolled_back", [StepReport(0, canary_metrics, stable_metrics, decision, sent, errors)])
    gateway.set_mirror(False)
    if decision.passed and policy.strategy == "blue_green":
        result.outcome = "promoted"
    else:
        if decision.passed:
            result.outcome = "shadowed"
        gateway.remove_canary()
    return result


def v1(backend: Backend) -> tuple[str, str]:
    """(OpenAI base URL, served model name) of a backend, as the probe's clients want them."""
    return f"{backend.base_url}/v1", backend.model


def run_rollout(
    gateway: Gateway,
    gateway_url: str,
    canary: Backend,
    golden: list[tuple[str, str]],
    policy: CanaryParams,
    max_tokens: int,
    on_step: Callable[[int], None] | None = None,
    gateway_api_key: str | None = None,
    top_up_concurrency: int = 4,
) -> RolloutResult:
    """Shift traffic to `canary` step by step behind `gateway` (served at `gateway_url`, the
    OpenAI base URL). Rolls back by removing the canary; on success leaves the promotion
    itself (gateway swap, registry aliases) to the caller. `on_step(i)` runs when step i's
    weight is set, before its traffic: drills use it to break the canary mid-rollout.
    Probes send each backend its own key (`Backend.api_key`), the synthetic users send
    `gateway_api_key` to the gateway. `gateway` is the in-process `Gateway` or a running
    plane's `serving.plane_client.RemoteGateway`: on a plane, real clients' traffic counts
    too, and the synthetic users (`top_up_concurrency` of them) only top it up."""
    stable = gateway.stable
    golden_stable = probe({"stable": v1(stable)}, golden, max_tokens, api_key=stable.api_key)["stable"]
    shadow = [p for p, _ in golden[: policy.shadow_prompts]]
    traffic = [p for p, _ in golden]
    # Warm-up: a fresh process pays one-off costs (lazy initialisation, first allocations) on
    # its first requests; they say nothing about the model and must not count as its latency.
    probe({"canary": v1(canary)}, golden[:3], max_tokens, api_key=canary.api_key)
    gateway.set_canary(canary, 0.0)
    if policy.strategy != "canary":
        return mirrored_release(gateway, gateway_url, canary, golden, golden_stable, policy, max_tokens, gateway_api_key, top_up_concurrency)
    decisions: list[Decision] = []
    result = RolloutResult("rolled_back")
    for i, weight in enumerate(policy.steps):
        gateway.set_weight(weight / 100)
        gateway.window()  # start this step's statistics afresh
        watches = watch_engines(gateway)
        if on_step:
            on_step(i)
        started = time.monotonic()

        def done() -> bool:
            return gateway.canary_requests() >= policy.step_requests and time.monotonic() - started >= policy.interval_s

        # Enough synthetic requests for the canary to see step_requests at this weight, with margin.
        budget = 4 * math.ceil(policy.step_requests * 100 / weight) + 50
        sent, errors = drive_traffic(gateway_url, gateway.public_model, traffic, done, budget, max_tokens, top_up_concurrency, api_key=gateway_api_key)
        stats = gateway.window()
        canary_metrics, stable_metrics = step_metrics(stats, stable, canary, golden, golden_stable, shadow, max_tokens, engine_figures(watches))
        decision = decide_canary(canary_metrics, stable_metrics, policy)
        while decision.outcome == "continue":
            # The error-rate test has not decided: same weight, more evidence (it fails the
            # step by itself at its cap, so this ends).
            started = time.monotonic()
            sent_more, errors_more = drive_traffic(gateway_url, gateway.public_model, traffic, done, budget, max_tokens, top_up_concurrency, api_key=gateway_api_key)
            sent, errors = sent + sent_more, errors + errors_more
            window = gateway.window()
            if not (window["canary"] or {}).get("requests"):  # no new evidence can come: undecided fails (the safe side)
                break
            stats = merge_windows(stats, window)
            canary_metrics, stable_metrics = step_metrics(stats, stable, canary, golden, golden_stable, shadow, max_tokens, engine_figures(watches))
            decision = decide_canary(canary_metrics, stable_metrics, policy)
        decisions.append(decision)
        result.steps.append(StepReport(weight, canary_metrics, stable_metrics, decision, sent, errors))
        action = rollout_action(decisions, i, policy)
        if action == "rollback":
            gateway.remove_canary()
            return result
        if action == "promote":
            result.outcome = "promoted"
            return result
    return result
