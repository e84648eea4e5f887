"""Tenants, tokens and TLS: isolation for every RPC, on every transport."""
import hashlib
import os
import select
import socket
import time

import grpc
import pytest

from kvtier import errors
from kvtier.client import TLS, Client
from kvtier.datachannel import DataConnection
from kvtier.v1 import kvtier_pb2 as pb
from kvtier.v1 import kvtier_pb2_grpc as pb_grpc

from conftest import tls_daemon, wait_until

TOKEN_A, TOKEN_B = "token-of-a-" + "x" * 20, "token-of-b-" + "y" * 20


def _sha(t):
    return hashlib.sha256(t.encode()).hexdigest()


@pytest.fixture
def tenants_file(tmp_path):
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a-*"]\n'
                 f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b-*", "shared"]\n')
    return str(p)


@pytest.fixture
def secured(make_daemon, tenants_file):
    return make_daemon(auth={"tenants_file": tenants_file})


KEY = bytes(range(16))


def _requests(ns):
    """One request of every namespaced unary RPC, for the namespace ns."""
    packed = dict(namespace=ns, key_size=16, keys=KEY)
    return {
        "Lookup": pb.LookupRequest(**packed),
        "Reserve": pb.ReserveRequest(sizes=[10], **packed),
        "Acquire": pb.AcquireRequest(**packed),
        "Delete": pb.DeleteRequest(**packed),
        "Pin": pb.PinRequest(**packed),
        "Unpin": pb.UnpinRequest(**packed),
        "Stats": pb.StatsRequest(namespace=ns),
    }


def _md(tok):
    return (("authorization", f"Bearer {tok}"),)


class _Grpc:
    """Calls with a token in gRPC metadata; the streams too."""

    def __init__(self, address):
        self.ch = grpc.insecure_channel(address)
        self.stub = pb_grpc.KVTierStub(self.ch)

    def code(self, name, request, tok):
        md = _md(tok) if tok else None
        try:
            if name == "Get":
                list(self.stub.Get(pb.GetRequest(namespace=request.namespace, key_size=16, keys=KEY), metadata=md))
            elif name == "Put":
                self.stub.Put(iter([pb.PutChunk(header=pb.PutHeader(namespace=request.namespace, key=KEY, length=3),
                                                data=b"abc")]), metadata=md)
            else:
                getattr(self.stub, name)(request, metadata=md)
        except grpc.RpcError as e:
            return e.code()
        raise AssertionError(f"{name} went through")

    def close(self):
        self.ch.close()


class _Data:
    """Calls as CALL frames on a data connection that said HELLO with the token (or nothing)."""

    def __init__(self, address):
        self.address = address

    def code(self, name, request, tok):
        try:
            conn = DataConnection(self.address, token=tok)
            try:
                conn.call(name, request.SerializeToString())
            finally:
                conn.close()
        except errors.KvtierError as e:
            return e.code
        raise AssertionError(f"{name} went through")

    def close(self):
        pass


@pytest.mark.parametrize("transport", ["grpc", "data"])
def test_every_rpc_is_isolated(secured, transport):
    with Client(secured.address, token=TOKEN_B) as b:
        b.put("b-one", KEY, b"secret of b")
        data_address = b.info.data_address
    t = _Grpc(secured.address) if transport == "grpc" else _Data(data_address)
    calls = _requests("b-one")
    if transport == "grpc":
        calls.update(Get=calls["Lookup"], Put=calls["Lookup"])  # the streams: namespace only
    for name, request in calls.items():
        assert t.code(name, request, TOKEN_A) == grpc.StatusCode.PERMISSION_DENIED, name
        assert t.code(name, request, None) == grpc.StatusCode.UNAUTHENTICATED, name
        assert t.code(name, request, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED, name
    for name in ("Attach", "Stats", "Commit", "Abort", "Release"):
        assert t.code(name, getattr(pb, f"{name}Request")(), None) == grpc.StatusCode.UNAUTHENTICATED, name
    t.close()
    with Client(secured.address, token=TOKEN_B) as b:  # nothing of b's changed
        assert b.get("b-one", KEY) == b"secret of b"
        assert b.lookup("b-one", [KEY]) == ([1], 1)


def test_stats_lists_only_own_namespaces(secured):
    with Client(secured.address, token=TOKEN_A) as a, Client(secured.address, token=TOKEN_B) as b:
        a.put("a-x", KEY, b"1")
        b.put("b-y", KEY, b"2")
        assert [n.name for n in a.stats().namespaces] == ["a-x"]
        assert [n.name for n in b.stats().namespaces] == ["b-y"]


@pytest.mark.parametrize("kw", [{}, {"control": "grpc"}, {"attach": False}, {"attach": False, "control": "grpc"},
                                {"attach": False, "data_channel": False}],
                         ids=["arena", "arena-grpc-control", "data", "data-grpc-control", "grpc"])
def test_paths_with_tokens(secured, kw):
    with Client(secured.address, token=TOKEN_A, **kw) as a:
        a.put("a-p", KEY, b"hello")
        assert a.get("a-p", KEY) == b"hello"
        assert a.control == ("grpc" if a.path == "grpc" or kw.get("control") else "data")
        with pytest.raises(errors.PermissionDenied):
            a.put("b-p", KEY, b"nope")
        with pytest.raises(errors.PermissionDenied):
            a.get_many("b-p", [KEY])
        with pytest.raises(errors.PermissionDenied):
            a.lookup("b-p", [KEY])
        assert [n.name for n in a.stats().namespaces] == ["a-p"]
    with pytest.raises(errors.Unauthenticated):
        Client(secured.address, **kw).put("a-p", KEY, b"x")


def test_data_channel_requires_hello(secured):
    with Client(secured.address, token=TOKEN_A) as a:
        addr = a.info.data_address
    c = DataConnection(addr)
    # a CALL is authenticated by its handler, as on gRPC: refused, and the connection stays in step
    for _ in range(2):
        with pytest.raises(errors.Unauthenticated, match="bearer token"):
            c.call("Lookup", pb.LookupRequest(namespace="a-p", key_size=16, keys=KEY).SerializeToString())
    try:  # bytes without HELLO: refused, and the daemon closes the connection (maybe mid-send)
        res = c.put_many("a-p", [(KEY, b"abc")])
    except OSError:
        res = []
    assert res == [] or isinstance(res[0], errors.Unauthenticated)
    c.close()
    with pytest.raises(errors.Unauthenticated):
        DataConnection(addr, token="wrong")
    ok = DataConnection(addr, token=TOKEN_A)
    assert ok.put_many("a-p", [(KEY, b"abc")])[0].status in (0, 1)
    assert isinstance(ok.put_many("b-p", [(KEY, b"abc")])[0], errors.PermissionDenied)


def test_tenants_file_errors(tmp_path):
    from kvtier.auth import Tenants
    bad = {"tenants": {"x": {"token_sha256": ["nothex"], "namespaces": ["x"]}}}
    with pytest.raises(errors.ConfigError, match="token_sha256"):
        Tenants.from_dict(bad)
    with pytest.raises(errors.ConfigError, match="namespaces"):
        Tenants.from_dict({"tenants": {"x": {"token_sha256": [_sha("t")]}}})
    with pytest.raises(errors.ConfigError, match="also belongs"):
        Tenants.from_dict({"tenants": {"x": {"token_sha256": [_sha("t")], "namespaces": ["x"]},
                                       "y": {"token_sha256": [_sha("t")], "namespaces": ["y"]}}})
    with pytest.raises(errors.ConfigError, match="ram_quota"):
        Tenants.from_dict({"tenants": {"x": {"token_sha256": [_sha("t")], "namespaces": ["x"], "ram_quota": "lots"}}})
    # a string of patterns was read as a list of its characters, "*" among them: every namespace
    with pytest.raises(errors.ConfigError, match=r"tenants.x.namespaces: a non-empty list .* got 'x-\*'"):
        Tenants.from_dict({"tenants": {"x": {"token_sha256": [_sha("t")], "namespaces": "x-*"}}})
    # [tenants] as a list or a string: a clear error, not an AttributeError
    for not_tables in (["acme"], "acme"):
        with pytest.raises(errors.ConfigError, match=r"\[tenants.NAME\]"):
            Tenants.from_dict({"tenants": not_tables})
    # a digest with spaces in it (bytes.fromhex takes them) never matches any token: refused
    spaced = _sha("t")[:32] + " " + _sha("t")[33:]
    assert len(spaced) == 64
    with pytest.raises(errors.ConfigError, match="token_sha256"):
        Tenants.from_dict({"tenants": {"x": {"token_sha256": [spaced], "namespaces": ["x"]}}})


def test_quotas_go_to_the_tenant_that_names_a_namespace_most_closely():
    """An operator's ["*"] listed first took every namespace for itself: the other tenants'
    quotas were never applied. The order in the file no longer matters."""
    from kvtier.auth import Tenants

    def tenants(*entries):
        return Tenants.from_dict({"tenants": {name: {"token_sha256": [_sha(name)], "namespaces": pats}
                                              for name, pats in entries}})
    for order in (1, -1):
        t = tenants(*[("ops", ["*"]), ("acme", ["acme", "acme-*"]), ("eu", ["acme-eu-*"]),
                      ("one", ["acme-eu-7"]), ("q", ["acme-?"])][::order])
        assert t.group_of("acme") == "acme"
        assert t.group_of("acme-us") == "acme"
        assert t.group_of("acme-eu-1") == "eu"
        assert t.group_of("acme-eu-7") == "one"  # an exact name before any pattern
        assert t.group_of("globex") == "ops"
        # "acme-*" and "acme-?" start alike: the first in the file
        assert t.group_of("acme-x") == ("acme" if order == 1 else "q")
    # equals: the first in the file
    assert tenants(("a", ["x-*"]), ("b", ["x-*"])).group_of("x-1") == "a"
    assert tenants(("b", ["x-*"]), ("a", ["x-*"])).group_of("x-1") == "b"


def test_tcp_requires_tls_or_explicit_insecure():
    from kvtier import config
    with pytest.raises(errors.ConfigError, match="TLS"):
        config.from_dict({"server": {"listen": "127.0.0.1:7000"}})
    config.from_dict({"server": {"listen": "127.0.0.1:7000", "insecure_tcp": True}})


# ---- TLS --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_channel", [True, False], ids=["data", "grpc"])
def test_tls(make_daemon, pki, data_channel):
    d = tls_daemon(make_daemon, pki, mutual=False)
    tls = TLS(ca=str(pki / "ca.pem"))
    with Client(d.tcp_address, tls=tls, attach=False, data_channel=data_channel, timeout=5) as c:
        c.put("t", KEY, b"over tls" * 1000)
        assert c.get("t", KEY) == b"over tls" * 1000
        assert c.path == c.control == ("data" if data_channel else "grpc")
        assert c.lookup("t", [KEY]) == ([1], 1)  # over TLS on the data channel when it has one
    with pytest.raises(errors.KvtierError):  # plaintext to a TLS port fails
        Client(d.tcp_address, attach=False, timeout=2).stats()


def test_mutual_tls(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, mutual=True)
    good = TLS(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client.key"))
    with Client(d.tcp_address, tls=good, attach=False, timeout=5) as c:
        c.put("t", KEY, b"mutual")
        assert c.get("t", KEY) == b"mutual" and c.path == "data"
    with pytest.raises(errors.KvtierError):
        Client(d.tcp_address, tls=TLS(ca=str(pki / "ca.pem")), attach=False, timeout=2).stats()


def test_a_tls_handshake_that_trickles_is_cut_off(make_daemon, pki, monkeypatch):
    """The data channel's TLS handshake has HANDSHAKE_TIMEOUT_S in all, not per read: a peer
    sending a byte now and then would otherwise keep a thread of the daemon for ever."""
    from kvtier import datachannel
    monkeypatch.setattr(datachannel, "HANDSHAKE_TIMEOUT_S", 1.0)
    d = tls_daemon(make_daemon, pki, mutual=False)
    dc = d.daemon.data
    host, port = datachannel.parse_address(next(a for a in dc.addresses if a.startswith("tcp://")))[1]
    hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 64      # a TLS record header, then slowly its body
    s = socket.create_connection((host, port), timeout=5)
    closed, t0 = False, time.monotonic()
    try:
        for b in hello:
            s.sendall(bytes([b]))
            r, _, _ = select.select([s], [], [], 0.25)
            if r and not s.recv(1):
                closed = True
                break
    except ConnectionError:
        closed = True
    s.close()
    assert closed and time.monotonic() - t0 < 8
    wait_until(lambda: dc.open_connections == 0, what="the connection's thread gone")
    monkeypatch.setattr(datachannel, "HANDSHAKE_TIMEOUT_S", 10.0)  # a loaded machine's handshake
    with Client(d.tcp_address, tls=TLS(ca=str(pki / "ca.pem")), attach=False, timeout=5) as c:
        c.put("t", KEY, b"after")
        assert c.get("t", KEY) == b"after" and c.path == "data"


def test_closing_ends_tls_connections_at_once_and_waits_for_their_threads(make_daemon, pki):
    """close() shuts down every connection (one that never started its TLS handshake too, which
    would otherwise keep its thread for HANDSHAKE_TIMEOUT_S) with the socket's own shutdown, and
    returns once their threads have ended: a daemon stopping sends nothing more on them."""
    from kvtier import datachannel
    d = tls_daemon(make_daemon, pki, mutual=False)
    dc = d.daemon.data
    host, port = datachannel.parse_address(next(a for a in dc.addresses if a.startswith("tcp://")))[1]
    silent = socket.create_connection((host, port), timeout=5)  # no ClientHello: waits in the handshake
    with Client(d.tcp_address, tls=TLS(ca=str(pki / "ca.pem")), attach=False, timeout=5) as c:
        c.put("t", KEY, b"x" * 4096)
        wait_until(lambda: dc.open_connections == 2 and len(dc._unauthenticated) == 1,
                   what="one connection served, one in its handshake")
        t0 = time.monotonic()
        dc.close()
        assert time.monotonic() - t0 < datachannel.CLOSE_WAIT_S and dc.open_connections == 0
        silent.settimeout(5)
        assert silent.recv(1) == b""
    silent.close()


def test_example_tenants_file_loads():
    import pathlib
    from kvtier.auth import Tenants
    t = Tenants.load(str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "tenants.example.toml"))
    assert set(t.tenants) == {"acme", "globex", "ops"}
    assert t.tenants["acme"].ram_quota == 400 << 30
    assert t.group_of("acme-eu") == "acme" and t.group_of("globex-1") == "globex"
    assert t.identify("test").name == "acme"  # sha256("test") is acme's example digest


@pytest.mark.parametrize("ops_first", [False, True])
def test_ram_quota_evicts_within_the_tenant_only(make_daemon, tmp_path, ops_first):
    p = tmp_path / "tenants.toml"
    ops = f'[tenants.ops]\ntoken_sha256 = ["{_sha("ops-token")}"]\nnamespaces = ["*"]\n'  # sees all, owns none of these
    p.write_text((ops if ops_first else "") +
                 f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a-*"]\nram_quota = "2MiB"\n'
                 f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b-*"]\n')
    d = make_daemon(auth={"tenants_file": str(p)}, ram={"capacity": "16MiB"})
    mib = 1 << 20
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        b_blocks = [(bytes([100 + i]) * 16, os.urandom(mib)) for i in range(4)]
        b.put_many("b-x", b_blocks)
        a_keys = [bytes([i]) * 16 for i in range(6)]
        for k in a_keys:
            a.put("a-x", k, os.urandom(mib - 4096))  # six blocks through a 2 MiB quota
        tiers, _ = a.lookup("a-x", a_keys)
        assert tiers == [0, 0, 0, 0, 1, 1]  # a keeps its newest two; older ones went
        assert b.lookup("b-x", [k for k, _ in b_blocks])[0] == [1] * 4  # b lost nothing
        assert b.get_many("b-x", [k for k, _ in b_blocks]) == [v for _, v in b_blocks]
        hot = d.daemon.hot
        assert hot.group_used["a"] <= 2 * mib and hot.group_used["b"] == 4 * mib
        with pytest.raises(errors.ResourceExhausted, match="quota"):
            a.put("a-x", b"z" * 16, os.urandom(3 * mib))  # larger than the whole quota


def test_sighup_reload_picks_up_new_tenants(make_daemon, tmp_path):
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a-*"]\n')
    d = make_daemon(auth={"tenants_file": str(p)})
    with pytest.raises(errors.Unauthenticated):
        Client(d.address, token=TOKEN_B).stats()
    p.write_text(p.read_text() + f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b-*"]\n')
    d.daemon.request_reload()  # what SIGHUP does: re-read the tenants file named in the configuration
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with Client(d.address, token=TOKEN_B) as b:
                b.put("b-y", KEY, b"welcome")
            break
        except errors.Unauthenticated:
            time.sleep(0.1)
    with Client(d.address, token=TOKEN_B) as b:
        assert b.get("b-y", KEY) == b"welcome"


def test_nvme_quota_evicts_within_the_tenant_only(make_daemon, tmp_path):
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a-*"]\nnvme_quota = "1MiB"\n'
                 f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b-*"]\n')
    d = make_daemon(auth={"tenants_file": str(p)},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "commit"})
    import time
    blk = 200_000
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        b.put_many("b-x", [(bytes([100 + i]) * 16, os.urandom(blk)) for i in range(8)])
        for i in range(10):
            a.put("a-x", bytes([i]) * 16, os.urandom(blk))
        cold = d.daemon.store.cold
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.daemon.store.queued_bytes:
            time.sleep(0.05)
        assert cold.group_used["a"] <= 1 << 20  # a's files stay within its quota...
        assert cold.group_used["b"] >= 8 * blk  # ...and b's files were never touched
        assert sum(cold.contains("b-x", bytes([100 + i]) * 16) for i in range(8)) == 8
        assert sum(cold.contains("a-x", bytes([i]) * 16) for i in range(10)) <= 5


@pytest.mark.parametrize("transport", ["grpc", "data"])
def test_a_tenant_never_reads_the_bytes_another_left_in_a_slot(make_daemon, tenants_file, monkeypatch, transport):
    """A tenant reaching the daemon over TCP reserved slots, committed them without writing (it
    cannot map the arena to write them) and read back the bytes of whatever blocks had been
    there: another tenant's deleted or evicted KV. Slots reserved by a caller that may not see
    the arena are zeroed; a Unix-socket caller (the arena's group) pays no such write."""
    from kvtier import copying
    d = make_daemon(auth={"tenants_file": tenants_file}, ram={"capacity": "16MiB"},
                    server={"listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", "insecure_tcp": True})
    size, marker = 1 << 20, b"secret of b!" * 16
    with Client(d.address, token=TOKEN_B) as b:  # on the Unix socket: the arena's way
        keys = [bytes([i]) * 16 for i in range(8)]
        b.put_many("b-kv", [(k, marker * (size // len(marker))) for k in keys])
        assert b.delete("b-kv", keys) == 8              # their slots are free, their bytes still there
        zeroed = []
        real = getattr(copying, "zero", None)
        monkeypatch.setattr(copying, "zero", lambda v: zeroed.append(len(v)) or real(v), raising=False)
        r = b.reserve("b-kv", [b"u" * 16], [size])      # a caller that may see the arena: no zeroing
        b.abort(r)
        assert zeroed == []
        data_address = next(a for a in [b.info.data_address] if a)
    packed = dict(namespace="a-x", key_size=16, keys=b"".join(keys))
    res = pb.ReserveRequest(sizes=[size] * 8, **packed)
    with Client(d.tcp_address, token=TOKEN_A, attach=False) as a:
        tcp_data = a.info.data_address
        assert tcp_data.startswith("tcp://")
    if transport == "grpc":
        ch = grpc.insecure_channel(d.tcp_address.replace("tcp://", ""))
        stub = pb_grpc.KVTierStub(ch)
        r = stub.Reserve(res, metadata=_md(TOKEN_A))
        stub.Commit(pb.CommitRequest(reservation_id=r.reservation_id), metadata=_md(TOKEN_A))
        ch.close()
    else:
        conn = DataConnection(tcp_data, token=TOKEN_A)
        try:
            r = pb.ReserveResponse.FromString(conn.call("Reserve", res.SerializeToString()))
            conn.call("Commit", pb.CommitRequest(reservation_id=r.reservation_id).SerializeToString())
        finally:
            conn.close()
    assert list(r.status) == [0] * 8
    with Client(d.tcp_address, token=TOKEN_A, attach=False) as a:
        got = a.get_many("a-x", keys)
    assert sum(marker in g for g in got) == 0            # never b's bytes
    assert all(g == bytes(size) for g in got) and len(zeroed) == 8
    assert data_address.startswith("unix://")


def test_a_caller_without_a_token_cannot_make_the_daemon_hold_large_requests(secured):
    """gRPC reads a request whole before the handler checks its token: with 64 MiB messages
    allowed, a few callers without a token held hundreds of MiB of the daemon's memory. The
    default is 4 MiB, well above what a batch of max_batch keys needs."""
    ch = grpc.insecure_channel(secured.address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.KVTierStub(ch)
    big = pb.LookupRequest(namespace="b-one", key_size=16, keys=bytes(5 << 20))
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(big)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    most = pb.LookupRequest(namespace="b-one", key_size=32, keys=bytes(32 * secured.daemon.cfg.server.max_batch))
    assert stub.Lookup(most, metadata=_md(TOKEN_B)).tiers == bytes(secured.daemon.cfg.server.max_batch)
    ch.close()


def test_zeroing_a_large_reservation_leaves_the_event_loop_free(make_daemon, tenants_file, monkeypatch):
    """Slots a TCP caller reserves are zeroed (see above); a batch of large blocks took seconds on
    the event loop, every other call waiting meanwhile."""
    import threading
    from kvtier import copying
    d = make_daemon(auth={"tenants_file": tenants_file}, ram={"capacity": "16MiB"},
                    server={"listen": "127.0.0.1:0", "insecure_tcp": True})
    real = copying.zero

    def slow(v):
        time.sleep(0.3)
        real(v)
    monkeypatch.setattr(copying, "zero", slow)
    ch = grpc.insecure_channel(d.tcp_address.replace("tcp://", ""))
    stub = pb_grpc.KVTierStub(ch)
    keys = [bytes([i]) * 16 for i in range(4)]
    res = pb.ReserveRequest(namespace="a-x", key_size=16, keys=b"".join(keys), sizes=[1 << 20] * 4)
    out = []
    t = threading.Thread(target=lambda: out.append(stub.Reserve(res, metadata=_md(TOKEN_A))))
    t.start()
    time.sleep(0.2)  # the Reserve is zeroing (1.2 s)
    with Client(d.address, token=TOKEN_B) as b:
        t0 = time.monotonic()
        b.lookup("b-one", [KEY])
        took = time.monotonic() - t0
    t.join(10)
    ch.close()
    assert list(out[0].status) == [0] * 4
    assert took < 0.6, took
