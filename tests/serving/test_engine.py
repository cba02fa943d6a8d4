"""CpuEngine on its own: stop handling, the batch primitive and argument checks (the queue and
dynamic batching are in test_batching.py)."""

from __future__ import annotations

import pytest
import torch

from serving.engine import CpuEngine, Generation, cut

MESSAGES = [{"role": "user", "content": "Reverse the list:\n1 2 3"}]


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = CpuEngine(model_dir, max_new_tokens_limit=8)
    yield engine
    engine.close()


def test_an_untrained_model_runs_to_the_length_cap_or_stops(engine):
    gen = engine.chat(MESSAGES, max_tokens=8)
    assert isinstance(gen, Generation)
    assert gen.prompt_tokens == len(engine.encode_chat(MESSAGES))
    assert gen.finish_reason in ("stop", "length")
    assert 1 <= gen.completion_tokens <= 8
    if gen.finish_reason == "length":
        assert gen.completion_tokens == 8


def test_the_stop_token_ends_the_answer_and_is_stripped(engine):
    # Force the eos logit up so the first generated token is the stop token.
    eos = torch.tensor(engine.stop_ids)
    hook = engine.model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1, eos, 1e4))
    try:
        gen = engine.chat(MESSAGES, max_tokens=8)
    finally:
        hook.remove()
    assert gen == Generation(text="", prompt_tokens=len(engine.encode_chat(MESSAGES)), completion_tokens=1, finish_reason="stop")


def test_a_left_padded_batch_gives_each_prompt_its_own_greedy_answer(engine):
    prompts = [engine.encode_prompt("1 2 3"), engine.encode_chat(MESSAGES)]
    assert len(prompts[0]) != len(prompts[1])  # so one row really is padded
    batch = engine.generate_batch(prompts, max_tokens=6)
    assert batch == [engine.generate(p, max_tokens=6) for p in prompts]


def test_chat_and_complete_are_deterministic_when_greedy(engine):
    assert engine.chat(MESSAGES, 5) == engine.chat(MESSAGES, 5)
    assert engine.complete("3 2 1", 5) == engine.complete("3 2 1", 5)


@pytest.mark.parametrize("max_tokens", [0, 9])
def test_max_tokens_outside_the_limit_is_refused(engine, max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        engine.complete("1 2 3", max_tokens)


def test_an_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([], 4)


@pytest.mark.parametrize(
    ("new_ids", "max_tokens", "expected"),
    [
        ([5, 6, 7], 3, ([5, 6, 7], 3, "length")),
        ([5, 6, 7, 8], 2, ([5, 6], 2, "length")),  # the batch ran past this request's own limit
        ([5, 1, 0, 0], 4, ([5], 2, "stop")),  # padding after the stop token is dropped
        ([5, 6, 1], 2, ([5, 6], 2, "length")),  # a stop token beyond the limit does not count
        ([1, 0], 2, ([], 1, "stop")),
    ],
)
def test_cut_keeps_each_request_to_its_own_limit_and_stop(new_ids, max_tokens, expected):
    assert cut(new_ids, max_tokens, stop_ids=[1]) == expected
