"""The plane's supervisor: an engine process that exits, or fails its health check three times
in a row over at least `UNHEALTHY_AFTER_S` (a busy engine answers /health slowly; a hung one not
at all), is taken out of rotation at once and replaced by a new process of the same version,
which rejoins once healthy. Requests in flight on a dead engine are retried on a healthy replica
by the proxy (nothing had reached their clients), and while a version has no healthy replica the
proxy waits for one instead of failing.

A replica that keeps dying is restarted with a growing pause (1 s, 2 s, ... up to 60 s) so a
broken version does not spin the machine; every restart is an event in the plane's history.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from serving.plane.engines import healthy

if TYPE_CHECKING:
    from serving.plane.operations import Plane

log = logging.getLogger("serving.plane.supervisor")
FAILED_CHECKS = 3  # consecutive /health failures that make a live process "dead"...
UNHEALTHY_AFTER_S = 30.0  # ...when they span at least this long: saturation is not death
MAX_BACKOFF_S = 60.0


class Supervisor:
    def __init__(self, plane: Plane, interval_s: float = 0.5) -> None:
        self.plane, self.interval_s = plane, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[str, int] = {}
        self._failing_since: dict[str, float] = {}
        self._restarting: set[str] = set()
        self._last_restart: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self.restarts = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="plane-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No new checks or restarts; a restart under way is stopped by the plane's closing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any one bad check
                log.exception("supervisor check failed")

    def check(self) -> None:
        """One pass over every replica (also callable directly, as tests do)."""
        for name, replica in list(self.plane.replicas.items()):
            if name in self._restarting:
                continue
            code = replica.process.poll()
            if code is None:
                if healthy(replica.backend.base_url, timeout_s=5.0):
                    self._failed[name] = 0
                    self._failing_since.pop(name, None)
                    continue
                self._failed[name] = self._failed.get(name, 0) + 1
                since = self._failing_since.setdefault(name, time.monotonic())
                if self._failed[name] < FAILED_CHECKS or time.monotonic() - since < UNHEALTHY_AFTER_S:
                    continue
                why = f"failed /health {self._failed[name]} times in a row over {time.monotonic() - since:.0f}s"
            else:
                why = f"exited with code {code}"
            self._restart(name, why)

    def _restart(self, name: str, why: str) -> None:
        gateway = self.plane.require_gateway()
        gateway.set_healthy(name, False)  # out of rotation now, before the slow restart
        self._restarting.add(name)
        log.warning("replica %s %s: restarting it", name, why)
        threading.Thread(target=self._replace, args=(name, why), name=f"restart-{name}", daemon=True).start()

    def _replace(self, name: str, why: str) -> None:
        try:
            pause = self._backoff.get(name, 0.0)
            if time.monotonic() - self._last_restart.get(name, -1e9) > 5 * MAX_BACKOFF_S:
                pause = 0.0  # it ran fine for a long while: no penalty for an old crash
            if pause:
                time.sleep(pause)
            self._last_restart[name] = time.monotonic()
            self._backoff[name] = min(MAX_BACKOFF_S, max(1.0, 2 * pause))
            self.plane.restart_replica(name, why)
            self.restarts += 1
        except Exception as exc:
            log.error("replica %s could not be restarted: %s", name, exc)
            self.plane.event("restart_failed", replica=name, why=f"{why}; then {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            self._failed[name] = 0
            self._failing_since.pop(name, None)
            self._restarting.discard(name)
