"""The CPU engine: one Hugging Face checkpoint, generated with plain `transformers`, batched dynamically.

One worker thread owns the model. Callers `submit` tokenised prompts to a bounded queue and
wait on a future; the worker takes the oldest request, gathers whatever else is waiting (up to
`max_batch_size`, waiting at most `batch_window_ms` after the oldest arrived) and runs one
left-padded `generate` for them. A decode step for 16 rows costs a CPU little more than a step
for one (a tiny model's step is per-layer overhead and weight reads, not arithmetic), so
requests that arrive together finish together instead of queueing one behind the other.

A batch runs to the longest request's max_tokens; each row stops early on its own limit or stop
token (a per-row stopping criterion, so finished rows only receive padding) and is cut to its own
answer afterwards. Rows do not influence each other: left padding is masked out, so a greedy
answer is the same batched or alone. Requests with different sampling settings are generated in
separate batches, since `generate` takes one temperature and top_p for all rows.

Streaming uses transformers' streamer hook, which sees every step's tokens for the whole batch,
so a streamed request is batched like any other. The same hook finds stop strings: a row whose
text contains one of its request's `stop` strings stops there, and its answer is cut before it
(a stream holds back text that could still become a stop string).

A request with a `seed` samples reproducibly: it is generated alone (rows in one `generate` call
share the random stream) under that seed, with the global random state restored afterwards.

When a batch fails, its rows are generated again one by one, so only a row that fails on its own
fails its request (a streamed row that has already sent text cannot be replayed and fails too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

FinishReason = Literal["stop", "length"]
# Called on the worker thread with (text delta, finish reason or None); must be quick and must not block.
OnDelta = Callable[[str, "FinishReason | None"], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One answer, in the terms of the OpenAI `usage` block and `finish_reason`."""

    text: str
    prompt_tokens: int
    # Tokens the model generated, the stop token included when it produced one (as vLLM counts).
    completion_tokens: int
    finish_reason: FinishReason
    # time.monotonic() when the first token was produced; for time-to-first-token, not identity.
    first_token_at: float | None = field(default=None, compare=False)


class QueueFullError(RuntimeError):
    """The engine's queue has no room for the request; the caller should retry later."""


class EngineClosedError(RuntimeError):
    """The engine was closed before the request was generated."""


class AbandonedError(RuntimeError):
    """The request was abandoned (cancelled) while it was being generated."""


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest of the stop strings begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still be the start of a stop string (a
    stream keeps them back until the next tokens say whether they are)."""
    return max((j for s in stops for j in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:j])), default=0)


def cut(new_ids: list[int], max_tokens: int, stop_ids: list[int]) -> tuple[list[int], int, FinishReason]:
    """What one request keeps of its batch row: (answer ids, completion_tokens, finish_reason).

    The row may run past the request's own max_tokens (the batch runs to its longest request)
    and holds padding after a stop token, so cut at the limit, then at the first stop token.
    """
    ids = new_ids[:max_tokens]
    stop_at = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    if stop_at is None:  # only the max_tokens cap ends a generation without a stop token
        return ids, len(ids), "length"
    return ids[:stop_at], stop_at + 1, "stop"


@dataclass(eq=False)  # identity equality: a job is found in (and removed from) the queue by identity
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    on_delta: OnDelta | None = None
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one
    seed: int | None = None
    future: Future = field(default_factory=Future)
    abandoned: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    stop_step: int | None = None  # generated tokens when a stop string first appeared
    emitted: str = ""  # text already handed to on_delta

    @property
    def sampling(self) -> tuple[float, float]:
        # top_p means nothing to greedy decoding, so all greedy requests share one batch.
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys may share one `generate` call. A seeded sampled job shares it
        with none: batch-mates would draw from its random stream."""
        if self.seed is not None and self.temperature != 0:
            return (*self.sampling, "seeded", id(self))
        return self.sampling


class Submission:
    """A queued request: `future` resolves to its Generation; `cancel()` abandons it."""

    def __init__(self, engine: "CpuEngine", job: _Job) -> None:
        self._engine, self._job = engine, job

    @property
    def future(self) -> Future:
        return self._job.future

    def cancel(self) -> None:
        """Drop the request from the queue if it is still waiting, else stop generating its row.
        Harmless once it has finished."""
        self._engine._abandon(self._job)


class _RowLimits(StoppingCriteria):
    """Per-row stop: the row reached its own request's max_tokens, or the request was abandoned.
    (Stop tokens are transformers' own criterion.) Once every row is done, generate returns."""

    def __init__(self, prompt_width: int, jobs: list[_Job]) -> None:
        self.prompt_width = prompt_width
        self.jobs = jobs
        self.limits = torch.tensor([j.max_tokens for j in jobs])

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = torch.tensor([j.abandoned or j.stop_step is not None for j in self.jobs])
        return (generated >= self.limits) | done


class _Rows(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch (transformers' streamer hook):
    stamps every row's first token, finds stop strings in the rows that have them, and for
    streamed requests decodes incrementally and hands out text deltas, the last one with the
    finish reason."""

    def __init__(self, engine: "CpuEngine", jobs: list[_Job]) -> None:
        self.engine, self.jobs = engine, jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.done = [False] * len(jobs)
        self.first_token_at: list[float | None] = [None] * len(jobs)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        now = time.monotonic()
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            if self.first_token_at[row] is None:
                self.first_token_at[row] = now
            self.ids[row].append(token)
            job = self.jobs[row]
            finished = token in self.engine.stop_ids or len(self.ids[row]) >= job.max_tokens or job.abandoned
            text = None
            if job.stop and not job.abandoned:
                text = self._text(row)
                if stop_index(text, job.stop) is not None:
                    job.stop_step = len(self.ids[row])  # read by _RowLimits: the row stops here
                    finished = True
            self.done[row] = finished
            if job.on_delta is not None and not job.abandoned:
                self._emit(row, final=finished, text=text)

    def end(self) -> None:
        # Defensive: a row generate stopped without our noticing still gets its final delta.
        for row, job in enumerate(self.jobs):
            if not self.done[row] and job.on_delta is not None and not job.abandoned:
                self.done[row] = True
                self._emit(row, final=True)

    def _text(self, row: int) -> str:
        kept, _, _ = cut(self.ids[row], self.jobs[row].max_tokens, self.engine.stop_ids)
        return self.engine.tokenizer.decode(kept, skip_special_tokens=True)

    def _emit(self, row: int, final: bool, text: str | None = None) -> None:
        job = self.jobs[row]
        _, _, finish = cut(self.ids[row], job.max_tokens, self.engine.stop_ids)
        # Decoding the whole answer each step (at most max_new_tokens_limit tokens) keeps the
        # deltas consistent with the final text; a trailing U+FFFD means the last token ended
        # inside a multi-byte character, so that part waits for the next token.
        text = self._text(row) if text is None else text
        if job.stop:
            if (at := stop_index(text, job.stop)) is not None:
                text, finish = text[:at], "stop"
            elif not final:  # what could still turn into a stop string waits
                text = text[: len(text) - stop_holdback(text, job.stop)]
        if not final and text.endswith("\ufffd"):
            return
        delta = text[len(job.emitted) :]
        if not delta and not final:
            return
        job.emitted = text
        try:
            job.on_delta(delta, finish if final else None)
        except Exception:  # a broken listener must not fail the other rows
            log.exception("a streaming callback failed; abandoning its request")
            job.abandoned = True


class CpuEngine:
    """Loads `model_dir` (a plain or compressed-tensors checkpoint) in float32 on the CPU and
    serves it through a dynamically batching worker thread. Call `close()` when done."""

    def __init__(
        self,
        model_dir: str,
        max_new_tokens_limit: int = 64,
        max_batch_size: int = 16,
        batch_window_ms: float = 5.0,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """max_batch_size: most requests generated together; batch_window_ms: how long the
        oldest waiting request may wait for others to join its batch; max_queue: most requests
        waiting (not yet generating) before `submit` raises QueueFullError; on_batch: called
        on the worker thread with each batch's size (for metrics)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1 or max_queue < 1 or batch_window_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and batch_window_ms >= 0")
        self.model_dir = model_dir
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        from pipelines.model_files import pretrained_kwargs

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **pretrained_kwargs(model_dir)).eval()  # safetensors only
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
        # Positions the model has embeddings for: prompt and answer together must fit.
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        # No token stands for more characters than its vocabulary string has (byte-level and
        # SentencePiece spellings are at least as long as the text they decode to), so a prompt
        # longer than max_tokens * this is over max_tokens without tokenising it.
        self.max_token_chars: int = max(map(len, self.tokenizer.get_vocab()), default=1) or 1
        # Held while the model generates: the worker takes it per batch, and so does a direct
        # `generate_batch` call from another thread.
        self._lock = threading.Lock()
        self._cond = threading.Condition()  # guards the queue, `_running` and `_closed`
        self._queue: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="cpu-engine-worker", daemon=True)
        self._worker.start()

    # --- tokenisation (public so the server can check prompt length before queueing) ---------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render with the checkpoint's chat template, ending with the assistant's turn opener."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already writes any BOS it wants; adding special tokens would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw completion prompt, with the tokenizer's usual special tokens (e.g. BOS)."""
        return self.tokenizer(prompt)["input_ids"]

    # --- the queue ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker (not yet generating)."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests in the batch the worker is generating now."""
        return len(self._running)

    def submit(
        self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, on_delta: OnDelta | None = None,
        stop: tuple[str, ...] | list[str] = (), seed: int | None = None,
    ) -> Submission:
        """Queue one request; raises ValueError for bad arguments, QueueFullError when full."""
        return self.submit_many([prompt_ids], max_tokens, temperature, top_p, [on_delta], stop, seed)[0]

    def submit_many(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_delta: list[OnDelta | None] | None = None,
        stop: tuple[str, ...] | list[str] = (),
        seed: int | None = None,
    ) -> list[Submission]:
        """Queue several requests all or none (a multi-prompt completion is one HTTP request).
        `stop`: strings that end an answer (cut before them); `seed`: reproducible sampling."""
        self._check(prompts, max_tokens, temperature, stop)
        callbacks = on_delta or [None] * len(prompts)
        jobs = [_Job(list(p), max_tokens, temperature, top_p, cb, tuple(stop), seed) for p, cb in zip(prompts, callbacks, strict=True)]
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue})")
            self._queue.extend(jobs)
            self._cond.notify_all()
        return [Submission(self, j) for j in jobs]

    def _abandon(self, job: _Job) -> None:
        with self._cond:
            job.abandoned = True  # read by _RowLimits: a running row stops at the next step
            if job in self._queue:  # not started: drop it, freeing its place at once
                self._queue.remove(job)
                job.future.cancel()
                self._cond.notify_all()

    def close(self, timeout_s: float = 30) -> None:
        """Stop the worker: waiting requests fail with EngineClosedError, the running batch is
        abandoned at its next step."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            for job in self._running:
                job.abandoned = True
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosedError("the engine was closed before this request was generated"))
        if self._worker is not threading.current_thread():
            self._worker.join(timeout_s)

    # --- blocking helpers (one request, through the queue) ----------------------------------

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Generation:
        return self.generate(self.encode_chat(messages), max_tokens, temperature, top_p)

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Generation:
        return self.generate(self.encode_prompt(prompt), max_tokens, temperature, top_p)

    def generate(
        self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        stop: tuple[str, ...] | list[str] = (), seed: int | None = None,
    ) -> Generation:
        """Queue one request and wait for it (batched with whatever else is waiting)."""
        return self.submit(prompt_ids, max_tokens, temperature, top_p, stop=stop, seed=seed).future.result()

    # --- the batch primitive -----------------------------------------------------------------

    def generate_batch(
        self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0
    ) -> list[Generation]:
        """Generate for several tokenised prompts at once (left-padded), one Generation each,
        on the calling thread, bypassing the queue (the worker uses the same code)."""
        self._check(prompts, max_tokens, temperature)
        jobs = [_Job(list(p), max_tokens, temperature, top_p) for p in prompts]
        with self._lock:
            results = self._generate(jobs)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]  # no job here is ever abandoned

    def _check(self, prompts: list[list[int]], max_tokens: int, temperature: float, stop: tuple[str, ...] | list[str] = ()) -> None:
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not 1 <= max_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"max_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("every stop string must be a non-empty string")

    def _generate(self, jobs: list[_Job]) -> list[Generation | Exception | None]:
        """One `generate` call for jobs sharing sampling settings: a Generation per row, None for
        an abandoned row, the exception for a row whose answer could not be finished."""
        input_ids, attention_mask = self._left_pad([j.prompt_ids for j in jobs])
        width = input_ids.shape[1]
        rows = _Rows(self, jobs)
        temperature, top_p = jobs[0].sampling
        seed = jobs[0].seed if len(jobs) == 1 and temperature != 0 else None
        # fork_rng restores the global random state afterwards: a seeded request leaves the
        # randomness of the requests after it as it found it.
        with torch.inference_mode(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(j.max_tokens for j in jobs),
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([_RowLimits(width, jobs)]),
                streamer=rows,
                **self._sampling(temperature, top_p),
            )
        new_tokens = output[:, width:].tolist()
        results: list[Generation | Exception | None] = []
        for job, ids, first in zip(jobs, new_tokens, rows.first_token_at):
            try:
                results.append(None if job.abandoned else self._finish(job, ids, first))
            except Exception as exc:  # this row's answer only
                log.exception("finishing one row of a batch failed")
                results.append(exc)
        return results

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                for group in group_for_generate(batch):
                    self._run(group)
            finally:
                with self._cond:
                    self._running = []

    def _next_batch(self) -> list[_Job] | None:
        """Block for the oldest request, gather what else arrives within its window; None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # The window counts from the oldest request's arrival: under load, requests queued
            # while the previous batch ran are taken at once, with no extra wait.
            deadline = self._queue[0].enqueued_at + self.batch_window_s
            while 0 < len(self._queue) < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                    batch.append(job)
            self._running = batch
            return batch

    def _run(self, jobs: list[_Job]) -> None:
        with self._lock:
            # Requests that timed out while the previous batch held the model cost nothing.
            live = [j for j in jobs if not j.abandoned]
            generations: list[Generation | Exception | None] = []
            if live:
                if self.on_batch is not None:
                    self.on_batch(len(live))
                try:
                    generations = self._generate(live)
                except Exception as exc:
                    log.exception("generation failed for a batch of %d", len(live))
                    generations = self._one_by_one(live, exc)
        results = dict(zip(map(id, live), generations))
        for job in jobs:
            gen = results.get(id(job))
            if isinstance(gen, BaseException):
                job.future.set_exception(gen)
            elif gen is None:
                job.future.set_exception(AbandonedError("abandoned before its answer was complete"))
            else:
                job.future.set_result(gen)

    def _one_by_one(self, jobs: list[_Job], batch_error: Exception) -> list[Generation | Exception | None]:
        """After a failed batch: each row again on its own, so one bad row fails only its own
        request. A streamed row that already sent text cannot be replayed; it fails as the batch did."""
        if len(jobs) == 1:
            return [batch_error]
        results: list[Generation | Exception | None] = []
        for job in jobs:
            if job.emitted or job.abandoned:
                results.append(batch_error if job.emitted else None)
                continue
            job.stop_step = None
            try:
                results.append(self._generate([job])[0])
            except Exception as exc:
                log.exception("generation failed for a row on its own")
                results.append(exc)
        return results

    # --- small helpers -----------------------------------------------------------------------

    def _sampling(self, temperature: float, top_p: float) -> dict:
        # OpenAI's temperature 0 means greedy; transformers rejects temperature=0 with sampling on.
        if temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": self._top_k}

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Decoder-only models continue from the last position, so padding goes on the left
        # whatever the tokenizer's padding_side says; the mask keeps it out of attention.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids, attention_mask

    def _finish(self, job: _Job, new_ids: list[int], first_token_at: float | None) -> Generation:
        # A row stopped by a stop string ran a step or so on before generate noticed: cut there.
        ids = new_ids if job.stop_step is None else new_ids[: job.stop_step]
        kept, completion_tokens, finish = cut(ids, job.max_tokens, self.stop_ids)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if job.stop and (at := stop_index(text, job.stop)) is not None:
            text, finish = text[:at], "stop"
        return Generation(text, len(job.prompt_ids), completion_tokens, finish, first_token_at)


def group_for_generate(jobs: list[_Job]) -> list[list[_Job]]:
    """Split a gathered batch into runs that one `generate` call can serve, oldest group first:
    one per sampling setting, and one for each seeded sampled request."""
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key, []).append(job)
    return list(groups.values())
