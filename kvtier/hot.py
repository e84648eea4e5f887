"""The hot tier: block index, reservations, leases and pins over the arena.

What it stores: committed blocks, each a slot of the shared-memory arena
(``kvtier.arena``) allocated by ``kvtier.alloc`` and described by an index
entry (namespace, key, offset, length, xxh3-128 checksum). What survives a
crash: nothing here (the index is in process memory); other tiers keep their
own copies.

Lifecycle of a block:

    reserve ──▶ RESERVED ──commit──▶ COMMITTED ──evict/delete──▶ freed
                   │ abort / TTL                   │ delete while leased
                   ▼                               ▼
                 freed                          DOOMED ──last release──▶ freed

* A reserved block is invisible until commit; an uncommitted reservation
  expires after its TTL and frees its slots (a dead client leaks nothing).
* Commit hashes the slot bytes outside the lock (``begin_commit`` /
  ``finish_commit``), so a long hash never blocks other calls; a reservation
  being committed cannot expire or be aborted meanwhile. A commit may instead
  trust the client's checksums (``ram.verify_on_commit``); its blocks then go
  to ``on_trusted`` to be re-hashed in the background (``kvtier.commitcheck``).
* A lease pins blocks against eviction and slot reuse until released or
  expired. An expired lease is unknown to ``release`` (NOT_FOUND): the client
  learns that the bytes it read may have been overwritten.
* What one tenant makes this tier hold beyond its quota's bytes is bounded:
  its live leases and the blocks they hold (TENANT_LEASES, TENANT_LEASED; a
  key repeated in one Acquire is held once), its pins (max_pinned of its
  quota), the namespaces it names without writing (IDLE_NAMESPACES).
* Committed blocks that are not pinned are known to the eviction policy. A
  lease leaves its blocks there (taking a block out of the policy and putting
  it back cost more than the rest of an Acquire and its Release); eviction
  skips a leased block it is offered, which then stays out of the policy until
  its last lease ends. Pinned blocks leave the policy. A full arena whose
  blocks are all pinned, leased or reserved is ``ArenaFull`` and changes
  nothing.

Thread-safe: every public method takes ``self.lock``; the gRPC loop and the
data-channel threads call straight in. Nothing under the lock touches block
bytes.
"""
from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
import secrets
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Sequence

import xxhash

from .alloc import ExtentAllocator
from .errors import (ArenaFull, DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted,
                     TooLarge, UnknownLease, UnknownReservation)
from .keys import CHECKSUM_SIZE, ZERO_CHECKSUM
from .policy import POLICIES
from .slots import COMMITTED as COMMITTED_ENTRY
from .slots import RESERVED as RESERVED_ENTRY
from .slots import NullSlots

log = logging.getLogger("kvtier.hot")

RESERVED, COMMITTING, COMMITTED, DOOMED = range(4)
RESERVE_OK, RESERVE_PRESENT, RESERVE_PENDING = 0, 1, 2
TIER_MISSING, TIER_RAM = 0, 1
FOREVER = float("inf")
# How long the slot of a reservation that expired (or was open at a crash) stays out of use, in
# seconds: one reservation lifetime, at most this. A writer still copying that long after its
# reservation ended is broken; bounding it keeps abandoned reservations from filling the arena.
QUARANTINE_S = 5.0
# a restore reports its progress (and hears of a stop) every this many slot-table entries
RESTORE_TICK = 4096
# What one tenant's live leases may hold (the whole daemon's without a tenants file): each lease,
# and each block it holds, costs daemon memory for up to ram.max_ttl_ms, whatever the quotas.
# Far above what inference engines hold (the vLLM connector releases a lease once its copies are
# done): past either, an Acquire that would open a lease is RESOURCE_EXHAUSTED, and blocks joining
# a lease (read up from a lower tier for its Acquire) are misses.
TENANT_LEASES = 65_536     # live leases
TENANT_LEASED = 1 << 22    # block references in them (32 MiB of pointers)
# Namespaces holding no block in RAM keep their counters while at most this many more of them are
# known than namespaces holding blocks; past that they are folded (see _fold_idle). Naming a
# namespace needs no write (a Lookup does): this bounds the memory and /metrics series it makes.
IDLE_NAMESPACES = 1024
# A deadline heap is rebuilt from the live entries once it holds this many more than twice those
# (released leases, committed reservations and extended pins leave theirs behind until they come due).
HEAP_SLACK = 4096


class _RandomIds:
    """Random non-zero 63-bit ids: another client (or tenant) cannot guess a live one."""

    def __next__(self) -> int:
        return secrets.randbits(63) | 1


_NO_BLOCKS: Mapping = MappingProxyType({})


def _content(b: Block) -> tuple[str, bytes]:
    """What identifies a block's content beyond its Block object (S3-FIFO's ghost keys)."""
    return b.ns, b.key


def _reads(b: Block) -> int:
    """The reads counted on a queued block since the policy last asked; zeroes them."""
    n = b.queued - 1 if b.queued else 0
    if n:
        b.queued = 1
    return n


def _new_policy(name: str):
    return POLICIES[name](ghost_key=_content, reads=_reads)


class Superseded(FailedPrecondition):
    """A promotion's reservation whose key an overwrite took while it read (see reserve)."""


def checksum(buf) -> bytes:
    """xxh3-128 digest, 16 bytes, canonical (big-endian) form."""
    return xxhash.xxh3_128_digest(buf)


@dataclass(slots=True, eq=False)
class Block:
    ns: str
    key: bytes
    offset: int
    length: int
    state: int = RESERVED
    checksum: bytes = ZERO_CHECKSUM
    created: float = 0.0
    leases: int = 0
    pin_until: float = 0.0
    overwrite: bool = False  # committed by an overwrite: copies in lower tiers are stale
    entry: int = -1          # its slot-table entry (kvtier.slots), -1 if none
    promoted: bool = False   # brought up from a lower tier (not written back up there)
    group: str = ""          # eviction group: the tenant owning the namespace ("" = none)
    # in its group's eviction policy (evictable unless leased): 0 no; 1 + n: yes, with n reads
    # the policy has not been told of (kvtier.policy, ``reads``)
    queued: int = 0


@dataclass(slots=True, eq=False)
class Reservation:
    id: int
    ns: str
    blocks: list[Block]
    expires: float
    overwrite: bool
    ttl: float = 0.0  # seconds; also how long its slots stay quarantined if it expires
    state: int = RESERVED
    promotion: bool = False  # the daemon's own, bringing a block up from a lower tier
    superseded: bool = False  # a promotion whose key an overwrite took meanwhile: never commits


@dataclass(slots=True, eq=False)
class Lease:
    id: int
    blocks: list[Block]
    expires: float
    group: str = ""  # the tenant whose bounds it counts against (TENANT_LEASES, TENANT_LEASED)


@dataclass(slots=True)
class NsStats:
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_bytes: int = 0
    get_bytes: int = 0
    lower_hits: int = 0  # of hits, blocks read up from a lower tier for the read (hits - lower_hits: RAM's)
    evictions: int = 0
    lookups: int = 0


PROBE_RUN = 8  # keys probed at once by a prefix-only read before it looks for the gap


def _probe(idx: dict, keys: Sequence[bytes], prefix_only: bool) -> list:
    """idx.get of each key, in C loops (the CPU overlaps the probes' cache misses in a large
    index, which a Python loop serialises); for a prefix-only read, in runs of PROBE_RUN up to
    the run holding the first gap, so a prompt that misses at once costs one run."""
    if not prefix_only or len(keys) <= PROBE_RUN:
        return list(map(idx.get, keys))
    out: list = []
    for i in range(0, len(keys), PROBE_RUN):
        run = list(map(idx.get, keys[i:i + PROBE_RUN]))
        out += run
        if None in run:
            break
    return out


@dataclass
class Acquired:
    lease_id: int
    tiers: bytes
    offsets: list[int]
    lengths: list[int]
    checksums: bytes
    lease_ms: int


@dataclass
class Reserved:
    reservation_id: int
    status: bytes
    offsets: list[int]
    lengths: list[int]
    ttl_ms: int


class HotTier:
    def __init__(self, *, start: int, end: int, policy: str = "s3fifo", max_block_bytes: int,
                 lease_ms: int = 30_000, reservation_ms: int = 30_000, max_ttl_ms: int = 600_000,
                 max_pinned: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.alloc = ExtentAllocator(start, end)
        # the default group's policy; policies track Block objects (see kvtier.policy)
        self.policy = _new_policy(policy)
        # Tenants: each group (tenant) has its own policy and optional RAM quota. A group over its
        # quota evicts only its own blocks; global pressure evicts from the group furthest over
        # its quota, else the largest. group_of maps a namespace to its group.
        self.group_of: Callable[[str], str] = lambda ns: ""
        self.quotas: dict[str, int] = {}
        self.policies = {"": self.policy}
        self._policy_name = policy
        self.group_used: dict[str, int] = {}
        self.group_evictable: dict[str, int] = {}
        self.max_block_bytes = min(max_block_bytes, self.alloc.capacity)
        self.lease_ms, self.reservation_ms, self.max_ttl_ms = lease_ms, reservation_ms, max_ttl_ms
        self.clock = clock
        self.lock = threading.Lock()
        # namespace -> key -> committed block. One dict per namespace, keyed by the key bytes: a
        # probe follows one pointer fewer than with (namespace, key) tuples, and no tuple is built
        # per key. A namespace's dict stays while its NsStats does (see _fold_idle, _blocks()).
        self._index: dict[str, dict[bytes, Block]] = {}
        self._pending: dict[tuple[str, bytes], Reservation] = {}
        self._reservations: dict[int, Reservation] = {}
        self._leases: dict[int, Lease] = {}
        self._deadlines: list[tuple[float, int, int]] = []  # (expires, kind, id); kind 0 res, 1 lease
        self._pins: list[tuple[float, int, Block]] = []      # (pin_until, seq, block)
        # Slots of expired reservations are not reused at once: a writer that is merely slow must
        # not land its bytes in another block's slot. They are freed QUARANTINE_S (or the TTL) later.
        self._quarantine: list[tuple[float, int, Block]] = []
        self._ended: OrderedDict[int, str] = OrderedDict()  # recent reservation id -> how it ended
        self._seq = itertools.count()
        self._ids = _RandomIds()
        self.ns_stats: dict[str, NsStats] = {}
        self.folded = NsStats()  # the counters of namespaces forgotten by _fold_idle, summed
        self._ns_room = IDLE_NAMESPACES  # namespaces known before the next _fold_idle
        self._lease_use: dict[str, list[int]] = {}  # group -> [live leases, blocks they hold]
        self.evictable_bytes = 0
        self.reserved_bytes = 0
        self.used_bytes = 0
        self.evictions = 0
        self.evict_hook_errors = 0  # evictions whose on_evict raised (the block went, uncopied)
        self.expired_leases = 0
        self.expired_reservations = 0
        self.pinned_blocks = 0
        self.pinned_bytes = 0   # slot bytes of the pinned blocks, at most max_pinned_bytes
        self.max_pinned = max_pinned
        self.max_pinned_bytes = int(self.alloc.capacity * max_pinned)
        self.group_pinned: dict[str, int] = {}  # slot bytes pinned per group: at most max_pinned of its quota
        self.pins_refused = 0   # blocks a Pin left unpinned: pinning them would have passed max_pinned_bytes
        self.leased_blocks = 0
        # Hooks for the tiers below, called with the lock held (must be quick, must not call back in):
        # on_commit(blocks) after blocks became visible, returns the blocks to hold (kept from
        # eviction until unhold(), e.g. while they are written out); on_evict(block) before an
        # evicted block's slot is freed (its bytes are still intact). An on_evict that raises
        # does not stop the eviction: the block goes, without its copy below.
        self.on_commit: Callable[[list[Block]], list[Block]] = lambda blocks: []
        self.on_evict: Callable[[Block], None] = lambda block: None
        # on_trusted(blocks) after blocks committed with the client's checksums unverified (queue them
        # for a background check, kvtier.commitcheck); same rules as on_commit.
        self.on_trusted: Callable[[list[Block]], None] = lambda blocks: None
        self.slots = NullSlots()  # per-slot headers for restarts (kvtier.slots)
        self.pins_dropped = 0  # recorded pins a restore did not trust (restore(pins=False))

    # ---- bookkeeping helpers (lock held) -------------------------------------------------

    def _ns(self, ns: str) -> NsStats:
        s = self.ns_stats.get(ns)
        if s is None:
            if len(self.ns_stats) >= self._ns_room:
                self._fold_idle()
            s = self.ns_stats[ns] = NsStats()
        return s

    def _fold_idle(self) -> None:
        """Forget the namespaces holding no block in RAM, their counters added to ``folded`` (the
        daemon's totals stay whole; a forgotten namespace's series leave /metrics and start again
        from 0 if it is used again). Next time when as many namespaces are known again as hold
        blocks now, plus IDLE_NAMESPACES: a fold costs O(1) per namespace made."""
        f = self.folded
        for ns, s in list(self.ns_stats.items()):
            if not s.blocks:
                del self.ns_stats[ns]
                for name in NsStats.__slots__:
                    setattr(f, name, getattr(f, name) + getattr(s, name))
                if not self._index.get(ns, True):  # its empty dict of blocks too
                    del self._index[ns]
        self._ns_room = 2 * len(self.ns_stats) + IDLE_NAMESPACES

    def _blocks(self, ns: str) -> Mapping[bytes, Block]:
        """A namespace's committed blocks by key (read-only; empty for a namespace never used)."""
        return self._index.get(ns, _NO_BLOCKS)

    def _filing(self, ns: str) -> dict[bytes, Block]:
        """The namespace's dict of blocks, made on first use, to file a committed block in."""
        idx = self._index.get(ns)
        if idx is None:
            idx = self._index[ns] = {}
        return idx

    def _evictable(self, b: Block) -> bool:
        return b.state == COMMITTED and b.leases == 0 and b.pin_until == 0.0

    def _pol(self, g: str):
        p = self.policies.get(g)
        if p is None:
            p = self.policies[g] = _new_policy(self._policy_name)
        return p

    def _policy_add(self, b: Block, touched: bool = False) -> None:
        """Into the policy: b is committed, not pinned, not leased, not queued."""
        r = self.alloc.round(b.length)
        b.queued = 1
        self._pol(b.group).insert(b, r, touched)
        self._count_evictable(b, r)

    def _policy_drop(self, b: Block) -> None:
        if b.queued:
            self._pol(b.group).remove(b)
            b.queued = 0
            if not b.leases:  # a leased block's bytes stopped counting when it was leased
                self._count_evictable(b, -self.alloc.round(b.length))

    def _count_evictable(self, b: Block, r: int) -> None:
        self.evictable_bytes += r
        self.group_evictable[b.group] = self.group_evictable.get(b.group, 0) + r

    def _use(self, g: str, r: int) -> None:
        self.used_bytes += r
        self.group_used[g] = self.group_used.get(g, 0) + r

    def _free(self, b: Block) -> None:
        self.alloc.free(b.offset, b.length)
        self._use(b.group, -self.alloc.round(b.length))

    def _unindex(self, b: Block) -> None:
        """Take a committed block out of the index (caller frees or dooms it)."""
        del self._index[b.ns][b.key]
        if b.entry >= 0:  # before the slot can be reused: a restart must not bring it back
            self.slots.release(b.entry)
            b.entry = -1
        self._policy_drop(b)
        if b.pin_until:
            self._count_pin(b, -1)
            b.pin_until = 0.0
        s = self._ns(b.ns)
        s.blocks -= 1
        s.bytes -= b.length

    def _drop(self, b: Block) -> None:
        """Remove a committed block now, or when its last lease ends."""
        self._unindex(b)
        if b.leases:
            b.state = DOOMED
        else:
            self._free(b)

    def _victim_group(self) -> str | None:
        if len(self.policies) == 1:
            return ""
        live = [g for g, e in self.group_evictable.items() if e > 0]
        if not live:
            return None
        return max(live, key=lambda g: (self.group_used.get(g, 0) - (self.quotas.get(g) or 0)
                                        if self.quotas.get(g) else -1, self.group_used.get(g, 0)))

    def _evict_one(self, group: str | None = None) -> bool:
        g = self._victim_group() if group is None else group
        if g is None:
            return False
        pol = self._pol(g)
        b = pol.victim()
        while b is not None and b.leases:  # leased: out of the policy until its last release
            b.queued = 0
            pol.spare(b)
            b = pol.victim()
        if b is None:
            return False
        b.queued = 0
        self._count_evictable(b, -self.alloc.round(b.length))
        # The victim is out of the policy already: it leaves the index and frees its slot whatever
        # on_evict does, else it would stay indexed and never be evicted again. Losing its copy
        # below is allowed; a RAM tier that cannot evict while a lower tier fails is not.
        try:
            self.on_evict(b)
        except Exception:
            self.evict_hook_errors += 1
            if self.evict_hook_errors & (self.evict_hook_errors - 1) == 0:  # 1st, 2nd, 4th...: no flood
                log.exception("eviction hook failed for a block of %r (%d failures so far); "
                              "evicted without its lower-tier copy", b.ns, self.evict_hook_errors)
        finally:
            self._unindex(b)
            self._free(b)
            self.evictions += 1
            self._ns(b.ns).evictions += 1
        return True

    def _alloc(self, n: int, group: str = "") -> int:
        need = self.alloc.round(n)
        q = self.quotas.get(group, 0)
        if q:  # a tenant over its quota makes room among its own blocks only
            while self.group_used.get(group, 0) + need > q:
                if not self._evict_one(group):
                    raise ArenaFull(f"tenant {group}: RAM quota of {q} bytes reached "
                                    f"({self.group_used.get(group, 0)} used); the rest of its blocks are "
                                    f"pinned, leased or reserved")
        expired = False
        while True:
            off = self.alloc.alloc(n)
            if off is not None:
                self._use(group, need)
                return off
            if not expired:  # reclaim what dead clients left before evicting anything
                expired = True
                self._expire(self.clock())
                continue
            if self.alloc.free_bytes + self.evictable_bytes < need or not self._evict_one():
                raise ArenaFull(
                    f"no room for a {n}-byte block: {self.alloc.free_bytes} bytes free "
                    f"(largest extent {self.alloc.largest_free()}), {self.evictable_bytes} evictable; "
                    f"the rest is pinned, leased or reserved")

    def _ttl(self, ms: int, default: int, what: str) -> int:
        if ms == 0:
            return default
        if ms < 0 or ms > self.max_ttl_ms:
            raise InvalidArgument(f"{what} must be 1..{self.max_ttl_ms} ms (0 = default), got {ms}")
        return ms

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, kind, id_ = heapq.heappop(self._deadlines)
            if kind == 0:
                r = self._reservations.get(id_)
                if r is not None and r.state == RESERVED and r.expires <= now:
                    self._end_reservation(r, "expired", now)
                    self.expired_reservations += 1
            else:
                lease = self._leases.get(id_)
                if lease is not None and lease.expires <= now:
                    self._end_lease(lease)
                    self.expired_leases += 1
        while self._quarantine and self._quarantine[0][0] <= now:
            _, _, b = heapq.heappop(self._quarantine)
            self._free_reserved(b)
        while self._pins and self._pins[0][0] <= now:
            until, _, b = heapq.heappop(self._pins)
            if b.pin_until == until and b.state == COMMITTED:
                self._unpin(b)

    def _end_reservation(self, r: Reservation, how: str, now: float | None = None) -> None:
        """End an uncommitted reservation ("aborted", or "expired" at now: slots quarantined)."""
        del self._reservations[r.id]
        self._remember(r.id, how)
        r.state = DOOMED
        for b in r.blocks:
            self._unpend(r, b)
            if now is None:
                self._free_reserved(b)
            else:
                heapq.heappush(self._quarantine, (now + min(r.ttl, QUARANTINE_S), next(self._seq), b))

    def _remember(self, rid: int, how: str) -> None:
        self._ended[rid] = how
        if len(self._ended) > 65536:
            self._ended.popitem(last=False)

    def _end_lease(self, lease: Lease) -> None:
        del self._leases[lease.id]
        use = self._lease_use[lease.group]
        use[0] -= 1
        use[1] -= len(lease.blocks)
        for b in lease.blocks:
            self._unhold(b)

    def _hold(self, b: Block) -> None:
        """Keep b from eviction and slot reuse (a lease, or a write to a lower tier). It keeps
        its place in the policy, whose victim() it may still come out of: _evict_one skips it."""
        if b.leases == 0:
            if b.queued:
                self._count_evictable(b, -self.alloc.round(b.length))
            self.leased_blocks += 1
        b.leases += 1

    def _unhold(self, b: Block, touched: bool = True) -> None:
        """End one hold; at the last, b is evictable again and (touched) counted as read."""
        b.leases -= 1
        if b.leases:
            return
        self.leased_blocks -= 1
        if b.state == DOOMED:
            self._free(b)
        elif b.queued:
            self._count_evictable(b, self.alloc.round(b.length))
            if touched:
                pol = self._pol(b.group)
                if not pol.lazy_reads:
                    pol.touch(b)
                elif b.queued <= pol.MAX_FREQ:  # counted here; the policy takes it when it asks
                    b.queued += 1
        elif self._evictable(b):
            self._policy_add(b, touched=touched)

    def hold(self, b: Block) -> None:
        with self.lock:
            self._hold(b)

    def unhold(self, b: Block) -> None:
        """End a hold that was not a read (a write to a lower tier, a promotion's until it is
        leased): the eviction policy is not told of an access (S3-FIFO would take every block
        written through to NVMe for one read once, and lose its resistance to scans)."""
        with self.lock:
            self._unhold(b, touched=False)

    def hold_committed(self, blocks: Sequence[Block]) -> list[Block]:
        """Hold those of blocks that are still the committed block under their key (for a
        background check) and return them; the others were deleted, evicted or replaced."""
        with self.lock:
            held = [b for b in blocks if b.state == COMMITTED and self._blocks(b.ns).get(b.key) is b]
            for b in held:
                self._hold(b)
            return held

    def end_check(self, results: Sequence[tuple[Block, bool]]) -> int:
        """End hold_committed's holds; a block whose bytes did not match (False) is dropped as
        Delete drops it, if the index still maps its key to it. Returns how many were dropped."""
        dropped = 0
        with self.lock:
            for b, ok in results:
                if not ok and b.state == COMMITTED and self._blocks(b.ns).get(b.key) is b:
                    self._drop(b)  # held by us: DOOMED, freed below or by the last reader's release
                    dropped += 1
                self._unhold(b, touched=False)  # a check is not an access
        return dropped

    def _unpin(self, b: Block) -> None:
        b.pin_until = 0.0
        self.slots.set_pin(b.entry, 0.0)
        self._count_pin(b, -1)
        if self._evictable(b):
            self._policy_add(b)

    def _count_pin(self, b: Block, n: int) -> None:
        """b pinned (n = 1) or no longer (n = -1), in the totals and its group's."""
        r = n * self.alloc.round(b.length)
        self.pinned_blocks += n
        self.pinned_bytes += r
        self.group_pinned[b.group] = self.group_pinned.get(b.group, 0) + r

    def _may_pin(self, b: Block, size: int) -> bool:
        """Whether pinning b keeps the pinned blocks within max_pinned of the arena and its
        group's within max_pinned of the group's RAM quota (a tenant pinning for ever must not
        take the pinned share from the others; a group without a quota has the arena's only)."""
        if self.pinned_bytes + size > self.max_pinned_bytes:
            return False
        q = self.quotas.get(b.group)
        return not q or self.group_pinned.get(b.group, 0) + size <= q * self.max_pinned

    def _push_pin(self, b: Block) -> None:
        """Queue b's pin to expire; the entries of pins since extended or ended are dropped once
        they outnumber the pinned blocks (they would stay until they came due)."""
        heapq.heappush(self._pins, (b.pin_until, next(self._seq), b))
        if len(self._pins) > 2 * self.pinned_blocks + HEAP_SLACK:
            live = {e[2]: e for e in self._pins if e[2].pin_until == e[0] and e[2].state == COMMITTED}
            self._pins = list(live.values())
            heapq.heapify(self._pins)

    def _push_deadline(self, expires: float, kind: int, id_: int) -> None:
        """Queue a reservation's (kind 0) or lease's (1) expiry; rebuilt from the live ones once
        it holds more than twice as many entries (see HEAP_SLACK)."""
        heapq.heappush(self._deadlines, (expires, kind, id_))
        if len(self._deadlines) > 2 * (len(self._leases) + len(self._reservations)) + HEAP_SLACK:
            self._deadlines = [(r.expires, 0, r.id) for r in self._reservations.values() if r.expires != FOREVER]
            self._deadlines += [(lease.expires, 1, lease.id) for lease in self._leases.values()]
            heapq.heapify(self._deadlines)

    # ---- public API ---------------------------------------------------------------------

    def expire(self) -> None:
        """Expire leases, reservations and pins whose time has come (called periodically)."""
        with self.lock:
            self._expire(self.clock())

    def block_count(self) -> int:
        return sum(map(len, self._index.values()))

    def contains(self, ns: str, key: bytes) -> bool:
        return key in self._blocks(ns)

    def lookup(self, ns: str, keys: Sequence[bytes]) -> tuple[bytes, int]:
        with self.lock:
            # one C loop over the keys (True is TIER_RAM, False TIER_MISSING): with no bytecode
            # between the probes, the CPU overlaps their cache misses in a large index
            tiers = bytes(map(self._blocks(ns).__contains__, keys))
            self._ns(ns).lookups += len(keys)
        prefix = tiers.find(TIER_MISSING)
        return tiers, (len(keys) if prefix < 0 else prefix)

    def reserve(self, ns: str, keys: Sequence[bytes], sizes: Sequence[int], ttl_ms: int = 0,
                overwrite: bool = False, present: Callable[[str, bytes], bool] | None = None,
                expires: bool = True, promotion: bool = False) -> Reserved:
        """Slots for the keys that need writing. ``present(ns, key)``: also report keys held by a
        lower tier as RESERVE_PRESENT (unless overwrite). ``expires=False``: the daemon itself
        writes the slots (inline puts) and always ends the reservation; it never times out.
        ``promotion``: the daemon's read of a block's copy from a lower tier (with expires=False);
        an overwrite of the key meanwhile takes the key over (the promotion's slot stays its own
        until it ends, and it cannot commit: begin_commit raises Superseded)."""
        if len(sizes) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(sizes)} sizes")
        for n in sizes:
            if n <= 0:
                raise InvalidArgument(f"block size must be >= 1 byte, got {n}")
            if n > self.max_block_bytes:
                raise TooLarge(f"block of {n} bytes exceeds the largest accepted ({self.max_block_bytes} bytes)")
        ttl = self._ttl(ttl_ms, self.reservation_ms, "ttl_ms")
        with self.lock:
            now = self.clock()
            status = bytearray(len(keys))
            offsets = [0] * len(keys)
            idx = self._blocks(ns)
            need = sum(self.alloc.round(n) for k, n in zip(keys, sizes)
                       if (overwrite and self._replaces_promotion((ns, k))) or
                       (ns, k) not in self._pending and (overwrite or k not in idx))
            if need > self.alloc.free_bytes + self.evictable_bytes:
                self._expire(now)
                if need > self.alloc.free_bytes + self.evictable_bytes:  # evict nothing for a batch that cannot fit
                    raise ArenaFull(f"no room for {need} bytes: {self.alloc.free_bytes} free, "
                                    f"{self.evictable_bytes} evictable; the rest is pinned, leased or reserved")
            g = self.group_of(ns)
            q = self.quotas.get(g, 0)
            if q and need > q - self.group_used.get(g, 0) + self.group_evictable.get(g, 0):
                raise ArenaFull(f"tenant {g}: RAM quota of {q} bytes cannot hold {need} more bytes "
                                f"({self.group_used.get(g, 0)} used, {self.group_evictable.get(g, 0)} evictable)")
            r = Reservation(next(self._ids), ns, [], now + ttl / 1000 if expires else FOREVER, overwrite, ttl / 1000,
                            promotion=promotion)
            try:
                for i, (k, n) in enumerate(zip(keys, sizes)):
                    kk = (ns, k)
                    if overwrite and self._replaces_promotion(kk):
                        # the old content is being read up: the new one wins, the read's slot
                        # stays its own until it ends
                        self._pending.pop(kk).superseded = True
                    elif kk in self._pending:
                        status[i] = RESERVE_PENDING
                        continue
                    if not overwrite and (k in idx or (present is not None and present(ns, k))):
                        status[i] = RESERVE_PRESENT
                        continue
                    b = Block(ns, k, self._alloc(n, g), n, group=g)
                    r.blocks.append(b)
                    b.entry = self.slots.put(ns, k, b.offset, n, ZERO_CHECKSUM, 0.0, RESERVED_ENTRY)
                    self._pending[kk] = r
                    self.reserved_bytes += self.alloc.round(n)
                    offsets[i] = b.offset
            except BaseException:
                self._end_reservation_unregistered(r)
                raise
            if r.blocks:
                self._reservations[r.id] = r
                if expires:
                    self._push_deadline(r.expires, 0, r.id)
            return Reserved(r.id if r.blocks else 0, bytes(status), offsets, list(sizes), ttl)

    def _replaces_promotion(self, kk: tuple[str, bytes]) -> bool:
        p = self._pending.get(kk)
        return p is not None and p.promotion and p.state == RESERVED

    def being_replaced(self, b: Block) -> bool:
        """Whether an overwrite of b's key is being committed (lock held; asked by on_evict): b's
        content is replaced as that commit ends."""
        p = self._pending.get((b.ns, b.key))
        return p is not None and p.overwrite and p.state == COMMITTING

    def _unpend(self, r: Reservation, b: Block) -> None:
        """Forget b's key as reserved by r (not if an overwrite took it over since)."""
        kk = (b.ns, b.key)
        if self._pending.get(kk) is r:
            del self._pending[kk]

    def _end_reservation_unregistered(self, r: Reservation) -> None:
        for b in r.blocks:
            self._unpend(r, b)
            self._free_reserved(b)

    def _free_reserved(self, b: Block) -> None:
        """Free the slot of a block that never became visible."""
        if b.entry >= 0:
            self.slots.release(b.entry)
            b.entry = -1
        self._free(b)
        self.reserved_bytes -= self.alloc.round(b.length)

    def _get_reservation(self, rid: int, now: float) -> Reservation:
        r = self._reservations.get(rid)
        if r is None:
            how = self._ended.get(rid)
            if how in ("committed", "aborted"):
                raise FailedPrecondition(f"reservation {rid} was already {how}")
            raise UnknownReservation(f"reservation {rid} is unknown or expired")
        if r.state != RESERVED:
            raise FailedPrecondition(f"reservation {rid} is already being committed")
        if r.expires <= now:
            self._end_reservation(r, "expired", now)
            self.expired_reservations += 1
            raise UnknownReservation(f"reservation {rid} expired")
        return r

    def _reopen(self, r: Reservation) -> None:
        """A refused commit leaves the reservation as it was, deadline included."""
        r.state = RESERVED
        self._push_deadline(r.expires, 0, r.id)

    def overwritten(self, rid: int) -> list[tuple[str, bytes]]:
        """The (namespace, key) a reservation being committed replaces, if it is an overwrite
        (else none). No lock (asked at every commit): the reservation is its committer's, and
        neither its blocks nor its overwrite flag change."""
        r = self._reservations.get(rid)
        return [(b.ns, b.key) for b in r.blocks] if r is not None and r.overwrite else []

    def begin_commit(self, rid: int) -> list[tuple[int, int]]:
        """Freeze a reservation for commit; returns its slots (offset, length) to hash."""
        with self.lock:
            r = self._get_reservation(rid, self.clock())
            if r.superseded:
                raise Superseded(f"reservation {rid}: an overwrite of its key came first")
            r.state = COMMITTING
            return [(b.offset, b.length) for b in r.blocks]

    def finish_commit(self, rid: int, computed: Sequence[bytes] | None, given: bytes = b"",
                      promoted: bool = False) -> bytes:
        """Make a frozen reservation visible. ``computed``: digests of the slot bytes (None: trust
        ``given``, and pass the blocks to ``on_trusted``). A mismatch with ``given`` aborts the
        reservation and raises DataLoss.
        ``promoted``: the blocks come up from a lower tier (not counted as puts)."""
        with self.lock:
            r = self._reservations.get(rid)
            if r is None or r.state != COMMITTING:
                raise FailedPrecondition(f"reservation {rid} is not being committed")
            n = len(r.blocks)
            if given and len(given) != n * CHECKSUM_SIZE:
                self._reopen(r)
                raise InvalidArgument(f"checksums must be {n} x {CHECKSUM_SIZE} bytes, got {len(given)}")
            given_l = [given[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE] for i in range(n)] if given else None
            trusted = computed is None
            if trusted:
                if given_l is None:
                    self._reopen(r)
                    raise InvalidArgument("checksums are required when the daemon does not compute them")
                computed = given_l
            elif given_l is not None:
                bad = [i for i in range(n) if given_l[i] != computed[i]]
                if bad:
                    self._end_reservation(r, "aborted")
                    raise DataLoss(f"checksum mismatch for {len(bad)} of {n} blocks (first at position {bad[0]}); "
                                   f"nothing committed")
            del self._reservations[r.id]
            self._remember(r.id, "committed")
            r.state = COMMITTED
            now = time.time()
            for b, c in zip(r.blocks, computed):
                kk = (b.ns, b.key)
                del self._pending[kk]
                self.reserved_bytes -= self.alloc.round(b.length)
                idx = self._filing(b.ns)
                old = idx.get(b.key)
                if old is not None:
                    self._drop(old)
                b.overwrite = r.overwrite
                b.promoted = promoted
                b.checksum, b.state, b.created = c, COMMITTED, now
                b.entry = self.slots.put(b.ns, b.key, b.offset, b.length, c, now, COMMITTED_ENTRY, b.entry)
                idx[b.key] = b
                self._policy_add(b)
                s = self._ns(b.ns)
                s.blocks += 1
                s.bytes += b.length
                if not promoted:  # a block brought up from a lower tier is not a client's put
                    s.puts += 1
                    s.put_bytes += b.length
            for b in self.on_commit(r.blocks):
                self._hold(b)
            if trusted:
                self.on_trusted(r.blocks)
            return b"".join(computed)

    def abort(self, rid: int) -> None:
        with self.lock:
            r = self._get_reservation(rid, self.clock())
            self._end_reservation(r, "aborted")

    def discard(self, rid: int) -> None:
        """End a reservation in any state short of committed; unknown ids are ignored."""
        with self.lock:
            r = self._reservations.get(rid)
            if r is not None:
                self._end_reservation(r, "aborted")

    def acquire(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0, prefix_only: bool = False,
                lease_id: int = 0, count_misses: bool = True, counted: bool = True,
                lower: bool = False) -> Acquired:
        """Lease the keys present. With ``lease_id`` of a live lease, add the blocks to it.
        ``count_misses=False``: the caller looks further down and counts the misses itself (with
        prefix_only, every key from the first absent one on is a miss). ``counted=False``: count
        no hit, miss or byte (an earlier Acquire counted this read). ``lower``: the blocks were
        read up from a lower tier for this read (their hits are that tier's, not RAM's).
        A block found at several positions is held once. Past its tenant's bounds on leases
        (TENANT_LEASES, TENANT_LEASED), a new lease is ResourceExhausted and a join leases
        nothing (its keys are answered missing)."""
        ttl = self._ttl(lease_ms, self.lease_ms, "lease_ms")
        with self.lock:
            now = self.clock()
            n = len(keys)
            tiers = bytearray(n)
            offsets, lengths, sums = [0] * n, [0] * n, [ZERO_CHECKSUM] * n
            blocks: list[Block] = []
            s = self._ns(ns)
            misses = 0
            for i, b in enumerate(_probe(self._blocks(ns), keys, prefix_only)):
                if b is None:
                    if prefix_only:
                        misses += n - i
                        break
                    misses += 1
                    continue
                blocks.append(b)
                tiers[i] = TIER_RAM
                offsets[i], lengths[i], sums[i] = b.offset, b.length, b.checksum
            existing = self._leases.get(lease_id) if lease_id else None
            if lease_id and (existing is None or existing.expires <= now):
                raise UnknownLease(f"lease {lease_id} is unknown or expired")
            if len(blocks) > 1:
                blocks = list(dict.fromkeys(blocks))  # a key asked twice is held once
            lease_id = 0
            if existing is not None:
                if blocks and not self._lease_room(existing.group, 0, len(blocks)):
                    return Acquired(existing.id, bytes(n), [0] * n, [0] * n, ZERO_CHECKSUM * n, ttl)
                existing.blocks.extend(blocks)
                self._lease_use[existing.group][1] += len(blocks)
                lease_id = existing.id
            elif blocks:
                lease_id = self._new_lease(blocks, now + ttl / 1000, self.group_of(ns))
            for b in blocks:
                self._hold(b)  # kept from eviction while leased; counted as a read when it returns
            if counted:
                found = n - tiers.count(TIER_MISSING)
                s.misses += misses * count_misses
                s.hits += found
                s.lower_hits += found * lower
                s.get_bytes += sum(lengths)
            return Acquired(lease_id, bytes(tiers), offsets, lengths, b"".join(sums), ttl)

    def open_lease(self, ns: str, lease_ms: int = 0) -> int:
        """A lease of ns's tenant holding nothing yet, for blocks that join it as they arrive
        (acquire with its ``lease_id``); it ends as any other, at release or expiry."""
        ttl = self._ttl(lease_ms, self.lease_ms, "lease_ms")
        with self.lock:
            return self._new_lease([], self.clock() + ttl / 1000, self.group_of(ns))

    def _lease_room(self, g: str, leases: int, blocks: int) -> bool:
        """Whether group g's live leases may grow by that many leases and blocks."""
        use = self._lease_use.get(g)
        return use is None or (use[0] + leases <= TENANT_LEASES and use[1] + blocks <= TENANT_LEASED)

    def check_lease_room(self, ns: str, blocks: int) -> None:
        """ResourceExhausted unless ns's tenant may open a lease of that many blocks now: asked
        before reading blocks up from a lower tier for a new lease, so a call past the bounds
        fails before its reads rather than after them."""
        with self.lock:
            self._room_or_raise(self.group_of(ns), blocks)

    def _room_or_raise(self, group: str, blocks: int) -> None:  # lock held
        if not self._lease_room(group, 1, blocks):
            use = self._lease_use[group]
            who = f"tenant {group}" if group else "this daemon"
            if use[0] >= TENANT_LEASES:
                raise ResourceExhausted(f"{who}: {use[0]} live leases, the most one tenant may hold; "
                                        f"release leases before acquiring more")
            raise ResourceExhausted(f"{who}: leases hold {use[1]} blocks, and {blocks} more would pass "
                                    f"the {TENANT_LEASED} one tenant may hold; release leases before "
                                    f"acquiring more")

    def _new_lease(self, blocks: list[Block], expires: float, group: str) -> int:  # lock held
        self._room_or_raise(group, len(blocks))
        lease = Lease(next(self._ids), blocks, expires, group)
        self._leases[lease.id] = lease
        use = self._lease_use.setdefault(group, [0, 0])
        use[0] += 1
        use[1] += len(blocks)
        self._push_deadline(lease.expires, 1, lease.id)
        return lease.id

    def count_misses(self, ns: str, n: int) -> None:
        with self.lock:
            self._ns(ns).misses += n

    def release(self, lease_id: int) -> None:
        with self.lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise UnknownLease(f"lease {lease_id} is unknown or expired")
            if lease.expires <= self.clock():
                self._end_lease(lease)
                self.expired_leases += 1
                raise UnknownLease(f"lease {lease_id} expired before release")
            self._end_lease(lease)

    def delete(self, ns: str, keys: Iterable[bytes]) -> int:
        with self.lock:
            n = 0
            idx = self._blocks(ns)
            for k in keys:
                b = idx.get(k)
                if b is not None:
                    self._drop(b)
                    n += 1
            return n

    def pin(self, ns: str, keys: Sequence[bytes], ttl_s: int = 0) -> bytes:
        """Per key 1 if the block is pinned now (for ttl_s seconds, 0 = until unpinned; a pin already
        there is extended, never shortened), 0 if it is not in RAM or pinning it would take the
        pinned blocks past max_pinned_bytes, or its group's past max_pinned of its quota (counted
        in pins_refused)."""
        if ttl_s < 0:
            raise InvalidArgument(f"ttl_s must be >= 0, got {ttl_s}")
        with self.lock:
            until = FOREVER if ttl_s == 0 else self.clock() + ttl_s
            out = bytearray(len(keys))
            idx = self._blocks(ns)
            for i, k in enumerate(keys):
                b = idx.get(k)
                if b is None:
                    continue
                before = b.pin_until
                if before == 0.0:
                    if not self._may_pin(b, self.alloc.round(b.length)):
                        self.pins_refused += 1
                        continue
                    self._policy_drop(b)
                    self._count_pin(b, 1)
                    b.pin_until = until
                else:
                    b.pin_until = max(before, until)
                if b.pin_until not in (before, FOREVER):
                    self._push_pin(b)
                # kept across a restart, in wall-clock time (ram.persist)
                self.slots.set_pin(b.entry, FOREVER if b.pin_until == FOREVER
                                   else time.time() + (b.pin_until - self.clock()))
                out[i] = 1
            return bytes(out)

    def unpin(self, ns: str, keys: Iterable[bytes]) -> int:
        with self.lock:
            n = 0
            idx = self._blocks(ns)
            for k in keys:
                b = idx.get(k)
                if b is not None and b.pin_until:
                    self._unpin(b)
                    n += 1
            return n

    def restore(self, table, view: memoryview, verify: bool = True,
                progress: Callable[[int], None] | None = None, pins: bool = True) -> tuple[int, int]:
        """Rebuild the index from a slot table left by a previous run over the same arena.
        Entries out of bounds, overlapping another, duplicated or (with verify) whose bytes
        no longer match their checksum are dropped. Returns (kept, dropped). pins=False: the
        recorded pins are not to be trusted (kvtier.slots): cleared, counted in pins_dropped.
        ``progress(entries done)`` is called every RESTORE_TICK entries (hashing a large arena
        takes minutes); an exception it raises ends the restore, the table left as it was."""
        from .keys import KEY_SIZES, NAMESPACE_RE
        kept: set[int] = set()
        dropped = 0
        with self.lock:
            now = self.clock()
            for n, (i, ns, key, off, length, digest, created, state) in enumerate(table.entries()):
                if progress is not None and n % RESTORE_TICK == 0:
                    progress(n)
                if state == RESERVED_ENTRY:
                    # a client that outlived the old daemon may still be writing here: keep the
                    # slot out of use for one reservation lifetime, counted from the first restart
                    # that found it (stamped in the entry), so a daemon restarting faster than
                    # that does not carry every old reservation's slots along for ever
                    wall = time.time()
                    q = min(self.reservation_ms / 1000, QUARANTINE_S)
                    left = min(q, created + q - wall) if created else q
                    if left > 0 and self.alloc.alloc_at(off, length):
                        if not created:
                            table.put(ns, key, off, length, digest, wall, RESERVED_ENTRY, at=i)
                        b = Block(ns, key, off, length, DOOMED, entry=i, group=self.group_of(ns))
                        self._use(b.group, self.alloc.round(length))
                        self.reserved_bytes += self.alloc.round(length)
                        heapq.heappush(self._quarantine, (now + left, next(self._seq), b))
                        kept.add(i)
                    continue  # not kept: adopt() clears the entry and the slot is free
                ok = (NAMESPACE_RE.fullmatch(ns) is not None and len(key) in KEY_SIZES
                      and 0 < length <= self.max_block_bytes and key not in self._blocks(ns)
                      and self.alloc.alloc_at(off, length))
                if ok and verify and checksum(view[off:off + length]) != digest:
                    self.alloc.free(off, length)
                    ok = False
                if not ok:
                    dropped += 1
                    continue
                b = Block(ns, key, off, length, COMMITTED, digest, created, entry=i, group=self.group_of(ns))
                self._filing(ns)[key] = b
                self._use(b.group, self.alloc.round(length))
                until = table.pin_of(i)
                if until and not pins:
                    table.set_pin(i, 0.0)
                    self.pins_dropped += 1
                    until = 0.0
                if not self._restore_pin(b, table, until):
                    self._policy_add(b)
                st = self._ns(ns)
                st.blocks += 1
                st.bytes += length
                kept.add(i)
            table.adopt(kept)
            self.slots = table
        return len(kept) - len(self._quarantine), dropped

    def _restore_pin(self, b: Block, table, until_wall: float) -> bool:
        """Pin a restored block as its entry says (lock held), within max_pinned; whether it is."""
        left = until_wall - time.time()
        if until_wall <= 0 or left <= 0 or not self._may_pin(b, self.alloc.round(b.length)):
            if until_wall:  # run out, or past the pinned share now: recorded as not pinned
                table.set_pin(b.entry, 0.0)
            return False
        b.pin_until = FOREVER if until_wall == FOREVER else self.clock() + left
        self._count_pin(b, 1)
        if b.pin_until != FOREVER:
            self._push_pin(b)
        return True

    def snapshot(self) -> dict:
        """Counters for Stats, copied under the lock."""
        with self.lock:
            return {
                "capacity_bytes": self.alloc.capacity,
                "used_bytes": self.used_bytes,
                "blocks": self.block_count(),
                "evictions": self.evictions,
                "evict_hook_errors": self.evict_hook_errors,
                "policy": self.policy.name,
                "largest_free_bytes": self.alloc.largest_free(),
                "reserved_bytes": self.reserved_bytes,
                "pinned_blocks": self.pinned_blocks,
                "pinned_bytes": self.pinned_bytes,
                "pins_refused": self.pins_refused,
                "leased_blocks": self.leased_blocks,
                "leases": len(self._leases),
                "reservations": len(self._reservations),
                "expired_leases": self.expired_leases,
                "expired_reservations": self.expired_reservations,
                "namespaces": {ns: NsStats(**{f: getattr(s, f) for f in s.__slots__})
                               for ns, s in self.ns_stats.items()},
                "folded": NsStats(**{f: getattr(self.folded, f) for f in NsStats.__slots__}),
            }

