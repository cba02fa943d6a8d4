"""What a generation request may ask of the CPU engine's server, checked before it costs
anything: the model it names, the fields this server supports (the rest answer 400 naming the
field, as vLLM does), the prompt against its character and token limits, and prompt plus answer
against the model's context length. Cheapest first: characters before the tokenizer runs.

`Admission` holds the limits; its methods raise `APIError` with the OpenAI error code a client
can act on, so the routes in serving/server.py read as the checks they make.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine import CpuEngine
from serving.protocol import APIError, GenerationRequest

MAX_STOP_STRINGS = 4  # as OpenAI


def unsupported(field: str, why: str) -> APIError:
    return APIError(400, f"'{field}' is not supported by this server: {why}", code="unsupported_parameter")


@dataclass(frozen=True)
class Admission:
    """`max_prompt_chars` None: the most characters `max_prompt_tokens` tokens of the engine's
    tokenizer can spell (its longest vocabulary entry times the limit), so no valid prompt is
    refused before it is tokenised."""

    model_name: str
    max_new_tokens_limit: int
    max_prompt_tokens: int
    max_prompt_chars: int | None = None

    def request(self, body: GenerationRequest, max_tokens: int | None) -> int | None:
        """What every generation request shares; returns the max_tokens asked for (None: as
        many as the limits leave room for, decided once the prompt is tokenised)."""
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"'n' is not supported above 1 by this server: only n=1, got n={body.n}", code="unsupported_parameter")
        if body.logprobs not in (None, False):
            raise unsupported("logprobs", f"no log probabilities are returned (got logprobs={body.logprobs!r})")
        if body.top_logprobs is not None:
            raise unsupported("top_logprobs", "no log probabilities are returned")
        if body.tools:
            raise unsupported("tools", "no function calling; send the tools in the prompt if the model was trained on them")
        if body.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "no function calling")
        format_type = body.response_format.get("type") if isinstance(body.response_format, dict) else body.response_format
        if format_type not in (None, "text"):
            raise unsupported("response_format", f"answers are plain text only (got type {format_type!r})")
        stops = body.stop_strings()
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(stops)!r}", code="invalid_stop")
        if max_tokens is not None and not 1 <= max_tokens <= self.max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_tokens}", code="invalid_max_tokens")
        return max_tokens

    def prompt_token_limit(self, eng: CpuEngine) -> int:
        context = eng.context_length
        return self.max_prompt_tokens if context is None else min(self.max_prompt_tokens, context - 1)

    def chars(self, eng: CpuEngine, chars: int) -> None:
        """Before tokenising: a prompt with more characters than its token limit can spell is
        refused without paying for the tokenizer (which is linear in a prompt of any size)."""
        limit = self.max_prompt_chars if self.max_prompt_chars is not None else self.prompt_token_limit(eng) * eng.max_token_chars
        if chars > limit:
            raise APIError(
                400, f"the prompt is {chars} characters; this server accepts at most {limit} "
                f"(prompts of at most {self.prompt_token_limit(eng)} tokens)", code="context_length_exceeded",
            )

    def prompt(self, ids: list[int]) -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", code="empty_prompt")
        return ids

    def fit(self, eng: CpuEngine, prompts: list[list[int]], max_tokens: int | None) -> int:
        """The max_tokens to generate: prompt and answer must fit in the model's context length."""
        context = eng.context_length
        if context is None:
            return self.max_new_tokens_limit if max_tokens is None else max_tokens
        longest = max(len(ids) for ids in prompts)
        room = context - longest
        if room < 1:
            raise APIError(
                400, f"the prompt is {longest} tokens; the model's context length (max_position_embeddings) is {context} tokens, "
                "which leaves no room for an answer", code="context_length_exceeded",
            )
        if max_tokens is None:  # as vLLM does: the default shrinks to what fits
            return min(self.max_new_tokens_limit, room)
        if max_tokens > room:
            raise APIError(
                400, f"the prompt ({longest} tokens) and max_tokens ({max_tokens}) need {longest + max_tokens} tokens; "
                f"the model's context length (max_position_embeddings) is {context}", code="context_length_exceeded",
            )
        return max_tokens
