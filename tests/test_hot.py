"""HotTier without an arena: reservations, commits, leases, pins, eviction and stats.

Slot bytes are never read here: commits pass digests computed from the test's own bytes with
``hot.checksum``. Time is a fake clock, so expiry is tested without sleeping.
"""
from __future__ import annotations

import random

import pytest

from kvtier import hot as H
from kvtier.errors import (ArenaFull, DataLoss, FailedPrecondition, InvalidArgument, NotFound,
                           ResourceExhausted, TooLarge, UnknownLease, UnknownReservation)
from kvtier.hot import (COMMITTED, RESERVE_OK, RESERVE_PENDING, RESERVE_PRESENT, TIER_MISSING, TIER_RAM, HotTier,
                        checksum)
from kvtier.keys import CHECKSUM_SIZE, ZERO_CHECKSUM
from kvtier.policy import POLICIES

KiB, MiB = 1024, 1024 * 1024
SLOT = 64 * KiB
NS = "ns"
ALL_POLICIES = pytest.mark.parametrize("policy", sorted(POLICIES))


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def data(i: int, n: int = SLOT) -> bytes:
    return bytes([i % 251]) * n


def make(slots: int = 8, policy: str = "lru", **kw) -> tuple[HotTier, Clock]:
    clock = Clock()
    kw.setdefault("max_block_bytes", 4 * SLOT)
    t = HotTier(start=4096, end=4096 + slots * SLOT, policy=policy, clock=clock, **kw)
    return t, clock


def put(t: HotTier, keys, blobs=None, ns: str = NS, overwrite: bool = False, given: bool = False) -> bytes:
    """Reserve, then commit with digests computed from ``blobs`` (default: SLOT bytes per key)."""
    keys = list(keys)
    blobs = blobs if blobs is not None else [data(i) for i in range(len(keys))]
    r = t.reserve(ns, keys, [len(b) for b in blobs], overwrite=overwrite)
    assert set(r.status) == {RESERVE_OK}, r.status
    slots = t.begin_commit(r.reservation_id)
    assert [n for _, n in slots] == [len(b) for b in blobs]
    sums = [checksum(b) for b in blobs]
    return t.finish_commit(r.reservation_id, sums, b"".join(sums) if given else b"")


def fill(t: HotTier, first: int = 0, ns: str = NS) -> list[bytes]:
    """Commit one SLOT-sized block per free slot, one by one; returns the keys in commit order."""
    keys = []
    i = first
    while t.alloc.free_bytes >= SLOT:
        put(t, [key(i)], [data(i)], ns=ns)
        keys.append(key(i))
        i += 1
    return keys


def tracked(t: HotTier, k: bytes, ns: str = NS) -> bool:
    """Whether the block indexed under k is one the eviction policy may take."""
    b = t._blocks(ns).get(k)
    return b is not None and b in t._pol(b.group) and not b.leases


def present(t: HotTier, keys, ns: str = NS) -> list[bool]:
    return [x == TIER_RAM for x in t.lookup(ns, keys)[0]]


def indexed(t: HotTier) -> dict:
    """The committed blocks, by (namespace, key)."""
    return {(ns, k): b for ns, blocks in t._index.items() for k, b in blocks.items()}


def state(t: HotTier) -> dict:
    s = t.snapshot()
    del s["namespaces"]
    s["extents"] = t.alloc.extents()
    s["index"] = sorted(indexed(t))
    return s


def check_consistent(t: HotTier) -> None:
    """The tier's counters agree with its index, reservations, leases and allocator."""
    r = t.alloc.round
    assert t.used_bytes == t.alloc.capacity - t.alloc.free_bytes
    evictable = [b for b in indexed(t).values() if t._evictable(b)]
    # the policy tracks the Block objects: every evictable one, and leased ones not yet offered
    # to eviction (skipped when they are); never a pinned, reserved or gone block
    queued = [b for b in indexed(t).values() if b.queued]
    assert set(map(id, evictable)) <= set(map(id, queued))
    assert all(b.state == COMMITTED and not b.pin_until for b in queued)
    for g, pol in t.policies.items():  # each group's policy, and its evictable bytes
        mine = [b for b in queued if b.group == g]
        assert len(pol) == len(mine) and all(b in pol for b in mine)
        assert t.group_evictable.get(g, 0) == sum(r(b.length) for b in evictable if b.group == g)
    assert all(b.group in t.policies for b in queued)
    assert t.evictable_bytes == sum(r(b.length) for b in evictable)
    quarantined = [b for _, _, b in t._quarantine]
    # reserved: slots of live reservations plus those of expired ones still in quarantine
    assert t.reserved_bytes == (sum(r(b.length) for res in t._reservations.values() for b in res.blocks)
                                + sum(r(b.length) for b in quarantined))
    # every allocated byte belongs to exactly one block: indexed, reserved, quarantined, or
    # deleted/replaced but still leased; no two of them share a slot
    doomed = {id(b): b for lease in t._leases.values() for b in lease.blocks if b.state == H.DOOMED}
    owners = [*indexed(t).values(), *(b for res in t._reservations.values() for b in res.blocks),
              *quarantined, *doomed.values()]
    assert len({id(b) for b in owners}) == len(owners)
    spans = sorted((b.offset, b.offset + r(b.length)) for b in owners)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "two blocks share a slot"
    assert t.used_bytes == sum(end - start for start, end in spans)
    assert t.pinned_blocks == sum(1 for b in indexed(t).values() if b.pin_until)
    assert t.pinned_bytes == sum(t.alloc.round(b.length) for b in indexed(t).values() if b.pin_until)
    assert t.pinned_bytes <= t.max_pinned_bytes
    assert t.snapshot()["blocks"] == len(indexed(t))
    assert all(b.ns == ns and b.key == k for (ns, k), b in indexed(t).items())  # filed where it belongs
    leased = {id(b): b for lease in t._leases.values() for b in lease.blocks}
    assert t.leased_blocks == len(leased)
    assert all(b.leases == sum(1 for lease in t._leases.values() for x in lease.blocks if x is b)
               for b in leased.values())
    for ns, s in t.ns_stats.items():
        blocks = [b for (n, _), b in indexed(t).items() if n == ns]
        assert s.blocks == len(blocks) and s.bytes == sum(b.length for b in blocks)


# ---- reserve / commit visibility -------------------------------------------------------------

def test_reserved_block_is_invisible_until_commit():
    t, _ = make()
    blob = data(7, 10_000)
    r = t.reserve(NS, [key(1)], [len(blob)])
    assert r.status == bytes([RESERVE_OK]) and r.reservation_id != 0
    assert r.lengths == [10_000] and r.offsets[0] % 4096 == 0 and r.offsets[0] >= 4096
    assert t.lookup(NS, [key(1)]) == (bytes([TIER_MISSING]), 0)
    a = t.acquire(NS, [key(1)])
    assert a.lease_id == 0 and a.tiers == bytes([TIER_MISSING])
    assert t.used_bytes == t.reserved_bytes == 12 * KiB

    assert t.begin_commit(r.reservation_id) == [(r.offsets[0], 10_000)]
    assert t.lookup(NS, [key(1)])[0] == bytes([TIER_MISSING])  # still invisible while committing
    assert t.acquire(NS, [key(1)]).lease_id == 0

    assert t.finish_commit(r.reservation_id, [checksum(blob)]) == checksum(blob)
    assert t.lookup(NS, [key(1)]) == (bytes([TIER_RAM]), 1)
    a = t.acquire(NS, [key(1)])
    assert a.lease_id != 0 and a.tiers == bytes([TIER_RAM])
    assert a.offsets == r.offsets and a.lengths == [10_000] and a.checksums == checksum(blob)
    assert t.reserved_bytes == 0 and t.used_bytes == 12 * KiB
    check_consistent(t)


def test_batch_reserve_gets_distinct_slots_and_commit_returns_digests_in_order():
    t, _ = make()
    blobs = [data(i, n) for i, n in enumerate((1, 4096, 4097, SLOT))]
    r = t.reserve(NS, [key(i) for i in range(4)], [len(b) for b in blobs])
    assert r.status == bytes(4)
    assert len(set(r.offsets)) == 4
    assert t.used_bytes == (1 + 1 + 2 + 16) * 4096
    sums = [checksum(b) for b in blobs]
    assert t.begin_commit(r.reservation_id) == list(zip(r.offsets, [len(b) for b in blobs]))
    assert t.finish_commit(r.reservation_id, sums) == b"".join(sums)
    a = t.acquire(NS, [key(i) for i in range(4)])
    assert a.checksums == b"".join(sums) and a.offsets == r.offsets
    check_consistent(t)


def test_checksum_is_xxh3_128_canonical():
    import xxhash
    assert checksum(b"abc") == xxhash.xxh3_128(b"abc").digest()
    assert len(checksum(b"")) == CHECKSUM_SIZE


def test_reserve_present_key_allocates_nothing():
    t, _ = make()
    put(t, [key(1)])
    used = t.used_bytes
    r = t.reserve(NS, [key(1)], [SLOT])
    assert r.status == bytes([RESERVE_PRESENT]) and r.reservation_id == 0 and r.offsets == [0]
    assert t.used_bytes == used and t.snapshot()["reservations"] == 0


def test_reserve_pending_key():
    t, _ = make()
    r1 = t.reserve(NS, [key(1)], [SLOT])
    r2 = t.reserve(NS, [key(1), key(2)], [SLOT, SLOT])
    assert r2.status == bytes([RESERVE_PENDING, RESERVE_OK]) and r2.reservation_id not in (0, r1.reservation_id)
    assert t.used_bytes == 2 * SLOT
    r3 = t.reserve(NS, [key(1), key(2)], [SLOT, SLOT], overwrite=True)  # overwrite does not bypass pending
    assert r3.status == bytes([RESERVE_PENDING, RESERVE_PENDING]) and r3.reservation_id == 0
    assert t.used_bytes == 2 * SLOT


def test_same_key_twice_in_one_batch_is_pending_the_second_time():
    t, _ = make()
    r = t.reserve(NS, [key(1), key(1)], [SLOT, SLOT])
    assert r.status == bytes([RESERVE_OK, RESERVE_PENDING]) and t.used_bytes == SLOT


def test_namespaces_are_separate():
    t, _ = make()
    put(t, [key(1)], ns="a")
    assert present(t, [key(1)], ns="a") == [True]
    assert present(t, [key(1)], ns="b") == [False]
    assert t.reserve("b", [key(1)], [SLOT]).status == bytes([RESERVE_OK])


# ---- overwrite -------------------------------------------------------------------------------

def test_overwrite_replaces_the_block_and_frees_the_old_slot():
    t, _ = make()
    old = data(1, 5000)
    put(t, [key(1)], [old])
    a = t.acquire(NS, [key(1)])
    old_off = a.offsets[0]
    t.release(a.lease_id)
    new = data(2, 9000)
    r = t.reserve(NS, [key(1)], [len(new)], overwrite=True)
    assert r.status == bytes([RESERVE_OK]) and r.offsets[0] != old_off
    a = t.acquire(NS, [key(1)])  # the old version stays visible until the commit
    assert a.checksums == checksum(old) and a.offsets == [old_off]
    t.release(a.lease_id)
    t.begin_commit(r.reservation_id)
    t.finish_commit(r.reservation_id, [checksum(new)])
    a = t.acquire(NS, [key(1)])
    assert a.checksums == checksum(new) and a.offsets == r.offsets and a.lengths == [9000]
    assert t.used_bytes == 12 * KiB  # only the new slot
    assert any(off <= old_off < off + size for off, size in t.alloc.extents())
    s = t.snapshot()
    assert s["blocks"] == 1
    ns = s["namespaces"][NS]
    assert (ns.blocks, ns.bytes, ns.puts, ns.put_bytes) == (1, 9000, 2, 14_000)
    t.release(a.lease_id)
    check_consistent(t)


def test_overwrite_of_a_leased_block_frees_the_old_slot_at_release():
    t, _ = make()
    put(t, [key(1)], [data(1)])
    lease = t.acquire(NS, [key(1)])
    old_off = lease.offsets[0]
    put(t, [key(1)], [data(2)], overwrite=True)
    assert t.used_bytes == 2 * SLOT  # the reader's bytes are still there
    assert not any(off <= old_off < off + size for off, size in t.alloc.extents())
    a = t.acquire(NS, [key(1)])
    assert a.checksums == checksum(data(2)) and a.offsets[0] != old_off
    t.release(a.lease_id)
    assert t.snapshot()["blocks"] == 1
    check_consistent(t)
    t.release(lease.lease_id)
    assert t.used_bytes == SLOT
    assert any(off <= old_off < off + size for off, size in t.alloc.extents())
    assert t.leased_blocks == 0
    check_consistent(t)


def test_overwrite_of_a_pinned_block_drops_the_pin():
    t, _ = make()
    put(t, [key(1)])
    assert t.pin(NS, [key(1)]) == b"\x01"
    put(t, [key(1)], [data(9)], overwrite=True)
    assert t.pinned_blocks == 0
    assert tracked(t, key(1)) is True  # the new version is evictable
    check_consistent(t)


# ---- checksums -------------------------------------------------------------------------------

def test_given_checksum_matching_computed_commits():
    t, _ = make()
    blobs = [data(1), data(2)]
    assert put(t, [key(1), key(2)], blobs, given=True) == checksum(blobs[0]) + checksum(blobs[1])
    assert present(t, [key(1), key(2)]) == [True, True]


def test_given_checksum_is_trusted_when_not_computed():
    t, _ = make()
    r = t.reserve(NS, [key(1)], [100])
    t.begin_commit(r.reservation_id)
    given = b"\xab" * CHECKSUM_SIZE
    assert t.finish_commit(r.reservation_id, None, given) == given
    assert t.acquire(NS, [key(1)]).checksums == given


def test_no_checksum_at_all_is_invalid_and_the_reservation_survives():
    t, _ = make()
    r = t.reserve(NS, [key(1)], [100])
    t.begin_commit(r.reservation_id)
    with pytest.raises(InvalidArgument):
        t.finish_commit(r.reservation_id, None, b"")
    assert present(t, [key(1)]) == [False]
    t.begin_commit(r.reservation_id)  # back to reserved: the client may commit again
    t.finish_commit(r.reservation_id, [checksum(b"x" * 100)])
    assert present(t, [key(1)]) == [True]


def test_checksum_mismatch_is_data_loss_and_frees_everything():
    t, _ = make()
    blobs = [data(1), data(2), data(3)]
    r = t.reserve(NS, [key(i) for i in range(3)], [SLOT] * 3)
    t.begin_commit(r.reservation_id)
    computed = [checksum(b) for b in blobs]
    given = computed[0] + checksum(b"corrupt") + computed[2]
    with pytest.raises(DataLoss):
        t.finish_commit(r.reservation_id, computed, given)
    assert present(t, [key(i) for i in range(3)]) == [False] * 3
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    assert t.alloc.extents() == [(t.alloc.start, t.alloc.capacity)]
    assert t.snapshot()["reservations"] == 0
    assert NS not in t.ns_stats or t.ns_stats[NS].puts == 0
    with pytest.raises(FailedPrecondition):  # ended (aborted by the mismatch), not unknown
        t.begin_commit(r.reservation_id)
    with pytest.raises(FailedPrecondition):
        t.abort(r.reservation_id)
    assert t.reserve(NS, [key(0)], [SLOT]).status == bytes([RESERVE_OK])  # no longer pending


@pytest.mark.parametrize("n", [1, CHECKSUM_SIZE - 1, CHECKSUM_SIZE + 1, 3 * CHECKSUM_SIZE])
def test_wrong_checksum_length_is_invalid(n):
    t, _ = make()
    r = t.reserve(NS, [key(1), key(2)], [SLOT, SLOT])
    t.begin_commit(r.reservation_id)
    sums = [checksum(data(0)), checksum(data(1))]
    with pytest.raises(InvalidArgument):
        t.finish_commit(r.reservation_id, sums, b"\x00" * n)
    assert present(t, [key(1), key(2)]) == [False, False]
    assert t.reserved_bytes == 2 * SLOT
    t.begin_commit(r.reservation_id)  # still reserved, commit can be retried
    t.finish_commit(r.reservation_id, sums, b"".join(sums))
    assert present(t, [key(1), key(2)]) == [True, True]


# ---- reservation ids, double commit, abort, expiry -------------------------------------------

def test_commit_of_an_unknown_reservation():
    t, _ = make()
    with pytest.raises(UnknownReservation):
        t.begin_commit(12345)
    with pytest.raises(FailedPrecondition):  # finish without begin: nothing is being committed
        t.finish_commit(12345, [checksum(b"")])
    with pytest.raises(UnknownReservation):
        t.abort(12345)
    assert issubclass(UnknownReservation, NotFound)


def test_reservation_and_lease_ids_are_random_63_bit():
    t, _ = make(slots=4)
    rids = [t.reserve(NS, [key(i)], [1]).reservation_id for i in range(32)]
    put(t, [key(100)], [data(1, 1)])
    lids = [t.acquire(NS, [key(100)]).lease_id for _ in range(32)]
    ids = rids + lids
    assert len(set(ids)) == len(ids)
    assert all(0 < i < 1 << 63 for i in ids)
    # not a counter: consecutive ids are no fixed step apart, and they spread over the whole range
    assert len({b - a for a, b in zip(ids, ids[1:])}) > 1
    assert max(ids) >= 1 << 56  # 64 random 63-bit ids all below 2**56: probability 2**-448
    check_consistent(t)


def free_at(t: HotTier, offset: int) -> bool:
    return any(off <= offset < off + size for off, size in t.alloc.extents())


def test_commit_of_an_expired_reservation_frees_it():
    t, clock = make()
    r = t.reserve(NS, [key(1)], [SLOT], ttl_ms=500)
    old = r.offsets[0]
    clock.advance(0.5)  # expires exactly at its deadline
    with pytest.raises(UnknownReservation):
        t.begin_commit(r.reservation_id)
    assert t.expired_reservations == 1 and t.snapshot()["reservations"] == 0
    # the slot is quarantined for one more TTL: still used and reserved, not reusable
    assert t.used_bytes == SLOT and t.reserved_bytes == SLOT and not free_at(t, old)
    with pytest.raises(UnknownReservation):  # expired is unknown, not FAILED_PRECONDITION
        t.begin_commit(r.reservation_id)
    with pytest.raises(UnknownReservation):
        t.abort(r.reservation_id)
    assert present(t, [key(1)]) == [False]
    r2 = t.reserve(NS, [key(1)], [SLOT])  # the key is no longer pending; it gets another slot
    assert r2.status == bytes([RESERVE_OK]) and r2.offsets[0] != old
    assert t.used_bytes == t.reserved_bytes == 2 * SLOT
    check_consistent(t)
    clock.advance(0.4375)
    t.expire()
    assert t.used_bytes == 2 * SLOT and not free_at(t, old)  # less than one TTL later: still held
    clock.advance(0.0625)
    t.expire()  # one TTL after the expiry: freed
    assert t.used_bytes == t.reserved_bytes == SLOT and free_at(t, old)
    assert t.expired_reservations == 1
    t.abort(r2.reservation_id)
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    check_consistent(t)


def test_reservation_just_before_its_deadline_commits():
    t, clock = make()
    r = t.reserve(NS, [key(1)], [SLOT], ttl_ms=500)
    clock.advance(0.499)
    t.expire()
    t.begin_commit(r.reservation_id)
    t.finish_commit(r.reservation_id, [checksum(data(0))])
    assert present(t, [key(1)]) == [True]


def test_double_commit():
    t, _ = make()
    r = t.reserve(NS, [key(1)], [SLOT])
    t.begin_commit(r.reservation_id)
    with pytest.raises(FailedPrecondition):  # already being committed
        t.begin_commit(r.reservation_id)
    t.finish_commit(r.reservation_id, [checksum(data(0))])
    with pytest.raises(FailedPrecondition):  # already committed
        t.begin_commit(r.reservation_id)
    with pytest.raises(FailedPrecondition):
        t.abort(r.reservation_id)
    with pytest.raises(FailedPrecondition):
        t.finish_commit(r.reservation_id, [checksum(data(0))])
    assert t.ns_stats[NS].puts == 1 and t.used_bytes == SLOT
    assert present(t, [key(1)]) == [True]


def test_abort_frees_the_slots():
    t, _ = make()
    r = t.reserve(NS, [key(1), key(2)], [SLOT, 3 * SLOT])
    assert t.used_bytes == 4 * SLOT
    t.abort(r.reservation_id)
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    assert t.alloc.extents() == [(t.alloc.start, t.alloc.capacity)]  # freed at once, no quarantine
    with pytest.raises(FailedPrecondition):  # already aborted
        t.begin_commit(r.reservation_id)
    with pytest.raises(FailedPrecondition):
        t.abort(r.reservation_id)
    r2 = t.reserve(NS, [key(1)], [SLOT])
    assert r2.status == bytes([RESERVE_OK]) and r2.offsets[0] == r.offsets[0]  # the slot is reusable


def test_abort_while_committing_is_refused_and_changes_nothing():
    t, _ = make()
    r = t.reserve(NS, [key(1)], [SLOT])
    t.begin_commit(r.reservation_id)
    with pytest.raises(FailedPrecondition):
        t.abort(r.reservation_id)
    t.finish_commit(r.reservation_id, [checksum(data(0))])
    assert present(t, [key(1)]) == [True]


def test_discard_ends_a_committing_reservation_and_ignores_unknown_ids():
    t, _ = make()
    r = t.reserve(NS, [key(1)], [SLOT])
    t.begin_commit(r.reservation_id)
    t.discard(r.reservation_id)
    t.discard(r.reservation_id)
    t.discard(999)
    assert t.used_bytes == 0 and present(t, [key(1)]) == [False]
    with pytest.raises(FailedPrecondition):
        t.finish_commit(r.reservation_id, [checksum(data(0))])
    assert present(t, [key(1)]) == [False]


def test_reservation_expiry_frees_slots():
    t, clock = make()
    r = t.reserve(NS, [key(1), key(2)], [SLOT, SLOT], ttl_ms=2000)
    assert r.ttl_ms == 2000
    clock.advance(1.9)
    t.expire()
    assert t.used_bytes == 2 * SLOT and t.snapshot()["reservations"] == 1
    clock.advance(0.2)
    t.expire()
    assert t.snapshot()["reservations"] == 0 and t.expired_reservations == 1
    # quarantined for one more TTL: still counted, neither slot reusable
    assert t.used_bytes == t.reserved_bytes == 2 * SLOT
    assert not any(free_at(t, off) for off in r.offsets)
    r2 = t.reserve(NS, [key(1)], [SLOT])  # no longer pending, but it gets a fresh slot
    assert r2.status == bytes([RESERVE_OK]) and r2.offsets[0] not in r.offsets
    with pytest.raises(UnknownReservation):
        t.begin_commit(r.reservation_id)
    check_consistent(t)
    clock.advance(1.9)
    t.expire()
    assert t.used_bytes == t.reserved_bytes == 3 * SLOT
    clock.advance(0.2)
    t.expire()
    assert t.used_bytes == t.reserved_bytes == SLOT  # only r2 is left
    assert all(free_at(t, off) for off in r.offsets)
    t.abort(r2.reservation_id)
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    check_consistent(t)


def test_reservation_default_ttl():
    t, clock = make(reservation_ms=3000)
    r = t.reserve(NS, [key(1)], [SLOT])
    assert r.ttl_ms == 3000
    clock.advance(2.9)
    t.expire()
    assert t.used_bytes == SLOT
    clock.advance(0.1)
    t.expire()
    assert t.expired_reservations == 1 and t.snapshot()["reservations"] == 0
    assert t.used_bytes == t.reserved_bytes == SLOT and not free_at(t, r.offsets[0])  # quarantined
    clock.advance(2.9)
    t.expire()
    assert t.used_bytes == SLOT
    clock.advance(0.2)
    t.expire()
    assert t.used_bytes == 0 and t.reserved_bytes == 0


def test_expired_reservations_are_reclaimed_before_anything_is_evicted():
    t, clock = make(slots=4)
    put(t, [key(0), key(1)])
    r = t.reserve(NS, [key(2), key(3)], [SLOT, SLOT], ttl_ms=100)
    clock.advance(1)
    t.expire()  # dead, but its slots are quarantined for another 100 ms
    assert t.expired_reservations == 1 and t.used_bytes == 4 * SLOT and t.reserved_bytes == 2 * SLOT
    put(t, [key(4)])  # the arena is full and the quarantine holds: a committed block is evicted
    assert t.evictions == 1 and present(t, [key(0), key(1), key(4)]) == [False, True, True]
    assert t.acquire(NS, [key(4)]).offsets[0] not in r.offsets
    check_consistent(t)
    clock.advance(0.25)
    put(t, [key(5)])  # the quarantine is over: its slots go before anything else is evicted
    assert present(t, [key(1), key(4), key(5)]) == [True] * 3
    assert t.evictions == 1 and t.expired_reservations == 1 and t.reserved_bytes == 0
    assert t.acquire(NS, [key(5)]).offsets[0] in r.offsets
    check_consistent(t)


def test_a_committing_reservation_does_not_expire():
    t, clock = make()
    r = t.reserve(NS, [key(1)], [SLOT], ttl_ms=100)
    t.begin_commit(r.reservation_id)
    clock.advance(10)
    t.expire()
    assert t.used_bytes == SLOT
    t.finish_commit(r.reservation_id, [checksum(data(0))])
    assert present(t, [key(1)]) == [True]
    check_consistent(t)


@pytest.mark.parametrize("computed,given", [([checksum(data(0))], b"short"), (None, b"")],
                         ids=["bad-checksum-length", "no-checksums"])
def test_reservation_returned_to_reserved_after_its_deadline_still_expires(computed, given):
    t, clock = make()
    r = t.reserve(NS, [key(1)], [SLOT], ttl_ms=1000)
    t.begin_commit(r.reservation_id)
    clock.advance(2)
    t.expire()  # the deadline passes while the commit is hashing
    with pytest.raises(InvalidArgument):
        t.finish_commit(r.reservation_id, computed, given)
    clock.advance(100)  # the client is gone
    t.expire()
    assert t.snapshot()["reservations"] == 0 and t.expired_reservations == 1
    assert t.used_bytes == t.reserved_bytes == SLOT and not free_at(t, r.offsets[0])  # quarantined
    r2 = t.reserve(NS, [key(1)], [SLOT])
    assert r2.status == bytes([RESERVE_OK]) and r2.offsets[0] != r.offsets[0]
    clock.advance(1)  # one more TTL
    t.expire()
    assert t.used_bytes == t.reserved_bytes == SLOT and free_at(t, r.offsets[0])  # only r2
    check_consistent(t)


def test_reservation_returned_to_reserved_keeps_its_deadline():
    t, clock = make()
    r = t.reserve(NS, [key(1)], [SLOT], ttl_ms=1000)
    t.begin_commit(r.reservation_id)
    with pytest.raises(InvalidArgument):
        t.finish_commit(r.reservation_id, None, b"")
    clock.advance(0.9)
    t.expire()
    assert t.used_bytes == SLOT  # not expired early, not extended either
    clock.advance(0.1)
    t.expire()
    assert t.expired_reservations == 1 and t.snapshot()["reservations"] == 0
    assert t.used_bytes == t.reserved_bytes == SLOT  # quarantined for one more TTL
    check_consistent(t)
    clock.advance(0.9)
    t.expire()
    assert t.used_bytes == SLOT
    clock.advance(0.2)
    t.expire()
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    check_consistent(t)


# ---- leases ----------------------------------------------------------------------------------

def test_leased_blocks_are_not_evictable_until_their_last_release():
    t, _ = make()
    put(t, [key(1), key(2)])
    a = t.acquire(NS, [key(1), key(2)])
    assert tracked(t, key(1)) is False and tracked(t, key(2)) is False
    assert t.leased_blocks == 2 and t.evictable_bytes == 0
    b = t.acquire(NS, [key(1)])  # a second lease on the same block
    t.release(a.lease_id)
    assert tracked(t, key(1)) is False and tracked(t, key(2)) is True
    assert t.leased_blocks == 1
    t.release(b.lease_id)
    assert tracked(t, key(1)) is True and t.leased_blocks == 0 and t.evictable_bytes == 2 * SLOT
    check_consistent(t)


@ALL_POLICIES
def test_a_leased_block_offered_to_eviction_is_skipped_and_returns_at_release(policy):
    t, _ = make(slots=4, policy=policy)
    keys = fill(t)
    a = t.acquire(NS, [keys[0]])               # the oldest: the first the policy offers
    b0 = t._blocks(NS)[keys[0]]
    assert b0.queued and b0 in t.policy        # a lease keeps the block's place in the policy
    put(t, [key(100)])
    assert present(t, keys) == [True, False, True, True]    # skipped; the next one went
    assert not b0.queued and b0 not in t.policy and t.evictions == 1
    assert (NS, keys[0]) not in getattr(t.policy, "_ghost", {})  # skipped, not evicted: no ghost of it
    check_consistent(t)
    t.release(a.lease_id)
    assert tracked(t, keys[0]) and t.evictable_bytes == 4 * SLOT
    check_consistent(t)
    others = [k for k in keys[1:] + [key(100)] if present(t, [k])[0]]
    t.acquire(NS, others)                      # evictable again: the only block that is
    put(t, [key(101)])
    assert not present(t, [keys[0]])[0] and present(t, others + [key(101)]) == [True] * 4
    check_consistent(t)


def test_release_of_unknown_lease_and_double_release():
    t, _ = make()
    with pytest.raises(UnknownLease):
        t.release(4242)
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)])
    t.release(a.lease_id)
    with pytest.raises(UnknownLease):
        t.release(a.lease_id)
    assert issubclass(UnknownLease, NotFound)
    check_consistent(t)


def test_lease_expiry_makes_blocks_evictable_and_release_unknown():
    t, clock = make()
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)], lease_ms=1000)
    assert a.lease_ms == 1000
    clock.advance(0.999)
    t.expire()
    assert t.leased_blocks == 1 and tracked(t, key(1)) is False
    clock.advance(0.001)
    t.expire()
    assert t.leased_blocks == 0 and t.expired_leases == 1
    assert tracked(t, key(1)) is True and t.snapshot()["leases"] == 0
    with pytest.raises(UnknownLease):
        t.release(a.lease_id)
    check_consistent(t)


def test_release_after_the_deadline_but_before_expire_is_unknown_and_ends_the_lease():
    t, clock = make()
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)], lease_ms=500)
    clock.advance(0.5)
    with pytest.raises(UnknownLease):
        t.release(a.lease_id)
    assert t.leased_blocks == 0 and t.expired_leases == 1 and tracked(t, key(1)) is True
    with pytest.raises(UnknownLease):
        t.release(a.lease_id)
    t.expire()  # its stale deadline is harmless
    assert t.expired_leases == 1
    check_consistent(t)


def test_lease_default_ttl():
    t, clock = make(lease_ms=2000)
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)])
    assert a.lease_ms == 2000
    clock.advance(1.9)
    t.expire()
    t.release(a.lease_id)  # still valid


def test_expired_lease_lets_eviction_take_the_block():
    t, clock = make(slots=2)
    put(t, [key(0), key(1)])
    t.acquire(NS, [key(0), key(1)], lease_ms=1000)
    with pytest.raises(ArenaFull):
        put(t, [key(2)])
    clock.advance(1)
    put(t, [key(2)])  # the lease expired on the way: a block could be evicted
    assert present(t, [key(2)]) == [True] and t.evictions == 1
    check_consistent(t)


def test_acquire_into_a_live_lease():
    t, _ = make()
    put(t, [key(1), key(2)], [data(1), data(2)])
    a = t.acquire(NS, [key(1)])
    b = t.acquire(NS, [key(2), key(3)], lease_id=a.lease_id)
    assert b.lease_id == a.lease_id and b.tiers == b"\x01\x00"
    assert t.snapshot()["leases"] == 1 and t.leased_blocks == 2
    t.release(a.lease_id)  # one release ends both
    assert t.leased_blocks == 0 and len(t.policy) == 2
    check_consistent(t)


def test_acquire_into_an_unknown_lease_takes_nothing():
    t, _ = make()
    put(t, [key(1)])
    with pytest.raises(UnknownLease):
        t.acquire(NS, [key(1)], lease_id=777)
    assert t.leased_blocks == 0 and tracked(t, key(1)) is True  # nothing stayed held
    a = t.acquire(NS, [key(1)])
    assert a.lease_id not in (0, 777)
    t.release(a.lease_id)
    check_consistent(t)


def test_acquire_into_a_lease_past_its_deadline_does_not_join_it():
    t, clock = make()
    put(t, [key(1), key(2)], [data(1), data(2)])
    a = t.acquire(NS, [key(1)], lease_ms=1000)
    clock.advance(1.5)
    with pytest.raises(UnknownLease):
        t.acquire(NS, [key(2)], lease_ms=1000, lease_id=a.lease_id)
    assert tracked(t, key(2)) is True and t.leased_blocks == 1  # key 2 not held; key 1 until the sweep
    t.expire()
    assert t.leased_blocks == 0
    check_consistent(t)


# ---- delete ----------------------------------------------------------------------------------

def test_delete_frees_at_once_when_not_leased():
    t, _ = make()
    put(t, [key(1), key(2)])
    assert t.delete(NS, [key(1), key(9)]) == 1
    assert present(t, [key(1), key(2)]) == [False, True]
    assert t.used_bytes == SLOT and t.ns_stats[NS].blocks == 1
    assert t.delete(NS, [key(1)]) == 0
    check_consistent(t)


def test_delete_of_a_leased_block_hides_it_now_and_frees_it_at_release():
    t, _ = make()
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)])
    assert t.delete(NS, [key(1)]) == 1
    assert present(t, [key(1)]) == [False]
    assert t.acquire(NS, [key(1)]).lease_id == 0
    assert t.used_bytes == SLOT and not any(off <= a.offsets[0] < off + s for off, s in t.alloc.extents())
    assert t.reserve(NS, [key(1)], [SLOT]).status == bytes([RESERVE_OK])  # the key may be written again
    t.release(a.lease_id)
    assert t.used_bytes == SLOT  # only the new reservation
    assert any(off <= a.offsets[0] < off + s for off, s in t.alloc.extents())
    assert tracked(t, key(1)) is False
    check_consistent(t)


def test_delete_of_a_leased_block_whose_lease_expires():
    t, clock = make()
    put(t, [key(1)])
    t.acquire(NS, [key(1)], lease_ms=100)
    t.delete(NS, [key(1)])
    clock.advance(1)
    t.expire()
    assert t.used_bytes == 0 and t.leased_blocks == 0
    assert tracked(t, key(1)) is False
    check_consistent(t)


def test_delete_of_a_pinned_block():
    t, _ = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)], ttl_s=10)
    assert t.delete(NS, [key(1)]) == 1
    assert t.pinned_blocks == 0 and t.used_bytes == 0
    check_consistent(t)


# ---- eviction --------------------------------------------------------------------------------

def test_lru_eviction_order():
    t, _ = make(slots=4, policy="lru")
    keys = fill(t)
    assert len(keys) == 4
    t.release(t.acquire(NS, [keys[0]]).lease_id)  # read: now most recently used
    t.lookup(NS, [keys[1]])                         # lookup is not a read
    put(t, [key(10)])
    assert present(t, keys) == [True, False, True, True]
    put(t, [key(11)])
    assert present(t, keys) == [True, False, False, True]
    put(t, [key(12)])
    put(t, [key(13)])
    assert present(t, keys) == [False, False, False, False]
    assert present(t, [key(10), key(11), key(12), key(13)]) == [True] * 4
    assert t.evictions == 4 and t.ns_stats[NS].evictions == 4
    check_consistent(t)


def test_s3fifo_a_block_read_while_new_outlives_the_unread_ones():
    t, _ = make(slots=4, policy="s3fifo")
    keys = fill(t)
    for _ in range(2):  # reads are counted on the block; the policy takes them when it gets there
        t.release(t.acquire(NS, [keys[0]]).lease_id)
    t.lookup(NS, [keys[1]])                         # lookup is not a read
    put(t, [key(10)])
    assert present(t, keys) == [True, False, True, True]
    put(t, [key(11)])
    put(t, [key(12)])
    assert present(t, keys) == [True, False, False, False]
    check_consistent(t)


def _hot_set_hit_rate(policy: str) -> float:
    """A 100-slot tier; 10 hot blocks read 3 times, then 3000 one-off blocks written and read once,
    a hot block read after every 10 of them (each hot block every ~100 one-offs). Every miss is
    written back. Returns the hit rate of the hot reads during the scan."""
    t, _ = make(slots=100, policy=policy)
    hot = [key(10**6 + i) for i in range(10)]
    hits = refs = 0

    def read(k: bytes) -> bool:
        a = t.acquire(NS, [k])
        if a.lease_id:
            t.release(a.lease_id)
            return True
        put(t, [k], [data(1)])
        return False

    for _ in range(3):
        for k in hot:
            read(k)
    for i in range(3000):
        read(key(i))
        if i % 10 == 9:
            refs += 1
            hits += read(hot[(i // 10) % 10])
    check_consistent(t)
    return hits / refs


def test_s3fifo_tier_keeps_the_hot_set_through_a_scan_where_lru_loses_it():
    lru, s3 = _hot_set_hit_rate("lru"), _hot_set_hit_rate("s3fifo")
    assert lru < 0.1 and s3 > 0.9, (lru, s3)


@ALL_POLICIES
def test_eviction_follows_the_policy(policy):
    t, _ = make(slots=16, policy=policy)
    victims: list = []
    real_victim = t.policy.victim

    def recording_victim():
        k = real_victim()
        victims.append((k.ns, k.key))
        return k

    t.policy.victim = recording_victim
    rng = random.Random(5)
    live: set = set(fill(t))
    for i in range(100, 400):
        if rng.random() < 0.5:
            k = rng.choice(sorted(live))
            t.release(t.acquire(NS, [k]).lease_id)
        before, seen = set(live), len(victims)
        put(t, [key(i)])
        live = {k for k in before | {key(i)} if present(t, [k])[0]}
        assert victims[seen:] == [(NS, k) for k in before - live]  # one victim per put, the policy's
    assert len(victims) == 300 and t.evictions == 300
    assert len(set(victims)) == len(victims)
    check_consistent(t)



@ALL_POLICIES
def test_an_eviction_whose_hook_fails_still_frees_the_slot(policy, caplog):
    t, _ = make(slots=4, policy=policy)
    keys = fill(t)
    failing, seen = [True], []

    def on_evict(b):
        seen.append(b.key)
        if failing[0]:
            raise OSError(12, "Cannot allocate memory")  # e.g. no buffer to copy the block out

    t.on_evict = on_evict
    put(t, [key(100)])  # the hook fails: the block goes all the same, without its lower-tier copy
    assert len(seen) == 1 and not present(t, seen)[0] and present(t, [key(100)])[0]
    assert t.evictions == 1 and t.evict_hook_errors == 1 and "eviction hook" in caplog.text
    check_consistent(t)
    for i in range(101, 104):  # no slot was lost: the arena turns over as before
        put(t, [key(i)])
    assert t.evict_hook_errors == 4 and t.evictions == 4
    assert not any(present(t, keys)) and all(present(t, [key(i) for i in range(100, 104)]))
    check_consistent(t)
    failing[0] = False
    put(t, [key(200)])
    assert t.evictions == 5 and t.evict_hook_errors == 4
    check_consistent(t)


def test_an_interrupted_eviction_hook_leaves_the_tier_consistent():
    t, _ = make(slots=2)
    fill(t)

    def on_evict(b):
        raise KeyboardInterrupt

    t.on_evict = on_evict
    with pytest.raises(KeyboardInterrupt):
        put(t, [key(100)])
    check_consistent(t)
    t.on_evict = lambda b: None
    put(t, [key(100)])
    put(t, [key(101)])
    assert present(t, [key(100), key(101)]) == [True, True]
    check_consistent(t)

@ALL_POLICIES
def test_pinned_and_leased_blocks_are_never_evicted(policy):
    t, clock = make(slots=16, policy=policy)
    keys = fill(t)
    pinned, leased = keys[:4], keys[4:8]
    assert t.pin(NS, pinned) == b"\x01" * 4
    lease = t.acquire(NS, leased, lease_ms=600_000)
    rng = random.Random(1)
    for i in range(100, 300):
        put(t, [key(i)], [data(i, rng.choice([4096, SLOT, 2 * SLOT]))])
        assert present(t, pinned + leased) == [True] * 8
        clock.advance(1)
    assert t.evictions > 150
    assert t.pinned_blocks == 4 and t.leased_blocks == 4
    a = t.acquire(NS, pinned + leased)
    assert a.checksums == b"".join(checksum(data(i)) for i in range(8))  # the same bytes, never reused
    t.release(a.lease_id)
    t.release(lease.lease_id)
    check_consistent(t)


@ALL_POLICIES
def test_full_arena_of_pinned_leased_reserved_is_arena_full_and_changes_nothing(policy):
    t, _ = make(slots=6, policy=policy)
    keys = fill(t)
    t.pin(NS, keys[:2])
    t.acquire(NS, keys[2:4])
    t.delete(NS, keys[4:])                  # the last 2 slots: one reserved below, one left free
    r = t.reserve(NS, [key(50)], [SLOT])
    assert r.status == bytes([RESERVE_OK])
    assert t.alloc.free_bytes == SLOT
    before = state(t)
    with pytest.raises(ArenaFull):
        t.reserve(NS, [key(60)], [2 * SLOT])                # bigger than all the free space
    assert state(t) == before
    with pytest.raises(ArenaFull):
        t.reserve(NS, [key(60), key(61)], [SLOT, SLOT])     # the first fits, the second does not
    assert state(t) == before
    assert t.reserve(NS, [key(61)], [SLOT]).status == bytes([RESERVE_OK])  # the free slot was not leaked
    check_consistent(t)


@ALL_POLICIES
def test_arena_full_without_evicting_when_evicting_everything_would_not_be_enough(policy):
    t, _ = make(slots=4, policy=policy)
    keys = fill(t)
    t.pin(NS, keys[:2])
    t.delete(NS, [keys[3]])  # 1 slot free, 1 evictable, 2 pinned
    before = state(t)
    with pytest.raises(ArenaFull):
        t.reserve(NS, [key(9)], [3 * SLOT])
    assert state(t) == before and present(t, [keys[2]]) == [True]
    put(t, [key(9)], [data(9, 2 * SLOT)])  # 2 slots can be had: the evictable block goes
    assert present(t, [keys[2]]) == [False] and t.evictions == 1


@ALL_POLICIES
def test_arena_full_when_free_space_is_fragmented_and_nothing_is_evictable(policy):
    t, _ = make(slots=4, policy=policy)
    keys = fill(t)
    t.pin(NS, [keys[1], keys[3]])
    t.delete(NS, [keys[0], keys[2]])
    assert t.alloc.free_bytes == 2 * SLOT and t.alloc.largest_free() == SLOT
    before = state(t)
    with pytest.raises(ArenaFull):
        t.reserve(NS, [key(9)], [2 * SLOT])
    assert state(t) == before


def test_arena_full_batch_evicts_nothing():
    t, _ = make(slots=4)
    keys = fill(t)
    t.pin(NS, keys[:2])
    with pytest.raises(ArenaFull):
        t.reserve(NS, [key(10), key(11), key(12)], [SLOT, SLOT, SLOT])  # needs 3, only 2 can be had
    assert present(t, keys) == [True] * 4
    assert t.evictions == 0


def test_eviction_makes_room_for_a_larger_block():
    t, _ = make(slots=4)
    keys = fill(t)
    put(t, [key(10)], [data(10, 2 * SLOT)])
    assert present(t, keys) == [False, False, True, True]  # LRU: the two oldest, adjacent
    assert t.used_bytes == 4 * SLOT
    check_consistent(t)


def test_too_large_and_clamped_to_capacity():
    t, _ = make(slots=8, max_block_bytes=2 * SLOT)
    with pytest.raises(TooLarge):
        t.reserve(NS, [key(1)], [2 * SLOT + 1])
    with pytest.raises(TooLarge):  # one bad size refuses the batch
        t.reserve(NS, [key(1), key(2)], [SLOT, 3 * SLOT])
    assert t.used_bytes == 0 and present(t, [key(1)]) == [False]
    put(t, [key(1)], [data(1, 2 * SLOT)])
    t2, _ = make(slots=2, max_block_bytes=1 << 40)
    assert t2.max_block_bytes == 2 * SLOT
    with pytest.raises(TooLarge):
        t2.reserve(NS, [key(1)], [2 * SLOT + 1])
    assert issubclass(TooLarge, ResourceExhausted) and issubclass(ArenaFull, ResourceExhausted)


@pytest.mark.parametrize("sizes", [[0], [-1], [SLOT, 0]])
def test_size_zero_or_negative_is_invalid(sizes):
    t, _ = make()
    with pytest.raises(InvalidArgument):
        t.reserve(NS, [key(i) for i in range(len(sizes))], sizes)
    assert t.used_bytes == 0


def test_keys_and_sizes_must_pair_up():
    t, _ = make()
    with pytest.raises(InvalidArgument):
        t.reserve(NS, [key(1), key(2)], [SLOT])
    assert t.used_bytes == 0


@pytest.mark.parametrize("ms", [-1, 600_001])
def test_bad_ttls_are_invalid(ms):
    t, _ = make(max_ttl_ms=600_000)
    with pytest.raises(InvalidArgument):
        t.reserve(NS, [key(1)], [SLOT], ttl_ms=ms)
    assert t.used_bytes == 0
    put(t, [key(1)])
    with pytest.raises(InvalidArgument):
        t.acquire(NS, [key(1)], lease_ms=ms)
    assert t.leased_blocks == 0 and t.snapshot()["leases"] == 0


def test_max_ttl_is_accepted():
    t, _ = make(max_ttl_ms=5000)
    assert t.reserve(NS, [key(1)], [SLOT], ttl_ms=5000).ttl_ms == 5000


def test_negative_pin_ttl_is_invalid():
    t, _ = make()
    put(t, [key(1)])
    with pytest.raises(InvalidArgument):
        t.pin(NS, [key(1)], ttl_s=-1)
    assert t.pinned_blocks == 0 and tracked(t, key(1)) is True


# ---- pins ------------------------------------------------------------------------------------

def test_pin_reports_which_keys_it_pinned():
    t, _ = make()
    put(t, [key(1), key(3)])
    t.reserve(NS, [key(2)], [SLOT])  # reserved, not committed: cannot be pinned
    assert t.pin(NS, [key(1), key(2), key(3), key(4)]) == bytes([1, 0, 1, 0])
    assert t.pinned_blocks == 2
    assert tracked(t, key(1)) is False and tracked(t, key(3)) is False
    check_consistent(t)


def test_pins_stop_at_max_pinned_and_the_rest_stay_evictable():
    t, clock = make(slots=8, max_pinned=0.5)  # 4 of the 8 slots
    keys = fill(t)
    assert t.pin(NS, keys[:3], ttl_s=10) == bytes([1, 1, 1])
    assert t.pin(NS, keys[3:6]) == bytes([1, 0, 0])  # the fourth fits, the rest would pass the share
    assert t.pinned_blocks == 4 and t.pinned_bytes == 4 * SLOT and t.pins_refused == 2
    assert tracked(t, keys[4]) and tracked(t, keys[5])  # left to the eviction policy
    assert t.pin(NS, keys[:4]) == bytes([1, 1, 1, 1])  # already pinned: extended, not refused
    assert t.pins_refused == 2
    check_consistent(t)
    clock.advance(10)
    t.expire()  # ttl_s=10 pins of keys[:3] were made forever by the second pin: still pinned
    assert t.pinned_blocks == 4
    t.unpin(NS, keys[:1])
    t.delete(NS, keys[1:2])
    assert t.pinned_bytes == 2 * SLOT
    assert t.pin(NS, keys[4:7]) == bytes([1, 1, 0])  # room for two again
    check_consistent(t)
    snap = t.snapshot()
    assert snap["pinned_bytes"] == 4 * SLOT and snap["pins_refused"] == 3


def test_pin_ttl_expiry():
    t, clock = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)], ttl_s=10)
    clock.advance(9.9)
    t.expire()
    assert t.pinned_blocks == 1 and tracked(t, key(1)) is False
    clock.advance(0.1)
    t.expire()
    assert t.pinned_blocks == 0 and tracked(t, key(1)) is True
    check_consistent(t)


def test_pin_is_extended_not_shortened():
    t, clock = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)], ttl_s=100)
    t.pin(NS, [key(1)], ttl_s=10)
    clock.advance(50)
    t.expire()
    assert t.pinned_blocks == 1
    t.pin(NS, [key(1)], ttl_s=100)  # now until t+150
    clock.advance(60)
    t.expire()
    assert t.pinned_blocks == 1
    clock.advance(40)
    t.expire()
    assert t.pinned_blocks == 0
    check_consistent(t)


def test_pin_forever_outlasts_timed_pins():
    t, clock = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)], ttl_s=10)
    t.pin(NS, [key(1)])  # ttl 0: until unpinned
    t.pin(NS, [key(1)], ttl_s=5)
    clock.advance(1e6)
    t.expire()
    assert t.pinned_blocks == 1 and tracked(t, key(1)) is False


def test_unpin():
    t, _ = make()
    put(t, [key(1), key(2)])
    t.pin(NS, [key(1)])
    assert t.unpin(NS, [key(1), key(2), key(9)]) == 1
    assert t.pinned_blocks == 0 and tracked(t, key(1)) is True
    assert t.unpin(NS, [key(1)]) == 0
    check_consistent(t)


def test_stale_pin_deadline_after_unpin_and_repin_forever_is_ignored():
    t, clock = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)], ttl_s=10)
    t.unpin(NS, [key(1)])
    t.pin(NS, [key(1)])
    clock.advance(20)
    t.expire()
    assert t.pinned_blocks == 1 and tracked(t, key(1)) is False
    check_consistent(t)


def test_unpin_of_a_leased_block_waits_for_the_release():
    t, _ = make()
    put(t, [key(1)])
    t.pin(NS, [key(1)])
    a = t.acquire(NS, [key(1)])
    t.unpin(NS, [key(1)])
    assert tracked(t, key(1)) is False
    t.release(a.lease_id)
    assert tracked(t, key(1)) is True
    check_consistent(t)


def test_release_of_a_pinned_block_keeps_it_out_of_the_policy():
    t, _ = make()
    put(t, [key(1)])
    a = t.acquire(NS, [key(1)])
    t.pin(NS, [key(1)])
    t.release(a.lease_id)
    assert tracked(t, key(1)) is False and t.pinned_blocks == 1
    check_consistent(t)


# ---- lookup / acquire / stats ----------------------------------------------------------------

def test_lookup_prefix_len():
    t, _ = make()
    put(t, [key(0), key(1), key(3)])
    ks = [key(0), key(1), key(2), key(3)]
    assert t.lookup(NS, ks) == (bytes([1, 1, 0, 1]), 2)
    assert t.lookup(NS, [key(0), key(1)]) == (b"\x01\x01", 2)
    assert t.lookup(NS, [key(2), key(0)]) == (b"\x00\x01", 0)
    assert t.lookup(NS, []) == (b"", 0)
    assert t.lookup("other", ks) == (bytes(4), 0)


def test_acquire_all_and_prefix_only():
    t, _ = make()
    put(t, [key(0), key(2)])
    ks = [key(0), key(1), key(2)]
    a = t.acquire(NS, ks)
    assert a.tiers == bytes([1, 0, 1])
    assert a.lengths == [SLOT, 0, SLOT] and a.offsets[1] == 0
    assert a.checksums[CHECKSUM_SIZE:2 * CHECKSUM_SIZE] == ZERO_CHECKSUM
    assert t.leased_blocks == 2
    t.release(a.lease_id)
    s = t.ns_stats[NS]
    assert (s.hits, s.misses) == (2, 1)

    p = t.acquire(NS, ks, prefix_only=True)
    assert p.tiers == bytes([1, 0, 0]) and p.lengths == [SLOT, 0, 0]
    assert len(p.checksums) == 3 * CHECKSUM_SIZE and p.checksums[CHECKSUM_SIZE:] == ZERO_CHECKSUM * 2
    assert t.leased_blocks == 1 and tracked(t, key(2)) is True  # the block after the gap is not leased
    assert (s.hits, s.misses) == (3, 3)  # every key from the gap on is a miss: none of them is served
    t.release(p.lease_id)

    m = t.acquire(NS, [key(1), key(0)], prefix_only=True)
    assert m.lease_id == 0 and m.tiers == b"\x00\x00" and t.leased_blocks == 0
    assert (s.hits, s.misses) == (3, 5)
    u = t.acquire(NS, ks, counted=False)  # a read an earlier Acquire counted: nothing counted
    assert (s.hits, s.misses, s.get_bytes) == (3, 5, 3 * SLOT) and u.tiers == bytes([1, 0, 1])
    t.release(u.lease_id)
    check_consistent(t)


def test_acquire_same_key_twice_in_one_lease():
    t, _ = make()
    put(t, [key(1)])
    a = t.acquire(NS, [key(1), key(1)])
    assert a.tiers == b"\x01\x01" and t.leased_blocks == 1
    t.release(a.lease_id)
    assert t.leased_blocks == 0 and tracked(t, key(1)) is True
    check_consistent(t)


def test_per_namespace_stats():
    t, _ = make(slots=1)  # 64 KiB
    put(t, [key(0), key(1)], [data(0, 1000), data(1, 5000)], ns="a")
    put(t, [key(0)], [data(0, 7000)], ns="b")
    t.lookup("a", [key(0), key(1), key(2)])
    t.lookup("b", [key(0)])
    t.release(t.acquire("a", [key(0), key(2)]).lease_id)
    t.acquire("b", [key(5)])
    snap = t.snapshot()["namespaces"]
    a, b = snap["a"], snap["b"]
    assert (a.blocks, a.bytes, a.puts, a.put_bytes) == (2, 6000, 2, 6000)
    assert (a.hits, a.misses, a.get_bytes, a.lookups, a.evictions) == (1, 1, 1000, 3, 0)
    assert (b.blocks, b.bytes, b.puts, b.put_bytes) == (1, 7000, 1, 7000)
    assert (b.hits, b.misses, b.get_bytes, b.lookups, b.evictions) == (0, 1, 0, 1, 0)
    # 44 KiB free at the end; 60 KiB needed: LRU evicts a/key(1) (8 KiB), then b/key(0) (8 KiB, adjacent)
    put(t, [key(9)], [data(9, 60_000)], ns="b")
    snap = t.snapshot()["namespaces"]
    assert snap["a"].evictions == 1 and snap["b"].evictions == 1
    assert (snap["a"].blocks, snap["a"].bytes) == (1, 1000)
    assert (snap["b"].blocks, snap["b"].bytes, snap["b"].puts) == (1, 60_000, 2)
    assert snap["a"] is not t.ns_stats["a"]  # a copy


def test_snapshot_counters():
    t, _ = make(slots=4)
    put(t, [key(0), key(1)])
    t.pin(NS, [key(0)])
    t.acquire(NS, [key(1)])
    t.reserve(NS, [key(2)], [100])
    s = t.snapshot()
    assert s["capacity_bytes"] == 4 * SLOT and s["used_bytes"] == 2 * SLOT + 4096
    assert s["blocks"] == 2 and s["policy"] == "lru"
    assert s["largest_free_bytes"] == 4 * SLOT - 2 * SLOT - 4096
    assert (s["reserved_bytes"], s["pinned_blocks"], s["leased_blocks"]) == (4096, 1, 1)
    assert (s["leases"], s["reservations"]) == (1, 1)


# ---- randomized consistency ------------------------------------------------------------------

@ALL_POLICIES
def test_random_operations_keep_the_counters_consistent(policy):
    rng = random.Random(17)
    t, clock = make(slots=32, policy=policy, max_block_bytes=4 * SLOT)
    reservations: list[int] = []
    leases: list[int] = []
    sizes = [1, 4096, 10_000, SLOT, 3 * SLOT]
    quarantined = 0  # most bytes seen in quarantine at once
    for step in range(1500):
        op = rng.random()
        ks = [key(rng.randrange(60)) for _ in range(rng.randint(1, 3))]
        try:
            if op < 0.30:
                r = t.reserve(NS, ks, [rng.choice(sizes) for _ in ks], ttl_ms=rng.choice([0, 500, 5000]),
                              overwrite=rng.random() < 0.3)
                if r.reservation_id:
                    reservations.append(r.reservation_id)
            elif op < 0.50 and reservations:
                rid = reservations.pop(rng.randrange(len(reservations)))
                slots = t.begin_commit(rid)
                sums = [checksum(bytes([step % 256]) * n) for _, n in slots]
                if rng.random() < 0.05:
                    with pytest.raises(DataLoss):
                        t.finish_commit(rid, sums, ZERO_CHECKSUM * len(sums))
                else:
                    t.finish_commit(rid, sums)
            elif op < 0.55 and reservations:
                t.abort(reservations.pop(rng.randrange(len(reservations))))
            elif op < 0.70:
                a = t.acquire(NS, ks, lease_ms=rng.choice([0, 300, 3000]), prefix_only=rng.random() < 0.3)
                if a.lease_id:
                    leases.append(a.lease_id)
            elif op < 0.80 and leases:
                t.release(leases.pop(rng.randrange(len(leases))))
            elif op < 0.85:
                t.delete(NS, ks)
            elif op < 0.90:
                t.pin(NS, ks, ttl_s=rng.choice([0, 1, 5]))
            elif op < 0.93:
                t.unpin(NS, ks)
            else:
                clock.advance(rng.choice([0.1, 0.5, 2]))
                t.expire()
        except (ArenaFull, UnknownReservation, UnknownLease):
            pass
        check_consistent(t)
        for (ns, k), b in indexed(t).items():
            assert b.state == H.COMMITTED and b.key == k
        quarantined = max(quarantined, sum(t.alloc.round(b.length) for _, _, b in t._quarantine))
    assert t.evictions > 0 and t.expired_leases > 0 and t.expired_reservations > 0 and quarantined > 0
    for lid in leases:
        try:
            t.release(lid)
        except UnknownLease:
            pass
    for rid in reservations:
        t.discard(rid)
    t.unpin(NS, [key(i) for i in range(60)])
    t.delete(NS, [key(i) for i in range(60)])
    check_consistent(t)
    # what is left is the quarantine of expired reservations, gone one TTL (30 s at most) later
    left = sum(t.alloc.round(b.length) for _, _, b in t._quarantine)
    assert t.used_bytes == t.reserved_bytes == left
    clock.advance(30)
    t.expire()
    check_consistent(t)
    assert t.used_bytes == 0 and t.reserved_bytes == 0
    assert t.alloc.extents() == [(t.alloc.start, t.alloc.capacity)]


def check_groups(t: HotTier) -> None:
    """Each group's bytes are those of the blocks charged to it, never negative."""
    used, evictable = {}, {}
    for b in indexed(t).values():
        used[b.group] = used.get(b.group, 0) + t.alloc.round(b.length)
        if t._evictable(b):
            evictable[b.group] = evictable.get(b.group, 0) + t.alloc.round(b.length)
            assert b in t._pol(b.group)
    assert {g: n for g, n in t.group_used.items() if n} == used
    assert {g: n for g, n in t.group_evictable.items() if n} == evictable
    assert t.used_bytes == sum(used.values())


def test_a_namespace_moved_to_another_tenant_keeps_ram_accounting_straight():
    t, _ = make(slots=8)
    t.group_of, t.quotas = (lambda ns: "A"), {"A": 4 * SLOT}
    put(t, [key(i) for i in range(4)], ns="x")
    # a reload moves x to tenant B: x's blocks stay charged to A, new ones are B's
    t.group_of = lambda ns: "B" if ns == "x" else "A"
    t.quotas = {"A": 4 * SLOT, "B": 2 * SLOT}
    a = t.acquire("x", [key(1)])
    t.release(a.lease_id)  # back into A's policy, not B's
    assert t.delete("x", [key(0)]) == 1
    check_groups(t)
    assert t.group_used["A"] == 3 * SLOT and t.group_used.get("B", 0) == 0
    put(t, [key(100 + i) for i in range(4)], ns="y")  # A over its quota: x's old blocks go
    check_groups(t)
    assert not any(present(t, [key(i) for i in range(4)], ns="x"))
    for i in range(3):  # B's quota evicts B's own blocks only
        put(t, [key(i)], [data(i)], ns="x")
        check_groups(t)
    assert t.group_used == {"A": 4 * SLOT, "B": 2 * SLOT}
    assert all(present(t, [key(100 + i) for i in range(4)], ns="y"))


def test_an_empty_lease_takes_blocks_as_they_join_and_ends_as_any_other():
    t, clock = make()
    lid = t.open_lease(NS, 500)
    assert lid and t.snapshot()["leases"] == 1
    put(t, [key(1)])
    got = t.acquire(NS, [key(1)], 500, lease_id=lid)
    assert got.lease_id == lid and t.leased_blocks == 1
    t.release(lid)
    assert t.leased_blocks == 0 and t.snapshot()["leases"] == 0
    gone = t.open_lease(NS, 500)
    clock.advance(1.0)
    with pytest.raises(UnknownLease):
        t.acquire(NS, [key(1)], 500, lease_id=gone)


# ---- bounds on what one client makes the hot tier hold ---------------------------------------

def test_a_block_asked_twice_in_one_acquire_is_held_once():
    t, _ = make()
    put(t, [key(1), key(2)])
    a = t.acquire(NS, [key(1), key(2), key(1), key(1)])
    assert a.tiers == bytes([TIER_RAM] * 4) and a.offsets[0] == a.offsets[2] == a.offsets[3]
    b1 = t._blocks(NS)[key(1)]
    assert b1.leases == 1 and len(t._leases[a.lease_id].blocks) == 2
    assert t.snapshot()["namespaces"][NS].hits == 4  # every position is a read
    t.delete(NS, [key(1)])  # doomed while leased: freed once, at the release
    t.release(a.lease_id)
    assert b1.leases == 0 and t.leased_blocks == 0 and t.used_bytes == t.alloc.round(SLOT)


def test_leases_per_group_are_bounded(monkeypatch):
    monkeypatch.setattr(H, "TENANT_LEASES", 3)
    monkeypatch.setattr(H, "TENANT_LEASED", 4)
    t, _ = make()
    t.group_of = lambda ns: "B" if ns == "b" else "A"
    put(t, [key(1), key(2), key(3)])
    put(t, [key(9)], ns="b")
    ids = [t.acquire(NS, [key(1)]).lease_id for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="tenant A: 3 live leases"):
        t.acquire(NS, [key(2)])
    assert t.acquire("b", [key(9)]).lease_id  # another group's bound is its own
    t.release(ids.pop())
    with pytest.raises(ResourceExhausted, match="tenant A: leases hold 2 blocks"):
        t.acquire(NS, [key(1), key(2), key(3)])  # 2 held + 3 > 4
    assert t._blocks(NS)[key(2)].leases == 0  # a refused Acquire holds nothing
    # a join past the bound leases nothing: its keys are misses
    joined = t.acquire(NS, [key(2), key(3)], lease_id=ids[0])
    assert joined.tiers == bytes([TIER_RAM] * 2)
    assert t.acquire(NS, [key(3)], lease_id=ids[0]).tiers == bytes([TIER_MISSING])
    for i in ids:
        t.release(i)
    assert t._lease_use["A"] == [0, 0]
    assert t.acquire(NS, [key(1), key(2), key(3)]).lease_id


def test_open_lease_counts_against_the_bound(monkeypatch):
    monkeypatch.setattr(H, "TENANT_LEASES", 1)
    t, _ = make()
    t.open_lease(NS)
    with pytest.raises(ResourceExhausted, match="live leases"):
        t.open_lease(NS)


def test_deadlines_of_ended_leases_and_reservations_do_not_pile_up():
    t, _ = make()
    put(t, [key(1)])
    for _ in range(20_000):
        t.release(t.acquire(NS, [key(1)], lease_ms=600_000).lease_id)
    for i in range(2, 20_000):
        r = t.reserve(NS, [key(i)], [100], ttl_ms=600_000)
        t.abort(r.reservation_id)
    assert len(t._deadlines) <= 2 * (len(t._leases) + len(t._reservations)) + H.HEAP_SLACK
    live = t.acquire(NS, [key(1)], lease_ms=1000)
    t.clock.advance(2)
    t.expire()
    assert live.lease_id not in t._leases  # the lease still expires


def test_extended_pins_do_not_pile_up():
    t, clock = make()
    put(t, [key(1), key(2)])
    for i in range(10_000):
        clock.advance(0.001)
        t.pin(NS, [key(1)] * 4, ttl_s=60)
    assert len(t._pins) <= 2 * t.pinned_blocks + H.HEAP_SLACK
    t.pin(NS, [key(2)], ttl_s=30)
    clock.advance(31)
    t.expire()
    assert t._blocks(NS)[key(2)].pin_until == 0.0 and t._blocks(NS)[key(1)].pin_until
    clock.advance(30)
    t.expire()
    assert t.pinned_blocks == 0


def test_namespaces_holding_nothing_are_folded(monkeypatch):
    monkeypatch.setattr(H, "IDLE_NAMESPACES", 16)
    t, _ = make()
    put(t, [key(1)], ns="kept")
    put(t, [key(2)], ns="gone")
    t.delete("gone", [key(2)])
    for i in range(500):
        t.lookup(f"n{i}", [key(1)])
        t.acquire(f"m{i}", [key(1)])
    s = t.snapshot()
    assert "kept" in s["namespaces"] and len(s["namespaces"]) <= 2 * 1 + 16 + 1
    assert s["namespaces"]["kept"].puts == 1
    total = s["folded"]
    for n in s["namespaces"].values():
        total = H.NsStats(*(getattr(total, f) + getattr(n, f) for f in total.__slots__))
    assert (total.misses, total.lookups, total.puts) == (500, 500, 2)  # nothing lost from the totals
    assert "gone" not in t._index  # nor kept its empty index


def test_a_group_pins_at_most_max_pinned_of_its_quota():
    t, _ = make(slots=16, max_pinned=0.5)
    t.group_of = lambda ns: ns
    t.quotas = {"a": 8 * SLOT}
    put(t, [key(i) for i in range(6)], ns="a")
    put(t, [key(i) for i in range(3)], ns="free")
    assert t.pin("a", [key(i) for i in range(6)]) == bytes([1, 1, 1, 1, 0, 0])
    assert t.pin("free", [key(i) for i in range(3)]) == bytes([1, 1, 1])  # no quota: the arena's share only
    assert t.pins_refused == 2
    t.unpin("a", [key(0)])
    assert t.pin("a", [key(4)]) == b"\x01"
    t.delete("a", [key(1)])
    assert t.group_pinned["a"] == 3 * SLOT
