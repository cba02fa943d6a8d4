"""The CPU server, run by a real uvicorn and driven with the real `openai` client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from serving.client import client
from serving.server import create_app
from tests.serving.conftest import sample, scrape, wait_until

MODEL_NAME = "tiny"
MAX_NEW = 16
MAX_PROMPT = 64
API_KEY = "test-secret-key"
MESSAGES = [{"role": "user", "content": "Reverse the list:\n1 2 3"}]


@pytest.fixture(scope="module")
def server(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL_NAME, max_new_tokens_limit=MAX_NEW, max_prompt_tokens=MAX_PROMPT)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(model_dir, serve_app):
    with serve_app(create_app(model_dir, MODEL_NAME, api_key=API_KEY, max_new_tokens_limit=MAX_NEW)) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return client(server.base_url)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The checkpoint loaded and run with plain transformers, independently of serving/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_health_names_the_model(server):
    response = httpx.get(f"{server.root_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": MODEL_NAME}


def test_models_lists_the_served_model(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"


def test_chat_completion_is_well_formed_with_consistent_usage(oai, reference):
    tokenizer, _ = reference
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)

    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL_NAME
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens == len(chat_prompt_ids(tokenizer, MESSAGES))
    assert 1 <= usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_chat_matches_plain_transformers_and_repeats(oai, reference):
    tokenizer, model = reference
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    expected = tokenizer.decode(new, skip_special_tokens=True)

    answers = [
        oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0).choices[0].message.content
        for _ in range(2)
    ]
    assert answers == [expected, expected]


def test_concurrent_requests_are_all_answered_identically(oai):
    def ask(_: int) -> str:
        return oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert len(set(answers)) == 1


def test_health_answers_while_a_request_waits_for_the_model(server, oai):
    engine = server.app.state.engine
    with ThreadPoolExecutor(max_workers=1) as pool:
        with engine._lock:  # hold the model, as a long generation would
            pending = pool.submit(oai.chat.completions.create, model=MODEL_NAME, messages=MESSAGES, max_tokens=2, temperature=0)
            wait_until(lambda: engine.active == 1, "the worker took the request")
            # Were generation run on the event loop, the loop would now be stuck on the lock.
            assert httpx.get(f"{server.root_url}/health", timeout=5).status_code == 200
            assert not pending.done()
        assert len(pending.result(timeout=30).choices) == 1


def test_completions_endpoint_answers_one_and_many_prompts(oai, reference):
    tokenizer, _ = reference
    single = oai.completions.create(model=MODEL_NAME, prompt="1 2 3", max_tokens=5, temperature=0)
    assert single.object == "text_completion"
    assert single.id.startswith("cmpl-")
    assert len(single.choices) == 1 and isinstance(single.choices[0].text, str)
    assert single.usage.prompt_tokens == len(tokenizer("1 2 3")["input_ids"])
    assert 1 <= single.usage.completion_tokens <= 5

    # A list of prompts is generated as one left-padded batch; greedy answers must not change.
    other = oai.completions.create(model=MODEL_NAME, prompt="Reverse the list:\n4 5 6", max_tokens=5, temperature=0)
    batch = oai.completions.create(model=MODEL_NAME, prompt=["1 2 3", "Reverse the list:\n4 5 6"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [single.choices[0].text, other.choices[0].text]
    assert batch.usage.prompt_tokens == single.usage.prompt_tokens + other.usage.prompt_tokens


def test_sampling_returns_a_well_formed_answer(oai):
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0.9, top_p=0.95)
    assert isinstance(response.choices[0].message.content, str)
    assert 1 <= response.usage.completion_tokens <= 4


def test_max_tokens_defaults_to_the_server_limit(oai):
    response = oai.completions.create(model=MODEL_NAME, prompt="1 2 3", temperature=0)
    assert 1 <= response.usage.completion_tokens <= MAX_NEW


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.message


@pytest.mark.parametrize("max_tokens", [0, MAX_NEW + 1])
def test_max_tokens_out_of_range_is_a_bad_request(oai, max_tokens):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=max_tokens)


def test_too_long_prompt_is_a_bad_request(oai):
    long_prompt = " ".join(["7"] * (MAX_PROMPT + 10))
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        oai.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long_prompt}], max_tokens=2)


def test_n_above_one_is_refused(oai):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, n=2)


def test_errors_use_the_openai_shape_and_extra_fields_are_accepted(server):
    url = f"{server.base_url}/chat/completions"
    unknown = httpx.post(url, json={"model": "nope", "messages": MESSAGES})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": unknown.json()["error"]["message"], "type": "invalid_request_error", "code": "model_not_found"}}

    malformed = httpx.post(url, json={"model": MODEL_NAME})  # no messages
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "code"}
    assert "messages" in malformed.json()["error"]["message"]

    # OpenAI clients send fields this server does not use; they must not be rejected.
    extras = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, "user": "u1", "presence_penalty": 0}
    assert httpx.post(url, json=extras).status_code == 200

    # Content given as a list of text parts (the newer OpenAI message form) is rendered as text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Reverse the list:\n"}, {"type": "text", "text": "1 2 3"}]}]
    as_parts = httpx.post(url, json={"model": MODEL_NAME, "messages": parts, "max_tokens": 3, "temperature": 0}).json()
    as_text = httpx.post(url, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3, "temperature": 0}).json()
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]
    assert as_parts["usage"] == as_text["usage"]


def test_api_key_is_required_when_configured(keyed_server):
    for key in (None, "wrong-key"):
        anonymous = client(keyed_server.base_url, api_key=key)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()

    authorised = client(keyed_server.base_url, api_key=API_KEY)
    response = authorised.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, temperature=0)
    assert len(response.choices) == 1
    assert [m.id for m in authorised.models.list().data] == [MODEL_NAME]
    # Liveness stays open, as in vLLM, so the launcher can poll it without the key.
    assert httpx.get(f"{keyed_server.root_url}/health").status_code == 200


# --- streaming ---------------------------------------------------------------------------------


def test_streamed_chat_adds_up_to_the_plain_greedy_answer(oai):
    plain = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == plain.choices[0].message.content
    # finish_reason only on the last chunk of the answer, then the usage chunk with no choices.
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_NAME for c in chunks)


def test_streamed_completion_of_two_prompts_adds_up_per_prompt(oai):
    prompts = ["1 2 3", "Reverse the list:\n4 5 6"]
    plain = oai.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0)
    texts, finish = ["", ""], [None, None]
    for chunk in oai.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        assert chunk.usage is None  # not asked for
        for choice in chunk.choices:
            assert finish[choice.index] is None, "nothing may follow a choice's finish_reason"
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in plain.choices]
    assert finish == [c.finish_reason for c in plain.choices]


def test_stream_wire_format_is_openai_server_sent_events(server):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"  # every event ends with a blank line
    assert all(e.startswith("data: ") for e in events[:-1])
    import json

    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["usage"] is None for p in payloads[:-1])  # include_usage: null until the last chunk
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_latency_and_batches(server, oai):
    before = scrape(server.root_url)
    answers = [oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3, temperature=0) for _ in range(3)]
    list(oai.completions.create(model=MODEL_NAME, prompt="1 2 3", max_tokens=2, temperature=0, stream=True))
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    after = scrape(server.root_url)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    chat = "/v1/chat/completions"
    assert grew("serving_requests_total", endpoint=chat, status="200") == 3
    assert grew("serving_requests_total", endpoint=chat, status="404") == 1
    assert grew("serving_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("serving_errors_total", endpoint=chat, code="model_not_found") == 1
    assert grew("serving_request_latency_seconds_count", endpoint=chat) == 4
    assert grew("serving_time_to_first_token_seconds_count") == 4  # the 3 chats and the stream
    assert grew("serving_tokens_total", kind="completion") >= sum(a.usage.completion_tokens for a in answers) + 1
    assert grew("serving_tokens_total", kind="prompt") == sum(a.usage.prompt_tokens for a in answers) + len(
        server.app.state.engine.encode_prompt("1 2 3")
    )
    assert grew("serving_batch_size_count") == 4  # sequential requests: a batch each
    assert sample(after, "serving_queue_depth") == 0


# --- compressed-tensors checkpoints ------------------------------------------------------------


def test_a_compressed_tensors_checkpoint_is_served(tmp_path, serve_app):
    """What the quantize stage produces (llm-compressor, compressed-tensors format) must serve."""
    import json

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from pipelines.bootstrap import build_model, train_tokenizer
    from pipelines.config import ModelParams

    tokenizer = train_tokenizer(iter([f"Reverse the list:\n{i} {i + 1} {i + 2}" for i in range(100)]), 300)
    # W8A16 quantizes in groups of 128 columns, so the hidden size must be a multiple of 128.
    build_model(ModelParams(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2), tokenizer).save_pretrained(tmp_path / "full")
    # oneshot reads the model's config back from where it was loaded, as the quantize stage does it.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]))  # RTN: no data
    quantized = tmp_path / "quantized"
    model.save_pretrained(quantized, save_compressed=True)
    tokenizer.save_pretrained(quantized)
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"

    with serve_app(create_app(str(quantized), "quantized", max_new_tokens_limit=8)) as s:
        response = client(s.base_url).chat.completions.create(model="quantized", messages=MESSAGES, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert 1 <= response.usage.completion_tokens <= 4
