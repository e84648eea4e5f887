"""Client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio), same API.

    with Client() as c:                      # $KVTIER_ADDRESS or the default socket
        c.put_many("team-a", [(key, data), ...])
        blocks = c.get_many("team-a", keys)  # bytes or None per key
        tiers, prefix = c.lookup("team-a", keys)

Three data paths, chosen once per client at first use:

* ``arena``: the daemon's arena file is mappable (same node): Reserve, copy
  into the slots, Commit; Acquire, copy out, Release. Memory speed.
* ``data``: the framed data channel (docs/PROTOCOL.md), socket speed.
* ``grpc``: chunked Put/Get streams, for when nothing else is reachable.

``client.path`` says which. Unary calls (Lookup, Reserve, Commit, Acquire,
Release, ...) travel on the data channel too when the client has one (CALL
frames, a fraction of a grpc.aio round trip) and on gRPC otherwise;
``control="grpc"`` keeps them on gRPC, and ``client.control`` says which.
A put sends each block's xxh3-128, hashed as it is copied; every read is
verified against its checksum (``verify=True``); a mismatch is counted in ``client.checksum_failures``
and returned as a miss, never as data. Batches longer than the daemon's
``max_batch`` are split. Errors are ``kvtier.errors`` types; ``Unavailable``
means the daemon is unreachable and the next call tries again (gRPC
reconnects by itself; data-channel connections are reopened). ``close()``
refuses new calls and gives calls in flight on other threads or tasks up to
CLOSE_WAIT_S to end before it closes their connections: a reservation or lease
answered after close() is aborted or released by its call, which then raises
Unavailable, so the daemon never holds it until its TTL.

Both clients run the same operation code: each operation is a generator
that yields the calls it needs (``("unary", rpc, request)``, ...) and gets
their answers back, so the blocking and the asyncio driver differ only in how
they perform a call. ``("post", rpc, request)`` sends a unary call without
waiting for its answer (True) or declines (False: the operation makes the call).
``("start", rpc, request)`` sends one and returns a handle (None: not sent);
``("finish", handle, rpc, request)`` waits for its answer, or makes the call when
the handle is None: get_many over the arena keeps two Acquires in flight that way.
``("ready", [handle, ...])`` waits until one of several started calls has its
answer and returns its position (0 when none can be waited on): get_many copies
out whichever part the daemon answers first.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import select
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Sequence

import grpc
import xxhash

from . import copying, errors
from .arena import ArenaMapping
from .config import default_address
from .datachannel import DataConnection
from .keys import CHECKSUM_SIZE, ZERO_CHECKSUM, check_namespace, pack_keys
from .v1 import kvtier_pb2 as pb
from .v1 import kvtier_pb2_grpc as pb_grpc

PUT_CHUNK = 1 << 20
POST_TIMEOUT_S = 30.0  # wait for a posted call's answer before reusing its connection
GET_CHUNKS = 4  # a get_many over the arena acquires its keys in this many parts, two in flight...
GET_CHUNK_MIN = 8  # ... of at least this many keys each (fewer keys: one Acquire)
# ... or, after a get_many whose blocks were all in RAM already, of at least this many: the
# parts let the client copy while the daemon reads the next part from NVMe, and for blocks in
# RAM they pay only when the daemon's per-key work of a part outlasts an extra round trip
GET_CHUNK_MIN_RAM = 64
GET_IN_FLIGHT = 2
# A put_many over the arena of at least PUT_SPLIT_KEYS blocks reserves and commits in PUT_PARTS
# parts, so the daemon's per-block work for one part (a few us a block) hides behind the
# copies of another; with fewer (larger) blocks that work is small and, on a machine with few
# cores, the hidden calls only compete with the copy threads (16 x 2 MiB: 8% slower split,
# 512 x 64 KiB: 20% faster, on 2 vCPUs; 4 parts did worse than 2 there).
PUT_PARTS = 2
PUT_SPLIT_KEYS = 64
# Arena copies of a batch this large (and of blocks at least COPY_BLOCK_MIN) are split over
# COPY_THREADS threads: numpy's copy and xxh3 both run without the GIL, so the shares proceed
# side by side, as far as the memory bus allows; smaller batches are not worth the hand-off.
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
COPY_PARALLEL_MIN = 4 << 20
# An AsyncClient copies a batch of at least this many bytes in a worker thread, so its event loop
# serves other tasks meanwhile; a smaller one is quicker than the hand-off
ASYNC_COPY_MIN = 1 << 20
COPY_BLOCK_MIN = 256 << 10
_MAX_MSG = 256 << 20
_RESPONSES = {m.name: getattr(pb, m.output_type.name) for m in pb.DESCRIPTOR.services_by_name["KVTier"].methods}
# a client whose data connection the daemon turned away (all of server.data_max_connections
# taken) or that could not be opened goes over gRPC, and tries the data channel again this much later
DATA_RETRY_S = 5.0
# close() waits this long at most for calls in flight on other threads or tasks to end: each ends at
# its next answer, letting go of what that answer holds, over connections close() has not cut yet
CLOSE_WAIT_S = 2.0
CONTROLS = ("auto", "grpc")  # where unary calls go: the data channel when there is one, or always gRPC
_LOST = (errors.Unavailable, errors.DeadlineExceeded)  # a call's answer lost: what it did is unknown

log = logging.getLogger("kvtier.client")


@dataclass(frozen=True)
class TLS:
    """TLS for TCP addresses: the CA that signed the daemon's certificate, and for mutual TLS
    the client's own certificate and key (PEM file paths)."""
    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # name to check in the daemon's certificate; default: the host

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(p):
            with open(p, "rb") as f:
                return f.read()
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key) if self.key else None,
                                            read(self.cert) if self.cert else None)

    def ssl_context(self):
        import ssl
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def check(self, names: dict[str, str]) -> "TLS":
        """This TLS once its files have been read and parsed, so that a client set up with a
        missing or unreadable file, one that is not PEM, or a key that is not its certificate's
        stops where it starts, with a ConfigError naming the setting (``names``: "ca", "cert"
        and "key" to the settings' names), instead of failing every call as Unavailable."""
        if bool(self.cert) != bool(self.key):
            raise errors.ConfigError(f"{names['cert']} and {names['key']} go together (mutual TLS)")
        for part in ("ca", "cert", "key"):
            path = getattr(self, part)
            try:
                with open(path or os.devnull, "rb"):
                    pass
            except OSError as e:
                raise errors.ConfigError(f"{names[part]}: cannot read {path}: {e.strerror}") from None
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
        except ssl.SSLError:
            raise errors.ConfigError(f"{names['ca']}: {self.ca} is not a PEM certificate (a CA bundle)") from None
        try:
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError:
            raise errors.ConfigError(f"{names['cert']}, {names['key']}: {self.cert} and {self.key} are not a "
                                     "certificate with its key (PEM)") from None
        return self


def _channel(module, address: str, tls: TLS | None):
    target = grpc_target(address)
    opts = [("grpc.max_receive_message_length", _MAX_MSG), ("grpc.max_send_message_length", _MAX_MSG)]
    if tls is not None and not target.startswith("unix:"):
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        return module.secure_channel(target, tls.grpc_credentials(), options=opts)
    return module.insecure_channel(target, options=opts)


def grpc_target(address: str) -> str:
    """'unix:///p', 'unix:/p', 'tcp://h:p' or 'h:p' -> a gRPC target."""
    if address.startswith("tcp://"):
        return address[len("tcp://"):]
    return address


def reachable_data_address(control: str, data: str) -> str:
    """The daemon's data channel as a client that reached its gRPC at ``control`` can reach it,
    or "" (its calls then go over gRPC). A client on the Unix socket takes the address as given;
    one over TCP never a unix:// path (on another node it is that node's own daemon), a wildcard
    host (data_listen = "0.0.0.0:7071") becomes the host it dialled, and a loopback one is
    refused unless it dialled loopback too (else it would reach its own node)."""
    if not data or control.startswith("unix:"):
        return data
    if not data.startswith("tcp://"):
        return ""
    dialled = _host_of(control)
    host, _, port = data[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = dialled
    elif _loopback(host) and not _loopback(dialled):
        return ""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _host_of(address: str) -> str:
    """The host a TCP address ('tcp://h:p', 'h:p', '[v6]:p') dials."""
    return grpc_target(address).rsplit("/", 1)[-1].rpartition(":")[0].strip("[]")


def _token_in_clear(address: str, token: str | None, tls: "TLS | None") -> bool:
    """Whether a bearer token would leave this host unencrypted: sent without TLS over TCP to
    a host that is not loopback (on a Unix socket or loopback it never crosses a network)."""
    return bool(token) and tls is None and not address.startswith("unix:") and not _loopback(_host_of(address))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Reservation:
    """Slots to write (zero-copy put). ``views[i]`` is None for keys that need no write."""
    id: int
    status: bytes
    offsets: list[int]
    sizes: list[int]
    views: list[memoryview | None] = field(default_factory=list)


@dataclass
class Lease:
    """Blocks to read (zero-copy get). ``views[i]`` is None for missing keys."""
    id: int
    tiers: bytes
    offsets: list[int]
    lengths: list[int]
    checksums: list[bytes]
    views: list[memoryview | None] = field(default_factory=list)


def _same_daemon(a: pb.AttachResponse, b: pb.AttachResponse) -> bool:
    """Whether two Attach answers come from one daemon run (same arena, same data channel)."""
    return (a.generation, a.arena_path, a.arena_size, a.data_address) == \
        (b.generation, b.arena_path, b.arena_size, b.data_address)


def _ending(rpc: str, answer) -> tuple[str, Any] | None:
    """The call that ends what an answer to Reserve or Acquire holds (Abort or Release, and its
    request), or None when it holds nothing."""
    if rpc == "Reserve" and answer.reservation_id:
        return "Abort", pb.AbortRequest(reservation_id=answer.reservation_id)
    if rpc == "Acquire" and answer.lease_id:
        return "Release", pb.ReleaseRequest(lease_id=answer.lease_id)
    return None


def _lost(conn: DataConnection, rpc: str, e: BaseException) -> BaseException:
    """A call broke off mid-way: its connection is out of step and closed; what to raise (a lost
    connection is Unavailable, as on gRPC)."""
    conn.close()
    if isinstance(e, (OSError, ConnectionError)):
        return errors.Unavailable(f"{rpc} on the data channel: {e}")
    return e


def _u32(what: str, v: int) -> int:
    """v if the protocol's 32-bit field takes it, else InvalidArgument naming it (not protobuf's
    bare ValueError)."""
    if not 0 <= v <= 0xFFFFFFFF:
        raise errors.InvalidArgument(f"{what} must be 0..{0xFFFFFFFF}, got {v}")
    return v


def _get_chunks(n: int, max_batch: int, least: int = GET_CHUNK_MIN) -> list[tuple[int, int]]:
    """[i, j) ranges a get_many of n keys is acquired in: one below 2 * least keys, else
    GET_CHUNKS about equal ones of at least ``least`` keys (more where max_batch says)."""
    size = n if n < 2 * least else max(least, -(-n // GET_CHUNKS))
    size = max(1, min(size, max_batch))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _put_parts(sizes: list[int]) -> list[tuple[int, int]]:
    """[i, j) ranges a put_many over the arena reserves and commits in: PUT_PARTS of about equal
    bytes for PUT_SPLIT_KEYS blocks or more, else one."""
    n = PUT_PARTS if len(sizes) >= PUT_SPLIT_KEYS else 1
    if n == 1:
        return [(0, len(sizes))]
    total = sum(sizes)
    out, i, acc = [], 0, 0
    for j, size in enumerate(sizes):
        acc += size
        if acc * n >= total * (len(out) + 1) and len(out) < n - 1:
            out.append((i, j + 1))
            i = j + 1
    return out + [(i, len(sizes))]


_copy_pool_lock = threading.Lock()
_copy_pool_: ThreadPoolExecutor | None = None


def _copy_pool() -> ThreadPoolExecutor:
    global _copy_pool_
    with _copy_pool_lock:
        if _copy_pool_ is None:
            _copy_pool_ = ThreadPoolExecutor(COPY_THREADS - 1, thread_name_prefix="kvtier-copy")
        return _copy_pool_


def _copy_all(jobs: list[tuple[memoryview, memoryview, bool]]) -> list[bytes | None]:
    """Copy each (dst, src, hashed) and return the xxh3-128 of those hashed (None for the
    others), in order. A large batch is dealt out over COPY_THREADS threads, this one included;
    it returns (or raises) only when every copy has ended, so no thread writes into a slot
    after the caller has given it back."""
    def run(part):
        return [copying.copy_hashed(d, s) if h else copying.copy_into(d, s) for d, s, h in part]
    k = min(COPY_THREADS, len(jobs))
    if k < 2 or sum(len(s) for _, s, _ in jobs) < COPY_PARALLEL_MIN \
            or min(len(s) for _, s, _ in jobs) < COPY_BLOCK_MIN:
        return run(jobs)
    return copying.spread(_copy_pool(), run, jobs, k)


class _NoDataConnection(errors.Unavailable):
    """No data connection could be had: none pooled, and a new one was turned away or could not
    be opened; the operation makes its call over gRPC instead. (After a first try broken off
    mid-call, puts and gets are made again, as a second try on the data channel would.)"""


class _Probe:
    """Open and confirm a new data connection, as a "call" (an AsyncClient makes it in a worker
    thread, off its event loop): the connection, or None when the daemon turned it away or it
    could not be opened."""

    def __init__(self, ops: "_Ops", address: str, version: int):
        self.ops, self.address, self.version = ops, address, version
        self.lock = threading.Lock()
        self.stopped = False
        self.conn: DataConnection | None = None

    def stop(self) -> None:
        """The caller gave up (a cancelled AsyncClient call): a connection opened is closed, now or
        when its connect ends (which the client's timeout bounds)."""
        with self.lock:
            self.stopped, conn, self.conn = True, self.conn, None
        if conn is not None:
            conn.close()

    def __call__(self) -> "DataConnection | None":
        try:
            conn = self.ops._connect_data(self.address, self.version)
        except (OSError, errors.KvtierError):
            return None
        with self.lock:
            if not self.stopped:
                self.conn = conn
                return conn
        conn.close()
        return None


class _DataCall:
    """fn(conn) on a pooled data connection, run by calling it. A broken connection is dropped,
    and the call is tried once more on a fresh one (puts and gets are idempotent). A timeout is
    DeadlineExceeded at once: the daemon may be alive but stalled, and a second try would only
    double the wait the caller asked for. ``stop()``, from another thread, ends it early: its
    connection is shut down, so the blocking reads and writes fail and no more bytes move
    between the socket and the caller's buffers (a cancelled AsyncClient call)."""

    def __init__(self, ops: "_Ops", fn):
        self.ops, self.fn = ops, fn
        self.stopped = False
        self.conn: DataConnection | None = None
        self.lock = threading.Lock()

    def stop(self) -> None:
        with self.lock:
            self.stopped, conn = True, self.conn
        if conn is not None:
            conn.stop()

    def __call__(self):
        for attempt in (0, 1):
            conn = self.ops._data_conn()
            with self.lock:
                if self.stopped:
                    conn.close()
                    raise errors.Unavailable("data channel: call stopped")
                self.conn = conn
            try:
                out = self.fn(conn)
            except TimeoutError:
                conn.close()
                raise errors.DeadlineExceeded(f"data channel: no answer within {self.ops.timeout}s") from None
            except (OSError, ConnectionError) as e:
                conn.close()
                if attempt or self.stopped:
                    raise errors.Unavailable(f"data channel: {e}") from None
                continue
            except BaseException:
                conn.close()
                raise
            finally:
                with self.lock:
                    self.conn = None
            if self.stopped:  # shut down while it ended: not fit to reuse
                conn.close()
            else:
                self.ops._give_back(conn)
            return out


class _Ops:
    """The operations, written once as generators (see module docstring)."""

    def __init__(self, address: str | None, attach: bool, data_channel: bool, verify: bool,
                 token: str | None = None, tls: "TLS | None" = None, control: str = "auto"):
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {', '.join(CONTROLS)}, not {control!r}")
        self.address = address or default_address()
        self.want_arena, self.want_data, self.verify = attach, data_channel, verify
        self.want_control = control == "auto"
        self.control = ""  # where unary calls go after attach: "data" or "grpc"
        self.token = token if token is not None else os.environ.get("KVTIER_TOKEN") or None
        self.tls = tls
        self.metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        if _token_in_clear(self.address, self.token, tls):  # once per client: its calls all go there
            log.warning("kvtier client: the bearer token goes to %s without TLS, readable by anyone on the "
                        "network path; give the client the daemon's CA (tls=TLS(ca=...), --tls-ca)", self.address)
        self.info: pb.AttachResponse | None = None
        self.arena: ArenaMapping | None = None
        self.path = ""
        self.checksum_failures = 0
        self._count_lock = threading.Lock()  # checksum_failures is counted from many threads
        self.closed = False
        self._calls = 0  # operations in flight (close() gives them CLOSE_WAIT_S to end)
        self._idle = threading.Condition()
        self.timeout: float | None = 30.0  # the client's: bounds each wait for the daemon (None: none)
        self.ram_hits = False  # the last get_many over the arena promoted nothing (GET_CHUNK_MIN_RAM)
        self._pool: list[DataConnection] = []
        self._pool_lock = threading.Lock()
        self._attach_lock = threading.Lock()
        self._retry_at = 0.0  # when to try the data channel again after it was not to be had (0: no need)
        self._attaches = 0  # attaches that mapped or probed anew: a probe of an earlier one is stale

    @contextlib.contextmanager
    def running(self):
        """One operation in flight (a driver's call): refused once the client is closed."""
        with self._idle:
            if self.closed:
                raise errors.Unavailable("the client is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()

    # ---- attach and batching ------------------------------------------------------------

    def _attach(self, force: bool = False):
        """Attach (once, or again with ``force``). Calls in other threads may be using the arena
        and the pooled connections meanwhile: the new arena is mapped before it replaces the
        old one in one assignment, and a mapping is never closed here (it is unmapped once no
        call holds a view of it); an Attach answered by the daemon already attached to changes
        nothing."""
        if self.closed:
            raise errors.Unavailable("the client is closed")
        if self.info is not None and not force:
            if self._retry_at and time.monotonic() >= self._retry_at:
                yield from self._retry_data()
            return self.info
        info = yield ("unary", "Attach", pb.AttachRequest())
        info.data_address = reachable_data_address(self.address, info.data_address)
        with self._attach_lock:  # never held across a yield: an AsyncClient's calls share a thread
            arena = self.arena
            mapped = arena.generation == info.generation if arena is not None else not self.want_arena
            if self.info is not None and (not force or _same_daemon(self.info, info) and mapped):
                self.info = info if force else self.info
                return self.info
            arena = None
            if self.want_arena:
                try:
                    arena = ArenaMapping(info.arena_path, info.arena_size, info.generation)
                except OSError:
                    arena = None
            self.arena = arena
            self.info = info
            with self._pool_lock:  # connections to a daemon from before are dead or soon will be
                old, self._pool = self._pool, []
            for c in old:
                c.close()
            self._retry_at = 0.0
            self._attaches += 1
            attach = self._attaches
            self._data_off()  # until a data connection is confirmed below
            wanted = self.want_data and info.data_address and (arena is None or self.want_control)
        if wanted:
            yield from self._probe(attach, info)
        return info

    def _probe(self, attach: int, info: pb.AttachResponse):
        """Open a data connection for the attach numbered ``attach`` and use it, or try again
        DATA_RETRY_S later: also when the caller is interrupted meanwhile (a cancelled
        AsyncClient call, Ctrl-C), so no interruption leaves the client on gRPC for good."""
        probe = _Probe(self, info.data_address, info.data_channel_version)
        try:
            conn = yield ("call", probe)
        except BaseException:
            probe.stop()
            self._data_on(attach, None)
            raise
        self._data_on(attach, conn)

    def _data_off(self) -> None:
        """Blocks and unary calls over gRPC (the arena's blocks stay in the arena)."""
        self.path = "arena" if self.arena is not None else "grpc"
        self.control = "grpc"

    def _data_on(self, attach: int, conn: "DataConnection | None") -> None:
        """After a probe of the data channel for attach number ``attach``: conn pooled and used, or
        (None) a try again DATA_RETRY_S later, unless another probe got the channel meanwhile."""
        with self._attach_lock:
            if attach != self._attaches:  # attached anew meanwhile: that attach probes for itself
                if conn is not None:
                    conn.close()
                return
            if conn is None:
                if self.path != "data" and self.control != "data" and not self._retry_at:
                    self._retry_at = time.monotonic() + DATA_RETRY_S
                return
            self._retry_at = 0.0
            with self._pool_lock:
                if self.closed:  # closed meanwhile: nothing may stay open
                    conn.close()
                    return
                self._pool.append(conn)
            self.path = "arena" if self.arena is not None else "data"
            self.control = "data" if self.want_control else "grpc"

    def _retry_data(self):
        with self._attach_lock:  # one try at a time: the others go on as they are
            due = self._retry_at and time.monotonic() >= self._retry_at
            if due:
                self._retry_at = 0.0
            attach, info = self._attaches, self.info
        if due:
            yield from self._probe(attach, info)

    def _data_lost(self) -> None:
        """No data connection could be had for a call: the following ones go over gRPC until the
        data channel is tried again."""
        with self._attach_lock:
            if not self._retry_at:
                self._data_off()
                self._retry_at = time.monotonic() + DATA_RETRY_S

    def _batches(self, keys: Sequence[bytes]) -> Iterable[tuple[int, list[bytes]]]:
        step = self.info.max_batch or 1024
        for i in range(0, len(keys), step):
            yield i, list(keys[i:i + step])

    def _put_batches(self, datas) -> Iterable[tuple[int, int]]:
        """[i, j) ranges of at most max_batch blocks and a quarter of the arena's bytes, so one
        reservation never needs more room than eviction can make."""
        limit = max(1, self.info.arena_size // 4)
        i, n = 0, len(datas)
        while i < n:
            j, size = i, 0
            while j < n and j - i < (self.info.max_batch or 1024) and (j == i or size + len(datas[j]) <= limit):
                size += len(datas[j])
                j += 1
            yield i, j
            i = j

    def _gen(self) -> int:
        return self.arena.generation if self.arena is not None else 0

    def _data_conn(self) -> DataConnection:
        if self.closed:
            raise errors.Unavailable("the client is closed")
        conn = self._pooled()
        if conn is not None:
            return conn
        try:
            return self._connect_data(self.info.data_address, self.info.data_channel_version)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"data channel {self.info.data_address}: no answer within "
                                          f"{self.timeout}s") from None
        except errors.DeadlineExceeded:
            raise
        except (OSError, errors.KvtierError) as e:
            self._data_lost()
            raise _NoDataConnection(f"data channel {self.info.data_address}: {e}") from None

    def _connect_data(self, address: str, version: int) -> DataConnection:
        # the client's timeout bounds every wait on the connection, as it bounds a gRPC call
        # confirmed by a first round trip: a connection the daemon turns away (all of
        # server.data_max_connections taken) fails here, and calls then go over gRPC
        conn = DataConnection(address, timeout=self.timeout, token=self.token,
                              tls=self.tls.ssl_context() if self.tls else None,
                              server_hostname=self.tls.server_name if self.tls else None, confirm=True)
        conn.version = version or 1
        return conn

    def _data(self, fn) -> "_DataCall":
        return _DataCall(self, fn)

    def _give_back(self, conn: DataConnection) -> None:
        with self._pool_lock:
            if not (conn.broken or self.closed):
                self._pool.append(conn)
                return
        conn.close()

    def _pooled(self) -> DataConnection | None:
        """A pooled connection fit to send on: the answer it owes to a posted call read, and not
        closed by the daemon meanwhile; None when the pool has none."""
        while True:
            with self._pool_lock:
                conn = self._pool.pop() if self._pool else None
            if conn is None:
                return None
            if conn.owed:
                rid, conn.owed = conn.owed, 0
                wait = POST_TIMEOUT_S if self.timeout is None else min(self.timeout, POST_TIMEOUT_S)
                try:
                    conn.finish_call(rid, wait)
                except errors.KvtierError:
                    pass  # the posted call's own error (an expired lease): nobody waits for it
                except TimeoutError:  # a stalled daemon: the caller's call would wait as long again
                    conn.close()
                    raise errors.DeadlineExceeded(f"data channel: no answer within {wait}s") from None
                except (OSError, ConnectionError):
                    conn.close()
                    continue
                if conn.broken:
                    conn.close()
                    continue
            if conn.idle_closed():
                conn.close()
                continue
            return conn

    def _pooled_or_new(self) -> DataConnection | None:
        """A pooled connection, or a new one; None when none can be opened."""
        conn = self._pooled()
        if conn is None:
            try:
                conn = self._connect_data(self.info.data_address, self.info.data_channel_version)
            except (OSError, errors.KvtierError):
                self._data_lost()
                return None
        return conn

    def control_post(self, rpc: str, request) -> bool:
        """Send a unary call as a CALL frame and do not wait for its answer (the connection reads
        it before its next use): for calls whose answer changes nothing, like a get_many's
        Release. False when it could not be sent; the caller then makes the call itself."""
        try:
            started = self.control_start(rpc, request)
        except errors.Unavailable:
            return False
        if started is None:
            return False
        self.control_abandon(started)
        return True

    def control_call(self, rpc: str, request, timeout: float | None):
        """A unary call as a CALL frame on a pooled data connection; None when no connection can
        be opened or the daemon does not know CALL, and the caller uses gRPC. Pooled connections
        the daemon has closed are dropped before sending, so a call is never sent twice: once
        sent, a lost connection is Unavailable (and a timeout DeadlineExceeded), as on gRPC."""
        started = self.control_start(rpc, request)
        return None if started is None else self.control_finish(started, timeout)

    def control_start(self, rpc: str, request) -> tuple | None:
        """control_call's first half: send the CALL frame and return at once; the handle goes to
        control_finish, which waits for the answer. None when no connection can be opened."""
        conn = self._pooled_or_new()
        if conn is None:
            return None
        try:
            rid = conn.start_call(rpc, request.SerializeToString())
        except BaseException as e:
            raise _lost(conn, rpc, e) from None
        return conn, rid, rpc

    def control_finish(self, started: tuple, timeout: float | None):
        """The answer to a call control_start sent; None when the daemon does not know CALL (it
        ran nothing), and the caller makes the call on gRPC."""
        conn, rid, rpc = started
        try:
            out = conn.finish_call(rid, timeout)
        except errors.InvalidArgument as e:
            if not str(e).startswith("bad frame"):
                self._give_back(conn)
                raise
            conn.close()  # a daemon from before CALL: it ran nothing and closed; gRPC from now on
            self.control = "grpc"
            return None
        except errors.KvtierError:
            self._give_back(conn)  # an answer: the connection is in step (unless marked broken)
            raise
        except TimeoutError:
            conn.close()
            raise errors.DeadlineExceeded(f"{rpc} on the data channel: no answer within {timeout}s") from None
        except BaseException as e:
            raise _lost(conn, rpc, e) from None
        self._give_back(conn)
        return _RESPONSES[rpc].FromString(out)

    def control_ready(self, handles: Sequence[tuple | None], timeout: float | None) -> int:
        """The position of a started call whose answer has arrived, waiting up to timeout for
        one: the lowest when several have. 0 when a handle is None (that call is made at its
        finish) or nothing came in time (its finish then waits and reports the timeout)."""
        fds: dict[int, int] = {}
        for i, h in enumerate(handles):
            if h is None:
                return 0
            sock = h[0].sock
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return i  # decrypted bytes already buffered
            fds.setdefault(sock.fileno(), i)
        if len(fds) < 2:
            return 0
        poll = select.poll()
        for fd in fds:
            poll.register(fd, select.POLLIN)
        try:
            events = poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
        except OSError:
            return 0
        return min((fds[fd] for fd, _ in events), default=0)

    def let_go(self, rpc: str, answer) -> None:
        """What the answer to a call nobody waits for any more holds (a cancelled AsyncClient
        call): a lease is released and a reservation aborted, so neither waits for its TTL; a
        started call's answer is read first. Best effort, on the caller's thread."""
        try:
            if isinstance(answer, tuple):  # control_start's handle
                answer = self.control_finish(answer, self.timeout)
            end = _ending(rpc, answer) if answer is not None else None
            if end is not None:  # also once the client is closed: on a connection opened for it
                self.control_call(*end, self.timeout)
        except Exception:  # gone or expired: the daemon ends it at its TTL
            pass

    def control_abandon(self, started: tuple) -> None:
        """Give up waiting for a started call: its connection reads the answer before its next use."""
        conn, rid, _ = started
        conn.owed = rid
        self._give_back(conn)

    def _stale_retry(self, op, *args):
        """Run a sub-operation; if the daemon restarted (new arena), attach again and retry once.
        Another call may have attached to the new arena already: then the retry just uses it."""
        yield from self._attach()
        gen = self._gen()
        try:
            return (yield from op(*args))
        except errors.StaleArena:
            if self._gen() == gen:
                yield from self._attach(force=True)
            return (yield from op(*args))

    def _verifies(self, digest: bytes) -> bool:
        """Whether a block read with this checksum is hashed and compared (ZERO: none stored)."""
        return self.verify and digest != ZERO_CHECKSUM

    def _check(self, data: memoryview, digest: bytes) -> bool:
        if not self._verifies(digest):
            return True
        if xxhash.xxh3_128_digest(data) == digest:
            return True
        self._failed_check()
        return False

    def _failed_check(self) -> None:
        with self._count_lock:
            self.checksum_failures += 1  # the one place it is counted

    # ---- operations -----------------------------------------------------------------------

    def op_attach(self):
        return (yield from self._attach(force=True))

    def op_lookup(self, ns: str, keys: Sequence[bytes]):
        yield from self._attach()
        check_namespace(ns)
        tiers = bytearray()
        for _, batch in self._batches(keys):
            packed, ks = pack_keys(batch)
            r = yield ("unary", "Lookup", pb.LookupRequest(namespace=ns, key_size=ks, keys=packed))
            tiers += r.tiers
        p = tiers.find(0)
        return list(tiers), (len(tiers) if p < 0 else p)

    def op_reserve(self, ns: str, keys: Sequence[bytes], sizes: Sequence[int], ttl_ms: int = 0,
                   overwrite: bool = False):
        return (yield from self._stale_retry(self._reserve, ns, keys, sizes, ttl_ms, overwrite))

    def _mapped(self) -> ArenaMapping:
        """The arena as mapped now. An operation takes it once and cuts every view of its answers
        from that mapping: another thread may re-attach (a restarted daemon's arena) or close
        the client meanwhile (_views)."""
        arena = self.arena
        if arena is None:
            raise errors.FailedPrecondition("the arena is not mapped (not on the daemon's node)")
        return arena

    def _views(self, arena: ArenaMapping, spans, rpc: str, answer):
        """Views of ``arena`` at (offset, length) spans (None for None), for the answer to a Reserve
        or Acquire made with it. Raises StaleArena when the client attached to another arena since
        (the answer's offsets are the old daemon's; the operation is retried on the new one) and
        Unavailable when it was closed meanwhile: nobody could use or end what the answer holds
        then, so its reservation is aborted or its lease released first (best effort), not left
        to the daemon's TTL."""
        if not self.closed:
            if arena is not self.arena:
                raise errors.StaleArena(f"arena generation {arena.generation} was replaced during the call "
                                        f"(the daemon restarted); attached again")
            try:
                view = arena.view
                return [None if sp is None else view[sp[0]:sp[0] + sp[1]] for sp in spans]
            except ValueError:  # released by a close() on another thread just now
                pass
        end = _ending(rpc, answer)
        if end is not None:
            with contextlib.suppress(Exception):  # gone or cut off: the daemon ends it at its TTL
                yield ("unary", *end)
        raise errors.Unavailable("the client was closed during the call")

    def _reserve(self, ns, keys, sizes, ttl_ms, overwrite, arena: ArenaMapping | None = None):
        yield from self._attach()
        arena = arena or self._mapped()
        r = yield ("unary", "Reserve", self._reserve_request(arena, ns, keys, sizes, ttl_ms, overwrite))
        return (yield from self._reservation(arena, sizes, r))

    def _reserve_request(self, arena, ns, keys, sizes, ttl_ms=0, overwrite=False):
        packed, ks = pack_keys(keys)
        return pb.ReserveRequest(namespace=ns, key_size=ks, keys=packed, sizes=list(sizes), ttl_ms=_u32("ttl_ms", ttl_ms),
                                 overwrite=overwrite, generation=arena.generation)

    def _reservation(self, arena, sizes, r: pb.ReserveResponse):
        spans = [(o, n) if s == 0 else None for s, o, n in zip(r.status, r.offsets, sizes)]
        views = yield from self._views(arena, spans, "Reserve", r)
        return Reservation(r.reservation_id, r.status, list(r.offsets), list(sizes), views)

    def op_commit(self, res: Reservation, checksums: Sequence[bytes] | None = None):
        if not res.id:
            return []
        r = yield from self._commit_answer(("unary", "Commit", pb.CommitRequest(
            reservation_id=res.id, checksums=b"".join(checksums) if checksums else b"")))
        c = r.checksums
        return [c[i:i + CHECKSUM_SIZE] for i in range(0, len(c), CHECKSUM_SIZE)]

    def _commit_answer(self, req):
        """The answer to a Commit made (``("unary", ...)``) or finished (``("finish", ...)``)."""
        try:
            return (yield req)
        except errors.NotFound as e:  # the only NOT_FOUND Commit gives
            raise errors.UnknownReservation(str(e)) from None

    def op_abort(self, res: Reservation):
        if res.id:
            try:
                yield ("unary", "Abort", pb.AbortRequest(reservation_id=res.id))
            except errors.NotFound as e:
                raise errors.UnknownReservation(str(e)) from None

    def op_acquire(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0, prefix_only: bool = False,
                   tokens_per_key: int = 0, background: bool = False, counted: bool = True):
        return (yield from self._stale_retry(self._acquire, ns, keys, lease_ms, prefix_only, tokens_per_key,
                                             background, counted))

    def _acquire(self, ns, keys, lease_ms, prefix_only, tokens_per_key=0, background=False, counted=True):
        yield from self._attach()
        arena = self._mapped()
        req = self._acquire_request(arena, ns, keys, lease_ms, prefix_only, tokens_per_key, background, counted)
        return (yield from self._lease(arena, len(keys), (yield ("unary", "Acquire", req))))

    def _acquire_request(self, arena, ns, keys, lease_ms=0, prefix_only=False, tokens_per_key=0, background=False,
                         counted=True):
        packed, ks = pack_keys(keys)
        return pb.AcquireRequest(namespace=ns, key_size=ks, keys=packed, lease_ms=_u32("lease_ms", lease_ms),
                                 prefix_only=prefix_only, generation=arena.generation,
                                 tokens_per_key=_u32("tokens_per_key", tokens_per_key), background=background,
                                 uncounted=not counted)

    def _lease(self, arena, n: int, r: pb.AcquireResponse):
        c = r.checksums
        sums = [c[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE] for i in range(n)]
        # a background Acquire reports blocks still landing with their tier and no slot (length 0)
        views = yield from self._views(arena, [(o, m) if t and m else None
                                               for t, o, m in zip(r.tiers, r.offsets, r.lengths)], "Acquire", r)
        return Lease(r.lease_id, r.tiers, list(r.offsets), list(r.lengths), sums, views)

    def op_release(self, lease: Lease):
        if lease.id:
            try:
                yield ("unary", "Release", pb.ReleaseRequest(lease_id=lease.id))
            except errors.NotFound as e:  # expired: callers that copied out must not trust the bytes
                raise errors.UnknownLease(str(e)) from None

    def _copy_in(self, res: Reservation, datas):
        """Copy the blocks into their slots; their checksums. On failure the reservation is aborted."""
        try:
            jobs = [(v, d, True) for v, d in zip(res.views, datas) if v is not None]
            return (yield ("copy", _copy_all, sum(len(d) for _, d, _ in jobs), jobs))
        except BaseException:
            yield from self.op_abort(res)
            raise

    def _arena_put(self, ns, keys, datas, overwrite):
        """One batch of a put_many over the arena (_arena_put_parts); a KvtierError it raises
        carries ``stored`` for the batch's blocks (Client.put_many)."""
        stored: list = [False] * len(keys)
        try:
            return (yield from self._arena_put_parts(ns, keys, datas, overwrite, stored))
        except errors.KvtierError as e:
            e.stored = stored
            raise

    def _commit_part(self, req, stored: list, i: int, j: int):
        """A part's Commit (made or finished, as ``req`` says); its blocks [i, j) marked in
        ``stored``: True once answered, None when the answer was lost (committed or not)."""
        try:
            yield from self._commit_answer(req)
        except _LOST:
            stored[i:j] = [None] * (j - i)
            raise
        stored[i:j] = [True] * (j - i)

    def _arena_put_parts(self, ns, keys, datas, overwrite, stored: list):
        """Reserve, copy in, Commit, a part of the blocks at a time (_put_parts), with the next
        part's Reserve and this part's Commit answered while the client copies: only the first
        Reserve and the last Commit are waited for, instead of each waiting for the copies. The
        blocks of each part committed (or already present) are marked True in ``stored``."""
        sizes = [len(d) for d in datas]
        parts = _put_parts(sizes)
        arena = self._mapped()
        res = yield from self._reserve(ns, keys[:parts[0][1]], sizes[:parts[0][1]], 0, overwrite, arena)
        if len(parts) == 1:
            sums = yield from self._copy_in(res, datas)
            if res.id:
                req = pb.CommitRequest(reservation_id=res.id, checksums=b"".join(sums))
                yield from self._commit_part(("unary", "Commit", req), stored, 0, len(keys))
            else:  # every block already present
                stored[:] = [True] * len(keys)
            return [s == 0 for s in res.status]
        out: list[bool] = []
        owed: list = []  # (rpc, request, handle, sizes or a Commit's [i, j)) of calls sent, not finished, oldest first
        try:
            for k, (i, j) in enumerate(parts):
                if k + 1 < len(parts):  # the daemon reserves the next part while this one is copied
                    a, b = parts[k + 1]
                    req = self._reserve_request(arena, ns, keys[a:b], sizes[a:b], 0, overwrite)
                    owed.append(("Reserve", req, (yield ("start", "Reserve", req)), sizes[a:b]))
                sums = yield from self._copy_in(res, datas[i:j])
                out += [s == 0 for s in res.status]
                if res.id:
                    req = pb.CommitRequest(reservation_id=res.id, checksums=b"".join(sums))
                    owed.append(("Commit", req, (yield ("start", "Commit", req)), (i, j)))
                else:  # every block already present
                    stored[i:j] = [True] * (j - i)
                while owed and owed[0][0] == "Commit":  # earlier parts' Commits: answered by now
                    _, req, h, span = owed.pop(0)
                    yield from self._commit_part(("finish", h, "Commit", req), stored, *span)
                if owed:
                    _, req, h, part_sizes = owed.pop(0)
                    res = yield from self._reservation(arena, part_sizes, (yield ("finish", h, "Reserve", req)))
            for _, req, h, span in owed:
                yield from self._commit_part(("finish", h, "Commit", req), stored, *span)
        except GeneratorExit:
            for _, _, h, _ in owed:  # closed unfinished: nobody waits; unfinished reservations expire
                if h is not None:
                    self.control_abandon(h)
            raise
        except BaseException:
            # a part copied in is committed (without a data channel its Commit is made only now);
            # a Reserve sent is aborted once answered
            for rpc, req, h, extra in owed:
                with contextlib.suppress(errors.KvtierError):
                    if rpc == "Commit":
                        yield from self._commit_part(("finish", h, "Commit", req), stored, *extra)
                    elif h is not None:
                        r = yield ("finish", h, rpc, req)  # no views: the mapping may be gone
                        yield from self.op_abort(Reservation(r.reservation_id, r.status, [], [], []))
            raise
        return out

    def op_put_many(self, ns: str, items: Sequence[tuple[bytes, Any]], overwrite: bool = False):
        yield from self._attach()
        check_namespace(ns)
        keys = [k for k, _ in items]
        datas = [memoryview(d).cast("B") for _, d in items]
        if self.path == "arena":  # batch after batch: the first that fails ends the call
            out: list[bool] = []
            try:
                for i, j in self._put_batches(datas):
                    out += yield from self._stale_retry(self._arena_put, ns, keys[i:j], datas[i:j], overwrite)
            except errors.KvtierError as e:
                part = getattr(e, "stored", [])  # the failing batch's (_arena_put)
                e.stored = [True] * len(out) + part + [False] * (len(keys) - len(out) - len(part))
                raise
            return out
        if self.path == "data":  # every block the daemon can take is stored
            limit = self.info.max_block_bytes
            for d in datas:  # the server would refuse and close the connection mid-send
                if limit and len(d) > limit:
                    e = errors.TooLarge(f"block of {len(d)} bytes exceeds the largest accepted ({limit} bytes)")
                    e.stored = [False] * len(keys)
                    raise e
            try:
                res = yield ("call", self._data(lambda c: c.put_many(ns, list(zip(keys, datas)), overwrite)))
            except _NoDataConnection:
                res = None  # made over gRPC below
            except errors.KvtierError as e:  # lost, timed out or cut short: what was stored is unknown
                e.stored = [None] * len(keys)
                raise
            if res is not None:
                failed = [r for r in res if isinstance(r, errors.KvtierError)]
                if failed:
                    failed[0].stored = [not isinstance(r, errors.KvtierError) for r in res]
                    raise failed[0]
                return [r.status == 0 for r in res]
        chunk = max(4096, min(PUT_CHUNK, (self.info.max_message_bytes or PUT_CHUNK) - 4096))
        try:  # block after block: the daemon stops at the first it refuses
            r = yield ("client_stream", "Put", _put_chunks(ns, keys, datas, overwrite, chunk))
        except errors.KvtierError as e:
            e.stored = yield from self._stored_by_stream(ns, keys, overwrite, e)
            raise
        return [s == 0 for s in r.status]

    def _stored_by_stream(self, ns: str, keys: list[bytes], overwrite: bool, e: errors.KvtierError):
        """``stored`` (Client.put_many) after a Put stream failed with ``e``. The daemon kept the
        blocks before the one it refused, and the error does not say which one that was: unless
        it was the only one, the blocks are looked up (found: stored; with overwrite a block
        found may hold the bytes from before, None). None throughout when the answer was lost or
        the lookup fails."""
        if isinstance(e, _LOST):
            return [None] * len(keys)
        if len(keys) == 1:
            return [False]
        try:
            tiers, _ = yield from self.op_lookup(ns, keys)
        except errors.KvtierError:
            return [None] * len(keys)
        return [(None if overwrite else True) if t else False for t in tiers]

    def _arena_get(self, ns, keys, into, counted=True, tokens_per_key=0):
        """Acquire, copy out, Release, a chunk of keys at a time (GET_CHUNKS), with the next
        chunk's Acquire already sent while this one is copied: the daemon reads blocks from NVMe
        while the client copies, instead of each waiting for the other."""
        yield from self._attach()
        arena = self._mapped()
        bounds = _get_chunks(len(keys), self.info.max_batch or 1024,
                             GET_CHUNK_MIN_RAM if self.ram_hits else GET_CHUNK_MIN)
        ram = True
        out: list = [None] * len(keys)
        sent: list = []  # (i, j, request, handle) of Acquires in flight, oldest first
        k = 0
        try:
            while k < len(bounds) or sent:
                while k < len(bounds) and len(sent) < GET_IN_FLIGHT:
                    i, j = bounds[k]
                    req = self._acquire_request(arena, ns, keys[i:j], tokens_per_key=tokens_per_key, counted=counted)
                    sent.append((i, j, req, (yield ("start", "Acquire", req))))
                    k += 1
                # copy out the part the daemon answers first: its reads may finish before an
                # earlier part's, and the disk keeps reading the other meanwhile
                handles = [s[3] for s in sent]
                first = (yield ("ready", handles)) if len(sent) > 1 and None not in handles else 0
                i, j, req, started = sent.pop(first)
                lease = yield from self._lease(arena, j - i, (yield ("finish", started, "Acquire", req)))
                ram = ram and pb.TIER_NVME not in lease.tiers and pb.TIER_CLUSTER not in lease.tiers
                try:
                    out[i:j] = yield from self._copy_out(lease, into[i:j] if into is not None else None)
                finally:
                    yield from self._release_posted(lease)
        except GeneratorExit:
            for *_, started in sent:  # closed unfinished: nobody waits, the leases run out
                if started is not None:
                    self.control_abandon(started)
            raise
        except BaseException:
            for *_, req, started in sent:  # each lease already asked for is let go
                if started is None:
                    continue  # not sent: nothing to let go
                with contextlib.suppress(errors.KvtierError):
                    r = yield ("finish", started, "Acquire", req)  # no views: the mapping may be gone
                    yield from self._release_posted(Lease(r.lease_id, r.tiers, [], [], [], []))
            raise
        self.ram_hits = ram
        return out

    def _release_posted(self, lease: Lease):
        # nothing depends on Release's answer here: an expired lease (UnknownLease) means the
        # bytes may have changed while copying, and the checksums already vouched for them
        if lease.id and not (yield ("post", "Release", pb.ReleaseRequest(lease_id=lease.id))):
            with contextlib.suppress(errors.UnknownLease):
                yield from self.op_release(lease)

    def _copy_out(self, lease: Lease, into):
        """The leased blocks, copied out (into ``into``'s buffers if given) and checked."""
        n = sum(len(v) for v in lease.views if v is not None)
        return (yield ("copy", self._copy_out_now, n, lease, into))

    def _copy_out_now(self, lease: Lease, into) -> list:
        if into is None:
            out: list = []
            for i, v in enumerate(lease.views):
                if v is None:
                    out.append(None)
                    continue
                data = bytes(v)
                out.append(data if self._check(memoryview(data), lease.checksums[i]) else None)
            return out
        jobs, where = [], []
        for i, v in enumerate(lease.views):
            if v is None:
                continue
            dst = memoryview(into[i]).cast("B")
            if len(dst) < len(v):
                raise errors.InvalidArgument(f"buffer {i} holds {len(dst)} bytes, block has {len(v)}")
            jobs.append((dst[:len(v)], v, self._verifies(lease.checksums[i])))
            where.append(i)
        out = [None] * len(lease.views)
        for i, (dst, _, hashed), digest in zip(where, jobs, _copy_all(jobs)):
            if not hashed or digest == lease.checksums[i]:
                out[i] = dst
            else:
                self._failed_check()
        return out

    def op_get_many(self, ns: str, keys: Sequence[bytes], into: Sequence[Any] | None = None, counted: bool = True,
                    tokens_per_key: int = 0):
        """Blocks as bytes (or, with ``into``, views of the given buffers), None when missing.
        ``counted`` and ``tokens_per_key`` as for acquire()."""
        yield from self._attach()
        check_namespace(ns)
        tokens_per_key = _u32("tokens_per_key", tokens_per_key)
        if self.path == "arena":
            return (yield from self._stale_retry(self._arena_get, ns, list(keys), into, counted, tokens_per_key))
        if self.path == "data":
            try:
                res = yield ("call", self._data(lambda c: c.get_many(ns, list(keys), into, check=self._check,
                                                                     counted=counted, tokens_per_key=tokens_per_key)))
            except _NoDataConnection:
                res = None  # made over gRPC below
            if res is not None:
                return [None if r is None else r[0] if into is not None else bytes(r[0]) for r in res]
        out = []
        for i, batch in self._batches(keys):
            packed, ks = pack_keys(batch)
            req = pb.GetRequest(namespace=ns, key_size=ks, keys=packed, tokens_per_key=tokens_per_key,
                                uncounted=not counted)
            chunks = yield ("server_stream", "Get", req)
            out += self._assemble(chunks, len(batch), into[i:i + len(batch)] if into is not None else None)
        return out

    def _assemble(self, chunks, n, into):
        out: list = [None] * n
        bufs: dict[int, bytearray] = {}
        heads: dict[int, pb.GetHeader] = {}
        cur = -1
        for ch in chunks:
            if ch.HasField("header"):
                cur = ch.header.index
                heads[cur] = ch.header
                bufs[cur] = bytearray()
            if ch.data:
                bufs[cur] += ch.data
        for i, h in heads.items():
            if h.tier == 0:
                continue
            data = bufs[i]
            if len(data) != h.length or not self._check(memoryview(data), h.checksum):
                if len(data) != h.length:
                    self._failed_check()
                continue
            if into is not None:
                dst = memoryview(into[i]).cast("B")
                if len(dst) < len(data):  # as on the other paths, not memoryview's ValueError
                    raise errors.InvalidArgument(f"buffer {i} holds {len(dst)} bytes, block has {len(data)}")
                dst[:len(data)] = data
                out[i] = dst[:len(data)]
            else:
                out[i] = bytes(data)
        return out

    def _per_batch(self, rpc: str, request, ns: str, keys: Sequence[bytes], **fields):
        """Call a keyed RPC once per batch of keys; returns the responses in order."""
        yield from self._attach()
        out = []
        for _, batch in self._batches(keys):
            packed, ks = pack_keys(batch)
            out.append((yield ("unary", rpc, request(namespace=ns, key_size=ks, keys=packed, **fields))))
        return out

    def op_delete(self, ns: str, keys: Sequence[bytes]):
        return sum(r.deleted for r in (yield from self._per_batch("Delete", pb.DeleteRequest, ns, keys)))

    def op_pin(self, ns: str, keys: Sequence[bytes], ttl_s: int = 0):
        rs = yield from self._per_batch("Pin", pb.PinRequest, ns, keys, ttl_s=_u32("ttl_s", ttl_s))
        return [bool(x) for r in rs for x in r.pinned]

    def op_unpin(self, ns: str, keys: Sequence[bytes]):
        return sum(r.unpinned for r in (yield from self._per_batch("Unpin", pb.UnpinRequest, ns, keys)))

    def op_stats(self, ns: str = ""):
        return (yield ("unary", "Stats", pb.StatsRequest(namespace=ns)))

    def close(self) -> None:
        """Refuse new calls, give those in flight on other threads or tasks up to CLOSE_WAIT_S to
        end, then close the pooled connections and unmap the arena. A call in flight ends with
        Unavailable at its next answer (a reservation or lease in it aborted or released first)
        or ends as it would have; its connection is closed as it is given back."""
        with self._idle:
            self.closed = True
            self._idle.wait_for(lambda: not self._calls, CLOSE_WAIT_S)
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()
        arena, self.arena = self.arena, None
        if arena is not None:
            arena.close()


def _put_chunks(ns, keys, datas, overwrite, chunk=PUT_CHUNK):
    for k, d in zip(keys, datas):
        first = True
        n = len(d)
        for p in range(0, max(n, 1), chunk):
            data = bytes(d[p:p + chunk])
            if first:
                yield pb.PutChunk(header=pb.PutHeader(namespace=ns, key=k, length=n, overwrite=overwrite), data=data)
                first = False
            else:
                yield pb.PutChunk(data=data)


_OPS = ("attach", "lookup", "reserve", "commit", "abort", "acquire", "release", "put_many", "get_many",
        "delete", "pin", "unpin", "stats")


class Client:
    """Blocking client. Thread-safe for concurrent calls."""

    def __init__(self, address: str | None = None, *, attach: bool = True, data_channel: bool = True,
                 verify: bool = True, timeout: float | None = 30.0, token: str | None = None,
                 tls: TLS | None = None, control: str = "auto"):
        self._ops = _Ops(address, attach, data_channel, verify, token, tls, control)
        self._ops.timeout = timeout
        self._channel = _channel(grpc, self._ops.address, tls)
        self._stub = pb_grpc.KVTierStub(self._channel)

    def _call(self, req):
        kind = req[0]
        if kind == "copy":  # arena copies: fn(*args), here
            return req[1](*req[3:])
        if kind == "post":  # a unary call whose answer nobody waits for; False: make it as "unary"
            return self._ops.control == "data" and self._ops.control_post(req[1], req[2])
        try:
            if kind == "call":
                return req[1]()
            if kind == "start":  # send a unary call now, answer later; None: make it at "finish"
                return self._ops.control_start(req[1], req[2]) if self._ops.control == "data" else None
            if kind == "ready":  # which of several started calls has its answer first
                return self._ops.control_ready(req[1], self.timeout)
            if kind == "finish":
                if req[1] is not None:
                    out = self._ops.control_finish(req[1], self.timeout)
                    if out is not None:
                        return out
                kind, req = "unary", req[1:]
            if kind == "unary" and self._ops.control == "data" and req[1] != "Attach":
                out = self._ops.control_call(req[1], req[2], self.timeout)
                if out is not None:
                    return out
            rpc = getattr(self._stub, req[1])
            md = self._ops.metadata
            if kind == "server_stream":
                return list(rpc(req[2], timeout=self.timeout, metadata=md))
            return rpc(req[2], timeout=self.timeout, metadata=md)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def _drive(self, gen: Generator):
        with self._ops.running():
            try:
                req = next(gen)
                while True:
                    try:
                        resp = self._call(req)
                    except BaseException as e:  # Ctrl-C too: the operation lets go of what it holds, re-raises
                        req = gen.throw(e)
                    else:
                        req = gen.send(resp)
            except StopIteration as stop:
                return stop.value

    @property
    def timeout(self) -> float | None:
        """Seconds each wait for the daemon may take (None: no limit); past it, DeadlineExceeded."""
        return self._ops.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._ops.timeout = value

    @property
    def path(self) -> str:
        """'arena', 'data' or 'grpc' (empty before the first call)."""
        return self._ops.path

    @property
    def control(self) -> str:
        """Where unary calls go: 'data' (CALL frames on the data channel) or 'grpc' (empty before
        the first call that attaches)."""
        return self._ops.control

    @property
    def checksum_failures(self) -> int:
        return self._ops.checksum_failures

    @property
    def info(self) -> pb.AttachResponse:
        if self._ops.info is None:
            self.attach()
        return self._ops.info

    def attach(self) -> pb.AttachResponse:
        return self._drive(self._ops.op_attach())

    def arena_view(self) -> memoryview | None:
        """The whole arena mapping (to register it for DMA, e.g. cudaHostRegister), or None when
        the arena is not mapped. It changes when the daemon restarts (a new generation)."""
        arena = self._ops.arena  # read once: another thread may attach meanwhile
        return arena.view if arena is not None else None

    def lookup(self, ns: str, keys: Sequence[bytes]) -> tuple[list[int], int]:
        """(tier per key, longest present prefix). Tier: 0 missing, 1 RAM, 2 NVMe, 3 cluster."""
        return self._drive(self._ops.op_lookup(ns, keys))

    def reserve(self, ns: str, keys: Sequence[bytes], sizes: Sequence[int], ttl_ms: int = 0,
                overwrite: bool = False) -> Reservation:
        return self._drive(self._ops.op_reserve(ns, keys, sizes, ttl_ms, overwrite))

    def commit(self, res: Reservation, checksums: Sequence[bytes] | None = None) -> list[bytes]:
        return self._drive(self._ops.op_commit(res, checksums))

    def abort(self, res: Reservation) -> None:
        return self._drive(self._ops.op_abort(res))

    def acquire(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0, prefix_only: bool = False,
                tokens_per_key: int = 0, background: bool = False, counted: bool = True) -> Lease:
        """Lease blocks in the arena. tokens_per_key: tokens of prefill one found key saves (0:
        unknown); the daemon counts found keys x tokens_per_key per namespace. background: do not
        wait for blocks on NVMe or in the cluster tier; they are reported with their tier and no
        view, and join this lease as they land in RAM (acquire them again to read them).
        counted=False: the daemon counts no hit, miss or byte of this read (an earlier Acquire
        of the same keys counted them); tokens_per_key still counts."""
        return self._drive(self._ops.op_acquire(ns, keys, lease_ms, prefix_only, tokens_per_key, background,
                                                counted))

    def release(self, lease: Lease) -> None:
        return self._drive(self._ops.op_release(lease))

    def put_many(self, ns: str, items: Sequence[tuple[bytes, Any]], overwrite: bool = False) -> list[bool]:
        """Store blocks; True per block newly stored, False if it was already present.

        When a block cannot be stored, the KvtierError raised (the first failing block's) has
        ``stored``, per block in order: True when it is stored (this call wrote it or found it
        present), False when this call did not store it, None when the call cannot tell (the
        daemon's answer was lost: Unavailable, DeadlineExceeded). How far a failed call gets
        depends on the path: over the data channel every block the daemon can take is stored;
        over the arena batch after batch (server.max_batch blocks) and over gRPC block after
        block, up to the first that fails. A failed gRPC Put stream of several blocks does not
        say which failed: the client looks the blocks up (a block found counts as stored; with
        overwrite, where it may hold the bytes from before, as None)."""
        return self._drive(self._ops.op_put_many(ns, items, overwrite))

    def put(self, ns: str, key: bytes, data: Any, overwrite: bool = False) -> bool:
        return self.put_many(ns, [(key, data)], overwrite)[0]

    def get_many(self, ns: str, keys: Sequence[bytes], into: Sequence[Any] | None = None, counted: bool = True,
                 tokens_per_key: int = 0) -> list:
        """Blocks as bytes (with ``into``: views of those buffers, each at least the block's
        length), None for each missing. ``counted`` and ``tokens_per_key`` as for acquire()."""
        return self._drive(self._ops.op_get_many(ns, keys, into, counted, tokens_per_key))

    def get(self, ns: str, key: bytes) -> bytes | None:
        return self.get_many(ns, [key])[0]

    def delete(self, ns: str, keys: Sequence[bytes]) -> int:
        return self._drive(self._ops.op_delete(ns, keys))

    def pin(self, ns: str, keys: Sequence[bytes], ttl_s: int = 0) -> list[bool]:
        return self._drive(self._ops.op_pin(ns, keys, ttl_s))

    def unpin(self, ns: str, keys: Sequence[bytes]) -> int:
        return self._drive(self._ops.op_unpin(ns, keys))

    def stats(self, ns: str = "") -> pb.StatsResponse:
        return self._drive(self._ops.op_stats(ns))

    def close(self) -> None:
        self._ops.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as ``Client`` (awaitable)."""

    def __init__(self, address: str | None = None, *, attach: bool = True, data_channel: bool = True,
                 verify: bool = True, timeout: float | None = 30.0, token: str | None = None,
                 tls: TLS | None = None, control: str = "auto"):
        self._ops = _Ops(address, attach, data_channel, verify, token, tls, control)
        self._ops.timeout = timeout
        self._channel = _channel(grpc.aio, self._ops.address, tls)
        self._stub = pb_grpc.KVTierStub(self._channel)

    async def _call(self, req):
        kind = req[0]
        ops, thread = self._ops, _in_thread
        if kind == "copy":  # arena copies of req[2] bytes: a large one off the loop (other tasks run on)
            return await thread(req[1], *req[3:]) if req[2] >= ASYNC_COPY_MIN else req[1](*req[3:])
        if kind == "post":
            return ops.control == "data" and await thread(ops.control_post, req[1], req[2])
        control = _control_in_thread
        try:
            if kind == "call":
                return await thread(req[1], stop=req[1].stop)
            if kind == "start":
                return await control(ops, req[1], ops.control_start, req[1], req[2]) if ops.control == "data" \
                    else None
            if kind == "ready":
                return await control(ops, "", ops.control_ready, req[1], self.timeout)
            if kind == "finish":
                if req[1] is not None:
                    out = await control(ops, req[2], ops.control_finish, req[1], self.timeout)
                    if out is not None:
                        return out
                kind, req = "unary", req[1:]
            if kind == "unary" and ops.control == "data" and req[1] != "Attach":
                out = await control(ops, req[1], ops.control_call, req[1], req[2], self.timeout)
                if out is not None:
                    return out
            call = getattr(self._stub, req[1])(req[2], timeout=self.timeout, metadata=self._ops.metadata)
            try:
                if kind == "server_stream":
                    return [c async for c in call]
                return await call
            except asyncio.CancelledError:
                # a stream cancelled while it waits for its next message stayed open on the
                # daemon (its lease held until lease_ms): the call is cancelled for it too
                call.cancel()
                current = asyncio.current_task()
                if self._ops.closed and (current is None or not current.cancelling()):
                    # cut by close() (which closed the channel), not by a cancel of this task
                    raise errors.Unavailable("the client was closed during the call") from None
                raise
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        except grpc.aio.UsageError:  # the channel closed by close() before the call began
            if self._ops.closed:
                raise errors.Unavailable("the client is closed") from None
            raise

    async def _drive(self, gen: Generator):
        with self._ops.running():
            try:
                req = next(gen)
                while True:
                    try:
                        resp = await self._call(req)
                    except BaseException as e:  # cancelled too: the operation lets go of what it holds, re-raises
                        req = gen.throw(e)
                    else:
                        req = gen.send(resp)
            except StopIteration as stop:
                return stop.value

    timeout = Client.timeout
    path = Client.path
    control = Client.control
    checksum_failures = Client.checksum_failures
    arena_view = Client.arena_view

    @property
    def info(self) -> pb.AttachResponse | None:
        """The daemon's Attach answer (arena path and size, limits, version): None until the
        first call, or ``await attach()``, has attached."""
        return self._ops.info

    async def close(self) -> None:
        await asyncio.to_thread(self._ops.close)  # its wait for calls in flight leaves the loop to them
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _in_thread(fn, *args, stop=None):
    """fn(*args) in a worker thread. Cancelled, it raises CancelledError only once the thread
    has ended (``stop()`` first, to make it end soon): a thread that went on after the caller
    was told would read or write buffers the caller has already reused. The answer of a call
    cut short that way is dropped (a lease or reservation in it runs out by itself)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if stop is not None:
            stop()
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the caller hears of the cancel, not of what it caused
        raise


async def _control_in_thread(ops: "_Ops", rpc: str, fn, *args):
    """fn(*args), a unary call on the data channel (or its start, finish or wait), in a worker
    thread. Cancelled, the caller hears it at once (the thread touches no caller's buffer, only
    the answer): the thread ends on its own, within the client's timeout, and what its answer
    holds is let go then (_Ops.let_go)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(functools.partial(_let_go_when_done, ops, rpc))
        raise


def _let_go_when_done(ops: "_Ops", rpc: str, fut: asyncio.Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    answer = fut.result()
    if rpc in ("Acquire", "Reserve") and answer is not None:
        threading.Thread(target=ops.let_go, args=(rpc, answer), daemon=True, name="kvtier-let-go").start()
    elif isinstance(answer, tuple):  # another call started: its answer is read before the next use
        ops.control_abandon(answer)


def _async_method(name: str):
    op = getattr(_Ops, f"op_{name}")
    sync = getattr(Client, name)

    async def method(self, *args, **kwargs):
        return await self._drive(op(self._ops, *args, **kwargs))
    method.__name__ = name
    method.__doc__ = sync.__doc__
    return method


for _name in _OPS:
    setattr(AsyncClient, _name, _async_method(_name))


async def _aput(self, ns, key, data, overwrite=False):
    return (await self.put_many(ns, [(key, data)], overwrite))[0]


async def _aget(self, ns, key):
    return (await self.get_many(ns, [key]))[0]

AsyncClient.put = _aput
AsyncClient.get = _aget
