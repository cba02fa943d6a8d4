"""Canary probing: send the same held-out golden prompts to the candidate and the champion
through the real OpenAI client, and summarise what each did, prompt by prompt (so the analysis
can pair them: where the two answer differently, the reference says who is right). The
promote/rollback decision is `serving.analysis.decide_canary`, a pure function of these summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.formats import chat_messages

from serving.client import chat_once, client
from serving.routing import percentile


@dataclass
class ProbeStats:
    requests: int = 0
    errors: int = 0
    correct: int = 0
    latencies_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    outcomes: list[bool] = field(default_factory=list)  # per prompt, in order: answered exactly (False if unanswered)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        return {
            "requests": self.requests,
            "error_rate": self.errors / max(self.requests, 1),
            # An unanswered golden prompt counts as wrong: a canary that cannot answer is not exact.
            "exact_match": self.correct / max(self.requests, 1),
            "p50_latency_s": percentile(lat, 0.5),
            "p95_latency_s": percentile(lat, 0.95),
            "errors_seen": self.error_samples[:3],
            "golden_correct": list(self.outcomes),
        }


def golden_prompts(test_file: Path, n: int) -> list[tuple[str, str]]:
    """Held-out (never trained on) prompts with their reference answers: the first n test
    conversations that are one user turn and one plain assistant answer. A probe sends the
    prompt alone, so a conversation with a system prompt, history or tool calls (whose answer
    depends on what the probe would leave out) is not a golden prompt."""
    out = []
    for cell in pd.read_parquet(test_file)["messages"]:
        m = chat_messages(cell)
        if len(m) == 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant" and not m[1].get("tool_calls") and m[1]["content"]:
            out.append((m[0]["content"], m[1]["content"]))
            if len(out) == n:
                break
    return out


def probe(backends: dict[str, tuple[str, str]], prompts: list[tuple[str, str]], max_tokens: int, api_key: str | None = None) -> dict[str, dict]:
    """`backends` maps a label to (base_url, served model name). Requests alternate between the
    backends prompt by prompt, so both see the same load at the same time."""
    clients = {label: (client(url, api_key=api_key), model) for label, (url, model) in backends.items()}
    stats = {label: ProbeStats() for label in backends}
    for prompt, expected in prompts:
        for label, (c, model) in clients.items():
            s = stats[label]
            s.requests += 1
            try:
                text, latency = chat_once(c, model, prompt, max_tokens)
            except Exception as exc:  # any failure of the backend counts against it, never crashes the probe
                s.errors += 1
                s.error_samples.append(f"{type(exc).__name__}: {exc}"[:200])
                s.outcomes.append(False)
                continue
            s.latencies_s.append(latency)
            right = text.strip() == expected.strip()
            s.correct += right
            s.outcomes.append(right)
    return {label: s.summary() for label, s in stats.items()}
