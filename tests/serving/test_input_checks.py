"""What the CPU server accepts, checked cheapest first, and the request fields it either supports
for real (`stop`, `seed`) or refuses by name; and one failing row of a batch failing only its
own request. One real server for the module, driven over HTTP with httpx and the openai client.

The server's prompt limit (1000 tokens) is deliberately above the tiny model's context length
(max_position_embeddings = 128), so the model's own limit is the one that binds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving.client import client
from serving.engine import stop_holdback, stop_index
from serving.server import create_app
from tests.serving.conftest import sample, scrape, wait_until

MODEL = "tiny"
MAX_NEW = 16
BODY_LIMIT = 16 * 1024
MESSAGES = [{"role": "user", "content": "Reverse the list:\n1 2 3"}]


@pytest.fixture(scope="module")
def server(model_dir, serve_app):
    app = create_app(model_dir, MODEL, max_new_tokens_limit=MAX_NEW, max_prompt_tokens=1000, max_body_bytes=BODY_LIMIT)
    with serve_app(app) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return client(server.base_url)


@pytest.fixture
def engine(server):
    return server.app.state.engine


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=60)


# --- sizes and lengths ---------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(server):
    before = sample(scrape(server.root_url), "serving_errors_total", endpoint="/v1/completions", code="request_too_large")
    big = post(server, "/completions", prompt="7 " * BODY_LIMIT, max_tokens=2)
    assert big.status_code == 413
    error = big.json()["error"]
    assert error["code"] == "request_too_large" and f"at most {BODY_LIMIT} bytes" in error["message"]
    # Without a Content-Length (chunked), the body is counted as it arrives.
    chunks = (b'{"model": "tiny", "prompt": "' + b"7" * 4096 for _ in range(8))
    chunked = httpx.post(f"{server.base_url}/completions", content=chunks, headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    after = sample(scrape(server.root_url), "serving_errors_total", endpoint="/v1/completions", code="request_too_large")
    assert after - before == 2
    assert post(server, "/completions", prompt="1 2 3", max_tokens=2).status_code == 200


def test_a_prompt_longer_than_its_token_limit_can_spell_is_refused_without_tokenising(server, engine, monkeypatch):
    calls = []
    for name in ("encode_prompt", "encode_chat"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    long_text = "7" * 5000  # 5 KB: within the body limit, far beyond 127 tokens of this vocabulary
    for response in (
        post(server, "/completions", prompt=long_text, max_tokens=2),
        post(server, "/completions", prompt=["1 2 3", long_text], max_tokens=2),
        post(server, "/chat/completions", messages=[{"role": "user", "content": long_text}], max_tokens=2),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert "5000 characters" in response.json()["error"]["message"]
    assert calls == [], "the tokenizer must not run on a prompt refused by its length"
    assert post(server, "/completions", prompt="1 2 3", max_tokens=2).status_code == 200
    assert calls == ["encode_prompt"]


def test_the_models_context_length_bounds_prompt_and_answer_and_is_named(server, engine):
    context = engine.context_length
    assert context == 128
    width = len(engine.encode_prompt("7 " * 120))
    assert context - MAX_NEW < width < context  # fits alone, not with MAX_NEW more tokens

    too_long = post(server, "/completions", prompt="7 " * 130, max_tokens=2)
    assert too_long.status_code == 400 and "max_position_embeddings" in too_long.json()["error"]["message"]
    no_room = post(server, "/completions", prompt="7 " * 120, max_tokens=MAX_NEW)
    assert no_room.status_code == 400
    assert f"max_position_embeddings) is {context}" in no_room.json()["error"]["message"]
    chat = post(server, "/chat/completions", messages=[{"role": "user", "content": "7 " * 130}], max_tokens=2)
    assert chat.status_code == 400 and "max_position_embeddings" in chat.json()["error"]["message"]
    # Without max_tokens, the answer gets what room is left, as vLLM does.
    fitted = post(server, "/completions", prompt="7 " * 120, temperature=0)
    assert fitted.status_code == 200
    assert fitted.json()["usage"]["completion_tokens"] <= context - width


# --- fields: supported for real, or refused by name ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/chat/completions", "n", 2),
        ("/chat/completions", "logprobs", True),
        ("/completions", "logprobs", 1),
        ("/chat/completions", "top_logprobs", 2),
        ("/chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("/chat/completions", "tool_choice", "auto"),
        ("/chat/completions", "response_format", {"type": "json_object"}),
        ("/completions", "stop", ["a", "b", "c", "d", "e"]),
        ("/completions", "stop", [""]),
    ],
)
def test_a_field_the_server_cannot_honour_is_refused_naming_it(server, path, field, value):
    body = {"messages": MESSAGES} if path == "/chat/completions" else {"prompt": "1 2 3"}
    response = post(server, path, max_tokens=2, **body, **{field: value})
    assert response.status_code == 400, response.text
    assert f"'{field}'" in response.json()["error"]["message"]


def test_fields_at_their_defaults_are_accepted(server):
    defaults = {"logprobs": False, "top_logprobs": None, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "n": 1, "stop": None}
    assert post(server, "/chat/completions", messages=MESSAGES, max_tokens=2, **defaults).status_code == 200


def test_stop_strings_cut_the_answer_plain_and_streamed(oai):
    full = oai.completions.create(model=MODEL, prompt="Reverse the list:\n1 2 3", max_tokens=MAX_NEW, temperature=0).choices[0]
    # The untrained model babbles; stop at its first run of two plain ASCII characters after the start.
    at = next(i for i in range(1, len(full.text) - 1) if full.text[i : i + 2].isascii() and full.text[i : i + 2].isprintable())
    stop = full.text[at : at + 2]
    expected = full.text[: full.text.index(stop)]

    cut = oai.completions.create(model=MODEL, prompt="Reverse the list:\n1 2 3", max_tokens=MAX_NEW, temperature=0, stop=[stop, "never-seen"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    assert cut.usage.completion_tokens < MAX_NEW  # it stopped generating, not only trimming

    chunks = list(oai.completions.create(model=MODEL, prompt="Reverse the list:\n1 2 3", max_tokens=MAX_NEW, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected, "no part of the stop string may be streamed"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_helpers():
    assert stop_index("abcdef", ("de", "c")) == 2 and stop_index("abc", ("x",)) is None
    assert stop_holdback("the end", ("end.",)) == 3 and stop_holdback("abc", ("cd", "bcx")) == 2 and stop_holdback("abc", ("x",)) == 0


def test_a_seed_makes_sampling_reproducible_however_requests_are_batched(oai):
    def sampled(seed: int | None) -> str:
        kwargs = {} if seed is None else {"seed": seed}
        return oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_NEW, temperature=1.0, **kwargs).choices[0].message.content

    alone = sampled(1234)
    with ThreadPoolExecutor(max_workers=5) as pool:  # batch-mates sampling at the same temperature
        together = list(pool.map(sampled, [None, 1234, None, None, 1234]))
    assert together[1] == together[4] == alone
    assert sampled(4321) != alone


# --- one bad row in a batch ------------------------------------------------------------------------


def test_one_failing_row_fails_only_its_own_request_in_a_batch(server, engine, monkeypatch):
    good, poison = "Reverse the list:\n4 5 6", "9 9 9 9 9 9 9 9"
    expected = post(server, "/completions", prompt=good, max_tokens=8, temperature=0).json()["choices"][0]["text"]
    poison_ids = engine.encode_prompt(poison)
    batches: list[int] = []
    generate = engine.model.generate

    def generate_unless_poisoned(*args, **kwargs):
        rows = kwargs["input_ids"].tolist()
        batches.append(len(rows))
        if any(row[-len(poison_ids) :] == poison_ids for row in rows):
            raise RuntimeError("this row breaks the model")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", generate_unless_poisoned)
    with ThreadPoolExecutor(max_workers=3) as pool:
        with engine._lock:  # hold the model: the requests queue up and are taken as one batch
            first = pool.submit(post, server, "/completions", prompt="1 2 3", max_tokens=2)
            wait_until(lambda: engine.active == 1, "the first request is taken and waits for the model")
            futures = [pool.submit(post, server, "/completions", prompt=p, max_tokens=8, temperature=0) for p in (poison, good)]
            wait_until(lambda: engine.queue_depth == 2, "both requests queue behind it")
        bad, ok = (f.result() for f in futures)
    assert first.result().status_code == 200
    assert 2 in batches, "the poisoned and the good request were generated in one batch"
    assert bad.status_code == 500 and "breaks the model" in bad.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected

