"""Thin helpers over the real `openai` client, the same for every engine the launcher starts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # openai's type tree takes ~0.5 s to import: only a caller that talks to a server pays it
    import openai

# The openai client refuses to start without a key; a server started without --api-key ignores
# whatever is sent, so a placeholder (vLLM's convention) stands in.
NO_KEY = "EMPTY"


def client(base_url: str, api_key: str | None = None, timeout: float = 30, max_retries: int = 0) -> openai.OpenAI:
    """An OpenAI client for `base_url` (http://host:port/v1). Retries are off by default: a
    canary must count a failed request as a failure, and a retried one would skew its latency."""
    import openai

    from serving.tls import verify_for

    verify = verify_for(base_url)  # a TLS plane this process was told to trust (serving/tls.py)
    http_client = None if verify is True else openai.DefaultHttpxClient(verify=verify)
    return openai.OpenAI(base_url=base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=max_retries, http_client=http_client)


def chat_once(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    """One greedy single-turn chat: the answer's text and the request's latency in seconds."""
    start = time.perf_counter()
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,  # greedy, so the same model and prompt give the same answer on any engine
    )
    latency = time.perf_counter() - start
    return response.choices[0].message.content or "", latency
