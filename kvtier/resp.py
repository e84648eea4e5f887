"""RESP2 over asyncio: a pipelined Redis/Valkey connection that reads large values in place.

The cluster tier moves multi-megabyte values. redis-py's asyncio reader takes
each one through a StreamReader and its parser in 64 KiB steps and copies it
four or five times; ``bench/cluster.py`` measures the difference. This
connection is an ``asyncio.BufferedProtocol``: small replies are parsed from
one scratch buffer, and the payload of a large bulk reply is ``recv_into``'d
once, straight into a buffer chosen by the caller when the reply's length
arrives (an arena slot, or one buffer per block). TLS works the same way (the
SSL transport feeds buffered protocols too). Everything else about Redis
(URLs, key slots, the benchmark's baseline, the tests' raw clients) is
redis-py's.

Contract:

* ``await Connection.open(host, port, ...)`` connects, authenticates
  (``AUTH [user] password``) and selects the database, all within ``timeout``;
  it raises ``OSError``/``TimeoutError`` (which says so) for the network and ``ReplyError``
  for a refused AUTH or SELECT.
* ``request(cmds, sinks)`` writes a pipeline at once and returns a future of
  its replies, in order: ``bytes`` (bulk), ``None`` (nil), ``int``, ``str``
  (simple string), ``list`` (array) or a ``ReplyError`` *value* (an error
  reply: the connection stays usable). It never blocks; ``await drain()``
  waits while the socket's write buffer is above its high-water mark.
* ``sinks[i]``, when given, receives the i-th reply if it is a bulk string:
  ``sink.begin(n, head)`` gets its length and its first ``min(n, HEAD)``
  bytes and returns a writable buffer of at least ``n - len(head)`` bytes for
  the rest; the reply's value is then the sink itself.
* A cancelled request's replies are still consumed in order, so the
  connection stays in step; its sinks may still be written to. A caller that
  lends its own memory to sinks does so within ``with Lending():``: the
  requests with sinks made in that context (and in the tasks it starts) are
  recorded, and leaving it *disowns* those not answered yet, on every
  connection: their futures are cancelled, and the rest of a reply being
  received into a sink right now, as well as each later reply meant for one
  of their sinks, is read into scratch memory and dropped. The connection
  stays in step and goes on serving its other requests; the lent memory is
  not written after the ``with`` ends. A request with sinks made under a
  ``Lending`` that ended is refused (its future is cancelled, nothing is
  sent).
* When the connection dies every pending future fails with
  ``ConnectionError`` and ``closed`` becomes true; ``Aborted`` (a
  ``ConnectionError``) when this process dropped it (``abort()``), which says
  nothing about the server. Nothing here reconnects: that policy belongs to
  the tier.
* ``last_read`` is the ``time.monotonic()`` of the last bytes received (0.0
  before any): how a caller tells a server that is slow to finish from one
  that sends nothing.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import socket
import time

HEAD = 4096                 # bytes of a sunk bulk reply handed to sink.begin()
SCRATCH = 256 * 1024        # initial parse buffer; grows for larger small replies
# Arguments at least this long are written without a copy, as writes of their own; shorter
# ones are joined with the command around them into one write. ClusterTier puts against one
# valkey-server (4 in flight; docs/history/cluster.md): 128 KiB values sent as three writes
# (head, value, tail) stored at 0.73-2.03 GB/s, as one at 2.34-2.49; 512 KiB at 2.49-4.05
# and 4.12-4.99.
_BIG = 1024 * 1024
_CRLF = b"\r\n"


class ReplyError(Exception):
    """An error reply (-ERR, -MOVED, -WRONGPASS, ...), returned as a value."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]

    @property
    def redirect(self) -> tuple[int, str, int] | None:
        """(slot, host, port) of a MOVED or ASK reply, else None."""
        parts = str(self).split()
        if len(parts) == 3 and parts[0] in ("MOVED", "ASK"):
            host, _, port = parts[2].rpartition(":")
            return int(parts[1]), host, int(port)
        return None


class Aborted(ConnectionError):
    """The connection was dropped by this process (abort()), not by the server."""


class _Incomplete(Exception):
    pass


_DROP = object()  # the sink of a disowned reply: its payload is read aside and dropped

# the Lending of the context a request is made in (set by ``with Lending():``)
_LENDING: contextvars.ContextVar = contextvars.ContextVar("kvtier_resp_lending", default=None)


class Lending:
    """Requests with sinks made while a caller lends its memory; see the module's contract.

    ``with Lending():`` records them (a task started inside shares the record) and on leaving
    disowns every one not answered yet; ``disown()`` does the same at any time."""
    __slots__ = ("requests", "closed", "_token")

    def __init__(self):
        self.requests: list[tuple[Connection, _Pending]] = []
        self.closed = False
        self._token = None

    def __enter__(self) -> "Lending":
        self._token = _LENDING.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _LENDING.reset(self._token)
        self.disown()

    def disown(self) -> None:
        """No reply of these requests is written into their sinks from now on; later requests
        with sinks made under this Lending are refused."""
        self.closed = True
        requests, self.requests = self.requests, []
        for conn, p in requests:
            conn._disown(p)


class _Pending:
    __slots__ = ("fut", "replies", "left", "sinks", "weight")

    def __init__(self, fut, n, sinks, weight):
        self.fut, self.replies, self.left, self.sinks, self.weight = fut, [], n, sinks, weight


def _retrieved(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a caller that gave up on a request must not leave a warning behind


def _arg(a) -> bytes | memoryview | tuple:
    if isinstance(a, (bytes, bytearray, memoryview, tuple)):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, int):
        return str(a).encode()
    raise TypeError(f"cannot send {type(a).__name__}")


def encode(cmds) -> list:
    """Wire chunks for a pipeline. An argument may be a tuple of buffers sent back to back
    (one bulk string); arguments of _BIG bytes or more stay views of the caller's memory."""
    out: list = []
    small: list = []
    for cmd in cmds:
        small.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            a = _arg(a)
            pieces = a if isinstance(a, tuple) else (a,)
            small.append(b"$%d\r\n" % sum(len(p) for p in pieces))
            for p in pieces:
                if len(p) >= _BIG:
                    out.append(b"".join(small))
                    small = []
                    out.append(p)
                else:
                    small.append(p)
            small.append(_CRLF)
    if small:
        out.append(b"".join(small))
    return out


class Connection(asyncio.BufferedProtocol):
    def __init__(self):
        self._buf = bytearray(SCRATCH)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._body: memoryview | None = None    # destination being filled by recv_into
        self._body_got = 0
        self._body_value = None
        self._skip = 0                            # CRLF bytes still to drop after a body
        self._paused = False
        self._drainers: list[asyncio.Future] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: BaseException | None = None
        self.inflight = 0                         # bytes requested and not yet answered (approx.)
        self.last_read = 0.0                      # time.monotonic() of the last bytes received
        self.label = ""

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, host: str, port: int, *, ssl=None, server_hostname: str | None = None,
                   username: str = "", password: str = "", db: int = 0, timeout: float = 1.0,
                   sock_buf: int = 0) -> "Connection":
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    cls, host, port, ssl=ssl, server_hostname=(server_hostname or host) if ssl else None)
                conn.label = f"{host}:{port}"
                sock = conn.transport.get_extra_info("socket")
                if sock is not None and sock_buf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf)
                cmds = []
                if password:
                    cmds.append((b"AUTH", username, password) if username else (b"AUTH", password))
                if db:
                    cmds.append((b"SELECT", db))
                if cmds:
                    for r in await conn.request(cmds):
                        if isinstance(r, ReplyError):
                            raise r
            return conn
        except BaseException as e:
            if conn is not None:
                conn.abort()
            if type(e) is TimeoutError and not e.args:  # asyncio.timeout's own: say what timed out
                raise TimeoutError(f"connecting to {host}:{port} took more than {round(timeout * 1000)} ms "
                                   f"(connect_timeout_ms)") from None
            raise

    # ---- requests --------------------------------------------------------------------------

    def request(self, cmds, sinks=None, weight: int = 0) -> asyncio.Future:
        """Write a pipeline; the future gets its replies. weight: bytes it moves (``inflight``)."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieved)
        if self.closed:
            fut.set_exception(self._lost("is closed"))
            return fut
        lending = _LENDING.get() if sinks else None
        if lending is not None and lending.closed:  # its caller gave up: nothing may land in its memory
            fut.cancel()
            return fut
        chunks = encode(cmds)
        p = _Pending(fut, len(cmds), sinks, weight)
        self._pending.append(p)
        if lending is not None:
            lending.requests.append((self, p))
        self.inflight += weight
        for c in chunks:
            self.transport.write(c)
        return fut

    async def drain(self) -> None:
        if self.closed:
            raise self._lost("is closed")
        if self._paused:
            f = asyncio.get_running_loop().create_future()
            self._drainers.append(f)
            await f

    def abort(self) -> None:
        """Drop the connection now: nothing more is read into any buffer."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self._fail(Aborted(f"connection to {self.label} aborted"))

    close = abort

    def _lost(self, how: str) -> ConnectionError:
        """The exception for a request on this closed connection: Aborted if we dropped it."""
        kind = Aborted if isinstance(self.error, Aborted) else ConnectionError
        return kind(f"connection to {self.label} {how}: {self.error}")

    def _disown(self, p: _Pending) -> None:
        """Lending.disown() for one request: its replies still to come are read aside."""
        if not p.fut.done():
            p.fut.cancel()
        if self.closed or p.left == 0:           # answered, or failed with the connection
            return
        if p.sinks:
            p.sinks = [None if s is None else _DROP for s in p.sinks]
        if self._body is not None and self._pending[0] is p:
            # its reply is being received into the caller's memory: read the rest of it (and
            # its CRLF) into the scratch buffer, which holds nothing unparsed meanwhile
            self._skip = len(self._body) - self._body_got + 2
            self._body = self._body_value = None
            self._deliver(None)

    # ---- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self._fail(exc or ConnectionError(f"connection to {self.label} closed by the server"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for f in self._drainers:
            if not f.done():
                f.set_result(None)
        self._drainers.clear()

    def _fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self.error = exc
        self._body = self._body_value = None
        while self._pending:
            p = self._pending.popleft()
            if not p.fut.done():
                p.fut.set_exception(self._lost("lost"))
        for f in self._drainers:
            if not f.done():
                f.set_exception(self._lost("lost"))
        self._drainers.clear()

    def get_buffer(self, sizehint: int):
        if self._body is not None:
            return self._body[self._body_got:]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            n = self._end - self._start
            if self._start:                       # move the unparsed tail to the front
                tail = bytes(self._mv[self._start:self._end])
                self._mv[:n] = tail
            else:                                 # one reply larger than the buffer: grow it
                buf = bytearray(2 * len(self._buf))
                buf[:n] = self._mv[:n]
                self._buf, self._mv = buf, memoryview(buf)
            self._start, self._end = 0, n
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_read = time.monotonic()
        try:
            if self._body is not None:
                self._body_got += nbytes
                if self._body_got < len(self._body):
                    return
                self._body = None
                self._skip = 2
                value, self._body_value = self._body_value, None
                self._deliver(value)
            else:
                self._end += nbytes
            self._parse()
        except Exception as e:  # a protocol violation: the stream cannot be trusted any more
            if self.transport is not None:
                self.transport.abort()
            self._fail(e)

    # ---- parsing ---------------------------------------------------------------------------

    def _deliver(self, value) -> None:
        p = self._pending[0]
        p.replies.append(value)
        p.left -= 1
        if p.left == 0:
            self._pending.popleft()
            self.inflight -= p.weight
            if not p.fut.done():
                p.fut.set_result(p.replies)

    def _parse(self) -> None:
        buf = self._buf
        while True:
            if self._skip:
                take = min(self._skip, self._end - self._start)
                self._start += take
                self._skip -= take
                if self._skip:
                    return
            if self._start == self._end:
                return
            if not self._pending:
                raise ConnectionError(f"unexpected data from {self.label}")
            p = self._pending[0]
            sink = p.sinks[len(p.replies)] if p.sinks else None
            if sink is not None and buf[self._start] == 0x24:  # '$': a bulk reply for a sink
                if not self._start_body(sink):
                    return
                continue
            try:
                value, pos = self._parse_one(self._start)
            except _Incomplete:
                return
            self._start = pos
            self._deliver(value)

    def _line(self, pos: int) -> tuple[bytes, int]:
        i = self._buf.find(_CRLF, pos, self._end)
        if i < 0:
            raise _Incomplete
        return bytes(self._buf[pos + 1:i]), i + 2

    def _parse_one(self, pos: int):
        kind = self._buf[pos]
        line, pos = self._line(pos)
        if kind == 0x24:    # $
            n = int(line)
            if n < 0:
                return None, pos
            if self._end - pos < n + 2:
                raise _Incomplete
            return bytes(self._mv[pos:pos + n]), pos + n + 2
        if kind == 0x2B:    # +
            return line.decode(), pos
        if kind == 0x3A:    # :
            return int(line), pos
        if kind == 0x2D:    # -
            return ReplyError(line.decode(errors="replace")), pos
        if kind == 0x2A:    # *
            n = int(line)
            if n < 0:
                return None, pos
            out = []
            for _ in range(n):
                v, pos = self._parse_one(pos)
                out.append(v)
            return out, pos
        raise ConnectionError(f"bad reply type {chr(kind)!r} from {self.label}")

    def _start_body(self, sink) -> bool:
        """Begin a bulk reply destined to a sink; False when more bytes are needed first."""
        try:
            line, pos = self._line(self._start)
        except _Incomplete:
            return False
        n = int(line)
        if n < 0 or sink is _DROP:               # nil, or a disowned reply: read aside
            self._start = pos
            self._skip = n + 2 if n >= 0 else 0
            self._deliver(None)
            return True
        h = min(n, HEAD)
        if self._end - pos < h:
            return False
        head = bytes(self._mv[pos:pos + h])
        rest = n - h
        dest = memoryview(sink.begin(n, head)).cast("B")[:rest]
        if len(dest) < rest:  # reading on would take the value's tail for the next replies
            raise ConnectionError(f"a reply of {n} bytes from {self.label} had {len(dest)} bytes to land in")
        pos += h
        avail = min(self._end - pos, rest)
        if avail:
            dest[:avail] = self._mv[pos:pos + avail]
        self._start = pos + avail
        if avail == rest:
            self._skip = 2
            self._deliver(sink)
        else:
            self._body, self._body_got, self._body_value = dest, avail, sink
        return True
