"""From admitted prompts to answers on the CPU engine: its bounded queue, the request's
deadline, injected faults for drills, and the answer as one JSON body or as a stream of
server-sent events. The routes in serving/server.py check a request (serving/admission.py)
and hand it here; nothing here knows HTTP routing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import suppress
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from serving.engine import CpuEngine, EngineClosedError, FinishReason, Generation, QueueFullError, Submission
from serving.protocol import APIError, GenerationRequest, Shape, sse
from serving.protocol import error_body as _error_body
from serving.server_metrics import Metrics, endpoint_label

# A full queue drains in about one batch's generation time, well under a second for the embedded
# model; a client that honours Retry-After (the openai client does) comes back after that.
RETRY_AFTER_S = 1


def fault_fires(n: int, rate: float) -> bool:
    """Whether the n-th (1-based) generation request gets an injected error.

    Deterministic and evenly spread: exactly floor(n * rate) of the first n requests fail (rate
    0.5 fails every 2nd, 0.25 every 4th), so a drill or a test knows what to expect.
    """
    eps = 1e-9  # 0.29 * 100 is 28.999999999999996 in floating point
    return math.floor(n * rate + eps) > math.floor((n - 1) * rate + eps)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "shutting_down", "server_error")


def failure(future: Future) -> APIError | None:
    """A finished engine future's error as the API answers it; None if it succeeded."""
    if future.cancelled():
        return APIError(500, "the request was cancelled", "cancelled", "server_error")
    exc = future.exception()
    if exc is None:
        return None
    if isinstance(exc, EngineClosedError):
        return shutting_down()
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "internal_error", "server_error")


class Dispatcher:
    """One server's way from prompts to answers. `fault_*` are for canary drills and tests:
    a deterministic share of generation requests answers 500, and/or every one is delayed."""

    def __init__(self, metrics: Metrics, request_timeout_s: float, fault_error_rate: float = 0.0, fault_delay_s: float = 0.0) -> None:
        if not 0 <= fault_error_rate <= 1:
            raise ValueError(f"fault_error_rate must be between 0 and 1, got {fault_error_rate}")
        if fault_delay_s < 0 or request_timeout_s <= 0:
            raise ValueError("fault_delay_s must be >= 0 and request_timeout_s > 0")
        self.metrics, self.request_timeout_s = metrics, request_timeout_s
        self.fault_error_rate, self.fault_delay_s = fault_error_rate, fault_delay_s
        self.generation_requests = itertools.count(1)  # numbers valid generation requests, for fault_fires

    def timed_out(self) -> APIError:
        return APIError(504, f"the request took longer than {self.request_timeout_s:g} s and was abandoned", "request_timeout", "server_error")

    async def enqueue(
        self, eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, deadline: float,
        on_delta: list[Callable[[str, FinishReason | None], None]] | None = None,
    ) -> list[Submission]:
        """Injected faults first (a drill's delay counts against the timeout, like a slow model
        would), then the engine's queue: a full queue is a 429 the client may retry."""
        try:
            async with asyncio.timeout_at(deadline):
                if self.fault_delay_s:
                    await asyncio.sleep(self.fault_delay_s)
        except TimeoutError:
            raise self.timed_out() from None
        if self.fault_error_rate and fault_fires(next(self.generation_requests), self.fault_error_rate):
            raise APIError(500, "injected fault (--fault-error-rate)", "injected_fault", "server_error")
        try:
            return eng.submit_many(prompts, max_tokens, body.temperature, body.top_p, on_delta, body.stop_strings(), body.seed)
        except QueueFullError as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", "queue_full", "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosedError:
            raise shutting_down() from None

    async def answer(self, eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, shape: Shape) -> dict[str, Any]:
        arrived, deadline = time.monotonic(), asyncio.get_running_loop().time() + self.request_timeout_s
        submissions = await self.enqueue(eng, prompts, max_tokens, body, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                gens = await asyncio.gather(*(asyncio.wrap_future(s.future) for s in submissions))
        except TimeoutError:
            raise self.timed_out() from None
        except EngineClosedError:
            raise shutting_down() from None
        finally:
            for s in submissions:  # a timed-out request leaves the queue, or stops generating
                s.cancel()
        self.metrics.answered(gens, arrived)
        return shape.response(gens)

    async def stream(
        self, request: Request, eng: CpuEngine, prompts: list[list[int]], max_tokens: int, body: GenerationRequest, shape: Shape
    ) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, each token's text as it is generated.

        The engine's worker thread posts (delta, finish) per token and the finished future per
        prompt onto one asyncio queue, in order. The response starts only once the first event
        is here, so a queue-full, timeout or injected fault is still an HTTP status rather than
        an error inside a 200 stream. A stream whose row stops on a stop token ends with an
        empty-content chunk carrying finish_reason (as OpenAI does): the stop is only known one
        step after the last text, and holding every token back a step would delay the stream.
        """
        arrived, loop = time.monotonic(), asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        events: asyncio.Queue[tuple] = asyncio.Queue()

        def post(event: tuple) -> None:  # called on the engine's worker thread
            with suppress(RuntimeError):  # the loop is closed: the server stopped, nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        on_delta = [lambda text, finish, i=i: post(("delta", i, text, finish)) for i in range(len(prompts))]
        submissions = await self.enqueue(eng, prompts, max_tokens, body, deadline, on_delta)
        for i, s in enumerate(submissions):
            s.future.add_done_callback(lambda fut, i=i: post(("done", i, fut, None)))

        def cancel_all() -> None:
            for s in submissions:
                s.cancel()

        try:
            async with asyncio.timeout_at(deadline):
                first = await events.get()
        except TimeoutError:
            cancel_all()
            raise self.timed_out() from None
        except BaseException:
            cancel_all()
            raise
        if first[0] == "done" and failure(first[2]) is not None:
            cancel_all()
            raise failure(first[2])  # type: ignore[misc]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        endpoint = endpoint_label(request.url.path)

        def chunk(payload: dict[str, Any]) -> str:
            return sse({**payload, "usage": None} if include_usage and "usage" not in payload else payload)

        def stream_error(exc: APIError) -> str:
            self.metrics.errors.labels(endpoint, exc.code or str(exc.status)).inc()
            return sse(_error_body(exc.message, exc.code, exc.error_type))

        async def events_as_sse() -> AsyncIterator[str]:
            try:
                if shape.chat:  # OpenAI opens a chat stream with the role
                    for i in range(len(prompts)):
                        yield chunk(shape.chunk(i, "", None, role=True))
                gens: list[Generation | None] = [None] * len(prompts)
                event = first
                while True:
                    kind, i, payload, finish = event
                    if kind == "delta":
                        yield chunk(shape.chunk(i, payload, finish))
                    elif (exc := failure(payload)) is not None:
                        yield stream_error(exc)
                        return
                    else:
                        gens[i] = payload.result()
                        if all(g is not None for g in gens):
                            break
                    try:
                        async with asyncio.timeout_at(deadline):
                            event = await events.get()
                    except TimeoutError:
                        yield stream_error(self.timed_out())
                        return
                answered = [g for g in gens if g is not None]
                self.metrics.answered(answered, arrived)
                if include_usage:
                    yield sse(shape.usage_chunk(answered))
                yield sse("[DONE]")
            finally:  # also when the client goes away mid-stream: stop generating for it
                cancel_all()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
        return StreamingResponse(events_as_sse(), media_type="text/event-stream", headers=headers)
