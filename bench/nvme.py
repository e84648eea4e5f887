"""NVMe tier: spill and read-back of 2 MiB blocks against raw O_DIRECT I/O, and restart time.

    .venv/bin/python -m bench.nvme                       # full run, about 3 minutes
    .venv/bin/python -m bench.nvme --quick               # under a minute
    .venv/bin/python -m bench.nvme --dir /mnt/nvme0/tmp --json bench-nvme.json --markdown bench-nvme.md
    .venv/bin/python -m bench.nvme --drop-caches         # root: restart also with cold dentry/inode/page caches
    .venv/bin/python -m bench.nvme --parts c --arena-dir /dev/hugepages   # the arena on hugetlbfs, as on an H200 node

Run from the repository root. Everything happens in a fresh directory under ``--dir``
(default: under /tmp, or /var/tmp when /tmp is a tmpfs: the point is the disk), which is
removed at the end, as is every daemon started (arena on /dev/shm), also on error or SIGTERM.

Parts, each measured in the same run and the same directory as its baseline:

A. raw O_DIRECT (the machine's limit, in Python): THREADS threads, each writing its share of a
   round's 2 MiB blocks from page-aligned buffers, one file per block as kvtier does
   (open O_WRONLY|O_CREAT|O_DIRECT, pwrite, close), then reading them back
   (open O_RDONLY|O_DIRECT, preadv, close) into a page-aligned buffer per thread; its files go
   into the same hash-named subdirectories as the kvtier files it is compared with;
B. ``ColdTier.write`` and ``ColdTier.read`` of the same number of blocks with the same thread
   count (durability "none", codec "none", O_DIRECT as probed): the spill and read-back path
   without the daemon. Its files also carry the 4 KiB record header, a temp name and a rename,
   and every read verifies the xxh3-128 checksum;
   A and B alternate round by round (order flipped every round); files are removed untimed.
C. a real daemon (``python -m kvtier.cli serve``, RAM 256 MiB, 4 NVMe I/O threads, durability
   "none"): spill = put_many through the arena of SPILL bytes of fresh 2 MiB keys in batches of
   16, pacing each batch on the write queue reported by Stats (``queued_bytes``; the daemon drops
   writes beyond its queue rather than block a put), timed until Stats shows every block on NVMe
   (write_policy "commit") or every block either on NVMe or still in RAM (write_policy "evict":
   RAM is filled with other blocks first, untimed, so each put of the round demotes one block and
   about SPILL bytes are written; the last RAM-full is never evicted), queue drained; read-back =
   get_many (Acquire, into preallocated buffers, verified) in batches of 16, first of as many
   blocks Lookup reports only on NVMe as the spill left in RAM, then of those RAM blocks (evicted
   by then), one half from 1 client thread and the other from THREADS, which first alternating
   by round, each timed until the write queue is empty again. Under write_policy "evict" the
   first half's promotions each write their victim ("victims written", compared with raw reads
   that write as many blocks; the time includes the last victims' writes) and the second's write
   nothing ("victims on NVMe", which starts on a quiet disk); the report counts the demotions
   per block read back, and how the disk saw each read case (/proc/diskstats: requests per
   block, KiB per request, reads in flight, share of the time busy). Each daemon round follows
   a raw round of the same block count (A's code) and the ratio is to that; ``--policies``
   picks the write policies;
D. ColdTier.read taken apart on its own files (payload only; header and payload in one preadv,
   as it reads; header then payload; the same plus checksum verification; ColdTier.read itself),
   the cost of copying a demoted block into a fresh anonymous mapping (what Store._on_evict
   would pay without its buffer pool) against the same copy into a reused buffer, and the
   latency of one read at a time (256 KiB and 2 MiB) in one preadv, in two, and by ColdTier.read;
S. what an engine's scheduler waits for when a prompt's prefix is only on NVMe: a daemon as in
   C spills SCHED_BLOCKS x 2 MiB (put, written behind, then evicted from RAM by more puts) and
   is asked for them with one Acquire (prefix only), as the vLLM connector's scheduler asks:
   with ``background`` (the answer, then an ordinary Acquire of the same keys, as the worker's
   load, until the bytes are in RAM) and without (the answer waits for the reads), alternating
   by round, each on blocks only on NVMe. Baseline: a raw O_DIRECT read of as many 2 MiB files
   (A's code, THREADS threads) in the same round. Target: the background answer <= 0.1x the raw
   read (it must not grow with the bytes);
E. restart: directories of 10k and 100k block files (4 KiB payload, valid records written
   directly), then (i) ``ColdTier(...)`` + ``scan()`` in this process (the index from names and
   sizes), then ``verify_pending()`` on 8 threads (the header check a daemon runs in the
   background once it serves), and (ii) a daemon subprocess from spawn to its first successful
   Stats, beside a daemon with no NVMe directory (the interpreter, imports and gRPC start-up every
   daemon pays), and two references: listing the file names alone, and reading every header
   (open, fstat, read 512 bytes) on 32 threads. With --drop-caches (root) the kernel's page,
   dentry and inode caches are dropped before each timed start as well (this slows every process
   on the machine).

Throughput is GB/s (1e9 bytes) of block bytes: median over rounds, and the p90 / p99 / slowest
rounds (90% / 99% / all of the rounds were at least that fast). Ratio = median kvtier / median raw
of the same direction. Times are seconds, median / p90 / p99 / max. Targets (issue): spill and
read-back >= 0.9x raw O_DIRECT of the same size on the same directory; restart with 100k blocks on
disk serving in <= 5 s; the scheduler's background answer (part S) <= 0.1x the raw read of its bytes. The report goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import mmap
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from bench import emit

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 2 * MiB
PAGE = 4096
THREADS = 4
BATCH = 16
NS = "bench"
REPO = pathlib.Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.9
TARGET_RESTART_S = 5.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def gbs_summary(nbytes: int, times: list[float]) -> dict:
    """Median and p90/p99/slowest-round GB/s of rounds that each moved nbytes."""
    return {"median_gbs": nbytes / statistics.median(times) / 1e9, "p90_gbs": nbytes / pct(times, 90) / 1e9,
            "p99_gbs": nbytes / pct(times, 99) / 1e9, "worst_gbs": nbytes / max(times) / 1e9,
            "rounds": len(times), "bytes_per_round": nbytes, "times_s": times}


def time_summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "p90_s": pct(times, 90), "p99_s": pct(times, 99),
            "max_s": max(times), "runs": len(times), "times_s": times}


# ---- buffers and the raw baseline -------------------------------------------------------------

def aligned_buffer(n: int, fill: bytes | None = None) -> mmap.mmap:
    """Anonymous mapping: page-aligned, as the daemon's arena slots are; touched (or filled)."""
    buf = mmap.mmap(-1, n)
    buf[:] = fill if fill is not None else b"\1" * n
    return buf


DESTINATIONS = 128  # read targets: block i lands in slot i % DESTINATIONS of one 256 MiB mapping
_dsts: list = []


def destinations() -> list[memoryview]:
    """The 2 MiB slots (page-aligned) of one mapping, made once, that the raw and ColdTier reads
    cycle through, as the daemon's reads land in slots of its one arena mapping. On this kind of
    VM the target matters: O_DIRECT into a separate 2 MiB mapping per thread ran at 1.0 GB/s in one
    process and 2.3 in the next; into slots of one large mapping, shared or private, at 2.9-3.1."""
    if not _dsts:
        whole = aligned_buffer(DESTINATIONS * BLOCK)
        _dsts.extend(memoryview(whole)[i * BLOCK:(i + 1) * BLOCK] for i in range(DESTINATIONS))
    return _dsts


class Sources:
    """16 distinct page-aligned 2 MiB blocks of random bytes, used round-robin as write sources."""

    def __init__(self, n: int = 16):
        rng = np.random.default_rng(7)
        self.bufs = [aligned_buffer(BLOCK, rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()) for _ in range(n)]
        from kvtier import record
        self.digests = [record.checksum(b) for b in self.bufs]

    def __getitem__(self, i: int) -> tuple[mmap.mmap, bytes]:
        return self.bufs[i % len(self.bufs)], self.digests[i % len(self.digests)]


def run_threads(pool: ThreadPoolExecutor, n: int, fn, threads: int = THREADS) -> float:
    """fn(thread_index, indices) on `threads` threads, items i::threads each; wall seconds."""
    t0 = time.perf_counter()
    futs = [pool.submit(fn, t, range(t, n, threads)) for t in range(threads)]
    for f in futs:
        f.result()
    return time.perf_counter() - t0


class Raw:
    """One file per block, O_DIRECT, no header, no rename, no checksum: the disk through Python.

    Its files go into the same 256 hash-named subdirectories as the kvtier files it is compared
    with (named ``*.raw``, which ColdTier ignores), so both land in the same filesystem block
    groups: on this VM's disk, two sibling directories can differ by 2x in read speed."""

    def __init__(self, path: str, src: Sources, pool: ThreadPoolExecutor):
        self.dir = path
        for i in range(256):
            os.makedirs(os.path.join(path, f"{i:02x}"), exist_ok=True)
        self.src, self.pool = src, pool
        self.dst = destinations()
        self.names: list[str] = []

    def _new_names(self, n: int) -> list[str]:
        hexes = [uuid.uuid4().hex for _ in range(n)]
        return [os.path.join(self.dir, h[:2], h + ".raw") for h in hexes]

    def _write_one(self, path: str, i: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o640)
        try:
            if os.pwrite(fd, self.src[i][0], 0) != BLOCK:
                raise OSError("short write")
        finally:
            os.close(fd)

    def _read_one(self, i: int) -> None:
        fd = os.open(self.names[i], os.O_RDONLY | os.O_DIRECT)
        try:
            if os.preadv(fd, [self.dst[i % len(self.dst)]], 0) != BLOCK:
                raise OSError("short read")
        finally:
            os.close(fd)

    def write(self, n: int) -> float:
        self.names = self._new_names(n)

        def work(t, idx):
            for i in idx:
                self._write_one(self.names[i], i)
        return run_threads(self.pool, n, work)

    def read(self, n: int, threads: int = THREADS) -> float:
        def work(t, idx):
            for i in idx:
                self._read_one(i)
        return run_threads(self.pool, n, work, threads)

    def read_write(self, n: int) -> float:
        """Read n of the files while writing n new ones, a read and a write per item, THREADS at a
        time: the disk's pace when every block read back brings another to write (a promotion
        under write_policy "evict" whose victim is only in RAM). Wall seconds; the new files
        are removed by clear()."""
        more = self._new_names(n)

        def work(t, idx):
            for i in idx:
                self._read_one(i)
                self._write_one(more[i], i)
        try:
            return run_threads(self.pool, n, work)
        finally:
            self.names += [p for p in more if os.path.exists(p)]

    def clear(self) -> None:
        for p in self.names:
            os.unlink(p)
        self.names = []


class Cold:
    """kvtier.cold.ColdTier write/read of the same blocks, threads and buffers."""

    def __init__(self, path: str, src: Sources, pool: ThreadPoolExecutor):
        from kvtier.cold import ColdTier
        self.tier = ColdTier([(os.path.join(path, "cold"), 64 * GiB)], durability="none", direct_io="auto",
                             codec="none")
        self.src, self.pool = src, pool
        self.dst = destinations()
        self.keys: list[bytes] = []

    def write(self, n: int) -> float:
        self.keys = [os.urandom(16) for _ in range(n)]
        tier = self.tier

        def work(t, idx):
            for i in idx:
                buf, digest = self.src[i]
                with memoryview(buf) as mv:
                    if not tier.write(NS, self.keys[i], mv, BLOCK, digest):
                        raise RuntimeError("ColdTier.write refused a block")
        return run_threads(self.pool, n, work)

    def read(self, n: int) -> float:
        tier = self.tier

        def work(t, idx):
            for i in idx:
                dst = self.dst[i % len(self.dst)]
                if tier.read(NS, self.keys[i], lambda _n: dst) is None:
                    raise RuntimeError("ColdTier.read missed a block")
        return run_threads(self.pool, n, work)

    def clear(self) -> None:
        for k in self.keys:
            self.tier.delete(NS, k)
        self.keys = []


def cpu_self() -> float:
    return sum(os.times()[:2])


# ---- noise: what else the machine and the disk were doing ------------------------------------

NOISY_CPU = 0.25   # a part during which other processes took more than this share of the CPUs is flagged


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all CPUs, /proc/stat)."""
    f = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def diskstats(device: str) -> list[int]:
    """A block device's counters since boot, the fields of its /proc/diskstats line after the
    name (reads, reads merged, sectors read, ms reading, writes, ..., ms with any I/O in flight
    at [9]); zeros if the device is unknown."""
    name = os.path.basename(device)
    for line in pathlib.Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 12 and f[2] == name:
            return [int(x) for x in f[3:]]
    return [0] * 11


def disk_reads(device: str) -> tuple[int, int, int, int]:
    """(reads completed, sectors read, milliseconds spent reading, milliseconds with any request in
    flight) of a block device since boot (zeros if unknown). The milliseconds reading add up
    every request's time, so over a stretch of wall time they give the average number of reads
    in flight (Little's law); the last counts wall time the device was busy."""
    f = diskstats(device)
    return f[0], f[2], f[3], f[9]


def disk_view(before: tuple, after: tuple, blocks: int, wall_s: float) -> dict | None:
    """How the disk saw a stretch of reads of ``blocks`` blocks: requests per block, KiB per
    request, reads in flight on average, share of the time it had any request. None when the
    device's counters did not move."""
    reads, sectors, ms, busy = (b - a for a, b in zip(before, after))
    if reads <= 0 or blocks <= 0 or wall_s <= 0:
        return None
    return {"requests_per_block": reads / blocks, "kib_per_request": sectors * 512 / KiB / reads,
            "in_flight": ms / (wall_s * 1000), "busy": min(1.0, busy / (wall_s * 1000))}


def median_view(views: list[dict]) -> dict | None:
    """Each figure of disk_view, the median over rounds."""
    if not views:
        return None
    return {k: statistics.median(v[k] for v in views) for k in views[0]}


def disk_bytes(device: str) -> int:
    """Bytes read + written on a block device since boot (/proc/diskstats; 0 if unknown)."""
    f = diskstats(device)
    return (f[2] + f[6]) * 512


class Noise:
    """Share of the CPUs other processes took, and bytes the disk moved, while a part ran."""

    def __init__(self, device: str, daemons=()):
        self.device, self.daemons = device, daemons
        self.t0, self.busy0, self.own0, self.disk0 = time.monotonic(), machine_busy_s(), self.own(), disk_bytes(device)

    def own(self) -> float:
        return cpu_self() + sum(d.cpu_seconds() for d in self.daemons)

    def done(self, own_bytes: int) -> dict:
        wall = time.monotonic() - self.t0
        foreign = max(0.0, machine_busy_s() - self.busy0 - (self.own() - self.own0))
        moved = disk_bytes(self.device) - self.disk0
        return {"wall_s": round(wall, 1), "foreign_cpu_share": round(foreign / (wall * (os.cpu_count() or 1)), 3),
                "disk_gb": round(moved / 1e9, 2), "own_gb": round(own_bytes / 1e9, 2),
                "foreign_disk_gbs": round(max(0, moved - own_bytes) / 1e9 / wall, 3),
                "loadavg_1m": round(os.getloadavg()[0], 2)}


def settle(budget_s: float, device: str) -> float:
    """Wait, at most budget_s, until other work takes under NOISY_CPU of the CPUs and the disk moves
    under 50 MB/s, sampled over 2 s. Returns seconds waited."""
    waited = 0.0
    while waited < budget_s:
        b0, d0, t0 = machine_busy_s(), disk_bytes(device), time.monotonic()
        time.sleep(2)
        dt = time.monotonic() - t0
        waited += dt
        if (machine_busy_s() - b0) / (dt * (os.cpu_count() or 1)) < NOISY_CPU and \
                (disk_bytes(device) - d0) / dt < 50e6:
            break
    return waited


def part_ab(path: str, rounds: int, nblocks: int, src: Sources, pool: ThreadPoolExecutor, device: str) -> dict:
    cold = Cold(path, src, pool)
    raw = Raw(cold.tier.dirs[0].path, src, pool)
    log(f"A/B: {rounds} rounds of {nblocks} x 2 MiB per case, {THREADS} threads, direct_io="
        f"{cold.tier.dirs[0].direct}")
    times = {("raw", "write"): [], ("raw", "read"): [], ("kvtier", "write"): [], ("kvtier", "read"): []}
    cpu = {k: 0.0 for k in times}
    noise = Noise(device)
    for r in range(rounds + 1):                # round 0: warm-up
        order = [("raw", raw), ("kvtier", cold)]
        if r % 2:
            order.reverse()
        for op in ("write", "read"):
            for name, case in order:
                c0 = cpu_self()
                dt = getattr(case, op)(nblocks)
                if r:
                    times[(name, op)].append(dt)
                    cpu[(name, op)] += cpu_self() - c0
        raw.clear()
        cold.clear()
        if r:
            log(f"  round {r}/{rounds}: raw w {nblocks * BLOCK / times[('raw', 'write')][-1] / 1e9:.2f} "
                f"r {nblocks * BLOCK / times[('raw', 'read')][-1] / 1e9:.2f}, kvtier w "
                f"{nblocks * BLOCK / times[('kvtier', 'write')][-1] / 1e9:.2f} "
                f"r {nblocks * BLOCK / times[('kvtier', 'read')][-1] / 1e9:.2f} GB/s")
    s = cold.tier.snapshot()
    assert s["checksum_failures"] == 0 and s["io_errors"] == 0 and s["dropped_writes"] == 0, s
    out = {"direct_io": cold.tier.dirs[0].direct, "blocks_per_round": nblocks, "threads": THREADS, "cases": {},
           "noise": noise.done((rounds + 1) * 4 * nblocks * BLOCK)}
    for (name, op), ts in times.items():
        row = gbs_summary(nblocks * BLOCK, ts)
        row["cpu_s_per_gb"] = cpu[(name, op)] / (nblocks * BLOCK * len(ts) / 1e9)
        out["cases"][f"{name} {op}"] = row
    for op in ("write", "read"):
        k, b = out["cases"][f"kvtier {op}"], out["cases"][f"raw {op}"]
        k["ratio"] = k["median_gbs"] / b["median_gbs"]
        k["paired_ratio_median"] = statistics.median(
            bt / kt for bt, kt in zip(times[("raw", op)], times[("kvtier", op)]))
    shutil.rmtree(cold.tier.dirs[0].path, ignore_errors=True)
    return out


# ---- where ColdTier.read's time goes, and the demotion copy -------------------------------------

def part_anatomy(path: str, rounds: int, nblocks: int, src: Sources, pool: ThreadPoolExecutor, device: str) -> dict:
    """ColdTier.read taken apart on its own files, THREADS threads, variants alternating:
    payload only (one preadv at offset 4096), header + payload in one preadv (as ColdTier.read
    does), header then payload (two preadv), the same plus xxh3-128 verification, and
    ColdTier.read. Then a demotion copy into a fresh anonymous mapping per block (what
    Store._on_evict's buffer pool avoids) against the same copy into a reused buffer."""
    from kvtier import record
    from kvtier.cold import file_name
    cold = Cold(path, src, pool)
    heads = [aligned_buffer(PAGE) for _ in range(THREADS)]

    def variant(kind, paths, digests):
        def work(t, idx):
            for i in idx:
                dst = cold.dst[i % len(cold.dst)]
                fd = os.open(paths[i], os.O_RDONLY | os.O_DIRECT)
                try:
                    if kind == "payload only":
                        os.preadv(fd, [dst], PAGE)
                    elif kind == "header + payload, one preadv":
                        os.preadv(fd, [heads[t], dst], 0)
                    else:
                        os.preadv(fd, [heads[t]], 0)
                        os.preadv(fd, [dst], PAGE)
                finally:
                    os.close(fd)
                if kind.endswith("verify") and record.checksum(dst) != digests[i]:
                    raise RuntimeError("checksum mismatch")
        return lambda: run_threads(pool, nblocks, work)

    names = ["payload only", "header + payload, one preadv", "header, then payload",
             "header, then payload, verify", "ColdTier.read"]
    times = {k: [] for k in names}
    cpu = {k: 0.0 for k in names}
    noise = Noise(device)
    for r in range(rounds + 1):
        cold.write(nblocks)
        paths = [os.path.join(cold.tier.dirs[0].path, *file_name(NS, k)) for k in cold.keys]
        digests = [src[i][1] for i in range(nblocks)]
        cases = [(k, variant(k, paths, digests)) for k in names[:-1]] + [("ColdTier.read", lambda: cold.read(nblocks))]
        if r % 2:
            cases.reverse()
        for k, fn in cases:
            c0 = cpu_self()
            dt = fn()
            if r:
                times[k].append(dt)
                cpu[k] += cpu_self() - c0
        cold.clear()
    out = {"blocks_per_round": nblocks, "cases": {}, "noise": noise.done((rounds + 1) * 6 * nblocks * BLOCK)}
    base = statistics.median(times["payload only"])
    for k in names:
        row = gbs_summary(nblocks * BLOCK, times[k])
        row["cpu_s_per_gb"] = cpu[k] / (nblocks * BLOCK * len(times[k]) / 1e9)
        row["ratio"] = base / statistics.median(times[k])
        out["cases"][k] = row
    shutil.rmtree(cold.tier.dirs[0].path, ignore_errors=True)
    # the demotion copy: a fresh mapping per evicted block, against the reused buffer Store._on_evict takes
    data = memoryview(src[0][0])
    reused = aligned_buffer(BLOCK)
    copies = {"fresh mapping per block": [], "reused buffer": []}
    for _ in range(20 if rounds > 5 else 8):
        t0 = time.perf_counter()
        m = mmap.mmap(-1, BLOCK)
        m[:BLOCK] = data
        m.close()
        t1 = time.perf_counter()
        reused[:BLOCK] = data
        t2 = time.perf_counter()
        copies["fresh mapping per block"].append(t1 - t0)
        copies["reused buffer"].append(t2 - t1)
    out["copy"] = {k: {"median_ms": statistics.median(v) * 1e3, "max_ms": max(v) * 1e3,
                       "median_gbs": BLOCK / statistics.median(v) / 1e9} for k, v in copies.items()}
    out["qd1"] = read_latency(path, rounds, src)
    return out


def read_latency(path: str, rounds: int, src: Sources, n: int = 64) -> dict:
    """One read at a time (as a single-block get promotes): per-read latency of header + payload in
    one preadv, of header then payload, and of ColdTier.read, at 256 KiB and 2 MiB, alternating."""
    from kvtier.cold import ColdTier, file_name
    from kvtier.record import checksum
    out = {}
    head = aligned_buffer(PAGE)
    for size in (256 * KiB, BLOCK):
        tier = ColdTier([(os.path.join(path, "qd1"), 64 * GiB)], durability="none", direct_io="auto", codec="none")
        data = memoryview(src[0][0])
        keys = [os.urandom(16) for _ in range(n)]
        for k in keys:
            if not tier.write(NS, k, data, size, checksum(data[:size])):
                raise RuntimeError("ColdTier.write refused a block")
        paths = [os.path.join(tier.dirs[0].path, *file_name(NS, k)) for k in keys]
        dst = memoryview(aligned_buffer(BLOCK))[:size]

        def raw(two: bool):
            def one(i):
                fd = os.open(paths[i], os.O_RDONLY | os.O_DIRECT)
                try:
                    if two:
                        os.preadv(fd, [head], 0)
                        os.preadv(fd, [dst], PAGE)
                    else:
                        os.preadv(fd, [head, dst], 0)
                finally:
                    os.close(fd)
            return one

        cases = {"header + payload, one preadv": raw(False), "header, then payload": raw(True),
                 "ColdTier.read": lambda i: tier.read(NS, keys[i], lambda _n: dst)}
        lat = {k: [] for k in cases}
        for r in range(rounds + 1):
            names = list(cases) if r % 2 else list(cases)[::-1]
            for name in names:
                for i in range(n):
                    t0 = time.perf_counter()
                    cases[name](i)
                    if r:
                        lat[name].append(time.perf_counter() - t0)
        out[size] = {k: {"median_ms": statistics.median(v) * 1e3, "p90_ms": pct(v, 90) * 1e3, "reads": len(v)}
                     for k, v in lat.items()}
        for k in keys:
            tier.delete(NS, k)
        shutil.rmtree(tier.dirs[0].path, ignore_errors=True)
    return out


# ---- daemons ----------------------------------------------------------------------------------

PART_C_RAM = "256MiB"
ARENA_HUGE = "arena on 2 MiB tmpfs pages"
def huge_tmpfs(tmp: str, need: int, stack: contextlib.ExitStack) -> tuple[str | None, str]:
    """A directory on a tmpfs whose files get 2 MiB pages, with ``need`` bytes free: a writable
    mount that has them (its path), else, as root, a tmpfs mounted under tmp for this run and
    unmounted at its end. (None, why) where neither is possible."""
    from kvtier.arena import tmpfs_may_be_huge   # the daemon's own test of such a mount
    with open("/proc/mounts") as f:
        mounts = [parts[1].replace("\\040", " ") for parts in map(str.split, f)
                  if len(parts) > 2 and parts[2] == "tmpfs"]
    for mnt in mounts:
        st = os.statvfs(mnt)
        if tmpfs_may_be_huge(mnt) and os.access(mnt, os.W_OK) and st.f_bavail * st.f_frsize >= need:
            return mnt, f"the tmpfs mounted at {mnt}, which gives huge pages"
    if os.geteuid() != 0:
        return None, "no writable tmpfs with huge pages, and not root to mount one"
    mnt = tempfile.mkdtemp(prefix="kvtier-bench-huge-", dir=tmp)
    size = -(-need // (2 * MiB)) * 2 * MiB
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},huge=within_size,mode=0755", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode:
        os.rmdir(mnt)
        return None, f"mount -t tmpfs -o huge=within_size failed: {r.stderr.strip() or r.returncode}"
    stack.callback(subprocess.run, ["umount", "-l", mnt], capture_output=True)
    return mnt, f"a tmpfs of {size // MiB} MiB mounted for the run (huge=within_size)"

def arena_root_of(arena_root: str | None, tmp: str) -> str:
    """Where a benchmark daemon's arena goes: arena_root, else /dev/shm, else tmp."""
    return arena_root or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp)


class Daemon:
    """``kvtier serve`` in its own session, arena on /dev/shm; stop() = SIGTERM, then SIGKILL."""

    def __init__(self, tmp: str, nvme_dir: str | None, ram: str = "256MiB", write_policy: str = "commit",
                 capacity: str = "32GiB", arena_root: str | None = None):
        tag = uuid.uuid4().hex[:10]
        self.arena_dir = os.path.join(arena_root_of(arena_root, tmp), f"kvtier-bench-{tag}")
        self.sock = os.path.join(tmp, f"d{tag[:6]}.sock")
        self.address = f"unix://{self.sock}"
        lines = ["[server]", f'socket = "{self.sock}"', "drain_timeout_s = 1.0", 'log_level = "warning"',
                 "[ram]", f'arena_path = "{self.arena_dir}/arena"', f'capacity = "{ram}"', "persist = false",
                 "[metrics]", 'listen = ""']
        if nvme_dir:
            lines += ["[nvme]", f'dirs = ["{nvme_dir}"]', f'capacity = "{capacity}"',
                      f'write_policy = "{write_policy}"', 'durability = "none"', f"io_threads = {THREADS}"]
        self.cfg = os.path.join(tmp, f"daemon-{tag}.toml")
        pathlib.Path(self.cfg).write_text("\n".join(lines) + "\n")
        self.log_path = os.path.join(tmp, f"daemon-{tag}.log")
        self.p: subprocess.Popen | None = None

    def spawn(self) -> float:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with open(self.log_path, "ab") as logf:
            t0 = time.perf_counter()
            self.p = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--config", self.cfg],
                                      stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                      start_new_session=True)
        return t0

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll Stats (every 10 ms) until it answers."""
        from kvtier.client import Client
        from kvtier.errors import KvtierError
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.p.returncode}:\n{pathlib.Path(self.log_path).read_text()}")
            if os.path.exists(self.sock):
                try:
                    with Client(self.address, timeout=2) as c:
                        c.stats()
                    return
                except KvtierError:
                    pass
            time.sleep(0.01)
        raise TimeoutError(f"daemon did not answer:\n{pathlib.Path(self.log_path).read_text()}")

    def start(self) -> float:
        """Spawn and wait; seconds from spawn to the first successful Stats."""
        t0 = self.spawn()
        self.wait_ready()
        return time.perf_counter() - t0

    def cpu_seconds(self) -> float:
        try:
            f = pathlib.Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        shutil.rmtree(self.arena_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)


def tier_stats(client, name: str):
    for t in client.stats().tiers:
        if t.name == name:
            return t
    raise RuntimeError(f"no {name} tier in Stats")


def fill_ram(client, src: Sources) -> list[bytes]:
    """Put fresh blocks until RAM evicts (it is full), then wait for the demotions; the keys put."""
    keys: list[bytes] = []
    ev0 = tier_stats(client, "ram").evictions
    while tier_stats(client, "ram").evictions == ev0:
        items = [(os.urandom(16), src[j][0]) for j in range(BATCH)]
        if not all(client.put_many(NS, items)):
            raise RuntimeError("a put was not stored")
        keys += [k for k, _ in items]
    while tier_stats(client, "nvme").queued_bytes:
        time.sleep(0.01)
    return keys


def spill_round(client, daemon: Daemon, n: int, src: Sources, policy: str, queue_limit: int) -> dict:
    """Put n fresh 2 MiB blocks paced on the write queue; time until they are all on NVMe, or, with
    write_policy "evict", until every block is on NVMe or in RAM (RAM is full when the round starts,
    so each put demotes one block: about n are written)."""
    if BATCH * BLOCK > queue_limit:
        raise ValueError(f"a put of {BATCH} blocks ({BATCH * BLOCK // MiB} MiB) exceeds the daemon's write queue "
                         f"({queue_limit // MiB} MiB, half its RAM): give it more RAM")
    fillers = fill_ram(client, src) if policy == "evict" else []
    keys = [os.urandom(16) for _ in range(n)]
    nv0 = tier_stats(client, "nvme")
    base_blocks, base_dropped = nv0.blocks, nv0.dropped_writes
    ram0 = tier_stats(client, "ram").blocks
    polls = 0
    c0 = daemon.cpu_seconds()
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        while True:   # the producer keeps within the queue the daemon would otherwise drop beyond
            nv = tier_stats(client, "nvme")
            polls += 1
            if nv.queued_bytes + BATCH * BLOCK <= queue_limit:
                break
            time.sleep(0.001)
        items = [(keys[j], src[j][0]) for j in range(i, min(n, i + BATCH))]
        if not all(client.put_many(NS, items)):
            raise RuntimeError("a put was not stored")
    t_put = time.perf_counter() - t0
    while True:
        st = client.stats()
        nv = next(t for t in st.tiers if t.name == "nvme")
        ram = next(t for t in st.tiers if t.name == "ram")
        on_nvme = nv.blocks - base_blocks
        done = on_nvme >= n if policy == "commit" else on_nvme + ram.blocks >= n + ram0
        if (done and nv.queued_bytes == 0) or nv.dropped_writes > base_dropped:
            break
        time.sleep(0.001)
    dt = time.perf_counter() - t0
    if nv.dropped_writes > base_dropped:
        raise RuntimeError(f"the daemon dropped {nv.dropped_writes - base_dropped} writes")
    return {"keys": keys, "fillers": fillers, "seconds": dt, "put_seconds": t_put, "spilled": on_nvme,
            "polls": polls, "daemon_cpu_s": daemon.cpu_seconds() - c0}


def readback_round(client, daemon: Daemon, keys: list[bytes], clients: int, dsts: list, device: str = "") -> dict:
    """get_many (Acquire) of the keys that are only on NVMe, BATCH at a time, from `clients` threads,
    timed until the victims the promotions wrote (under "evict") are on NVMe too: their writes are
    work the read-back caused, and must not run into the next case's time."""
    tiers, _ = client.lookup(NS, keys)
    cold = [k for k, t in zip(keys, tiers) if t == 2]
    shares = [cold[t::clients] for t in range(clients)]
    errors: list = []

    def work(t):
        try:
            ks = shares[t]
            for i in range(0, len(ks), BATCH):
                got = client.get_many(NS, ks[i:i + BATCH], into=dsts[t])
                if any(g is None for g in got):
                    raise RuntimeError("a block only on NVMe missed")
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(clients)]
    d0 = tier_stats(client, "nvme").demotions
    c0 = daemon.cpu_seconds()
    r0 = disk_reads(device)
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    while tier_stats(client, "nvme").queued_bytes:
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    disk = disk_view(r0, disk_reads(device), len(cold), dt)   # None for no device: nothing moved
    if errors:
        raise errors[0]
    return {"seconds": dt, "blocks": len(cold), "daemon_cpu_s": daemon.cpu_seconds() - c0, "disk": disk,
            "demoted": tier_stats(client, "nvme").demotions - d0}   # victims copied out to be written


READ_WRITTEN = "victims written"     # each promotion evicts a block only in RAM, which is written first
READ_CLEAN = "victims on NVMe"       # the blocks evicted are on NVMe already: nothing to write
RAW_READ_WRITE = "raw read + as much written"


def readback_case(clients: int, condition: str = "") -> str:
    name = f"read-back {clients} client{'s' if clients > 1 else ''}"
    return f"{name}, {condition}" if condition else name


def part_c(path: str, tmp: str, rounds: int, spill_bytes: int, policies: list[str], src: Sources,
           pool: ThreadPoolExecutor, stack: contextlib.ExitStack, device: str, settle_s: float,
           arena_root: str | None = None, ram: str = PART_C_RAM) -> dict:
    from kvtier.client import Client
    n = spill_bytes // BLOCK
    dsts = [[np.ones(BLOCK, dtype=np.uint8) for _ in range(BATCH)] for _ in range(THREADS)]
    # the arena's filesystem and page size, and whether reads bounce (nvme.bounce_reads = "auto":
    # unless the arena is on 2 MiB pages), as the daemon reports them
    out = {"spill_bytes": n * BLOCK, "ram": ram, "io_threads": THREADS, "batch": BATCH, "policies": {},
           "arena_dir": arena_root_of(arena_root, tmp)}
    for policy in policies:
        ddir = os.path.join(path, f"daemon-{policy}")
        if settle_s:
            settle(settle_s, device)
        d = Daemon(tmp, ddir, ram=ram, write_policy=policy, arena_root=arena_root)
        raw = Raw(ddir, src, pool)   # the daemon's own subdirectories
        stack.callback(d.stop)
        d.start()
        client = stack.enter_context(Client(d.address, timeout=120))
        ram_stats = tier_stats(client, "ram")
        ram_cap = ram_stats.capacity_bytes
        out.update(arena_backing=ram_stats.backing, huge_pages=ram_stats.huge_pages,
                   bounce_reads=tier_stats(client, "nvme").bounce_reads)
        queue_limit = min(GiB, ram_cap // 2)   # Store.queue_limit: min(nvme.queue_bytes, arena capacity / 2)
        log(f"C ({policy}): daemon pid {d.p.pid}, {n} x 2 MiB per round, RAM {ram_cap // MiB} MiB, "
            f"write queue {queue_limit // MiB} MiB, {rounds} rounds")
        evict = policy == "evict"
        if evict and rounds < 2:
            raise ValueError("write_policy evict: part C needs 2 or more rounds (each client count reads first once)")
        # Under "evict" the first half read back promotes into a RAM full of blocks that are only
        # there, so each promotion writes its victim; by the second half the victims are blocks
        # promoted before, already on NVMe. Which client count reads first alternates by round,
        # and each is reported per condition (against a raw read that writes as much, or not).
        reads = [(1, READ_WRITTEN), (THREADS, READ_WRITTEN), (1, READ_CLEAN), (THREADS, READ_CLEAN)] if evict \
            else [(1, ""), (THREADS, "")]
        rows = {"raw write": [], "raw read": [], "raw read, 1 thread": [], "spill": []}
        rows.update({readback_case(k, cond): [] for k, cond in reads})
        if evict:
            rows[RAW_READ_WRITE] = []
        extra = {"spill_put_s": [], "spill_cpu_s": [], "readback_blocks": [], "polls": [], "spill_client_cpu_s": [],
                 "raw_write_cpu_s": [], "raw_read_cpu_s": [], "raw read disk": []}
        extra.update({readback_case(k, cond) + what: [] for k, cond in reads
                      for what in (" daemon", " client", " written", " disk")})
        noise = Noise(device, [d])
        own = 0
        for r in range(rounds + 1):
            c0 = cpu_self()
            w = raw.write(n)
            c1 = cpu_self()
            r0 = disk_reads(device)
            rd = raw.read(n)
            raw_disk = disk_view(r0, disk_reads(device), n, rd)
            c2 = cpu_self()
            rd1 = raw.read(n // 4, threads=1) * 4   # a quarter of the files, scaled to n
            rw = raw.read_write(n // 2) * 2 if evict else 0.0   # half the files read, as many written
            raw.clear()
            c3 = cpu_self()
            sp = spill_round(client, d, n, src, policy, queue_limit)
            c4 = cpu_self()
            # First as many blocks as RAM holds of those only on NVMe: their promotions evict the
            # spill's blocks in RAM (under "evict" each is written first). Then those evicted
            # blocks, on NVMe now: their promotions evict the ones promoted just before.
            tiers, _ = client.lookup(NS, sp["keys"])
            in_ram = [k for k, t in zip(sp["keys"], tiers) if t == 1]
            cold = [k for k, t in zip(sp["keys"], tiers) if t == 2][:len(in_ram)]
            if not in_ram or not cold:
                raise RuntimeError(f"after the spill {len(in_ram)} of its blocks are in RAM and {len(cold)} only "
                                   "on NVMe: both are needed")
            done = []
            for i, (k, keys) in enumerate(zip((1, THREADS) if r % 2 else (THREADS, 1), (cold, in_ram))):
                c5 = cpu_self()
                rb = readback_round(client, d, keys, k, dsts, device)
                rb["client_cpu_s"] = cpu_self() - c5
                rb["case"] = readback_case(k, "" if not evict else READ_WRITTEN if i == 0 else READ_CLEAN)
                done.append(rb)
            client.delete(NS, sp["keys"] + sp["fillers"])
            own += (2 * n + n // 4 + sp["spilled"] + sum(rb["blocks"] for rb in done)) * BLOCK
            own += n * BLOCK if evict else 0
            if not r:
                continue   # warm-up
            rows["raw write"].append(w)
            rows["raw read"].append(rd)
            rows["raw read, 1 thread"].append(rd1)
            if evict:
                rows[RAW_READ_WRITE].append(rw)
            extra["raw_write_cpu_s"].append((c1 - c0) / (n * BLOCK / 1e9))
            extra["raw_read_cpu_s"].append((c2 - c1) / (n * BLOCK / 1e9))
            if raw_disk:
                extra["raw read disk"].append(raw_disk)
            extra["spill_client_cpu_s"].append((c4 - c3) / (sp["spilled"] * BLOCK / 1e9))
            rows["spill"].append(sp["seconds"] * BLOCK / (sp["spilled"] * BLOCK) * n)  # normalised to n blocks
            for rb in done:
                gb = rb["blocks"] * BLOCK / 1e9
                rows[rb["case"]].append(rb["seconds"] / rb["blocks"] * n)
                extra[rb["case"] + " daemon"].append(rb["daemon_cpu_s"] / gb)
                extra[rb["case"] + " client"].append(rb["client_cpu_s"] / gb)
                extra[rb["case"] + " written"].append(rb["demoted"] / rb["blocks"])
                if rb["disk"]:
                    extra[rb["case"] + " disk"].append(rb["disk"])
            extra["spill_put_s"].append(sp["put_seconds"])
            extra["spill_cpu_s"].append(sp["daemon_cpu_s"] / (sp["spilled"] * BLOCK / 1e9))
            extra["readback_blocks"].append(sum(rb["blocks"] for rb in done))
            extra["polls"].append(sp["polls"])
            log(f"  round {r}/{rounds}: raw w {n * BLOCK / w / 1e9:.2f} r {n * BLOCK / rd / 1e9:.2f}, spill "
                f"{sp['spilled'] * BLOCK / sp['seconds'] / 1e9:.2f} ({sp['spilled']} blocks), " + ", ".join(
                    f"{rb['case']} {rb['blocks'] * BLOCK / rb['seconds'] / 1e9:.2f}" for rb in done) + " GB/s")
        nv = tier_stats(client, "nvme")
        assert nv.checksum_failures == 0 and nv.io_errors == 0, nv
        cases = {k: gbs_summary(n * BLOCK, v) for k, v in rows.items()}
        cases["spill"]["ratio"] = cases["spill"]["median_gbs"] / cases["raw write"]["median_gbs"]
        cases["raw read, 1 thread"]["ratio"] = cases["raw read, 1 thread"]["median_gbs"] / cases["raw read"]["median_gbs"]
        cases["raw write"]["cpu_s_per_gb"] = statistics.median(extra["raw_write_cpu_s"])
        cases["raw read"]["cpu_s_per_gb"] = statistics.median(extra["raw_read_cpu_s"])
        cases["raw read"]["disk"] = median_view(extra["raw read disk"])
        cases["spill"]["client_cpu_s_per_gb"] = statistics.median(extra["spill_client_cpu_s"])
        cases["spill"]["daemon_cpu_s_per_gb"] = statistics.median(extra["spill_cpu_s"])
        cases["spill"]["put_phase_s_median"] = statistics.median(extra["spill_put_s"])
        cases["spill"]["stats_polls_median"] = statistics.median(extra["polls"])
        if evict:
            cases[RAW_READ_WRITE]["ratio"] = cases[RAW_READ_WRITE]["median_gbs"] / cases["raw read"]["median_gbs"]
        for k, cond in reads:
            name = readback_case(k, cond)
            cases[name]["baseline"] = RAW_READ_WRITE if cond == READ_WRITTEN else "raw read"
            cases[name]["ratio"] = cases[name]["median_gbs"] / cases[cases[name]["baseline"]]["median_gbs"]
            cases[name]["daemon_cpu_s_per_gb"] = statistics.median(extra[name + " daemon"])
            cases[name]["client_cpu_s_per_gb"] = statistics.median(extra[name + " client"])
            cases[name]["written_per_block"] = statistics.median(extra[name + " written"])
            cases[name]["disk"] = median_view(extra[name + " disk"])
        out["policies"][policy] = {"cases": cases, "readback_blocks_per_round": statistics.median(extra["readback_blocks"]),
                                   "direct_io": nv.direct_io, "noise": noise.done(own)}
        client.close()
        d.stop()
        shutil.rmtree(ddir, ignore_errors=True)
    return out


def disk_lines(cs: dict) -> list[str]:
    """The disk's view of each read case (/proc/diskstats), when the device was known."""
    got = [(k, v["disk"]) for k, v in cs.items() if v.get("disk")]
    if not got:
        return []
    return ["How the disk saw the reads (/proc/diskstats, median over rounds): requests per block, KiB "
            "per request, reads in flight on average, and the share of the time it had any request "
            "(writes included): a case below the raw read's share leaves the disk idle between its reads.", "",
            "| case | requests per block | KiB per request | in flight | busy |", "|---|---:|---:|---:|---:|",
            *[f"| {k} | {d['requests_per_block']:.2f} | {d['kib_per_request']:,.0f} | {d['in_flight']:.1f} | "
              f"{d['busy']:.0%} |" for k, d in got], ""]


# ---- restart -------------------------------------------------------------------------------------

def make_block_files(path: str, n: int, payload_bytes: int = 4 * KiB) -> float:
    """n valid block records (header padded to 4 KiB + payload) written straight into place."""
    from kvtier import record
    from kvtier.cold import file_name
    os.makedirs(path, exist_ok=True)
    for i in range(256):
        os.makedirs(os.path.join(path, f"{i:02x}"), exist_ok=True)
    payload = np.random.default_rng(3).integers(0, 256, payload_bytes, dtype=np.uint8).tobytes()
    digest = record.checksum(payload)
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    for _ in range(n):
        key = os.urandom(16)
        meta = record.with_header_size(record.Meta(NS, key, payload_bytes, payload_bytes, digest, record.CODEC_RAW,
                                                   now), aligned=True)
        sub, name = file_name(NS, key)
        fd = os.open(os.path.join(path, sub, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, record.encode_header(meta, aligned=True) + payload)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def list_names(path: str, threads: int = 1) -> int:
    """Block files found by name alone (no open, no stat): what an index built from names costs."""
    from kvtier.cold import parse_name

    def one(sub: str) -> int:
        with os.scandir(os.path.join(path, sub)) as it:
            return sum(parse_name(e.name) is not None for e in it)
    subs = [s for s in os.listdir(path) if len(s) == 2]
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, subs))


def read_headers(path: str, threads: int) -> int:
    """ColdTier.scan's per-file work (open, fstat, pread 512 bytes, decode) on `threads` threads."""
    from kvtier import record

    def one(sub: str) -> int:
        n = 0
        with os.scandir(os.path.join(path, sub)) as it:
            for e in it:
                fd = os.open(e.path, os.O_RDONLY)
                try:
                    st, head = os.fstat(fd), os.pread(fd, 512, 0)
                finally:
                    os.close(fd)
                n += record.decode_header(head).total_len == st.st_size
        return n
    subs = [s for s in os.listdir(path) if len(s) == 2]
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, subs))


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def part_restart(path: str, tmp: str, sizes: list[int], reps: int, cold_caches: bool, stack: contextlib.ExitStack,
                 device: str, warmup: bool = True) -> dict:
    from kvtier.cold import ColdTier
    out = {"payload_bytes": 4 * KiB, "sizes": {}, "drop_caches": cold_caches, "warmup": warmup}
    dirs = {}
    for n in sizes:
        dirs[n] = os.path.join(path, f"restart-{n}")
        dt = make_block_files(dirs[n], n)
        log(f"D: wrote {n} block files in {dt:.1f} s")
    scan = {n: [] for n in sizes}
    names = {n: [] for n in sizes}
    headers = {n: [] for n in sizes}
    check = {n: [] for n in sizes}
    daemon = {n: [] for n in [0] + sizes}
    noise = Noise(device)
    first = 0 if warmup else 1
    for r in range(first, reps + 1):     # rep 0: warm-up (imports, caches)
        for n in sizes:
            if cold_caches:
                drop_caches()
            t0 = time.perf_counter()
            t = ColdTier([(dirs[n], 64 * GiB)], durability="none", direct_io="auto")
            found = t.scan()
            dt = time.perf_counter() - t0
            if found != n:
                raise RuntimeError(f"scan found {found} of {n} blocks")
            if r:
                scan[n].append(dt)
            if hasattr(t, "verify_pending"):   # the header check that follows the start, in the background
                t0 = time.perf_counter()
                checked, removed = t.verify_pending(8)
                dt = time.perf_counter() - t0
                if (checked, removed) != (n, 0):
                    raise RuntimeError(f"checked {checked} of {n} headers, removed {removed}")
                if r:
                    check[n].append(dt)
            for what, fn in ((names, lambda: list_names(dirs[n])), (headers, lambda: read_headers(dirs[n], 32))):
                if cold_caches:
                    drop_caches()
                t0 = time.perf_counter()
                found = fn()
                dt = time.perf_counter() - t0
                if found != n:
                    raise RuntimeError(f"found {found} of {n} blocks")
                if r:
                    what[n].append(dt)
        for n in [0] + sizes:
            d = Daemon(tmp, dirs.get(n), ram="64MiB")
            stack.callback(d.stop)
            if cold_caches and n:
                drop_caches()
            dt = d.start()
            from kvtier.client import Client
            with Client(d.address, timeout=10) as c:
                blocks = tier_stats(c, "nvme").blocks if n else 0
            d.stop()
            if blocks != n:
                raise RuntimeError(f"daemon indexed {blocks} of {n} blocks")
            if r:
                daemon[n].append(dt)
        if r:
            log(f"  rep {r}/{reps}: scan " + ", ".join(f"{n}: {scan[n][-1]:.2f} s" for n in sizes) + "; daemon "
                + ", ".join(f"{n}: {daemon[n][-1]:.2f} s" for n in [0] + sizes))
    for n in sizes:
        out["sizes"][n] = {"scan": time_summary(scan[n]), "daemon": time_summary(daemon[n]),
                           "names": time_summary(names[n]), "headers32": time_summary(headers[n])}
        if check[n]:
            out["sizes"][n]["check"] = time_summary(check[n])
    out["daemon_without_nvme"] = time_summary(daemon[0])
    out["noise"] = noise.done(0)
    for n in sizes:
        shutil.rmtree(dirs[n], ignore_errors=True)
    return out


# ---- machine --------------------------------------------------------------------------------------

def mount_of(path: str) -> dict:
    best = ("", "", "")
    real = os.path.realpath(path)
    for line in pathlib.Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype)
    out = {"device": best[0], "mount": best[1], "fstype": best[2]}
    name = os.path.basename(best[0])
    q = pathlib.Path(f"/sys/block/{name}/queue")
    if q.exists():
        with contextlib.suppress(OSError):
            out["rotational"] = q.joinpath("rotational").read_text().strip()
            out["scheduler"] = q.joinpath("scheduler").read_text().strip()
            out["max_sectors_kb"] = q.joinpath("max_sectors_kb").read_text().strip()
    return out


def machine(path: str) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = ""
    st = os.statvfs(path)
    return {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": sha,
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "kernel": platform.release(), "dir": path, "free_gib": round(st.f_bavail * st.f_frsize / GiB, 1),
            **mount_of(path)}


def default_base() -> str:
    for d in ("/tmp", "/var/tmp"):
        if mount_of(d)["fstype"] not in ("tmpfs", "ramfs"):
            return d
    return str(REPO)


# ---- report ---------------------------------------------------------------------------------------

def gbs_table(cases: dict, names: list[str], targets: tuple = ()) -> list[str]:
    """Rows of GB/s; a ratio is flagged when its case is one of `targets` and below TARGET_RATIO.
    CPU: this process's seconds per GB (the benchmark's threads, or the client), then the daemon's."""
    daemon = any("daemon_cpu_s_per_gb" in cases[n] for n in names)
    out = ["| case | median GB/s | p90 GB/s | p99 GB/s | slowest GB/s | ratio to raw | CPU s/GB" +
           (" (bench/client + daemon) |" if daemon else " |"),
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        c = cases[name]
        ratio = f"{c['ratio']:.2f}x" if "ratio" in c else "1 (baseline)"
        if name in targets and c["ratio"] < TARGET_RATIO:
            ratio += " (below target)"
        own = c.get("cpu_s_per_gb", c.get("client_cpu_s_per_gb"))
        cpu = "" if own is None else f"{own:.2f}"
        if "daemon_cpu_s_per_gb" in c:
            cpu += f" + {c['daemon_cpu_s_per_gb']:.2f}"
        out.append(f"| {name} | {c['median_gbs']:.2f} | {c['p90_gbs']:.2f} | {c['p99_gbs']:.2f} | "
                   f"{c['worst_gbs']:.2f} | {ratio} | {cpu} |")
    return out


def noise_line(n: dict) -> str:
    flag = " (noisy)" if n["foreign_cpu_share"] > NOISY_CPU else ""
    return (f"While this part ran ({n['wall_s']:.0f} s), other processes took {n['foreign_cpu_share']:.0%} of the "
            f"CPUs{flag}; the disk moved {n['disk_gb']:.1f} GB, of which about {n['own_gb']:.1f} GB were this "
            f"benchmark's (other I/O: ~{n['foreign_disk_gbs']:.2f} GB/s); load average (1 min) at its end "
            f"{n['loadavg_1m']}.")


def markdown(res: dict, command: str) -> str:
    m0, m1 = res["machine_start"], res["machine_end"]
    ab, c, an, rs = res.get("ab"), res.get("c"), res.get("d"), res.get("e")
    lines = ["# NVMe tier benchmark: spill, read-back and restart", "",
             f"Command: `{command}` (from the repository root; `bench/nvme.py` says what each part does).", "",
             f"Run {m0['when']} at {m0['git']} on {m0['cpus']} CPUs, Python {m0['python']}, kernel {m0['kernel']}. "
             f"Directory {m0['dir']} on {m0['device']} ({m0['fstype']}, mounted at {m0['mount']}, "
             f"rotational={m0.get('rotational', '?')}, scheduler {m0.get('scheduler', '?')}), {m0['free_gib']} GiB "
             f"free. Load average (1 min) {m0['load_avg_1m']} at start, {m1['load_avg_1m']} at end.", ""]
    if ab:
        n = ab["blocks_per_round"]
        lines += ["## A/B: raw O_DIRECT vs ColdTier, same threads, same directory", "",
                  f"{ab['cases']['raw write']['rounds']} timed rounds (after 1 warm-up) of {n} blocks of 2 MiB "
                  f"({n * BLOCK // MiB} MiB) per case and direction, {ab['threads']} threads, alternating. "
                  f"O_DIRECT probed: {ab['direct_io']}. CPU s/GB: this process's user + system seconds per GB.", "",
                  *gbs_table(ab["cases"], ["raw write", "kvtier write", "raw read", "kvtier read"],
                             ("kvtier write", "kvtier read")), "",
                  "Paired ratio (median over rounds of raw time / kvtier time in the same round): write "
                  f"{ab['cases']['kvtier write']['paired_ratio_median']:.2f}x, read "
                  f"{ab['cases']['kvtier read']['paired_ratio_median']:.2f}x.", "", noise_line(ab["noise"]), ""]
    huge = res.get("c_huge")
    for c, arena in ((c, ""), (huge, ARENA_HUGE)):
        if not c:
            continue
        if "skipped" in c:
            lines += [f"## C: {arena}: not run", "", f"{c['skipped']}.", ""]
            continue
        for policy, p in c["policies"].items():
            cs = p["cases"]
            pages = "2 MiB" if c.get("huge_pages", c.get("arena_backing") == "hugetlbfs") else "4 KiB"
            lines += [f"## C: daemon end to end, write_policy = \"{policy}\"" + (f", {arena}" if arena else ""), "",
                      *([f"The arena is on {c['arena_how']}.", ""] if c.get("arena_how") else []),
                      f"{cs['spill']['rounds']} timed rounds (after 1 warm-up). Each: a raw round of "
                      f"{c['spill_bytes'] // BLOCK} blocks (A's code), then the daemon (RAM {c['ram']} on "
                      f"{c.get('arena_backing', 'tmpfs')} with {pages} pages, NVMe reads "
                      f"{'through huge-page buffers' if c.get('bounce_reads', True) else 'straight into the arena'}, "
                      f"{c['io_threads']} I/O threads) spills {c['spill_bytes'] // MiB} MiB of fresh keys, then "
                      f"reads back ~{p['readback_blocks_per_round']:.0f} blocks: first as many of those Lookup "
                      "reports only on NVMe as there are of the spill's blocks in RAM, then those (evicted "
                      f"by the first half's promotions), one half from 1 client thread, the other from {THREADS} "
                      f"(which first alternates by round), in get_many batches of {c['batch']}. "
                      "Read-back times are scaled to the same block count; \"raw read, 1 thread\" reads a "
                      "quarter of the raw files from one thread (one request in flight, as one Acquire promotes). CPU s/GB: this "
                      "process's (raw threads, or the client) + the daemon's.", "",
                      *([f"Under \"evict\" the first half promotes into a RAM full of blocks that are only "
                         f"there: every promotion writes its victim to NVMe ({READ_WRITTEN}; compared with "
                         f"\"{RAW_READ_WRITE}\", which reads half the raw files while writing as many new ones, "
                         f"{THREADS} threads, a read and a write each). The second half evicts blocks promoted "
                         f"before, which are on NVMe already ({READ_CLEAN}; compared with raw read).", ""]
                        if RAW_READ_WRITE in cs else []),
                      *gbs_table(cs, [k for k in cs if not k.startswith("read-back")] +
                                 [k for k in cs if k.startswith("read-back")],
                                 tuple(k for k in cs if k == "spill" or k.startswith("read-back"))), "",
                      "Blocks written (victims copied out) per block read back, median: " + ", ".join(
                          f"{k[len('read-back '):]} {v['written_per_block']:.2f}" for k, v in cs.items()
                          if "written_per_block" in v) + ".", "",
                      *disk_lines(cs),
                      f"Spill: the put phase took {cs['spill']['put_phase_s_median']:.2f} s (median) of the "
                      f"round; the producer polled Stats {cs['spill']['stats_polls_median']:.0f} times per round.", "",
                      noise_line(p["noise"]), ""]
    sc = res.get("s")
    if sc:
        cs = sc["cases"]
        raw_ms = cs["raw read"]["median_s"] * 1e3
        lines += ["## S: the scheduler's Acquire of a prefix only on NVMe", "",
                  f"{cs['raw read']['runs']} timed rounds (after 1 warm-up): one Acquire (prefix only) of "
                  f"{sc['blocks']} blocks of 2 MiB ({sc['blocks'] * sc['block_bytes'] // MiB} MiB) that are only on "
                  "NVMe, as an engine's scheduler asks, with `background` and without, alternating; then, for "
                  "`background`, an ordinary Acquire of the same keys (a worker's load) until the bytes are in RAM. "
                  f"Ratio: to a raw O_DIRECT read of as many files ({THREADS} threads) in the same round. Target: "
                  f"the background answer <= {TARGET_SCHED_RATIO}x the raw read.", "",
                  "| case | median ms | p90 ms | max ms | ratio | target |", "|---|---:|---:|---:|---:|---|",
                  f"| raw O_DIRECT read | {raw_ms:.1f} | {cs['raw read']['p90_s'] * 1e3:.1f} | "
                  f"{cs['raw read']['max_s'] * 1e3:.1f} | 1 | |"]
        for k in SCHED_CASES:
            c = cs[k]
            tgt = ""
            if k == "background: answer":
                tgt = f"<= {TARGET_SCHED_RATIO}x: " + ("holds" if c["ratio"] <= TARGET_SCHED_RATIO else "missed")
            lines.append(f"| {k} | {c['median_s'] * 1e3:.1f} | {c['p90_s'] * 1e3:.1f} | {c['max_s'] * 1e3:.1f} | "
                         f"{c['ratio']:.3f} | {tgt} |")
        lines += ["", noise_line(sc["noise"]), ""]
    if an:
        n = an["blocks_per_round"]
        lines += ["## D: where ColdTier.read's time goes; the demotion copy", "",
                  f"{an['cases']['ColdTier.read']['rounds']} timed rounds of {n} blocks of 2 MiB written by ColdTier, "
                  f"read back {THREADS} threads at a time in each way below (alternating). Ratio: to \"payload only\". "
                  "CPU s/GB: this process's.", "",
                  *gbs_table(an["cases"], list(an["cases"])), "",
                  "Copying one 2 MiB block (median / slowest of the samples):", "",
                  "| into | median ms | max ms | median GB/s |", "|---|---:|---:|---:|",
                  *[f"| {k} | {v['median_ms']:.2f} | {v['max_ms']:.2f} | {v['median_gbs']:.2f} |"
                    for k, v in an["copy"].items()], ""]
        if "qd1" in an:
            sizes = list(an["qd1"])
            lines += ["One read at a time (a single-block get), ms per read, median (p90):", "",
                      "| read | " + " | ".join(f"{int(z) // KiB} KiB" for z in sizes) + " |",
                      "|---|" + "---:|" * len(sizes)]
            for k in an["qd1"][sizes[0]]:
                lines.append(f"| {k} | " + " | ".join(f"{an['qd1'][z][k]['median_ms']:.3f} "
                                                      f"({an['qd1'][z][k]['p90_ms']:.3f})" for z in sizes) + " |")
            lines.append("")
        lines += [noise_line(an["noise"]), ""]
    if rs:
        sizes = sorted(rs["sizes"], key=int)
        lines += ["## E: restart with block files on disk", "",
                  f"Block files of {rs['payload_bytes'] // KiB} KiB payload (8 KiB on disk with the header), "
                  f"{rs['daemon_without_nvme']['runs']} timed starts each"
                  f"{' (after 1 warm-up)' if rs.get('warmup', True) else ' (no warm-up)'}. Caches dropped "
                  f"before each start: {'yes' if rs['drop_caches'] else 'no (warm dentry, inode and page caches)'}.", "",
                  "| blocks on disk | what | median s | p90 s | p99 s | max s | target |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        z = rs["daemon_without_nvme"]
        lines.append(f"| 0 | daemon, no NVMe dir: spawn to first Stats | {z['median_s']:.2f} | {z['p90_s']:.2f} | "
                     f"{z['p99_s']:.2f} | {z['max_s']:.2f} | |")
        for n in sizes:
            for what, key in (("file names only (scandir, 1 thread)", "names"),
                              ("headers on 32 threads (open, fstat, read 512 bytes)", "headers32"),
                              ("ColdTier() + scan()", "scan"),
                              ("header check after the start (ColdTier.verify_pending, 8 threads)", "check"),
                              ("daemon: spawn to first Stats", "daemon")):
                if key not in rs["sizes"][n]:
                    continue
                t = rs["sizes"][n][key]
                tgt = ""
                if key == "daemon" and int(n) >= 100_000:
                    tgt = "<= 5 s: " + ("holds" if t["max_s"] <= TARGET_RESTART_S else
                                        "median holds" if t["median_s"] <= TARGET_RESTART_S else "missed")
                lines.append(f"| {int(n):,} | {what} | {t['median_s']:.2f} | {t['p90_s']:.2f} | {t['p99_s']:.2f} | "
                             f"{t['max_s']:.2f} | {tgt} |")
        lines += ["", noise_line(rs["noise"]), ""]
    return "\n".join(lines)


# ---- S: the scheduler's Acquire of a prefix on NVMe ----------------------------------------------

SCHED_BLOCKS = 64
TARGET_SCHED_RATIO = 0.1
SCHED_CASES = ("background: answer", "background: bytes in RAM", "waiting: answer")


def part_sched(path: str, tmp: str, rounds: int, src: Sources, pool: ThreadPoolExecutor,
               stack: contextlib.ExitStack, device: str, arena_root: str | None = None,
               ram: str = PART_C_RAM, n: int = SCHED_BLOCKS) -> dict:
    from kvtier.client import Client
    ddir = os.path.join(path, "daemon-sched")
    d = Daemon(tmp, ddir, ram=ram, write_policy="commit", arena_root=arena_root)
    raw = Raw(ddir, src, pool)
    stack.callback(d.stop)
    d.start()
    client = stack.enter_context(Client(d.address, timeout=120))
    ram_cap = tier_stats(client, "ram").capacity_bytes
    queue_limit = min(GiB, ram_cap // 2)
    spill = 2 * ram_cap // BLOCK + 2 * n   # twice RAM: the first keys are only on NVMe after it
    log(f"S: daemon pid {d.p.pid}, Acquire of {n} x 2 MiB only on NVMe, {rounds} rounds")
    rows: dict[str, list[float]] = {"raw read": [], **{k: [] for k in SCHED_CASES}}
    noise = Noise(device, [d])
    own = 0
    for r in range(rounds + 1):
        raw.write(n)
        rd = raw.read(n)
        raw.clear()
        sp = spill_round(client, d, spill, src, "commit", queue_limit)
        tiers, _ = client.lookup(NS, sp["keys"])
        cold = [k for k, t in zip(sp["keys"], tiers) if t == 2]
        if len(cold) < 2 * n:
            raise RuntimeError(f"S: {len(cold)} blocks only on NVMe after the spill, {2 * n} needed")
        got = {}
        for mode in (("background", "waiting") if r % 2 else ("waiting", "background")):
            keys = cold[:n] if mode == "background" else cold[n:2 * n]
            t0 = time.perf_counter()
            lease = client.acquire(NS, keys, prefix_only=True, background=mode == "background")
            t1 = time.perf_counter()
            held = [lease]
            try:
                if list(lease.tiers) != [2] * n:
                    raise RuntimeError(f"S ({mode}): tiers {sorted(set(lease.tiers))}, expected NVMe for all")
                if mode == "background":
                    held.append(client.acquire(NS, keys))
                    t2 = time.perf_counter()
                    if 0 in held[1].tiers:
                        raise RuntimeError("S: a block answered as on NVMe did not land")
                    got["background: answer"], got["background: bytes in RAM"] = t1 - t0, t2 - t0
                else:
                    got["waiting: answer"] = t1 - t0
            finally:
                for lease in held:
                    client.release(lease)
        client.delete(NS, sp["keys"] + sp["fillers"])
        own += (2 * n + sp["spilled"] + 2 * n) * BLOCK
        if not r:
            continue   # warm-up
        rows["raw read"].append(rd)
        for k in SCHED_CASES:
            rows[k].append(got[k])
        log(f"  round {r}/{rounds}: raw read {rd * 1e3:.1f} ms, " +
            ", ".join(f"{k} {got[k] * 1e3:.1f} ms" for k in SCHED_CASES))
    cases = {k: time_summary(v) for k, v in rows.items()}
    for k in SCHED_CASES:
        cases[k]["ratio"] = cases[k]["median_s"] / cases["raw read"]["median_s"]
    client.close()
    d.stop()
    shutil.rmtree(ddir, ignore_errors=True)
    return {"blocks": n, "block_bytes": BLOCK, "cases": cases, "noise": noise.done(own)}


# ---- main ---------------------------------------------------------------------------------------

def run(args) -> dict:
    base = args.dir or default_base()
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="kvtier-bench-nvme-", dir=base)
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-run-")
    res = {"machine_start": machine(path)}
    log(f"directory {path} on {res['machine_start']['device']} ({res['machine_start']['fstype']})")
    if res["machine_start"]["fstype"] in ("tmpfs", "ramfs"):
        log("warning: this directory is in RAM; the numbers say nothing about a disk")
    quick = args.quick
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        stack.callback(shutil.rmtree, path, True)
        pool = stack.enter_context(ThreadPoolExecutor(THREADS, thread_name_prefix="bench-io"))
        src = Sources()
        parts = args.parts
        dev = res["machine_start"]["device"]
        res["settle_waited_s"] = 0.0
        if "ab" in parts:
            res["settle_waited_s"] += settle(args.settle, dev) if args.settle else 0.0
            res["ab"] = part_ab(path, 5 if quick else 15, 64 if quick else 256, src, pool, dev)
        if "c" in parts:
            policies = args.policies or (["commit"] if quick else ["commit", "evict"])
            rounds, spill = (2, 512 * MiB) if quick else (5, 2 * GiB)
            res["c"] = part_c(path, tmp, rounds, spill, policies, src, pool, stack, dev, args.settle, args.arena_dir)
            if args.huge_arena and not res["c"]["huge_pages"]:
                from kvtier.config import parse_size
                # the same reads where the arena is on 2 MiB pages: they land in place, no bounce copy
                where, how = huge_tmpfs(tmp, parse_size(PART_C_RAM, "ram") + 64 * MiB, stack)
                log(f"C on 2 MiB arena pages: {how}")
                res["c_huge"] = {"skipped": how} if where is None else {
                    **part_c(path, tmp, rounds, spill, ["commit"], src, pool, stack, dev, args.settle, where),
                    "arena_how": how}
        if "s" in parts:
            res["s"] = part_sched(path, tmp, 3 if quick else 7, src, pool, stack, dev, args.arena_dir)
        if "d" in parts:
            res["d"] = part_anatomy(path, 3 if quick else 9, 64 if quick else 256, src, pool, dev)
        if "e" in parts:
            res["settle_waited_s"] += settle(args.settle, dev) if args.settle else 0.0
            res["e"] = part_restart(path, tmp, [10_000, 100_000], 2 if quick else 5, args.drop_caches, stack, dev,
                                    warmup=not quick)
    res["machine_end"] = machine(base)
    res["machine_end"]["dir"] = path
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller rounds, one write policy")
    ap.add_argument("--dir", help="put the test directory under this one (default /tmp, or /var/tmp if /tmp is tmpfs)")
    ap.add_argument("--parts", default="ab,c,s,d,e", help="comma-separated subset of ab, c, s, d, e (default all)")
    ap.add_argument("--policies", help="part C's write policies, comma-separated (default: commit with --quick, "
                    "else commit,evict)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="before each part wait up to this many seconds for a quiet machine and disk")
    ap.add_argument("--drop-caches", action="store_true", help="root: drop the kernel's caches before each restart")
    ap.add_argument("--arena-dir", help="part C: put the daemons' arenas under this directory (default /dev/shm); "
                    "a hugetlbfs mount with 130 free huge pages benches a node set up like configs/h200-node.toml")
    ap.add_argument("--no-huge-arena", dest="huge_arena", action="store_false",
                    help="part C: skip its second run (write_policy commit) with the arena on a tmpfs with 2 MiB "
                    "pages, which it otherwise does where the first arena has 4 KiB pages and such a tmpfs is "
                    "mounted, or it can mount one (root)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the report here")
    ap.add_argument("--from-json", help="only render the report of a run saved with --json")
    args = ap.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.policies = [p.strip() for p in (args.policies or "").split(",") if p.strip()]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop daemons, remove files
    if args.from_json:
        saved = json.loads(pathlib.Path(args.from_json).read_text())
        res, command = saved["result"], saved["command"]
    else:
        res = run(args)
        command = "python -m bench.nvme" + (" --quick" if args.quick else "") + \
            (f" --dir {args.dir}" if args.dir else "") + (" --drop-caches" if args.drop_caches else "") + \
            (f" --settle {args.settle:g}" if args.settle else "") + \
            (f" --arena-dir {args.arena_dir}" if args.arena_dir else "") + \
            ("" if args.huge_arena else " --no-huge-arena") + \
            (f" --parts {','.join(args.parts)}" if args.parts != ["ab", "c", "s", "d", "e"] else "") + \
            (f" --policies {','.join(args.policies)}" if args.policies else "")
    emit(markdown(res, command), {"command": command, "result": res}, args)


if __name__ == "__main__":
    main()
