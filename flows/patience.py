"""Waits measured in an idle machine's seconds.

A wait for a server that gives up after a fixed wall-clock time fails on a busy machine for
no fault of the server: on this project's 2-core machine, with another pipeline running
beside it, Prefect's temporary API server took longer than Prefect's 20 s default to answer
(12-22 s at a load of 3, from 4 s idle), and flows and tests failed before their first task.
`Patience(seconds)` counts time at the rate the machine gives it: wall time divided by how
oversubscribed the cores are (the 1-minute load average per core, at least 1). Sixty seconds
of patience are a minute on an idle machine and four at a load of 8 on 2 cores. A server
that really died is still caught at once by its own exit, which every wait also checks.
"""

from __future__ import annotations

import os
import time


def cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_factor() -> float:
    """How many runnable processes share each core now (>= 1): the rate at which a busy
    machine stretches the time a task needs."""
    try:
        return max(1.0, os.getloadavg()[0] / cores())
    except OSError:  # no load average on this platform
        return 1.0


class Patience:
    """A budget of `seconds` as an idle machine would spend them: `expired()` once that much
    wall time, each moment divided by the load factor of that moment, has passed."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.started = self._last = time.monotonic()
        self._spent = 0.0

    def spent(self) -> float:
        """Idle-machine seconds used so far."""
        now = time.monotonic()
        self._spent += (now - self._last) / load_factor()
        self._last = now
        return self._spent

    def expired(self) -> bool:
        return self.spent() >= self.seconds

    def waited(self) -> float:
        """Wall-clock seconds since the wait began."""
        return time.monotonic() - self.started

    def __str__(self) -> str:
        return f"{self.waited():.0f} s ({self.seconds:g} s of patience, stretched by the machine's load: now {load_factor():.1f} runnable processes per core)"


def stretched(seconds: float) -> float:
    """For an API that takes one fixed timeout (Prefect's test harness, run_deployment): an
    idle machine's `seconds` at the load of this moment."""
    return seconds * load_factor()
