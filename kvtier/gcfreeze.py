"""Keep the cyclic garbage collector off the block index.

Every block in RAM is a ``Block`` object that Python's cyclic collector tracks. A full
collection walks all of them with the GIL held: about 330 ms at 1M blocks on the benchmark
machine, during which no RPC, data-channel call or NVMe completion of the daemon runs. One
comes each time about a quarter of the tracked objects are new since the last one, so a
busy cache that turns over pays it again and again. Blocks cannot form reference cycles
(their fields are strings, bytes and numbers), so those walks find nothing.

``Freezer.tick()`` runs on the daemon's main loop: every ``server.gc_freeze_s`` seconds it
moves every tracked object into the permanent generation (``gc.freeze()``), and collections
walk only what was made since. Frozen objects are still freed the moment their last
reference goes (reference counting does not look at generations); what a freeze gives up is
finding reference *cycles* among the objects alive at that moment. Those are the index and
the daemon's long-lived machinery, plus the few objects of calls in flight; should one of
the latter end up in a cycle, it stays until the daemon restarts.
``kvtier_gc_frozen_objects`` (frozen objects still alive, or kept by such a cycle) follows
the block count when nothing is kept; see tests/test_gcfreeze.py.

``Pauses`` times every collection (``gc.callbacks``) for the metrics: collections and
seconds per generation, and the longest pause.
"""
from __future__ import annotations

import gc
import threading
import time


class Pauses:
    """Collections and their pause time per generation, since install()."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._t0 = 0.0
        self._lock = threading.Lock()

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._t0
        g = info.get("generation", 2)
        with self._lock:
            self.count[g] += 1
            self.seconds[g] += dt
            self.longest = max(self.longest, dt)

    def install(self) -> "Pauses":
        gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def snapshot(self) -> dict:
        with self._lock:
            return {"collections": list(self.count), "seconds": list(self.seconds),
                    "longest_s": self.longest, "frozen": gc.get_freeze_count()}


class Freezer:
    """Freeze what is alive every ``every_s`` seconds (0: never)."""

    def __init__(self, every_s: float, clock=time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.freezes = 0
        self._next = clock() + every_s

    def tick(self) -> bool:
        """Freeze if it is time; True if it did."""
        if not self.every_s:
            return False
        now = self.clock()
        if now < self._next:
            return False
        gc.freeze()
        self.freezes += 1
        self._next = now + self.every_s
        return True
