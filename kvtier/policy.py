"""Eviction policies, chosen by name from ``POLICIES``.

A policy only orders candidates; the hot tier decides what is evictable. It
tracks the blocks the tier may evict: a block leaves the policy while it is
pinned and comes back afterwards. A leased block keeps its place; if
``victim()`` offers it, the tier skips it and it stays out of the policy until
its last lease ends, so each block is skipped at most once per lease and
skipping never loops.

Interface (all O(1) amortised):
    insert(key, size, read=False)
                        a block became evictable (new, or unpinned/released); read: it was
                        just read (a lease ended), the same as insert then touch
    touch(key)          the block was read
    remove(key) -> bool the block is no longer evictable (pinned, deleted); False if
                        the key was not tracked
    victim() -> key     remove and return the next block to evict, or None
    spare(key)          the key victim() just returned was not evicted (leased): forget that
                        it was (S3-FIFO's ghost), so it comes back as a block that was not
    __len__, __contains__

Keys are any hashable. The hot tier passes its Block objects themselves, which hash by
identity: a lookup then compares pointers instead of following a (namespace, key) tuple to
its bytes, which matters once the index outgrows the CPU caches. A key that must be
recognised after its object is gone (S3-FIFO's ghost) goes through ``ghost_key``, which maps
a key to a value that identifies its content (the hot tier: ``(ns, key)``).

``reads`` (S3-FIFO; its ``lazy_reads`` is then true, LRU's never is): the caller counts reads on the key
itself instead of calling ``touch``, and ``reads(key)`` hands over (and zeroes) the count
when the policy needs it: when the key comes round in its queue, and when it is inserted. A
read then costs no lookup in the queues, which at a million blocks are each a few cache
misses. LRU has no such hook: its order is the reads' order, kept by ``touch``.

``lru``: least recently used first. Simple; a scan of one-off blocks flushes it.
``s3fifo``: S3-FIFO (Yang et al., SOSP'23): new blocks enter a small FIFO
(10% of bytes); those read again before they leave it move to the main FIFO,
the rest are evicted and remembered in a ghost FIFO, so a block seen again soon
goes straight to main. Scan-resistant: one-off prefixes (a long document read
once) leave without pushing out the shared system prompts that are read often.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

_GONE = object()


class LRU:
    name = "lru"
    lazy_reads = False

    def __init__(self, ghost_key: Callable[[Hashable], Hashable] | None = None,
                 reads: Callable[[Hashable], int] | None = None) -> None:
        # ghost_key: unused (no ghost); reads: unused (the order of reads is LRU's order)
        self._od: OrderedDict[Hashable, int] = OrderedDict()

    def insert(self, key: Hashable, size: int, read: bool = False) -> None:
        self._od[key] = size  # read or not, it is now the most recent
        self._od.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._od:
            self._od.move_to_end(key)

    def remove(self, key: Hashable) -> bool:
        return self._od.pop(key, _GONE) is not _GONE

    def victim(self) -> Hashable | None:
        if not self._od:
            return None
        key, _ = self._od.popitem(last=False)
        return key

    def spare(self, key: Hashable) -> None:
        pass  # no ghost

    def __len__(self) -> int:
        return len(self._od)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._od


class S3FIFO:
    name = "s3fifo"
    SMALL_FRACTION = 0.10
    MAX_FREQ = 3  # a read count fits the two low bits of a queue entry

    def __init__(self, ghost_key: Callable[[Hashable], Hashable] | None = None,
                 reads: Callable[[Hashable], int] | None = None) -> None:
        # key -> size << 2 | frequency (0..MAX_FREQ): one entry per block, in one of the two
        # queues; no separate frequency table (a lookup fewer per call, ~40 B less per block)
        self._reads = reads
        self.lazy_reads = reads is not None
        self._small: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()  # ghost_key(key) of evicted keys
        self._gk = ghost_key or (lambda key: key)
        self._small_bytes = 0
        self._main_bytes = 0

    def insert(self, key: Hashable, size: int, read: bool = False) -> None:
        if key in self._main or key in self._small:
            self.remove(key)
        if self._reads is not None:
            self._reads(key)  # reads from before it left the policy are not carried over
        v = size << 2 | (1 if read else 0)
        if self._ghost and self._ghost.pop(self._gk(key), _GONE) is None:
            self._main[key] = v
            self._main_bytes += size
        else:
            self._small[key] = v
            self._small_bytes += size

    def touch(self, key: Hashable) -> None:
        for q in (self._main, self._small):
            v = q.get(key)
            if v is not None:
                if v & 3 < self.MAX_FREQ:
                    q[key] = v + 1  # an existing key keeps its place
                return

    def remove(self, key: Hashable) -> bool:
        v = self._main.pop(key, None)
        if v is not None:
            self._main_bytes -= v >> 2
            return True
        v = self._small.pop(key, None)
        if v is None:
            return False
        self._small_bytes -= v >> 2
        return True

    def spare(self, key: Hashable) -> None:
        self._ghost.pop(self._gk(key), None)

    def _remember(self, key: Hashable) -> None:
        self._ghost[self._gk(key)] = None
        # ghost holds about as many keys as main does blocks
        while len(self._ghost) > max(64, len(self._main) + len(self._small)):
            self._ghost.popitem(last=False)

    def _freq(self, key: Hashable, v: int) -> int:
        """The queue entry v with the reads counted outside the policy added in."""
        n = self._reads(key) if self._reads is not None else 0
        return v if not n else (v & ~3) | min(self.MAX_FREQ, (v & 3) + n)

    def victim(self) -> Hashable | None:
        while self._small or self._main:
            total = self._small_bytes + self._main_bytes
            if self._small and (self._small_bytes >= self.SMALL_FRACTION * total or not self._main):
                key, v = self._small.popitem(last=False)
                v = self._freq(key, v)
                size = v >> 2
                self._small_bytes -= size
                if v & 3:  # read while in small: on to main, its count reset
                    self._main[key] = size << 2
                    self._main_bytes += size
                    continue
                self._remember(key)
                return key
            key, v = self._main.popitem(last=False)
            v = self._freq(key, v)
            if v & 3:  # read since it last came round: once more, one count less
                self._main[key] = v - 1
                continue
            self._main_bytes -= v >> 2
            return key
        return None

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._main or key in self._small


POLICIES = {cls.name: cls for cls in (LRU, S3FIFO)}
