"""Core data-path benchmark: kvtier against the machine's own limits, measured in the same run.

    .venv/bin/python -m bench.core --json bench-core.json           # full run, about a minute
    .venv/bin/python -m bench.core --quick --json bench-quick.json  # under a minute
    .venv/bin/python -m bench.core --settle 900 --json bench-core.json   # shared machine: wait for quiet
    .venv/bin/python -m bench.core --parts arena                    # the arena path against memcpy alone, ~50 s

Run from the repository root. Every server is its own process, so the client and
the server never share a GIL: the daemon (``python -m kvtier.cli serve``, arena on
/dev/shm, sockets in a temporary directory), a raw-socket server and a bare gRPC
echo server (both ``python -m bench.core --serve-...``). All traffic is loopback;
everything started is stopped and its files removed at the end, also on error or
SIGTERM.

One round, for blocks of 64 KiB, 2 MiB and 16 MiB: put_many of 32 MiB of fresh
keys, then get_many of the same keys into preallocated buffers (the keys are then
deleted, untimed, so the arena's slots are reused and already faulted in).

1. arena path, ``Client(attach=True)``, against numpy memcpy of the same bytes
   (np.copyto block by block into a preallocated array for "put", out of it for
   "get"), and against the same copies through a /dev/shm mapping like the
   arena's (tmpfs, 4 KiB pages); also ``verify=False`` (no read checksum), and
   the round taken apart step by step with the zero-copy API (section 4);
2. data channel, ``Client(attach=False)``, over the Unix socket and over TCP
   127.0.0.1, against a raw socket echo on the same transport (per block: client
   sendall + recv_into, server recv_into + sendall; the data channel's socket
   options) and a pipelined raw variant (all blocks up, then all down: the data
   channel's own pattern without its bookkeeping). Each round of these runs on a
   fresh connection opened before the clock starts: one TCP loopback connection
   on this VM can stay twice as fast or as slow as the next, and a single one
   would decide the ratio. Beside them, on persistent channels, the gRPC path
   ``Client(attach=False, data_channel=False)`` and a bare gRPC echo (grpc.aio
   server, generic unary handler, identity serializers);
3. Lookup of 1,000 16-byte keys of which 500 are present: round trip in ms.

Throughput counts every payload byte once per direction: a round moves 2 x 32 MiB
for kvtier and for each baseline alike. Baseline and kvtier rounds alternate (the
order flips every other round), so a noisy neighbour hits both. Ratio = median
kvtier GB/s / median baseline GB/s. Percentiles are over rounds (GB/s at the p90
round time: 90% of rounds were at least that fast). Each group also records the
share of the machine's CPU time that other processes took meanwhile ("other");
above 25% its ratios are flagged as noisy. The table goes to stdout, progress to
stderr, and ``--json`` writes every round's times, CPU seconds of client and
server, the git sha, versions and settings.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import mmap
import os
import pathlib
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, 2 * MiB, 16 * MiB)
NS, NS_LOOKUP = "bench", "bench-lookup"
REPO = pathlib.Path(__file__).resolve().parent.parent
SOCK_BUF = 4 << 20          # the data channel's SO_SNDBUF/SO_RCVBUF (kvtier.datachannel.SOCK_BUF)
GRPC_MAX_MSG = 256 << 20
ECHO_METHOD = "/bench.Echo/Echo"
TARGET_RATIO = 0.8
TARGET_LOOKUP_MS = 2.0
NOISY = 0.25                # a group during which other work took more than this share of the CPUs is flagged


@dataclass(frozen=True)
class Settings:
    round_bytes: int            # payload per round and direction, bytes
    reps: int                   # timed rounds per case: arena, data channel, raw sockets, memcpy
    grpc_reps: int              # timed rounds per gRPC case (kvtier gRPC path, bare gRPC echo)
    warmup: int                 # untimed rounds before each case
    lookup_reps: int            # timed Lookup calls per transport
    lookup_keys: int = 1000     # keys per Lookup call (half present)
    key_size: int = 16          # bytes per key
    arena_capacity: str = "1GiB"


# 120 rounds: at 40, a 2 MiB case's rounds spanned about 0.6 s, and one burst of the shared VM's
# neighbours could move its median (arena put+get 2 MiB 0.79x in one full run, 0.83-0.87x standalone)
FULL = Settings(round_bytes=32 * MiB, reps=120, grpc_reps=12, warmup=2, lookup_reps=500)
QUICK = Settings(round_bytes=32 * MiB, reps=6, grpc_reps=3, warmup=1, lookup_reps=60)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- sockets shared by the raw baseline's client and server -------------------------------

RAW_HDR = struct.Struct("<BQQ")     # op, block size, block count
RAW_ECHO, RAW_PUT, RAW_GET = 1, 2, 3
RAW_ACK = 40                        # bytes of the per-block answer of RAW_PUT (the data channel's response header)


def tune(sock: socket.socket) -> None:
    """The data channel's socket options, so the baseline runs on equal terms."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if r == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-message")
        got += r
    return True


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- baseline servers (run as subprocesses) ------------------------------------------------

def serve_raw(unix_path: str, tcp_port: int, buf_bytes: int) -> None:
    """Raw socket server: ECHO one block; PUT n blocks into a buffer, answering each with 40 bytes
    (as the data channel does); GET them back.

    One buffer, touched up front, serves every connection (the client opens one at a time),
    as the daemon's arena slots are reused round after round."""
    import threading
    view = memoryview(bytearray(b"\x01" * buf_bytes))
    ack = bytes(RAW_ACK)

    def conn_loop(conn: socket.socket) -> None:
        tune(conn)
        hdr = memoryview(bytearray(RAW_HDR.size))
        with conn:
            while recv_exact(conn, hdr):
                op, size, count = RAW_HDR.unpack(hdr)
                if op == RAW_ECHO:
                    recv_exact(conn, view[:size])
                    conn.sendall(view[:size])
                elif op == RAW_PUT:
                    for i in range(count):
                        recv_exact(conn, view[i * size:(i + 1) * size])
                        conn.sendall(ack)
                elif op == RAW_GET:
                    for i in range(count):
                        conn.sendall(view[i * size:(i + 1) * size])
                else:
                    return

    def accept_loop(lsock: socket.socket) -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=conn_loop, args=(conn,), daemon=True).start()

    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.bind(unix_path)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", tcp_port))
    for s in (u, t):
        s.listen(8)
        threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})  # blocked in every thread (see main), taken here


def serve_grpc_echo(unix_path: str, tcp_port: int) -> None:
    """A bare grpc.aio server (the daemon's server stack) whose one unary method returns its request bytes."""
    import grpc

    async def echo(request: bytes, context) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", GRPC_MAX_MSG),
                                          ("grpc.max_send_message_length", GRPC_MAX_MSG)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        server.add_insecure_port(f"unix:{unix_path}")
        server.add_insecure_port(f"127.0.0.1:{tcp_port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


# ---- processes -------------------------------------------------------------------------------

class Proc:
    """A subprocess in its own session; stop() sends SIGTERM, then SIGKILL after a grace period."""

    def __init__(self, name: str, argv: list[str], log_path: str):
        self.name, self.log_path = name, log_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with open(log_path, "ab") as logf:
            self.p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                      start_new_session=True)

    def check(self) -> None:
        if self.p.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.p.returncode}:\n{pathlib.Path(self.log_path).read_text()}")

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all its threads)."""
        try:
            fields = pathlib.Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def wait_for(what: str, proc: Proc, ready: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start:\n{pathlib.Path(proc.log_path).read_text()}")


def can_connect(family: int, addr) -> bool:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(addr)
        return True
    except OSError:
        return False
    finally:
        s.close()


def shm_dir() -> str:
    """Where benchmark daemons put their arenas: /dev/shm, or $KVTIER_BENCH_SHM (a tmpfs
    directory of the caller's, so it can check that nothing was left behind)."""
    return os.environ.get("KVTIER_BENCH_SHM") or "/dev/shm"


DAEMON_SETTINGS: list[tuple[str, str, str]] = []  # (section, name, TOML value) from --daemon-set


def start_daemon(stack: contextlib.ExitStack, tmp: str, capacity: str, tcp: bool,
                 settings: tuple = ()) -> tuple[Proc, dict]:
    """``kvtier serve`` in a subprocess; returns it and its addresses. ``settings``: the caller's own
    (section, name, TOML value), applied before --daemon-set's and skipped where this daemon
    does not know the name."""
    from kvtier import config as kvconfig
    from kvtier.client import Client
    # settings that newer daemons know and older ones would reject as unknown
    fields = {f.name: {g.name for g in dataclasses.fields(type(f.default_factory()))}
              for f in dataclasses.fields(kvconfig.Config)}
    tag = uuid.uuid4().hex[:10]
    arena_dir = os.path.join(shm_dir(), f"kvtier-bench-{tag}") if os.access(shm_dir(), os.W_OK) \
        else os.path.join(tmp, "arena-" + tag)
    stack.callback(shutil.rmtree, arena_dir, True)
    sock = os.path.join(tmp, f"d{tag[:4]}.sock")
    lines = ["[server]", f'socket = "{sock}"', "drain_timeout_s = 1.0", 'log_level = "warning"']
    addrs = {"unix": f"unix://{sock}"}
    if tcp:
        grpc_port, data_port = free_ports(2)
        lines += [f'listen = "127.0.0.1:{grpc_port}"', f'data_listen = "127.0.0.1:{data_port}"']
        if "insecure_tcp" in fields["server"]:
            lines.append("insecure_tcp = true")   # plain TCP, bound to loopback only: the transport's own cost
        addrs["tcp"] = f"127.0.0.1:{grpc_port}"
    ram = [f'arena_path = "{arena_dir}/arena"', f'capacity = "{capacity}"']
    extra: dict[str, list[str]] = {}
    chosen = {(sec, name): v for sec, name, v in settings if name in fields.get(sec, ())}
    chosen.update({(sec, name): v for sec, name, v in DAEMON_SETTINGS})
    for (section, name), value in chosen.items():  # --daemon-set: replaces a line above or adds one
        if section == "ram":
            ram = [x for x in ram if not x.startswith(name + " ")]
        extra.setdefault(section, []).append(f"{name} = {value}")
    lines += ["[ram]"] + ram + extra.pop("ram", [])
    if "metrics" in fields:
        lines += ["[metrics]", 'listen = ""']   # no fixed Prometheus port: it could clash with another daemon
    lines[1:1] = extra.pop("server", [])
    for section, more in extra.items():
        lines += [f"[{section}]"] + more
    cfg = os.path.join(tmp, f"daemon-{tag}.toml")
    pathlib.Path(cfg).write_text("\n".join(lines) + "\n")
    proc = Proc("kvtier daemon", [sys.executable, "-m", "kvtier.cli", "serve", "--config", cfg],
                os.path.join(tmp, f"daemon-{tag}.log"))
    stack.callback(proc.stop)

    def ready() -> bool:
        with Client(addrs["unix"], timeout=2) as c:
            c.stats()
        return True
    wait_for("kvtier daemon", proc, ready)
    return proc, addrs


# ---- measurement -------------------------------------------------------------------------------

@dataclass
class Case:
    """One contender in an interleaved group.

    ``session()`` is entered before each round, untimed (a fresh connection, or a
    persistent client); ``run(session)`` does one round and returns its timed parts,
    (put_s, get_s) or (total_s,)."""
    name: str
    run: Callable[[object], tuple[float, ...]]
    session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    server: Proc | None = None
    times: list[tuple[float, ...]] = dataclasses.field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all CPUs, /proc/stat)."""
    f = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_meter(servers: list[Proc]) -> Callable[[], dict]:
    """Start measuring; the returned function says what share of the machine's CPU time
    went to processes other than this one and ``servers`` meanwhile."""
    servers = list({id(p): p for p in servers}.values())

    def own() -> float:
        return sum(os.times()[:2]) + sum(p.cpu_seconds() for p in servers)
    t0, busy0, own0 = time.monotonic(), machine_busy_s(), own()

    def done() -> dict:
        wall = time.monotonic() - t0
        foreign = max(0.0, machine_busy_s() - busy0 - (own() - own0))
        return {"wall_s": round(wall, 3), "foreign_cpu_share": round(foreign / (wall * (os.cpu_count() or 1)), 3),
                "loadavg_1m": os.getloadavg()[0]}
    return done


SETTLE = {"budget_s": 0.0, "waited_s": 0.0}   # --settle: seconds this run may still wait for a quiet machine


def settle() -> None:
    """Wait (within the --settle budget) until other work takes under NOISY of the machine, sampled over 2 s."""
    while SETTLE["budget_s"] > 0:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(2)
        dt = time.monotonic() - t0
        SETTLE["budget_s"] -= dt
        SETTLE["waited_s"] += dt
        if (machine_busy_s() - b0) / (dt * (os.cpu_count() or 1)) < NOISY:
            return


def run_group(cases: list[Case], reps: int, warmup: int) -> dict:
    """Warm each case up, then alternate their rounds (order reversed every other rep).

    Returns how busy the machine was meanwhile with work other than ours (other
    processes on a shared machine slow both sides of a ratio, but not equally)."""
    settle()
    for c in cases:
        for _ in range(warmup):
            with c.session() as sess:
                c.run(sess)
    done = load_meter([c.server for c in cases if c.server])
    for r in range(reps):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            with c.session() as sess:
                cpu0, scpu0 = time.process_time(), c.server.cpu_seconds() if c.server else 0.0
                c.times.append(c.run(sess))
                c.client_cpu += time.process_time() - cpu0
                if c.server:
                    c.server_cpu += c.server.cpu_seconds() - scpu0
    return done()


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(c: Case, moved_bytes: int) -> dict:
    """Round times and GB/s at the median, p90, p99 and max round time."""
    tot = [sum(t) for t in c.times]
    secs = {"median": pct(tot, 50), "p90": pct(tot, 90), "p99": pct(tot, 99), "max": max(tot)}
    out = {"name": c.name, "rounds": len(tot), "bytes_per_round": moved_bytes,
           "seconds": secs, "gbps": {k: moved_bytes / v / 1e9 for k, v in secs.items()},
           "client_cpu_s_per_round": c.client_cpu / len(tot),
           "server_cpu_s_per_round": c.server_cpu / len(tot) if c.server else None,
           "round_seconds": [list(t) for t in c.times]}
    if len(c.times[0]) == 2:
        out["put_seconds_median"] = pct([t[0] for t in c.times], 50)
        out["get_seconds_median"] = pct([t[1] for t in c.times], 50)
    return out


class Buffers:
    """Preallocated, pre-touched source, destination and middle buffers of one round."""

    def __init__(self, round_bytes: int, tmp: str):
        rng = np.random.default_rng(1234)
        self.n = round_bytes
        self.src = rng.integers(0, 256, round_bytes, dtype=np.uint8)
        self.dst = np.ones(round_bytes, dtype=np.uint8)
        self.mid = np.ones(round_bytes, dtype=np.uint8)
        # a middle buffer in a /dev/shm mapping: the arena's backing (tmpfs, 4 KiB pages)
        self.shm_path = os.path.join("/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp,
                                     f"kvtier-bench-mid-{uuid.uuid4().hex[:8]}")
        fd = os.open(self.shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, round_bytes)
            self.mm = mmap.mmap(fd, round_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.shm = np.frombuffer(self.mm, dtype=np.uint8)
        self.shm[:] = 1

    def blocks(self, arr: np.ndarray, size: int) -> list[np.ndarray]:
        return [arr[i:i + size] for i in range(0, self.n - size + 1, size)]

    def close(self) -> None:
        del self.shm
        self.mm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.shm_path)


def new_keys(n: int, key_size: int) -> list[bytes]:
    return [os.urandom(key_size) for _ in range(n)]


def kvtier_round(src: list, dst: list, key_size: int) -> Callable[[object], tuple[float, float]]:
    def run(client) -> tuple[float, float]:
        keys = new_keys(len(src), key_size)
        t0 = time.perf_counter()
        stored = client.put_many(NS, list(zip(keys, src)))
        t1 = time.perf_counter()
        got = client.get_many(NS, keys, into=dst)
        t2 = time.perf_counter()
        if not all(stored) or any(g is None for g in got):
            raise RuntimeError(f"{client.path}: {stored.count(False)} puts not stored, "
                               f"{sum(g is None for g in got)} gets missed")
        client.delete(NS, keys)
        return t1 - t0, t2 - t1
    return run


def memcpy_round(src: list, mid: list, dst: list) -> Callable[[object], tuple[float, float]]:
    def run(_) -> tuple[float, float]:
        t0 = time.perf_counter()
        for s, m in zip(src, mid):
            np.copyto(m, s)
        t1 = time.perf_counter()
        for m, d in zip(mid, dst):
            np.copyto(d, m)
        return t1 - t0, time.perf_counter() - t1
    return run


def raw_echo_round(src: list, dst: list) -> Callable[[socket.socket], tuple[float]]:
    def run(sock: socket.socket) -> tuple[float]:
        t0 = time.perf_counter()
        for s, d in zip(src, dst):
            sock.sendall(RAW_HDR.pack(RAW_ECHO, len(s), 1))
            sock.sendall(s)
            recv_exact(sock, memoryview(d))
        return (time.perf_counter() - t0,)
    return run


def raw_pipelined_round(src: list, dst: list) -> Callable[[socket.socket], tuple[float, float]]:
    acks = memoryview(bytearray(RAW_ACK * len(src)))

    def run(sock: socket.socket) -> tuple[float, float]:
        size, n = len(src[0]), len(src)
        t0 = time.perf_counter()
        sock.sendall(RAW_HDR.pack(RAW_PUT, size, n))
        for s in src:
            sock.sendall(s)
        recv_exact(sock, acks)
        t1 = time.perf_counter()
        sock.sendall(RAW_HDR.pack(RAW_GET, size, n))
        for d in dst:
            recv_exact(sock, memoryview(d))
        return t1 - t0, time.perf_counter() - t1
    return run


def grpc_echo_round(payloads: list[bytes], dst: list) -> Callable[[object], tuple[float]]:
    def run(call) -> tuple[float]:
        t0 = time.perf_counter()
        for p, d in zip(payloads, dst):
            np.copyto(d, np.frombuffer(call(p, timeout=60), dtype=np.uint8))
        return (time.perf_counter() - t0,)
    return run


def raw_connection(family: int, addr) -> Callable[[], socket.socket]:
    """A fresh raw connection per round (sockets are context managers)."""
    def connect() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        tune(sock)
        sock.connect(addr)
        return sock
    return connect


def kvtier_connection(addr: str, **kw) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh Client per round, attached (its data-channel connection open) before the clock starts."""
    from kvtier.client import Client

    @contextlib.contextmanager
    def session():
        with Client(addr, **kw) as c:
            c.attach()
            yield c
    return session


def persistent(obj) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: contextlib.nullcontext(obj)


def check_copy(bufs: Buffers, what: str) -> None:
    if not np.array_equal(bufs.src, bufs.dst):
        raise RuntimeError(f"{what}: data read back differs from data written")
    bufs.dst[:] = 1


def xxh3_rate(bufs: Buffers, size: int, reps: int) -> float:
    import xxhash
    blocks = [memoryview(b) for b in bufs.blocks(bufs.src, size)]
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for b in blocks:
            xxhash.xxh3_128_digest(b)
        ts.append(time.perf_counter() - t0)
    return bufs.n / pct(ts[1:], 50) / 1e9


# ---- the run -----------------------------------------------------------------------------------

def arena_cases(addr: str, daemon: Proc, bufs: Buffers, s: Settings, results: dict, stack) -> None:
    from kvtier.client import Client
    c = stack.enter_context(Client(addr))
    nv = stack.enter_context(Client(addr, verify=False))
    c.attach(), nv.attach()
    assert c.path == nv.path == "arena", c.path
    for size in SIZES:
        src, dst = bufs.blocks(bufs.src, size), bufs.blocks(bufs.dst, size)
        log(f"arena path, {fmt_size(size)} blocks")
        cases = [Case("memcpy", memcpy_round(src, bufs.blocks(bufs.mid, size), dst)),
                 Case("memcpy_tmpfs", memcpy_round(src, bufs.blocks(bufs.shm, size), dst)),
                 Case("kvtier_arena", kvtier_round(src, dst, s.key_size), persistent(c), daemon),
                 Case("kvtier_arena_noverify", kvtier_round(src, dst, s.key_size), persistent(nv), daemon)]
        load = run_group(cases, s.reps, s.warmup)
        check_copy(bufs, "arena")
        results["arena"].append({"block_bytes": size, "blocks_per_round": len(src), "xxh3_gbps": xxh3_rate(bufs, size, 5),
                                 "machine": load, "cases": {k.name: summarize(k, 2 * bufs.n) for k in cases}})


ARENA_STEPS = ("Reserve", "copy in", "hash in", "Commit", "Acquire", "copy out", "verify", "Release", "Delete")


def arena_steps(addr: str, bufs: Buffers, s: Settings, results: dict, stack) -> None:
    """The arena round taken apart with the Client's public zero-copy API, as put_many and
    get_many do it: each block hashed right after its copy (while it is in the cache), the
    checksums sent with Commit; one timer per step (copy and hash summed over the blocks)."""
    import xxhash
    from kvtier.client import Client
    c = stack.enter_context(Client(addr))
    for size in SIZES:
        src, dst = bufs.blocks(bufs.src, size), bufs.blocks(bufs.dst, size)
        log(f"arena path taken apart, {fmt_size(size)} blocks")
        rows = []
        settle()
        done = load_meter([])
        clock = time.perf_counter
        for r in range(s.warmup + s.reps):
            keys = new_keys(len(src), s.key_size)
            row = [0.0] * len(ARENA_STEPS)
            t0 = clock()
            res = c.reserve(NS, keys, [size] * len(keys))
            row[0] = clock() - t0
            sums = []
            for v, b in zip(res.views, src):
                t0 = clock()
                v[:] = memoryview(b).cast("B")
                t1 = clock()
                sums.append(xxhash.xxh3_128_digest(v))
                row[1] += t1 - t0
                row[2] += clock() - t1
            t0 = clock()
            c.commit(res, sums)
            t1 = clock()
            lease = c.acquire(NS, keys)
            t2 = clock()
            row[3], row[4] = t1 - t0, t2 - t1
            ok = True
            for v, d, sum_ in zip(lease.views, dst, lease.checksums):
                t0 = clock()
                memoryview(d).cast("B")[:] = v
                t1 = clock()
                ok &= xxhash.xxh3_128_digest(memoryview(d)) == sum_
                row[5] += t1 - t0
                row[6] += clock() - t1
            t0 = clock()
            c.release(lease)
            t1 = clock()
            c.delete(NS, keys)
            row[7], row[8] = t1 - t0, clock() - t1
            if not ok:
                raise RuntimeError("arena steps: checksum mismatch")
            if r >= s.warmup:
                rows.append(row)
        check_copy(bufs, "arena steps")
        med = np.median(np.array(rows), axis=0)
        results["arena_steps"].append({"block_bytes": size, "rounds": len(rows), "machine": done(),
                                       "median_ms": {n: float(v * 1e3) for n, v in zip(ARENA_STEPS, med)}})


def inline_cases(transport: str, addr: str, raw_addr, echo_call, daemon: Proc, raw: Proc, echo: Proc,
                 bufs: Buffers, s: Settings, results: dict, stack) -> None:
    from kvtier.client import Client
    grpc_c = stack.enter_context(Client(addr, attach=False, data_channel=False))
    grpc_c.attach()
    data_session = kvtier_connection(addr, attach=False)
    with data_session() as probe:
        assert probe.path == "data" and grpc_c.path == "grpc", (probe.path, grpc_c.path)
        results["data_address"][transport] = probe.info.data_address
    raw_session = raw_connection(socket.AF_UNIX if transport == "unix" else socket.AF_INET, raw_addr)
    for size in SIZES:
        src, dst = bufs.blocks(bufs.src, size), bufs.blocks(bufs.dst, size)
        log(f"inline, {transport}, {fmt_size(size)} blocks: data channel vs raw socket")
        group = [Case("raw_echo", raw_echo_round(src, dst), raw_session, raw),
                 Case("raw_pipelined", raw_pipelined_round(src, dst), raw_session, raw),
                 Case("kvtier_data", kvtier_round(src, dst, s.key_size), data_session, daemon)]
        load = run_group(group, s.reps, s.warmup)
        check_copy(bufs, f"data channel over {transport}")
        log(f"inline, {transport}, {fmt_size(size)} blocks: gRPC path vs bare gRPC echo")
        payloads = [bytes(b) for b in src]
        ggroup = [Case("grpc_echo", grpc_echo_round(payloads, dst), persistent(echo_call), echo),
                  Case("kvtier_grpc", kvtier_round(src, dst, s.key_size), persistent(grpc_c), daemon)]
        gload = run_group(ggroup, s.grpc_reps, s.warmup)
        check_copy(bufs, f"gRPC over {transport}")
        del payloads
        results["inline"].append({"transport": transport, "block_bytes": size, "blocks_per_round": len(src),
                                  "machine": load, "machine_grpc": gload,
                                  "cases": {k.name: summarize(k, 2 * bufs.n) for k in group + ggroup}})


def lookup_case(transport: str, addr: str, daemon: Proc, echo_call, s: Settings, results: dict, stack) -> None:
    """Lookup of 1,000 keys; beside it the bare round trips it is made of: a data-channel PING
    (framed socket, one thread), a 1-byte bare gRPC echo and a 1-key Lookup (grpc.aio)."""
    from kvtier.client import Client
    from kvtier.datachannel import DataConnection
    c = stack.enter_context(Client(addr, attach=False))
    half = s.lookup_keys // 2
    present, absent = new_keys(half, s.key_size), new_keys(s.lookup_keys - half, s.key_size)
    block = np.zeros(4096, dtype=np.uint8)
    assert all(c.put_many(NS_LOOKUP, [(k, block) for k in present]))
    keys = [k for pair in zip(present, absent) for k in pair]
    one = keys[:1]
    ping = DataConnection(c.info.data_address)
    stack.callback(ping.close)
    calls = {"lookup_1000": lambda: c.lookup(NS_LOOKUP, keys), "lookup_1": lambda: c.lookup(NS_LOOKUP, one),
             "grpc_echo_1byte": lambda: echo_call(b"x", timeout=10), "data_channel_ping": ping.ping}
    for _ in range(20):
        for f in calls.values():
            f()
    log(f"lookup, {transport}: {s.lookup_reps} calls of {len(keys)} keys, and bare round trips")
    settle()
    ts: dict[str, list[float]] = {name: [] for name in calls}
    done = load_meter([daemon])
    for _ in range(s.lookup_reps):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            ts[name].append((time.perf_counter() - t0) * 1e3)
    load = done()
    tiers, _ = c.lookup(NS_LOOKUP, keys)
    if sum(1 for t in tiers if t) != half:
        raise RuntimeError(f"lookup found {sum(1 for t in tiers if t)} of {half} present keys")
    c.delete(NS_LOOKUP, present)

    def stats(ms: list[float]) -> dict:
        return {"median": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms)}
    results["lookup"].append({"transport": transport, "keys": len(keys), "present": half, "calls": s.lookup_reps,
                              "machine": load, "ms": stats(ts["lookup_1000"]), "call_ms": ts["lookup_1000"],
                              "round_trips_ms": {name: stats(v) for name, v in ts.items() if name != "lookup_1000"}})


def lock_state(addr: str) -> dict:
    from kvtier.client import Client
    with Client(addr, attach=False) as c:
        t = c.stats().tiers[0]
    return {"locked": t.locked, "lock_detail": t.lock_detail, "backing": t.backing, "capacity_bytes": t.capacity_bytes}


def machine() -> dict:
    def read(p: str) -> str:
        try:
            return pathlib.Path(p).read_text().strip()
        except OSError:
            return ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), "0")
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "mem_total_gib": round(int(mem) / 2**20, 1), "kernel": platform.release(),
            "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_shmem_enabled": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled")}


def versions() -> dict:
    import grpc
    import google.protobuf
    import xxhash
    import kvtier

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "kvtier": kvtier.__version__, "python": platform.python_version(), "grpc": grpc.__version__,
            "protobuf": google.protobuf.__version__, "numpy": np.__version__, "xxhash": xxhash.VERSION}


PARTS = ("arena", "inline", "lookup")


def run(s: Settings, mode: str, parts: tuple[str, ...] = PARTS) -> dict:
    import grpc
    results: dict = {"meta": {**versions(), **machine(), "mode": mode,
                              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                     "settings": {**dataclasses.asdict(s), "block_sizes": list(SIZES)},
                     "arena": [], "arena_steps": [], "inline": [], "lookup": [], "data_address": {}, "daemon": {}}
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="kvb-")      # short: AF_UNIX paths are limited to 107 bytes
        stack.callback(shutil.rmtree, tmp, True)
        bufs = Buffers(s.round_bytes, tmp)
        stack.callback(bufs.close)

        raw_unix, echo_unix = os.path.join(tmp, "raw.sock"), os.path.join(tmp, "echo.sock")
        raw_port, echo_port = free_ports(2)
        raw = Proc("raw socket server", [sys.executable, "-m", "bench.core", "--serve-raw", raw_unix, str(raw_port),
                                         str(s.round_bytes)], os.path.join(tmp, "raw.log"))
        stack.callback(raw.stop)
        echo = Proc("gRPC echo server", [sys.executable, "-m", "bench.core", "--serve-grpc", echo_unix, str(echo_port)],
                    os.path.join(tmp, "echo.log"))
        stack.callback(echo.stop)
        wait_for("raw socket server", raw, lambda: can_connect(socket.AF_UNIX, raw_unix)
                 and can_connect(socket.AF_INET, ("127.0.0.1", raw_port)))
        opts = [("grpc.max_receive_message_length", GRPC_MAX_MSG), ("grpc.max_send_message_length", GRPC_MAX_MSG)]
        echo_calls = {}
        for transport, target in (("unix", f"unix:{echo_unix}"), ("tcp", f"127.0.0.1:{echo_port}")):
            ch = grpc.insecure_channel(target, options=opts)
            stack.callback(ch.close)
            echo_calls[transport] = ch.unary_unary(ECHO_METHOD)
        wait_for("gRPC echo server", echo, lambda: all(bool(call(b"x", timeout=1)) for call in echo_calls.values()))
        raw_addrs = {"unix": raw_unix, "tcp": ("127.0.0.1", raw_port)}

        # daemon A: Unix socket only (a TCP listener would make Attach advertise the TCP data channel)
        with contextlib.ExitStack() as dstack:
            daemon, addrs = start_daemon(dstack, tmp, s.arena_capacity, tcp=False)
            results["daemon"]["unix"] = lock_state(addrs["unix"])
            if "arena" in parts:
                arena_cases(addrs["unix"], daemon, bufs, s, results, dstack)
                arena_steps(addrs["unix"], bufs, s, results, dstack)
            if "inline" in parts:
                inline_cases("unix", addrs["unix"], raw_addrs["unix"], echo_calls["unix"], daemon, raw, echo,
                             bufs, s, results, dstack)
            if "lookup" in parts:
                lookup_case("unix", addrs["unix"], daemon, echo_calls["unix"], s, results, dstack)
        # daemon B: gRPC and data channel on TCP 127.0.0.1
        if "inline" in parts or "lookup" in parts:
            with contextlib.ExitStack() as dstack:
                daemon, addrs = start_daemon(dstack, tmp, s.arena_capacity, tcp=True)
                if "inline" in parts:
                    inline_cases("tcp", addrs["tcp"], raw_addrs["tcp"], echo_calls["tcp"], daemon, raw, echo,
                                 bufs, s, results, dstack)
                if "lookup" in parts:
                    lookup_case("tcp", addrs["tcp"], daemon, echo_calls["tcp"], s, results, dstack)
    results["meta"]["wall_s"] = round(time.monotonic() - t_start, 1)
    results["meta"]["settle_waited_s"] = round(SETTLE["waited_s"], 1)
    results["targets"] = targets(results)
    return results


def targets(r: dict) -> list[dict]:
    out = []

    def add(claim: str, value: float, holds: bool, load: dict) -> None:
        out.append({"claim": claim, "value": value, "holds": holds, "other_cpu_share": load["foreign_cpu_share"],
                    "noisy": load["foreign_cpu_share"] > NOISY})
    for a in r["arena"]:
        if a["block_bytes"] == 2 * MiB:
            ratio = a["cases"]["kvtier_arena"]["gbps"]["median"] / a["cases"]["memcpy"]["gbps"]["median"]
            add("arena put+get, 2 MiB blocks >= 0.8x memcpy", ratio, ratio >= TARGET_RATIO, a["machine"])
    for i in r["inline"]:
        ratio = i["cases"]["kvtier_data"]["gbps"]["median"] / i["cases"]["raw_echo"]["gbps"]["median"]
        add(f"data channel put+get over {i['transport']}, {fmt_size(i['block_bytes'])} blocks >= 0.8x raw socket echo",
            ratio, ratio >= TARGET_RATIO, i["machine"])
    for lk in r["lookup"]:
        v = lk["ms"]["median"]
        add(f"Lookup of {lk['keys']} keys over {lk['transport']}: median <= 2 ms", v, v <= TARGET_LOOKUP_MS, lk["machine"])
    return out


# ---- report ----------------------------------------------------------------------------------

def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def other(load: dict) -> str:
    """Share of the machine's CPU time other work took while a group ran."""
    return f"{100 * load['foreign_cpu_share']:5.0f}%"


def gb(case: dict) -> str:
    g = case["gbps"]
    return f"{g['median']:6.2f} ({g['p90']:.2f}/{g['p99']:.2f}/{g['max']:.2f})"


def report(r: dict) -> str:
    m, st = r["meta"], r["settings"]
    lines = [f"kvtier core benchmark  git {m['git_sha'][:12]}{' (dirty)' if m['git_dirty'] else ''}  mode {m['mode']}  "
             f"python {m['python']}  grpc {m['grpc']}  {m['cpu_count']} CPUs ({m['cpu_model']})  {m['wall_s']} s",
             f"round: put_many + get_many of {fmt_size(st['round_bytes'])}; GB/s = 2 x {fmt_size(st['round_bytes'])} "
             f"/ round time, shown as median (at p90/p99/max round time); ratio = median / median",
             f"arena lock: {r['daemon'].get('unix', {}).get('locked')} "
             f"{r['daemon'].get('unix', {}).get('lock_detail', '')[:80]}",
             "other = share of the machine's CPU time taken by other processes (and steal) while a group ran", ""]
    if r.get("daemon_settings"):
        lines[-1:-1] = ["daemon settings: " + "; ".join(r["daemon_settings"])]
    lines.append(f"1. arena path ({st['reps']} rounds)")
    lines.append(f"{'block':>8} {'kvtier arena GB/s':>28} {'memcpy GB/s':>28} {'ratio':>6} "
                 f"{'memcpy tmpfs':>12} {'ratio':>6} {'no-verify':>9} {'xxh3':>6} {'other':>6}")
    for a in r["arena"]:
        c = a["cases"]
        k, mc, mt, nv = (c[x]["gbps"]["median"] for x in ("kvtier_arena", "memcpy", "memcpy_tmpfs", "kvtier_arena_noverify"))
        lines.append(f"{fmt_size(a['block_bytes']):>8} {gb(c['kvtier_arena']):>28} {gb(c['memcpy']):>28} {k / mc:6.2f} "
                     f"{mt:12.2f} {k / mt:6.2f} {nv:9.2f} {a['xxh3_gbps']:6.1f} {other(a['machine'])}")
    lines.append("")
    for transport in ("unix", "tcp"):
        rows = [i for i in r["inline"] if i["transport"] == transport]
        if not rows:
            continue
        lines.append(f"2. inline over {transport} ({st['reps']} rounds; gRPC {st['grpc_reps']} rounds; "
                     f"data channel at {r['data_address'].get(transport)})")
        lines.append(f"{'block':>8} {'kvtier data GB/s':>28} {'raw echo GB/s':>28} {'ratio':>6} "
                     f"{'raw pipelined':>13} {'ratio':>6} {'kvtier gRPC':>11} {'gRPC echo':>9} {'ratio':>6} {'other':>6}")
        for i in rows:
            c = i["cases"]
            k, re_, rp, kg, ge = (c[x]["gbps"]["median"] for x in
                                  ("kvtier_data", "raw_echo", "raw_pipelined", "kvtier_grpc", "grpc_echo"))
            lines.append(f"{fmt_size(i['block_bytes']):>8} {gb(c['kvtier_data']):>28} {gb(c['raw_echo']):>28} "
                         f"{k / re_:6.2f} {rp:13.2f} {k / rp:6.2f} {kg:11.2f} {ge:9.2f} {kg / ge:6.2f} "
                         f"{other(i['machine'])}")
        lines.append("")
    if r["lookup"]:
        lines.append(f"3. Lookup of {st['lookup_keys']} x {st['key_size']}-byte keys, half present "
                     f"({st['lookup_reps']} calls)")
    for lk in r["lookup"]:
        ms = lk["ms"]
        lines.append(f"{lk['transport']:>8}  median {ms['median']:.3f} ms  p90 {ms['p90']:.3f}  p99 {ms['p99']:.3f}  "
                     f"max {ms['max']:.3f}  other {other(lk['machine']).strip()}")
        lines.append("          round trips, median (p90) ms: " + "  ".join(
            f"{name} {v['median']:.3f} ({v['p90']:.3f})" for name, v in lk["round_trips_ms"].items()))
    if r["lookup"]:
        lines.append("")
    lines.append("4. where the time goes (medians, ms per round)")
    if r["arena_steps"]:
        lines.append("   arena round, step by step")
        lines.append(f"{'block':>8}  " + "  ".join(f"{n:>8}" for n in ARENA_STEPS))
    for a in r["arena_steps"]:
        lines.append(f"{fmt_size(a['block_bytes']):>8}  " + "  ".join(f"{v:8.2f}" for v in a["median_ms"].values()))
    if r["inline"]:
        lines.append("   data channel vs raw pipelined: put ms, get ms; CPU ms per round client/server")
    for i in r["inline"]:
        k, rp = i["cases"]["kvtier_data"], i["cases"]["raw_pipelined"]
        lines.append(f"{i['transport']:>5} {fmt_size(i['block_bytes']):>7}  kvtier {1e3 * k['put_seconds_median']:6.2f} "
                     f"{1e3 * k['get_seconds_median']:6.2f}  cpu {1e3 * k['client_cpu_s_per_round']:6.2f}/"
                     f"{1e3 * k['server_cpu_s_per_round']:6.2f}   raw {1e3 * rp['put_seconds_median']:6.2f} "
                     f"{1e3 * rp['get_seconds_median']:6.2f}  cpu {1e3 * rp['client_cpu_s_per_round']:6.2f}/"
                     f"{1e3 * rp['server_cpu_s_per_round']:6.2f}")
    lines.append("")
    lines.append("targets")
    for t in r["targets"]:
        noisy = f"   (noisy: other work took {100 * t['other_cpu_share']:.0f}% of the CPUs)" if t["noisy"] else ""
        lines.append(f"  {'HOLDS ' if t['holds'] else 'MISSED'}  {t['claim']}: {t['value']:.3f}{noisy}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--daemon-set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help='a daemon setting (TOML value), e.g. ram.verify_on_commit=\'"sync"\'; repeatable')
    p.add_argument("--settle", type=float, default=0, metavar="SECONDS",
                   help="on a shared machine: wait up to this long in all for other work to quiet down "
                        f"(under {NOISY * 100:.0f}%% of the CPUs) before each group (default 0: never wait)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {', '.join(PARTS)} (default: all); e.g. arena for the "
                        "arena path against memcpy alone")
    p.add_argument("--serve-raw", nargs=3, metavar=("UNIX", "PORT", "BYTES"), help=argparse.SUPPRESS)
    p.add_argument("--serve-grpc", nargs=2, metavar=("UNIX", "PORT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_raw:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        serve_raw(a.serve_raw[0], int(a.serve_raw[1]), int(a.serve_raw[2]))
        return 0
    if a.serve_grpc:
        serve_grpc_echo(a.serve_grpc[0], int(a.serve_grpc[1]))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the servers, remove their files
    SETTLE["budget_s"] = a.settle
    for item in a.daemon_set:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (eq and dot and section and name and value):
            p.error(f"--daemon-set wants SECTION.NAME=VALUE, got {item!r}")
        DAEMON_SETTINGS.append((section, name, value))
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts takes a subset of {', '.join(PARTS)}, got {a.parts!r}")
    r = run(QUICK if a.quick else FULL, "quick" if a.quick else "full", parts)
    r["settings"]["parts"] = list(parts)
    r["daemon_settings"] = [f"{sec}.{name} = {value}" for sec, name, value in DAEMON_SETTINGS]
    print(report(r))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
