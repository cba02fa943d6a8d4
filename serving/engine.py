"""The CPU engine: one Hugging Face checkpoint, generated with plain `transformers`.

Requests arrive on many threads (the server runs generation in a threadpool) but there is one
model, so generation is serialised by a lock. Everything funnels through `generate_batch`, which
already takes several prompts, so dynamic batching later only has to change who calls it (a
queue that gathers waiting requests), not how a batch is generated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One answer, in the terms of the OpenAI `usage` block and `finish_reason`."""

    text: str
    prompt_tokens: int
    # Tokens the model generated, the stop token included when it produced one (as vLLM counts).
    completion_tokens: int
    finish_reason: FinishReason


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class CpuEngine:
    """Loads `model_dir` (a plain or compressed-tensors checkpoint) in float32 on the CPU."""

    def __init__(self, model_dir: str, max_new_tokens_limit: int = 64) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = model_dir
        self.max_new_tokens_limit = max_new_tokens_limit
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gen_cfg = self.model.generation_config
        # A chat model often ends its turn with a token other than the tokenizer's eos (Llama 3's
        # <|eot_id|>); generation_config.json lists all of them, so stop on the union.
        self.stop_ids: list[int] = sorted(set(_as_list(gen_cfg.eos_token_id)) | set(_as_list(self.tokenizer.eos_token_id)))
        if not self.stop_ids:
            raise ValueError(f"{model_dir}: neither the tokenizer nor generation_config.json defines an eos token")
        # Padding is only ever masked out, so any id will do when the checkpoint names none.
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else next(iter(_as_list(gen_cfg.pad_token_id)), self.stop_ids[0])
        # OpenAI has no top_k: keep the checkpoint's own value if it declares one, otherwise turn
        # it off rather than inheriting transformers' global default of 50.
        self._top_k: int = gen_cfg.top_k or 0
        self._lock = threading.Lock()

    # --- tokenisation (public so the server can check prompt length before queueing) ---------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render with the checkpoint's chat template, ending with the assistant's turn opener."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already writes any BOS it wants; adding special tokens would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw completion prompt, with the tokenizer's usual special tokens (e.g. BOS)."""
        return self.tokenizer(prompt)["input_ids"]

    # --- generation --------------------------------------------------------------------------

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Generation:
        return self.generate(self.encode_chat(messages), max_tokens, temperature, top_p)

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Generation:
        return self.generate(self.encode_prompt(prompt), max_tokens, temperature, top_p)

    def generate(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Generation:
        return self.generate_batch([prompt_ids], max_tokens, temperature, top_p)[0]

    def generate_batch(
        self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0
    ) -> list[Generation]:
        """Generate for several tokenised prompts at once (left-padded), one Generation each."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not 1 <= max_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"max_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        input_ids, attention_mask = self._left_pad(prompts)
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **self._sampling(temperature, top_p),
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [self._finish(len(p), ids) for p, ids in zip(prompts, new_tokens)]

    def _sampling(self, temperature: float, top_p: float) -> dict:
        # OpenAI's temperature 0 means greedy; transformers rejects temperature=0 with sampling on.
        if temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": self._top_k}

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Decoder-only models continue from the last position, so padding goes on the left
        # whatever the tokenizer's padding_side says.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids, attention_mask

    def _finish(self, prompt_tokens: int, new_ids: list[int]) -> Generation:
        # Anything after the first stop token is padding (a finished row in a batch keeps
        # receiving pad tokens until the longest row is done).
        stop_at = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), None)
        if stop_at is None:  # only the max_tokens cap ends a generation without a stop token
            kept, completion_tokens, finish = new_ids, len(new_ids), "length"
        else:
            kept, completion_tokens, finish = new_ids[:stop_at], stop_at + 1, "stop"
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finish_reason=finish)
