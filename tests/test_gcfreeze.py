"""kvtier.gcfreeze: frozen blocks leave the cyclic collector's walk, nothing is kept that
reference counting would free, and the daemon freezes on its own and exports the pauses."""
import gc
import os
import time
import urllib.request

import pytest

from kvtier.client import Client
from kvtier.gcfreeze import Freezer, Pauses
from kvtier.hot import HotTier

NS = "gc"


@pytest.fixture(autouse=True)
def _unfreeze():
    yield
    gc.unfreeze()  # give the rest of the test process back to the collector


def fill(t: HotTier, n: int) -> list[bytes]:
    keys = [os.urandom(16) for _ in range(n)]
    for i in range(0, n, 512):
        ks = keys[i:i + 512]
        r = t.reserve(NS, ks, [4096] * len(ks))
        t.begin_commit(r.reservation_id)
        t.finish_commit(r.reservation_id, None, b"\0" * 16 * len(ks))
    return keys


def timed_full_collection() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def test_a_full_collection_no_longer_walks_frozen_blocks():
    t = HotTier(start=0, end=300_000 * 4096, max_block_bytes=1 << 20)
    fill(t, 200_000)
    walked = min(timed_full_collection() for _ in range(2))
    gc.freeze()
    skipped = min(timed_full_collection() for _ in range(2))
    assert gc.get_freeze_count() >= 200_000
    assert skipped < walked / 3, (walked, skipped)


def test_frozen_blocks_are_still_freed_when_dropped():
    t = HotTier(start=0, end=60_000 * 4096, max_block_bytes=1 << 20)
    gc.collect()
    gc.freeze()
    base = gc.get_freeze_count()
    keys = fill(t, 50_000)
    gc.freeze()
    assert gc.get_freeze_count() >= base + 50_000
    t.delete(NS, keys)  # reference counting frees them: the permanent generation shrinks
    assert gc.get_freeze_count() < base + 1_000
    assert t.snapshot()["blocks"] == 0


def test_freezer_ticks_on_its_interval_and_never_at_zero():
    now = [100.0]
    f = Freezer(60, clock=lambda: now[0])
    assert not f.tick()
    now[0] += 59.9
    assert not f.tick() and gc.get_freeze_count() == 0
    now[0] += 0.2
    assert f.tick() and f.freezes == 1 and gc.get_freeze_count() > 0
    assert not f.tick()  # the next one is 60 s later
    now[0] += 60
    assert f.tick() and f.freezes == 2
    never = Freezer(0, clock=lambda: now[0])
    now[0] += 1e6
    assert not never.tick() and never.freezes == 0


def test_pauses_counts_collections_per_generation():
    p = Pauses().install()
    try:
        gc.collect(0)
        gc.collect(2)
        s = p.snapshot()
        assert s["collections"][0] >= 1 and s["collections"][2] >= 1
        assert s["seconds"][2] > 0 and s["longest_s"] >= s["seconds"][2] / s["collections"][2]
    finally:
        p.remove()
    assert p._callback not in gc.callbacks
    before = p.snapshot()["collections"][2]
    gc.collect(2)
    assert p.snapshot()["collections"][2] == before  # removed: counts nothing more


def test_daemon_freezes_and_keeps_nothing_its_traffic_drops(make_daemon):
    """A daemon freezing every 0.2 s under traffic that also fails calls (errors build
    tracebacks, the likeliest cycles): once its blocks are deleted, what stays frozen is back
    where it was, so freezing kept no garbage of that traffic."""
    d = make_daemon(server={"gc_freeze_s": 0.2}, metrics={"listen": "127.0.0.1:0"})
    keys = [os.urandom(16) for _ in range(3000)]
    with Client(d.address) as c:
        c.put_many(NS, [(k, b"v" * 64) for k in keys[:10]])
        c.delete(NS, keys[:10])
        time.sleep(0.5)
        gc.collect()
        base = gc.get_freeze_count()
        freezes = d.daemon.gc_freezer.freezes
        for i in range(0, len(keys), 300):
            c.put_many(NS, [(k, b"v" * 64) for k in keys[i:i + 300]])
            assert all(g is not None for g in c.get_many(NS, keys[i:i + 300]))
            for _ in range(5):
                with pytest.raises(Exception):
                    c.release(123456789)           # an unknown lease: NOT_FOUND
                with pytest.raises(Exception):
                    c.reserve(NS, [b"short"], [1])  # a bad key: INVALID_ARGUMENT
            time.sleep(0.05)
        time.sleep(0.5)
        assert d.daemon.gc_freezer.freezes >= freezes + 5
        assert gc.get_freeze_count() >= base + 2000  # the blocks went into the permanent generation
        c.delete(NS, keys)
        time.sleep(0.5)
        gc.collect()
        assert gc.get_freeze_count() < base + 1000, (base, gc.get_freeze_count())
        with urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5) as r:
            text = r.read().decode()
    assert 'kvtier_gc_collections_total{generation="0"}' in text
    assert "kvtier_gc_frozen_objects" in text and "kvtier_gc_longest_pause_seconds" in text
