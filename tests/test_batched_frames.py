"""Data channel version 2: PUT_MANY and GET_MANY frames (many blocks per frame, one reservation,
one lease), against a real daemon on a Unix socket and over TCP."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest
import xxhash

from kvtier import datachannel, errors
from kvtier.client import Client
from kvtier.datachannel import DataConnection, PutResult

NS = "batched"


def key(*parts) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def digest(b: bytes) -> bytes:
    return xxhash.xxh3_128_digest(b)


def conn_to(d) -> DataConnection:
    with Client(d.address, attach=False) as c:
        c.attach()
        assert c.info.data_channel_version == datachannel.VERSION == 3
        address = c.info.data_address
    conn = DataConnection(address)
    conn.version = 3
    return conn


@pytest.fixture
def frames_seen(monkeypatch):
    """Counts the batched frames the daemon serves, by op."""
    seen = {"put": 0, "get": 0}
    real_put, real_get = datachannel.DataServer._put_many, datachannel.DataServer._get_many

    def put_many(self, conn, req_id, ns, entries, *a):
        seen["put"] += 1
        return real_put(self, conn, req_id, ns, entries, *a)

    def get_many(self, conn, req_id, ns, entries, *a):
        seen["get"] += 1
        return real_get(self, conn, req_id, ns, entries, *a)
    monkeypatch.setattr(datachannel.DataServer, "_put_many", put_many)
    monkeypatch.setattr(datachannel.DataServer, "_get_many", get_many)
    return seen


def test_many_blocks_per_frame_with_per_block_answers(daemon, frames_seen, monkeypatch):
    monkeypatch.setattr(datachannel, "MANY_PER_FRAME", 4)       # 11 blocks: 3 frames each way
    conn = conn_to(daemon)
    try:
        keys = [key("b", i) for i in range(11)]
        datas = [os.urandom(1000 + 37 * i) for i in range(11)]
        assert conn.put_many(NS, [(keys[0], datas[0])]) == [PutResult(0, digest(datas[0]))]
        items = list(zip(keys, datas))
        items[5] = (b"short", b"x" * 10)                        # a bad key fails only its own block
        items[7] = (keys[7], b"")                               # so does an empty block
        items.append((keys[9], datas[9]))                       # twice in one frame: pending
        out = conn.put_many(NS, items)
        assert frames_seen["put"] == 1 + 3
        assert out[0] == PutResult(1, bytes(16))                 # already present
        assert isinstance(out[5], errors.InvalidArgument) and isinstance(out[7], errors.InvalidArgument)
        assert out[11] == PutResult(2, bytes(16))
        for i in (1, 2, 3, 4, 6, 8, 9, 10):
            assert out[i] == PutResult(0, digest(datas[i])), i
        # gets: found, missing, and in the caller's buffers, checked as they arrive
        ask = keys + [key("missing")]
        got = conn.get_many(NS, ask)
        assert frames_seen["get"] == 3
        for i, g in enumerate(got):
            if i in (5, 7, 11):
                assert g is None, i
            else:
                assert bytes(g[0]) == datas[i] and g[1] == digest(datas[i]), i
        bufs = [bytearray(2000) for _ in ask]
        seen = []
        got = conn.get_many(NS, ask, into=bufs, check=lambda v, d: seen.append(len(v)) or len(v) != len(datas[2]))
        assert got[2] is None and len(seen) == 9                  # refused by check: None
        assert bytes(got[9][0]) == datas[9] and bytes(bufs[9][:len(datas[9])]) == datas[9]
        with pytest.raises(errors.InvalidArgument):               # a bad key: the others are read first
            conn.get_many(NS, [keys[1], b"bad"])
        conn.ping()                                               # still in step
        assert bytes(conn.get_many(NS, [keys[1]])[0][0]) == datas[1]
    finally:
        conn.close()


def test_client_uses_batched_frames_and_old_daemons_get_single_ones(daemon, frames_seen, monkeypatch):
    data = [(key("c", i), os.urandom(4096)) for i in range(40)]
    with Client(daemon.address, attach=False) as c:
        c.put_many(NS, data)
        assert c.path == "data"
        assert c.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
    assert frames_seen == {"put": 1, "get": 1}
    monkeypatch.setattr(datachannel, "VERSION", 0)              # a daemon from before version 2
    more = [(key("d", i), os.urandom(4096)) for i in range(10)]
    with Client(daemon.address, attach=False) as c:
        assert c.info.data_channel_version == 0
        c.put_many(NS, more)
        assert c.get_many(NS, [k for k, _ in more + data]) == [v for _, v in more + data]
    assert frames_seen == {"put": 1, "get": 1}


def test_large_batches_split_by_bytes_over_tcp(make_daemon, monkeypatch):
    monkeypatch.setattr(datachannel, "FRAME_BYTES", 3 << 20)
    d = make_daemon(server={"listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", "insecure_tcp": True})
    data = [(key("t", i), os.urandom((1 << 20) + i)) for i in range(9)] + [(key("big"), os.urandom(5 << 20))]
    with Client(d.tcp_address, attach=False) as c:
        assert c.info.data_address.startswith("tcp://")
        conn = c._ops._connect_data(c.info.data_address, c.info.data_channel_version)
    try:
        assert conn._frames([len(v) for _, v in data]) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
        assert [r.status for r in conn.put_many(NS, data)] == [0] * 10
        got = conn.get_many(NS, [k for k, _ in data])
        assert [bytes(g[0]) for g in got] == [v for _, v in data]
    finally:
        conn.close()


def test_a_whole_frame_error_answers_every_block_and_keeps_the_connection(make_daemon, tmp_path):
    tok = "tenant-a-token"
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{hashlib.sha256(tok.encode()).hexdigest()}"]\n'
                 f'namespaces = ["a-*"]\n')
    d = make_daemon(auth={"tenants_file": str(p)})
    conn = conn_to_secured(d, tok)
    try:
        items = [(key("x", i), os.urandom(3000)) for i in range(5)]
        out = conn.put_many("b-not-mine", items)
        assert len(out) == 5 and all(isinstance(r, errors.PermissionDenied) for r in out)
        with pytest.raises(errors.PermissionDenied):
            conn.get_many("b-not-mine", [k for k, _ in items])
        assert [r.status for r in conn.put_many("a-mine", items)] == [0] * 5   # payloads were drained
        assert [bytes(g[0]) for g in conn.get_many("a-mine", [k for k, _ in items])] == [v for _, v in items]
    finally:
        conn.close()


def conn_to_secured(d, tok: str) -> DataConnection:
    with Client(d.address, attach=False, token=tok) as c:
        c.attach()
        address = c.info.data_address
    conn = DataConnection(address, token=tok)
    conn.version = 2
    return conn


def test_a_checksum_mismatch_under_sync_fails_the_frame_and_commits_nothing(make_daemon):
    d = make_daemon(ram={"verify_on_commit": "sync"})
    conn = conn_to(d)
    try:
        items = [(key("s", i), os.urandom(2048)) for i in range(4)]
        sums = [digest(v) for _, v in items]
        sums[2] = digest(b"not these bytes")
        out = conn.put_many(NS, items, checksums=sums)
        assert all(isinstance(r, errors.DataLoss) for r in out)
        assert conn.get_many(NS, [k for k, _ in items]) == [None] * 4
        sums[2] = digest(items[2][1])
        assert [r.status for r in conn.put_many(NS, items, checksums=sums)] == [0] * 4
    finally:
        conn.close()


@pytest.mark.parametrize("manifest", [
    struct.pack("<I", datachannel.MANY_MAX + 1),                           # too many blocks
    struct.pack("<I", 2) + b"\x10" + bytes(16) + struct.pack("<Q", 5),     # says 2, holds 1
    struct.pack("<I", 1) + b"\x10" + bytes(16) + struct.pack("<Q", 1 << 40),  # larger than any block
])
def test_a_broken_manifest_is_answered_and_closes_the_connection(daemon, manifest):
    conn = conn_to(daemon)
    try:
        nsb = NS.encode()
        head = datachannel.REQ.pack(datachannel.REQ_MAGIC, datachannel.OP_PUT_MANY, 0, len(nsb), 0,
                                    len(manifest), 1)
        conn.sock.sendall(head + nsb + manifest)
        with pytest.raises((errors.InvalidArgument, errors.ResourceExhausted)):
            conn._response(1)
        conn.sock.settimeout(5)
        assert conn.sock.recv(1) == b""                                   # closed by the daemon
    finally:
        conn.close()
    with Client(daemon.address, attach=False) as c:                       # the daemon serves on
        c.put(NS, key("after"), b"fine")
        assert c.get(NS, key("after")) == b"fine"


def test_a_version_2_daemon_gets_no_accounting_flags(daemon, monkeypatch):
    """Flags and the tokens trailer of version 3 go only to a daemon that reads them: a version 2
    daemon would find the manifest's trailer left over and close the connection."""
    monkeypatch.setattr(datachannel, "VERSION", 2)
    sent = []
    real = DataConnection._many_request

    def spy(self, op, ns, entries, flags=0, trailer=b""):
        sent.append((op, flags, trailer))
        return real(self, op, ns, entries, flags, trailer)
    monkeypatch.setattr(DataConnection, "_many_request", spy)
    data = [(key("v", i), os.urandom(512)) for i in range(3)]
    with Client(daemon.address, attach=False) as c:
        c.put_many(NS, data)
        assert c.info.data_channel_version == 2
        assert c.get_many(NS, [k for k, _ in data], counted=False, tokens_per_key=8) == [v for _, v in data]
    monkeypatch.setattr(datachannel, "VERSION", 3)
    with Client(daemon.address, attach=False) as c:
        assert c.get_many(NS, [k for k, _ in data], counted=False, tokens_per_key=8) == [v for _, v in data]
    gets = [(f, t) for op, f, t in sent if op == datachannel.OP_GET_MANY]
    assert gets == [(0, b""), (datachannel.F_UNCOUNTED | datachannel.F_TOKENS, (8).to_bytes(4, "little"))]
