"""A priority admission queue with backpressure, for the gateway's asyncio event loop.

At most `capacity` requests are in flight (forwarded to a backend) at once, across all backends:
the engines batch what they are sent, and a gateway that forwards everything only moves the
queue into the engines, where priority cannot be seen. The rest wait here, higher priority
first and first come first served within a priority. When `max_waiting` already wait, a new
request is refused at once with `QueueFull` (the gateway answers 429 with Retry-After): a
bounded queue answers "later" quickly instead of holding a connection until it times out.

Priority never means "never": a waiter is overtaken by higher-priority requests that arrived
after it only until it has waited `max_overtake_s`; from then on it is served before anything
that arrived later (the oldest such waiter first). Strict priority starved a lower tier for as
long as a higher one kept the slots busy: 8 gold clients sending without pause through one slot
left 8 free clients' requests waiting until the gold clients stopped (88 s in the plane's release
test, until the clients' 180 s timeout on a busy machine), and the release's own synthetic users
(untiered, priority 0) until their 60 s timeout. The bound holds whatever priorities a keys file
gives its tiers, and a client that lowers its own with `x-priority` is still answered. A waiter
admitted that way is counted in `admitted_by_age` (also counted in `admitted`): a non-zero rate
says the slots are too few for the higher tiers' load.

A waiter whose client has gone is removed (polled through `disconnected`, e.g. Starlette's
`request.is_disconnected`), so a slot is never spent on an answer nobody reads. Every arrival
ends up in exactly one counter — admitted, rejected_full, dropped_disconnected, cancelled (the
waiting task was cancelled, or `disconnected()` raised) — or is still waiting: nothing is lost
uncounted. A waiter that leaves at any point gives back whatever slot it held or was handed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

WAIT_SAMPLES = 10_000  # per priority: enough for a stable p95, bounded memory
HOLD_SAMPLES = 100  # recent in-flight times, for the Retry-After estimate
MAX_RETRY_AFTER_S = 60
MAX_OVERTAKE_S = 10.0  # serve.queue_max_overtake_s' default


class QueueFull(Exception):
    """`max_waiting` requests already wait: the gateway answers 429 with `headers` (Retry-After)."""

    status = 429

    def __init__(self, retry_after_s: int, waiting: int) -> None:
        self.retry_after_s = retry_after_s
        message = f"the gateway is at capacity and {waiting} requests are already waiting; retry after {retry_after_s}s"
        super().__init__(message)
        self.headers = {"retry-after": str(retry_after_s)}
        self.error = {"error": {"message": message, "type": "rate_limit_error", "code": "queue_full"}}


class ClientDisconnected(Exception):
    """The client went away while its request waited; there is nobody to answer (nginx logs 499)."""

    status = 499


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (as serving.gateway computes p95)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class AdmissionQueue:
    """`async with queue.admit(priority, request.is_disconnected):` around forwarding a request.

    Slots are handed over, not raced for: a request finishing gives its slot straight to the
    best waiter, so a newcomer cannot overtake the queue. The best waiter is the oldest one once
    it has waited `max_overtake_s`, else the highest priority (first come first served within a
    priority). `poll_s` is how often a waiter asks `disconnected()`; `clock` is injectable for
    tests."""

    def __init__(
        self, capacity: int, max_waiting: int, poll_s: float = 0.1, clock: Callable[[], float] = time.monotonic, max_overtake_s: float = MAX_OVERTAKE_S,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if not max_overtake_s > 0:
            raise ValueError(f"max_overtake_s must be > 0, got {max_overtake_s}")
        self.capacity, self.max_waiting, self.poll_s, self.clock = capacity, max_waiting, poll_s, clock
        self.max_overtake_s = max_overtake_s
        self.in_flight = 0
        self._heap: list[tuple[int, int, float, asyncio.Future[None]]] = []  # (-priority, arrival, arrived at, future)
        self._by_arrival: OrderedDict[int, tuple[int, int, float, asyncio.Future[None]]] = OrderedDict()  # the same entries, oldest first
        self._arrivals = itertools.count()
        self.admitted = self.rejected_full = self.dropped_disconnected = self.cancelled = 0
        self.admitted_by_age = 0  # of `admitted`: handed a slot ahead of higher priorities, having waited max_overtake_s
        self.waits_s: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=WAIT_SAMPLES))
        self._holds_s: deque[float] = deque(maxlen=HOLD_SAMPLES)

    @property
    def waiting(self) -> int:
        return len(self._heap)

    @asynccontextmanager
    async def admit(self, priority: int = 0, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator["Admission"]:
        """Hold one in-flight slot for the body of the `async with`. Raises QueueFull at once when
        the queue is full, ClientDisconnected when `disconnected()` turns true while waiting."""
        admission = await self.acquire(priority, disconnected)
        try:
            yield admission
        finally:
            admission.release()

    async def acquire(self, priority: int = 0, disconnected: Callable[[], Awaitable[bool]] | None = None) -> "Admission":
        """As admit(), for a slot that outlives the handler: a streamed answer holds it until the
        stream ends, so the caller releases it in the stream's `finally`."""
        await self._acquire(priority, disconnected)
        return Admission(self)

    async def _acquire(self, priority: int, disconnected: Callable[[], Awaitable[bool]] | None) -> None:
        arrived = self.clock()
        if self.in_flight < self.capacity and not self._heap:
            self.in_flight += 1
            self._admitted(priority, arrived)
            return
        if len(self._heap) >= self.max_waiting:
            self.rejected_full += 1
            raise QueueFull(self.retry_after_s(), len(self._heap))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._arrivals), arrived, future)
        heapq.heappush(self._heap, entry)
        self._by_arrival[entry[1]] = entry
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=None if disconnected is None else self.poll_s)
                if disconnected is not None and not future.done() and await disconnected():
                    self.dropped_disconnected += 1
                    raise ClientDisconnected("the client disconnected while its request waited for a slot")
        except BaseException as exc:  # dropped, cancelled, or disconnected() itself failed
            self.cancelled += not isinstance(exc, ClientDisconnected)
            if future.done():  # the slot was handed over meanwhile: pass it on
                self._release()
            else:
                self._remove(entry)
            raise
        self._admitted(priority, arrived)

    def _admitted(self, priority: int, arrived: float) -> None:
        self.admitted += 1
        self.waits_s[priority].append(self.clock() - arrived)

    def _remove(self, entry: tuple[int, int, float, asyncio.Future[None]]) -> None:
        self._heap.remove(entry)  # at most max_waiting entries: a linear removal is cheap
        heapq.heapify(self._heap)
        del self._by_arrival[entry[1]]

    def _next(self) -> tuple[int, int, float, asyncio.Future[None]]:
        """The waiter the next free slot goes to: the oldest once it has waited max_overtake_s
        (nothing that arrived after it goes first then), else the highest priority."""
        oldest = next(iter(self._by_arrival.values()))
        if oldest is not self._heap[0] and self.clock() - oldest[2] >= self.max_overtake_s:
            self.admitted_by_age += 1
            self._remove(oldest)
            return oldest
        entry = heapq.heappop(self._heap)
        del self._by_arrival[entry[1]]
        return entry

    def _release(self) -> None:
        """Hand the slot to the best waiter, or free it when none waits."""
        if self._heap:
            self._next()[3].set_result(None)  # in_flight unchanged: the slot changes hands
        else:
            self.in_flight -= 1

    def _done(self, held_s: float) -> None:
        self._holds_s.append(held_s)
        self._release()

    def retry_after_s(self) -> int:
        """Whole seconds until a place is likely free: the recent mean time in flight, times the
        rounds of `capacity` needed to serve who waits; at least 1, at most a minute."""
        if not self._holds_s:
            return 1
        mean = sum(self._holds_s) / len(self._holds_s)
        rounds = (len(self._heap) + 1) / self.capacity
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(mean * rounds)))

    def stats(self) -> dict[str, Any]:
        """Counters and per-priority p50/p95 waits (seconds), for /metrics or a test."""
        waits = {p: sorted(samples) for p, samples in self.waits_s.items()}
        return {
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "admitted": self.admitted,
            "rejected_full": self.rejected_full,
            "dropped_disconnected": self.dropped_disconnected,
            "cancelled": self.cancelled,
            "admitted_by_age": self.admitted_by_age,
            "max_overtake_s": self.max_overtake_s,
            "wait_s": {p: {"samples": len(w), "p50": percentile(w, 0.50), "p95": percentile(w, 0.95)} for p, w in sorted(waits.items())},
        }


class Admission:
    """One in-flight slot; release() gives it back, once, however often it is called."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self._queue, self._started = queue, queue.clock()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._queue._done(self._queue.clock() - self._started)
