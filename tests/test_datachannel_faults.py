"""Hostile and broken data-channel clients: whatever one does, the daemon serves the others,
and nothing it held (threads, memory, leases, reservations) outlives the connection.

The daemon here has tenants and a TCP data listener, as on a network with untrusted peers.
"""
from __future__ import annotations

import errno
import hashlib
import socket
import struct
import time

import pytest

from kvtier import datachannel, errors
from kvtier.client import Client
from kvtier.datachannel import (OP_CALL, OP_GET, OP_GET_MANY, OP_HELLO, OP_PING, OP_PUT, RESP_MAGIC,
                                DataConnection, parse_address)

from conftest import wait_until
from test_bad_input import _closed, _request, _response

TOKEN = "token-of-a"
NS = "a-faults"


def _sha(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()


@pytest.fixture
def tenants_file(tmp_path):
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN)}"]\nnamespaces = ["a-*"]\n')
    return str(p)


@pytest.fixture
def secured(make_daemon, tenants_file):
    return make_daemon(auth={"tenants_file": tenants_file},
                       server={"data_listen": "127.0.0.1:0", "insecure_tcp": True})


def _tcp(d) -> str:
    return next(a for a in d.daemon.data.addresses if a.startswith("tcp://"))


def _sock(d) -> socket.socket:
    s = socket.create_connection(parse_address(_tcp(d))[1], timeout=10)
    return s


def _answer(s):
    magic, status, _, msg, length, rid, _ = _response(s)
    assert magic == RESP_MAGIC
    return status, msg, length, rid


def _hello(s, token=TOKEN) -> int:
    tok = token.encode()
    s.sendall(_request(OP_HELLO, b"", b"", length=len(tok)) + tok)
    return _answer(s)[0]


def _still_open(s) -> bool:
    """Nothing is sent to s: only its end would make recv return within the wait."""
    s.settimeout(0.2)
    try:
        return s.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    finally:
        s.settimeout(10)


def _serves(d, k=b"k" * 16) -> None:
    """A well-behaved client stores and reads a block on a fresh connection, and the daemon holds
    no lease or reservation once it is done."""
    conn = DataConnection(_tcp(d), token=TOKEN, timeout=10)
    try:
        conn.version = 2
        data = k * 64
        assert not isinstance(conn.put_many(NS, [(k, data)], overwrite=True)[0], errors.KvtierError)
        assert bytes(conn.get_many(NS, [k])[0][0]) == data
    finally:
        conn.close()
    with Client(d.address, token=TOKEN) as c:
        wait_until(lambda: (c.stats().leases, c.stats().reservations) == (0, 0), what="leases and reservations gone")


def test_the_listener_outlives_a_failed_accept(secured, monkeypatch):
    """accept() failing (out of file descriptors, EMFILE) must not stop the listener for good."""
    lsock = next(s for s in secured.daemon.data._socks if s.family == socket.AF_INET)
    real, failed = socket.socket.accept, []

    def accept(self):
        if self.fileno() == lsock.fileno() and not failed:
            failed.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)
    monkeypatch.setattr(socket.socket, "accept", accept)
    monkeypatch.setattr(datachannel, "ACCEPT_BACKOFF_S", 0.01, raising=False)
    s = _sock(secured)  # taken by the accept already waiting; the next one fails
    assert _hello(s) == 0
    wait_until(lambda: failed, what="the failed accept")
    s.close()
    _serves(secured)


def test_a_call_before_hello_costs_no_memory(secured, monkeypatch):
    """A CALL announcing max_message_bytes from a peer without a token is refused as its handler
    would (UNAUTHENTICATED) without a buffer of that size held for it while its bytes trickle in."""
    size = secured.daemon.data.max_call_bytes
    allocated, drained = [], []
    real_drain = datachannel.DataServer._drain

    class Watch(bytearray):
        def __init__(self, *a):
            if a and isinstance(a[0], int) and a[0] >= size:
                allocated.append(a[0])
            super().__init__(*a)

    def drain(self, conn, n, scratch):
        if n >= size:
            drained.append(n)
        return real_drain(self, conn, n, scratch)
    monkeypatch.setattr(datachannel, "bytearray", Watch, raising=False)
    monkeypatch.setattr(datachannel.DataServer, "_drain", drain)
    s = _sock(secured)
    body = b"\0" * (1 << 16)
    s.sendall(_request(OP_CALL, b"Lookup", b"", length=len(body), req_id=3) + body)
    assert _answer(s)[:1] == (errors.Unauthenticated.code.value[0],)
    s.sendall(_request(OP_CALL, b"Lookup", b"", length=size, req_id=4) + body)  # the rest never comes
    wait_until(lambda: allocated or drained, what="the CALL read")
    assert not allocated
    s.close()
    _serves(secured)


def test_a_connection_holds_no_drain_buffer_until_it_drains(secured, monkeypatch):
    """Each connection made a 1 MiB buffer at accept, for payloads it reads past: 1,024 idle or
    unauthenticated connections (the default limit) held 1 GiB. It is made at the first drain."""
    made = []
    real = datachannel._Scratch.view

    def view(self):
        if self._view is None:
            made.append(1)
        return real(self)
    monkeypatch.setattr(datachannel._Scratch, "view", view)
    s = _sock(secured)
    _hello(s)
    s.sendall(_request(OP_PING, b"", b"", req_id=2))
    assert _answer(s)[0] == 0
    s.sendall(_request(OP_GET, NS.encode(), b"k" * 16, req_id=3))
    assert _answer(s)[0] == 0
    assert made == []
    s.sendall(_request(OP_PUT, b"not a namespace!", b"k" * 16, length=4096, req_id=4) + b"x" * 4096)
    assert _answer(s)[0] != 0                         # refused: its payload is read past
    assert made == [1]
    s.close()


def test_a_peer_without_a_token_is_cut_off(secured, monkeypatch):
    """On a daemon with tenants, a connection that sends no valid HELLO in time is closed, whether
    it sends nothing, trickles a header, or streams refused CALLs; an authenticated one may idle."""
    monkeypatch.setattr(datachannel, "HELLO_TIMEOUT_S", 1.0, raising=False)
    idle, trickle, calls, ok = (_sock(secured) for _ in range(4))
    assert _hello(ok) == 0
    ping = _request(OP_PING, b"", b"", req_id=5)
    trickle.sendall(ping[:3])
    wait_until(lambda: _closed(idle), timeout=15, what="the idle connection closed")
    calls.settimeout(5)
    give_up = time.monotonic() + 15
    with pytest.raises((ConnectionError, socket.timeout)):  # answered UNAUTHENTICATED until cut off
        while time.monotonic() < give_up:
            calls.sendall(_request(OP_CALL, b"Stats", b"", req_id=1))
            assert _answer(calls)[0] == errors.Unauthenticated.code.value[0]
            time.sleep(0.05)
    try:
        trickle.sendall(ping[3:])
    except OSError:
        pass
    assert _closed(trickle)
    ok.sendall(ping)
    assert _answer(ok)[0] == 0
    for s in (idle, trickle, calls, ok):
        s.close()
    _serves(secured)


@pytest.mark.parametrize("op", [OP_GET, OP_GET_MANY])
def test_a_client_that_does_not_read_its_answer_loses_the_connection(make_daemon, tenants_file, op):
    """A GET answer nobody reads: the daemon gives up on the connection before the lease on the
    block expires (its slot could then be reused while still being sent) and holds nothing after."""
    d = make_daemon(auth={"tenants_file": tenants_file}, ram={"lease_ms": 9000},  # gives up after 3 s
                    server={"data_listen": "127.0.0.1:0", "insecure_tcp": True})
    k, data = b"g" * 16, bytes(range(256)) * (96 * 1024)  # 24 MiB: more than socket buffers hold
    with Client(d.address, token=TOKEN) as c:
        c.put(NS, k, data)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(parse_address(_tcp(d))[1])
        assert _hello(s) == 0
        if op == OP_GET:
            s.sendall(_request(OP_GET, NS.encode(), k, req_id=2))
        else:
            man = struct.pack("<IB", 1, 16) + k
            s.sendall(_request(OP_GET_MANY, NS.encode(), b"", length=len(man), req_id=2) + man)
        wait_until(lambda: c.stats().leases == 1, what="the block leased for the answer")
        wait_until(lambda: c.stats().leases == 0, what="the lease ended")
        st = c.stats()
        got = 0
        try:
            while chunk := s.recv(1 << 20):  # what the daemon sent before it gave up, then the end
                got += len(chunk)
        except ConnectionResetError:
            pass
        s.close()
        assert got < len(data), "the answer was sent in full"
        assert st.expired_leases == 0, "the lease expired while its block was being sent"
    _serves(d)


def test_a_revoked_token_stops_working_on_open_connections(make_daemon, tmp_path):
    """Tenants reloaded (SIGHUP) without a token: connections that sent it before lose access
    at their next request, as new ones do."""
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN)}"]\nnamespaces = ["a-*"]\n')
    d = make_daemon(auth={"tenants_file": str(p)}, server={"data_listen": "127.0.0.1:0", "insecure_tcp": True})
    conn = DataConnection(_tcp(d), token=TOKEN, timeout=10)
    conn.version = 2
    assert not isinstance(conn.put_many(NS, [(b"r" * 16, b"before")])[0], errors.KvtierError)
    old = d.daemon.data.access
    p.write_text(f'[tenants.c]\ntoken_sha256 = ["{_sha("other")}"]\nnamespaces = ["a-*"]\n')
    d.daemon.request_reload()
    wait_until(lambda: d.daemon.data.access is not old, what="the tenants reloaded")
    try:
        res = conn.put_many(NS, [(b"s" * 16, b"after")])
    except OSError:
        res = []
    conn.close()
    assert res and isinstance(res[0], errors.Unauthenticated)
    with Client(d.address, token="other") as c:
        assert c.lookup(NS, [b"s" * 16])[0] == [0]


def test_an_answer_sent_in_full_is_never_a_timeout():
    """send_all's deadline cuts an answer still being sent, not one whose last bytes went out
    just after it."""
    a, b = socket.socketpair()
    with a, b:
        datachannel.send_all(a, [b"x" * 10, b"y" * 5], deadline=time.monotonic() - 1)
        assert b.recv(64) == b"x" * 10 + b"y" * 5


def test_the_deadline_bounds_a_whole_answer_over_tls():
    """Over TLS the buffers go out one sendall each: the deadline bounds them all together (a GET
    answer must end before its lease can expire), and the socket's own timeout is restored."""
    import ssl

    class SlowTLS(ssl.SSLSocket):  # a TLS socket whose peer takes each buffer slowly
        def __init__(self):
            self.timeout_s, self.sent = 5.0, 0

        def gettimeout(self):
            return self.timeout_s

        def settimeout(self, t):
            self.timeout_s = t

        def sendall(self, data, flags=0):
            time.sleep(0.2)
            self.sent += 1

    s = socket.socket.__new__(SlowTLS)
    s.__init__()
    with pytest.raises(TimeoutError):
        datachannel.send_all(s, [b"x"] * 20, deadline=time.monotonic() + 0.5)
    assert s.sent < 20 and s.timeout_s == 5.0


def test_a_put_that_trickles_loses_its_reservation(make_daemon, monkeypatch):
    """Each read of a payload has its own timeout; a PUT whose bytes come one at a time, each
    just within it, must still end: the whole payload has a deadline, and the slot reserved
    for it is freed."""
    monkeypatch.setattr(datachannel, "PAYLOAD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(datachannel, "PAYLOAD_MIN_RATE", 1 << 30, raising=False)  # the deadline: about 1 s
    d = make_daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.daemon.data.addresses[0][len("unix://"):])
    size = 64 * 1024
    s.sendall(_request(OP_PUT, NS.encode(), b"t" * 16, length=size, req_id=1))
    with Client(d.address) as c:
        wait_until(lambda: c.stats().reservations == 1, what="the PUT's slot reserved")
        start = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - start < 8:  # one byte every 0.3 s: each read well within 1 s
                s.send(b"x")
                time.sleep(0.3)
        assert time.monotonic() - start < 6, "the trickle was not cut off"
        wait_until(lambda: c.stats().reservations == 0, what="the slot freed")
        assert c.lookup(NS, [b"t" * 16])[0] == [0]
        c.put(NS, b"t" * 16, b"whole")  # the daemon serves on
        assert c.get(NS, b"t" * 16) == b"whole"
    s.close()


def test_connections_beyond_the_limit_are_closed_at_accept(make_daemon):
    """server.data_max_connections: one connection more is closed at once and counted; the open
    ones keep being served, and a place freed by a closed connection is taken again."""
    d = make_daemon(server={"data_max_connections": 3})
    dc = d.daemon.data
    path = parse_address(next(a for a in dc.addresses if a.startswith("unix://")))[1]
    ping = _request(OP_PING, b"", b"", req_id=7)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        return s

    held = [connect() for _ in range(3)]
    for s in held:
        s.sendall(ping)
        assert _answer(s)[0] == 0
    assert dc.open_connections == 3
    extra = connect()
    status, msg, _, rid = _answer(extra)             # one frame that says why, then the end
    assert (status, rid) == (errors.ResourceExhausted.code.value[0], datachannel.REFUSAL_ID)
    assert "server.data_max_connections" in msg
    assert extra.recv(1) == b""
    assert dc.refused_connections == 1
    with pytest.raises(errors.ResourceExhausted, match="data_max_connections"):  # told at its first round trip
        DataConnection(dc.addresses[0], timeout=5, confirm=True)
    assert dc.refused_connections == 2
    for attach, bytes_path in ((True, "arena"), (False, "grpc")):  # clients turned away go over gRPC
        with Client(d.address, attach=attach, timeout=5) as c:
            c.put(NS, b"k" * 16, b"v" * 100, overwrite=True)
            assert c.get(NS, b"k" * 16) == b"v" * 100
            assert (c.path, c.control) == (bytes_path, "grpc")
            wait_until(lambda: (c.stats().leases, c.stats().reservations) == (0, 0), what="nothing held")
    assert dc.refused_connections == 4
    held[0].sendall(ping)
    assert _answer(held[0])[0] == 0
    held.pop(0).close()
    wait_until(lambda: dc.open_connections == 2, what="the closed connection's place freed")
    again = connect()
    again.sendall(ping)
    assert _answer(again)[0] == 0
    for s in (*held, extra, again):
        s.close()
    wait_until(lambda: dc.open_connections == 0, what="every connection's place freed")


def test_a_client_without_a_data_connection_goes_over_grpc_and_comes_back(make_daemon, monkeypatch):
    """A client that finds the table full, at attach or later with none of its own pooled, makes
    its puts, gets and control calls over gRPC (nothing raised, nothing held) and tries the data
    channel again DATA_RETRY_S later: once a place is free it is back on it."""
    from kvtier import client as client_mod
    monkeypatch.setattr(client_mod, "DATA_RETRY_S", 0.3)
    d = make_daemon(server={"data_max_connections": 2})
    dc = d.daemon.data
    path = parse_address(next(a for a in dc.addresses if a.startswith("unix://")))[1]

    def hold() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        s.sendall(_request(OP_PING, b"", b"", req_id=7))
        assert _answer(s)[0] == 0
        return s

    def works(c, k: bytes) -> None:
        data = k * 4096
        assert c.put_many(NS, [(k, data)], overwrite=True) == [True]
        assert c.get_many(NS, [k]) == [data]
        assert c.lookup(NS, [k])[0] == [1]
        wait_until(lambda: (c.stats().leases, c.stats().reservations) == (0, 0), what="nothing held")

    for attach, data_path in ((False, "data"), (True, "arena")):
        with Client(d.address, attach=attach, timeout=5) as c:
            works(c, b"a" * 16)
            assert (c.path, c.control) == (data_path, "data")
            # later, with no connection of its own pooled: the table full of others'
            for conn in list(c._ops._pool):
                conn.close()
            c._ops._pool.clear()
            wait_until(lambda: dc.open_connections == 0, what="the client's connection gone")
            held = [hold(), hold()]
            refused = dc.refused_connections
            works(c, b"b" * 16)
            assert dc.refused_connections > refused  # it tried, and went over gRPC
            assert (c.path, c.control) == ("grpc" if not attach else "arena", "grpc")
            held.pop().close()
            wait_until(lambda: dc.open_connections == 1, what="a place freed")
            time.sleep(0.4)
            works(c, b"c" * 16)
            assert (c.path, c.control) == (data_path, "data")
            for s in held:
                s.close()
    # full at attach: over gRPC from the start, then back
    wait_until(lambda: dc.open_connections == 0, what="the last client's connections gone")
    held = [hold(), hold()]
    with Client(d.address, attach=False, timeout=5) as c:
        works(c, b"d" * 16)
        assert (c.path, c.control) == ("grpc", "grpc")
        for s in held:
            s.close()
        wait_until(lambda: dc.open_connections == 0, what="places freed")
        time.sleep(0.4)
        works(c, b"e" * 16)
        assert (c.path, c.control) == ("data", "data")


def test_peers_that_never_authenticate_cannot_fill_the_table(make_daemon, tenants_file):
    """With tenants, connections wait for their HELLO; none is cut while the table has room, and
    at a full table each new one cuts off the one waiting longest. A flood of peers without a
    token then cannot keep a client with a token out."""
    d = make_daemon(auth={"tenants_file": tenants_file},
                    server={"data_listen": "127.0.0.1:0", "insecure_tcp": True, "data_max_connections": 16})
    dc = d.daemon.data
    flood = []
    for i in range(24):
        flood.append(_sock(d))
        wait_until(lambda: (len(dc._unauthenticated), dc.refused_connections)
                   == (min(i + 1, 16), max(0, i + 1 - 16)),
                   what="the connection waiting; past 16, the one waiting longest cut off")
    wait_until(lambda: dc.open_connections == 16, what="the cut-off connections' threads gone")
    assert all(_closed(s) for s in flood[:8]) and all(_still_open(s) for s in flood[8:])
    _serves(d)  # a client with a token: gets in (cutting off one more), is served
    assert dc.refused_connections == 9 and _closed(flood[8])
    assert all(_still_open(s) for s in flood[9:])
    for s in flood:
        s.close()
    wait_until(lambda: dc.open_connections == 0, what="every place freed")


def test_a_probe_cut_short_or_made_stale_leaves_the_client_able_to_come_back(make_daemon, monkeypatch):
    """An AsyncClient call cancelled while its attach probes the data channel, and a probe whose
    attach was renewed meanwhile (Client.attach() of the same daemon): neither leaves the client on
    gRPC for good, and the cancelled probe's connection is closed, not leaked."""
    import asyncio
    import threading
    from kvtier import client as client_mod
    from kvtier.client import AsyncClient
    monkeypatch.setattr(client_mod, "DATA_RETRY_S", 0.2)
    d = make_daemon()
    dc = d.daemon.data
    real = client_mod._Ops._connect_data
    gate, entered = threading.Event(), threading.Event()

    def slow(self, address, version):
        entered.set()
        gate.wait(10)
        return real(self, address, version)
    monkeypatch.setattr(client_mod._Ops, "_connect_data", slow)

    async def cancelled() -> None:
        async with AsyncClient(d.address, attach=False, timeout=5) as c:
            task = asyncio.ensure_future(c.put(NS, b"p" * 16, b"x" * 100))
            assert await asyncio.to_thread(entered.wait, 10)
            task.cancel()
            await asyncio.sleep(0.05)
            gate.set()  # the probe's connect ends after its caller gave up
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: dc.open_connections == 0, 10,
                                    "the abandoned probe's connection closed")
            assert (c.path, c.control) == ("grpc", "grpc")
            await asyncio.sleep(0.3)
            await c.put(NS, b"q" * 16, b"y" * 100)  # the retry, due now
            assert (c.path, c.control) == ("data", "data")
    asyncio.run(cancelled())

    gate.clear(), entered.clear()
    with Client(d.address, attach=False, timeout=5) as c:
        t = threading.Thread(target=c.lookup, args=(NS, [b"r" * 16]))  # attaches, and waits in its probe
        t.start()
        assert entered.wait(10)
        c.attach()  # the same daemon attached anew meanwhile
        gate.set()
        t.join(10)
        time.sleep(0.3)
        c.put(NS, b"r" * 16, b"z" * 100)
        assert (c.path, c.control) == ("data", "data")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("op", ["get", "put"])
def test_a_batch_larger_than_the_socket_buffers_does_not_deadlock(make_daemon, monkeypatch, op, version):
    """A client that sent a whole large batch before reading any answer blocked in send once the
    socket buffers held the answers the daemon had sent meanwhile (which then blocked sending
    more, and stopped reading): with Linux's default buffer limit (212 KiB, which caps the 4 MiB
    asked for) a get_many of 15,000 keys of a remote client failed at its deadline."""
    monkeypatch.setattr(datachannel, "SOCK_BUF", 212992)
    d = make_daemon()
    n = 20000 if version == 2 else 6000
    keys = [hashlib.sha256(b"%d" % i).digest()[:16] for i in range(n)]
    with Client(d.address, attach=False, timeout=10) as c:
        c.attach()
        assert c.path == "data"
        conn = c._ops._data_conn()
        conn.version = version  # as to a daemon of data_channel_version 1 (single frames)
        try:
            t0 = time.monotonic()
            if op == "put":
                out = conn.put_many("ns", [(k, b"x" * 512) for k in keys])
                assert all(isinstance(r, datachannel.PutResult) for r in out)
            else:
                assert conn.get_many("ns", keys) == [None] * n  # all missing: small answers, many
            assert time.monotonic() - t0 < 8
        finally:
            conn.close()
