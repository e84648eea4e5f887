"""The framed data channel: block bytes inline at socket speed, beside gRPC.

Python gRPC moves a 2 MiB message at a fraction of what the socket can carry,
so bulk bytes for clients that cannot map the arena travel on this plain
framed protocol (docs/PROTOCOL.md has the frames). The server receives a PUT's
payload straight into its reserved arena slot with ``recv_into`` and sends a
GET's payload straight from the leased slot with ``sendmsg``: no copy in
Python on either side. Reservations, commits and leases are the hot tier's,
exactly as for the zero-copy path, so both paths share one set of rules.

Request  (24 bytes + ns + key [+ 16-byte checksum] [+ payload]):
    <4s B B B B Q Q   magic b"KVD1", op, flags, ns_len, key_len, length, req_id
Response (40 bytes + message + payload):
    <4s B B H Q Q 16s magic b"KVR1", status, info, msg_len, length, req_id, checksum

op: 1 PUT, 2 GET, 3 PING, 4 HELLO (payload: bearer token; required first when
the daemon has tenants), 5 CALL (a unary RPC: the namespace field holds the
method name, the payload its serialized kvtier.v1 request; the answer's
payload is the serialized response), 6 PUT_MANY and 7 GET_MANY (version 2,
below). flags: bit0 overwrite, bit1 checksum follows; GET_MANY (version 3):
bit2 uncounted and bit3 tokens per key, as AcquireRequest's fields of those
names (with bit3, a ``<I tokens_per_key>`` ends the manifest). status: the gRPC status
code number (0 OK). info: PUT: 0 stored, 1 already present, 2 pending
elsewhere; GET: the tier (0 missing, 1 RAM).

Version 2 (Attach's ``data_channel_version``) batches many blocks in one frame, so
a batch of small blocks pays one header, one reservation or lease and one commit
instead of one of each per block. The request's key is empty and ``length`` is
the size of a manifest that follows the namespace: ``<I count>`` and per block
``<B key_len> key`` (PUT_MANY: then ``<Q size>`` and, with flag bit1, its 16-byte
checksum). PUT_MANY's payloads follow the manifest, back to back. The answer's
``length`` is the size of a table that follows its message, one entry per block:
PUT_MANY ``<B status><B info><H msg_len><16s checksum>`` + message, GET_MANY
``<B status><B tier><H msg_len><Q length><16s checksum>`` + message; GET_MANY's
block bytes follow the table, in order, for the entries with status 0 and a
tier. A batch is one reservation: a commit that fails (a checksum mismatch under
"sync") fails every block that was written in it.

CALL exists because a unary call through grpc.aio costs several times this
channel's round trip; the daemon runs the gRPC handler itself for it
(``KVTierService.call``), so both transports give the same answers.

A request that breaks framing (bad magic, unknown op, a PUT longer than the
largest block) gets an error response and the connection is closed; any
other error drains the PUT payload and the connection stays usable.

Server: one thread per connection with blocking sockets (the copies release
the GIL); it never runs on the gRPC event loop.
"""
from __future__ import annotations

import collections
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

import grpc

from . import errors
from .commitcheck import hash_at_commit
from .hot import checksum
from .keys import CHECKSUM_SIZE, check_key, check_namespace

log = logging.getLogger("kvtier.data")

REQ = struct.Struct("<4sBBBBQQ")
RESP = struct.Struct("<4sBBHQQ16s")
REQ_MAGIC, RESP_MAGIC = b"KVD1", b"KVR1"
OP_PUT, OP_GET, OP_PING, OP_HELLO, OP_CALL, OP_PUT_MANY, OP_GET_MANY = 1, 2, 3, 4, 5, 6, 7
_OPS = (OP_PUT, OP_GET, OP_PING, OP_HELLO, OP_CALL, OP_PUT_MANY, OP_GET_MANY)
_TIMED = {OP_PUT: "data.PUT", OP_GET: "data.GET", OP_PUT_MANY: "data.PUT_MANY", OP_GET_MANY: "data.GET_MANY"}
VERSION = 3            # what Attach advertises as data_channel_version
MANY_MAX = 1024        # blocks in one PUT_MANY or GET_MANY frame
PUT_ENTRY = struct.Struct("<BBH16s")     # status, info, msg_len, checksum
GET_ENTRY = struct.Struct("<BBHQ16s")    # status, tier, msg_len, length, checksum
COUNT = struct.Struct("<I")
SIZE = struct.Struct("<Q")
IOV_MAX = 1024
MANY_PER_FRAME = 256   # what a client puts in one batched frame: blocks ...
FRAME_BYTES = 16 << 20  # ... and payload bytes
MAX_TOKEN = 4096
F_OVERWRITE, F_CHECKSUM, F_UNCOUNTED, F_TOKENS = 1, 2, 4, 8
SOCK_BUF = 4 << 20
# A pipelined batch keeps at most this many batched frames (or, to a version 1 daemon, single
# requests) unanswered: the daemon answers each before it reads the next, so a client that sent a
# whole large batch before reading would block in send once the socket buffers (212 KiB with
# Linux's defaults) held the answers, while the daemon blocked sending more of them.
IN_FLIGHT_FRAMES = 2
IN_FLIGHT_REQUESTS = 64
PAYLOAD_TIMEOUT_S = 60.0
# a payload holding reserved slots must arrive whole within PAYLOAD_TIMEOUT_S plus its size at this
# rate, however it trickles (each read has PAYLOAD_TIMEOUT_S on its own)
PAYLOAD_MIN_RATE = 1 << 20  # bytes per second
HELLO_TIMEOUT_S = 10.0  # a daemon with tenants closes a connection with no valid HELLO by then
HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake must be over by then, however its bytes trickle
REFUSED_LOG_S = 10.0    # a full connection table (and failed TLS handshakes) logged at most this often
CLOSE_WAIT_S = 2.0      # close() waits this long at most for the connections' threads to end
REFUSAL_ID = 0          # the request id of the frame a connection turned away gets (clients start at 1)
ACCEPT_BACKOFF_S = 0.1  # after a failed accept (EMFILE...): retry, without spinning
_ZERO = bytes(CHECKSUM_SIZE)


class ProtocolError(Exception):
    """Framing is lost; the connection must close."""


class BindError(OSError):
    """A listener could not bind ``address``; ``tcp`` says whether it is the TCP one."""

    def __init__(self, err: OSError, address: str, tcp: bool):
        super().__init__(err.errno, err.strerror or str(err))
        self.address, self.tcp = address, tcp


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill view from sock (blocking); ConnectionError on EOF. Past ``deadline`` (time.monotonic()),
    TimeoutError; the socket's own timeout bounds each read until its last stretch."""
    got, n = 0, len(view)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("payload not received in time")
            if left < PAYLOAD_TIMEOUT_S:
                sock.settimeout(left)
        r = sock.recv_into(view[got:], n - got, flags)
        if r == 0:
            raise ConnectionError("peer closed the connection")
        got += r


def send_all(sock: socket.socket, bufs, deadline: float | None = None) -> None:
    """Send every buffer: gathered by sendmsg (IOV_MAX at a time), partial sends resumed; past
    ``deadline`` (time.monotonic()), TimeoutError. The socket's own timeout bounds each send."""
    bufs = [memoryview(b).cast("B") for b in bufs if len(b)]
    if isinstance(sock, ssl.SSLSocket):
        within = sock.gettimeout()
        try:
            for b in bufs:
                if deadline is not None:  # the deadline bounds the whole answer, not each buffer
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("send timed out")
                    sock.settimeout(left if within is None else min(within, left))
                sock.sendall(b)
        finally:
            if deadline is not None:
                sock.settimeout(within)
        return
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i:i + IOV_MAX])
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        if sent:
            bufs[i] = bufs[i][sent:]
        if i < len(bufs) and deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("send timed out")  # an answer sent in full is not cut short


def _payload_deadline(size: int) -> float:
    return time.monotonic() + PAYLOAD_TIMEOUT_S + size / PAYLOAD_MIN_RATE


def _key_field(key: bytes) -> bytes:
    """A key as a manifest entry starts: its length byte, then the key."""
    if len(key) > 255:
        raise errors.InvalidArgument("key longer than 255 bytes")
    return bytes((len(key),)) + key


def tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(addr: str) -> tuple[int, object]:
    """'unix:///p' or 'tcp://h:p' -> (family, sockaddr)."""
    if addr.startswith("unix://"):
        return socket.AF_UNIX, addr[len("unix://"):]
    if addr.startswith("tcp://"):
        host, _, port = addr[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        return fam, (host, int(port))
    raise ValueError(f"bad data-channel address {addr!r}")


class DataServer:
    """Accepts data-channel connections on a Unix and/or TCP socket."""

    def __init__(self, hot, view: memoryview, verify: str, unix_path: str | None = None,
                 tcp: tuple[str, int] | None = None, socket_mode: int = 0o660, access=None, tls=None,
                 calls=None, max_call_bytes: int = 4 << 20, max_connections: int = 1024, observe=None):
        from .auth import AllowAll
        self.hot, self.view, self.verify = hot, view, verify  # ram.verify_on_commit: "sync", "background", "off"
        self.access = access or AllowAll()
        self.tls = tls  # ssl.SSLContext for TCP connections, or None
        self.calls = calls  # (method, payload, token, peer) -> (status, details, response), or None
        # (method, code, seconds) of each PUT, GET, PUT_MANY and GET_MANY, answered (the RPC
        # metrics, as "data.PUT" ...); CALL frames are timed by the handler they run
        self.observe = observe
        self._timing = threading.local()
        self.max_call_bytes = max_call_bytes
        # connections served at once (each holds a thread); one more is closed at accept
        self.max_connections = max_connections
        self.open_connections = 0
        # closed at accept because max_connections were open, or cut off while waiting to
        # authenticate to make room for a new one at a full table
        self.refused_connections = 0
        self._logged: dict[str, float] = {}  # what _log_limited last logged, and when
        self.stopping = False  # new CALLs are UNAVAILABLE, as gRPC answers new calls while it drains
        self._socks: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        # conn -> when it must have finished its TLS handshake / sent its HELLO (with tenants), or
        # the reaper cuts it off; oldest first (at a full table a new connection cuts off the first)
        self._unauthenticated: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self.addresses: list[str] = []
        try:
            if unix_path:
                try:
                    os.unlink(unix_path)
                except FileNotFoundError:
                    pass
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._socks.append(s)
                try:
                    s.bind(unix_path)
                except OSError as e:
                    raise BindError(e, unix_path, tcp=False) from None
                self.addresses.append(f"unix://{unix_path}")
                os.chmod(unix_path, socket_mode)
            if tcp:
                host, port = tcp
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                self._socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError as e:
                    raise BindError(e, f"{host}:{port}", tcp=True) from None
                h, p = s.getsockname()[:2]
                self.addresses.append(f"tcp://{'[' + h + ']' if ':' in h else h}:{p}")
        except BaseException:
            self.close()  # what was bound before the failure: a daemon that does not start leaves nothing
            raise
        for s in self._socks:
            s.listen(min(socket.SOMAXCONN, max(128, max_connections)))
            threading.Thread(target=self._accept_loop, args=(s,), daemon=True, name="kvtier-data-accept").start()
        threading.Thread(target=self._reap, daemon=True, name="kvtier-data-reaper").start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = lsock.accept()
            except OSError as e:
                if self._closed:
                    return
                # out of file descriptors or memory, or a connection reset before it was accepted:
                # the listener must outlive it (the clients that hold the descriptors go away)
                log.warning("data channel: accept failed: %s", e)
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                full = self.open_connections >= self.max_connections
                cut = full and bool(self._unauthenticated)
                if cut:
                    # a full table with connections still to authenticate (a TLS handshake, a HELLO
                    # with tenants): the one waiting longest makes room, so peers that never
                    # authenticate cannot keep clients out, and none is cut while there is room.
                    # Its thread ends at once; until then the table holds one more.
                    oldest = next(iter(self._unauthenticated))
                    del self._unauthenticated[oldest]
                    _cut(oldest)
                if full:
                    self.refused_connections += 1
                if not full or cut:
                    self.open_connections += 1
            if cut:
                self._log_limited("cut", f"{self.max_connections} connections open (server.data_max_connections), "
                                  "cutting off the one waiting longest to authenticate for each new one")
            elif full:
                self._turn_away(conn)
                self._log_limited("full", f"{self.max_connections} connections open (server.data_max_connections), "
                                  "closing new ones")
                continue
            try:
                tune(conn)
                threading.Thread(target=self._serve_counted, args=(conn,), daemon=True,
                                 name="kvtier-data-conn").start()
            except (OSError, RuntimeError) as e:  # reset already, or no thread to be had: drop this one
                log.warning("data channel: connection dropped: %s", e)
                conn.close()
                with self._lock:
                    self.open_connections -= 1

    def _log_limited(self, kind: str, what: str) -> None:
        """A warning of this kind at most every REFUSED_LOG_S: a flood of connections must not
        become a flood of log lines."""
        now = time.monotonic()
        if now - self._logged.get(kind, float("-inf")) >= REFUSED_LOG_S:
            self._logged[kind] = now
            log.warning("data channel: %s; %d refused so far", what, self.refused_connections)

    def _turn_away(self, conn: socket.socket) -> None:
        """Close a connection past max_connections. Without TLS it first gets one frame that says
        why (request id 0, RESOURCE_EXHAUSTED), sent without waiting: the client raises that in
        place of a bare reset. A TLS client expects a handshake, which would need a thread."""
        if self.tls is None or conn.family == socket.AF_UNIX:
            msg = (f"the daemon serves {self.max_connections} data-channel connections at once "
                   "(server.data_max_connections), all taken").encode()
            try:
                conn.setblocking(False)
                conn.send(RESP.pack(RESP_MAGIC, errors.ResourceExhausted.code.value[0], 0, len(msg), 0,
                                    REFUSAL_ID, _ZERO) + msg)
                # what the client sent already: left unread, TCP would answer the close with a
                # reset, which can reach the client before it reads the frame
                for _ in range(4):
                    if not conn.recv(1 << 16):
                        break
            except OSError:
                pass
        conn.close()

    def _serve_counted(self, conn: socket.socket) -> None:
        try:
            self._serve_wrapped(conn)
        finally:
            with self._lock:
                self.open_connections -= 1

    def _serve_wrapped(self, conn: socket.socket) -> None:
        tls = self.tls is not None and conn.family != socket.AF_UNIX
        if tls:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                with self._lock:
                    if self._closed:  # close() ran meanwhile and did not see this one
                        conn.close()
                        return
                    self._unauthenticated[conn] = time.monotonic() + HANDSHAKE_TIMEOUT_S
                # one deadline for the whole handshake (CPython's do_handshake takes the socket's
                # timeout as that, not per read): a peer trickling its bytes cannot keep this thread
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                conn.do_handshake()  # raises on a bad client cert
                conn.settimeout(None)
            except (OSError, ValueError) as e:
                with self._lock:  # off the list before its descriptor closes
                    waited = self._unauthenticated.pop(conn, None) is not None
                if waited:  # (one cut off, by the reaper or for a new one, was logged then)
                    self._log_limited("tls", f"TLS handshake failed: {e}")
                conn.close()
                return
        with self._lock:
            if tls:
                self._unauthenticated.pop(conn, None)
            if self._closed:  # close() ran meanwhile and did not see this one
                conn.close()
                return
            self._conns.add(conn)
            if self.access.enabled:  # a peer without a token gets HELLO_TIMEOUT_S, then is cut off
                self._unauthenticated[conn] = time.monotonic() + HELLO_TIMEOUT_S
        self._serve(conn)

    def _authenticated(self, conn: socket.socket) -> None:
        with self._lock:
            self._unauthenticated.pop(conn, None)

    def _reap(self) -> None:
        """Shut down the connections that did not authenticate in time (stalled, or trickling
        bytes): their threads end. One thread for the server's life, started with it (a thread
        started on demand could fail to start under the load it is there for)."""
        while not self._closing.wait(min(1.0, HELLO_TIMEOUT_S / 4)):
            now = time.monotonic()
            with self._lock:
                late = [c for c, t in self._unauthenticated.items() if t <= now]
                for c in late:
                    del self._unauthenticated[c]
                    _cut(c)  # under the lock: its thread closes it only after taking it off the list
            if late:
                self._log_limited("late", f"{len(late)} connection(s) cut off: no TLS handshake or HELLO in time")

    def close(self) -> None:
        """Stop listening, shut every connection down and wait (CLOSE_WAIT_S at most) for their
        threads to end. A connection is shut down with the socket's own shutdown and closed by
        its own thread: closing it here could hand its descriptor number to another file while
        that thread still uses it, and SSLSocket's shutdown drops the TLS object first, so a
        send in that gap would go out unencrypted."""
        self._closed = True
        self._closing.set()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:  # under the lock: a thread closes its socket only once off these lists
            for c in list(self._conns) + list(self._unauthenticated):
                _cut(c)
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for a in self.addresses:
            if a.startswith("unix://"):
                try:
                    os.unlink(a[7:])
                except FileNotFoundError:
                    pass

    # ---- one connection -------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        tenant = token = peer = None
        access = self.access  # the tenants tenant was identified by: a reload (SIGHUP) replaces them
        hdr = bytearray(REQ.size + 255 + 255 + CHECKSUM_SIZE)
        hview = memoryview(hdr)
        scratch = _Scratch()
        try:
            while True:
                try:
                    recv_exact(conn, hview[:REQ.size])
                except ConnectionError:
                    return
                magic, op, flags, ns_len, key_len, length, req_id = REQ.unpack_from(hdr)
                self._timing.code = "OK"
                if magic != REQ_MAGIC or op not in _OPS:
                    self._reply(conn, req_id, grpc.StatusCode.INVALID_ARGUMENT, "bad frame: unknown magic or op")
                    return
                if op == OP_CALL:  # authenticated per call by the handler, as over gRPC
                    if length > self.max_call_bytes:
                        self._reply(conn, req_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"call of {length} bytes exceeds the largest accepted "
                                    f"({self.max_call_bytes} bytes)")
                        return
                    if self.access.enabled and token is None:
                        # its handler would refuse it: drain it rather than hold up to max_call_bytes
                        # for a peer that has not authenticated
                        self._drain(conn, ns_len + key_len + length, scratch)
                        self._refuse(conn, req_id)
                        continue
                    if peer is None:
                        peer = _peer(conn)
                    self._call(conn, req_id, ns_len + key_len, length, token, peer)
                    continue
                if op == OP_HELLO:
                    if length > MAX_TOKEN:
                        self._reply(conn, req_id, grpc.StatusCode.INVALID_ARGUMENT, "token too long")
                        return
                    tok = bytearray(length)
                    recv_exact(conn, memoryview(tok))
                    access = self.access  # the tenants the token is checked against (a reload swaps them)
                    try:
                        token = tok.decode("utf-8", "replace")
                        tenant = access.identify(token)
                    except errors.KvtierError as e:
                        self._reply(conn, req_id, e.code, str(e))
                        return
                    self._authenticated(conn)
                    self._reply(conn, req_id, grpc.StatusCode.OK, "")
                    continue
                if access is not self.access:  # tenants reloaded: the token must still be valid
                    access = self.access
                    try:
                        tenant = access.identify(token) if token is not None else None
                    except errors.KvtierError as e:
                        self._reply(conn, req_id, e.code, str(e))
                        return
                if self.access.enabled and tenant is None:
                    self._reply(conn, req_id, grpc.StatusCode.UNAUTHENTICATED,
                                "send HELLO with a bearer token first")
                    return
                t0 = time.perf_counter()
                if op in (OP_PUT_MANY, OP_GET_MANY):
                    recv_exact(conn, hview[REQ.size:REQ.size + ns_len])
                    ns = bytes(hview[REQ.size:REQ.size + ns_len]).decode("utf-8", "replace")
                    got = self._manifest(conn, req_id, op, flags, key_len, length)
                    if got is None:
                        return  # framing lost: answered, and the connection closes
                    entries, tokens = got
                    if op == OP_PUT_MANY:
                        self._put_many(conn, req_id, ns, entries, flags, scratch, tenant)
                    else:
                        self._get_many(conn, req_id, ns, entries, tenant, not flags & F_UNCOUNTED, tokens)
                    self._timed(op, t0)
                    continue
                extra = ns_len + key_len + (CHECKSUM_SIZE if flags & F_CHECKSUM else 0)
                recv_exact(conn, hview[REQ.size:REQ.size + extra])
                p = REQ.size
                ns = bytes(hview[p:p + ns_len]).decode("utf-8", "replace")
                key = bytes(hview[p + ns_len:p + ns_len + key_len])
                given = bytes(hview[p + ns_len + key_len:p + extra]) if flags & F_CHECKSUM else b""
                if op == OP_PING:
                    self._reply(conn, req_id, grpc.StatusCode.OK, "")
                elif op == OP_PUT:
                    if length > self.hot.max_block_bytes:
                        self._reply(conn, req_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"block of {length} bytes exceeds the largest accepted "
                                    f"({self.hot.max_block_bytes} bytes)")
                        return
                    self._put(conn, req_id, ns, key, length, bool(flags & F_OVERWRITE), given, scratch, tenant)
                    self._timed(op, t0)
                else:
                    self._get(conn, req_id, ns, key, tenant)
                    self._timed(op, t0)
        except (ConnectionError, OSError):
            return
        except Exception:  # a bug must not kill the daemon; the connection is lost
            log.exception("data channel connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._unauthenticated.pop(conn, None)
            conn.close()

    def _timed(self, op: int, t0: float) -> None:
        """A PUT, GET or batch answered: into the RPC metrics (its status: the first error it
        answered, else OK; a batch's per-block errors are in its table)."""
        if self.observe is not None:
            self.observe(_TIMED[op], self._timing.code, time.perf_counter() - t0)

    def _reply(self, conn, req_id, code, msg, info=0, length=0, digest=_ZERO, payload=None) -> None:
        m = msg.encode()[:65535]
        head = RESP.pack(RESP_MAGIC, code.value[0], info, len(m), length, req_id, digest) + m
        conn.sendall(head)
        if payload is not None:
            conn.sendall(payload)
        if code != grpc.StatusCode.OK:
            self._timing.code = code.name  # the frame's status, for the RPC metrics

    def _refuse(self, conn, req_id) -> None:
        """Answer as a handler does a caller without a token (UNAUTHENTICATED)."""
        try:
            self.access.identify(None)
        except errors.KvtierError as e:
            self._reply(conn, req_id, e.code, str(e))
            return
        raise AssertionError("no token accepted")

    def _call(self, conn, req_id, name_len, length, token, peer) -> None:
        body = bytearray(name_len + length)
        recv_exact(conn, memoryview(body))
        method = bytes(body[:name_len]).decode("ascii", "replace")
        if self.calls is None:
            self._reply(conn, req_id, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        if self.stopping:
            self._reply(conn, req_id, grpc.StatusCode.UNAVAILABLE, "the daemon is stopping")
            return
        code, details, resp = self.calls(method, bytes(body[name_len:]), token, peer)
        if code != grpc.StatusCode.OK:
            self._reply(conn, req_id, code, details)
            return
        # one send (header and the small message together): one wake-up of the reader
        conn.sendall(RESP.pack(RESP_MAGIC, 0, 0, 0, len(resp), req_id, _ZERO) + resp)

    def _drain(self, conn, n: int, scratch: "_Scratch", deadline: float | None = None) -> None:
        buf = scratch.view() if n else None
        while n:
            k = min(n, len(buf))
            recv_exact(conn, buf[:k], deadline)
            n -= k

    def _manifest(self, conn, req_id, op, flags, key_len, length) -> tuple[list[tuple[bytes, int, bytes]], int] | None:
        """A PUT_MANY / GET_MANY manifest as (key, size, checksum) per block, and the tokens per
        key a GET_MANY gave (F_TOKENS; else 0); None (answered) when it breaks framing: the
        payloads that follow could not be told apart."""
        per = 1 + 255 + (SIZE.size + CHECKSUM_SIZE if op == OP_PUT_MANY else 0)
        trailer = COUNT.size if op == OP_GET_MANY and flags & F_TOKENS else 0
        if key_len or length < COUNT.size + trailer or length > COUNT.size + MANY_MAX * per + trailer:
            self._reply(conn, req_id, grpc.StatusCode.INVALID_ARGUMENT,
                        f"bad frame: manifest of {length} bytes (at most {MANY_MAX} blocks)")
            return None
        man = bytearray(length)
        recv_exact(conn, memoryview(man))
        (n,), p, out = COUNT.unpack_from(man), COUNT.size, []
        tokens = COUNT.unpack_from(man, len(man) - trailer)[0] if trailer else 0
        end = len(man) - trailer
        given_n = CHECKSUM_SIZE if op == OP_PUT_MANY and flags & F_CHECKSUM else 0
        try:
            if n > MANY_MAX:
                raise ValueError(f"{n} blocks (at most {MANY_MAX})")
            for _ in range(n):
                k = man[p]
                key = bytes(man[p + 1:p + 1 + k])
                p += 1 + k
                size = 0
                if op == OP_PUT_MANY:
                    (size,) = SIZE.unpack_from(man, p)
                    p += SIZE.size
                    if size > self.hot.max_block_bytes:
                        self._reply(conn, req_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"block of {size} bytes exceeds the largest accepted "
                                    f"({self.hot.max_block_bytes} bytes)")
                        return None
                given = bytes(man[p:p + given_n])
                p += given_n
                if len(key) != k or len(given) != given_n or p > end:
                    raise ValueError("truncated")
                out.append((key, size, given))
            if p != end:
                raise ValueError(f"{end - p} bytes left over")
        except (ValueError, IndexError, struct.error) as e:
            self._reply(conn, req_id, grpc.StatusCode.INVALID_ARGUMENT, f"bad frame: manifest: {e}")
            return None
        return out, tokens

    def _table(self, conn, req_id, entries: list[bytes], payloads=(), within: float | None = None) -> None:
        table = b"".join(entries)
        bufs = [RESP.pack(RESP_MAGIC, 0, 0, 0, len(table), req_id, _ZERO) + table, *payloads]
        if within is None:
            send_all(conn, bufs)
            return
        conn.settimeout(within)
        send_all(conn, bufs, time.monotonic() + within)
        conn.settimeout(None)

    def _put_many(self, conn, req_id, ns, entries, flags, scratch, tenant) -> None:
        n = len(entries)
        codes: list = [None] * n    # per block: a KvtierError, or None
        infos, digests = [0] * n, [_ZERO] * n
        try:
            check_namespace(ns)
            self.access.authorize(tenant, ns)
        except errors.KvtierError as e:
            self._drain(conn, sum(size for _, size, _ in entries), scratch)
            self._reply(conn, req_id, e.code, str(e))
            return
        valid = []
        for i, (key, size, _) in enumerate(entries):
            try:
                check_key(key)
                if size == 0:
                    raise errors.InvalidArgument("block size must be >= 1 byte")
                valid.append(i)
            except errors.KvtierError as e:
                codes[i] = e
        slots: dict[int, int] = {}
        r = None
        if valid:
            try:
                r = self.hot.reserve(ns, [entries[i][0] for i in valid], [entries[i][1] for i in valid],
                                     overwrite=bool(flags & F_OVERWRITE), expires=False)
                for pos, i in enumerate(valid):
                    if r.status[pos] == 0:
                        slots[i] = r.offsets[pos]
                    else:
                        infos[i] = r.status[pos]
            except errors.KvtierError as e:
                for i in valid:
                    codes[i] = e
        written = [i for i in valid if i in slots]
        given = b"".join(entries[i][2] for i in written)
        computed: list[bytes] | None = [] if written and hash_at_commit(self.verify, given) else None
        try:
            conn.settimeout(PAYLOAD_TIMEOUT_S)  # a client stalled mid-payload must not hold the slots forever
            by = _payload_deadline(sum(size for _, size, _ in entries))  # nor one that trickles
            for i, (_, size, _) in enumerate(entries):
                off = slots.get(i)
                if off is None:
                    self._drain(conn, size, scratch, by)
                else:
                    recv_exact(conn, self.view[off:off + size], by)
                    if computed is not None:  # hashed now, while the block is in cache
                        computed.append(checksum(self.view[off:off + size]))
            conn.settimeout(None)
        except BaseException:
            if r is not None and r.reservation_id:
                self.hot.discard(r.reservation_id)
            raise
        if written:
            try:
                self.hot.begin_commit(r.reservation_id)
                self.hot.drop_replaced(r.reservation_id)
                got = self.hot.finish_commit(r.reservation_id, computed, given)
                for k, i in enumerate(written):
                    digests[i] = got[k * CHECKSUM_SIZE:(k + 1) * CHECKSUM_SIZE]
            except errors.KvtierError as e:
                self.hot.discard(r.reservation_id)
                for i in written:
                    codes[i] = e
        out = []
        for i in range(n):
            e = codes[i]
            m = str(e).encode()[:65535] if e is not None else b""
            out.append(PUT_ENTRY.pack(e.code.value[0] if e is not None else 0, infos[i], len(m), digests[i]) + m)
        self._table(conn, req_id, out)

    def _get_many(self, conn, req_id, ns, entries, tenant, counted: bool = True, tokens_per_key: int = 0) -> None:
        try:
            check_namespace(ns)
            self.access.authorize(tenant, ns)
        except errors.KvtierError as e:
            self._reply(conn, req_id, e.code, str(e))
            return
        n = len(entries)
        found: list = [None] * n     # per block: (tier, bytes, checksum), a KvtierError, or None
        rest = []
        for i, (key, _, _) in enumerate(entries):
            try:
                check_key(key)
                found[i] = self.hot.read_inline(ns, key)
                if found[i] is None:
                    rest.append(i)
            except errors.KvtierError as e:
                found[i] = e
        a = None
        if rest:
            try:
                a = self.hot.acquire_blocking(ns, [entries[i][0] for i in rest], counted=counted)
                for pos, i in enumerate(rest):
                    if a.tiers[pos]:
                        off, ln = a.offsets[pos], a.lengths[pos]
                        found[i] = (a.tiers[pos], self.view[off:off + ln],
                                    a.checksums[pos * CHECKSUM_SIZE:(pos + 1) * CHECKSUM_SIZE])
            except errors.KvtierError as e:
                for i in rest:
                    found[i] = e
        self.hot.count_tokens_saved(ns, tokens_per_key * sum(isinstance(f, tuple) for f in found))
        try:
            table, payloads = [], []
            for f in found:
                if isinstance(f, errors.KvtierError):
                    m = str(f).encode()[:65535]
                    table.append(GET_ENTRY.pack(f.code.value[0], 0, len(m), 0, _ZERO) + m)
                elif f is None:
                    table.append(GET_ENTRY.pack(0, 0, 0, 0, _ZERO))
                else:
                    table.append(GET_ENTRY.pack(0, f[0], 0, len(f[1]), f[2]))
                    payloads.append(f[1])
            self._table(conn, req_id, table, payloads, _send_limit(a.lease_ms if a is not None and a.lease_id else 0))
        finally:
            if a is not None and a.lease_id:
                try:
                    self.hot.release(a.lease_id)
                except errors.KvtierError:
                    pass

    def _put(self, conn, req_id, ns, key, length, overwrite, given, scratch, tenant) -> None:
        try:
            check_namespace(ns)
            check_key(key)
            self.access.authorize(tenant, ns)
            if length == 0:
                raise errors.InvalidArgument("block size must be >= 1 byte")
            r = self.hot.reserve(ns, [key], [length], overwrite=overwrite, expires=False)
        except errors.KvtierError as e:
            self._drain(conn, length, scratch)
            self._reply(conn, req_id, e.code, str(e))
            return
        if r.reservation_id == 0:  # present or pending: nothing to write
            self._drain(conn, length, scratch)
            self._reply(conn, req_id, grpc.StatusCode.OK, "", info=r.status[0])
            return
        off = r.offsets[0]
        try:
            conn.settimeout(PAYLOAD_TIMEOUT_S)  # a client stalled mid-payload must not hold the slot forever
            recv_exact(conn, self.view[off:off + length], _payload_deadline(length))  # nor one that trickles
            conn.settimeout(None)
        except BaseException:
            self.hot.discard(r.reservation_id)
            raise
        try:
            self.hot.begin_commit(r.reservation_id)
            self.hot.drop_replaced(r.reservation_id)
            computed = [checksum(self.view[off:off + length])] if hash_at_commit(self.verify, given) else None
            digest = self.hot.finish_commit(r.reservation_id, computed, given)
        except errors.KvtierError as e:
            self.hot.discard(r.reservation_id)
            self._reply(conn, req_id, e.code, str(e))
            return
        self._reply(conn, req_id, grpc.StatusCode.OK, "", info=0, digest=digest)

    def _get(self, conn, req_id, ns, key, tenant) -> None:
        try:
            check_namespace(ns)
            check_key(key)
            self.access.authorize(tenant, ns)
            inline = self.hot.read_inline(ns, key)
            if inline is not None:
                tier, data, digest = inline
                self._reply(conn, req_id, grpc.StatusCode.OK, "", info=tier, length=len(data), digest=digest,
                            payload=data)
                return
            a = self.hot.acquire_blocking(ns, [key])
        except errors.KvtierError as e:
            self._reply(conn, req_id, e.code, str(e))
            return
        if not a.lease_id:
            self._reply(conn, req_id, grpc.StatusCode.OK, "", info=0)
            return
        off, n = a.offsets[0], a.lengths[0]
        try:
            conn.settimeout(_send_limit(a.lease_ms))
            self._reply(conn, req_id, grpc.StatusCode.OK, "", info=a.tiers[0], length=n, digest=a.checksums,
                        payload=self.view[off:off + n])
            conn.settimeout(None)
        finally:
            try:
                self.hot.release(a.lease_id)
            except errors.KvtierError:
                pass


def _cut(conn: socket.socket) -> None:
    """Shut a connection down so its thread's reads and writes fail and it ends; the socket's own
    shutdown, not SSLSocket's (which drops the TLS object under a thread still using it)."""
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass


def _send_limit(lease_ms: int) -> float:
    """Seconds an answer may take to send: a client that does not read it loses its connection
    (and the thread and lease it held) well before a lease on the bytes could expire under the send,
    letting their slot be reused."""
    return min(PAYLOAD_TIMEOUT_S, lease_ms / 3000) if lease_ms else PAYLOAD_TIMEOUT_S


class _Scratch:
    """A connection's buffer for the payloads it reads past (refused PUTs), made at its first
    use: made at accept, every connection held its MiB, an idle or unauthenticated one too."""
    __slots__ = ("_view",)
    SIZE = 1 << 20

    def __init__(self):
        self._view: memoryview | None = None

    def view(self) -> memoryview:
        if self._view is None:
            self._view = memoryview(bytearray(self.SIZE))
        return self._view


def _peer(conn: socket.socket) -> str:
    """The caller as gRPC names a peer ('unix:...', 'ipv4:h:p', 'ipv6:[h]:p')."""
    if conn.family == socket.AF_UNIX:
        return f"unix:{conn.getsockname()}"
    h, p = conn.getpeername()[:2]
    return f"ipv6:[{h}]:{p}" if conn.family == socket.AF_INET6 else f"ipv4:{h}:{p}"


# ---- client side ------------------------------------------------------------------------

@dataclass
class PutResult:
    status: int        # 0 stored, 1 already present, 2 pending elsewhere
    checksum: bytes


class DataConnection:
    """One blocking client connection. Not thread-safe: use one per thread."""

    def __init__(self, address: str, timeout: float | None = 30.0, token: str | None = None, tls=None,
                 server_hostname: str | None = None, confirm: bool = False):
        """confirm: without a token (whose HELLO is answered), PING once, so that a connection the
        daemon turns away (server.data_max_connections) raises here, not at its first use."""
        fam, sa = parse_address(address)
        self.timeout = timeout
        self.broken = False  # out of step with the daemon: close, never reuse
        self.owed = 0  # id of a call sent whose answer nobody waited for (read before the next use)
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            tune(self.sock)
            self.sock.connect(sa)
            if tls is not None and fam != socket.AF_UNIX:
                self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname or sa[0])
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
            self._hdr = bytearray(RESP.size)
            self._next = 1
            self.version = 1  # the daemon's data_channel_version (Attach); 2 and up: batched frames
            if token:
                tok = token.encode()
                head, rid = self._request(OP_HELLO, "", b"", len(tok))
                self._greet(head + tok, rid)
            elif confirm:
                self._greet(*self._request(OP_PING, "", b""))
        except BaseException:
            self.sock.close()
            raise

    def _greet(self, frame: bytes, rid: int) -> None:
        """The connection's first round trip. Closed on us, it raises the daemon's reason for
        turning it away when one is waiting unread (the send can fail before it is read)."""
        try:
            self.sock.sendall(frame)
            self._response(rid)
        except OSError:
            refused = self.refusal()
            if refused is not None:
                raise refused from None
            raise

    def close(self) -> None:
        self.sock.close()

    def stop(self) -> None:
        """Shut the connection down from another thread: a read or write blocked on it (or the
        next one) fails at once, and it is unfit for reuse. The socket stays open (its number is
        not reused under the thread) until close()."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the fd itself, under any TLS layer
        except OSError:
            pass  # closed or never connected: nothing moves on it either way

    def _request(self, op: int, ns: str, key: bytes, length: int = 0, flags: int = 0,
                 given: bytes = b"") -> tuple[bytes, int]:
        req_id = self._next
        self._next += 1
        nsb = ns.encode()
        if len(nsb) > 255 or len(key) > 255:
            raise errors.InvalidArgument("namespace or key longer than 255 bytes")
        if given:
            flags |= F_CHECKSUM
        return REQ.pack(REQ_MAGIC, op, flags, len(nsb), len(key), length, req_id) + nsb + key + given, req_id

    def _response(self, req_id: int) -> tuple[int, int, bytes]:
        """Read one response header (+ message); raise on error status. Returns (info, length, digest)."""
        recv_exact(self.sock, memoryview(self._hdr))
        magic, status, info, msg_len, length, rid, digest = RESP.unpack(self._hdr)
        if magic != RESP_MAGIC or (rid != req_id and not (rid == REFUSAL_ID and status)):
            self.broken = True
            raise errors.Internal(f"data channel out of sync (got request {rid}, expected {req_id})")
        msg = b""
        if msg_len:
            msg = bytearray(msg_len)
            recv_exact(self.sock, memoryview(msg))
        if status:
            if rid == REFUSAL_ID:  # the daemon turned this connection away
                self.broken = True
            raise errors.from_status(status, bytes(msg).decode("utf-8", "replace"))
        return info, length, digest

    def refusal(self) -> errors.KvtierError | None:
        """After this connection failed: the daemon's reason for turning it away, when it sent
        one before closing it (looked for without waiting), else None."""
        if isinstance(self.sock, ssl.SSLSocket):
            return None
        try:
            self.sock.setblocking(False)
            got = self.sock.recv(RESP.size + 65535, socket.MSG_PEEK)
        except OSError:
            return None
        if len(got) < RESP.size:
            return None
        magic, status, _, msg_len, _, rid, _ = RESP.unpack_from(got)
        if magic != RESP_MAGIC or rid != REFUSAL_ID or not status:
            return None
        self.broken = True
        return errors.from_status(status, got[RESP.size:RESP.size + msg_len].decode("utf-8", "replace"))

    def call(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """A unary RPC (CALL frame): the serialized request in, the serialized response out;
        an error status raises its KvtierError. ``timeout`` bounds each wait for the daemon
        (default: the connection's)."""
        return self.finish_call(self.start_call(method, request), timeout)

    def start_call(self, method: str, request: bytes) -> int:
        """Send a CALL frame; ``finish_call`` with the id returned reads its answer."""
        head, rid = self._request(OP_CALL, method, b"", len(request))
        self.sock.sendall(head + request)
        return rid

    def finish_call(self, rid: int, timeout: float | None = None) -> bytes:
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
        try:
            _, length, _ = self._response(rid)
            out = bytearray(length)
            if length:
                recv_exact(self.sock, memoryview(out))
        finally:
            if timeout != self.timeout:
                self.sock.settimeout(self.timeout)
        return bytes(out)

    def idle_closed(self) -> bool:
        """True if the daemon closed this idle connection (or sent something unasked): one poll,
        no wait, so a request is never sent on a connection that is already dead."""
        try:
            if not self._poll.poll(0):
                return False
        except (OSError, ValueError):
            return True
        if not isinstance(self.sock, ssl.SSLSocket):
            return True
        timeout = self.sock.gettimeout()  # TLS: the record may be a session ticket, not data
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
            return True  # end of stream, or bytes nobody asked for
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(timeout)

    def _frames(self, sizes: list[int]) -> list[tuple[int, int]]:
        """[i, j) runs of blocks for one batched frame each: at most MANY_PER_FRAME blocks and
        FRAME_BYTES of payload (a block larger than that alone)."""
        out, i = [], 0
        while i < len(sizes):
            j, total = i + 1, sizes[i]
            while j < len(sizes) and j - i < MANY_PER_FRAME and total + sizes[j] <= FRAME_BYTES:
                total += sizes[j]
                j += 1
            out.append((i, j))
            i = j
        return out

    def _many_request(self, op: int, ns: str, entries: list[bytes], flags: int = 0,
                      trailer: bytes = b"") -> tuple[bytes, int]:
        manifest = COUNT.pack(len(entries)) + b"".join(entries) + trailer
        head, rid = self._request(op, ns, b"", len(manifest), flags)
        return head + manifest, rid

    def _read_table(self, rid: int) -> tuple[memoryview | None, errors.KvtierError | None]:
        """A batched frame's answer: its table, or the error that failed the whole frame."""
        try:
            _, length, _ = self._response(rid)
        except errors.KvtierError as e:
            return None, e
        table = memoryview(bytearray(length))
        recv_exact(self.sock, table)
        return table, None

    def put_many(self, ns: str, items, overwrite: bool = False, checksums=None) -> list[PutResult | errors.KvtierError]:
        """Pipelined puts: send every block, then read every answer (errors returned per block).
        A daemon of data_channel_version 2 takes them in PUT_MANY frames."""
        if self.version >= 2:
            return self._put_batched(ns, list(items), overwrite, checksums)
        ids: collections.deque = collections.deque()
        out: list = []

        def answer() -> None:
            try:
                info, _, digest = self._response(ids.popleft())
                out.append(PutResult(info, digest))
            except errors.KvtierError as e:
                out.append(e)
        for i, (key, data) in enumerate(items):
            if len(ids) >= IN_FLIGHT_REQUESTS:
                answer()
            mv = memoryview(data).cast("B")
            head, rid = self._request(OP_PUT, ns, key, len(mv), F_OVERWRITE if overwrite else 0,
                                      checksums[i] if checksums else b"")
            self.sock.sendall(head)
            self.sock.sendall(mv)
            ids.append(rid)
        while ids:
            answer()
        return out

    def _put_batched(self, ns: str, items: list, overwrite: bool, checksums) -> list[PutResult | errors.KvtierError]:
        views = [memoryview(data).cast("B") for _, data in items]
        flags = (F_OVERWRITE if overwrite else 0) | (F_CHECKSUM if checksums else 0)
        sent: collections.deque = collections.deque()
        out: list = []

        def answer() -> None:
            rid, count = sent.popleft()
            table, err = self._read_table(rid)
            if err is not None:
                out.extend([err] * count)
                return
            p = 0
            for _ in range(count):
                code, info, mlen, digest = PUT_ENTRY.unpack_from(table, p)
                p += PUT_ENTRY.size
                if code:
                    out.append(errors.from_status(code, bytes(table[p:p + mlen]).decode("utf-8", "replace")))
                else:
                    out.append(PutResult(info, bytes(digest)))
                p += mlen
        for i, j in self._frames([len(v) for v in views]):
            if len(sent) >= IN_FLIGHT_FRAMES:
                answer()
            entries = [_key_field(items[k][0]) + SIZE.pack(len(views[k])) + (checksums[k] if checksums else b"")
                       for k in range(i, j)]
            head, rid = self._many_request(OP_PUT_MANY, ns, entries, flags)
            send_all(self.sock, [head, *views[i:j]])
            sent.append((rid, j - i))
        while sent:
            answer()
        return out

    def _block(self, i: int, length: int, digest: bytes, into, check) -> tuple[memoryview, bytes] | None:
        """Read block ``i`` of a get (into ``into[i]`` if given) and run ``check`` on it."""
        if into is not None:
            dst = memoryview(into[i]).cast("B")
            if len(dst) < length:
                self.close()  # the rest of the answer is unread: this connection is done
                raise errors.InvalidArgument(f"buffer {i} holds {len(dst)} bytes, block has {length}")
            dst = dst[:length]
        else:
            dst = memoryview(bytearray(length))
        recv_exact(self.sock, dst)
        return (dst, digest) if check is None or check(dst, digest) else None

    def _get_batched(self, ns: str, keys: list, into, check, counted: bool = True,
                     tokens_per_key: int = 0) -> list[tuple[memoryview | bytes, bytes] | None]:
        flags, trailer = 0, b""
        if self.version >= 3:  # an older daemon counts every read, and no tokens
            flags |= 0 if counted else F_UNCOUNTED
            if tokens_per_key:
                flags, trailer = flags | F_TOKENS, COUNT.pack(tokens_per_key)
        sent: collections.deque = collections.deque()
        out: list = []
        errs: list = []

        def answer() -> None:
            rid, count = sent.popleft()
            table, e = self._read_table(rid)
            if e is not None:
                errs.append(e)
                out.extend([None] * count)
                return
            p = 0
            for _ in range(count):
                code, tier, mlen, length, digest = GET_ENTRY.unpack_from(table, p)
                p += GET_ENTRY.size
                if code:
                    errs.append(errors.from_status(code, bytes(table[p:p + mlen]).decode("utf-8", "replace")))
                p += mlen
                if code or not tier:
                    out.append(None)
                    continue
                out.append(self._block(len(out), length, bytes(digest), into, check))
        for i in range(0, len(keys), MANY_PER_FRAME):
            if len(sent) >= IN_FLIGHT_FRAMES:
                answer()
            part = keys[i:i + MANY_PER_FRAME]
            head, rid = self._many_request(OP_GET_MANY, ns, [_key_field(k) for k in part], flags, trailer)
            self.sock.sendall(head)
            sent.append((rid, len(part)))
        while sent:
            answer()
        if errs:
            raise errs[0]
        return out

    def get_many(self, ns: str, keys, into: list | None = None, check=None, counted: bool = True,
                 tokens_per_key: int = 0) -> list[tuple[memoryview | bytes, bytes] | None]:
        """Pipelined gets. Returns per key (data, checksum) or None; with ``into``, data lands in
        the given writable buffers (each at least as long as the block) and a view of them is returned.
        ``check(data, checksum)``, if given, runs on each block as it arrives (while the daemon
        sends the next, and the bytes are in cache); a block it refuses is None. A daemon of
        data_channel_version 2 answers them in GET_MANY frames; ``counted`` and
        ``tokens_per_key`` (as Acquire's) reach a daemon of version 3."""
        if self.version >= 2:
            return self._get_batched(ns, list(keys), into, check, counted, tokens_per_key)
        ids: collections.deque = collections.deque()
        out: list = []
        errs: list = []

        def answer() -> None:
            try:
                info, length, digest = self._response(ids.popleft())
            except errors.KvtierError as e:
                errs.append(e)
                out.append(None)
                return
            out.append(self._block(len(out), length, digest, into, check) if info else None)
        for key in keys:
            if len(ids) >= IN_FLIGHT_REQUESTS:
                answer()
            head, rid = self._request(OP_GET, ns, key)
            self.sock.sendall(head)
            ids.append(rid)
        while ids:
            answer()
        if errs:
            raise errs[0]
        return out

    def ping(self) -> None:
        head, rid = self._request(OP_PING, "", b"")
        self.sock.sendall(head)
        self._response(rid)
