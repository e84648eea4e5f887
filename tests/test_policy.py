"""Eviction policies: the interface contract every policy in POLICIES keeps, LRU order, S3-FIFO scan resistance."""
from __future__ import annotations

import random

import pytest

from kvtier.policy import LRU, POLICIES, S3FIFO

ALL = pytest.mark.parametrize("name", sorted(POLICIES))


def drain(p) -> list:
    out = []
    while (k := p.victim()) is not None:
        out.append(k)
    return out


def test_policies_are_registered_by_their_name():
    assert POLICIES["lru"] is LRU and POLICIES["s3fifo"] is S3FIFO
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert cls().name == name


# ---- the interface contract, for every policy ------------------------------------------------

@ALL
def test_empty_policy(name):
    p = POLICIES[name]()
    assert len(p) == 0
    assert "a" not in p
    assert p.victim() is None
    p.touch("a")      # touching or removing an unknown key is a no-op
    p.remove("a")
    assert len(p) == 0 and p.victim() is None


@ALL
def test_insert_len_contains(name):
    p = POLICIES[name]()
    for i in range(10):
        p.insert(i, 4096)
        assert len(p) == i + 1 and i in p
    assert 10 not in p
    p.insert(3, 4096)  # inserting a present key again does not duplicate it
    assert len(p) == 10
    assert sorted(drain(p)) == list(range(10))


@ALL
def test_remove(name):
    p = POLICIES[name]()
    for i in range(6):
        p.insert(i, 4096)
    assert p.remove(2) is True
    assert p.remove(2) is False   # twice is harmless, and says it was not there
    assert p.remove(99) is False
    assert len(p) == 5 and 2 not in p
    got = drain(p)
    assert sorted(got) == [0, 1, 3, 4, 5]
    assert len(p) == 0 and all(k not in p for k in range(6))


@ALL
def test_touch_keeps_the_key_and_does_not_add_unknown_ones(name):
    p = POLICIES[name]()
    p.insert("a", 4096)
    for _ in range(10):
        p.touch("a")
    p.touch("b")
    assert len(p) == 1 and "a" in p and "b" not in p
    assert p.victim() == "a"
    p.touch("a")       # touching a key after it was returned does not bring it back
    assert "a" not in p and p.victim() is None


@ALL
def test_insert_of_a_read_block_is_insert_then_touch(name):
    rng = random.Random(11)
    ops = [(rng.randrange(40), rng.random() < 0.5) for _ in range(300)]
    one, two = POLICIES[name](), POLICIES[name]()
    for i, (k, read) in enumerate(ops):
        if i % 7 == 6:
            assert one.victim() == two.victim()
            continue
        one.insert(k, 4096, read=read)
        two.insert(k, 4096)
        if read:
            two.touch(k)
    assert drain(one) == drain(two)


@ALL
def test_victim_removes_what_it_returns(name):
    p = POLICIES[name]()
    for i in range(5):
        p.insert(i, 4096)
    k = p.victim()
    assert k in range(5) and k not in p and len(p) == 4


@ALL
def test_reinsert_after_victim_and_remove(name):
    p = POLICIES[name]()
    p.insert("x", 4096)
    assert p.victim() == "x"
    p.insert("x", 4096)
    assert "x" in p and len(p) == 1
    p.remove("x")
    assert "x" not in p and p.victim() is None


@ALL
@pytest.mark.parametrize("seed", range(4))
def test_random_ops_against_a_model(name, seed):
    """Mixed insert/touch/remove/victim: victims are present keys, each returned once per insertion."""
    rng = random.Random(seed)
    p = POLICIES[name]()
    present: set[int] = set()
    removed_since_insert: set[int] = set()
    next_key = 0
    returned = 0
    for _ in range(5000):
        r = rng.random()
        if r < 0.35:
            if present and rng.random() < 0.2:  # re-insert of a present key (e.g. unpin after touch)
                k = rng.choice(sorted(present))
            elif removed_since_insert and rng.random() < 0.3:
                k = rng.choice(sorted(removed_since_insert))
            else:
                k, next_key = next_key, next_key + 1
            p.insert(k, rng.choice([4096, 65536, 1 << 20]))
            present.add(k)
            removed_since_insert.discard(k)
        elif r < 0.6 and present:
            p.touch(rng.choice(sorted(present)))
        elif r < 0.75 and present:
            k = rng.choice(sorted(present))
            p.remove(k)
            present.discard(k)
            removed_since_insert.add(k)
        else:
            k = p.victim()
            if not present:
                assert k is None
            else:
                assert k in present, f"victim {k!r} is not an evictable key"
                assert k not in removed_since_insert
                present.discard(k)
                removed_since_insert.add(k)
                returned += 1
        assert len(p) == len(present)
        if rng.random() < 0.05:
            assert all(k in p for k in present)
            assert not any(k in p for k in removed_since_insert)
    assert returned > 500
    rest = drain(p)
    assert len(rest) == len(set(rest)) and set(rest) == present


@pytest.mark.parametrize("seed", range(3))
def test_s3fifo_reads_counted_outside_evict_as_touch_does(seed):
    """Reads handed over through ``reads`` (the hot tier counts them on its blocks) give the
    same victims, in the same order, as the same reads told through touch()."""
    rng = random.Random(seed)
    counts: dict[int, int] = {}

    def reads(k):
        return counts.pop(k, 0)

    eager, lazy = S3FIFO(), S3FIFO(reads=reads)
    assert lazy.lazy_reads and not eager.lazy_reads and not LRU(reads=reads).lazy_reads
    present: list[int] = []
    next_key = 0
    for _ in range(5000):
        r = rng.random()
        if r < 0.35 or not present:
            k, next_key = next_key, next_key + 1
            read = rng.random() < 0.2
            eager.insert(k, 4096, read)
            lazy.insert(k, 4096, read)
            present.append(k)
        elif r < 0.75:
            k = rng.choice(present)
            eager.touch(k)
            counts[k] = min(S3FIFO.MAX_FREQ, counts.get(k, 0) + 1)
        elif r < 0.8:
            k = present.pop(rng.randrange(len(present)))
            assert eager.remove(k) and lazy.remove(k)
        else:
            k = eager.victim()
            assert lazy.victim() == k
            present.remove(k)
    assert drain(eager) == drain(lazy)


@ALL
def test_each_inserted_key_is_returned_exactly_once(name):
    rng = random.Random(11)
    p = POLICIES[name]()
    keys = list(range(2000))
    for k in keys:
        p.insert(k, rng.choice([4096, 1 << 20]))
        if rng.random() < 0.5:
            p.touch(rng.choice(keys[:k + 1]))
    got = drain(p)
    assert sorted(got) == keys
    assert len(p) == 0 and p.victim() is None


@ALL
def test_removed_keys_are_never_returned(name):
    p = POLICIES[name]()
    for k in range(100):
        p.insert(k, 4096)
        p.touch(k)
    removed = set(range(0, 100, 3))
    for k in removed:
        p.remove(k)
    got = drain(p)
    assert set(got) == set(range(100)) - removed and len(got) == len(set(got))


@ALL
def test_keys_may_be_any_hashable(name):
    p = POLICIES[name]()
    keys = [("ns", b"\x00" * 16), ("ns", b"\x01" * 16), ("other", b"\x00" * 16)]
    for k in keys:
        p.insert(k, 4096)
    assert all(k in p for k in keys)
    assert sorted(drain(p)) == sorted(keys)


# ---- LRU order -------------------------------------------------------------------------------

def test_lru_evicts_least_recently_used_first():
    p = LRU()
    for k in "abcde":
        p.insert(k, 4096)
    p.touch("a")
    p.touch("c")
    p.touch("a")
    assert drain(p) == list("bdeca")


def test_lru_reinsert_counts_as_most_recent():
    p = LRU()
    for k in "abc":
        p.insert(k, 4096)
    p.insert("a", 4096)
    assert drain(p) == list("bca")


def test_lru_remove_then_insert_goes_to_the_back():
    p = LRU()
    for k in "abc":
        p.insert(k, 4096)
    p.remove("a")
    p.insert("a", 4096)
    assert p.victim() == "b"


# ---- S3-FIFO ---------------------------------------------------------------------------------

def test_s3fifo_unread_blocks_leave_in_insertion_order():
    p = S3FIFO()
    for k in range(10):
        p.insert(k, 4096)
    assert drain(p) == list(range(10))


def test_s3fifo_a_block_read_while_small_survives_the_unread_ones():
    p = S3FIFO()
    for k in range(10):
        p.insert(k, 4096)
    p.touch(0)
    p.touch(5)
    got = drain(p)
    assert got[:8] == [1, 2, 3, 4, 6, 7, 8, 9]  # read blocks moved to main, leave last
    assert sorted(got[8:]) == [0, 5]


def test_s3fifo_ghost_hit_goes_straight_to_main():
    p = S3FIFO()
    for k in range(20):
        p.insert(k, 4096)
    assert p.victim() == 0          # evicted from small unread: remembered in the ghost
    p.insert(0, 4096)               # seen again soon: main
    for k in range(20, 40):
        p.insert(k, 4096)
    order = drain(p)
    assert order[-1] == 0, "a ghost hit must outlive the small-FIFO blocks inserted around it"


@ALL
def test_a_spared_victim_comes_back_as_a_block_that_was_not_evicted(name):
    """The hot tier skips a victim that is leased and inserts it again at its release: it must
    not count as a ghost hit (it was never evicted) and go straight to S3-FIFO's main queue."""
    p = POLICIES[name]()
    for k in range(20):
        p.insert(k, 4096)
    assert p.victim() == 0
    p.spare(0)
    p.insert(0, 4096)               # released: back as new
    for k in range(20, 40):
        p.insert(k, 4096)
    order = drain(p)
    assert order.index(0) < order.index(20), "a spared block must not outlive the ones inserted after it"


class _Obj:
    """A block-like key that hashes by identity, as the hot tier's Block objects do."""

    def __init__(self, content):
        self.content = content


def test_s3fifo_ghost_knows_a_new_object_by_its_content():
    p = S3FIFO(ghost_key=lambda o: o.content)
    first = [_Obj(k) for k in range(20)]
    for o in first:
        p.insert(o, 4096)
    assert p.victim() is first[0]   # evicted unread: its content is remembered
    again = _Obj(0)                 # the same content comes back as another object
    assert again not in p and again != first[0]
    p.insert(again, 4096)
    for k in range(20, 40):
        p.insert(_Obj(k), 4096)
    order = drain(p)
    assert order[-1] is again, "a ghost hit by content must go straight to main"
    assert len(p._ghost) > 0 and all(isinstance(g, int) for g in p._ghost)  # contents, not objects


def _hot_hit_rate(policy, warm: list, trace: list, hot: set, slots: int) -> float:
    """Run ``warm`` then ``trace`` through a cache of ``slots`` unit-size blocks ordered by
    ``policy``; the fraction of hot-key reads in ``trace`` that hit."""
    cached: set = set()
    hits = refs = 0
    for i, k in enumerate(warm + trace):
        counted = i >= len(warm) and k in hot
        refs += counted
        if k in cached:
            hits += counted
            policy.touch(k)
            continue
        if len(cached) >= slots:
            v = policy.victim()
            assert v in cached
            cached.remove(v)
        policy.insert(k, 1)
        cached.add(k)
        assert len(policy) == len(cached)
    return hits / refs


def test_s3fifo_keeps_the_hot_set_through_a_scan_where_lru_loses_it():
    slots, hot_n, per_hot = 100, 10, 10
    hot = [("hot", i) for i in range(hot_n)]
    warm = hot * 3  # shared prompts: read several times before the scan starts
    trace: list = []
    for i in range(20_000):  # a long scan of one-off blocks, the hot set still read in between
        trace.append(("scan", i))
        if i % per_hot == per_hot - 1:
            trace.append(hot[(i // per_hot) % hot_n])
    # each hot key comes back after hot_n * per_hot = 100 one-off blocks: more than LRU's 100 slots hold
    rates = {name: _hot_hit_rate(POLICIES[name](), warm, trace, set(hot), slots) for name in ("lru", "s3fifo")}
    assert rates["lru"] < 0.05, rates
    assert rates["s3fifo"] > 0.95, rates


def test_s3fifo_hit_rate_matches_lru_without_a_scan():
    """No scan, a hot set that fits: both policies hit on every read after the first."""
    hot = [("hot", i) for i in range(50)]
    rng = random.Random(3)
    trace = [rng.choice(hot) for _ in range(5000)]
    for name in POLICIES:
        assert _hot_hit_rate(POLICIES[name](), hot, trace, set(hot), 100) == 1.0


def test_s3fifo_bounds_the_ghost():
    p = S3FIFO()
    for k in range(5000):
        p.insert(k, 4096)
        if len(p) > 100:
            p.victim()
    assert len(p) == 100
    assert len(p._ghost) <= max(64, len(p))


def test_s3fifo_keeps_byte_counts_through_every_move():
    """Sizes ride in the queue entries beside the read counts: the small queue's share of bytes
    (which decides what leaves next) stays exact through moves to main and second chances."""
    p = S3FIFO()
    sizes = {i: 4096 * (1 + i % 7) for i in range(200)}
    for k, size in sizes.items():
        p.insert(k, size, read=k % 3 == 0)
    for k in range(0, 200, 5):
        p.touch(k)
        p.touch(k)
    live = dict(sizes)
    for step in range(150):
        if step % 4 == 0:
            k = next(iter(live))
            assert p.remove(k)
            del live[k]
        else:
            del live[p.victim()]
        assert p._small_bytes + p._main_bytes == sum(live.values())
        assert p._small_bytes == sum(v >> 2 for v in p._small.values())
    assert len(p) == len(live)
