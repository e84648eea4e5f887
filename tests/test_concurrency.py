"""Several client processes against one daemon, threads sharing one client, what a killed
client leaves behind, and what a stalled inline put may (not) do to other blocks.

Blocks are derived from their keys (any process can check any block): the
key is SHA-256 of (writer, round, index), the size and the bytes come from a
PRNG seeded with the key. Each child process is a small script run with
``python -c``; it reports its counts as one JSON line.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import xxhash

from kvtier.client import Client
from kvtier.datachannel import OP_PUT, REQ, REQ_MAGIC, RESP, recv_exact
from kvtier.v1 import kvtier_pb2 as pb
from kvtier.v1 import kvtier_pb2_grpc as pb_grpc

MiB = 1 << 20
NS = "conc"

_COMMON = r'''
import hashlib, json, os, random, signal, sys, time
from kvtier.client import Client

PATHS = {"arena": dict(attach=True), "data": dict(attach=False), "grpc": dict(attach=False, data_channel=False)}

def key(writer, rnd, i):
    d = hashlib.sha256(f"{writer}/{rnd}/{i}".encode()).digest()
    return d if i % 2 else d[:16]  # 32- and 16-byte keys (one size per batch call)

def size(k):
    n = 1 + int.from_bytes(k[:4], "little") % (192 << 10)
    return n + (1 << 20) if k[4] < 24 else n  # about one in ten is over the 1 MiB gRPC chunk

def block(k):
    return random.Random(k).randbytes(size(k))
'''

WORKER = _COMMON + r'''
addr, path, me, writers, rounds, per_round = sys.argv[1:7]
writers, rounds, per_round = json.loads(writers), int(rounds), int(per_round)
ns = "conc"
out = {"path": path, "written": 0, "verified": 0, "mismatches": 0, "missing": 0}
with Client(addr, **PATHS[path]) as c:
    c.attach()
    out["client_path"] = c.path
    print("ready", flush=True)
    sys.stdin.readline()  # wait until every process is ready

    def batch(w, r, parity):
        return [key(w, r, i) for i in range(per_round) if i % 2 == parity]

    def verify(keys, wait):
        deadline = time.monotonic() + 30
        while wait:
            tiers, _ = c.lookup(ns, keys)
            if all(tiers) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for k, got in zip(keys, c.get_many(ns, keys)):
            if got is None:
                out["missing"] += 1
            elif got != block(k):
                out["mismatches"] += 1
            else:
                out["verified"] += 1

    for r in range(rounds):
        if me in writers:
            for parity in (0, 1):
                keys = batch(me, r, parity)
                stored = c.put_many(ns, [(k, block(k)) for k in keys])
                out["written"] += sum(stored)
                verify(keys, wait=False)
        for w in writers:
            if w != me:
                for parity in (0, 1):
                    verify(batch(w, r, parity), wait=True)
    # last pass: everything every writer wrote
    for w in writers:
        for r in range(rounds):
            for parity in (0, 1):
                verify(batch(w, r, parity), wait=False)
    out["checksum_failures"] = c.checksum_failures
print(json.dumps(out), flush=True)
'''


def _key(writer, rnd, i):
    d = hashlib.sha256(f"{writer}/{rnd}/{i}".encode()).digest()
    return d if i % 2 else d[:16]


def _block(k):
    n = 1 + int.from_bytes(k[:4], "little") % (192 << 10)
    n = n + MiB if k[4] < 24 else n
    return random.Random(k).randbytes(n)


def _spawn(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"child process timed out:\n{err[-3000:]}")
    return p.returncode, out, err


def test_processes_put_and_get_concurrently(make_daemon):
    d = make_daemon(ram={"capacity": "128MiB"})
    rounds, per_round = 5, 12
    # three writers, one per path, each also reading the others; two readers that only read
    procs = [("w-arena", "arena"), ("w-data", "data"), ("w-grpc", "grpc"), ("r-arena", "arena"),
             ("r-grpc", "grpc")]
    writers = [name for name, _ in procs if name.startswith("w-")]
    children = [(name, path, _spawn(WORKER, d.address, path, name, json.dumps(writers), rounds, per_round))
                for name, path in procs]
    try:
        for name, _, p in children:
            line = p.stdout.readline()
            if line.strip() != "ready":
                p.kill()
                pytest.fail(f"{name} did not start: {line!r}\n{p.stderr.read()[-3000:]}")
        for _, _, p in children:  # all start at once
            p.stdin.write("go\n")
            p.stdin.flush()
        for _, _, p in children:
            p.stdin.close()
            p.stdin = None  # communicate() below must not flush a closed pipe
        results = {}
        for name, path, p in children:
            rc, out, err = _finish(p)
            assert rc == 0, f"{name} exited {rc}:\n{err[-3000:]}"
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        for _, _, p in children:
            if p.poll() is None:
                p.kill()
                p.wait()

    per_writer = rounds * per_round
    total = per_writer * len(writers)
    for name, path, _ in children:
        r = results[name]
        assert r["client_path"] == path, r
        assert r["mismatches"] == 0, (name, r)
        assert r["missing"] == 0, (name, r)
        assert r["checksum_failures"] == 0, (name, r)
        if name in writers:
            assert r["written"] == per_writer, (name, r)
            # own blocks twice (after writing, in the last pass), the others' twice (as they come, last pass)
            assert r["verified"] == 2 * total, (name, r)
        else:
            assert r["written"] == 0
            assert r["verified"] == 2 * total, (name, r)
    # the parent sees exactly what was written, byte for byte, with no eviction
    keys = [_key(w, r, i) for w in writers for r in range(rounds) for i in range(per_round)]
    with Client(d.address) as c:
        s = c.stats(NS)
        assert s.tiers[0].evictions == 0
        assert s.namespaces[0].blocks == total and s.namespaces[0].puts == total
        assert s.leases == 0 and s.reservations == 0
        k16 = [k for k in keys if len(k) == 16]
        k32 = [k for k in keys if len(k) == 32]
        assert c.get_many(NS, k16) == [_block(k) for k in k16]
        assert c.get_many(NS, k32) == [_block(k) for k in k32]


def test_threads_share_one_client_for_unary_calls(make_daemon):
    """Threads calling Reserve/Commit/Acquire/Release/Lookup on one Client at once: each call
    borrows its own data connection, every answer is its own, and nothing is left open."""
    d = make_daemon(ram={"capacity": "128MiB"})
    threads, per_thread = 8, 25
    blocks = {_key(f"t{t}", 0, i): None for t in range(threads) for i in range(per_thread)}
    for k in blocks:
        blocks[k] = _block(k)
    keys = list(blocks)
    with Client(d.address) as c, Client(d.address, control="grpc") as g:
        c.attach()
        assert c.control == "data"

        def work(t):
            done = 0
            for k in keys[t * per_thread:(t + 1) * per_thread]:
                data = blocks[k]
                r = c.reserve(NS, [k], [len(data)])
                r.views[0][:] = data
                assert c.commit(r) == [xxhash.xxh3_128_digest(data)]
                lease = c.acquire(NS, [k], lease_ms=30_000)
                assert bytes(lease.views[0]) == data
                c.release(lease)
                assert c.lookup(NS, [k]) == ([1], 1)
                done += 1
            return done

        with ThreadPoolExecutor(threads) as pool:
            assert list(pool.map(work, range(threads))) == [per_thread] * threads
        assert 1 <= len(c._ops._pool) <= threads  # connections go back to the pool, none leak
        s = g.stats(NS)
        assert s.leases == 0 and s.reservations == 0 and s.expired_leases == 0
        assert s.namespaces[0].blocks == len(keys)
        k16 = [k for k in keys if len(k) == 16]
        k32 = [k for k in keys if len(k) == 32]
        assert g.get_many(NS, k16) == [blocks[k] for k in k16]
        assert g.get_many(NS, k32) == [blocks[k] for k in k32]


KILLED = _COMMON + r'''
addr, ns, how = sys.argv[1:4]
held = [bytes.fromhex(x) for x in sys.argv[4].split(",")]
new = [bytes.fromhex(x) for x in sys.argv[5].split(",")]
c = Client(addr)
c.attach()
t0 = time.monotonic()
res = c.reserve(ns, new, [1 << 20] * len(new), ttl_ms=500)
for v in res.views:
    v[:4096] = b"partial!" * 512  # half-written, never committed
lease = c.acquire(ns, held, lease_ms=500)
s = c.stats()
print(json.dumps({"reservations": s.reservations, "leases": s.leases, "reserved_bytes": s.tiers[0].reserved_bytes,
                  "leased_blocks": s.tiers[0].leased_blocks, "lease_tiers": list(lease.tiers),
                  "reserve_status": list(res.status), "elapsed": time.monotonic() - t0, "t0": t0}), flush=True)
if how == "self":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)  # the parent kills us
'''


@pytest.mark.parametrize("how", ["self", "parent"])
def test_killed_client_leaks_nothing(make_daemon, how):
    d = make_daemon(ram={"capacity": "8MiB", "policy": "lru"})
    held = [hashlib.sha256(f"held{i}".encode()).digest()[:16] for i in range(2)]
    new = [hashlib.sha256(f"new{i}".encode()).digest()[:16] for i in range(2)]
    keep = hashlib.sha256(b"keep").digest()[:16]
    with Client(d.address) as c:
        c.put_many(NS, [(k, bytes([i]) * MiB) for i, k in enumerate(held)] + [(keep, b"K" * MiB)])
        used = c.stats().tiers[0].used_bytes
        assert used == 3 * MiB
        mine = c.acquire(NS, [keep], lease_ms=60_000)  # a live lease held by a live client

        p = _spawn(KILLED, d.address, NS, how, ",".join(k.hex() for k in held), ",".join(k.hex() for k in new))
        line = p.stdout.readline()
        if how == "parent":
            p.send_signal(signal.SIGKILL)
        rc, _, err = _finish(p, timeout=30)
        assert rc == -signal.SIGKILL, f"child exited {rc}:\n{err[-3000:]}"
        seen = json.loads(line)
        # what the child held when it died
        assert seen["reserve_status"] == [0, 0] and seen["lease_tiers"] == [1, 1]
        if seen["elapsed"] < 0.4:  # unless the child was stalled past its own TTLs
            assert seen["reservations"] == 1 and seen["leases"] == 2  # the child's and ours
            assert seen["reserved_bytes"] == 2 * MiB and seen["leased_blocks"] == 3

        # Expired, and their slots freed. The child's reservation (500 ms, made after its t0, on
        # the same monotonic clock) expires after t0 + 0.5 s; its slots stay quarantined, still
        # reserved and used, for one more TTL, so nothing can be freed before t0 + 1 s.
        not_before = seen["t0"] + 1.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = c.stats()
            now = time.monotonic()
            t = s.tiers[0]
            if now < not_before:
                assert t.reserved_bytes == 2 * MiB and t.used_bytes == used + 2 * MiB, \
                    "an expired reservation's slots were freed before one more TTL"
            if s.reservations == 0 and s.leases == 1 and t.reserved_bytes == 0 and t.used_bytes == used:
                break
            time.sleep(0.02)
        assert now > not_before
        s = c.stats()
        t = s.tiers[0]
        assert s.reservations == 0 and s.expired_reservations == 1
        assert s.leases == 1 and s.expired_leases == 1  # only ours is left
        assert t.reserved_bytes == 0 and t.leased_blocks == 1
        assert t.used_bytes == used  # the reserved slots were freed
        assert c.lookup(NS, new) == ([0, 0], 0)  # the uncommitted put never appears

        # the formerly leased blocks can be evicted again; the block we still lease cannot
        for i in range(10):
            c.put(NS, hashlib.sha256(f"fill{i}".encode()).digest()[:16], bytes([i]) * MiB)
        s = c.stats()
        assert s.tiers[0].evictions >= 2
        assert c.lookup(NS, held) == ([0, 0], 0)
        assert c.lookup(NS, [keep]) == ([1], 1)
        assert bytes(mine.views[0]) == b"K" * MiB
        c.release(mine)
        assert c.stats().leases == 0


@pytest.mark.parametrize("path", ["grpc", "data"])
def test_stalled_inline_put_never_writes_into_another_block(make_daemon, path):
    """An inline put (gRPC stream or data channel) stalls mid-payload for several reservation
    TTLs while other blocks are stored; when its bytes finally arrive they must not land in
    any other block's slot. Inline puts use reservations that never expire (the daemon ends
    them itself), so the stalled put still succeeds, whole."""
    ttl_ms = 200
    d = make_daemon(ram={"reservation_ms": ttl_ms})
    n = 64 << 10
    slow_key = hashlib.sha256(b"slow").digest()[:16]
    victims = {hashlib.sha256(f"victim{i}".encode()).digest()[:16]: bytes([65 + i]) * n for i in range(4)}
    with Client(d.address) as c:

        def stall_then_store_others():
            time.sleep(3 * ttl_ms / 1000)
            s = c.stats()  # the stalled put's reservation is still live, not expired
            assert s.reservations == 1 and s.expired_reservations == 0
            assert s.tiers[0].reserved_bytes == n
            assert c.put_many(NS, list(victims.items())) == [True] * len(victims)

        if path == "grpc":
            def chunks():
                yield pb.PutChunk(header=pb.PutHeader(namespace=NS, key=slow_key, length=n), data=b"S" * (n // 2))
                stall_then_store_others()
                yield pb.PutChunk(data=b"S" * (n - n // 2))

            with grpc.insecure_channel(d.address) as ch:
                r = pb_grpc.KVTierStub(ch).Put(chunks(), timeout=30)
                assert r.stored == 1 and r.status == b"\x00" and r.checksums == xxhash.xxh3_128_digest(b"S" * n)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect(c.info.data_address[len("unix://"):])
                s.sendall(REQ.pack(REQ_MAGIC, OP_PUT, 0, len(NS), 16, n, 1) + NS.encode() + slow_key
                          + b"S" * (n // 2))
                stall_then_store_others()
                s.sendall(b"S" * (n - n // 2))
                head = bytearray(RESP.size)
                recv_exact(s, memoryview(head))
                _, status, _, _, _, req_id, digest = RESP.unpack(head)
                assert (status, req_id, digest) == (0, 1, xxhash.xxh3_128_digest(b"S" * n))
            finally:
                s.close()
        # every other block is intact ...
        assert c.get_many(NS, list(victims)) == list(victims.values())
        assert c.checksum_failures == 0
        # ... and the stalled block is whole
        assert c.get(NS, slow_key) == b"S" * n
        # it ended with the put, never expired: nothing left reserved or quarantined
        s = c.stats()
        assert s.reservations == 0 and s.expired_reservations == 0 and s.tiers[0].reserved_bytes == 0
        assert s.tiers[0].used_bytes == 5 * n
