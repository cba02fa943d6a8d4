"""The gateway's admission queue: priority order, backpressure, disconnects and cancellation.

Ordering is asserted by the order of admission, never by timing: the queue's slot is held by
a task the test releases itself, and `settle()` lets every ready task run before a check.
"""

from __future__ import annotations

import asyncio

import pytest

from serving.queue import Admission, AdmissionQueue, ClientDisconnected, QueueFull


async def settle() -> None:
    """Run every task that is ready until none is (a few loop turns suffice; no clock involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def hold(queue: AdmissionQueue, release: asyncio.Event, priority: int = 0) -> None:
    async with queue.admit(priority):
        await release.wait()


def accounted(queue: AdmissionQueue, arrivals: int) -> bool:
    """Every arrival is in exactly one counter or still waiting."""
    s = queue.stats()
    return s["admitted"] + s["rejected_full"] + s["dropped_disconnected"] + s["cancelled"] + s["waiting"] == arrivals


def test_higher_priority_is_admitted_first_fifo_within_a_priority():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=10)
        release = asyncio.Event()
        holder = asyncio.create_task(hold(queue, release))
        await settle()
        order: list[str] = []

        async def waiter(name: str, priority: int) -> None:
            async with queue.admit(priority):
                order.append(name)
                await settle()  # hold the slot a moment: the next one must wait for it

        arrivals = [("low-1", 0), ("mid-1", 5), ("low-2", 0), ("high", 10), ("mid-2", 5)]
        tasks = []
        for name, priority in arrivals:
            tasks.append(asyncio.create_task(waiter(name, priority)))
            await settle()  # arrive in this order
        assert queue.waiting == 5 and order == []
        release.set()
        await asyncio.gather(holder, *tasks)
        assert order == ["high", "mid-1", "mid-2", "low-1", "low-2"]
        stats = queue.stats()
        assert stats["admitted"] == 6 and stats["in_flight"] == 0 and stats["waiting"] == 0
        assert stats["wait_s"][0]["samples"] == 3 and stats["wait_s"][10]["samples"] == 1
        assert stats["wait_s"][0]["p95"] >= stats["wait_s"][10]["p95"] >= 0  # low waited longest
        assert accounted(queue, 6)

    asyncio.run(run())


def test_capacity_bounds_in_flight_and_a_newcomer_cannot_overtake_waiters():
    async def run():
        queue = AdmissionQueue(capacity=2, max_waiting=5)
        release = asyncio.Event()
        holders = [asyncio.create_task(hold(queue, release)) for _ in range(2)]
        await settle()
        assert queue.in_flight == 2
        order: list[str] = []

        async def waiter(name: str) -> None:
            async with queue.admit():
                order.append(name)

        first = asyncio.create_task(waiter("first"))
        await settle()
        assert queue.waiting == 1 and order == []
        release.set()
        await asyncio.gather(*holders, first)
        second = asyncio.create_task(waiter("second"))
        await second
        assert order == ["first", "second"] and queue.in_flight == 0

    asyncio.run(run())


def test_full_queue_refuses_at_once_with_retry_after():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=2)
        release = asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, release)) for _ in range(3)]  # 1 in flight, 2 waiting
        await settle()
        assert (queue.in_flight, queue.waiting) == (1, 2)
        with pytest.raises(QueueFull) as refused:
            async with queue.admit(priority=100):  # not even a high priority gets past a full queue
                pytest.fail("admitted past a full queue")
        exc = refused.value
        assert exc.status == 429 and exc.retry_after_s >= 1
        assert exc.headers["retry-after"] == str(exc.retry_after_s)
        assert exc.error["error"]["code"] == "queue_full" and "retry after" in exc.error["error"]["message"]
        assert queue.rejected_full == 1
        release.set()
        await asyncio.gather(*tasks)
        assert accounted(queue, 4) and queue.in_flight == 0

    asyncio.run(run())


def test_no_waiting_room_refuses_when_all_slots_are_busy():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=0)
        release = asyncio.Event()
        holder = asyncio.create_task(hold(queue, release))
        await settle()
        with pytest.raises(QueueFull):
            await queue.acquire()
        release.set()
        await holder

    asyncio.run(run())


def test_disconnected_waiter_is_dropped_counted_and_frees_its_place():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=1, poll_s=0.001)
        release = asyncio.Event()
        holder = asyncio.create_task(hold(queue, release))
        await settle()
        gone = asyncio.Event()

        async def disconnected() -> bool:
            return gone.is_set()

        waiter = asyncio.create_task(queue.acquire(disconnected=disconnected))
        await settle()
        assert queue.waiting == 1
        gone.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(waiter, timeout=30)  # the timeout only turns a hang into a failure
        assert queue.dropped_disconnected == 1 and queue.waiting == 0
        # Its place in the queue is free again, and the slot goes to the next request.
        admitted = asyncio.create_task(queue.acquire())
        await settle()
        assert queue.waiting == 1
        release.set()
        await holder
        (await admitted).release()
        assert queue.in_flight == 0 and queue.admitted == 2 and accounted(queue, 3)

    asyncio.run(run())


def test_cancelled_waiter_leaks_no_slot():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=5)
        release = asyncio.Event()
        holder = asyncio.create_task(hold(queue, release))
        await settle()
        waiter = asyncio.create_task(queue.acquire())
        await settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert queue.waiting == 0 and queue.cancelled == 1
        release.set()
        await holder
        assert queue.in_flight == 0
        (await asyncio.wait_for(queue.acquire(), timeout=30)).release()  # the slot is free
        assert queue.in_flight == 0 and accounted(queue, 3)

    asyncio.run(run())


def test_waiter_cancelled_after_its_slot_was_handed_over_passes_it_on():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=5)
        holder = await queue.acquire()
        first = asyncio.create_task(queue.acquire(priority=1))
        second = asyncio.create_task(queue.acquire(priority=0))
        await settle()
        holder.release()  # hands the slot to `first`, which has not run since
        first.cancel()  # ... and is cancelled before it can
        with pytest.raises(asyncio.CancelledError):
            await first
        admission = await asyncio.wait_for(second, timeout=30)  # the slot went on to `second`
        assert queue.in_flight == 1
        admission.release()
        admission.release()  # releasing twice gives back one slot, not two
        assert queue.in_flight == 0 and queue.cancelled == 1 and accounted(queue, 3)

    asyncio.run(run())


def test_an_error_inside_the_block_releases_the_slot():
    async def run():
        queue = AdmissionQueue(capacity=1, max_waiting=0)
        with pytest.raises(RuntimeError):
            async with queue.admit():
                raise RuntimeError("the backend call failed")
        assert queue.in_flight == 0
        async with queue.admit():
            assert queue.in_flight == 1

    asyncio.run(run())


def test_a_low_priority_waiter_is_overtaken_for_at_most_max_overtake_s_under_sustained_high_priority_load():
    """Two high-priority clients keep a request waiting at all times (as the plane release
    test's 8 gold clients do through one slot); each answer takes a second of the injected clock.
    The free request is overtaken while it is young, and served as soon as it has waited
    max_overtake_s, ahead of the high-priority requests that arrived after it.

    Seen red: with the handover back to strict priority (`_next` always popping the heap) ->
    "the priority-0 request is still waiting after 30 handovers (30 s) of sustained priority-10
    load: starved", at once; the plane release test had hung 8 free clients until their 180 s
    timeout."""

    async def run():
        now = [0.0]
        queue = AdmissionQueue(capacity=1, max_waiting=10, clock=lambda: now[0], max_overtake_s=5)
        order: list[str] = []

        async def client(name: str, priority: int) -> Admission:
            admission = await queue.acquire(priority)
            order.append(name)
            return admission

        holder = await client("high-0", 10)
        waiting = [asyncio.create_task(client("high-1", 10))]
        await settle()
        low = asyncio.create_task(client("low", 0))
        await settle()
        for n in range(2, 32):
            waiting.append(asyncio.create_task(client(f"high-{n}", 10)))  # high-priority load never lets up
            await settle()
            now[0] += 1.0
            holder.release()  # the slot goes to the best waiter
            await settle()
            holder = low.result() if low.done() else await waiting.pop(0)  # the slot went to low, or to the oldest high
            if low.done():
                break
        assert low.done(), f"the priority-0 request is still waiting after {n - 1} handovers ({now[0]:g} s) of sustained priority-10 load: starved"
        # Handovers at 1..4 s go to high-1..high-4, which arrived after it; the one at 5 s to it.
        assert order[:6] == ["high-0", "high-1", "high-2", "high-3", "high-4", "low"], "overtaken while young, first once it waited 5 s"
        assert queue.admitted_by_age == 1 and queue.stats()["admitted_by_age"] == 1
        holder.release()
        for task in waiting:  # the high-priority requests still waiting go on in their order
            (await task).release()
        assert order[6:] == ["high-5", "high-6"] and queue.in_flight == 0 and accounted(queue, 8)

    asyncio.run(run())


def test_without_load_from_higher_priorities_an_old_waiter_changes_nothing():
    """The bound only ever moves the oldest waiter forward: among waiters of one priority,
    first come first served holds however long they waited, and is not counted as by age."""

    async def run():
        now = [0.0]
        queue = AdmissionQueue(capacity=1, max_waiting=10, clock=lambda: now[0], max_overtake_s=1)
        holder = await queue.acquire(5)
        order: list[int] = []

        async def waiter(i: int) -> None:
            async with queue.admit(5):
                order.append(i)

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(waiter(i)))
            await settle()
        now[0] += 60
        holder.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3] and queue.admitted_by_age == 0 and queue.in_flight == 0

    asyncio.run(run())


@pytest.mark.parametrize("capacity, max_waiting, max_overtake_s", [(0, 1, 10), (1, -1, 10), (1, 1, 0)])
def test_bad_sizes_are_refused(capacity, max_waiting, max_overtake_s):
    with pytest.raises(ValueError):
        AdmissionQueue(capacity, max_waiting, max_overtake_s=max_overtake_s)
