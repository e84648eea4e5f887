"""Delete and overwrite against the movements already in flight, through real daemons and a
real Valkey server on loopback.

Once Delete has answered, no promotion that was under way (NVMe -> RAM, cluster -> RAM) may
make the key visible again, and no write to the cluster tier that was queued or being sent may
bring it back for the other nodes. Writes of one key to the cluster tier land in the order they
were made. The daemons run in this process, so a test holds a read or a write in flight by
wrapping the tier's method on the daemon's own object.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from kvtier.client import Client
from conftest import wait_until

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

KiB, MiB = 1 << 10, 1 << 20
NS = "races"


def _name(ns: str, key: bytes) -> bytes:
    return b"kvt:%s:{%s}" % (ns.encode(), key.hex().encode())


def _cluster(url: str, **kw) -> dict:
    return {"url": url, "timeout_ms": 2000, "reconnect_max_s": 0.5, **kw}


def _in_flight(gate: threading.Event):
    """A coroutine that holds the loop's caller until gate is set, without holding the loop."""
    return asyncio.to_thread(gate.wait, 10)


def delete_while_got(c: Client, address: str, k: bytes, data: bytes, entered: threading.Event,
                     go: threading.Event, client_kw: dict | None = None) -> None:
    """A get of k in a thread of its own, held in its promotion until go; c deletes k meanwhile.
    The get's own caller may still see the block (or a miss)."""
    got = []
    try:
        def reader():
            with Client(address, **(client_kw or {})) as r:
                got.append(r.get(NS, k))
        t = threading.Thread(target=reader)
        t.start()
        assert entered.wait(10), "the promotion did not start"
        assert c.delete(NS, [k]) == 1
    finally:
        go.set()
    t.join(10)
    assert not t.is_alive() and got and got[0] in (None, data)


# ---- promotions -----------------------------------------------------------------------------

@pytest.mark.parametrize("client_kw", [{}, {"attach": False}], ids=["arena", "data"])
def test_delete_during_a_promotion_from_nvme_is_not_undone(make_daemon, tmp_path, client_kw):
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nv")], "capacity": "64MiB", "io_threads": 2})
    st = d.daemon.store
    k, data = os.urandom(16), os.urandom(100_000)
    entered, go = threading.Event(), threading.Event()
    with Client(d.address) as c:
        assert c.put(NS, k, data)
        wait_until(lambda: st.cold.contains(NS, k) and st.queued_bytes == 0, what="write-behind")
        st.hot.delete(NS, [k])  # as an eviction would: on NVMe only now
        real = st.cold.read

        def slow_read(ns, key, dest):  # the bytes are read and verified; the commit waits
            meta = real(ns, key, dest)
            if key == k:
                entered.set()
                go.wait(10)
            return meta

        st.cold.read = slow_read
        delete_while_got(c, d.address, k, data, entered, go, client_kw)
        wait_until(lambda: st.queued_bytes == 0, what="write queue drained")
        assert c.lookup(NS, [k])[0] == [0]
        assert c.get(NS, k) is None
        assert not st.hot.contains(NS, k) and not st.cold.contains(NS, k)


def test_delete_during_a_promotion_from_the_cluster_is_not_undone(make_daemon, valkey):
    a = make_daemon(cluster=_cluster(valkey.url))
    b = make_daemon(cluster=_cluster(valkey.url))
    tier = b.daemon.cluster
    k, data = os.urandom(16), os.urandom(200_000)
    entered, go = threading.Event(), threading.Event()
    real = tier.get_many

    async def slow_get_many(ns, keys, into=None):  # read into the slot, then wait before the commit
        out = await real(ns, keys, into)
        if k in keys:
            entered.set()
            await _in_flight(go)
        return out

    with Client(a.address) as ca, Client(b.address) as cb:
        assert ca.put(NS, k, data)
        wait_until(lambda: cb.lookup(NS, [k])[0] == [3], what="A's block in the cluster tier")
        tier.get_many = slow_get_many
        delete_while_got(cb, b.address, k, data, entered, go)
        assert cb.lookup(NS, [k])[0] == [0]
        assert cb.get(NS, k) is None and not b.daemon.store.hot.contains(NS, k)
        assert ca.delete(NS, [k]) == 1  # A's own RAM copy
    assert not valkey.client().exists(_name(NS, k))


# ---- writes to the cluster tier ---------------------------------------------------------------

def test_delete_follows_a_cluster_write_being_sent(make_daemon, valkey):
    a = make_daemon(cluster=_cluster(valkey.url))
    b = make_daemon(cluster=_cluster(valkey.url))
    tier = a.daemon.cluster
    k, data = os.urandom(16), os.urandom(64 * KiB)
    entered = threading.Event()
    real = tier._put_batch

    async def slow(items):  # the write is taken from the queue, then reaches Redis late
        entered.set()
        await asyncio.sleep(0.5)
        return await real(items)

    tier._put_batch = slow
    with Client(a.address) as ca, Client(b.address) as cb:
        assert ca.put(NS, k, data)
        assert entered.wait(10), "the write did not start"
        assert ca.delete(NS, [k]) == 1
        wait_until(lambda: tier.stats.puts == 1, what="the write")
        assert cb.get(NS, k) is None
        assert cb.lookup(NS, [k])[0] == [0]
    assert not valkey.client().exists(_name(NS, k))


def test_delete_cancels_a_queued_cluster_write(make_daemon, valkey):
    # one connection: two writer tasks, both kept busy, so the deleted block's write stays queued
    a = make_daemon(cluster=_cluster(valkey.url, connections=1))
    b = make_daemon(cluster=_cluster(valkey.url))
    tier = a.daemon.cluster
    busy = [os.urandom(16) for _ in range(2)]
    k, data = os.urandom(16), os.urandom(300 * KiB)
    gate, started = threading.Event(), []
    real = tier._put_batch

    async def held(items):
        if any(it[1] in busy for it in items):
            started.append(1)
            await _in_flight(gate)
        return await real(items)

    tier._put_batch = held
    with Client(a.address) as ca, Client(b.address) as cb:
        try:
            for x in busy:  # over the batching size: one writer each
                assert ca.put(NS, x, os.urandom(300 * KiB))
            wait_until(lambda: len(started) == 2, what="both writers busy")
            assert ca.put(NS, k, data)
            wait_until(lambda: tier.snapshot()["queued"] == 1, what="the write queued")
            assert ca.delete(NS, [k]) == 1
            assert tier.snapshot()["queued"] == 0
        finally:
            gate.set()
        wait_until(lambda: tier.queued_bytes == 0 and tier.stats.puts == 2, what="the queue drained")
        time.sleep(0.2)
        assert tier.stats.puts == 2
        assert cb.get(NS, k) is None
        assert None not in cb.get_many(NS, busy)
        assert a.daemon.store.hot.leased_blocks == 0  # the cancelled write's hold ended too
    assert not valkey.client().exists(_name(NS, k))


def test_overwrite_lands_after_the_write_it_replaces(make_daemon, valkey):
    a = make_daemon(cluster=_cluster(valkey.url))
    b = make_daemon(cluster=_cluster(valkey.url))
    tier = a.daemon.cluster
    k = os.urandom(16)
    v1, v2 = os.urandom(300 * KiB), os.urandom(300 * KiB)
    gate, entered = threading.Event(), threading.Event()
    real = tier._put_batch

    async def held(items):  # v1 reaches Redis late
        if any(bytes(it[2][:16]) == v1[:16] for it in items):
            entered.set()
            await _in_flight(gate)
        return await real(items)

    tier._put_batch = held
    with Client(a.address) as ca, Client(b.address) as cb:
        try:
            assert ca.put(NS, k, v1)
            assert entered.wait(10), "v1's write did not start"
            assert ca.put(NS, k, v2, overwrite=True)
            time.sleep(0.5)  # room for v2's write to overtake v1's
        finally:
            gate.set()
        wait_until(lambda: tier.queued_bytes == 0 and tier.stats.puts + tier.stats.put_failures == 2,
                   what="both writes")
        assert tier.stats.put_failures == 0
        assert cb.get(NS, k) == v2
