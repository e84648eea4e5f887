"""A block evicted from RAM is readable while its demotion to NVMe is still being written:
between the eviction and the end of the write it is in neither index, and a read then must
wait for the write rather than miss (a miss there is a recompute the client did not need)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from kvtier.client import Client

MiB = 1 << 20


@pytest.fixture
def slow_nvme(make_daemon, tmp_path):
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})
    cold = d.daemon.store.cold
    real = cold.write
    gate = threading.Event()

    def write(*args, **kwargs):
        gate.wait(10)                    # every NVMe write waits until the test opens the gate
        return real(*args, **kwargs)
    cold.write = write
    yield d, gate
    gate.set()


@pytest.mark.parametrize("control", ["auto", "grpc"])
def test_a_block_being_demoted_is_read_not_missed(slow_nvme, control):
    d, gate = slow_nvme
    keys = [os.urandom(16) for _ in range(12)]
    vals = [os.urandom(MiB) for _ in keys]
    with Client(d.address, control=control) as c:
        c.put_many("w", list(zip(keys, vals)))          # 12 MiB into 8 MiB: the first ones are evicted
        # the first evicted ones are queued for NVMe (the queue holds half the arena: with the
        # disk stalled, later evictions are dropped, by design); lookups already report them
        tiers, _ = c.lookup("w", keys[:2])
        assert tiers == [2, 2], tiers
        threading.Timer(0.3, gate.set).start()          # the writes finish a while after the read starts
        t0 = time.monotonic()
        got = c.get_many("w", keys[:2])
        assert got == vals[:2]
        assert time.monotonic() - t0 >= 0.2             # it waited for the write, it did not miss
        hits = {t.name: t.hits for t in c.stats().tiers}
    assert hits.get("nvme", 0) >= 2


def test_content_evicted_while_its_overwrite_commits_goes_to_no_lower_tier(make_daemon, tmp_path):
    """RAM evicting the old content of a key whose overwrite is committing: a copy to NVMe or to
    the cluster tier would be of replaced bytes, and could land after the commit removed the old
    copies there."""
    import asyncio
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})
    store, hot = d.daemon.store, d.daemon.hot
    k, other = os.urandom(16), os.urandom(16)
    with Client(d.address) as c:
        c.put_many("w", [(k, os.urandom(MiB)), (other, os.urandom(MiB))])
    puts = []
    real_cluster = store.cluster

    class Evicting:  # a cluster tier with write_policy "evict" that records its puts
        write_policy = "evict"

        def enqueue_put(self, ns, key, *a):
            puts.append(key)
    store.cluster = Evicting()
    try:
        r = hot.reserve("w", [k], [MiB], overwrite=True)
        hot.begin_commit(r.reservation_id)  # the overwrite is committing: the old block is replaced
        with hot.lock:
            old, kept = hot._blocks("w")[k], hot._blocks("w")[other]
            demotions = store.demotions
            store._on_evict(old)
            assert store.demotions == demotions             # nothing queued for NVMe
            store._on_evict(kept)                           # a block not being replaced: both tiers
            assert store.demotions == demotions + 1
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), store.loop).result(5)  # the loop ran its callbacks
        assert puts == [other]
        hot.discard(r.reservation_id)
    finally:
        store.cluster = real_cluster
