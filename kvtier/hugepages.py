"""Back the block index with 2 MiB pages.

At a million blocks the daemon's index (the dicts and the ``Block`` objects, the policy's
queues, the allocator's maps) is several hundred MiB of private memory, and every key of a
Lookup or Acquire touches a few places in it that are nowhere near each other. With 4 KiB
pages nearly each of those touches also misses the TLB; a 256-key Lookup at 1M blocks took
about 3x its time at 10k in process, most of the difference page walks. With 2 MiB pages
the same memory needs 512x fewer TLB entries.

Linux gives anonymous memory huge pages by itself only when transparent huge pages are set
to ``always``; many distributions ship ``madvise``, and then only ranges a process asks for
get them. ``Collapser.tick()`` runs on the daemon's main loop every ``server.huge_pages_s``
seconds and hands the work to a thread of its own that reads ``/proc/self/smaps``, picks
the private anonymous mappings that are at least ``DENSITY`` resident (the heap, Python's
object arenas, large dict tables; thread stacks and the reserve of a malloc arena are
sparse and left alone, so collapsing costs at most a few percent more resident memory) and
asks the kernel to collapse them in place (``MADV_COLLAPSE``, Linux 6.1+, independent of
the system-wide THP setting unless a mapping opted out with ``MADV_NOHUGEPAGE``). The
call copies each 2 MiB range into a huge page without the GIL; the daemon's other
threads go on, each pausing only for a range it touches while that range is copied.

The first pass probes a scratch mapping of its own: where the kernel has no
``MADV_COLLAPSE`` (EINVAL), or the process is barred from huge pages (``PR_SET_THP_DISABLE``,
EPERM), it says so once and the passes stop. A mapping that refuses on its own (EINVAL: a
special mapping some library made) is skipped from then on; the others are still collapsed. ``huge_bytes()`` reports the process's ``AnonHugePages`` for the metrics.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import threading
import time

from .arena import HUGEPAGE as HUGE, _address, _libc

log = logging.getLogger("kvtier.hugepages")

MADV_COLLAPSE = 25
DENSITY = 0.9          # resident share a mapping needs before it is collapsed
SMAPS = "/proc/self/smaps"


class Mapping:
    __slots__ = ("start", "end", "rss", "huge", "flags", "private_anon")

    def __init__(self, start: int, end: int, private_anon: bool) -> None:
        self.start, self.end = start, end
        self.private_anon = private_anon
        self.rss = self.huge = 0
        self.flags: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    def range(self) -> tuple[int, int]:
        """The whole 2 MiB pages inside the mapping."""
        a = (self.start + HUGE - 1) & ~(HUGE - 1)
        b = self.end & ~(HUGE - 1)
        return a, max(a, b)

    def worth_collapsing(self) -> bool:
        a, b = self.range()
        return (self.private_anon and b - a >= HUGE and "nh" not in self.flags
                and self.rss >= DENSITY * self.size and self.huge < self.rss - HUGE)


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of an smaps text: address range, whether private anonymous memory
    (no file, or the brk heap), Rss, AnonHugePages and VmFlags."""
    out: list[Mapping] = []
    cur: Mapping | None = None
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            fields = rest.split(None, 4)
            perms = fields[0] if fields else ""
            path = fields[4].strip() if len(fields) > 4 else ""
            cur = Mapping(int(lo, 16), int(hi, 16),
                          private_anon=perms.startswith("rw") and perms.endswith("p") and path in ("", "[heap]"))
            out.append(cur)
        elif cur is None:
            continue
        elif head == "Rss:":
            cur.rss = int(rest.split()[0]) << 10
        elif head == "AnonHugePages:":
            cur.huge = int(rest.split()[0]) << 10
        elif head == "VmFlags:":
            cur.flags = tuple(rest.split())
    return out


def huge_bytes(pid: int | str = "self") -> int:
    """AnonHugePages of a process (this one by default), bytes (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) without the GIL; 0, or the errno it failed with."""
    return 0 if _libc.madvise(addr, length, advice) == 0 else ctypes.get_errno()


def probe(advise=madvise) -> int:
    """Can this process have huge pages on request? Collapses a 2 MiB range of a scratch
    mapping of its own; 0, or the errno (EINVAL: no MADV_COLLAPSE in this kernel; EPERM:
    huge pages disabled for the process)."""
    try:
        m = mmap.mmap(-1, 2 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        return e.errno or errno.ENOMEM
    try:
        off = -_address(m) % HUGE
        m[off:off + HUGE] = b"\1" * HUGE   # resident: only present pages are collapsed
        return advise(_address(m) + off, HUGE, MADV_COLLAPSE)
    finally:
        m.close()


class Collapser:
    """Every ``every_s`` seconds (0: never), collapse the dense private mappings of this process
    into huge pages, on a thread of its own so ``tick()`` never waits."""

    def __init__(self, every_s: float, clock=time.monotonic, smaps: str = SMAPS, advise=madvise) -> None:
        self.every_s = every_s
        self.clock = clock
        self.smaps = smaps
        self._advise = advise
        self.runs = 0
        self.collapsed_bytes = 0      # bytes of ranges the kernel collapsed, since start
        self.unsupported = ""         # why collapsing stopped for good ("" while it is tried)
        self._probed = False
        self._refused: set[tuple[int, int]] = set()  # mappings the kernel will not collapse
        self._next = clock() + every_s
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Start a pass if it is time and none is running; True if it started one."""
        if not self.every_s or self.unsupported:
            return False
        now = self.clock()
        if now < self._next or (self._thread is not None and self._thread.is_alive()):
            return False
        self._next = now + self.every_s
        self._thread = threading.Thread(target=self._guarded, name="kvtier-hugepages", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _guarded(self) -> None:
        try:
            self.run_once()
        except Exception:
            log.exception("huge pages: a pass failed")

    def run_once(self) -> int:
        """One pass now, on the calling thread; returns the bytes it asked the kernel to collapse."""
        if not self._probed:
            self._probed = True
            err = probe(self._advise)
            if err in (errno.EINVAL, errno.EPERM, errno.ENOSYS):
                self._stop_for_good(f"MADV_COLLAPSE refused ({errno.errorcode.get(err, err)}): "
                                    "this kernel or process has no huge pages on request")
                return 0
        try:
            with open(self.smaps) as f:
                maps = parse_smaps(f.read())
        except OSError as e:
            self._stop_for_good(f"cannot read {self.smaps}: {e.strerror}")
            return 0
        asked = 0
        if len(self._refused) > 4096:
            self._refused.clear()
        for m in maps:
            if not m.worth_collapsing() or (m.start, m.end) in self._refused:
                continue
            a, b = m.range()
            err = self._advise(a, b - a, MADV_COLLAPSE)
            if not err:
                asked += b - a
            elif err == errno.EPERM:
                self._stop_for_good("MADV_COLLAPSE refused (EPERM): huge pages are disabled for this process")
                return asked
            elif err == errno.EINVAL:  # this mapping cannot have them (a device or special mapping)
                self._refused.add((m.start, m.end))
            # EAGAIN (no huge page free right now), ENOMEM, EFAULT (unmapped meanwhile): next pass
        self.runs += 1
        self.collapsed_bytes += asked
        if asked:
            log.debug("huge pages: collapsed %d MiB of the index", asked >> 20)
        return asked

    def _stop_for_good(self, why: str) -> None:
        self.unsupported = why
        log.info("huge pages: %s; the index stays on 4 KiB pages", why)
