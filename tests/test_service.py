"""Every RPC through the real gRPC server, over the three client data paths.

Each test starts its own daemon (``daemon`` / ``make_daemon`` / ``daemon_process``
from conftest) on a Unix socket with its own arena under /dev/shm.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time

import grpc
import pytest
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import kvtier
from kvtier import datachannel, errors
from kvtier.arena import DATA_OFFSET, HEADER, MAGIC
from kvtier.client import AsyncClient, Client
from kvtier.copying import HASH_CHUNK
from kvtier.v1 import kvtier_pb2 as pb
from kvtier.v1 import kvtier_pb2_grpc as pb_grpc

MiB = 1 << 20
NS = "svc-test"

PATHS = {
    "arena": dict(attach=True),
    "data": dict(attach=False),
    "grpc": dict(attach=False, data_channel=False),
}
path_param = pytest.mark.parametrize("path", list(PATHS))
# where unary calls go: the data channel ("auto", the default) or gRPC
control_param = pytest.mark.parametrize("control", ["auto", "grpc"])

# 1 byte up to several MiB; around page size and around the 1 MiB gRPC chunk.
SIZES = [1, 17, 4095, 4096, 4097, 65536 + 3, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345]


def key(*parts, size: int = 16) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()[:size]


def blob(n: int, seed) -> bytes:
    return random.Random(repr(seed)).randbytes(n)


def client(daemon, path: str = "arena", **kw) -> Client:
    return Client(daemon.address, **PATHS[path], **kw)


def ns_stats(c: Client, ns: str):
    s = c.stats(ns)
    found = [n for n in s.namespaces if n.name == ns]
    return found[0] if found else None


def ram(c: Client):
    (t,) = [t for t in c.stats().tiers if t.name == "ram"]
    return t


def rounded(n: int) -> int:
    return max(4096, -(-n // 4096) * 4096)


# ---- Attach ---------------------------------------------------------------------------------

def test_attach_fields_and_client_maps_the_arena(daemon):
    with Client(daemon.address) as c:
        info = c.attach()
        assert os.path.isabs(info.arena_path) and os.path.exists(info.arena_path)
        assert info.arena_size == os.path.getsize(info.arena_path) == 64 * MiB
        assert info.generation != 0
        assert info.data_offset == DATA_OFFSET
        assert info.data_address.startswith("unix://") and os.path.exists(info.data_address[len("unix://"):])
        assert 0 < info.max_block_bytes <= info.arena_size - info.data_offset
        assert info.max_batch == 4096
        assert sorted(info.key_sizes) == [16, 32]
        assert info.max_message_bytes == 4 * MiB
        assert info.version == kvtier.__version__
        assert info.default_lease_ms == 30_000 and info.default_reservation_ms == 30_000
        # the arena file's header names the same generation
        with open(info.arena_path, "rb") as f:
            magic, version, _, gen, size, data_offset = HEADER.unpack(f.read(HEADER.size))
        assert (magic, version, gen, size, data_offset) == (MAGIC, 1, info.generation, info.arena_size,
                                                           info.data_offset)
        # the client mapped it: a put goes through the mapping, and the bytes are in the file
        assert c.path == "arena"
        k = key("attach")
        data = b"mapped-" * 100
        c.put(NS, k, data)
        lease = c.acquire(NS, [k])
        try:
            off = lease.offsets[0]
            assert off >= info.data_offset
            with open(info.arena_path, "rb") as f:
                f.seek(off)
                assert f.read(len(data)) == data
        finally:
            c.release(lease)


def test_attach_without_mapping_uses_inline_paths(daemon):
    with client(daemon, "data") as c:
        c.attach()
        assert c.path == "data"
    with client(daemon, "grpc") as c:
        c.attach()
        assert c.path == "grpc"


# ---- Lookup ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key_size", [16, 32])
def test_lookup_tiers_and_prefix_with_gap(daemon, key_size):
    keys = [key("chain", i, size=key_size) for i in range(6)]
    with Client(daemon.address) as c:
        c.put_many(NS, [(k, blob(100 + i, i)) for i, k in enumerate(keys) if i != 2])
        tiers, prefix = c.lookup(NS, keys)
        assert tiers == [1, 1, 0, 1, 1, 1]
        assert prefix == 2
        # raw RPC: one tier byte per key, prefix_len is the leading run
        stub = pb_grpc.KVTierStub(c._channel)
        r = stub.Lookup(pb.LookupRequest(namespace=NS, key_size=key_size, keys=b"".join(keys)))
        assert r.tiers == bytes([1, 1, 0, 1, 1, 1]) and r.prefix_len == 2
        r = stub.Lookup(pb.LookupRequest(namespace=NS, key_size=key_size, keys=b"".join(keys[3:])))
        assert r.tiers == b"\x01\x01\x01" and r.prefix_len == 3
        r = stub.Lookup(pb.LookupRequest(namespace=NS, key_size=key_size, keys=keys[2] + keys[0]))
        assert r.tiers == b"\x00\x01" and r.prefix_len == 0
        # another namespace sees none of them
        assert c.lookup("other-ns", keys) == ([0] * 6, 0)
        # a lookup is not an access: no hit or miss is counted
        s = ns_stats(c, NS)
        assert s.lookups == 6 + 6 + 3 + 2
        assert s.hits == 0 and s.misses == 0


# ---- Reserve / Commit / Abort ------------------------------------------------------------------

@control_param
def test_reserve_write_commit_read_back(daemon, control):
    keys = [key("zc", i) for i in range(3)]
    datas = [blob(5000, 0), blob(2 * MiB + 3, 1), blob(1, 2)]
    with Client(daemon.address, control=control) as c, client(daemon, "grpc") as g:
        before_used = ram(c).used_bytes
        res = c.reserve(NS, keys, [len(d) for d in datas])
        assert c.control == ("data" if control == "auto" else "grpc")
        assert res.id != 0
        assert res.status == b"\x00\x00\x00"
        assert len(set(res.offsets)) == 3 and all(o >= DATA_OFFSET for o in res.offsets)
        assert [len(v) for v in res.views] == [len(d) for d in datas]
        s = c.stats()
        assert s.reservations == 1
        assert ram(c).reserved_bytes == sum(rounded(len(d)) for d in datas)
        # reserved blocks are invisible until commit
        assert c.lookup(NS, keys) == ([0, 0, 0], 0)
        assert g.get_many(NS, keys) == [None, None, None]
        for v, d in zip(res.views, datas):
            v[:] = d
        sums = c.commit(res)
        assert sums == [xxhash.xxh3_128_digest(d) for d in datas]
        assert c.stats().reservations == 0
        t = ram(c)
        assert t.reserved_bytes == 0
        assert t.used_bytes == before_used + sum(rounded(len(d)) for d in datas)
        assert c.lookup(NS, keys) == ([1, 1, 1], 3)
        assert c.get_many(NS, keys) == datas
        assert g.get_many(NS, keys) == datas  # byte-identical through another path too


@control_param
def test_reserve_present_pending_and_overwrite(daemon, control):
    k1, k2, k3 = key("p", 1), key("p", 2), key("p", 3)
    with Client(daemon.address, control=control) as c:
        c.put(NS, k1, b"old" * 10)
        res = c.reserve(NS, [k1, k2], [30, 40])
        assert res.status == bytes([1, 0])  # PRESENT, OK
        assert res.views[0] is None and res.offsets[0] == 0
        # a key under another open reservation is PENDING
        other = c.reserve(NS, [k2, k3], [40, 50])
        assert other.status == bytes([2, 0])
        res.views[1][:] = b"b" * 40
        other.views[1][:] = b"c" * 50
        assert len(c.commit(res)) == 1
        assert len(c.commit(other)) == 1
        assert c.get_many(NS, [k1, k2, k3]) == [b"old" * 10, b"b" * 40, b"c" * 50]
        # nothing to write: no reservation at all
        none = c.reserve(NS, [k1], [30])
        assert none.id == 0 and none.status == b"\x01"
        assert c.commit(none) == []
        # overwrite replaces the committed block at commit
        ow = c.reserve(NS, [k1], [7], overwrite=True)
        assert ow.status == b"\x00"
        assert c.get(NS, k1) == b"old" * 10  # still the old one until commit
        ow.views[0][:] = b"new-one"
        c.commit(ow)
        assert c.get(NS, k1) == b"new-one"
        assert ns_stats(c, NS).blocks == 3


@control_param
def test_abort_frees_the_reservation(daemon, control):
    k = key("abort")
    with Client(daemon.address, control=control) as c:
        used = ram(c).used_bytes
        res = c.reserve(NS, [k], [3 * MiB])
        assert ram(c).reserved_bytes == 3 * MiB and ram(c).used_bytes == used + 3 * MiB
        res.views[0][:10] = b"x" * 10
        c.abort(res)
        s = c.stats()
        assert s.reservations == 0
        t = ram(c)
        assert t.reserved_bytes == 0 and t.used_bytes == used
        assert c.lookup(NS, [k]) == ([0], 0)
        # the key can be reserved again at once
        res = c.reserve(NS, [k], [10])
        assert res.status == b"\x00"
        res.views[0][:] = b"0123456789"
        c.commit(res)
        assert c.get(NS, k) == b"0123456789"


@control_param
def test_commit_with_client_checksums(daemon, control):
    keys = [key("cs", i) for i in range(2)]
    datas = [blob(300_000, "a"), blob(12, "b")]
    with Client(daemon.address, control=control) as c:
        res = c.reserve(NS, keys, [len(d) for d in datas])
        for v, d in zip(res.views, datas):
            v[:] = d
        given = [xxhash.xxh3_128_digest(d) for d in datas]
        assert c.commit(res, given) == given
        lease = c.acquire(NS, keys)
        try:
            assert lease.checksums == given
        finally:
            c.release(lease)


# ---- Acquire / Release ---------------------------------------------------------------------

@control_param
def test_acquire_release(daemon, control):
    keys = [key("acq", i) for i in range(4)]
    datas = [blob(1000 * (i + 1), ("acq", i)) for i in range(4)]
    missing = key("acq", "missing")
    with Client(daemon.address, control=control) as c:
        c.put_many(NS, list(zip(keys, datas)))
        lease = c.acquire(NS, [keys[0], missing, keys[2]], lease_ms=5000)
        assert lease.id != 0
        assert lease.tiers == bytes([1, 0, 1])
        assert lease.lengths == [len(datas[0]), 0, len(datas[2])]
        assert lease.views[1] is None and lease.offsets[1] == 0
        assert bytes(lease.views[0]) == datas[0] and bytes(lease.views[2]) == datas[2]
        assert lease.checksums[0] == xxhash.xxh3_128_digest(datas[0])
        assert lease.checksums[1] == bytes(16)
        s = c.stats()
        assert s.leases == 1 and ram(c).leased_blocks == 2
        c.release(lease)
        assert c.stats().leases == 0 and ram(c).leased_blocks == 0
        # prefix_only stops at the first missing key
        lease = c.acquire(NS, [keys[1], missing, keys[3]], prefix_only=True)
        assert lease.tiers == bytes([1, 0, 0]) and lease.views[2] is None
        assert ram(c).leased_blocks == 1
        c.release(lease)
        # nothing found: no lease to release
        lease = c.acquire(NS, [missing])
        assert lease.id == 0 and lease.tiers == b"\x00"
        assert c.stats().leases == 0


@control_param
def test_delete_while_leased_keeps_slot_until_release(daemon, control):
    k = key("doomed")
    data = blob(2 * MiB, "doomed")
    with Client(daemon.address, control=control) as c:
        c.put(NS, k, data)
        used = ram(c).used_bytes
        lease = c.acquire(NS, [k])
        assert c.delete(NS, [k]) == 1
        assert c.lookup(NS, [k]) == ([0], 0)  # gone for new readers at once
        assert c.get(NS, k) is None
        assert bytes(lease.views[0]) == data  # the leased slot still holds the bytes
        assert ram(c).used_bytes == used
        c.release(lease)
        assert ram(c).used_bytes == used - 2 * MiB


# ---- Put / Get over the three paths ----------------------------------------------------------

@path_param
def test_put_get_paths(daemon, path):
    items = [(key(path, n), blob(n, (path, n))) for n in SIZES]
    keys = [k for k, _ in items]
    with client(daemon, path) as c:
        assert c.put_many(NS, items) == [True] * len(items)
        assert c.path == path
        got = c.get_many(NS, keys)
        assert len(got) == len(items)
        for (k, d), g in zip(items, got):
            assert g == d, f"block of {len(d)} bytes differs"
        # present blocks are not stored again
        assert c.put_many(NS, items) == [False] * len(items)
        # single-key helpers and a missing key in the middle of a batch
        assert c.get(NS, keys[-1]) == items[-1][1]
        missing = key(path, "missing")
        assert c.get(NS, missing) is None
        got = c.get_many(NS, [keys[0], missing, keys[5]])
        assert got == [items[0][1], None, items[5][1]]
        assert c.checksum_failures == 0
        # 32-byte keys
        k32 = [key(path, "k32", i, size=32) for i in range(3)]
        assert c.put_many(NS, [(k, blob(MiB + i, k)) for i, k in enumerate(k32)]) == [True] * 3
        assert c.get_many(NS, k32) == [blob(MiB + i, k) for i, k in enumerate(k32)]
        # into caller buffers
        bufs = [bytearray(len(d) + 10) for _, d in items[:4]]
        views = c.get_many(NS, keys[:4], into=bufs)
        for (_, d), v, b in zip(items[:4], views, bufs):
            assert bytes(v) == d and bytes(b[:len(d)]) == d
        s = ns_stats(c, NS)
        assert s.blocks == len(items) + 3
        assert s.bytes == sum(len(d) for _, d in items) + sum(MiB + i for i in range(3))
    # every path reads what every other path wrote
    for other in PATHS:
        with client(daemon, other) as c:
            assert c.get_many(NS, keys) == [d for _, d in items]


def test_put_stream_stalled_mid_block_gives_its_reservation_back(make_daemon, monkeypatch):
    """A gRPC Put whose client stops sending mid-block (its stream still open) is bounded like a
    data-channel PUT: after PAYLOAD_TIMEOUT_S without bytes the reservation is aborted and the call
    ends with DEADLINE_EXCEEDED."""
    monkeypatch.setattr(datachannel, "PAYLOAD_TIMEOUT_S", 1.0)
    d = make_daemon(ram={"capacity": "8MiB", "reservation_ms": 500})
    stop = threading.Event()
    k = key("stalled")

    def chunks():
        yield pb.PutChunk(header=pb.PutHeader(namespace=NS, key=k, length=6 * MiB), data=b"x" * 1024)
        stop.wait(30)

    ch = grpc.insecure_channel(d.address)
    f = pb_grpc.KVTierStub(ch).Put.future(chunks())
    try:
        err = f.exception(timeout=10)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "no data" in err.details()
        assert d.daemon.hot.snapshot()["reserved_bytes"] == 0
        with Client(d.address) as c:  # the space is free again, and nothing half-written shows
            assert c.lookup(NS, [k]) == ([0], 0)
            assert c.put(NS, key("after"), blob(6 * MiB, "after")) is True
    finally:
        stop.set()
        f.cancel()
        ch.close()


@path_param
def test_put_many_reports_which_blocks_were_stored(daemon, path):
    k_old, k_new = key(path, "old"), key(path, "new")
    with client(daemon, path) as c:
        assert c.put(NS, k_old, b"old") is True
        assert c.put_many(NS, [(k_old, b"old"), (k_new, b"new")]) == [False, True]


@path_param
def test_batches_longer_than_max_batch_are_split(make_daemon, path):
    d = make_daemon(server={"max_batch": 8})
    items = [(key("split", path, i), blob(100 + i, i)) for i in range(21)]
    keys = [k for k, _ in items]
    with client(d, path) as c:
        assert c.info.max_batch == 8
        assert c.put_many(NS, items) == [True] * 21
        assert c.lookup(NS, keys) == ([1] * 21, 21)
        assert c.get_many(NS, keys) == [b for _, b in items]
        assert c.pin(NS, keys) == [True] * 21
        assert c.unpin(NS, keys) == 21
        assert c.delete(NS, keys) == 21
        assert c.lookup(NS, keys) == ([0] * 21, 0)


# ---- Delete / Pin / Unpin ----------------------------------------------------------------------

def test_delete(daemon):
    keys = [key("del", i) for i in range(3)]
    with Client(daemon.address) as c:
        c.put_many(NS, [(k, b"x" * 5000) for k in keys])
        used = ram(c).used_bytes
        assert c.delete(NS, [keys[0], keys[2], key("del", "missing")]) == 2
        assert c.lookup(NS, keys) == ([0, 1, 0], 0)
        assert c.get_many(NS, keys) == [None, b"x" * 5000, None]
        assert ram(c).used_bytes == used - 2 * rounded(5000)
        assert ns_stats(c, NS).blocks == 1
        assert c.delete(NS, [keys[0]]) == 0
        # a deleted key can be stored again
        assert c.put(NS, keys[0], b"again") is True
        assert c.get(NS, keys[0]) == b"again"


def test_pin_keeps_blocks_from_eviction_until_unpin(make_daemon):
    d = make_daemon(ram={"capacity": "8MiB", "policy": "lru"})
    a = [key("pinA", i) for i in range(4)]
    with Client(d.address) as c:
        c.put_many(NS, [(k, blob(MiB, k)) for k in a])
        assert c.pin(NS, [a[0], a[1], key("pin", "missing")]) == [True, True, False]
        assert ram(c).pinned_blocks == 2
        for i in range(12):  # 12 MiB through an 8 MiB arena
            c.put(NS, key("fillB", i), blob(MiB, i))
        assert ram(c).evictions > 0
        assert ns_stats(c, NS).evictions == ram(c).evictions
        tiers, _ = c.lookup(NS, a)
        assert tiers[:2] == [1, 1], "a pinned block was evicted"
        assert tiers[2:] == [0, 0], "unpinned blocks should have been evicted first"
        assert c.get_many(NS, a[:2]) == [blob(MiB, a[0]), blob(MiB, a[1])]
        assert c.unpin(NS, [a[0], a[1], a[2]]) == 2
        assert ram(c).pinned_blocks == 0
        for i in range(12):
            c.put(NS, key("fillC", i), blob(MiB, i))
        assert c.lookup(NS, a[:2]) == ([0, 0], 0), "unpinned blocks must be evictable again"


def test_pin_with_ttl_expires(daemon):
    k = key("pin-ttl")
    with Client(daemon.address) as c:
        c.put(NS, k, b"p")
        assert c.pin(NS, [k], ttl_s=1) == [True]
        assert ram(c).pinned_blocks == 1
        deadline = time.monotonic() + 5
        while ram(c).pinned_blocks and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ram(c).pinned_blocks == 0
        assert c.get(NS, k) == b"p"  # expiry of a pin does not remove the block


# ---- Stats ----------------------------------------------------------------------------------

def test_stats_counters_move(daemon):
    keys = [key("st", i) for i in range(3)]
    sizes = [10, 5000, MiB + 7]
    with Client(daemon.address) as c:
        s = c.stats()
        assert s.version == kvtier.__version__ and s.uptime_s >= 0
        assert s.generation == c.info.generation and s.arena_path == c.info.arena_path
        t = ram(c)
        assert t.capacity_bytes == 64 * MiB - DATA_OFFSET
        assert t.policy == "s3fifo" and t.backing == "tmpfs"
        assert (t.blocks, t.used_bytes, t.evictions) == (0, 0, 0)
        assert ns_stats(c, NS) is None

        c.put_many(NS, [(k, b"z" * n) for k, n in zip(keys, sizes)])
        n = ns_stats(c, NS)
        assert (n.blocks, n.bytes, n.puts, n.put_bytes) == (3, sum(sizes), 3, sum(sizes))
        assert (n.hits, n.misses, n.get_bytes, n.lookups) == (0, 0, 0, 0)
        t = ram(c)
        assert t.blocks == 3 and t.used_bytes == sum(rounded(x) for x in sizes)

        c.get_many(NS, [keys[0], key("st", "missing"), keys[2]])
        n = ns_stats(c, NS)
        assert (n.hits, n.misses, n.get_bytes) == (2, 1, sizes[0] + sizes[2])
        assert (ram(c).hits, ram(c).misses) == (2, 1)  # the tier's own, not only the namespace's
        c.lookup(NS, keys + [key("st", "missing")])
        assert ns_stats(c, NS).lookups == 4

        with client(daemon, "grpc") as g:
            g.get(NS, keys[1])
        n = ns_stats(c, NS)
        assert (n.hits, n.get_bytes) == (3, sum(sizes))

        c.delete(NS, [keys[0]])
        n = ns_stats(c, NS)
        assert (n.blocks, n.bytes, n.puts) == (2, sizes[1] + sizes[2], 3)

        # a namespace filter returns only that namespace
        c.put("other", key("o"), b"o")
        assert {x.name for x in c.stats().namespaces} == {NS, "other"}
        assert [x.name for x in c.stats("other").namespaces] == ["other"]
        assert list(c.stats("never-used").namespaces) == []


# ---- health and reflection ------------------------------------------------------------------

def test_health_service(daemon):
    with grpc.insecure_channel(daemon.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvtier.v1.KVTier"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection(daemon):
    with grpc.insecure_channel(daemon.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvtier.v1.KVTier")]
        answers = list(stub.ServerReflectionInfo(iter(reqs), timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"kvtier.v1.KVTier", "grpc.health.v1.Health"} <= names
        from google.protobuf import descriptor_pb2
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in answers[1].file_descriptor_response.file_descriptor_proto]
        kv = [f for f in files if f.package == "kvtier.v1"]
        assert kv and {m.name for m in kv[0].service[0].method} >= {
            "Attach", "Lookup", "Reserve", "Commit", "Abort", "Acquire", "Release", "Put", "Get",
            "Delete", "Pin", "Unpin", "Stats"}


# ---- AsyncClient ----------------------------------------------------------------------------

@path_param
def test_async_client(daemon, path):
    items = [(key("async", path, n), blob(n, ("async", n))) for n in (1, 4097, MiB + 1, 2 * MiB)]
    keys = [k for k, _ in items]

    async def main():
        async with AsyncClient(daemon.address, **PATHS[path]) as c:
            assert await c.put_many(NS, items) == [True] * len(items)
            assert c.path == path
            assert await c.get_many(NS, keys) == [d for _, d in items]
            assert await c.put(NS, keys[0], items[0][1]) is False
            assert await c.get(NS, key("async", "missing")) is None
            tiers, prefix = await c.lookup(NS, [keys[0], key("async", "missing"), keys[1]])
            assert (tiers, prefix) == ([1, 0, 1], 1)
            s = await c.stats(NS)
            assert s.namespaces[0].blocks == len(items)
            # several calls in flight at once on one client
            got = await asyncio.gather(*(c.get(NS, k) for k in keys))
            assert got == [d for _, d in items]
            assert await c.delete(NS, keys[:1]) == 1
            assert (await c.lookup(NS, keys[:1]))[0] == [0]
            assert c.checksum_failures == 0

    asyncio.run(main())


@control_param
def test_async_client_zero_copy(daemon, control):
    async def main():
        async with AsyncClient(daemon.address, control=control) as c:
            assert c.info is None and c.arena_view() is None
            info = await c.attach()
            assert c.info is info and info.arena_size > 0
            assert len(c.arena_view()) == info.arena_size  # what a GPU registers for DMA
            k = key("async-zc")
            res = await c.reserve(NS, [k], [9])
            res.views[0][:] = b"zerocopy!"
            await c.commit(res)
            lease = await c.acquire(NS, [k])
            assert bytes(lease.views[0]) == b"zerocopy!"
            await c.release(lease)
            assert (await c.stats()).leases == 0
            assert c.control == ("data" if control == "auto" else "grpc")

    asyncio.run(main())


# ---- checksums are verified on every read ------------------------------------------------------

@path_param
def test_get_verifies_checksums(daemon, path):
    good, bad = key("chk", path, "good"), key("chk", path, "bad")
    data = blob(3 * MiB, ("chk", path))
    with Client(daemon.address) as corrupter, client(daemon, path) as c:
        c.put_many(NS, [(good, data), (bad, data)])
        assert c.get(NS, bad) == data
        # flip one byte of the committed block behind the daemon's back
        lease = corrupter.acquire(NS, [bad])
        lease.views[0][len(data) // 2] ^= 0xFF
        corrupter.release(lease)
        assert c.checksum_failures == 0
        assert c.get(NS, bad) is None
        assert c.checksum_failures == 1
        assert c.get_many(NS, [good, bad]) == [data, None]
        assert c.checksum_failures == 2
        # the daemon still lists it (it does not rehash on read); the client never returns it
        assert c.lookup(NS, [bad]) == ([1], 1)
        # into caller buffers: the bad block is None, the buffer of the good one holds its bytes
        bufs = [bytearray(len(data)), bytearray(len(data))]
        got = c.get_many(NS, [good, bad], into=bufs)
        assert bytes(got[0]) == data and got[1] is None
        assert c.checksum_failures == 3


@pytest.mark.parametrize("n", [0, 1, HASH_CHUNK, HASH_CHUNK + 1, 4 * MiB, 9 * MiB + 3])
def test_copy_hashed_is_the_xxh3_of_what_it_copied(n):
    from kvtier.copying import copy_hashed
    src = memoryview(random.Random(n).randbytes(n))
    dst = memoryview(bytearray(n + 5))
    assert copy_hashed(dst, src) == xxhash.xxh3_128_digest(src)
    assert dst[:n] == src and dst[n:] == bytes(5)


def test_large_block_through_the_arena_is_verified_piece_by_piece(daemon):
    """Blocks above 4 MiB are copied and hashed in pieces, both ways: the daemon (which hashes
    what is in the arena) and the client agree, and a flipped byte is still caught."""
    k = key("large")
    data = blob(9 * MiB + 3, "large")
    with Client(daemon.address) as corrupter, client(daemon, "arena") as c:
        sent, commit = [], c._ops._commit_answer

        def spy(req):
            sent.append(req[-1].checksums)  # the CommitRequest, made or finished
            return (yield from commit(req))
        c._ops._commit_answer = spy
        assert c.put_many(NS, [(k, data)]) == [True]
        assert sent == [xxhash.xxh3_128_digest(data)]  # the put sent the checksum it computed
        buf = bytearray(len(data))
        assert bytes(c.get_many(NS, [k], into=[buf])[0]) == data and bytes(buf) == data
        lease = corrupter.acquire(NS, [k])
        assert lease.checksums[0] == xxhash.xxh3_128_digest(data)
        lease.views[0][len(data) - 1] ^= 0xFF
        corrupter.release(lease)
        assert c.get_many(NS, [k], into=[buf]) == [None] and c.checksum_failures == 1


def test_verify_false_returns_bytes_unchecked(daemon):
    k = key("noverify")
    with Client(daemon.address) as corrupter, Client(daemon.address, verify=False) as c:
        c.put(NS, k, b"A" * 100)
        lease = corrupter.acquire(NS, [k])
        lease.views[0][0:1] = b"B"
        corrupter.release(lease)
        assert c.get(NS, k) == b"B" + b"A" * 99
        assert c.checksum_failures == 0


# ---- a client survives a daemon restart ------------------------------------------------------

def _retry_unavailable(fn, timeout: float = 15.0):
    """Unavailable means 'try again' (client.py): a pooled connection to the old daemon is dropped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("path,control", [("arena", "auto"), ("arena", "grpc"), ("data", "auto"), ("grpc", "auto")])
def test_client_survives_daemon_restart(daemon_process, path, control):
    d = daemon_process()
    old_k, new_k = key("restart", path, "old"), key("restart", path, "new")
    old, new = blob(2 * MiB, "old"), blob(MiB + 5, "new")
    with Client(d.address, control=control, **PATHS[path]) as c:
        assert c.put(NS, old_k, old) is True
        assert c.get(NS, old_k) == old
        assert c.path == path
        gen = c.info.generation
        d.kill()
        d.start()  # a new daemon on the same config and arena path, under a new generation
        # a block from before may be lost, never wrong
        before = _retry_unavailable(lambda: c.get(NS, old_k))
        assert before in (None, old)
        # the same client object keeps working
        assert _retry_unavailable(lambda: c.put(NS, new_k, new)) is True
        assert c.get(NS, new_k) == new
        assert c.get_many(NS, [old_k, new_k]) == [before, new]
        assert c.lookup(NS, [new_k, old_k]) == ([1, 1 if before else 0], 2 if before else 1)
        assert c.path == path
        assert c.control == ("data" if path != "grpc" and control == "auto" else "grpc")
        if path == "arena":
            assert c.info.generation != gen  # re-attached to the new arena
            lease = c.acquire(NS, [new_k])
            assert bytes(lease.views[0]) == new
            c.release(lease)
        assert c.checksum_failures == 0


def test_a_second_daemon_on_the_same_socket_leaves_it_to_the_first(daemon):
    import shutil
    from conftest import _dirs, make_config
    from kvtier.server import DaemonThread
    unused_sock_dir, arena_dir = _dirs()
    second = DaemonThread(make_config(os.path.dirname(daemon.cfg.socket_path), arena_dir))
    try:
        with pytest.raises(errors.ConfigError, match="another daemon is listening"):
            second.start()
        assert not second._thread.is_alive()  # a refused start has closed its loop when it raises
    finally:
        second.stop()
        shutil.rmtree(unused_sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)
    assert os.path.exists(daemon.cfg.socket_path)  # refused, and on its way out it removed nothing
    with Client(daemon.address) as c:
        c.put(NS, key("still"), b"served")
        assert c.get(NS, key("still")) == b"served"


def test_daemon_thread_stop_tolerates_a_loop_that_closed_meanwhile():
    import asyncio
    import threading
    import types
    from kvtier.server import DaemonThread
    t = DaemonThread.__new__(DaemonThread)
    t._loop = asyncio.new_event_loop()
    t._loop.close()
    ending = threading.Event()
    t._thread = threading.Thread(target=ending.wait, args=(5,))
    t._thread.start()
    t.daemon = types.SimpleNamespace(stop=lambda: None)
    threading.Timer(0.2, ending.set).start()
    t.stop(timeout=5)  # the thread was alive, its loop already closed: no RuntimeError
    assert not t._thread.is_alive()


def test_attach_names_the_data_channel_of_the_callers_transport(make_daemon):
    d = make_daemon(server={"listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", "insecure_tcp": True})
    with Client(d.address) as local, Client(d.tcp_address, attach=False) as remote:
        assert local.info.data_address.startswith("unix://")
        assert remote.info.data_address.startswith("tcp://127.0.0.1:")
        remote.put("t", b"k" * 16, b"via tcp")
        assert remote.path == "data" and local.get("t", b"k" * 16) == b"via tcp"


def test_a_tcp_client_is_never_sent_to_the_daemons_unix_socket(make_daemon):
    """With server.listen but no data_listen, a TCP client was told the data channel's Unix path
    and used it: on another node that path is the same, and is that node's own daemon."""
    d = make_daemon(server={"listen": "127.0.0.1:0", "insecure_tcp": True})
    with Client(d.address) as local, Client(d.tcp_address, attach=False) as remote:
        assert local.info.data_address.startswith("unix://")
        assert remote.info.data_address == "" and remote.info.data_channel_version == 0
        assert remote.put("t", b"k" * 16, b"via grpc")
        assert remote.path == "grpc" and local.get("t", b"k" * 16) == b"via grpc"


@pytest.mark.parametrize("control,data,reached", [
    ("unix:///run/kvtier/kvtier.sock", "unix:///run/kvtier/kvtier.sock.data", "unix:///run/kvtier/kvtier.sock.data"),
    ("node-a:7070", "unix:///run/kvtier/kvtier.sock.data", ""),  # another node's path: its own daemon
    ("tcp://node-a:7070", "tcp://0.0.0.0:7071", "tcp://node-a:7071"),  # a wildcard: the host dialled
    ("10.0.0.5:7070", "tcp://[::]:7071", "tcp://10.0.0.5:7071"),
    ("[fd00::5]:7070", "tcp://0.0.0.0:7071", "tcp://[fd00::5]:7071"),
    ("node-a:7070", "tcp://10.0.0.5:7071", "tcp://10.0.0.5:7071"),  # a named address: as given
    ("node-a:7070", "tcp://127.0.0.1:7071", ""),  # loopback from afar would be this node
    ("127.0.0.1:7070", "tcp://127.0.0.1:7071", "tcp://127.0.0.1:7071"),
    ("localhost:7070", "tcp://[::1]:7071", "tcp://[::1]:7071"),
    ("node-a:7070", "", ""),
])
def test_the_data_address_a_client_dials(control, data, reached):
    from kvtier.client import reachable_data_address
    assert reachable_data_address(control, data) == reached


def test_an_empty_host_is_every_address():
    from kvtier.config import split_host_port
    assert split_host_port(":7070") == ("0.0.0.0", 7070)  # it bound loopback, though called "every address"
    assert split_host_port("[::1]:7070") == ("::1", 7070)
    assert split_host_port("10.0.0.5:7071") == ("10.0.0.5", 7071)


def test_arena_view_is_the_mapping_clients_write(daemon):
    with Client(daemon.address) as c, Client(daemon.address, attach=False) as remote:
        assert remote.arena_view() is None or remote.path != "arena"
        c.put("v", b"a" * 16, b"mapped bytes")
        view = c.arena_view()
        assert view is not None and len(view) == c.info.arena_size
        lease = c.acquire("v", [b"a" * 16])
        assert bytes(view[lease.offsets[0]:lease.offsets[0] + 12]) == b"mapped bytes"
        c.release(lease)


def test_get_many_does_not_wait_for_its_release(daemon):
    """An arena get_many posts its Release (nobody needs the answer): the connection reads the
    answer before its next call, so the lease is gone by then and the connection stays in step."""
    items = [(key("post", i), blob(4096 + i, ("post", i))) for i in range(4)]
    with client(daemon, "arena") as c:
        c.put_many(NS, items)
        assert c.get_many(NS, [k for k, _ in items]) == [d for _, d in items]
        assert c.control == "data" and [conn.owed > 0 for conn in c._ops._pool] == [True]
        assert ram(c).leased_blocks == 0  # read the owed answer, then asked: the lease is gone
        assert [conn.owed for conn in c._ops._pool] == [0]
        # a posted call's error (here a lease nobody has) is the answer nobody waits for
        assert c._ops.control_post("Release", pb.ReleaseRequest(lease_id=987654321))
        assert c.lookup(NS, [items[0][0]]) == ([1], 1)
        assert c.get_many(NS, [items[1][0]]) == [items[1][1]]
    with client(daemon, "arena", control="grpc") as g:  # no data channel for calls: waited for
        assert g.get_many(NS, [items[2][0]]) == [items[2][1]]
        assert ram(g).leased_blocks == 0
