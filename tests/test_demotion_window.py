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
