"""Per-slot headers of the RAM tier, kept beside the arena so a restart keeps RAM.

The arena file holds block bytes only; this file (``<arena_path>.slots`` on the
same tmpfs; in /dev/shm when the arena is on hugetlbfs, see ``table_path``)
holds one fixed-size entry per committed block, so a daemon
that restarts (crash, upgrade, ``systemctl restart``) can re-attach the arena
and rebuild its index instead of starting cold.

    header (64 bytes): magic b"KVTSLOTS", version u32, entry size u32, capacity u64 (entries),
                       arena id u64 (kvtier.arena; 0: not recorded, a table of an older version),
                       pins generation u64 (the arena generation of the run that recorded the
                       entries' pins; 0: none)
    entry i at 64 + i * 160:
         0  u32  magic 0x53545645 ("EVTS") when in use, 0 when free
         4  u8   namespace length N      5  u8  key length K     6  u16 state: 1 committed, 2 reserved
         8  u64  arena offset           16  u64 block length
        24  16s  xxh3-128 of the block  40  f64 created (unix seconds)
        48  64s  namespace (N bytes)   112  32s key (K bytes)
       144  u32  xxh32 of bytes 0..143 (entry check)
       148  f64  pinned until (unix seconds; inf: until unpinned; 0: not pinned)
       156  4 bytes reserved

Pins are trusted at a restart only when the run before was one that records them: a version
that predates pins (a rollback) leaves their bytes as they were while it unpins, deletes and
reuses entries, so a later start would pin again what was unpinned, or a block that took over
an entry. Every run writes its arena generation here at start; the next start compares it
with the generation it found in the arena's header (the last run's, whichever version it
was) and, when they differ, drops every recorded pin.

Write order makes every crash safe: a reserved slot gets a "reserved" entry
before its offset is handed to a client; the entry turns "committed" only
after the block's bytes are final (at commit, after the checksum), and is
cleared before its slot is freed; a torn entry fails its check and is ignored.
Slots that were reserved at a crash may still be written by a client that
outlived the daemon, so a restart keeps them out of use for a while
(``hot.QUARANTINE_S``, at most one reservation lifetime) before freeing them. On restart
each surviving entry is bounds-checked, checked for overlap with the others,
and (``ram.verify_on_restart``) its block re-hashed; anything doubtful is
dropped. Process crashes lose nothing here (tmpfs pages belong to the kernel);
a reboot empties tmpfs and the RAM tier starts cold, as it should.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Iterator

import xxhash

from .arena import open_own

HEADER = struct.Struct("<8sII Q")
ARENA = struct.Struct("<Q")  # at HEADER.size: the id of the arena the entries describe
PINS_GENERATION = struct.Struct("<Q")  # after it: the arena generation whose run recorded the pins
PINS_GENERATION_AT = HEADER.size + ARENA.size
MAGIC = b"KVTSLOTS"
VERSION = 1
ENTRY = 160
ENTRY_FIXED = struct.Struct("<IBBHQQ16sd64s32s")  # 144 bytes
ENTRY_MAGIC = 0x53545645
COMMITTED, RESERVED = 1, 2
BASE = 64
_CHECK = struct.Struct("<I")
PIN = struct.Struct("<d")  # at entry offset 148: outside the entry check, read as 0 when not sane
PIN_AT = 148


def table_path(arena_path: str, backing: str, shm_dir: str = "/dev/shm") -> str:
    """Where an arena's slot table lives: beside the arena, except on hugetlbfs, which holds
    only files of whole huge pages (a small file cannot be sized there): then in ``shm_dir``
    (tmpfs, which outlives the daemon like the arena), named after the arena's path."""
    if backing != "hugetlbfs":
        return arena_path + ".slots"
    name = os.path.abspath(arena_path).strip("/").replace("/", "_")
    return os.path.join(shm_dir, f"kvtier-slots.{name}")


class SlotTable:
    def __init__(self, path: str, fresh: bool, arena_id: int = 0):
        self.path = path
        # in /dev/shm (hugetlbfs arenas) anyone may have made the name first: only a regular file
        # of the daemon's own is used, and it is emptied (fresh) only once that is known
        self.fd = open_own(path, os.O_RDWR | os.O_CREAT, "slot table")
        os.fchmod(self.fd, 0o600)
        size = os.fstat(self.fd).st_size
        # a table of another arena: a start that made a new arena (its size changed) was stopped
        # before it formatted the table, and the next one re-attached that new arena
        self.foreign = not fresh and size >= BASE + ENTRY and self._header_ok() and arena_id != 0 \
            and self._arena_id() not in (0, arena_id)
        if fresh or size < BASE + ENTRY or not self._header_ok() or self.foreign:
            self._format(1024)
        else:
            self.mm = mmap.mmap(self.fd, size)
            self.capacity = (size - BASE) // ENTRY
        if arena_id:
            ARENA.pack_into(self.mm, HEADER.size, arena_id)
        self._free: list[int] = []
        self._top = 0  # entries below are in use or in _free

    def _header_ok(self) -> bool:
        head = os.pread(self.fd, HEADER.size, 0)
        if len(head) < HEADER.size:
            return False
        magic, version, esize, _ = HEADER.unpack(head)
        return magic == MAGIC and version == VERSION and esize == ENTRY

    @property
    def pins_generation(self) -> int:
        return PINS_GENERATION.unpack_from(self.mm, PINS_GENERATION_AT)[0]

    @pins_generation.setter
    def pins_generation(self, generation: int) -> None:
        PINS_GENERATION.pack_into(self.mm, PINS_GENERATION_AT, generation)

    def _arena_id(self) -> int:
        return ARENA.unpack(os.pread(self.fd, ARENA.size, HEADER.size))[0]

    def _format(self, capacity: int) -> None:
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, BASE + capacity * ENTRY)
        self.mm = mmap.mmap(self.fd, BASE + capacity * ENTRY)
        self.mm[:HEADER.size] = HEADER.pack(MAGIC, VERSION, ENTRY, capacity)
        self.capacity = capacity

    def _grow(self) -> None:
        cap = self.capacity * 2
        os.ftruncate(self.fd, BASE + cap * ENTRY)
        self.mm.resize(BASE + cap * ENTRY)
        self.mm[:HEADER.size] = HEADER.pack(MAGIC, VERSION, ENTRY, cap)
        self.capacity = cap

    # ---- reading back (restart) ---------------------------------------------------------

    def entries(self) -> Iterator[tuple[int, str, bytes, int, int, bytes, float, int]]:
        """(index, ns, key, offset, length, checksum, created, state) of every intact entry."""
        mm = self.mm
        for i in range(self.capacity):
            p = BASE + i * ENTRY
            if mm[p:p + 4] != b"EVTS":
                continue
            raw = mm[p:p + ENTRY_FIXED.size]
            (check,) = _CHECK.unpack_from(mm, p + ENTRY_FIXED.size)
            if xxhash.xxh32_intdigest(raw) != check:
                continue
            _, n, k, state, off, length, digest, created, nsb, keyb = ENTRY_FIXED.unpack(raw)
            try:
                ns = nsb[:n].decode()
            except UnicodeDecodeError:
                continue
            if state in (COMMITTED, RESERVED):
                yield i, ns, keyb[:k], off, length, digest, created, state

    def adopt(self, used: set[int]) -> None:
        """After a restart: entries in ``used`` stay, every other one is cleared and reusable."""
        for i in range(self.capacity):
            if i not in used:
                self.clear(i)
        self._top = self.capacity
        self._free = sorted(set(range(self.capacity)) - used, reverse=True)

    # ---- writing ------------------------------------------------------------------------

    def put(self, ns: str, key: bytes, offset: int, length: int, digest: bytes, created: float,
            state: int = 1, at: int = -1) -> int:
        """Write an entry (at index ``at``, or a free one); returns its index."""
        if at >= 0:
            i = at
        elif self._free:
            i = self._free.pop()
        else:
            if self._top >= self.capacity:
                self._grow()
            i = self._top
            self._top += 1
        nsb = ns.encode()
        raw = ENTRY_FIXED.pack(ENTRY_MAGIC, len(nsb), len(key), state, offset, length, digest, created, nsb, key)
        p = BASE + i * ENTRY
        self.mm[p:p + ENTRY_FIXED.size] = raw
        self.mm[p + ENTRY_FIXED.size:p + ENTRY_FIXED.size + 4] = _CHECK.pack(xxhash.xxh32_intdigest(raw))
        PIN.pack_into(self.mm, p + PIN_AT, 0.0)  # a new entry is not pinned (another block's pin may be there)
        return i

    def set_pin(self, i: int, until: float) -> None:
        """Record entry i's pin: until (unix seconds, inf: until unpinned), 0 for none."""
        if i >= 0:
            PIN.pack_into(self.mm, BASE + i * ENTRY + PIN_AT, until)

    def pin_of(self, i: int) -> float:
        """Entry i's recorded pin (0: none, or not a sane value)."""
        (v,) = PIN.unpack_from(self.mm, BASE + i * ENTRY + PIN_AT)
        return v if v == v and v > 0 else 0.0

    def clear(self, i: int) -> None:
        p = BASE + i * ENTRY
        self.mm[p:p + 4] = b"\0\0\0\0"

    def release(self, i: int) -> None:
        """Clear entry i and make it reusable."""
        self.clear(i)
        self._free.append(i)

    def close(self, unlink: bool = False) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class NullSlots:
    """RAM persistence off: nothing is recorded."""

    def put(self, *a) -> int:
        return -1

    def set_pin(self, i: int, until: float) -> None:
        pass

    def release(self, i: int) -> None:
        pass

    def close(self, unlink: bool = False) -> None:
        pass
