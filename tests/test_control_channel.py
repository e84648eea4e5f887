"""Unary calls on the data channel (CALL frames): the same answers, errors, metrics and logs as
on gRPC, gRPC as the fallback, and no call sent twice.

Each case runs one client with ``control="auto"`` (the data channel) beside one with
``control="grpc"`` against the same in-process daemon and compares what they get.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import urllib.request

import pytest
import xxhash

from kvtier import client as kvclient
from kvtier import errors
from kvtier.client import AsyncClient, Client, Lease, Reservation
from kvtier.v1 import kvtier_pb2 as pb

pytest_plugins = ["valkey_servers"]  # fixture: valkey (the cluster tier's steps run on the daemon's loop)

MiB = 1 << 20
NS = "ctl"


def key(*parts, size: int = 16) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()[:size]


def pair(d, **kw) -> tuple[Client, Client]:
    c, g = Client(d.address, **kw), Client(d.address, control="grpc", **kw)
    c.attach(), g.attach()
    assert (c.control, g.control) == ("data", "grpc")
    return c, g


def outcome(fn):
    """What a call gave: its result, or its error's type, status and message."""
    try:
        return "ok", fn()
    except errors.KvtierError as e:
        return type(e).__name__, e.code, str(e)


class NoStub:
    """Stands in for a client's gRPC stub: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} went over gRPC")


def raw(cl: Client, rpc: str, request):
    """One unary call through the client's own routing (data channel or gRPC)."""
    return cl._call(("unary", rpc, request))


def test_answers_and_errors_are_the_same_on_both_transports(make_daemon):
    # "sync": a wrong checksum is DATA_LOSS at Commit (the default trusts it and checks afterwards)
    daemon = make_daemon(ram={"verify_on_commit": "sync"})
    c, g = pair(daemon)
    with c, g:
        for n, cl in (("data", c), ("grpc", g)):
            cl.put_many(NS, [(key(n, i), bytes([i]) * (1000 + i)) for i in range(3)])
        info = c.info
        over = b"k" * 16 * (info.max_batch + 1)
        cases = {
            "lookup": lambda cl, n: cl.lookup(NS, [key(n, 0), key(n, "x"), key(n, 2)]),
            "bad namespace": lambda cl, n: raw(cl, "Lookup", pb.LookupRequest(namespace="Bad NS", key_size=16,
                                                                              keys=key(n))),
            "bad key size": lambda cl, n: raw(cl, "Acquire", pb.AcquireRequest(namespace=NS, key_size=20,
                                                                               keys=b"k" * 20)),
            "ragged keys": lambda cl, n: raw(cl, "Delete", pb.DeleteRequest(namespace=NS, key_size=16,
                                                                            keys=b"k" * 17)),
            "over max_batch": lambda cl, n: raw(cl, "Pin", pb.PinRequest(namespace=NS, key_size=16, keys=over)),
            "stale generation": lambda cl, n: raw(cl, "Reserve", pb.ReserveRequest(
                namespace=NS, key_size=16, keys=key(n, "s"), sizes=[10], generation=info.generation + 2)),
            "sizes count": lambda cl, n: raw(cl, "Reserve", pb.ReserveRequest(namespace=NS, key_size=16,
                                                                              keys=key(n, "s"), sizes=[1, 2])),
            "size 0": lambda cl, n: cl.reserve(NS, [key(n, "z")], [0]),
            "too large": lambda cl, n: cl.reserve(NS, [key(n, "big")], [info.arena_size * 2]),
            "unknown reservation": lambda cl, n: cl.commit(Reservation(12345, b"\x00", [4096], [10])),
            "abort unknown": lambda cl, n: cl.abort(Reservation(777, b"\x00", [4096], [10])),
            "unknown lease": lambda cl, n: cl.release(Lease(4242, b"\x01", [4096], [1], [bytes(16)])),
            "bad checksum length": lambda cl, n: raw(cl, "Commit", pb.CommitRequest(reservation_id=5,
                                                                                    checksums=b"x" * 15)),
            "pin": lambda cl, n: cl.pin(NS, [key(n, 1), key(n, "x")], ttl_s=60),
            "unpin": lambda cl, n: cl.unpin(NS, [key(n, 1), key(n, "x")]),
            "stats": lambda cl, n: [(s.name, s.blocks) for s in cl.stats(NS).namespaces],
            "stats of a bad namespace": lambda cl, n: cl.stats("Bad NS"),
            "delete": lambda cl, n: cl.delete(NS, [key(n, 2), key(n, "x")]),
        }
        for name, fn in cases.items():
            got_c, got_g = outcome(lambda: fn(c, "data")), outcome(lambda: fn(g, "grpc"))
            assert got_c == got_g, name
            if name == "stats":  # the two clients wrote to the same namespace: the same rows
                assert got_c[1] == [(NS, 6)]
            elif name not in ("lookup", "pin", "unpin", "delete"):
                assert got_c[0] != "ok", name
        assert outcome(lambda: cases["stale generation"](c, "d"))[:2] == ("StaleArena", errors.StaleArena.code)
        # a reservation and a lease made on one transport end on the other: one daemon, one set of ids
        for a, b in ((c, g), (g, c)):
            k = key("cross", a.control)
            r = a.reserve(NS, [k], [5])
            r.views[0][:] = b"cross"
            assert b.commit(r) == [xxhash.xxh3_128_digest(b"cross")]
            lease = a.acquire(NS, [k])
            assert bytes(lease.views[0]) == b"cross"
            b.release(lease)
            with pytest.raises(errors.UnknownLease) as e1:
                a.release(lease)
            with pytest.raises(errors.UnknownLease) as e2:
                b.release(lease)
            assert str(e1.value) == str(e2.value)
        # a checksum that does not match: DATA_LOSS on both, and the reservation is gone on both
        for cl in (c, g):
            r = cl.reserve(NS, [key("dl", cl.control)], [7])
            r.views[0][:] = b"payload"
            with pytest.raises(errors.DataLoss):
                cl.commit(r, [bytes(16)])
            with pytest.raises(errors.FailedPrecondition):
                cl.commit(r)
        s = c.stats()
        assert s.leases == 0 and s.reservations == 0


def test_calls_take_the_transport_asked_for(daemon):
    with Client(daemon.address) as c, Client(daemon.address, control="grpc") as g:
        c.attach(), g.attach()
        c._stub = NoStub()  # from here on, any gRPC call fails
        k = key("route")
        r = c.reserve(NS, [k], [4])
        r.views[0][:] = b"data"
        c.commit(r)
        lease = c.acquire(NS, [k], tokens_per_key=4)
        assert bytes(lease.views[0]) == b"data"
        c.release(lease)
        assert c.lookup(NS, [k]) == ([1], 1)
        assert c.pin(NS, [k]) == [True] and c.unpin(NS, [k]) == 1
        assert c.get(NS, k) == b"data" and c.stats().leases == 0
        assert c.delete(NS, [k]) == 1

        def refuse(*a):
            raise AssertionError("a call went over the data channel")
        g._ops.control_call = refuse
        assert g.put(NS, k, b"grpc") is True and g.lookup(NS, [k]) == ([1], 1)
    with Client(daemon.address, attach=False) as d, Client(daemon.address, data_channel=False) as n:
        assert d.lookup(NS, [k]) == n.lookup(NS, [k]) == ([1], 1)
        assert (d.path, d.control) == ("data", "data")
        assert (n.path, n.control) == ("arena", "grpc")
    with pytest.raises(ValueError, match="control"):
        Client(daemon.address, control="udp")


def test_large_commit_hashes_the_same_off_the_loop(daemon):
    keys = [key("big", i) for i in range(8)]
    datas = [os.urandom(512 * 1024 + i) for i in range(8)]  # 4 MiB: hashed in parts, on several threads
    c, g = pair(daemon)
    with c, g:
        sums = []
        for cl, ks in ((c, keys[:4]), (g, keys[4:])):
            ds = datas[:4] if cl is c else datas[4:]
            r = cl.reserve(NS, ks, [len(d) for d in ds])
            for v, d in zip(r.views, ds):
                v[:] = d
            sums += cl.commit(r)
        assert sums == [xxhash.xxh3_128_digest(d) for d in datas]
        assert c.get_many(NS, keys) == g.get_many(NS, keys) == datas


def _scrape(d) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("kvtier_rpc_duration_seconds_count{", "kvtier_lookups_total{",
                            "kvtier_hits_total{", "kvtier_misses_total{", "kvtier_put_blocks_total{",
                            "kvtier_prefill_tokens_saved_total{")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_and_namespace_counters_move_alike(make_daemon):
    # "sync": no background commit checks, whose counters would move after the scrape
    d = make_daemon(metrics={"listen": "127.0.0.1:0"}, ram={"verify_on_commit": "sync"})

    def traffic(cl, ns):
        keys = [key(ns, i) for i in range(3)]
        cl.put_many(ns, [(k, b"v" * 100) for k in keys[:2]])
        cl.lookup(ns, keys)
        cl.release(cl.acquire(ns, keys, prefix_only=True, tokens_per_key=16))
        with pytest.raises(errors.InvalidArgument):
            raw(cl, "Lookup", pb.LookupRequest(namespace=ns, key_size=16, keys=b"short"))
        with pytest.raises(errors.NotFound):
            cl.release(Lease(99, b"\x01", [0], [1], [bytes(16)]))

    deltas = {}
    for control in ("auto", "grpc"):
        ns = f"m-{control}"
        before = _scrape(d)
        with Client(d.address, control=control) as cl:
            traffic(cl, ns)
        after = _scrape(d)
        deltas[control] = {k.replace(ns, "NS"): v - before.get(k, 0) for k, v in after.items()
                           if v != before.get(k, 0)}
    assert deltas["auto"] == deltas["grpc"]
    got = deltas["auto"]
    assert got['kvtier_rpc_duration_seconds_count{code="OK",method="Lookup"}'] == 1
    assert got['kvtier_rpc_duration_seconds_count{code="INVALID_ARGUMENT",method="Lookup"}'] == 1
    assert got['kvtier_rpc_duration_seconds_count{code="NOT_FOUND",method="Release"}'] == 1
    assert got['kvtier_rpc_duration_seconds_count{code="OK",method="Commit"}'] == 1
    assert got['kvtier_prefill_tokens_saved_total{namespace="NS"}'] == 32
    assert got['kvtier_lookups_total{namespace="NS"}'] == 3


def test_internal_errors_are_answered_and_logged_alike(daemon, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(daemon.daemon.store, "pin", boom)
    c, g = pair(daemon)
    with c, g, caplog.at_level(logging.ERROR, logger="kvtier.service"):
        got = [outcome(lambda: cl.pin(NS, [key("pin")])) for cl in (c, g)]
        assert got[0] == got[1] == ("Internal", errors.Internal.code, "internal error in Pin: RuntimeError")
        logged = [r for r in caplog.records if r.getMessage() == "Pin failed"]
        assert len(logged) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in logged)
        assert c.lookup(NS, [key("pin")]) == ([0], 0)  # the connection is still in step


def test_a_timeout_is_deadline_exceeded_and_never_resent(daemon, monkeypatch):
    store = daemon.daemon.store
    real, calls, finished = store.lookup_async, [], threading.Event()

    async def slow(ns, keys):
        calls.append(ns)
        if ns == "slow":
            time.sleep(1.5)  # on the data-channel thread: the loop goes on serving others
            finished.set()
        return await real(ns, keys)
    monkeypatch.setattr(store, "lookup_async", slow)
    with Client(daemon.address, timeout=0.3) as c:
        c.attach()
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            c.lookup("slow", [key("t")])
        assert time.monotonic() - t0 < 1.2
        assert c.lookup(NS, [key("t")]) == ([0], 0)  # a fresh connection; the slow one was dropped
        assert finished.wait(10)
        assert calls == ["slow", NS]


def test_gone_data_channel_falls_back_to_grpc(make_daemon):
    d = make_daemon()
    with Client(d.address) as c:
        assert c.put(NS, key("fb"), b"before") is True and c.control == "data"
        d.daemon.data.close()  # the data channel goes away; gRPC stays
        assert c.lookup(NS, [key("fb")]) == ([1], 1)
        assert c.put(NS, key("fb2"), b"after") is True
        assert c.get_many(NS, [key("fb"), key("fb2")]) == [b"before", b"after"]
    off = make_daemon(server={"data_channel": False})
    with Client(off.address) as c, Client(off.address, attach=False) as r:
        assert c.put(NS, key("off"), b"x") is True and (c.path, c.control) == ("arena", "grpc")
        assert r.get(NS, key("off")) == b"x" and (r.path, r.control) == ("grpc", "grpc")


def test_a_daemon_without_call_frames_is_served_over_grpc(daemon, monkeypatch):
    from kvtier import datachannel
    monkeypatch.setattr(datachannel, "_OPS", (datachannel.OP_PUT, datachannel.OP_GET, datachannel.OP_PING,
                                             datachannel.OP_HELLO))  # CALL is an unknown op, as before it existed
    monkeypatch.setattr(datachannel, "VERSION", 0)  # and Attach said nothing of batched frames
    with Client(daemon.address) as c:
        c.attach()
        assert c.control == "data"
        assert c.lookup(NS, [key("old")]) == ([0], 0)  # refused as a bad frame: asked again on gRPC
        assert c.control == "grpc"
        assert c.put(NS, key("old"), b"still works") is True and c.get(NS, key("old")) == b"still works"
    with Client(daemon.address, attach=False) as d:
        assert d.put(NS, key("old2"), b"inline") is True and d.lookup(NS, [key("old2")]) == ([1], 1)
        assert (d.path, d.control) == ("data", "grpc")


def test_tcp_data_channel_carries_calls(make_daemon):
    d = make_daemon(server={"listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", "insecure_tcp": True})
    with Client(d.tcp_address, attach=False) as c, Client(d.tcp_address, attach=False, control="grpc") as g:
        c.put(NS, key("tcp"), b"over tcp")
        assert c.info.data_address.startswith("tcp://") and c.control == "data"
        c._stub = NoStub()
        assert c.lookup(NS, [key("tcp")]) == g.lookup(NS, [key("tcp")]) == ([1], 1)
        assert c.stats(NS).namespaces[0].blocks == 1


def test_nvme_promotion_on_a_data_channel_thread(make_daemon, tmp_path):
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})
    keys = [key("nv", i) for i in range(12)]
    datas = [os.urandom(MiB - 4096) for _ in keys]
    c, g = pair(d)
    with c, g:
        c.put_many(NS, list(zip(keys, datas)))  # 12 MiB through 8 MiB: evictions demote to NVMe
        deadline = time.monotonic() + 10
        while d.daemon.store.queued_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        tiers = c.lookup(NS, keys)[0]
        assert g.lookup(NS, keys)[0] == tiers
        cold = [i for i, t in enumerate(tiers) if t == 2][:2]
        assert len(cold) == 2
        for cl, i in zip((c, g), cold):
            lease = cl.acquire(NS, [keys[i]], prefix_only=True)
            assert lease.tiers == b"\x02" and bytes(lease.views[0]) == datas[i]
            cl.release(lease)
        assert c.stats().leases == 0


def test_delete_without_a_cluster_tier_runs_on_the_data_channel_thread(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})
    keys = [key("del", i) for i in range(12)]
    c, g = pair(d)
    with c, g:
        c.put_many(NS, [(k, os.urandom(MiB - 4096)) for k in keys])  # the first ones are demoted to NVMe
        deadline = time.monotonic() + 10
        while d.daemon.store.queued_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        tiers = c.lookup(NS, keys)[0]
        assert 2 in tiers[:6] and 1 in tiers[6:]
        threads = []
        store = type(d.daemon.store)
        real = store._delete_local  # what a Delete runs, on whichever thread it is made

        def spy(self, ns, ks):
            threads.append(threading.current_thread().name)
            return real(self, ns, ks)
        monkeypatch.setattr(store, "_delete_local", spy)
        assert c.delete(NS, keys[:6]) == 6
        assert threads == ["kvtier-data-conn"]  # no hop to the event loop and on to a worker
        assert g.delete(NS, keys[6:]) == 6
        assert len(threads) == 2 and threads[1] != "kvtier-data-conn"
        assert c.lookup(NS, keys) == ([0] * 12, 0)
        assert all(not files for _, _, files in os.walk(tmp_path / "nvme"))  # the demoted ones' files too


def test_cluster_tier_steps_run_on_the_loop(make_daemon, valkey):
    section = {"url": valkey.url, "timeout_ms": 1000, "reconnect_max_s": 0.5}
    a, b = make_daemon(cluster=section), make_daemon(cluster=section)
    blocks = [(key("cl", i), os.urandom(20_000 + i)) for i in range(4)]
    keys = [k for k, _ in blocks]
    with Client(a.address) as ca:
        ca.put_many(NS, blocks)
        deadline = time.monotonic() + 10
        while next(t for t in ca.stats().tiers if t.name == "cluster").queued_bytes and \
                time.monotonic() < deadline:
            time.sleep(0.05)
    c, g = pair(b)
    with c, g:
        assert c.lookup(NS, keys) == g.lookup(NS, keys) == ([3] * 4, 4)
        lease = c.acquire(NS, keys[:2], prefix_only=True)  # promoted from the cluster tier
        assert lease.tiers == b"\x03\x03" and [bytes(v) for v in lease.views] == [d for _, d in blocks[:2]]
        c.release(lease)
        assert c.get_many(NS, keys) == [d for _, d in blocks]
        assert c.delete(NS, keys[:1]) == 1
        assert g.lookup(NS, keys[:1]) == ([0], 0)


def test_async_client_calls_on_the_data_channel(daemon):
    async def main():
        async with AsyncClient(daemon.address) as c:
            await c.attach()
            assert c.control == "data"
            c._stub = NoStub()
            k = key("async")
            res = await c.reserve(NS, [k], [5])
            res.views[0][:] = b"async"
            await c.commit(res)
            leases = await asyncio.gather(*(c.acquire(NS, [k]) for _ in range(4)))
            assert all(bytes(lease.views[0]) == b"async" for lease in leases)
            await asyncio.gather(*(c.release(lease) for lease in leases))
            assert (await c.stats()).leases == 0

    asyncio.run(main())


def _leases_drain(cl: Client, timeout: float = 5.0) -> int:
    """Active leases once posted Releases have had time to land (they are not waited for)."""
    deadline = time.monotonic() + timeout
    while (n := cl.stats().leases) and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def _count_acquires(cl: Client) -> dict:
    """Wrap the client's control_start/control_finish: Acquires sent and the most in flight."""
    seen = {"sent": 0, "in_flight": 0, "most": 0}
    ops = cl._ops
    start, finish = ops.control_start, ops.control_finish

    def counted_start(rpc, request):
        out = start(rpc, request)
        if rpc == "Acquire" and out is not None:
            seen["sent"] += 1
            seen["in_flight"] += 1
            seen["most"] = max(seen["most"], seen["in_flight"])
        return out

    def counted_finish(started, timeout):
        if started[2] == "Acquire":
            seen["in_flight"] -= 1
        return finish(started, timeout)
    ops.control_start, ops.control_finish = counted_start, counted_finish
    return seen


def test_a_long_get_many_keeps_two_acquires_in_flight(daemon):
    keys = [key("pipe", i) for i in range(40)]
    datas = {k: os.urandom(3000 + i) for i, k in enumerate(keys) if i % 7}  # every 7th is missing
    want = [datas.get(k) for k in keys]
    c, g = pair(daemon)
    with c, g:
        assert c.path == "arena"
        c.put_many(NS, list(datas.items()))
        seen = _count_acquires(c)
        assert c.get_many(NS, keys) == want
        assert (seen["sent"], seen["most"]) == (4, 2)  # 4 parts of 10 keys, the next sent before one is copied
        c._ops.ram_hits = False  # as if a block had come from NVMe (the next test): parts again
        bufs = [bytearray(4096) for _ in keys]
        got = c.get_many(NS, keys, into=bufs)
        assert [None if v is None else bytes(v) for v in got] == want
        assert all(v is None or v.obj is b for v, b in zip(got, bufs))
        assert seen["sent"] == 8
        assert c.get_many(NS, keys[:15]) == want[:15] and seen["sent"] == 9  # under 16 keys: one Acquire
        assert g.get_many(NS, keys) == want  # gRPC control: the same parts, one at a time
        assert _leases_drain(c) == 0

        async def run_async():
            async with AsyncClient(daemon.address) as a:
                return await a.get_many(NS, keys)
        assert asyncio.run(run_async()) == want


def test_a_get_many_copies_out_whichever_part_is_answered_first(daemon):
    """The parts of a get_many are answered in any order (their reads finish when they finish):
    the client copies out the one that is ready, and every block still lands in its place."""
    keys = [key("first-ready", i) for i in range(40)]
    datas = {k: os.urandom(3000 + i) for i, k in enumerate(keys) if i % 5}
    want = [datas.get(k) for k in keys]
    with Client(daemon.address) as c:
        c.put_many(NS, list(datas.items()))
        assert c.path == "arena"
        asked = []

        def last_first(handles, timeout):  # as if the latest part were always answered first
            asked.append(len(handles))
            return len(handles) - 1
        c._ops.ram_hits = False
        c._ops.control_ready = last_first
        assert c.get_many(NS, keys) == want
        bufs = [bytearray(4096) for _ in keys]
        got = c.get_many(NS, keys, into=bufs)
        assert [None if v is None else bytes(v) for v in got] == want
        assert all(v is None or v.obj is b for v, b in zip(got, bufs))
        assert asked and all(n == 2 for n in asked), asked  # asked whenever two were in flight
        assert _leases_drain(c) == 0


def test_control_ready_names_the_call_whose_answer_came_in():
    """control_ready polls the connections of the calls in flight: the position of one with an
    answer waiting (the lowest of several), 0 when one of them is made later or nothing came."""
    import socket as socketlib
    from types import SimpleNamespace
    pairs = [socketlib.socketpair() for _ in range(3)]
    try:
        handles = [(SimpleNamespace(sock=mine), i, "Acquire") for i, (mine, _) in enumerate(pairs)]
        ops = kvclient._Ops.__new__(kvclient._Ops)
        t0 = time.monotonic()
        assert ops.control_ready(handles, 0.05) == 0  # nothing answered: the first, after the timeout
        assert time.monotonic() - t0 >= 0.04
        pairs[2][1].send(b"x")
        assert ops.control_ready(handles, 5) == 2
        pairs[1][1].send(b"x")
        assert ops.control_ready(handles, 5) == 1  # two answered: the earlier part
        assert ops.control_ready([handles[2], None], 5) == 0  # one made at its finish: in order
        assert ops.control_ready(handles[2:], 5) == 0  # a single call: nothing to choose
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_gets_of_blocks_in_ram_take_one_acquire_until_one_comes_from_nvme(make_daemon, tmp_path):
    d = make_daemon(ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})
    keys = [key("ramhits", i) for i in range(200)]
    datas = {k: os.urandom(60_000 + i) for i, k in enumerate(keys)}
    with Client(d.address) as c:
        c.put_many(NS, list(datas.items()))  # 12 MiB through 8 MiB: the first ones go to NVMe
        deadline = time.monotonic() + 10
        while d.daemon.store.queued_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        tiers = c.lookup(NS, keys)[0]
        in_ram = [k for k, t in zip(keys, tiers) if t == 1][-40:]
        on_nvme = [k for k, t in zip(keys, tiers) if t == 2][:16]
        assert len(in_ram) == 40 and len(on_nvme) == 16
        seen = _count_acquires(c)
        assert c.get_many(NS, in_ram) == [datas[k] for k in in_ram]
        assert seen["sent"] == 4 and c._ops.ram_hits  # a new client: parts, in case they come from NVMe
        assert c.get_many(NS, in_ram) == [datas[k] for k in in_ram]
        assert seen["sent"] == 5  # all in RAM last time: one Acquire of the 40
        assert c.get_many(NS, on_nvme) == [datas[k] for k in on_nvme]
        assert seen["sent"] == 6 and not c._ops.ram_hits  # these were promoted from NVMe
        assert c.get_many(NS, in_ram) == [datas[k] for k in in_ram]
        assert seen["sent"] == 10  # parts again: the daemon reads one while the client copies another


def _calls_sent(cl: Client) -> list[str]:
    """Wrap the client's control_start: the unary calls it sends ahead, in order."""
    sent: list[str] = []
    start = cl._ops.control_start

    def spy(rpc, request):
        out = start(rpc, request)
        if out is not None:
            sent.append(rpc)
        return out
    cl._ops.control_start = spy
    return sent


def _put_items(tag: str, n: int) -> list[tuple[bytes, bytes]]:
    return [(key(tag, i), os.urandom(20_000 + i)) for i in range(n)]


@pytest.mark.parametrize("control", ["auto", "grpc"])
def test_a_long_put_many_reserves_the_next_part_while_copying_this_one(daemon, control):
    items = _put_items("parts", 2 * kvclient.PUT_SPLIT_KEYS)
    with Client(daemon.address, control=control) as c:
        sent = _calls_sent(c)
        assert c.put_many(NS, items) == [True] * len(items)
        if control == "auto":  # part 2's Reserve goes out before part 1's Commit
            assert sent == ["Reserve", "Reserve", "Commit", "Commit"]
        assert c.put_many(NS, items) == [False] * len(items)  # present: nothing written, nothing to commit
        assert c.get_many(NS, [k for k, _ in items]) == [d for _, d in items]
        assert c.stats().reservations == 0
    assert kvclient._put_parts([1] * (kvclient.PUT_SPLIT_KEYS - 1)) == [(0, kvclient.PUT_SPLIT_KEYS - 1)]


def test_an_async_client_puts_in_parts_too(daemon):
    items = _put_items("async-parts", 2 * kvclient.PUT_SPLIT_KEYS + 5)

    async def main():
        async with AsyncClient(daemon.address) as a:
            assert await a.put_many(NS, items) == [True] * len(items)
            assert await a.get_many(NS, [k for k, _ in items]) == [d for _, d in items]
            assert (await a.stats()).reservations == 0
    asyncio.run(main())


@pytest.mark.parametrize("control", ["auto", "grpc"])
def test_a_put_many_failing_in_its_second_part_keeps_the_first_and_leaves_nothing_reserved(
        daemon, control, monkeypatch):
    items = _put_items("fail2", 2 * kvclient.PUT_SPLIT_KEYS)
    keys = [k for k, _ in items]
    real = kvclient._copy_all
    copies: list[int] = []

    def second_copy_fails(jobs):
        copies.append(len(jobs))
        if len(copies) == 2:
            raise OSError("copy failed")
        return real(jobs)
    monkeypatch.setattr(kvclient, "_copy_all", second_copy_fails)
    with Client(daemon.address, control=control) as c:
        with pytest.raises(OSError, match="copy failed"):
            c.put_many(NS, items)
        half = kvclient._put_parts([len(d) for _, d in items])[0][1]
        assert c.lookup(NS, keys) == ([1] * half + [0] * (len(keys) - half), half)
        assert c.stats().reservations == 0  # the second part's reservation was aborted
        monkeypatch.setattr(kvclient, "_copy_all", real)
        assert c.put_many(NS, items) == [False] * half + [True] * (len(keys) - half)


@pytest.mark.parametrize("control", ["auto", "grpc"])
def test_a_put_many_refused_in_its_second_part_keeps_the_first(daemon, control, monkeypatch):
    items = _put_items("full2", 2 * kvclient.PUT_SPLIT_KEYS)
    keys = [k for k, _ in items]
    store = daemon.daemon.store
    real, calls = store.reserve, []

    def second_reserve_refused(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise errors.ArenaFull("no room")
        return real(*a, **kw)
    monkeypatch.setattr(store, "reserve", second_reserve_refused)
    with Client(daemon.address, control=control) as c:
        with pytest.raises(errors.ResourceExhausted, match="no room"):
            c.put_many(NS, items)
        half = kvclient._put_parts([len(d) for _, d in items])[0][1]
        assert c.lookup(NS, keys)[1] == half  # the first part was committed all the same
        assert c.stats().reservations == 0


def test_a_failed_get_many_lets_go_of_every_lease(daemon):
    keys = [key("pipe-fail", i) for i in range(40)]
    datas = [os.urandom(3000) for _ in keys]
    datas[14] = os.urandom(5000)  # too big for its buffer: the second part fails while the third is in flight
    with Client(daemon.address) as c:
        c.put_many(NS, list(zip(keys, datas)))
        seen = _count_acquires(c)
        # the parts in the order sent (else the third may be answered, and copied, first)
        c._ops.control_ready = lambda handles, timeout: 0
        with pytest.raises(errors.InvalidArgument, match="buffer 4 holds 4096 bytes"):
            c.get_many(NS, keys, into=[bytearray(4096) for _ in keys])
        assert seen["sent"] == 3 and seen["in_flight"] == 0  # the third part was answered, not left
        assert _leases_drain(c) == 0  # released at once, not after ram.lease_ms
        assert c.get_many(NS, keys) == datas
