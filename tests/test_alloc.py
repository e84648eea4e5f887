"""ExtentAllocator: alignment, quick reuse of freed slots, best-fit, coalescing, refused frees, and
invariants under churn."""
from __future__ import annotations

import random

import pytest

from kvtier.alloc import ExtentAllocator

KiB, MiB = 1024, 1024 * 1024
PAGE = 4096


def check_invariants(a: ExtentAllocator, live: dict[int, int], merge: bool = True) -> None:
    """Free extents are aligned, disjoint and coalesced; with the live slots they tile the region.

    ``live``: offset -> rounded size of every slot handed out and not yet freed.
    ``merge``: also check largest_free(), which merges the quick lists.
    """
    ext = a.extents()
    for off, size in ext:
        assert size > 0 and off % a.align == 0 and size % a.align == 0
        assert a.start <= off and off + size <= a.end
    for (o1, s1), (o2, _) in zip(ext, ext[1:]):
        assert o1 + s1 < o2, f"free extents {o1}+{s1} and {o2} overlap or touch (not coalesced)"
    spans = sorted([(o, s, "free") for o, s in ext] + [(o, s, "live") for o, s in live.items()])
    for (o1, s1, k1), (o2, s2, k2) in zip(spans, spans[1:]):
        assert o1 + s1 <= o2, f"{k1} {o1}+{s1} overlaps {k2} {o2}+{s2}"
    free = sum(s for _, s in ext)
    assert a.free_bytes == free
    assert a.free_bytes + sum(live.values()) == a.capacity
    if merge:
        assert a.largest_free() == max((s for _, s in ext), default=0)
        assert a.extents() == ext  # merging changed the representation only


# ---- construction and rounding -------------------------------------------------------------

def test_region_is_shrunk_to_alignment():
    a = ExtentAllocator(1, 3 * PAGE + 5)
    assert (a.start, a.end, a.capacity) == (PAGE, 3 * PAGE, 2 * PAGE)
    assert a.extents() == [(PAGE, 2 * PAGE)]
    assert a.free_bytes == a.largest_free() == 2 * PAGE


def test_aligned_region_is_kept_exactly():
    a = ExtentAllocator(PAGE, PAGE + 8 * MiB)
    assert (a.start, a.end, a.capacity) == (PAGE, PAGE + 8 * MiB, 8 * MiB)


@pytest.mark.parametrize("align", [0, -4096, 3, 4095, 6144])
def test_align_must_be_a_power_of_two(align):
    with pytest.raises(ValueError):
        ExtentAllocator(0, 1 * MiB, align=align)


@pytest.mark.parametrize("start,end", [(0, 0), (PAGE, PAGE), (1, PAGE + 1), (2 * PAGE, PAGE), (1, 4095)])
def test_region_smaller_than_one_aligned_slot_is_refused(start, end):
    with pytest.raises(ValueError):
        ExtentAllocator(start, end)


@pytest.mark.parametrize("n,want", [(0, PAGE), (1, PAGE), (PAGE - 1, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE),
                                    (3 * MiB, 3 * MiB), (3 * MiB + 1, 3 * MiB + PAGE)])
def test_round_to_page(n, want):
    assert ExtentAllocator(0, 64 * MiB).round(n) == want


def test_round_with_a_custom_alignment():
    a = ExtentAllocator(100, 100_000, align=512)
    assert (a.start, a.end) == (512, 99_840)
    assert [a.round(n) for n in (1, 512, 513, 1024)] == [512, 512, 1024, 1024]


def test_alloc_returns_aligned_offsets_and_charges_rounded_bytes():
    a = ExtentAllocator(PAGE, PAGE + 1 * MiB)
    offs = [a.alloc(n) for n in (1, 5000, PAGE, 3 * PAGE + 1)]
    assert offs == [PAGE, 2 * PAGE, 4 * PAGE, 5 * PAGE]  # first fit from the one big extent, packed
    assert all(o % PAGE == 0 for o in offs)
    assert a.free_bytes == 1 * MiB - (1 + 2 + 1 + 4) * PAGE
    check_invariants(a, {PAGE: PAGE, 2 * PAGE: 2 * PAGE, 4 * PAGE: PAGE, 5 * PAGE: 4 * PAGE})


def test_whole_region_then_nothing():
    a = ExtentAllocator(0, 1 * MiB)
    assert a.alloc(1 * MiB + 1) is None
    assert a.fits(1 * MiB) and not a.fits(1 * MiB + 1)
    assert a.alloc(1 * MiB) == 0
    assert a.free_bytes == 0 and a.largest_free() == 0 and a.extents() == []
    assert a.alloc(1) is None and not a.fits(1)
    a.free(0, 1 * MiB)
    assert a.extents() == [(0, 1 * MiB)]


# ---- best fit ------------------------------------------------------------------------------

def _holes(a: ExtentAllocator, pages: list[int]) -> list[int]:
    """Make free holes of the given page counts, each walled in by a live 1-page slot.

    Returns the hole offsets; the tail of the region stays one big free extent."""
    holes = []
    for p in pages:
        holes.append(a.alloc(p * PAGE))
        a.alloc(PAGE)  # wall
    for off, p in zip(holes, pages):
        a.free(off, p * PAGE)
    return holes


def test_best_fit_picks_the_smallest_extent_that_fits():
    a = ExtentAllocator(0, 4 * MiB)
    h3, h1, h2 = _holes(a, [3, 1, 2])
    assert len(a.extents()) == 4  # three holes and the tail
    assert a.alloc(2 * PAGE) == h2   # not the first hole (3 pages), not the tail
    assert a.alloc(PAGE) == h1
    assert a.alloc(PAGE) == h3       # smallest left that fits is the 3-page hole
    assert a.extents()[0] == (h3 + PAGE, 2 * PAGE)  # the remainder stays at the hole's end


def test_best_fit_ties_go_to_the_lowest_offset():
    a = ExtentAllocator(0, 4 * MiB)
    first, second, third = _holes(a, [2, 2, 2])
    assert a.alloc(PAGE) == first  # no freed slot of 1 page: best fit over the merged extents
    assert a.alloc(2 * PAGE) == second
    assert a.alloc(2 * PAGE) == third


# ---- quick reuse of freed slots --------------------------------------------------------------

def test_a_freed_slot_goes_back_to_the_next_alloc_of_its_size_newest_first():
    a = ExtentAllocator(0, 4 * MiB)
    x, y, z = (a.alloc(2 * PAGE) for _ in range(3))
    a.free(x, 2 * PAGE)
    a.free(z, 2 * PAGE)  # z merges with the tail in the extents, but an exact fit is taken as is
    assert a.alloc(2 * PAGE - 1) == z
    assert a.alloc(2 * PAGE) == x
    assert a.alloc(2 * PAGE) == z + 2 * PAGE  # none left: from the tail
    check_invariants(a, {x: 2 * PAGE, y: 2 * PAGE, z: 2 * PAGE, z + 2 * PAGE: 2 * PAGE})


def test_an_alloc_of_another_size_merges_freed_slots_first():
    a = ExtentAllocator(0, 8 * PAGE)
    offs = [a.alloc(PAGE) for _ in range(8)]
    for off in offs[2:5]:
        a.free(off, PAGE)
    assert a.free_bytes == 3 * PAGE
    assert a.alloc(3 * PAGE) == offs[2]  # three 1-page slots merged into one extent
    assert a.alloc(PAGE) is None and a.free_bytes == 0


def test_uniform_churn_takes_and_returns_the_same_slots():
    a = ExtentAllocator(0, 64 * MiB)
    held = [a.alloc(2 * MiB) for _ in range(8)]
    for _ in range(100):
        off = held.pop(0)
        a.free(off, 2 * MiB)
        assert a.alloc(2 * MiB) == off
        held.append(off)
    assert a.extents() == [(16 * MiB, 48 * MiB)]


def test_too_big_for_every_hole_uses_the_tail():
    a = ExtentAllocator(0, 4 * MiB)
    holes = _holes(a, [1, 2, 3])
    tail_off, tail_size = a.extents()[-1]
    assert a.alloc(4 * PAGE) == tail_off
    assert a.extents()[-1] == (tail_off + 4 * PAGE, tail_size - 4 * PAGE)
    assert [o for o, _ in a.extents()[:3]] == holes


def test_alloc_fails_when_free_bytes_suffice_but_no_extent_does():
    a = ExtentAllocator(0, 8 * PAGE)
    offs = [a.alloc(PAGE) for _ in range(8)]
    for off in offs[::2]:
        a.free(off, PAGE)
    assert a.free_bytes == 4 * PAGE and a.largest_free() == PAGE
    assert not a.fits(2 * PAGE)
    assert a.alloc(2 * PAGE) is None
    assert a.free_bytes == 4 * PAGE  # a failed alloc changes nothing
    check_invariants(a, {o: PAGE for o in offs[1::2]})


# ---- coalescing ----------------------------------------------------------------------------

@pytest.fixture
def five():
    """Region of 8 pages; pages 0..4 allocated one by one, pages 5..7 free."""
    a = ExtentAllocator(0, 8 * PAGE)
    offs = [a.alloc(PAGE) for _ in range(5)]
    assert offs == [i * PAGE for i in range(5)]
    return a


def test_free_without_free_neighbours_makes_a_new_extent(five):
    five.free(2 * PAGE, PAGE)
    assert five.extents() == [(2 * PAGE, PAGE), (5 * PAGE, 3 * PAGE)]


def test_free_merges_with_left_neighbour(five):
    five.free(1 * PAGE, PAGE)
    five.free(2 * PAGE, PAGE)
    assert five.extents() == [(1 * PAGE, 2 * PAGE), (5 * PAGE, 3 * PAGE)]


def test_free_merges_with_right_neighbour(five):
    five.free(2 * PAGE, PAGE)
    five.free(1 * PAGE, PAGE)
    assert five.extents() == [(1 * PAGE, 2 * PAGE), (5 * PAGE, 3 * PAGE)]


def test_free_merges_with_both_neighbours(five):
    five.free(1 * PAGE, PAGE)
    five.free(3 * PAGE, PAGE)
    assert len(five.extents()) == 3
    five.free(2 * PAGE, PAGE)
    assert five.extents() == [(1 * PAGE, 3 * PAGE), (5 * PAGE, 3 * PAGE)]
    assert five.largest_free() == 3 * PAGE


def test_free_merges_with_the_tail_and_region_start(five):
    five.free(4 * PAGE, PAGE)
    assert five.extents() == [(4 * PAGE, 4 * PAGE)]
    five.free(0, PAGE)
    assert five.extents() == [(0, PAGE), (4 * PAGE, 4 * PAGE)]
    for off in (1, 3, 2):
        five.free(off * PAGE, PAGE)
    assert five.extents() == [(0, 8 * PAGE)]
    assert five.free_bytes == five.largest_free() == five.capacity


def test_merged_extent_is_reusable_whole(five):
    for off in (1, 2, 3):
        five.free(off * PAGE, PAGE)
    assert five.alloc(3 * PAGE) == PAGE  # the merged hole and the tail are both 3 pages: lowest offset wins


def test_free_of_an_unaligned_length_frees_the_rounded_slot():
    a = ExtentAllocator(0, 4 * PAGE)
    off = a.alloc(PAGE + 1)
    assert a.free_bytes == 2 * PAGE
    a.free(off, PAGE + 1)
    assert a.extents() == [(0, 4 * PAGE)]


# ---- refused frees -------------------------------------------------------------------------

def _snapshot(a: ExtentAllocator):
    return a.extents(), a.free_bytes, a.largest_free()


def test_double_free_is_refused(five):
    five.free(2 * PAGE, PAGE)
    before = _snapshot(five)
    with pytest.raises(ValueError):
        five.free(2 * PAGE, PAGE)
    assert _snapshot(five) == before


def test_double_free_inside_a_coalesced_extent_is_refused(five):
    for off in (1, 2, 3):
        five.free(off * PAGE, PAGE)
    assert five.extents() == [(1 * PAGE, 3 * PAGE), (5 * PAGE, 3 * PAGE)]
    before = _snapshot(five)
    for off in (1, 2, 3):  # the middle one starts and ends strictly inside the free extent
        with pytest.raises(ValueError):
            five.free(off * PAGE, PAGE)
    with pytest.raises(ValueError):
        five.free(6 * PAGE, PAGE)  # inside the never-allocated tail
    assert _snapshot(five) == before


def test_free_with_another_size_or_inside_a_live_slot_is_refused():
    a = ExtentAllocator(0, 8 * PAGE)
    x = a.alloc(2 * PAGE)
    y = a.alloc(2 * PAGE)
    before = _snapshot(a)
    for off, n in ((x, PAGE), (x, 3 * PAGE), (x + PAGE, PAGE), (y, 4 * PAGE)):
        with pytest.raises(ValueError):
            a.free(off, n)
    assert _snapshot(a) == before
    a.free(x, 2 * PAGE)
    with pytest.raises(ValueError):
        a.free(x, 2 * PAGE)  # it sits on a quick list: still a double free
    check_invariants(a, {y: 2 * PAGE})


def test_free_partly_overlapping_free_space_is_refused(five):
    five.free(2 * PAGE, PAGE)
    before = _snapshot(five)
    with pytest.raises(ValueError):
        five.free(1 * PAGE, 2 * PAGE)   # ends inside the free page
    with pytest.raises(ValueError):
        five.free(2 * PAGE, 2 * PAGE)   # starts on it
    with pytest.raises(ValueError):
        five.free(4 * PAGE, 2 * PAGE)   # runs into the tail
    with pytest.raises(ValueError):
        five.free(0, 8 * PAGE)          # covers everything
    assert _snapshot(five) == before


@pytest.mark.parametrize("off,n", [(-PAGE, PAGE), (0, PAGE), (0, 2 * PAGE), (9 * PAGE, PAGE),
                                   (8 * PAGE, 2 * PAGE), (8 * PAGE, PAGE + 1), (PAGE + 1, PAGE),
                                   (PAGE + 512, 1)])
def test_free_outside_the_region_or_unaligned_is_refused(off, n):
    a = ExtentAllocator(PAGE, 9 * PAGE)  # slots [4096, 36864)
    offs = [a.alloc(PAGE) for _ in range(8)]
    assert a.free_bytes == 0
    with pytest.raises(ValueError):
        a.free(off, n)
    assert a.free_bytes == 0 and a.extents() == []
    check_invariants(a, {o: PAGE for o in offs})


# ---- bookkeeping ---------------------------------------------------------------------------

def test_free_bytes_and_largest_free_follow_every_step():
    a = ExtentAllocator(0, 1 * MiB)
    x = a.alloc(100 * KiB)
    y = a.alloc(300 * KiB)
    z = a.alloc(8 * KiB)
    assert a.free_bytes == 1 * MiB - 408 * KiB
    assert a.largest_free() == 1 * MiB - 408 * KiB
    a.free(y, 300 * KiB)
    assert a.free_bytes == 1 * MiB - 108 * KiB
    assert a.largest_free() == 1 * MiB - 408 * KiB  # the hole (300 KiB) is smaller than the tail
    a.free(z, 8 * KiB)
    assert a.largest_free() == 1 * MiB - 100 * KiB  # hole, z and tail merged
    a.free(x, 100 * KiB)
    assert a.free_bytes == a.largest_free() == 1 * MiB and len(a.extents()) == 1


# ---- randomized properties -----------------------------------------------------------------

SIZES = [4 * KiB, 8 * KiB, 12 * KiB, 64 * KiB, 100_000, 256 * KiB, 1 * MiB, 3 * MiB]


def _rand_size(rng: random.Random) -> int:
    if rng.random() < 0.5:
        return rng.choice(SIZES)
    return rng.randint(4 * KiB, 3 * MiB)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mixed_workload_keeps_every_invariant(seed):
    rng = random.Random(seed)
    a = ExtentAllocator(PAGE, PAGE + 48 * MiB)
    live: dict[int, int] = {}
    allocs = fails = refused = reused = 0
    for _ in range(3000):
        r = rng.random()
        if live and (r < 0.40 or a.free_bytes < 4 * MiB and r < 0.7):
            off = rng.choice(list(live))
            size = live.pop(off)
            a.free(off, size)
            if rng.random() < 0.1:  # free it again: refused, nothing changes
                before = _snapshot(a)
                with pytest.raises(ValueError):
                    a.free(off, size)
                assert _snapshot(a) == before
                refused += 1
        else:
            n = _rand_size(rng)
            need = a.round(n)
            fitting = [(s, o) for o, s in a.extents() if s >= need]
            quick = list(a._quick.get(need, ()))
            off = a.alloc(n)
            if off is None:
                assert not fitting and not quick and a.largest_free() < need
                fails += 1
            elif quick:
                assert off == quick[-1], "not the slot of that size freed last"
                reused += 1
            else:
                assert off == min(fitting)[1], "not the smallest fitting extent (lowest offset on ties)"
            if off is not None:
                assert off not in live
                live[off] = need
                allocs += 1
        check_invariants(a, live, merge=rng.random() < 0.1)
    assert allocs > 1000 and fails > 10 and refused > 50 and reused > 20  # the run exercised every branch
    for off, size in list(live.items()):
        a.free(off, size)
        del live[off]
    check_invariants(a, live)
    assert a.extents() == [(a.start, a.capacity)]


def test_no_fragmentation_collapse_under_mixed_sizes():
    rng = random.Random(7)
    a = ExtentAllocator(PAGE, PAGE + 64 * MiB)
    live: dict[int, int] = {}
    sizes = [16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB]  # all multiples of the smallest
    big_after_churn = 0

    def fill() -> int:
        """Allocate random sizes, falling back to smaller ones, until not even the smallest fits."""
        big = 0
        while True:
            i = rng.randrange(len(sizes))
            while i >= 0 and (off := a.alloc(sizes[i])) is None:
                assert a.largest_free() < sizes[i]
                i -= 1
            if i < 0:
                return big
            live[off] = sizes[i]
            big += sizes[i] == 2 * MiB

    fill()
    assert a.free_bytes == 0 and len(live) > 30
    for _ in range(30):
        for off in rng.sample(list(live), len(live) // 2):
            a.free(off, live.pop(off))
        check_invariants(a, live)
        big_after_churn += fill()
        check_invariants(a, live)
        assert a.free_bytes == 0, "free space stranded in pieces smaller than the smallest block"
    assert big_after_churn > 30  # freed neighbours merge back into extents large enough for 2 MiB
    for off in list(live):
        a.free(off, live.pop(off))
    assert a.extents() == [(a.start, a.capacity)]
    assert a.free_bytes == a.largest_free() == a.capacity


@pytest.mark.parametrize("block", [4 * KiB, 100_000, 256 * KiB, 3 * MiB])
def test_uniform_churn_never_fails_while_space_is_free(block):
    rng = random.Random(block)
    need = ExtentAllocator(0, PAGE).round(block)
    a = ExtentAllocator(PAGE, PAGE + 64 * need + 12 * KiB)  # a remainder unless the block is 4 KiB
    live: dict[int, int] = {}
    while a.free_bytes >= need:
        off = a.alloc(block)
        assert off is not None
        live[off] = need
    assert len(live) == a.capacity // need
    assert a.alloc(block) is None
    for _ in range(3000):
        for off in rng.sample(list(live), rng.randint(1, min(4, len(live)))):
            a.free(off, block)
            del live[off]
        while a.free_bytes >= need:
            off = a.alloc(block)
            assert off is not None, f"uniform alloc failed with {a.free_bytes} bytes free"
            live[off] = need
        assert len(live) == a.capacity // need
    check_invariants(a, live)
    assert len(a.extents()) <= 1  # only the unusable tail remainder, if any
    for off in list(live):
        a.free(off, block)
        del live[off]
    assert a.extents() == [(a.start, a.capacity)]
