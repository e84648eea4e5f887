"""Slot allocator for the arena: best-fit over free extents, with coalescing.

The arena's slot region [start, end) is carved into extents aligned to
``align`` bytes (4 KiB: page-aligned slots suit O_DIRECT and DMA). Free extents
are indexed twice: by (size, offset) in a sorted list for best-fit, and by both
ends (the start index kept sorted) so a freed extent merges with its free
neighbours, and a free overlapping free space is refused, in O(log n).

Best-fit with immediate coalescing keeps fragmentation low under mixed block
sizes: a workload of uniform blocks (the common case: one model, one block
shape) never fragments at all, and freeing always restores the largest extent
it can. When no extent fits, the caller evicts and retries (the hot tier walks
its eviction policy until ``largest_free()`` is large enough).

Not thread-safe: the hot tier calls it under its lock.
"""
from __future__ import annotations

from sortedcontainers import SortedDict, SortedList

_SHIFT = 48                 # offsets below 256 TiB: (size, offset) packs into one int
_OFF = (1 << _SHIFT) - 1


class ExtentAllocator:
    def __init__(self, start: int, end: int, align: int = 4096):
        if align <= 0 or align & (align - 1):
            raise ValueError("align must be a power of two")
        start = -(-start // align) * align
        end = end // align * align
        if end <= start:
            raise ValueError("region too small")
        self.start, self.end, self.align = start, end, align
        if end > 1 << _SHIFT:
            raise ValueError(f"region ends past {1 << _SHIFT} bytes")
        self._by_size = SortedList()          # size << _SHIFT | offset: (size, offset) order, as one int
        self._by_start = SortedDict()         # offset -> size
        self._by_end: dict[int, int] = {}     # offset+size -> offset
        self.free_bytes = 0
        self._insert(start, end - start)

    @property
    def capacity(self) -> int:
        return self.end - self.start

    def round(self, n: int) -> int:
        """Bytes a block of n bytes occupies."""
        return ((n - 1) | (self.align - 1)) + 1 if n > 0 else self.align

    def _insert(self, off: int, size: int) -> None:
        self._by_size.add(size << _SHIFT | off)
        self._by_start[off] = size
        self._by_end[off + size] = off
        self.free_bytes += size

    def _remove(self, off: int, size: int) -> None:
        self._by_size.remove(size << _SHIFT | off)
        del self._by_start[off]
        del self._by_end[off + size]
        self.free_bytes -= size

    def alloc(self, n: int) -> int | None:
        """Offset of a slot of round(n) bytes, or None if no free extent fits."""
        size = self.round(n)
        i = self._by_size.bisect_left(size << _SHIFT)
        if i == len(self._by_size):
            return None
        packed = self._by_size[i]
        fsize, off = packed >> _SHIFT, packed & _OFF
        self._remove(off, fsize)
        if fsize > size:
            self._insert(off + size, fsize - size)
        return off

    def alloc_at(self, off: int, n: int) -> bool:
        """Take the slot [off, off + round(n)) if it lies inside one free extent (restoring a
        slot recorded before a restart). False if any of it is already taken."""
        size = self.round(n)
        if off % self.align or off < self.start or off + size > self.end:
            return False
        i = self._by_start.bisect_right(off) - 1
        if i < 0:
            return False
        fstart, fsize = self._by_start.peekitem(i)
        if fstart + fsize < off + size:
            return False
        self._remove(fstart, fsize)
        if off > fstart:
            self._insert(fstart, off - fstart)
        if fstart + fsize > off + size:
            self._insert(off + size, fstart + fsize - off - size)
        return True

    def free(self, off: int, n: int) -> None:
        """Return the slot allocated at off for a block of n bytes."""
        size = self.round(n)
        if off < self.start or off + size > self.end or off % self.align:
            raise ValueError(f"free of a slot outside the region: {off}+{size}")
        # a double free overlaps free space: check the last free extent starting before this slot ends
        i = self._by_start.bisect_left(off + size)
        if i:
            foff, fsize = self._by_start.peekitem(i - 1)
            if foff + fsize > off:
                raise ValueError(f"double free at {off}")
        # merge with the free extent ending where this one starts, and the one starting where it ends
        left = self._by_end.get(off)
        if left is not None:
            lsize = self._by_start[left]
            self._remove(left, lsize)
            off, size = left, size + lsize
        right_size = self._by_start.get(off + size)
        if right_size is not None:
            self._remove(off + size, right_size)
            size += right_size
        self._insert(off, size)

    def largest_free(self) -> int:
        return self._by_size[-1] >> _SHIFT if self._by_size else 0

    def fits(self, n: int) -> bool:
        return self.largest_free() >= self.round(n)

    def extents(self) -> list[tuple[int, int]]:
        """Free extents as (offset, size), by offset (for tests and stats)."""
        return sorted(self._by_start.items())
