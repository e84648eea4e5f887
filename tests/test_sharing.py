"""Two daemons share blocks through Redis/Valkey: a prefix computed on node A serves node B."""
import os
import time

import pytest

from kvtier.client import Client
from conftest import wait_until

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

NS = "shared"


def _tier(c, name):
    return next((t for t in c.stats().tiers if t.name == name), None)


def _pair(make_daemon, url, cluster=False, **ram):
    section = {"url": url, "cluster": cluster, "timeout_ms": 1000, "reconnect_max_s": 0.5}
    return (make_daemon(cluster=section, ram=ram or {}), make_daemon(cluster=section, ram=ram or {}))


def _share(a, b, n=8, size=300_000, **client_kw):
    blocks = [(os.urandom(16), os.urandom(size + i)) for i in range(n)]
    keys = [k for k, _ in blocks]
    with Client(a.address, **client_kw) as ca, Client(b.address, **client_kw) as cb:
        ca.put_many(NS, blocks)
        wait_until(lambda: _tier(ca, "cluster").queued_bytes == 0, what="write-through")
        # the write-through is queued from the daemon's loop after the commit answers, so an empty
        # queue can be seen just before the last blocks join it: wait until B sees them all
        wait_until(lambda: cb.lookup(NS, keys)[0] == [3] * n, what="A's blocks in the cluster tier")
        tiers, prefix = cb.lookup(NS, keys)
        assert tiers == [3] * n and prefix == n  # B sees A's blocks in the cluster tier
        assert cb.get_many(NS, keys) == [v for _, v in blocks]
        assert cb.lookup(NS, keys)[0] == [1] * n  # ... and now holds them in its own RAM
        t = _tier(cb, "cluster")
        assert t.hits == n and t.checksum_failures == 0
        ns = next(x for x in cb.stats().namespaces if x.name == NS)
        assert ns.hits == n and ns.misses == 0 and ns.puts == 0  # promotions are not puts
    return blocks


@pytest.mark.parametrize("client_kw", [{}, {"attach": False}], ids=["arena", "data"])
def test_block_committed_on_a_is_a_hit_on_b(make_daemon, valkey, client_kw):
    a, b = _pair(make_daemon, valkey.url)
    _share(a, b, **client_kw)


def test_sharing_through_a_valkey_cluster(make_daemon, valkey_cluster):
    a, b = _pair(make_daemon, valkey_cluster.url, cluster=True)
    _share(a, b, n=12)


def test_redis_down_is_a_miss_never_an_error(make_daemon, make_valkey):
    v = make_valkey()
    a, b = _pair(make_daemon, v.url)
    blocks = _share(a, b, n=3)
    v.kill()
    with Client(a.address, timeout=10) as ca, Client(b.address, timeout=10) as cb:
        fresh = [(os.urandom(16), os.urandom(50_000)) for _ in range(4)]
        t0 = time.monotonic()
        assert ca.put_many(NS, fresh) == [True] * 4          # puts keep working (RAM)
        assert ca.get_many(NS, [k for k, _ in fresh]) == [v for _, v in fresh]
        assert cb.lookup(NS, [k for k, _ in fresh])[0] == [0] * 4   # B cannot see them: a miss
        assert cb.get_many(NS, [k for k, _ in fresh]) == [None] * 4
        assert time.monotonic() - t0 < 8
        assert cb.get_many(NS, [k for k, _ in blocks]) == [v for _, v in blocks]  # its own RAM copies
        v.start()  # the same port: the daemons reconnect by themselves
        more = [(os.urandom(16), os.urandom(60_000)) for _ in range(3)]

        def shared_again():
            ca.put_many(NS, more, overwrite=True)
            return cb.lookup(NS, [k for k, _ in more])[0] == [3] * 3
        wait_until(shared_again, timeout=20, what="sharing to resume")
        assert cb.get_many(NS, [k for k, _ in more]) == [v for _, v in more]


def test_cluster_metrics(make_daemon, valkey):
    import urllib.request
    section = {"url": valkey.url, "timeout_ms": 1000}
    a = make_daemon(cluster=section)
    b = make_daemon(cluster=section, metrics={"listen": "127.0.0.1:0"})
    _share(a, b, n=2, size=10_000)
    text = urllib.request.urlopen(f"http://{b.daemon.metrics.address}/metrics", timeout=5).read().decode()
    assert f'kvtier_hits_total{{namespace="{NS}",tier="cluster"}} 2.0' in text
    assert "kvtier_cluster_hits_total 2.0" in text and "kvtier_cluster_connected 1.0" in text


def _in_the_cluster(ca, cb, n: int, size: int):
    """n fresh blocks put through A (client ca) until B (cb) sees them all in the cluster tier."""
    blocks = [(os.urandom(16), os.urandom(size + i)) for i in range(n)]
    keys = [k for k, _ in blocks]
    ca.put_many(NS, blocks)
    wait_until(lambda: cb.lookup(NS, keys)[0] == [3] * n, what="A's blocks in the cluster tier")
    return blocks, keys


def _cluster_reads_held(d, monkeypatch):
    """Hold daemon d's cluster-tier reads (a slow network) until the returned event is set; the
    second value lists the keys of each read."""
    import asyncio
    import threading
    cluster = d.daemon.store.cluster
    real, go, reads = cluster.get_many, threading.Event(), []

    async def slow_get_many(ns, ks, into):
        reads.append(list(ks))
        await asyncio.to_thread(go.wait, 10)
        return await real(ns, ks, into)
    monkeypatch.setattr(cluster, "get_many", slow_get_many)
    return go, reads


def test_a_background_acquire_answers_before_the_cluster_reads_and_leases_what_lands(
        make_daemon, valkey, monkeypatch):
    """A scheduler's Acquire (background) hears of B's cluster-tier hits after one existence
    check, not after reading them; an ordinary Acquire of those blocks waits for the reads
    already under way (reading them again would find their slots reserved: a miss)."""
    import threading
    a, b = _pair(make_daemon, valkey.url)
    go, reads = _cluster_reads_held(b, monkeypatch)
    with Client(a.address) as ca, Client(b.address) as cb:
        blocks, keys = _in_the_cluster(ca, cb, 4, 200_000)
        t0 = time.monotonic()
        bg = cb.acquire(NS, keys + [os.urandom(16)], prefix_only=True, background=True)
        assert time.monotonic() - t0 < 2
        assert list(bg.tiers) == [3] * 4 + [0] and bg.views == [None] * 5 and bg.id
        got = {}
        reader = threading.Thread(target=lambda: got.update(lease=cb.acquire(NS, keys)))
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive()  # waits for the blocks under way
        go.set()
        reader.join(20)
        lease = got["lease"]
        try:
            assert [bytes(v) for v in lease.views] == [v for _, v in blocks]
        finally:
            cb.release(lease)
        assert reads == [keys]  # read from the cluster once, by the background Acquire
        ram = _tier(cb, "ram")
        assert ram.leased_blocks == 4  # held by the background lease
        assert _tier(cb, "cluster").hits == 4
        cb.release(bg)
        assert _tier(cb, "ram").leased_blocks == 0


def test_a_slow_cluster_makes_a_background_acquire_miss_within_lookup_timeout(make_daemon, valkey, monkeypatch):
    """Every running request waits for a scheduler's lookup: a cluster tier that answers slowly
    (not down: that is refused at once) turns its keys into misses after lookup_timeout_ms,
    without marking the server down; a Lookup alike. Reads of the bytes are not cut short."""
    import asyncio
    section = {"url": valkey.url, "timeout_ms": 5000, "lookup_timeout_ms": 150}
    a, b = make_daemon(cluster=section), make_daemon(cluster=section)
    cluster = b.daemon.store.cluster
    real, slow = cluster.exists_many, {"s": 0.0}

    async def exists_many(ns, ks):
        await asyncio.sleep(slow["s"])
        return await real(ns, ks)
    monkeypatch.setattr(cluster, "exists_many", exists_many)
    with Client(a.address) as ca, Client(b.address) as cb:
        blocks, keys = _in_the_cluster(ca, cb, 3, 50_000)
        slow["s"] = 1.0
        t0 = time.monotonic()
        lease = cb.acquire(NS, keys, prefix_only=True, background=True)
        took = time.monotonic() - t0
        assert list(lease.tiers) == [0, 0, 0] and lease.id == 0 and took < 0.9
        assert cluster.stats.lookups_cut == 1 and cluster.servers.connected()
        t0 = time.monotonic()
        assert cb.lookup(NS, keys)[0] == [0] * 3  # a Lookup is bounded alike
        assert time.monotonic() - t0 < 0.9 and cluster.stats.lookups_cut == 2
        assert cb.get_many(NS, keys) == [v for _, v in blocks]  # reads are not: they wait for the bytes
        slow["s"] = 0.0
        more = [(os.urandom(16), os.urandom(50_000)) for _ in range(2)]
        ca.put_many(NS, more)
        wait_until(lambda: cb.lookup(NS, [k for k, _ in more])[0] == [3, 3], what="more blocks shared")
        lease = cb.acquire(NS, keys + [k for k, _ in more], prefix_only=True, background=True)
        assert list(lease.tiers) == [1, 1, 1, 3, 3]  # the get read the first three into RAM
        cb.release(lease)


def test_a_second_background_acquire_of_blocks_under_way_answers_at_once_and_gets_them_leased(
        make_daemon, valkey, monkeypatch):
    """Two requests sharing a prompt: the second scheduler lookup must not wait for the first
    one's reads, and the blocks join both leases when they land."""
    a, b = _pair(make_daemon, valkey.url)
    go, reads = _cluster_reads_held(b, monkeypatch)
    with Client(a.address) as ca, Client(b.address) as cb:
        blocks, keys = _in_the_cluster(ca, cb, 3, 100_000)
        first = cb.acquire(NS, keys, prefix_only=True, background=True)
        t0 = time.monotonic()
        second = cb.acquire(NS, keys, prefix_only=True, background=True)
        assert time.monotonic() - t0 < 1.5
        assert list(first.tiers) == list(second.tiers) == [3] * 3 and first.id != second.id
        go.set()
        leases = b.daemon.store.hot._leases
        wait_until(lambda: [len(leases[x.id].blocks) for x in (first, second)] == [3, 3],
                   what="the blocks to land in both leases")
        assert reads == [keys]  # read once
        cb.release(first)
        assert _tier(cb, "ram").leased_blocks == 3  # still in the second request's lease
        cb.release(second)
        assert _tier(cb, "ram").leased_blocks == 0
        assert _tier(cb, "cluster").hits == 3
