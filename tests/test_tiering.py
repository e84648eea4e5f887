"""RAM and NVMe together, through real daemons (``make_daemon``) and the real client.

Each daemon has a small arena (8 MiB unless the test needs room) and its NVMe directories
under tmp_path. Blocks move down by write-behind at commit or by demotion at eviction, and
back up on Acquire or get; a restart rebuilds the NVMe index from the files. Damage is done
to the files on disk while the daemon is stopped. The daemon runs in this process, so a test
can slow the NVMe writes down (monkeypatch) to hold them in flight.
"""
from __future__ import annotations

import ctypes
import glob
import os
import random
import subprocess
import threading
import time

import pytest
import xxhash

from kvtier import cold as C
from kvtier.client import Client
from kvtier.server import DaemonThread

KiB, MiB = 1024, 1024 * 1024
NS = "tier-test"
BLOCK = 512 * KiB


def key(i: int) -> bytes:
    return random.Random(f"key-{i}").randbytes(16)


def blob(n: int, seed) -> bytes:
    return random.Random(repr(seed)).randbytes(n)


def nvme(c: Client):
    (t,) = [t for t in c.stats().tiers if t.name == "nvme"]
    return t


def ram(c: Client):
    (t,) = [t for t in c.stats().tiers if t.name == "ram"]
    return t


def wait_for(cond, timeout: float = 10.0, what: str = "condition", show=None):
    """Poll cond() until true; on timeout fail, with show() (the state waited on) if given."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; now {show()}" if show else ""))
        time.sleep(0.02)


def files(d) -> list[str]:
    return sorted(glob.glob(os.path.join(str(d), "??", "*" + C.SUFFIX)))


def temp_files(d) -> list[str]:
    out = []
    for root, _, names in os.walk(str(d)):
        out += [os.path.join(root, n) for n in names if n.endswith(".tmp")]
    return out


def file_of(d, k: bytes, ns: str = NS) -> str:
    sub, name = C.file_name(ns, k)
    return os.path.join(str(d), sub, name)


def settings(tmp_path, ram_cap: str = "8MiB", dirs=None, persist: bool = True, arena_path: str = "",
             **nvme_kw) -> dict:
    """``persist=False``: the RAM tier is not kept across a restart, so only NVMe can serve after it."""
    nv = {"dirs": [str(p) for p in (dirs or [tmp_path / "nvme0"])], "capacity": "64MiB", "io_threads": 2,
          "write_policy": "commit"}
    nv.update(nvme_kw)
    r = {"capacity": ram_cap, "policy": "lru", "persist": persist}
    if arena_path:
        r["arena_path"] = arena_path
    return {"ram": r, "nvme": nv}


@pytest.fixture
def restart():
    """restart(d): stop daemon d and start a new one with the same configuration."""
    started: list[DaemonThread] = []

    def do(d: DaemonThread) -> DaemonThread:
        d.stop()
        nd = DaemonThread(d.cfg).start()
        started.append(nd)
        return nd

    yield do
    for d in started:
        d.stop()


def mounted_tmpfs(mnt, options: str, what: str):
    """A tmpfs mounted at mnt with these options while the generator runs; skips the test where
    mounting is not permitted."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {what} (needs root or CAP_SYS_ADMIN): {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs under tmp_path, to run out of space for real."""
    yield from mounted_tmpfs(tmp_path / "small", "size=3m", "a small tmpfs to run out of space for real")


@pytest.fixture
def huge_tmpfs(tmp_path):
    """A tmpfs under tmp_path whose files get 2 MiB pages (huge=within_size)."""
    yield from mounted_tmpfs(tmp_path / "huge", "size=96m,huge=within_size", "a tmpfs with huge pages")


def fill_until_evicted(c: Client, target: bytes, start: int = 1000, limit: int = 64) -> int:
    """Put filler blocks until target has left RAM for NVMe (tier 2); returns the fillers used.
    Each put waits for the write queue to drain first: the daemon drops a demotion that finds the
    queue full (it never blocks a put), and a dropped target would never reach NVMe."""
    for i in range(limit):
        wait_for(lambda: nvme(c).queued_bytes == 0, what="the write queue to drain")
        c.put(NS, key(start + i), blob(BLOCK, start + i))
        if c.lookup(NS, [target])[0] == [2]:
            return i + 1
    wait_for(lambda: c.lookup(NS, [target])[0] == [2], what="demotion of the target")
    return limit


# ---- movement down ---------------------------------------------------------------------------

def test_demotion_on_eviction(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    n = 24  # 12 MiB into an 8 MiB arena
    with Client(d.address) as c:
        for i in range(n):  # paced as fill_until_evicted: a demotion finding the queue full is dropped
            wait_for(lambda: nvme(c).queued_bytes == 0, what="the write queue to drain")
            assert c.put(NS, key(i), blob(BLOCK, i))
        assert c.path == "arena"
        ev = ram(c).evictions
        assert ev >= n - 16
        wait_for(lambda: nvme(c).blocks == ev and nvme(c).queued_bytes == 0, what=f"{ev} demotions written",
                 show=lambda: nvme(c))
        t = nvme(c)
        assert t.demotions == ev and t.dropped_writes == 0 and t.io_errors == 0
        assert len(files(tmp_path / "nvme0")) == ev
        tiers, prefix = c.lookup(NS, [key(i) for i in range(n)])
        assert tiers == [2] * ev + [1] * (n - ev)  # LRU: the oldest went down first
        assert prefix == n
        for i in range(ev):  # only evicted blocks are on NVMe under write_policy "evict"
            assert os.path.exists(file_of(tmp_path / "nvme0", key(i)))
        for i in range(ev, n):
            assert not os.path.exists(file_of(tmp_path / "nvme0", key(i)))
        for i in range(n):  # one at a time: a batch larger than the arena cannot be leased at once
            assert c.get(NS, key(i)) == blob(BLOCK, i)
        assert nvme(c).checksum_failures == 0 and c.checksum_failures == 0
        store = d.daemon.store  # the demotion copies went through reused buffers, within the queue's bound
        assert 0 < store._mapped <= store.queue_limit < store.demotions * BLOCK


def test_a_demotion_that_cannot_be_copied_leaves_no_write_pending(make_daemon, tmp_path, monkeypatch):
    """No memory for a demotion's copy: the block is evicted without it, and nothing still counts
    it as on its way to NVMe (else Lookup would report it there and every get wait for it)."""
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    store = d.daemon.store
    buffer = store._buffer
    failed = []

    def no_memory(size):
        if not failed:
            failed.append(size)
            raise MemoryError("no buffer for the copy")
        return buffer(size)
    monkeypatch.setattr(store, "_buffer", no_memory)
    with Client(d.address) as c:
        for i in range(24):  # 12 MiB into an 8 MiB arena
            wait_for(lambda: nvme(c).queued_bytes == 0, what="the write queue to drain")
            assert c.put(NS, key(i), blob(BLOCK, i))
        wait_for(lambda: nvme(c).queued_bytes == 0, what="the write queue to drain")
        ev = ram(c).evictions
        assert failed and d.daemon.hot.evict_hook_errors == 1
        tiers, _ = c.lookup(NS, [key(i) for i in range(24)])
        assert tiers[0] == 0 and tiers[1:ev] == [2] * (ev - 1)   # the first victim is gone, the rest went down
        assert not store._queued and not store._landing and store.queued_bytes == 0
        t0 = time.monotonic()
        assert c.get(NS, key(0)) is None and time.monotonic() - t0 < 1.0   # a plain miss, no wait for a landing
        assert all(c.get(NS, key(i)) == blob(BLOCK, i) for i in range(1, 24))


def test_demotion_copies_of_2_mib_blocks_use_huge_page_buffers(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    blocks = [(key(500 + i), blob(2 * BLOCK * 2, ("huge", i))) for i in range(6)]  # 12 MiB into 8
    with Client(d.address) as c:
        for k, v in blocks:  # one at a time: the write queue (half the arena) holds only two
            assert c.put(NS, k, v)
            wait_for(lambda: nvme(c).queued_bytes == 0, what="demotions written")
        assert nvme(c).demotions >= 2 and nvme(c).dropped_writes == 0
        store = d.daemon.store
        bufs = [b for p in store._pool.values() for b in p]
        assert bufs and all(isinstance(b, memoryview) and len(b) == 2 * BLOCK * 2 for b in bufs)
        for b in bufs:  # 2 MiB-aligned, so the kernel can back each with one huge page
            addr = ctypes.c_char.from_buffer(b)
            assert ctypes.addressof(addr) % C.HUGE == 0
            del addr
        for k, v in blocks:  # each read-back evicts a block not yet on NVMe: let its write finish
            wait_for(lambda: nvme(c).queued_bytes == 0, what="demotions written")
            assert c.get(NS, k) == v
        assert nvme(c).checksum_failures == 0 and nvme(c).io_errors == 0 and nvme(c).dropped_writes == 0


def test_write_behind_at_commit(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, ram_cap="32MiB", write_policy="commit"))
    sizes = [1, 4095, 4096, 4097, BLOCK, 3 * MiB + 5]
    with Client(d.address) as c:
        c.put_many(NS, [(key(i), blob(n, i)) for i, n in enumerate(sizes)])
        wait_for(lambda: nvme(c).blocks == len(sizes), timeout=10, what="write-behind")
        assert ram(c).evictions == 0
        assert len(files(tmp_path / "nvme0")) == len(sizes)
        t = nvme(c)
        assert t.demotions == 0 and t.queued_bytes == 0 and t.dropped_writes == 0
        assert t.used_bytes == sum(os.path.getsize(p) for p in files(tmp_path / "nvme0"))
        assert c.lookup(NS, [key(i) for i in range(len(sizes))])[0] == [1] * len(sizes)  # RAM answers first
        assert c.get_many(NS, [key(i) for i in range(len(sizes))]) == [blob(n, i) for i, n in enumerate(sizes)]


def test_write_behind_holds_blocks_in_ram_until_written(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, write_policy="commit", queue_bytes="2MiB"))
    gate = threading.Event()
    real = C.ColdTier._write_file

    def slow(self, *a, **kw):
        gate.wait(10)
        return real(self, *a, **kw)

    monkeypatch.setattr(C.ColdTier, "_write_file", slow)
    held = [key(i) for i in range(4)]
    try:
        with Client(d.address) as c:
            for i, k in enumerate(held):  # 2 MiB: exactly the queue
                assert c.put(NS, k, blob(BLOCK, i))
            assert ram(c).leased_blocks == 4
            for i in range(100, 120):  # 10 MiB more through an 8 MiB arena: the queue is full, so dropped
                assert c.put(NS, key(i), blob(BLOCK, i))
            assert ram(c).evictions >= 8
            assert nvme(c).dropped_writes == 20 + ram(c).evictions
            # the oldest blocks, but held for their writes: never evicted
            assert c.lookup(NS, held)[0] == [1, 1, 1, 1]
            gate.set()
            wait_for(lambda: nvme(c).queued_bytes == 0 and ram(c).leased_blocks == 0, what="queue drained")
            assert nvme(c).blocks == 4
            assert sorted(files(tmp_path / "nvme0")) == sorted(file_of(tmp_path / "nvme0", k) for k in held)
            assert c.get_many(NS, held) == [blob(BLOCK, i) for i in range(4)]
    finally:
        gate.set()


# ---- movement up ------------------------------------------------------------------------------

def test_acquire_promotes_from_nvme(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    target = key(0)
    data = blob(BLOCK + 123, "target")
    with Client(d.address) as c:
        assert c.put(NS, target, data)
        used = fill_until_evicted(c, target)
        hot = key(1000 + used - 1)  # the latest filler, still in RAM
        wait_for(lambda: nvme(c).blocks >= 1 and nvme(c).queued_bytes == 0, what="demotion written")
        assert c.lookup(NS, [hot, target, key(99_999)])[0] == [1, 2, 0]
        lease = c.acquire(NS, [hot, target, key(99_999)])
        try:
            assert list(lease.tiers) == [1, 2, 0]
            assert lease.lengths[1] == len(data)
            assert bytes(lease.views[1]) == data
            assert lease.checksums[1] == xxhash.xxh3_128_digest(data)
            assert lease.views[2] is None
        finally:
            c.release(lease)
        assert c.lookup(NS, [target])[0] == [1]
        t = nvme(c)
        assert t.promotions == 1 and t.hits == 1 and t.checksum_failures == 0
        assert c.get(NS, target) == data


def only_on_nvme(make_daemon, restart, tmp_path, blocks: dict, **nvme_kw):
    """A daemon whose RAM is empty and whose NVMe holds blocks (written behind, then a restart)."""
    d = make_daemon(**settings(tmp_path, ram_cap="32MiB", persist=False, **nvme_kw))
    with Client(d.address) as c:
        c.put_many(NS, list(blocks.items()))
        wait_for(lambda: nvme(c).blocks == len(blocks), what="write-behind")
    d2 = restart(d)
    d2.daemon.store.cold.verify_pending()  # the background check, done now: the tests count reads
    return d2


def read_back(d: DaemonThread, blocks: dict, monkeypatch) -> list[bool]:
    """get_many of blocks only on NVMe: each comes back whole, and is in RAM after. Returns, per
    file read, whether the read went straight into the arena."""
    arena = d.daemon.store.view.obj
    into_arena = []
    preadv = C._preadv_full

    def spy(fd, bufs, offset):
        into_arena.append(any(getattr(b, "obj", None) is arena for b in bufs))
        return preadv(fd, bufs, offset)
    monkeypatch.setattr(C, "_preadv_full", spy)
    keys = list(blocks)
    with Client(d.address) as c:
        assert c.get_many(NS, keys) == list(blocks.values())
        assert c.lookup(NS, keys)[0] == [1] * len(keys)
        assert nvme(c).checksum_failures == 0
        assert (ram(c).huge_pages, nvme(c).bounce_reads) == (d.daemon.arena.huge_pages, d.daemon.store.cold.bounce_reads)
    assert len(into_arena) == len(keys)
    return into_arena


@pytest.mark.parametrize("bounce", ["auto", "on", "off"])
def test_promotions_read_through_a_huge_page_buffer_unless_told_not_to(make_daemon, restart, tmp_path, monkeypatch,
                                                                        bounce):
    blocks = {key(i): blob(BLOCK + 4096 * i + i, ("bounce", i)) for i in range(6)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks, bounce_reads=bounce)
    cold = d.daemon.store.cold
    # "auto": on where the arena is on 4 KiB pages (/dev/shm, unless mounted with huge pages)
    assert cold.bounce_reads == (bounce == "on" or (bounce == "auto" and not d.daemon.arena.huge_pages))
    into_arena = read_back(d, blocks, monkeypatch)
    if cold.dirs[0].direct:  # buffered reads always copy through the page cache
        assert not any(into_arena) if cold.bounce_reads else all(into_arena)


@pytest.mark.parametrize("mlock", [True, False])
def test_promotions_land_in_place_in_an_arena_on_2_mib_tmpfs_pages(make_daemon, restart, tmp_path, monkeypatch,
                                                                     huge_tmpfs, mlock):
    blocks = {key(i): blob(2 * MiB - 4096 * i, ("huge", i)) for i in range(6)}
    cfg = settings(tmp_path, ram_cap="32MiB", persist=False, arena_path=str(huge_tmpfs / "arena"))
    cfg["ram"]["mlock"] = mlock
    d = make_daemon(**cfg)
    with Client(d.address) as c:
        c.put_many(NS, list(blocks.items()))
        wait_for(lambda: nvme(c).blocks == len(blocks), what="write-behind")
    d = restart(d)
    arena = d.daemon.arena
    if mlock and not arena.locked:
        pytest.skip(f"the arena could not be locked: {arena.lock_detail}")
    # locked, every page is there and the kernel says which size it gave; unlocked, not yet known
    assert arena.backing == "tmpfs" and arena.huge_pages is mlock
    assert d.daemon.store.cold.bounce_reads is not mlock
    into_arena = read_back(d, blocks, monkeypatch)
    if d.daemon.store.cold.dirs[0].direct:
        assert all(into_arena) if mlock else not any(into_arena)


def ns_stats(c: Client):
    (n,) = [n for n in c.stats(NS).namespaces if n.name == NS]
    return n


def test_acquire_promotes_a_batch_concurrently_and_answers_in_key_order(make_daemon, restart, tmp_path,
                                                                         monkeypatch):
    blocks = {key(i): blob(BLOCK - 4096 * (i % 3) + i, i) for i in range(12)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks, io_threads=3)
    real = C._preadv_full
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "calls": 0}

    def slow(fd, bufs, offset):
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)  # a slow drive: reads overlap only if they are issued together
        try:
            return real(fd, bufs, offset)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(C, "_preadv_full", slow)
    ks = list(blocks)
    with Client(d.address) as c:
        t0 = time.monotonic()
        lease = c.acquire(NS, ks)
        took = time.monotonic() - t0
        try:
            assert list(lease.tiers) == [2] * len(ks)
            for i, k in enumerate(ks):
                assert bytes(lease.views[i]) == blocks[k]
                assert lease.checksums[i] == xxhash.xxh3_128_digest(blocks[k])
        finally:
            c.release(lease)
        assert state["calls"] == len(ks)  # one read per block: header and payload together
        assert state["most"] == 4  # the Acquire's own thread and the 3 NVMe read threads
        assert took < len(ks) * 0.05
        assert c.lookup(NS, ks)[0] == [1] * len(ks)
        t = nvme(c)
        assert t.promotions == len(ks) and t.hits == len(ks) and t.checksum_failures == 0
        assert ram(c).leased_blocks == 0
        n = ns_stats(c)
        assert (n.hits, n.misses) == (len(ks), 0)
        assert (ram(c).hits, ram(c).misses) == (0, len(ks))  # each read missed RAM, hit NVMe


@pytest.mark.parametrize("client_kw", [{}, {"attach": False}], ids=["arena", "data"])
def test_two_gets_of_a_block_being_promoted_both_get_it(make_daemon, restart, tmp_path, monkeypatch, client_kw):
    """Two requests sharing a prefix reach the same blocks on NVMe at once: the second waits for
    the first one's read instead of answering a miss (which, prefix_only, cuts its prefix there)."""
    blocks = {key(i): blob(BLOCK + i, ("shared", i)) for i in range(3)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    cold = d.daemon.store.cold
    first, reserved, go = key(1), threading.Event(), threading.Event()
    real = cold.read

    reads_of_first = []

    def slow_read(ns, k, dest):
        reads_of_first.extend([k] if k == first else [])
        if k != first or reserved.is_set():
            return real(ns, k, dest)

        def held(n):  # the slot is reserved; the read waits until the second get has asked
            v = dest(n)
            reserved.set()
            go.wait(10)
            return v
        return real(ns, k, held)
    monkeypatch.setattr(cold, "read", slow_read)
    keys = list(blocks)
    got = {}

    def get(name):
        with Client(d.address, **client_kw) as c:
            got[name] = c.get_many(NS, keys)
    a = threading.Thread(target=get, args=("a",))
    a.start()
    assert reserved.wait(10)
    b = threading.Thread(target=get, args=("b",))
    b.start()
    wait_for(lambda: len(reads_of_first) == 2, what="the second get to reach the block being read")
    time.sleep(0.2)  # it found the slot reserved
    go.set()
    a.join(20)
    b.join(20)
    assert got["a"] == got["b"] == list(blocks.values())
    assert cold.stats.hits == len(blocks)   # each block read from NVMe once


def on_nvme_reads_held(make_daemon, restart, tmp_path, monkeypatch, tag: str, n: int = 3):
    """only_on_nvme() of n fresh blocks, with every NVMe read held until the returned event is
    set; (daemon, event, blocks)."""
    blocks = {key(i): blob(BLOCK, (tag, i)) for i in range(n)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    cold = d.daemon.store.cold
    real, go = cold.read, threading.Event()
    monkeypatch.setattr(cold, "read", lambda ns, k, dest: (go.wait(10), real(ns, k, dest))[1])
    return d, go, blocks


@pytest.mark.parametrize("client_kw", [{}, {"control": "grpc"}], ids=["data-call", "grpc"])
def test_a_background_acquire_answers_before_its_nvme_reads_and_leases_what_lands(
        make_daemon, restart, tmp_path, monkeypatch, client_kw):
    """What an engine's scheduler asks: the hit at once, not the bytes. Blocks on NVMe are
    reported as such with no view, read after the answer into RAM and into the same lease; an
    ordinary Acquire of them waits for those reads and gets the bytes."""
    blocks = {key(i): blob(BLOCK + i, ("bg", i)) for i in range(3)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks, io_threads=2)
    cold = d.daemon.store.cold
    real, go, lock = cold.read, threading.Event(), threading.Lock()
    reserved: dict[bytes, int] = {}

    def slow_read(ns, k, dest):
        def held(n):  # the first read of each block reserves its slot, then waits for the test
            v = dest(n)
            with lock:
                first = k not in reserved
                reserved[k] = reserved.get(k, 0) + 1
            if first:
                go.wait(10)
            return v
        return real(ns, k, held)
    monkeypatch.setattr(cold, "read", slow_read)
    ks = list(blocks)
    missing = key(99)
    with Client(d.address, **client_kw) as c:
        t0 = time.monotonic()
        bg = c.acquire(NS, ks + [missing], prefix_only=True, background=True)
        assert time.monotonic() - t0 < 2  # the reads wait for go: the answer did not
        assert list(bg.tiers) == [2] * len(ks) + [0]
        assert bg.views == [None] * (len(ks) + 1) and bg.id  # a lease opened empty, joined later
        assert ram(c).leased_blocks == 0
        wait_for(lambda: len(reserved) == len(ks), what="the background reads to reserve their slots")
        got = {}
        reader = threading.Thread(target=lambda: got.update(lease=c.acquire(NS, ks)))
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive()  # an ordinary Acquire finds the slots reserved: it waits, no miss
        go.set()
        reader.join(20)
        lease = got["lease"]
        try:
            assert list(lease.tiers) == [2] * len(ks)
            assert [bytes(v) for v in lease.views] == list(blocks.values())
        finally:
            c.release(lease)
        # every block read once, and held by the background lease until it is released
        wait_for(lambda: ram(c).leased_blocks == len(ks), what="the landed blocks to join the lease",
                 show=lambda: ram(c).leased_blocks)
        assert cold.stats.hits == len(ks)
        assert nvme(c).hits == len(ks)  # one hit per block read, not one more for the Acquire that waited
        c.release(bg)
        assert ram(c).leased_blocks == 0
        assert c.lookup(NS, ks)[0] == [1] * len(ks)


def test_a_promotion_that_finds_the_slot_just_reserved_by_another_waits_for_it(make_daemon, restart, tmp_path,
                                                                                 monkeypatch):
    """A promotion reserves its slot, then says it is reading: one that comes in between finds
    the slot taken and nobody reading yet. It must wait for the bytes, not answer a miss."""
    blocks = {key(1): blob(BLOCK, "window")}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    store = d.daemon.store
    real, between, go = store.hot.reserve, threading.Event(), threading.Event()

    def reserve(*a, **kw):
        r = real(*a, **kw)
        if r.reservation_id and not between.is_set():  # the first promotion, before it says it reads
            between.set()
            go.wait(10)
        return r
    monkeypatch.setattr(store.hot, "reserve", reserve)
    out = {}
    first = threading.Thread(target=lambda: out.update(first=store.promote(NS, key(1))))
    first.start()
    assert between.wait(10)
    second = threading.Thread(target=lambda: out.update(second=store.promote(NS, key(1))))
    second.start()
    time.sleep(0.2)
    assert second.is_alive()  # waiting, not a miss
    go.set()
    first.join(10)
    second.join(10)
    assert out == {"first": True, "second": True}


def test_a_daemon_stops_while_background_reads_are_under_way(make_daemon, restart, tmp_path, monkeypatch):
    d, go, blocks = on_nvme_reads_held(make_daemon, restart, tmp_path, monkeypatch, "stop")
    with Client(d.address) as c:
        bg = c.acquire(NS, list(blocks), background=True)
        assert list(bg.tiers) == [2, 2, 2]
    threading.Timer(0.5, go.set).start()
    t0 = time.monotonic()
    d.stop()
    assert not d._thread.is_alive() and time.monotonic() - t0 < 10


def test_a_background_acquire_released_before_its_blocks_land(make_daemon, restart, tmp_path, monkeypatch):
    d, go, blocks = on_nvme_reads_held(make_daemon, restart, tmp_path, monkeypatch, "early")
    with Client(d.address) as c:
        bg = c.acquire(NS, list(blocks), background=True)
        assert list(bg.tiers) == [2, 2, 2]
        c.release(bg)  # the request went away while its blocks were read
        go.set()
        wait_for(lambda: c.lookup(NS, list(blocks))[0] == [1, 1, 1], what="the reads to land")
        assert ram(c).leased_blocks == 0  # landed, in no lease
        assert c.get_many(NS, list(blocks)) == list(blocks.values())


def test_a_background_acquire_of_blocks_in_ram_is_an_ordinary_one(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path))
    with Client(d.address) as c:
        c.put_many(NS, [(key(i), blob(4096, i)) for i in range(3)])
        bg = c.acquire(NS, [key(0), key(1), key(7), key(2)], prefix_only=True, background=True)
        assert list(bg.tiers) == [1, 1, 0, 0]
        assert [bytes(v) for v in bg.views[:2]] == [blob(4096, 0), blob(4096, 1)] and bg.views[2:] == [None, None]
        c.release(bg)
        none = c.acquire(NS, [key(8)], background=True)
        assert (none.id, list(none.tiers)) == (0, [0])  # nothing found: no lease to release


def test_acquire_mixes_ram_nvme_and_missing_keys(make_daemon, restart, tmp_path):
    blocks = {key(i): blob(64 * KiB, i) for i in range(6)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    k = list(blocks)
    gone = key(999)
    with Client(d.address) as c:
        for i in (0, 4):  # these two come up to RAM first
            assert c.get(NS, k[i]) == blocks[k[i]]
        order = [k[0], k[1], gone, k[3], k[4]]
        assert c.lookup(NS, order)[0] == [1, 2, 0, 2, 1]
        lease = c.acquire(NS, order, prefix_only=True)  # the answer ends at the first key no tier has
        try:
            assert list(lease.tiers) == [1, 2, 0, 0, 0]
            assert bytes(lease.views[1]) == blocks[k[1]] and lease.views[3] is None
        finally:
            c.release(lease)
        assert c.lookup(NS, [k[3]])[0] == [2]  # past the gap: not read
        lease = c.acquire(NS, [k[3], k[4]], prefix_only=True)  # a gap on NVMe, then a RAM block
        try:
            assert list(lease.tiers) == [2, 1]
            assert [bytes(v) for v in lease.views] == [blocks[k[3]], blocks[k[4]]]
        finally:
            c.release(lease)
        lease = c.acquire(NS, [gone, k[2], k[5]])
        try:
            assert list(lease.tiers) == [0, 2, 2]
            assert [bytes(v) for v in lease.views[1:]] == [blocks[k[2]], blocks[k[5]]]
        finally:
            c.release(lease)
        assert ram(c).leased_blocks == 0
        n = ns_stats(c)
        assert n.misses == 4  # the prefix read's keys from its gap on (3), the other read's absent key (1)
        assert nvme(c).promotions == 6


def test_acquire_prefix_only_stops_at_a_block_that_fails_its_checksum(make_daemon, restart, tmp_path):
    blocks = {key(i): blob(64 * KiB, i) for i in range(5)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    k = list(blocks)
    victim = file_of(tmp_path / "nvme0", k[2])
    flip_byte(victim, 4096 + 100)
    with Client(d.address) as c:
        lease = c.acquire(NS, k, prefix_only=True)
        try:
            assert list(lease.tiers) == [2, 2, 0, 0, 0]
            assert [bytes(v) for v in lease.views[:2]] == [blocks[k[0]], blocks[k[1]]]
        finally:
            c.release(lease)
        assert not os.path.exists(victim) and nvme(c).checksum_failures == 1
        assert ram(c).leased_blocks == 0
        assert c.get_many(NS, k) == [blocks[k[0]], blocks[k[1]], None, blocks[k[3]], blocks[k[4]]]


def test_a_promoted_block_cannot_be_evicted_before_its_acquire_leases_it(make_daemon, restart, tmp_path,
                                                                         monkeypatch):
    data = blob(BLOCK, "target")
    d = only_on_nvme(make_daemon, restart, tmp_path, {key(0): data})
    hot = d.daemon.store.hot
    real = hot.acquire
    squeezed = []

    def squeeze_then_acquire(ns, keys, *a, **kw):
        if kw.get("lease_id") is not None and not squeezed:  # committed, not leased yet: RAM runs out now
            squeezed.append(hot.lookup(NS, [key(0)])[0])
            try:
                r = hot.reserve("other", [key(1)], [hot.alloc.capacity - BLOCK // 2])  # evicts all it can
                hot.discard(r.reservation_id)
            except Exception as e:
                squeezed.append(type(e).__name__)
        return real(ns, keys, *a, **kw)

    monkeypatch.setattr(hot, "acquire", squeeze_then_acquire)
    with Client(d.address) as c:
        lease = c.acquire(NS, [key(0)])
        try:
            assert squeezed == [bytes([1]), "ArenaFull"]
            assert list(lease.tiers) == [2] and bytes(lease.views[0]) == data
        finally:
            c.release(lease)
        assert ram(c).leased_blocks == 0
        assert c.lookup(NS, [key(0)])[0] == [1]


def test_acquire_reads_in_its_own_thread_once_the_read_threads_are_gone(make_daemon, restart, tmp_path):
    blocks = {key(i): blob(64 * KiB, i) for i in range(4)}
    d = only_on_nvme(make_daemon, restart, tmp_path, blocks)
    d.daemon.store.reads.shutdown(wait=True)  # as at shutdown, with a call still in flight
    with Client(d.address) as c:
        lease = c.acquire(NS, list(blocks))
        try:
            assert list(lease.tiers) == [2] * 4
            assert [bytes(v) for v in lease.views] == list(blocks.values())
        finally:
            c.release(lease)


def test_acquire_from_ram_asks_nvme_only_about_missing_keys(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, ram_cap="32MiB"))
    ks = [key(i) for i in range(256)]
    with Client(d.address) as c:
        c.put_many(NS, [(k, blob(4096, i)) for i, k in enumerate(ks)])
        cold = d.daemon.store.cold
        asked = []
        real = cold.contains
        monkeypatch.setattr(cold, "contains", lambda ns, k: (asked.append(k), real(ns, k))[1])
        lease = c.acquire(NS, ks)
        c.release(lease)
        assert list(lease.tiers) == [1] * 256 and asked == []
        lease = c.acquire(NS, ks[:100] + [key(999)] + ks[100:])
        c.release(lease)
        assert lease.tiers.count(1) == 256 and asked == [key(999)]
        asked.clear()
        assert c.lookup(NS, ks + [key(998)])[0] == [1] * 256 + [0] and asked == [key(998)]


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


def test_promote_second_on_the_data_channel(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict", promote="second"))
    target = key(0)
    data = blob(BLOCK, "target")
    with Client(d.address) as c:
        assert c.put(NS, target, data)
        fill_until_evicted(c, target)
        wait_for(lambda: nvme(c).queued_bytes == 0 and nvme(c).blocks >= 1, what="demotion written")
        with Client(d.address, attach=False) as dc:
            assert dc.get(NS, target) == data
            assert dc.path == "data"
            assert c.lookup(NS, [target])[0] == [2]  # served from a transient buffer
            assert nvme(c).promotions == 0 and nvme(c).hits == 1
            assert dc.get(NS, target) == data
            assert c.lookup(NS, [target])[0] == [1]
            assert nvme(c).promotions == 1
            assert dc.get(NS, target) == data  # now from RAM
            assert nvme(c).hits == 2 and dc.checksum_failures == 0


def test_promote_first_on_the_data_channel(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict", promote="first"))
    target = key(0)
    with Client(d.address) as c:
        assert c.put(NS, target, blob(BLOCK, "t"))
        fill_until_evicted(c, target)
        wait_for(lambda: nvme(c).queued_bytes == 0 and nvme(c).blocks >= 1, what="demotion written")
        with Client(d.address, attach=False) as dc:
            assert dc.get(NS, target) == blob(BLOCK, "t")
        assert c.lookup(NS, [target])[0] == [1] and nvme(c).promotions == 1


# ---- restart ----------------------------------------------------------------------------------

SIZES = [1, 17, 4095, 4096, 4097, 65537, BLOCK, MiB + 3]


@pytest.mark.parametrize("codec", ["none", "shuffle-lz4"])
def test_restart_serves_nvme_blocks_byte_identical(make_daemon, restart, tmp_path, codec):
    dirs = [tmp_path / "nvme0", tmp_path / "nvme1"]
    d = make_daemon(**settings(tmp_path, ram_cap="16MiB", dirs=dirs, codec=codec, persist=False))
    expect = {key(i): (blob(n, i) if i % 2 else bytes(n // 2) + blob(n - n // 2, i)) for i, n in enumerate(SIZES)}
    with Client(d.address) as c:
        c.put_many(NS, list(expect.items()))
        wait_for(lambda: nvme(c).blocks == len(expect), what="write-behind")
    assert len(files(dirs[0])) + len(files(dirs[1])) == len(expect)
    assert files(dirs[0]) and files(dirs[1])

    d2 = restart(d)
    with Client(d2.address) as c:
        t = nvme(c)
        assert t.blocks == len(expect) and ram(c).blocks == 0
        assert c.lookup(NS, list(expect))[0] == [2] * len(expect)
        for k, data in expect.items():
            assert c.get(NS, k) == data
        assert c.lookup(NS, list(expect))[0] == [1] * len(expect)
        t = nvme(c)
        assert t.promotions == len(expect) and t.checksum_failures == 0
    with Client(d2.address, attach=False) as dc:  # and over the data channel
        assert dc.get_many(NS, list(expect)) == list(expect.values())


def test_restart_serves_before_the_headers_are_checked(make_daemon, restart, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, persist=False))
    n = 8
    expect = {key(i): blob(64 * KiB, i) for i in range(n)}
    with Client(d.address) as c:
        c.put_many(NS, list(expect.items()))
        wait_for(lambda: nvme(c).blocks == n, what="write-behind")
    read_first, checked_later = key(0), key(1)  # two files whose headers go bad while the daemon is down
    for k in (read_first, checked_later):
        flip_byte(file_of(tmp_path / "nvme0", k), 9)  # raw length: the header check fails
    gate, entered = threading.Event(), threading.Event()
    real = C.ColdTier._read_header

    def held(path):
        entered.set()
        gate.wait(20)
        return real(path)

    monkeypatch.setattr(C.ColdTier, "_read_header", staticmethod(held))
    try:
        d2 = restart(d)  # serving while the background check waits at its first header
        assert entered.wait(10)
        cold = d2.daemon.store.cold
        with Client(d2.address) as c:
            assert nvme(c).blocks == n and cold.snapshot()["unverified_blocks"] >= n - 1
            assert c.lookup(NS, list(expect))[0] == [2] * n  # indexed from the names
            assert c.get(NS, read_first) is None  # a read checks the header itself
            assert not os.path.exists(file_of(tmp_path / "nvme0", read_first))
            assert nvme(c).checksum_failures == 1
            for k in list(expect)[2:]:
                assert c.get(NS, k) == expect[k]
            gate.set()
            wait_for(lambda: cold.snapshot()["unverified_blocks"] == 0, what="background check")
            assert not os.path.exists(file_of(tmp_path / "nvme0", checked_later))
            assert c.lookup(NS, [checked_later])[0] == [0] and c.get(NS, checked_later) is None
            t = nvme(c)
            assert t.blocks == n - 2 and t.checksum_failures == 1
            assert t.used_bytes == sum(os.path.getsize(p) for p in files(tmp_path / "nvme0"))
    finally:
        gate.set()


def test_bit_flip_on_disk_is_a_miss_never_wrong_bytes(make_daemon, restart, tmp_path):
    d = make_daemon(**settings(tmp_path, persist=False))
    n = 6
    with Client(d.address) as c:
        c.put_many(NS, [(key(i), blob(BLOCK, i)) for i in range(n)])
        wait_for(lambda: nvme(c).blocks == n, what="write-behind")
    victim = file_of(tmp_path / "nvme0", key(2))
    with open(victim, "r+b") as f:  # one bit, in the middle of the payload
        f.seek(4096 + BLOCK // 2)
        b = f.read(1)
        f.seek(4096 + BLOCK // 2)
        f.write(bytes([b[0] ^ 0x08]))

    d2 = restart(d)
    with Client(d2.address) as c:
        assert nvme(c).blocks == n  # the header is intact: indexed at start
        assert c.lookup(NS, [key(2)])[0] == [2]
        got = [c.get(NS, key(i)) for i in range(n)]
        assert got[2] is None
        for i in range(n):
            if i != 2:
                assert got[i] == blob(BLOCK, i)
        t = nvme(c)
        assert t.checksum_failures == 1
        assert c.checksum_failures == 0  # the daemon caught it; the client never saw the bytes
        assert not os.path.exists(victim)
        assert c.lookup(NS, [key(2)])[0] == [0]
        assert c.get(NS, key(2)) is None and nvme(c).checksum_failures == 1
    with Client(d2.address, attach=False, data_channel=False) as gc:
        assert gc.get(NS, key(2)) is None
        assert gc.get(NS, key(3)) == blob(BLOCK, 3)


def test_bit_flip_read_over_the_data_channel_with_promote_second(make_daemon, restart, tmp_path):
    d = make_daemon(**settings(tmp_path, promote="second", persist=False))
    with Client(d.address) as c:
        c.put_many(NS, [(key(i), blob(BLOCK, i)) for i in range(2)])
        wait_for(lambda: nvme(c).blocks == 2, what="write-behind")
    victim = file_of(tmp_path / "nvme0", key(0))
    with open(victim, "r+b") as f:
        f.seek(4096 + 7)
        b = f.read(1)
        f.seek(4096 + 7)
        f.write(bytes([b[0] ^ 0x80]))
    d2 = restart(d)
    with Client(d2.address, attach=False) as dc, Client(d2.address) as c:
        assert dc.get(NS, key(0)) is None
        assert dc.get(NS, key(1)) == blob(BLOCK, 1)
        assert nvme(c).checksum_failures == 1 and not os.path.exists(victim)
        assert dc.checksum_failures == 0


# ---- delete and overwrite -----------------------------------------------------------------------

def test_delete_removes_the_nvme_copy(make_daemon, restart, tmp_path):
    d = make_daemon(**settings(tmp_path, persist=False))
    with Client(d.address) as c:
        c.put_many(NS, [(key(i), blob(64 * KiB, i)) for i in range(3)])
        wait_for(lambda: nvme(c).blocks == 3, what="write-behind")
        path0 = file_of(tmp_path / "nvme0", key(0))
        assert os.path.exists(path0)
        assert c.delete(NS, [key(0)]) >= 1
        assert not os.path.exists(path0)
        assert c.lookup(NS, [key(0)])[0] == [0] and c.get(NS, key(0)) is None
        assert nvme(c).blocks == 2
    d2 = restart(d)
    with Client(d2.address) as c:  # blocks only on NVMe now: delete counts one and removes its file
        assert c.lookup(NS, [key(0), key(1), key(2)])[0] == [0, 2, 2]
        assert c.delete(NS, [key(1)]) == 1
        assert not os.path.exists(file_of(tmp_path / "nvme0", key(1)))
        assert c.get(NS, key(1)) is None and c.get(NS, key(0)) is None
        assert c.get(NS, key(2)) == blob(64 * KiB, 2)


def test_delete_counts_a_block_in_both_tiers_once(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path))
    with Client(d.address) as c:
        assert c.put(NS, key(0), blob(4096, 0))
        wait_for(lambda: nvme(c).blocks == 1, what="write-behind")
        assert c.lookup(NS, [key(0)])[0] == [1]
        assert c.delete(NS, [key(0)]) == 1


def hold_nvme_writes(monkeypatch, target: bytes):
    """Hold every NVMe write of target until the returned gate is set; entered: one has begun."""
    gate, entered = threading.Event(), threading.Event()
    real = C.ColdTier.write

    def held(self, ns, k, *a, **kw):
        if k == target:
            entered.set()
            gate.wait(10)
        return real(self, ns, k, *a, **kw)

    monkeypatch.setattr(C.ColdTier, "write", held)
    return gate, entered


def put_until_written(c: Client, target: bytes, entered: threading.Event) -> None:
    """Put target, then (write_policy "evict") fillers until its write to NVMe has begun."""
    assert c.put(NS, target, blob(BLOCK, "v1"))
    for i in range(40):
        if entered.is_set():
            break
        c.put(NS, key(1000 + i), blob(BLOCK, 1000 + i))
    assert entered.wait(5), "the target's write did not begin"


def test_delete_during_an_inflight_demotion_does_not_resurrect(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    target = key(0)
    gate, entered = hold_nvme_writes(monkeypatch, target)
    try:
        with Client(d.address) as c:
            put_until_written(c, target, entered)
            c.delete(NS, [target])
            gate.set()
            wait_for(lambda: nvme(c).queued_bytes == 0, what="queue drained")
            assert c.lookup(NS, [target])[0] == [0]
            assert c.get(NS, target) is None
    finally:
        gate.set()


def put_only_on_nvme(c: Client, target: bytes) -> None:
    """Put target (v1), then fillers until it is evicted to NVMe and its demotion is written."""
    assert c.put(NS, target, blob(BLOCK, "v1"))
    fill_until_evicted(c, target, start=1000)
    wait_for(lambda: nvme(c).queued_bytes == 0, what="demotion written")


def test_overwrite_of_a_block_only_on_nvme_replaces_it(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    target = key(0)
    with Client(d.address) as c:
        put_only_on_nvme(c, target)
        c.put(NS, target, blob(BLOCK, "v2"), overwrite=True)
        assert c.get(NS, target) == blob(BLOCK, "v2")
        fill_until_evicted(c, target, start=2000)
        wait_for(lambda: nvme(c).queued_bytes == 0, what="demotion written")
        assert c.get(NS, target) == blob(BLOCK, "v2")


def test_an_overwrite_answers_once_the_old_file_is_gone_and_stalls_nothing_else(make_daemon, tmp_path, monkeypatch):
    """An overwrite drops the NVMe copy of the old content. Answered before that file was gone,
    a crash brought the old bytes back at the restart's scan; unlinked under the RAM tier's lock,
    a stalled filesystem (a failing drive) stalled every put and get. The overwrite now waits for
    the unlink, off the event loop: other clients' calls go on meanwhile."""
    d = make_daemon(**settings(tmp_path, write_policy="commit"))
    target = key(0)
    with Client(d.address) as c, Client(d.address) as other:
        assert c.put(NS, target, blob(64 * KiB, "v1"))
        wait_for(lambda: nvme(c).blocks == 1, what="write-behind")
        old_file = file_of(tmp_path / "nvme0", target)
        gate, entered = threading.Event(), threading.Event()
        real = os.unlink

        def stalled(path, *a, **kw):
            if str(path) == old_file:
                entered.set()
                gate.wait(20)
            return real(path, *a, **kw)

        monkeypatch.setattr(C.os, "unlink", stalled)
        done = {}
        overwrite = threading.Thread(target=lambda: done.setdefault(
            "ok", c.put(NS, target, blob(64 * KiB, "v2"), overwrite=True)))
        overwrite.start()
        try:
            assert entered.wait(5), "the old file was not unlinked"
            t0 = time.monotonic()
            assert other.put(NS, key(1), blob(64 * KiB, 1))  # the loop serves others meanwhile
            assert other.get(NS, key(1)) == blob(64 * KiB, 1)
            assert time.monotonic() - t0 < 5, "other calls waited for the unlink"
            time.sleep(0.2)
            assert "ok" not in done, "the overwrite answered before the old file was gone"
        finally:
            gate.set()
            overwrite.join(10)
        assert done["ok"]
        assert c.get(NS, target) == blob(64 * KiB, "v2")
        # the new content reaches NVMe, and is what a reader finds there
        wait_for(lambda: nvme(c).queued_bytes == 0 and nvme(c).blocks == 2, what="the new copy written")
        with open(old_file, "rb") as f:
            assert blob(64 * KiB, "v2") in f.read()


@pytest.mark.parametrize("write_policy", ["commit", "evict"])
def test_a_put_after_a_delete_during_the_keys_nvme_write_is_stored(make_daemon, tmp_path, monkeypatch, write_policy):
    """Delete K while its NVMe write is in flight, then put K again: the put was answered
    "already present" (the cancelled write counted as on NVMe) and, once that write's file was
    removed, K was in no tier at all."""
    d = make_daemon(**settings(tmp_path, write_policy=write_policy))
    target = key(0)
    gate, entered = hold_nvme_writes(monkeypatch, target)
    try:
        with Client(d.address) as c:
            put_until_written(c, target, entered)
            assert c.delete(NS, [target]) == 1  # its write was in flight: it was there
            assert c.lookup(NS, [target])[0] == [0]
            assert c.put(NS, target, blob(BLOCK, "v2")), "the put of a deleted key was not stored"
            gate.set()
            wait_for(lambda: nvme(c).queued_bytes == 0, what="the write ended")
            assert c.get(NS, target) == blob(BLOCK, "v2")
    finally:
        gate.set()


def test_an_overwrite_during_a_promotion_of_the_old_content_wins(make_daemon, tmp_path, monkeypatch):
    """The old content only on NVMe, being read up for a get: an overwrite was answered "pending"
    (put() False, dropped) and the promotion then committed the old bytes, served from then on."""
    d = make_daemon(**settings(tmp_path, write_policy="evict"))
    target = key(0)
    with Client(d.address) as c:
        put_only_on_nvme(c, target)
        gate, entered = threading.Event(), threading.Event()
        real = C._preadv_full

        def slow(*a, **kw):
            entered.set()
            gate.wait(10)
            return real(*a, **kw)

        monkeypatch.setattr(C, "_preadv_full", slow)
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("v", c.get(NS, target)))
        reader.start()
        try:
            assert entered.wait(5), "no promotion began"
            assert c.put(NS, target, blob(BLOCK, "v2"), overwrite=True), "the overwrite was not stored"
        finally:
            gate.set()
            reader.join(10)
        monkeypatch.undo()
        assert got["v"] in (None, blob(BLOCK, "v1"), blob(BLOCK, "v2"))  # the get ran beside it: any
        assert c.get(NS, target) == blob(BLOCK, "v2")
        wait_for(lambda: ram(c).leased_blocks == 0 and ram(c).reserved_bytes == 0, what="the promotion's slot freed",
                 show=lambda: ram(c))


def test_writing_a_block_to_nvme_is_not_a_read_of_it(make_daemon, tmp_path):
    """S3-FIFO keeps blocks read once over a scan of blocks never read. The end of each block's
    write at commit was counted as a read, so every block looked read once and a scan of new
    blocks pushed out the ones read (with write_policy "evict", not "commit", they stayed)."""
    st = settings(tmp_path, write_policy="commit")
    st["ram"]["policy"] = "s3fifo"
    d = make_daemon(**st)
    size = 256 * KiB
    with Client(d.address) as c:
        read_once = [key(i) for i in range(6)]
        for i, k in enumerate(read_once):
            assert c.put(NS, k, blob(size, i))
            wait_for(lambda: nvme(c).queued_bytes == 0, what="the write")
        assert c.get_many(NS, read_once) == [blob(size, i) for i in range(6)]
        for j in range(100):  # a scan: 25 MiB through an 8 MiB arena, never read
            assert c.put(NS, key(1000 + j), blob(size, 1000 + j))
            wait_for(lambda: nvme(c).queued_bytes == 0, what="the write")
        assert c.lookup(NS, read_once)[0] == [1] * 6


# ---- full disk and queue bound --------------------------------------------------------------------

def test_enospc_through_the_daemon_keeps_the_tier_within_the_room_it_has(make_daemon, tmp_path, small_tmpfs):
    """A filesystem much smaller than the capacity says: writes that find it full fail and make
    room (its oldest files go), the files and the accounting agree, and puts never fail."""
    d = make_daemon(**settings(tmp_path, ram_cap="16MiB", dirs=[small_tmpfs], write_policy="commit",
                               retry_s=60.0))
    n = 12  # 6 MiB of blocks onto a 3 MiB filesystem that claims 64 MiB of capacity
    with Client(d.address) as c:
        for i in range(n):
            assert c.put(NS, key(i), blob(BLOCK, i))
        wait_for(lambda: nvme(c).queued_bytes == 0 and ram(c).leased_blocks == 0, what="write-behind settled")
        t = nvme(c)
        assert t.io_errors >= 1
        assert 1 <= t.blocks < n
        assert t.blocks == len(files(small_tmpfs))
        assert temp_files(small_tmpfs) == []
        assert t.used_bytes == sum(os.path.getsize(p) for p in files(small_tmpfs))
        for i in range(n, n + 4):  # puts keep working
            assert c.put(NS, key(i), blob(BLOCK, i))
        assert c.get_many(NS, [key(i) for i in range(n + 4)]) == [blob(BLOCK, i) for i in range(n + 4)]
        assert c.lookup(NS, [key(i) for i in range(n + 4)])[0] == [1] * (n + 4)
        assert ram(c).blocks == n + 4
    assert d._thread.is_alive()


def test_queue_bound_drops_writes_instead_of_blocking(make_daemon, tmp_path):
    d = make_daemon(**settings(tmp_path, ram_cap="16MiB", write_policy="commit", queue_bytes="1KiB"))
    n = 10
    with Client(d.address) as c:
        for i in range(n):
            assert c.put(NS, key(i), blob(64 * KiB, i))
        t = nvme(c)
        assert t.dropped_writes == n and t.blocks == 0 and t.queued_bytes == 0
        assert files(tmp_path / "nvme0") == []
        assert c.get_many(NS, [key(i) for i in range(n)]) == [blob(64 * KiB, i) for i in range(n)]
        assert ram(c).leased_blocks == 0  # nothing held for a write that never happens


def test_puts_do_not_wait_for_a_stuck_disk(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, ram_cap="16MiB", write_policy="commit", queue_bytes="64KiB"))
    gate = threading.Event()
    real = C.ColdTier._write_file

    def stuck(self, *a, **kw):
        gate.wait(20)
        return real(self, *a, **kw)

    monkeypatch.setattr(C.ColdTier, "_write_file", stuck)
    n = 10
    try:
        with Client(d.address) as c:
            t0 = time.monotonic()
            for i in range(n):
                s = time.monotonic()
                assert c.put(NS, key(i), blob(64 * KiB, i))
                assert time.monotonic() - s < 2.0
            assert time.monotonic() - t0 < 5.0
            t = nvme(c)
            assert t.queued_bytes == 64 * KiB  # the first block, stuck
            assert t.dropped_writes == n - 1
            gate.set()
            wait_for(lambda: nvme(c).blocks == 1 and nvme(c).queued_bytes == 0, what="stuck write finished")
            assert files(tmp_path / "nvme0") == [file_of(tmp_path / "nvme0", key(0))]
            assert c.get_many(NS, [key(i) for i in range(n)]) == [blob(64 * KiB, i) for i in range(n)]
    finally:
        gate.set()


def test_demotions_past_the_queue_bound_are_dropped_and_counted(make_daemon, tmp_path, monkeypatch):
    d = make_daemon(**settings(tmp_path, write_policy="evict", queue_bytes="512KiB"))
    gate = threading.Event()
    real = C.ColdTier._write_file

    def stuck(self, *a, **kw):
        gate.wait(20)
        return real(self, *a, **kw)

    monkeypatch.setattr(C.ColdTier, "_write_file", stuck)
    n = 24
    try:
        with Client(d.address) as c:
            t0 = time.monotonic()
            for i in range(n):
                assert c.put(NS, key(i), blob(BLOCK, i))
            assert time.monotonic() - t0 < 10.0
            ev = ram(c).evictions
            assert ev >= n - 16
            t = nvme(c)
            assert t.demotions == 1 and t.dropped_writes == ev - 1
            gate.set()
            wait_for(lambda: nvme(c).blocks == 1 and nvme(c).queued_bytes == 0, what="demotion finished")
            assert c.get(NS, key(0)) == blob(BLOCK, 0)  # the one admitted
            got = [c.get(NS, key(i)) for i in range(1, ev)]
            assert got == [None] * (ev - 1)  # lost, never wrong
    finally:
        gate.set()
