"""Fault injection for the canary controller, with real server processes behind a real
gateway and the real OpenAI client as the users. Each drill ends with stable still serving
and no client-visible error."""

from __future__ import annotations

import pytest

from pipelines.config import CanaryParams
from serving.background import ThreadedServer
from serving.client import chat_once, client
from serving.gateway import Backend, create_gateway
from serving.launcher import free_port, launch
from serving.rollout import run_rollout

PROMPTS = [f"Reverse the list:\n{a} {b} {c}" for a, b, c in [(1, 2, 3), (4, 5, 6), (7, 8, 9), (3, 1, 4), (1, 5, 9), (2, 6, 5)]]
# p95 over a handful of requests on a shared 2-core machine is noisy: the bound is loose here,
# and the slow-canary drill adds a delay far beyond it.
POLICY = CanaryParams(steps=[25, 100], step_requests=4, error_rate_effect=0.5, golden_prompts=6, shadow_prompts=3, min_exact_match=0.9, max_latency_ratio=5.0)
MAX_TOKENS = 8


def serve(model_dir: str, name: str, tmp_path, *drill: str):
    return launch("cpu", model_dir, name, "127.0.0.1", free_port(), tmp_path / f"{name}.log", 60, extra_args=list(drill), env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def stable(model_dir, tmp_path_factory):
    with serve(model_dir, "stable", tmp_path_factory.mktemp("stable")) as server:
        yield server


@pytest.fixture(scope="module")
def golden(stable):
    """The untrained model's own greedy answers are the reference: the same weights must match them."""
    api = client(stable.base_url)
    return [(p, chat_once(api, "stable", p, MAX_TOKENS)[0]) for p in PROMPTS]


def rollout(stable_server, canary_server, golden, on_step=None):
    app = create_gateway(Backend("stable", stable_server.root_url, "stable"), public_model="reverse-digits", seed=0)
    with ThreadedServer(app) as gw:
        result = run_rollout(app.state.gateway, gw.base_url, Backend("canary", canary_server.root_url, "canary"), golden, POLICY, MAX_TOKENS, on_step=on_step)
        # After the rollout the gateway still answers users.
        answer, _ = chat_once(client(gw.base_url), "reverse-digits", PROMPTS[0], MAX_TOKENS)
        return result, app.state.gateway, answer


def test_good_canary_is_promoted(model_dir, stable, golden, tmp_path):
    with serve(model_dir, "canary", tmp_path) as canary:
        result, gateway, answer = rollout(stable, canary, golden)
    assert result.outcome == "promoted", result.summary()
    assert [s.weight for s in result.steps] == [25, 100]
    assert all(s.canary["requests"] >= POLICY.step_requests for s in result.steps)
    # Each engine's own figures (its /metrics, scraped at the step's start and end) are in the analysis.
    first = result.steps[0]
    assert first.canary["engine"] == first.stable["engine"] == "cpu"
    assert first.canary["engine_requests"] >= first.canary["requests"] and first.stable["engine_requests"] >= first.stable["requests"] > 0
    assert any(c.metric == "engine_p95_ttft_ratio" and c.passed for c in first.decision.checks), result.summary()
    assert result.client_errors == 0 and answer == golden[0][1]


@pytest.fixture(scope="module")
def other_model_dir(model_dir, tmp_path_factory):
    """Another model with the same tokenizer: other weights (another seed), other answers."""
    from transformers import AutoTokenizer

    from pipelines.bootstrap import build_model
    from pipelines.config import ModelParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(ModelParams(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seed=7), tokenizer)
    path = tmp_path_factory.mktemp("other-model")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def test_a_better_candidate_that_answers_differently_is_promoted(other_model_dir, stable, tmp_path):
    """The references are the candidate's own answers: it is right on every golden prompt, the
    champion (other weights) on few, and the two rarely say the same thing. Agreement with the
    champion is reported; correctness decides.
    Seen red: with the old `agreement >= min_agreement` check restored in decide_canary, this
    candidate was rolled back at its first (25 %) step: "golden EM 1.00, agreement 0.00 -> FAILED:
    agreement = 0.0000 vs >= 0.8000: FAILED by 0.8000"."""
    with serve(other_model_dir, "canary", tmp_path) as canary:
        api = client(canary.base_url)
        references = [(p, chat_once(api, "canary", p, MAX_TOKENS)[0]) for p in PROMPTS]
        result, gateway, answer = rollout(stable, canary, references)
    assert result.outcome == "promoted", result.summary()
    first = result.steps[0]
    assert first.canary["exact_match"] == 1.0 and first.stable["exact_match"] < 0.5, "the candidate is the better one"
    assert first.canary["agreement"] < 0.5, "and it answers differently"
    assert any(c.metric == "agreement" and c.passed for c in first.decision.checks)
    assert result.client_errors == 0


def test_canary_answering_500s_is_rolled_back(model_dir, stable, golden, tmp_path):
    with serve(model_dir, "canary", tmp_path, "--fault-error-rate", "1.0") as canary:
        result, gateway, answer = rollout(stable, canary, golden)
    assert result.outcome == "rolled_back"
    assert len(result.steps) == 1 and result.steps[0].canary["error_rate"] == 1.0
    assert result.client_errors == 0 and gateway.canary is None and answer == golden[0][1]


def test_canary_killed_mid_rollout_is_rolled_back(model_dir, stable, golden, tmp_path):
    with serve(model_dir, "canary", tmp_path) as canary:
        # Healthy at 25 %, killed as the weight moves to 100 %, with users' requests in flight.
        result, gateway, answer = rollout(stable, canary, golden, on_step=lambda i: canary.stop() if i == 1 else None)
    assert result.outcome == "rolled_back"
    assert [s.decision.passed for s in result.steps] == [True, False]
    assert result.steps[1].canary["error_rate"] == 1.0, "every request after the kill is the canary's failure"
    assert result.steps[1].canary["exact_match"] == 0.0, "a dead canary answers no golden prompt"
    assert result.client_errors == 0 and gateway.canary is None and answer == golden[0][1]


def test_slow_canary_is_rolled_back_on_latency(model_dir, stable, golden, tmp_path):
    with serve(model_dir, "canary", tmp_path, "--fault-delay-s", "1.0") as canary:
        result, gateway, answer = rollout(stable, canary, golden)
    assert result.outcome == "rolled_back"
    assert any(r.startswith("p95_latency_ratio") for r in result.reasons), result.summary()
    # The engine saw it too: the delay sits before the first token, and its own TTFT says so.
    assert any(r.startswith("engine_p95_ttft_ratio") for r in result.reasons), result.summary()
    assert result.steps[0].canary["engine_p95_ttft_s"] >= 1.0
    assert result.client_errors == 0 and gateway.canary is None


class ScriptedGateway:
    """The controller's view of a gateway, replaying scripted windows: the analysis logic of a
    step without servers (the drills above run it with real ones)."""

    def __init__(self, windows: list[dict]) -> None:
        self.windows, self.public_model, self.weights, self.removed = list(windows), "m", [], False
        self.stable = Backend("stable", "http://127.0.0.1:1", "s")

    stable_backends: list = []  # no engines to scrape: the scripted windows are all there is
    canary_backends: list = []

    def set_canary(self, backend, weight=0.0) -> None:
        """Attached already: the scripted windows stand for its traffic."""

    def set_weight(self, weight: float) -> None:
        self.weights.append(weight)

    def canary_requests(self) -> int:
        return 10**6

    def window(self) -> dict:
        return self.windows.pop(0)

    def remove_canary(self) -> None:
        self.removed = True


def counts(canary_failures: int, canary_requests: int = 255) -> dict:
    side = {"p95_latency_s": 0.1, "p50_latency_s": 0.1, "client_errors": 0, "mirrored_compared": 0, "agreement": None}
    return {
        "stable": {**side, "requests": 9 * canary_requests, "failures": 0, "error_rate": 0.0},
        "canary": {**side, "requests": canary_requests, "failures": canary_failures, "error_rate": canary_failures / canary_requests},
    }


def test_an_undecided_step_keeps_collecting_at_the_same_weight_until_the_error_test_decides(monkeypatch):
    import serving.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "probe", lambda backends, prompts, max_tokens, api_key=None: {k: {"exact_match": 1.0} for k in backends})
    monkeypatch.setattr(rollout_module, "drive_traffic", lambda *a, **k: (10, 0))
    policy = CanaryParams(steps=[50], shadow_prompts=0, golden_prompts=1)  # the default error-rate test: 255 a look
    # One failure in the first 255 leaves the test undecided; 255 clean ones more pass it.
    opening = {"stable": None, "canary": None}  # the window() that starts a step
    gateway = ScriptedGateway([opening, counts(1), counts(0)])
    result = run_rollout(gateway, "http://unused/v1", Backend("canary", "http://127.0.0.1:2", "c"), [("p", "a")], policy, 4)
    (step,) = result.steps
    assert result.outcome == "promoted" and gateway.weights == [0.5], "one weight, two looks"
    assert (step.canary["requests"], step.canary["failures"]) == (510, 1)
    # Failures keep coming: the test fails the step (it never stays undecided past its cap).
    gateway = ScriptedGateway([opening, counts(1), *[counts(2)] * 5])
    result = run_rollout(gateway, "http://unused/v1", Backend("canary", "http://127.0.0.1:2", "c"), [("p", "a")], policy, 4)
    assert result.outcome == "rolled_back" and gateway.removed and result.steps[0].decision.outcome == "fail"
    assert result.steps[0].canary["requests"] > 255, "decided on more than the first look"
