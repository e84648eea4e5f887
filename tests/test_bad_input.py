"""Bad input gets a clear gRPC status, changes nothing, and the daemon serves on.

Each case is sent twice where a client API exists: as a raw call (exact
``grpc.StatusCode``) and through ``kvtier.client.Client`` (the typed
``kvtier.errors`` exception). Cases on the ``env`` fixture run once per
transport of unary calls: gRPC, and CALL frames on the data channel. Around
each case the daemon's Stats (less uptime and lookup counters) and a Lookup of
known keys are compared, and afterwards a fresh client stores and reads a
block.
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import time

import grpc
import pytest
import xxhash
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier import errors
from kvtier.client import Client, Lease, Reservation
from kvtier.datachannel import (F_CHECKSUM, OP_CALL, OP_GET, OP_PING, OP_PUT, REQ, REQ_MAGIC, RESP,
                                RESP_MAGIC, DataConnection, recv_exact)
from kvtier.v1 import kvtier_pb2 as pb
from kvtier.v1 import kvtier_pb2_grpc as pb_grpc

MiB = 1 << 20
NS = "bad-input"
SC = grpc.StatusCode

PATHS = {
    "arena": dict(attach=True),
    "data": dict(attach=False),
    "grpc": dict(attach=False, data_channel=False),
}
path_param = pytest.mark.parametrize("path", list(PATHS))


def key(*parts, size: int = 16) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()[:size]


SEED_KEYS = [key("seed", i) for i in range(4)]
SEED_DATA = [bytes([65 + i]) * (1000 * (i + 1)) for i in range(4)]


class Env:
    """A daemon with a few committed blocks, a raw stub and a client; unary calls of both go over
    ``transport`` ("grpc", or "data": CALL frames on the data channel)."""

    def __init__(self, daemon, transport: str = "grpc"):
        self.daemon = daemon
        self.address = daemon.address
        self.transport = transport
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", 256 * MiB), ("grpc.max_receive_message_length", 256 * MiB)])
        self.stub = pb_grpc.KVTierStub(self.channel)
        self.client = Client(self.address, control="grpc" if transport == "grpc" else "auto")
        self.client.put_many(NS, list(zip(SEED_KEYS, SEED_DATA)))
        self.info = self.client.info
        assert self.client.control == ("grpc" if transport == "grpc" else "data")
        self.data = DataConnection(self.info.data_address) if transport == "data" else None

    def close(self):
        self.client.close()
        self.channel.close()
        if self.data is not None:
            self.data.close()

    def snapshot(self):
        s = MessageToDict(self.stub.Stats(pb.StatsRequest(), timeout=10))
        s.pop("uptimeS", None)
        for n in s.get("namespaces", []):
            n.pop("lookups", None)
        r = self.stub.Lookup(pb.LookupRequest(namespace=NS, key_size=16, keys=b"".join(SEED_KEYS)), timeout=10)
        return s, r.tiers, r.prefix_len

    def code(self, rpc: str, request) -> grpc.StatusCode:
        """Status code of a raw call that must fail."""
        if self.data is not None and rpc not in ("Get", "Put"):  # the streams stay on gRPC
            with pytest.raises(errors.KvtierError) as e:
                self.data.call(rpc, request.SerializeToString(), timeout=10)
            assert str(e.value) != e.value.code.name, "an error status must say what is wrong"
            return e.value.code
        fn = getattr(self.stub, rpc)
        with pytest.raises(grpc.RpcError) as e:
            if rpc == "Get":
                list(fn(request, timeout=10))
            elif rpc == "Put":
                fn(iter(request), timeout=10)
            else:
                fn(request, timeout=10)
        assert e.value.details(), "an error status must say what is wrong"
        return e.value.code()

    def settled(self):
        """The daemon's state once this client's own calls have landed: a get's Release is posted
        on the data channel and not waited for, so its lease may still be open just after."""
        deadline = time.monotonic() + 10
        while self.stub.Stats(pb.StatsRequest(), timeout=10).leases and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.snapshot()

    @contextlib.contextmanager
    def unchanged(self):
        before = self.settled()
        yield
        assert self.snapshot() == before, "a failed call changed the daemon's state"
        self.assert_serving()

    def assert_serving(self):
        with grpc.insecure_channel(self.address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        for path in ("arena", "grpc"):
            with Client(self.address, **PATHS[path]) as c:
                k = key("probe", path, time.monotonic_ns())
                assert c.put("probe", k, b"still serving") is True
                assert c.get("probe", k) == b"still serving"
                assert c.get_many(NS, SEED_KEYS) == SEED_DATA


def _env(d, transport: str):
    e = Env(d, transport)
    yield e
    e.close()


@pytest.fixture(params=["grpc", "data"])
def env(daemon, request):
    yield from _env(daemon, request.param)


@pytest.fixture(params=["grpc", "data"])
def sync_env(make_daemon, request):
    """env on a daemon that checks client checksums before a commit answers (ram.verify_on_commit =
    "sync"); the default, "background", trusts them and drops a mismatching block afterwards
    (tests/test_commit_verify.py)."""
    yield from _env(make_daemon(ram={"verify_on_commit": "sync"}), request.param)


def batch_requests(ns: str, key_size: int, keys: bytes):
    """One request of every batch RPC, with the given namespace and keys."""
    n = max(1, len(keys) // key_size) if key_size else 1
    return [
        ("Lookup", pb.LookupRequest(namespace=ns, key_size=key_size, keys=keys)),
        ("Reserve", pb.ReserveRequest(namespace=ns, key_size=key_size, keys=keys, sizes=[100] * n)),
        ("Acquire", pb.AcquireRequest(namespace=ns, key_size=key_size, keys=keys)),
        ("Get", pb.GetRequest(namespace=ns, key_size=key_size, keys=keys)),
        ("Delete", pb.DeleteRequest(namespace=ns, key_size=key_size, keys=keys)),
        ("Pin", pb.PinRequest(namespace=ns, key_size=key_size, keys=keys)),
        ("Unpin", pb.UnpinRequest(namespace=ns, key_size=key_size, keys=keys)),
    ]


def put_stream(ns: str, k: bytes, data: bytes, length: int | None = None, checksum: bytes = b""):
    return [pb.PutChunk(header=pb.PutHeader(namespace=ns, key=k, length=len(data) if length is None else length,
                                            checksum=checksum), data=data)]


# ---- keys and batches ------------------------------------------------------------------------

@pytest.mark.parametrize("bad_len", [0, 1, 15, 17, 31, 33, 64])
def test_wrong_key_length(env, bad_len):
    k = b"k" * bad_len
    with env.unchanged():
        assert env.code("Put", put_stream(NS, k, b"data")) == SC.INVALID_ARGUMENT
        if bad_len:
            # as a batch of one key whose declared size is its length
            for rpc, req in batch_requests(NS, bad_len, k):
                assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc
        if bad_len % 16:
            # or declared as 16-byte keys
            for rpc, req in batch_requests(NS, 16, k):
                assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc


@path_param
def test_wrong_key_length_client(env, path):
    with env.unchanged(), Client(env.address, **PATHS[path]) as c:
        with pytest.raises(errors.InvalidArgument):
            c.put(NS, b"short-key", b"data")
        with pytest.raises(errors.InvalidArgument):
            c.get(NS, b"k" * 20)
        with pytest.raises(errors.BadKey):
            c.lookup(NS, [b"k" * 15])
        with pytest.raises(errors.BadKey):
            c.lookup(NS, [key("a"), key("b", size=32)])  # mixed sizes in one batch


@pytest.mark.parametrize("key_size", [0, 1, 8, 20, 24, 48, 64])
def test_key_size_not_16_or_32(env, key_size):
    keys = b"k" * 192  # a multiple of every size tried
    with env.unchanged():
        for rpc, req in batch_requests(NS, key_size, keys):
            assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc


@pytest.mark.parametrize("key_size,n", [(16, 40), (16, 15), (16, 17), (32, 16), (32, 48), (32, 33)])
def test_keys_not_a_multiple_of_key_size(env, key_size, n):
    with env.unchanged():
        for rpc, req in batch_requests(NS, key_size, b"k" * n):
            assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc


def test_empty_batch(env):
    with env.unchanged():
        for ks in (16, 32):
            for rpc, req in batch_requests(NS, ks, b""):
                assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc
        with pytest.raises(errors.BadKey):
            env.client.reserve(NS, [], [])
        with pytest.raises(errors.BadKey):
            env.client.acquire(NS, [])


@pytest.mark.parametrize("transport", ["grpc", "data"])
def test_batch_over_max_batch(make_daemon, transport):
    e = Env(make_daemon(server={"max_batch": 16}), transport)
    try:
        over = b"".join(key("over", i) for i in range(17))
        with e.unchanged():
            for rpc, req in batch_requests(NS, 16, over):
                assert e.code(rpc, req) == SC.INVALID_ARGUMENT, rpc
            keys = [key("over", i) for i in range(17)]
            with pytest.raises(errors.InvalidArgument):
                e.client.reserve(NS, keys, [10] * 17)  # reserve is one call: not split
            with pytest.raises(errors.InvalidArgument):
                e.client.acquire(NS, keys)
        # exactly max_batch is fine, and the batching client calls split longer batches
        r = e.stub.Lookup(pb.LookupRequest(namespace=NS, key_size=16, keys=over[:16 * 16]))
        assert len(r.tiers) == 16
        assert e.client.lookup(NS, SEED_KEYS + keys) == ([1] * 4 + [0] * 17, 4)
    finally:
        e.close()


# ---- namespaces ---------------------------------------------------------------------------------

BAD_NAMESPACES = ["", "Upper", "a" * 65, "a/b", "/abs", "ñame", "名前", "a b", "-lead", "_lead", ".dot",
                  "a\x00b", "tab\t", "..", "ns:x"]


@pytest.mark.parametrize("ns", BAD_NAMESPACES, ids=lambda s: ascii(s)[1:-1][:20] or "empty")
def test_malformed_namespace(env, ns):
    k = key("ns-test")
    with env.unchanged():
        for rpc, req in batch_requests(ns, 16, k):
            assert env.code(rpc, req) == SC.INVALID_ARGUMENT, rpc
        assert env.code("Put", put_stream(ns, k, b"data")) == SC.INVALID_ARGUMENT
        if ns:  # an empty Stats namespace means "all namespaces"
            assert env.code("Stats", pb.StatsRequest(namespace=ns)) == SC.INVALID_ARGUMENT
        c = env.client
        for call in (lambda: c.put(ns, k, b"data"), lambda: c.get(ns, k), lambda: c.lookup(ns, [k])):
            with pytest.raises(errors.BadNamespace):
                call()
        for call in (lambda: c.reserve(ns, [k], [10]), lambda: c.acquire(ns, [k]), lambda: c.delete(ns, [k]),
                     lambda: c.pin(ns, [k]), lambda: c.unpin(ns, [k])):
            with pytest.raises(errors.InvalidArgument):
                call()
        if ns:
            with pytest.raises(errors.InvalidArgument):
                c.stats(ns)
        for path in ("data", "grpc"):
            with Client(env.address, **PATHS[path]) as c2:
                with pytest.raises(errors.BadNamespace):
                    c2.put(ns, k, b"data")


def test_namespace_length_boundary(env):
    ok = "a" * 64
    k = key("boundary")
    assert env.client.put(ok, k, b"x") is True
    assert env.client.get(ok, k) == b"x"
    with env.unchanged():
        assert env.code("Lookup", pb.LookupRequest(namespace=ok + "a", key_size=16, keys=k)) == SC.INVALID_ARGUMENT


# ---- sizes --------------------------------------------------------------------------------------

@path_param
def test_block_larger_than_arena(env, path):
    too_big = env.info.arena_size  # more than the slot region
    assert env.info.max_block_bytes < too_big
    k = key("huge")
    with env.unchanged():
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=k,
                                                     sizes=[too_big])) == SC.RESOURCE_EXHAUSTED
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=k + key("small"),
                                                     sizes=[10, 1 << 40])) == SC.RESOURCE_EXHAUSTED
        assert env.code("Put", put_stream(NS, k, b"x", length=too_big)) == SC.RESOURCE_EXHAUSTED
        if path == "arena":
            with pytest.raises(errors.ResourceExhausted):
                env.client.reserve(NS, [k], [too_big])


@path_param
def test_block_larger_than_max_block_bytes(make_daemon, path):
    limit = 64 << 10
    e = Env(make_daemon(ram={"max_block_bytes": "64KiB"}))
    try:
        assert e.info.max_block_bytes == limit
        k = key("max-block", path)
        with e.unchanged():
            assert e.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=k,
                                                       sizes=[limit + 1])) == SC.RESOURCE_EXHAUSTED
            assert e.code("Put", put_stream(NS, k, b"x", length=limit + 1)) == SC.RESOURCE_EXHAUSTED
            with Client(e.address, **PATHS[path]) as c:
                # the data path refuses before sending (TooLarge); the others get RESOURCE_EXHAUSTED
                refused = errors.TooLarge if path == "data" else errors.ResourceExhausted
                with pytest.raises(refused) as exc:
                    c.put(NS, k, b"x" * (limit + 1))
                assert exc.value.code == SC.RESOURCE_EXHAUSTED
                # far more than any socket buffer holds: still refused with RESOURCE_EXHAUSTED
                with pytest.raises(refused) as exc:
                    c.put(NS, k, b"x" * (32 * MiB))
                assert exc.value.code == SC.RESOURCE_EXHAUSTED
                assert c.path == path
        # exactly max_block_bytes is accepted
        with Client(e.address, **PATHS[path]) as c:
            assert c.put(NS, k, b"y" * limit) is True
            assert c.get(NS, k) == b"y" * limit
    finally:
        e.close()


@path_param
def test_size_zero(env, path):
    k = key("zero", path)
    with env.unchanged():
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=k, sizes=[0])) \
            == SC.INVALID_ARGUMENT
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=k + key("z2"),
                                                     sizes=[4096, 0])) == SC.INVALID_ARGUMENT
        assert env.code("Put", put_stream(NS, k, b"")) == SC.INVALID_ARGUMENT
        with Client(env.address, **PATHS[path]) as c:
            with pytest.raises(errors.InvalidArgument):
                c.put(NS, k, b"")


@pytest.mark.parametrize("n_sizes", [0, 1, 3])
def test_sizes_count_differs_from_keys_count(env, n_sizes):
    keys = [key("cnt", 0), key("cnt", 1)]
    with env.unchanged():
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=b"".join(keys),
                                                     sizes=[100] * n_sizes)) == SC.INVALID_ARGUMENT
        with pytest.raises(errors.InvalidArgument):
            env.client.reserve(NS, keys, [100] * n_sizes)


def test_ttl_out_of_range(env):
    k = SEED_KEYS[0]
    too_long = 600_001
    with env.unchanged():
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=key("ttl"), sizes=[10],
                                                     ttl_ms=too_long)) == SC.INVALID_ARGUMENT
        assert env.code("Acquire", pb.AcquireRequest(namespace=NS, key_size=16, keys=k,
                                                     lease_ms=too_long)) == SC.INVALID_ARGUMENT
        with pytest.raises(errors.InvalidArgument):
            env.client.acquire(NS, [k], lease_ms=too_long)
        # beyond the 32-bit fields: the client says which argument, rather than protobuf's ValueError
        for call, arg in ((lambda v: env.client.acquire(NS, [k], lease_ms=v), "lease_ms"),
                          (lambda v: env.client.acquire(NS, [k], tokens_per_key=v), "tokens_per_key"),
                          (lambda v: env.client.reserve(NS, [key("ttl")], [10], ttl_ms=v), "ttl_ms"),
                          (lambda v: env.client.pin(NS, [k], ttl_s=v), "ttl_s")):
            for v in (1 << 32, -1):
                with pytest.raises(errors.InvalidArgument, match=arg):
                    call(v)


# ---- reservations ---------------------------------------------------------------------------------

def _reserve_written(env, k, data, ttl_ms=0):
    r = env.client.reserve(NS, [k], [len(data)], ttl_ms=ttl_ms)
    r.views[0][:] = data
    return r


def test_commit_unknown_reservation(env):
    with env.unchanged():
        for rid in (0, 1, 12345, (1 << 64) - 1):
            assert env.code("Commit", pb.CommitRequest(reservation_id=rid)) == SC.NOT_FOUND
        with pytest.raises(errors.NotFound):
            env.client.commit(Reservation(12345, b"\x00", [4096], [10]))


def test_commit_expired_reservation(env):
    k = key("expired-res")
    before = env.snapshot()
    used = env.client.stats().tiers[0].used_bytes
    t0 = time.monotonic()
    r = _reserve_written(env, k, b"too late", ttl_ms=1000)
    assert env.client.stats().reservations == 1
    time.sleep(1.3)
    # expired: unknown (NOT_FOUND), never FAILED_PRECONDITION
    assert env.code("Commit", pb.CommitRequest(reservation_id=r.id)) == SC.NOT_FOUND
    with pytest.raises(errors.NotFound) as e:
        env.client.commit(r)
    assert e.value.code == SC.NOT_FOUND
    assert env.code("Abort", pb.AbortRequest(reservation_id=r.id)) == SC.NOT_FOUND
    s = env.client.stats()
    assert s.reservations == 0 and s.expired_reservations == 1
    assert env.client.lookup(NS, [k]) == ([0], 0)
    # The reservation expired after t0 + 1 s, so its slot stays quarantined (reserved, used, not
    # handed out) until at least t0 + 2 s. The key itself is no longer pending.
    r2 = env.client.reserve(NS, [k], [8])
    t2 = env.client.stats().tiers[0]
    in_quarantine = time.monotonic() < t0 + 2.0
    assert r2.status == b"\x00"
    if in_quarantine:
        assert r2.offsets[0] != r.offsets[0], "an expired reservation's slot was reused at once"
        assert (t2.reserved_bytes, t2.used_bytes) == (2 * 4096, used + 2 * 4096)
    env.client.abort(r2)  # an abort frees at once
    # then the quarantined slot is freed too; nothing else moved
    deadline = time.monotonic() + 10
    while True:
        after = env.snapshot()
        freed_at = time.monotonic()
        after[0].pop("expiredReservations")
        if after == before or freed_at > deadline:
            break
        time.sleep(0.05)
    assert after == before
    assert freed_at > t0 + 2.0, "the slot was freed before one more TTL had passed"
    env.assert_serving()


def test_double_commit_is_rejected_and_changes_nothing(env):
    k = key("double")
    r = _reserve_written(env, k, b"first")
    env.client.commit(r)
    with env.unchanged():
        assert env.code("Commit", pb.CommitRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        assert env.code("Abort", pb.AbortRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        with pytest.raises(errors.FailedPrecondition):
            env.client.commit(r)
        with pytest.raises(errors.FailedPrecondition):
            env.client.abort(r)
    assert env.client.get(NS, k) == b"first"


@pytest.mark.parametrize("first", ["commit", "abort"])
def test_commit_of_ended_reservation_is_failed_precondition(env, first):
    r = _reserve_written(env, key("ended", first), b"bytes")
    if first == "commit":
        env.client.commit(r)
    else:
        env.client.abort(r)
    with env.unchanged():
        assert env.code("Commit", pb.CommitRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        assert env.code("Abort", pb.AbortRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        with pytest.raises(errors.FailedPrecondition):
            env.client.commit(r)
        with pytest.raises(errors.FailedPrecondition):
            env.client.abort(r)
    assert env.client.lookup(NS, [key("ended", first)]) == (([1], 1) if first == "commit" else ([0], 0))


def test_abort_unknown_reservation(env):
    with env.unchanged():
        for rid in (0, 777, (1 << 64) - 1):
            assert env.code("Abort", pb.AbortRequest(reservation_id=rid)) == SC.NOT_FOUND
        with pytest.raises(errors.NotFound):
            env.client.abort(Reservation(777, b"\x00", [4096], [10]))


def test_wrong_checksum_length_at_commit(env):
    keys = [key("cslen", 0), key("cslen", 1)]
    datas = [b"one" * 100, b"two" * 100]
    r = env.client.reserve(NS, keys, [len(d) for d in datas])
    for v, d in zip(r.views, datas):
        v[:] = d
    with env.unchanged():  # the reservation stays open, nothing is committed
        for bad in (b"\x00" * 15, b"\x00" * 16, b"\x00" * 17, b"\x00" * 33):
            assert env.code("Commit", pb.CommitRequest(reservation_id=r.id, checksums=bad)) \
                == SC.INVALID_ARGUMENT
        with pytest.raises(errors.InvalidArgument):
            env.client.commit(r, [b"\x00" * 15, b"\x00" * 16])
        assert env.code("Put", put_stream(NS, key("cslen", 2), b"abc", checksum=b"\x01" * 15)) \
            == SC.INVALID_ARGUMENT
        assert env.client.lookup(NS, keys) == ([0, 0], 0)
    # the same reservation can still be committed correctly
    assert env.client.commit(r, [xxhash.xxh3_128_digest(d) for d in datas]) == \
        [xxhash.xxh3_128_digest(d) for d in datas]
    assert env.client.get_many(NS, keys) == datas


def test_checksum_mismatch_at_commit(sync_env):
    env = sync_env
    k = key("mismatch")
    data = b"payload" * 1000
    with env.unchanged():
        r = _reserve_written(env, k, data)
        assert env.code("Commit", pb.CommitRequest(reservation_id=r.id, checksums=b"\x00" * 16)) == SC.DATA_LOSS
        # the mismatch aborted the reservation: a second try is FAILED_PRECONDITION, commits nothing
        assert env.code("Commit", pb.CommitRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        assert env.code("Abort", pb.AbortRequest(reservation_id=r.id)) == SC.FAILED_PRECONDITION
        r = _reserve_written(env, k, data)
        with pytest.raises(errors.DataLoss):
            env.client.commit(r, [xxhash.xxh3_128_digest(data + b"!")])
        # inline put with a wrong checksum in its header
        assert env.code("Put", put_stream(NS, k, data, checksum=xxhash.xxh3_128_digest(b"other"))) \
            == SC.DATA_LOSS
        assert env.client.lookup(NS, [k]) == ([0], 0)


def test_stale_arena_generation(env):
    gen = env.info.generation
    wrong = gen + 2  # nonzero, and not the daemon's
    k = SEED_KEYS[0]
    with env.unchanged():
        assert env.code("Reserve", pb.ReserveRequest(namespace=NS, key_size=16, keys=key("stale"), sizes=[10],
                                                     generation=wrong)) == SC.ABORTED
        assert env.code("Acquire", pb.AcquireRequest(namespace=NS, key_size=16, keys=k,
                                                     generation=wrong)) == SC.ABORTED
    # a client whose mapping names another generation re-attaches by itself, in the single-step
    # calls too (the daemon refused the stale one with ABORTED), and the call then goes through
    with Client(env.address) as c:
        c.attach()
        c._ops.arena.generation = wrong
        r = c.reserve(NS, [key("stale")], [10])
        assert r.status == b"\x00" and c.info.generation == gen and c._ops.arena.generation == gen
        c.abort(r)
        c._ops.arena.generation = wrong
        lease = c.acquire(NS, [k])
        assert lease.tiers == b"\x01" and bytes(lease.views[0]) == SEED_DATA[0]
        assert c.info.generation == gen and c._ops.arena.generation == gen
        c.release(lease)
    assert env.client.stats().reservations == 0 and env.client.stats().leases == 0
    # generation 0 is unchecked; the right one is accepted
    r = env.stub.Acquire(pb.AcquireRequest(namespace=NS, key_size=16, keys=k, generation=gen))
    env.stub.Release(pb.ReleaseRequest(lease_id=r.lease_id))
    # and put/get re-attach by themselves
    with Client(env.address) as c:
        c.attach()
        c._ops.arena.generation = wrong
        assert c.get(NS, k) == SEED_DATA[0]
        assert c.info.generation == gen


# ---- leases ---------------------------------------------------------------------------------------

def test_release_unknown_lease(env):
    with env.unchanged():
        for lid in (0, 4242, (1 << 64) - 1):
            assert env.code("Release", pb.ReleaseRequest(lease_id=lid)) == SC.NOT_FOUND
        with pytest.raises(errors.NotFound):
            env.client.release(Lease(4242, b"\x01", [4096], [1], [b"\x00" * 16]))
    # releasing twice: the second is unknown
    lease = env.client.acquire(NS, SEED_KEYS[:1])
    env.client.release(lease)
    with env.unchanged():
        with pytest.raises(errors.NotFound):
            env.client.release(lease)


def test_release_expired_lease(env):
    lease = env.client.acquire(NS, SEED_KEYS[:2], lease_ms=1000)
    s = env.client.stats()
    assert s.leases == 1 and s.tiers[0].leased_blocks == 2
    time.sleep(1.3)
    assert env.code("Release", pb.ReleaseRequest(lease_id=lease.id)) == SC.NOT_FOUND
    with pytest.raises(errors.NotFound):
        env.client.release(lease)
    s = env.client.stats()
    assert s.leases == 0 and s.expired_leases == 1 and s.tiers[0].leased_blocks == 0
    assert env.client.get_many(NS, SEED_KEYS) == SEED_DATA
    env.assert_serving()


# ---- a full arena that cannot evict -------------------------------------------------------------

@path_param
def test_full_arena_pinned_or_leased(make_daemon, path):
    d = make_daemon(ram={"capacity": "8MiB", "policy": "lru", "max_pinned": 1.0})  # half of it pinned
    with Client(d.address) as c, grpc.insecure_channel(d.address) as ch:
        stub = pb_grpc.KVTierStub(ch)
        region = c.stats().tiers[0].capacity_bytes
        keys = [key("full", i) for i in range(8)]
        sizes = [MiB] * 7 + [region - 7 * MiB]  # exactly fills the slot region
        c.put_many(NS, [(k, bytes([i]) * n) for i, (k, n) in enumerate(zip(keys, sizes))])
        t = c.stats().tiers[0]
        assert t.used_bytes == region and t.largest_free_bytes == 0 and t.evictions == 0
        assert c.pin(NS, keys[:4]) == [True] * 4
        lease = c.acquire(NS, keys[4:])

        def snap():
            s = MessageToDict(c.stats())
            s.pop("uptimeS")
            return s

        before = snap()
        k = key("no-room", path)
        req = pb.ReserveRequest(namespace=NS, key_size=16, keys=k, sizes=[1])
        with pytest.raises(grpc.RpcError) as e:
            stub.Reserve(req)
        assert e.value.code() == SC.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:
            stub.Put(iter(put_stream(NS, k, b"x")))
        assert e.value.code() == SC.RESOURCE_EXHAUSTED
        with Client(d.address, **PATHS[path]) as c2:
            with pytest.raises(errors.ResourceExhausted):
                c2.put(NS, k, b"x" * 5000)
        assert snap() == before, "a failed put evicted or changed something"
        assert c.lookup(NS, keys) == ([1] * 8, 8)
        # releasing the lease makes those blocks evictable; the pinned ones stay
        c.release(lease)
        assert c.put(NS, k, b"x" * 5000) is True
        assert c.stats().tiers[0].evictions >= 1
        tiers, _ = c.lookup(NS, keys)
        assert tiers[:4] == [1] * 4


def test_full_arena_all_or_nothing_batch(make_daemon):
    d = make_daemon(ram={"capacity": "8MiB"})
    with Client(d.address) as c:
        region = c.stats().tiers[0].capacity_bytes
        res = c.reserve(NS, [key("hog")], [region - 2 * MiB])  # reserved space is not evictable
        before = c.stats().tiers[0]
        with pytest.raises(errors.ResourceExhausted):
            c.reserve(NS, [key("fits"), key("does-not-fit")], [MiB, 2 * MiB])
        after = c.stats().tiers[0]
        assert (after.used_bytes, after.reserved_bytes) == (before.used_bytes, before.reserved_bytes)
        assert c.stats().reservations == 1
        c.abort(res)
        r2 = c.reserve(NS, [key("fits"), key("does-not-fit")], [MiB, 2 * MiB])
        assert r2.status == b"\x00\x00"
        c.abort(r2)


# ---- gRPC message size ------------------------------------------------------------------------------

def test_oversized_grpc_message(make_daemon):
    e = Env(make_daemon(server={"max_message_bytes": "1MiB"}))
    try:
        assert e.info.max_message_bytes == MiB
        k = key("oversized")
        with e.unchanged():
            assert e.code("Put", put_stream(NS, k, b"x" * (MiB + 1))) == SC.RESOURCE_EXHAUSTED
            many = b"".join(key("m", i) for i in range(70_000))  # 1.1 MB of keys
            assert e.code("Lookup", pb.LookupRequest(namespace=NS, key_size=16, keys=many)) == SC.RESOURCE_EXHAUSTED
            with pytest.raises(errors.ResourceExhausted):
                e.client.reserve(NS, [key("m", i) for i in range(70_000)], [10] * 70_000)
            assert e.client.lookup(NS, [k]) == ([0], 0)
        # blocks bigger than a message still travel: Get chunks within the limit
        big = bytes(range(256)) * (3 * MiB // 256)
        e.client.put(NS, k, big)
        with Client(e.address, attach=False, data_channel=False) as g:
            assert g.get(NS, k) == big
    finally:
        e.close()


def test_answers_larger_than_the_request_limit_are_sent(make_daemon):
    """max_message_bytes bounds what a caller sends (read before its token is checked), not what
    the daemon answers: a Stats of many namespaces (20 to 70 bytes each) past it failed
    RESOURCE_EXHAUSTED, with the 4 MiB default past some 60,000 namespaces."""
    d = make_daemon(server={"max_message_bytes": "64KiB"})
    with Client(d.address, attach=False) as c:
        for i in range(4000):
            c.put(f"ns-{i:05d}", key("s", i), b"x")
        with Client(d.address, attach=False, data_channel=False) as g:
            got = g.stats()
        assert got.ByteSize() > 64 << 10 and len(got.namespaces) == 4000


def test_grpc_put_respects_advertised_max_message_bytes(make_daemon):
    d = make_daemon(server={"max_message_bytes": "1MiB"})
    big = bytes(range(256)) * (3 * MiB // 256)
    with Client(d.address, attach=False, data_channel=False) as g:
        assert g.put(NS, key("chunked"), big) is True
        assert g.get(NS, key("chunked")) == big
        # several multi-chunk blocks in one stream: per-block status, in order
        other = big[::-1]
        assert g.put_many(NS, [(key("chunked-2"), other), (key("chunked"), big)]) == [True, False]
        assert g.get_many(NS, [key("chunked"), key("chunked-2")]) == [big, other]


# ---- the data channel ---------------------------------------------------------------------------------

def _data_sock(env) -> socket.socket:
    addr = env.info.data_address
    assert addr.startswith("unix://")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr[len("unix://"):])
    return s


def _request(op, ns: bytes, k: bytes, length=0, req_id=1, flags=0, magic=REQ_MAGIC, extra=b""):
    return REQ.pack(magic, op, flags, len(ns), len(k), length, req_id) + ns + k + extra


def _response(s):
    head = bytearray(RESP.size)
    recv_exact(s, memoryview(head))
    magic, status, info, msg_len, length, rid, digest = RESP.unpack(head)
    msg = bytearray(msg_len)
    if msg_len:
        recv_exact(s, memoryview(msg))
    return magic, status, info, msg.decode(), length, rid, digest


def _closed(s) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _ping_ok(s, req_id=99):
    s.sendall(_request(OP_PING, b"", b"", req_id=req_id))
    magic, status, *_, rid, _ = _response(s)
    return magic == RESP_MAGIC and status == 0 and rid == req_id


@pytest.mark.parametrize("frame", ["bad-magic", "unknown-op", "zero-op"])
def test_data_channel_bad_frame(env, frame):
    magic, op = (b"XXXX", OP_PUT) if frame == "bad-magic" else (REQ_MAGIC, 9 if frame == "unknown-op" else 0)
    with env.unchanged():
        s = _data_sock(env)
        try:
            s.sendall(_request(op, NS.encode(), key("f"), length=10, req_id=7, magic=magic) + b"x" * 10)
            rmagic, status, _, msg, _, rid, _ = _response(s)
            assert rmagic == RESP_MAGIC and rid == 7
            assert status == SC.INVALID_ARGUMENT.value[0]
            assert "bad frame" in msg
            assert _closed(s), "the connection must close after a framing error"
        finally:
            s.close()


def test_data_channel_oversized_put_length(env):
    with env.unchanged():
        s = _data_sock(env)
        try:
            s.sendall(_request(OP_PUT, NS.encode(), key("big"), length=env.info.max_block_bytes + 1, req_id=3))
            _, status, _, msg, _, rid, _ = _response(s)
            assert status == SC.RESOURCE_EXHAUSTED.value[0] and rid == 3
            assert str(env.info.max_block_bytes) in msg
            assert _closed(s)
        finally:
            s.close()


@pytest.mark.parametrize("ns", ["Bad/NS", "", "ñame", "a" * 65])
def test_data_channel_invalid_namespace(env, ns):
    nsb = ns.encode()
    s = _data_sock(env)
    try:
        with env.unchanged():
            s.sendall(_request(OP_PUT, nsb, key("dns"), length=10, req_id=1) + b"0123456789")
            _, status, _, msg, _, rid, _ = _response(s)
            assert status == SC.INVALID_ARGUMENT.value[0] and rid == 1 and "namespace" in msg
            s.sendall(_request(OP_GET, nsb, key("dns"), req_id=2))
            _, status, _, _, length, rid, _ = _response(s)
            assert status == SC.INVALID_ARGUMENT.value[0] and rid == 2 and length == 0
            # the payload was drained: the connection is still in sync
            assert _ping_ok(s)
        # and still serves a valid request
        s.sendall(_request(OP_GET, NS.encode(), SEED_KEYS[1], req_id=5))
        _, status, info, _, length, rid, digest = _response(s)
        assert (status, info, length, rid) == (0, 1, len(SEED_DATA[1]), 5)
        payload = bytearray(length)
        recv_exact(s, memoryview(payload))
        assert payload == SEED_DATA[1] and digest == xxhash.xxh3_128_digest(SEED_DATA[1])
    finally:
        s.close()


def test_data_channel_bad_key_size_and_checksum(sync_env):
    env = sync_env
    with env.unchanged():
        s = _data_sock(env)
        try:
            for i, k in enumerate((b"", b"k" * 15, b"k" * 33)):
                s.sendall(_request(OP_PUT, NS.encode(), k, length=4, req_id=10 + i) + b"abcd")
                _, status, _, _, _, rid, _ = _response(s)
                assert status == SC.INVALID_ARGUMENT.value[0] and rid == 10 + i
            s.sendall(_request(OP_PUT, NS.encode(), key("zero-len"), length=0, req_id=20))
            assert _response(s)[1] == SC.INVALID_ARGUMENT.value[0]
            data = b"checked" * 10
            s.sendall(_request(OP_PUT, NS.encode(), key("dl"), length=len(data), req_id=21, flags=F_CHECKSUM,
                               extra=xxhash.xxh3_128_digest(b"not it")) + data)
            _, status, _, msg, _, rid, _ = _response(s)
            assert status == SC.DATA_LOSS.value[0] and rid == 21
            assert _ping_ok(s)
        finally:
            s.close()
        # the same through the client's data connection: typed errors per block
        conn = DataConnection(env.info.data_address)
        try:
            out = conn.put_many("Bad", [(key("x"), b"x")])
            assert isinstance(out[0], errors.InvalidArgument)
            out = conn.put_many(NS, [(key("y"), b"y")], checksums=[b"\x00" * 16])
            assert isinstance(out[0], errors.DataLoss)
            with pytest.raises(errors.InvalidArgument):
                conn.get_many(NS, [b"k" * 15])
            conn.ping()
        finally:
            conn.close()


def test_data_channel_call_frames(env):
    lookup = pb.LookupRequest(namespace=NS, key_size=16, keys=SEED_KEYS[0]).SerializeToString()
    with env.unchanged():
        s = _data_sock(env)
        try:
            # an unknown method, a stream, a payload that is no message: answered, the connection in step
            for i, (method, payload, code) in enumerate((
                    (b"NoSuchMethod", lookup, SC.UNIMPLEMENTED), (b"Get", lookup, SC.UNIMPLEMENTED),
                    (b"Put", b"", SC.UNIMPLEMENTED), (b"Lookup", b"\xff\xff\xff", SC.INVALID_ARGUMENT))):
                s.sendall(_request(OP_CALL, method, b"", length=len(payload), req_id=30 + i) + payload)
                _, status, _, msg, length, rid, _ = _response(s)
                assert (status, rid, length) == (code.value[0], 30 + i, 0) and msg, method
            assert _ping_ok(s)
            s.sendall(_request(OP_CALL, b"Lookup", b"", length=len(lookup), req_id=40) + lookup)
            _, status, _, _, length, rid, _ = _response(s)
            body = bytearray(length)
            recv_exact(s, memoryview(body))
            assert (status, rid) == (0, 40) and pb.LookupResponse.FromString(bytes(body)).tiers == b"\x01"
            # a call longer than the largest gRPC message: refused, and the connection closes
            too_long = env.daemon.daemon.cfg.server.max_message_bytes + 1
            s.sendall(_request(OP_CALL, b"Lookup", b"", length=too_long, req_id=41))
            _, status, _, msg, _, rid, _ = _response(s)
            assert (status, rid) == (SC.RESOURCE_EXHAUSTED.value[0], 41) and str(too_long) in msg
            assert _closed(s)
        finally:
            s.close()
