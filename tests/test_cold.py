"""The NVMe tier (kvtier.cold.ColdTier) on real files under tmp_path.

Reads go into page-aligned buffers (an anonymous mmap, as an arena slot is) and into unaligned
ones, with O_DIRECT on (where the filesystem takes it) and off. Damage is done to the files
on disk between a write and a read, or between two ColdTier instances (a restart). ENOSPC comes
from a real small tmpfs when this machine lets us mount one, and always from an injected
``os.pwritev`` failure.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import logging
import mmap
import os
import random
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from kvtier import cold as C
from kvtier import record as R
from kvtier.cold import ColdTier, probe_direct
from kvtier.record import CODECS, PAGE

KiB, MiB = 1024, 1024 * 1024
NS = "cold-test"
ALL_CODECS = pytest.mark.parametrize("codec", sorted(CODECS))


# ---- helpers --------------------------------------------------------------------------------

def key(i: int, dir_of: int | None = None, ndirs: int = 2) -> bytes:
    """A 16-byte key; with dir_of, one that ColdTier places first on directory dir_of of ndirs."""
    j = 0
    while True:
        k = random.Random(f"{i}/{j}").randbytes(16)
        if dir_of is None or int.from_bytes(k[:4], "little") % ndirs == dir_of:
            return k
        j += 1


def kv_like(n: int, seed: int = 0) -> bytes:
    """Random low bytes, near-constant high bytes: shuffle-lz4 and lz4 both gain on it."""
    rng = np.random.default_rng(seed)
    m = (n + 1) // 2
    lo = rng.integers(0, 256, m, dtype=np.uint8)
    lo[: m // 2] = 0  # a long zero run so plain lz4 gains too
    hi = np.where(rng.random(m) < 0.9, 0x3C, 0xBC).astype(np.uint8)
    return np.stack([lo, hi], axis=1).tobytes()[:n]


def rnd(n: int, seed) -> bytes:
    return random.Random(repr(seed)).randbytes(n)


def rounded(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


def slot(data: bytes) -> memoryview:
    """data in a page-aligned, page-padded buffer, as an arena slot holds it."""
    m = mmap.mmap(-1, rounded(len(data)))
    m[:len(data)] = data
    return memoryview(m)


def write(tier: ColdTier, k: bytes, data: bytes, aligned_src: bool = True, ns: str = NS, **kw) -> bool:
    src = slot(data) if aligned_src else memoryview(bytearray(data))
    return tier.write(ns, k, src, len(data), R.checksum(data), **kw)


class Dest:
    """A dest callable for ColdTier.read: page-aligned (mmap) or deliberately unaligned bytearray."""

    def __init__(self, aligned: bool = True):
        self.aligned, self.buf, self.asked = aligned, None, None

    def __call__(self, n: int) -> memoryview:
        self.asked = n
        if self.aligned:
            self.buf = memoryview(mmap.mmap(-1, rounded(n)))
            assert C.aligned(self.buf)
        else:
            self.buf = memoryview(bytearray(rounded(n) + 1))[1:]  # one byte past an allocation: never page-aligned
            assert not C.aligned(self.buf)
        return self.buf


def read(tier: ColdTier, k: bytes, aligned: bool = True, ns: str = NS) -> bytes | None:
    d = Dest(aligned)
    meta = tier.read(ns, k, d)
    if meta is None:
        return None
    assert d.asked == meta.raw_len
    return bytes(d.buf[:meta.raw_len])


def path_of(tier: ColdTier, k: bytes, ns: str = NS) -> str:
    di = tier._index[(ns, k)]
    return tier._path(di, ns, k)


def block_files(*dirs) -> list[str]:
    out = []
    for d in dirs:
        out += glob.glob(os.path.join(str(d), "??", "*" + C.SUFFIX))
    return sorted(out)


def all_files(d) -> list[str]:
    out = []
    for root, _, files in os.walk(str(d)):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def disk_bytes(d) -> int:
    return sum(os.path.getsize(p) for p in block_files(d))


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.fixture(params=["on", "off"], ids=["direct", "buffered"])
def direct(request, tmp_path):
    if request.param == "on" and not probe_direct(str(tmp_path)):
        pytest.skip("this filesystem does not accept O_DIRECT")
    return request.param


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs mounted under tmp_path; skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to run out of space for real "
                    f"(needs root or CAP_SYS_ADMIN): {r.stderr.strip() or r.returncode}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- write / read ---------------------------------------------------------------------------

SIZES = [1, 4095, 4096, 4097, 200_003]


@ALL_CODECS
def test_bounced_reads_are_byte_identical_and_land_in_one_buffer(tmp_path, direct, codec, monkeypatch):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct, codec=codec, bounce_reads=True)
    calls = []
    preadv = C._preadv_full

    def spy(fd, bufs, offset):
        calls.append(bufs)
        return preadv(fd, bufs, offset)
    monkeypatch.setattr(C, "_preadv_full", spy)
    for i, n in enumerate(SIZES + [2 * MiB]):
        k, data = key(i), kv_like(n, i)
        assert write(tier, k, data)
        for aligned in (True, False):
            d = Dest(aligned)
            calls.clear()
            meta = tier.read(NS, k, d)
            assert meta is not None and bytes(d.buf[:meta.raw_len]) == data
            (bufs,) = calls
            if direct == "on":  # header and payload in one huge-page buffer, never the target itself
                assert len(bufs) == 1 and bufs[0].obj is not d.buf.obj and C.aligned(bufs[0])
                assert len(bufs[0]) == meta.header_size + rounded(meta.stored_len)
    assert tier.stats.hits == 2 * (len(SIZES) + 1) and tier.stats.checksum_failures == 0
    assert tier.snapshot()["bounce_reads"] is True


def test_huge_buffer_is_aligned_to_a_huge_page(monkeypatch):
    for n in (1, 4096, 2 * MiB, 2 * MiB + 4096):
        buf = C.huge_buffer(n)
        assert len(buf) == -(-n // C.HUGE) * C.HUGE and len(buf) >= n
        assert C._address(buf.obj) % 4096 == 0  # the mapping itself
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert addr % C.HUGE == 0
        buf[-1:] = b"x"  # writable to its last byte
        assert bytes(buf[-1:]) == b"x"


@ALL_CODECS
def test_write_read_byte_identical(tmp_path, direct, codec):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct, codec=codec)
    assert tier.scan() == 0
    assert tier.dirs[0].direct == (direct == "on")
    expect = {}
    for i, n in enumerate(SIZES):
        for j, (data, aligned_src) in enumerate(((kv_like(n, i), True), (rnd(n, i), False), (bytes(n), True))):
            k = key(i * 10 + j)
            assert write(tier, k, data, aligned_src, expires_ms=0, pin_class=j)
            expect[k] = data
    assert tier.snapshot()["blocks"] == len(expect)
    assert len(block_files(tmp_path / "d0")) == len(expect)
    for k, data in expect.items():
        assert read(tier, k, aligned=True) == data
        assert read(tier, k, aligned=False) == data
        assert tier.contains(NS, k)
    s = tier.stats
    assert s.hits == 2 * len(expect) and s.misses == 0 and s.checksum_failures == 0 and s.io_errors == 0
    assert s.writes == len(expect) and s.write_bytes == sum(map(len, expect.values()))
    assert not glob.glob(str(tmp_path / "d0" / "??" / "*.tmp"))


@ALL_CODECS
def test_file_is_one_record_with_a_page_header_and_the_chosen_codec(tmp_path, codec):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off", codec=codec)
    comp, rand = kv_like(100_000, 1), rnd(100_000, 2)
    assert write(tier, key(1), comp) and write(tier, key(2), rand)
    for k, data, want in ((key(1), comp, CODECS[codec]), (key(2), rand, R.CODEC_RAW)):
        p = path_of(tier, k)
        assert os.path.basename(p) == f"{k.hex()}.{NS}.kvb" and os.path.basename(os.path.dirname(p)) == k.hex()[:2]
        with open(p, "rb") as f:
            buf = f.read()
        meta = R.with_header_size(R.decode_header(buf), aligned=True)
        assert (meta.ns, meta.key, meta.raw_len, meta.codec) == (NS, k, len(data), want)
        assert len(buf) == PAGE + meta.stored_len
        if want != R.CODEC_RAW:
            assert meta.stored_len < 0.9 * len(data)
        assert tier.snapshot()["used_bytes"] == disk_bytes(tmp_path / "d0")


def test_same_key_twice_is_not_rewritten_and_namespaces_are_separate(tmp_path):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off")
    k = key(1)
    assert write(tier, k, b"first" * 100)
    assert not write(tier, k, b"second" * 100)
    assert read(tier, k) == b"first" * 100
    assert write(tier, k, b"other-ns", ns="other")
    assert read(tier, k, ns="other") == b"other-ns"
    assert read(tier, k) == b"first" * 100
    assert read(tier, key(2)) is None
    assert tier.stats.misses == 1 and tier.stats.checksum_failures == 0


def test_delete_removes_the_file(tmp_path):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off")
    assert write(tier, key(1), b"x" * 5000)
    p = path_of(tier, key(1))
    assert tier.delete(NS, key(1))
    assert not os.path.exists(p)
    assert not tier.contains(NS, key(1)) and read(tier, key(1)) is None
    assert tier.snapshot()["used_bytes"] == 0
    assert not tier.delete(NS, key(1))


def test_two_directories_share_the_blocks(tmp_path):
    d0, d1 = str(tmp_path / "d0"), str(tmp_path / "d1")
    tier = ColdTier([(d0, 1 << 30), (d1, 1 << 30)], direct_io="auto")
    expect = {key(i): rnd(3000 + i, i) for i in range(40)}
    for k, data in expect.items():
        assert write(tier, k, data)
    n0, n1 = len(block_files(d0)), len(block_files(d1))
    assert n0 + n1 == 40 and n0 >= 8 and n1 >= 8
    for k in expect:  # placement follows the key
        want = int.from_bytes(k[:4], "little") % 2
        assert os.path.exists(tier._path(want, NS, k))
    snap = tier.snapshot()
    assert [d["blocks"] for d in snap["dirs"]] == [n0, n1]
    assert [d["used_bytes"] for d in snap["dirs"]] == [disk_bytes(d0), disk_bytes(d1)]
    for k, data in expect.items():
        assert read(tier, k, aligned=bool(k[0] & 1)) == data


def test_direct_io_on_is_refused_where_the_filesystem_cannot(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "probe_direct", lambda path: False)
    with pytest.raises(OSError, match="O_DIRECT"):
        ColdTier([(str(tmp_path / "d0"), MiB)], direct_io="on")
    tier = ColdTier([(str(tmp_path / "d0"), MiB)], direct_io="auto")
    assert not tier.dirs[0].direct


# ---- capacity -------------------------------------------------------------------------------

def test_capacity_is_a_hard_bound_and_lru_files_go(tmp_path):
    d0 = str(tmp_path / "d0")
    block = 64 * KiB
    cap = 4 * (PAGE + block) + 100
    tier = ColdTier([(d0, cap)], direct_io="auto")
    keys = [key(i) for i in range(12)]
    for i, k in enumerate(keys):
        assert write(tier, k, rnd(block, i))
        if i >= 1:
            assert read(tier, keys[0]) == rnd(block, 0)  # keep block 0 the most recently used
        snap = tier.snapshot()
        assert snap["used_bytes"] <= cap
        assert snap["used_bytes"] == disk_bytes(d0) <= cap
    assert tier.snapshot()["blocks"] == 4
    assert tier.stats.evictions == 8
    survivors = {keys[0], keys[9], keys[10], keys[11]}
    for i, k in enumerate(keys):
        if k in survivors:
            assert tier.contains(NS, k) and read(tier, k) == rnd(block, i)
        else:
            assert not tier.contains(NS, k)
            assert not os.path.exists(tier._path(0, NS, k))
            assert read(tier, k) is None
    assert len(block_files(d0)) == 4
    assert tier.stats.checksum_failures == 0


def test_block_larger_than_a_directory_is_dropped(tmp_path):
    tier = ColdTier([(str(tmp_path / "d0"), 64 * KiB)], direct_io="off")
    assert not write(tier, key(1), bytes(64 * KiB))  # header + payload > capacity
    assert tier.stats.dropped_writes == 1
    assert block_files(tmp_path / "d0") == [] and tier.snapshot()["used_bytes"] == 0
    assert write(tier, key(2), bytes(1000))


def test_capacity_bound_holds_with_writes_in_flight(tmp_path, monkeypatch):
    d0 = str(tmp_path / "d0")
    block = 64 * KiB
    cap = 2 * (PAGE + block) + (PAGE + block) // 2  # room for two and a half blocks
    tier = ColdTier([(d0, cap)], direct_io="off")
    real = C._pwritev_all
    gate, entered = threading.Event(), []

    def slow(fd, bufs, offset):
        entered.append(fd)
        gate.wait(10)
        return real(fd, bufs, offset)

    monkeypatch.setattr(C, "_pwritev_all", slow)
    results = {}
    threads = []
    try:
        for i in range(3):
            t = threading.Thread(target=lambda i=i: results.__setitem__(i, write(tier, key(i), rnd(block, i))))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while len(entered) < i + 1 and t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
        in_flight_used = tier.snapshot()["used_bytes"]
    finally:
        gate.set()
        for t in threads:
            t.join(10)
    assert in_flight_used <= cap
    assert tier.snapshot()["used_bytes"] <= cap
    assert disk_bytes(d0) <= cap


# ---- restart --------------------------------------------------------------------------------

def test_restart_rebuilds_the_index_from_names_then_checks_headers(tmp_path, direct):
    d0, d1 = str(tmp_path / "d0"), str(tmp_path / "d1")
    first = ColdTier([(d0, 1 << 30), (d1, 1 << 30)], direct_io=direct, codec="shuffle-lz4")
    expect = {}
    for i in range(30):
        data = kv_like(5000 + 997 * i, i) if i % 2 else rnd(1 + 1111 * i, i)
        ns = NS if i % 3 else "other.ns"
        assert write(first, key(i), data, ns=ns, expires_ms=0 if i % 5 else 4_000_000_000_000, pin_class=i % 4)
        expect[(ns, key(i))] = data
    before = first.snapshot()
    assert before["unverified_blocks"] == 0  # written here: nothing to check

    again = ColdTier([(d0, 1 << 30), (d1, 1 << 30)], direct_io=direct, codec="none")
    assert again.snapshot()["blocks"] == 0
    assert again.scan() == 30
    after = again.snapshot()
    assert after["used_bytes"] == before["used_bytes"] == disk_bytes(d0) + disk_bytes(d1)
    assert [d["blocks"] for d in after["dirs"]] == [d["blocks"] for d in before["dirs"]]
    assert after["orphans_removed"] == 0 and after["corrupt_removed"] == 0
    assert after["unverified_blocks"] == 30
    readers = list(expect.items())[:10]  # read before the background check: verified by the read itself
    for (ns, k), data in readers:
        assert read(again, k, ns=ns, aligned=True) == data
    assert again.snapshot()["unverified_blocks"] == 20
    assert again.verify_pending(threads=3) == (20, 0)
    assert again.snapshot()["unverified_blocks"] == 0 and again.snapshot()["blocks"] == 30
    assert again.verify_pending() == (0, 0)
    for (ns, k), data in expect.items():
        assert again.contains(ns, k)
        assert read(again, k, ns=ns, aligned=True) == data
        assert read(again, k, ns=ns, aligned=False) == data
    assert again.stats.checksum_failures == 0
    assert not again.contains(NS, key(999))


def test_scan_opens_no_block_file(tmp_path, monkeypatch):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    for i in range(20):
        assert write(first, key(i), rnd(3000 + i, i))
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: (opened.append(path), real(path, *a, **kw))[1])
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 20
    assert [p for p in opened if str(p).endswith(C.SUFFIX)] == []
    assert again.snapshot()["used_bytes"] == disk_bytes(d0)
    assert read(again, key(3)) == rnd(3003, 3)
    assert again.verify_pending() == (19, 0)
    assert len([p for p in opened if str(p).endswith(C.SUFFIX)]) == 20  # one read, 19 header checks


def test_restart_keeps_lru_order_by_file_age(tmp_path):
    d0 = str(tmp_path / "d0")
    block = 32 * KiB
    cap = 3 * (PAGE + block)
    first = ColdTier([(d0, cap)], direct_io="off")
    for i in range(3):
        assert write(first, key(i), rnd(block, i))
        os.utime(path_of(first, key(i)), (1_000_000 + i, 1_000_000 + i))
    again = ColdTier([(d0, cap)], direct_io="off")
    assert again.scan() == 3
    assert write(again, key(3), rnd(block, 3))  # evicts the oldest file: key 0
    assert not again.contains(NS, key(0)) and not os.path.exists(again._path(0, NS, key(0)))
    assert all(again.contains(NS, key(i)) for i in (1, 2, 3))


def test_scan_removes_orphan_temp_files(tmp_path):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert write(first, key(1), b"a" * 5000)
    sub = os.path.dirname(path_of(first, key(1)))
    orphans = [os.path.join(sub, f".{key(1).hex()}.{NS}.kvb.deadbeef.tmp"),
               os.path.join(d0, "ab", f".ab{'0' * 30}.{NS}.kvb.01234567.tmp")]
    os.makedirs(os.path.join(d0, "ab"), exist_ok=True)
    for p in orphans:
        with open(p, "wb") as f:
            f.write(b"partial")
    foreign = os.path.join(sub, "notes.txt")  # not ours: left alone
    with open(foreign, "w") as f:
        f.write("keep me")
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 1
    assert again.stats.orphans_removed == 2
    assert not any(os.path.exists(p) for p in orphans)
    assert os.path.exists(foreign)
    assert read(again, key(1)) == b"a" * 5000


def _damage(p: str, damage: str) -> None:
    if damage == "header-bit":
        flip(p, 9, 0x04)  # raw length
    elif damage == "magic":
        flip(p, 0, 0xFF)
    elif damage == "header-check":
        flip(p, 61, 0x80)
    elif damage == "truncated-header":
        os.truncate(p, 40)
    elif damage == "short-file":
        os.truncate(p, PAGE + 4000)
    elif damage == "long-file":
        with open(p, "ab") as f:
            f.write(b"junk")
    else:
        os.truncate(p, 0)


@pytest.mark.parametrize("found_by", ["background", "read"])
@pytest.mark.parametrize("damage", ["header-bit", "magic", "header-check", "truncated-header", "short-file",
                                    "long-file", "empty"])
def test_a_file_with_a_corrupt_header_is_removed_after_restart(tmp_path, damage, found_by):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    good, bad = key(1), key(2)
    assert write(first, good, rnd(9000, 1)) and write(first, bad, rnd(9000, 2))
    p = path_of(first, bad)
    _damage(p, damage)
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    too_short = damage in ("truncated-header", "empty")  # cannot hold a header: the name scan drops it
    assert again.scan() == (1 if too_short else 2)
    assert again.snapshot()["used_bytes"] == disk_bytes(d0)
    if found_by == "read":
        assert read(again, bad) is None
        assert again.stats.checksum_failures == (0 if too_short else 1)
    else:
        assert again.verify_pending() == ((1, 0) if too_short else (2, 1))
        assert again.stats.checksum_failures == 0
    assert again.stats.corrupt_removed == 1
    assert not os.path.exists(p)
    assert not again.contains(NS, bad) and read(again, bad) is None
    assert read(again, good) == rnd(9000, 1)
    assert again.snapshot()["used_bytes"] == disk_bytes(d0)
    assert again.snapshot()["unverified_blocks"] == 0


@pytest.mark.parametrize("found_by", ["background", "read"])
@pytest.mark.parametrize("other", ["key", "namespace"])
def test_a_file_whose_header_names_another_block_is_removed_after_restart(tmp_path, other, found_by):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    k = key(1)
    assert write(first, k, rnd(9000, 1))
    src = path_of(first, k)
    if other == "key":
        ns2, k2 = NS, key(2)
    else:
        ns2, k2 = "another", k
    sub, name = C.file_name(ns2, k2)
    impostor = os.path.join(d0, sub, name)
    os.makedirs(os.path.dirname(impostor), exist_ok=True)
    shutil.copyfile(src, impostor)
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 2
    if found_by == "read":
        assert read(again, k2, ns=ns2) is None and again.stats.checksum_failures == 1
    else:
        assert again.verify_pending() == (2, 1)
    assert again.stats.corrupt_removed == 1
    assert not os.path.exists(impostor) and os.path.exists(src)
    assert read(again, k2, ns=ns2) is None
    assert read(again, k) == rnd(9000, 1)


def test_scan_removes_files_that_cannot_be_records(tmp_path):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert write(first, key(1), rnd(9000, 1))
    src = path_of(first, key(1))
    misplaced = os.path.join(d0, "00" if key(1).hex()[:2] != "00" else "01", os.path.basename(src))
    upper = os.path.join(os.path.dirname(src), key(1).hex().upper() + f".{NS}" + C.SUFFIX)
    os.makedirs(os.path.dirname(misplaced), exist_ok=True)
    for p in (misplaced, upper):
        shutil.copyfile(src, p)
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 1
    assert again.stats.corrupt_removed == 2
    assert not os.path.exists(misplaced) and not os.path.exists(upper)
    assert again.snapshot()["used_bytes"] == disk_bytes(d0)
    assert read(again, key(1)) == rnd(9000, 1)


def test_background_check_skips_blocks_read_deleted_or_rewritten_meanwhile(tmp_path):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    for i in range(6):
        assert write(first, key(i), rnd(5000, i))
    _damage(path_of(first, key(0)), "header-bit")
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 6
    assert read(again, key(1)) == rnd(5000, 1)      # checked by the read
    assert again.delete(NS, key(2))                  # gone
    assert again.delete(NS, key(0))                  # the corrupt one, deleted before the check
    assert write(again, key(0), rnd(5000, 100))      # and written again, sound
    assert again.verify_pending() == (3, 0)          # keys 3, 4, 5
    assert read(again, key(0)) == rnd(5000, 100)
    assert again.stats.corrupt_removed == 0 and again.stats.checksum_failures == 0
    assert again.snapshot()["blocks"] == 5 and again.snapshot()["used_bytes"] == disk_bytes(d0)


def test_background_check_stops_when_asked(tmp_path):
    d0 = str(tmp_path / "d0")
    first = ColdTier([(d0, 1 << 30)], direct_io="off")
    for i in range(10):
        assert write(first, key(i), rnd(100, i))
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 10
    stop = threading.Event()
    stop.set()
    assert again.verify_pending(stop=stop) == (0, 0)
    assert again.snapshot()["unverified_blocks"] == 10
    assert all(read(again, key(i)) == rnd(100, i) for i in range(10))  # reads check them all the same
    assert again.snapshot()["unverified_blocks"] == 0


def test_read_refuses_a_file_whose_header_names_another_block(tmp_path):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off")
    assert write(tier, key(1), rnd(5000, 1)) and write(tier, key(2), rnd(5000, 2))
    shutil.copyfile(path_of(tier, key(1)), path_of(tier, key(2)))  # swapped behind the tier's back
    p2 = path_of(tier, key(2))
    assert read(tier, key(2)) is None
    assert tier.stats.checksum_failures == 1 and not os.path.exists(p2)
    assert read(tier, key(1)) == rnd(5000, 1)


# ---- damage at read time --------------------------------------------------------------------

@ALL_CODECS
def test_payload_bit_flip_is_a_counted_miss_and_the_file_goes(tmp_path, direct, codec):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 1 << 30)], direct_io=direct, codec=codec)
    data = kv_like(50_000, 4)
    assert write(tier, key(1), data) and write(tier, key(2), data)
    p = path_of(tier, key(1))
    stored = os.path.getsize(p) - PAGE
    flip(p, PAGE + stored // 2, 0x01)
    used = tier.snapshot()["used_bytes"]
    assert read(tier, key(1), aligned=True) is None
    assert tier.stats.checksum_failures == 1 and tier.stats.corrupt_removed == 1
    assert not os.path.exists(p) and not tier.contains(NS, key(1))
    assert tier.snapshot()["used_bytes"] == used - (PAGE + stored)
    assert read(tier, key(1)) is None  # now a plain miss
    assert tier.stats.checksum_failures == 1
    assert read(tier, key(2), aligned=False) == data
    assert write(tier, key(1), data) and read(tier, key(1)) == data  # it can be stored again


@pytest.mark.parametrize("bounce", [False, True])
def test_payload_bit_flips_raw_are_all_caught(tmp_path, direct, bounce, caplog):
    caplog.set_level(logging.ERROR, logger="kvtier.nvme")
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct, bounce_reads=bounce)
    data = rnd(5000, 3)
    k = key(1)
    failures = 0
    for bit in list(range(0, 32)) + list(range(32, len(data) * 8, 401)) + [len(data) * 8 - 1]:
        if not tier.contains(NS, k):
            assert write(tier, k, data)
        p = path_of(tier, k)
        flip(p, PAGE + bit // 8, 1 << (bit % 8))
        assert read(tier, k, aligned=bool(bit & 1)) is None
        failures += 1
        assert tier.stats.checksum_failures == failures and not os.path.exists(p)


def _compressible(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(n // 4) + bytes(rng.randrange(4) for _ in range(n - n // 4 - n // 6)) + bytes(n // 6)


@pytest.mark.parametrize("codec", ["lz4", "shuffle-lz4"])
def test_every_payload_bit_flip_compressed_is_a_miss_never_an_error(tmp_path, codec, caplog):
    caplog.set_level(logging.ERROR, logger="kvtier.nvme")
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off", codec=codec)
    data = _compressible(600, 5)
    k = key(1)
    assert write(tier, k, data)
    p = path_of(tier, k)
    with open(p, "rb") as f:
        good = f.read()
    assert R.decode_header(good).codec == CODECS[codec]
    stored = len(good) - PAGE
    bits = list(range(min(stored * 8, 256))) + list(range(256, stored * 8, 11))
    for bit in bits:
        if not tier.contains(NS, k):
            assert write(tier, k, data)
            p = path_of(tier, k)
        flip(p, PAGE + bit // 8, 1 << (bit % 8))
        got = read(tier, k)
        if got is None:
            assert not os.path.exists(p)
        else:  # lz4 may decode a flipped offset to the same bytes: then they must be the same
            assert got == data
            flip(p, PAGE + bit // 8, 1 << (bit % 8))


@pytest.mark.parametrize("cut", ["payload", "header", "all"])
def test_truncated_file_is_a_miss_and_removed(tmp_path, direct, cut):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct)
    data = rnd(100_000, 5)
    assert write(tier, key(1), data)
    p = path_of(tier, key(1))
    os.truncate(p, {"payload": PAGE + 50_000, "header": 30, "all": 0}[cut])
    assert read(tier, key(1)) is None
    assert tier.stats.checksum_failures == 1
    assert not os.path.exists(p) and not tier.contains(NS, key(1))
    assert tier.snapshot()["used_bytes"] == 0


def test_file_deleted_behind_the_tiers_back_is_a_plain_miss(tmp_path, direct):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct)
    assert write(tier, key(1), rnd(10_000, 1)) and write(tier, key(2), rnd(10_000, 2))
    os.unlink(path_of(tier, key(1)))
    assert read(tier, key(1)) is None
    s = tier.stats
    assert s.misses == 1 and s.checksum_failures == 0 and s.io_errors == 0 and s.corrupt_removed == 0
    assert not tier.contains(NS, key(1))
    assert tier.snapshot()["used_bytes"] == disk_bytes(tmp_path / "d0")
    assert read(tier, key(2)) == rnd(10_000, 2)


def _address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("n", [64 * KiB, 64 * KiB + 5])
def test_a_raw_block_is_one_preadv_straight_into_the_callers_buffer(tmp_path, direct, monkeypatch, n):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct)
    data = rnd(n, 1)
    assert write(tier, key(1), data)
    calls = []
    real = os.preadv

    def preadv(fd, bufs, offset, *a):
        calls.append(([len(b) for b in bufs], [_address(b) for b in bufs], offset))
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    d = Dest(aligned=True)
    assert tier.read(NS, key(1), d).raw_len == n
    monkeypatch.undo()
    assert bytes(d.buf[:n]) == data and d.asked == n
    sizes, addresses, offset = calls[0]
    assert offset == 0 and sizes == [PAGE, rounded(n) if direct == "on" else n]  # header page + payload
    assert addresses[1] == _address(d.buf)  # no staging copy
    assert len(calls) == (1 if n % PAGE == 0 or direct == "off" else 2)  # + the zero-byte read at the end of file


@pytest.mark.parametrize("codec", ["lz4", "shuffle-lz4"])
def test_a_compressed_block_asks_dest_again_for_its_raw_size(tmp_path, direct, codec):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io=direct, codec=codec)
    data = kv_like(200_000, 3)
    assert write(tier, key(1), data)
    stored = os.path.getsize(path_of(tier, key(1))) - PAGE
    assert stored < len(data)
    asked = []
    bufs = []

    def dest(n):
        asked.append(n)
        bufs.append(memoryview(mmap.mmap(-1, rounded(n))))
        return bufs[-1]

    assert tier.read(NS, key(1), dest).raw_len == len(data)
    assert asked == [stored, len(data)]
    assert bytes(bufs[1][:len(data)]) == data


def test_a_block_replaced_while_it_is_read_is_a_plain_miss(tmp_path, monkeypatch):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off")
    k = key(1)
    assert write(tier, k, rnd(5000, 1))
    p = path_of(tier, k)
    real = os.open
    fired = []

    def replace_first(path, *a, **kw):  # deleted and written again, longer, between lookup and open
        if path == p and not fired:
            fired.append(path)
            assert tier.delete(NS, k) and write(tier, k, rnd(9000, 2))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "open", replace_first)
    assert read(tier, k) is None  # the file no longer matches what the index said when we looked
    monkeypatch.undo()
    assert fired and os.path.exists(p)
    s = tier.stats
    assert s.checksum_failures == 0 and s.corrupt_removed == 0
    assert read(tier, k) == rnd(9000, 2)
    assert tier.snapshot()["used_bytes"] == disk_bytes(tmp_path / "d0")


def test_dest_may_refuse_and_nothing_is_lost(tmp_path):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="off")
    assert write(tier, key(1), rnd(10_000, 1))

    class NoRoom(Exception):
        pass

    def refuse(n):
        raise NoRoom()

    with pytest.raises(NoRoom):
        tier.read(NS, key(1), refuse)
    assert tier.contains(NS, key(1)) and read(tier, key(1)) == rnd(10_000, 1)


def test_expired_file_is_a_miss_and_dropped_after_restart(tmp_path):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 1 << 30)], direct_io="off")
    past = int(time.time() * 1000) - 1000
    assert write(tier, key(1), b"old" * 100, expires_ms=past)
    assert write(tier, key(2), b"new" * 100, expires_ms=past + 3_600_000)
    assert read(tier, key(1)) is None and tier.stats.checksum_failures == 0
    assert read(tier, key(2)) == b"new" * 100
    assert write(tier, key(3), b"gone" * 100, expires_ms=past)
    assert write(tier, key(4), b"gone too" * 100, expires_ms=past)
    again = ColdTier([(d0, 1 << 30)], direct_io="off")
    assert again.scan() == 3
    assert read(again, key(4)) is None  # expired: found by the read
    assert again.verify_pending() == (2, 1)  # key 3 by the background check
    assert not os.path.exists(tier._path(0, NS, key(3))) and not os.path.exists(tier._path(0, NS, key(4)))
    assert again.snapshot()["blocks"] == 1 and again.stats.checksum_failures == 0
    assert read(again, key(2)) == b"new" * 100


# ---- ENOSPC and recovery --------------------------------------------------------------------

def _no_temp_left(d) -> None:
    assert [p for p in all_files(d) if p.endswith(".tmp")] == []


def test_enospc_on_a_real_full_filesystem_makes_room_and_recovers(tmp_path, small_tmpfs):
    """A filesystem full below the tier's capacity (shared with another program, or another
    directory of the tier sized automatically): the write that finds it full fails, the
    directory's oldest files make room for it, and the next write fits there. A directory with
    no file of the tier's to evict is skipped for retry_s instead
    (test_enospc_injected_degrades_one_directory_and_recovers)."""
    big = str(tmp_path / "big")
    tier = ColdTier([(small_tmpfs, 64 * MiB), (big, 64 * MiB)], direct_io="auto", retry_s=0.2)
    block = 512 * KiB
    written = []
    failed = None
    for i in range(12):
        k = key(i, dir_of=0)
        if write(tier, k, rnd(block, i)):
            written.append(k)
        else:
            failed = k
            break
    assert failed is not None, "a 3 MiB tmpfs took 12 x 512 KiB"
    assert 3 <= len(written) <= 5
    s = tier.snapshot()
    assert s["io_errors"] == 1
    assert not s["dirs"][0]["degraded"] and not s["dirs"][1]["degraded"]
    _no_temp_left(small_tmpfs)
    assert not tier.contains(NS, written[0])  # the oldest made room
    assert sorted(block_files(small_tmpfs)) == sorted(tier._path(0, NS, k) for k in written[1:])
    assert tier.snapshot()["dirs"][0]["used_bytes"] == disk_bytes(small_tmpfs)
    assert not tier.contains(NS, failed)
    for i, k in enumerate(written[1:], 1):
        assert read(tier, k) == rnd(block, i)
    assert write(tier, failed, rnd(block, 999))  # fits where room was made
    assert os.path.exists(tier._path(0, NS, failed))
    assert read(tier, failed) == rnd(block, 999)
    _no_temp_left(small_tmpfs)


def test_enospc_injected_degrades_one_directory_and_recovers(tmp_path, monkeypatch):
    d0, d1 = str(tmp_path / "d0"), str(tmp_path / "d1")
    tier = ColdTier([(d0, 1 << 30), (d1, 1 << 30)], direct_io="auto", retry_s=0.2)
    real = os.pwritev
    full = {"on": True}

    def pwritev(fd, bufs, offset, *a):
        if full["on"] and os.readlink(f"/proc/self/fd/{fd}").startswith(d0 + os.sep):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "pwritev", pwritev)
    k0 = key(1, dir_of=0)
    assert not write(tier, k0, rnd(20_000, 1))
    s = tier.snapshot()
    assert s["io_errors"] == 1 and s["writes"] == 0
    assert s["dirs"][0]["degraded"] and s["dirs"][0]["degraded_reason"] == os.strerror(errno.ENOSPC)
    assert s["dirs"][0]["used_bytes"] == 0 and s["used_bytes"] == 0
    assert all_files(d0) == []  # neither the block file nor its temp file
    assert not tier.contains(NS, k0)

    # other directory: still written, including keys that would have gone to d0
    k1 = key(2, dir_of=1)
    k0b = key(3, dir_of=0)
    assert write(tier, k1, rnd(20_000, 2)) and write(tier, k0b, rnd(20_000, 3))
    assert os.path.exists(tier._path(1, NS, k1)) and os.path.exists(tier._path(1, NS, k0b))
    assert all_files(d0) == []
    assert tier.snapshot()["io_errors"] == 1  # a degraded directory is not even tried

    # still failing after retry_s: degraded again, counted again
    time.sleep(0.25)
    assert not tier.snapshot()["dirs"][0]["degraded"]
    assert not write(tier, key(4, dir_of=0), rnd(20_000, 4))
    assert tier.snapshot()["io_errors"] == 2 and tier.snapshot()["dirs"][0]["degraded"]

    # space is back: after retry_s, d0 takes writes again
    full["on"] = False
    time.sleep(0.25)
    assert write(tier, k0, rnd(20_000, 1))
    assert os.path.exists(tier._path(0, NS, k0))
    assert read(tier, k0) == rnd(20_000, 1)
    s = tier.snapshot()
    assert not s["dirs"][0]["degraded"] and s["dirs"][0]["blocks"] == 1
    _no_temp_left(d0)


def test_other_io_errors_are_counted_but_do_not_degrade(tmp_path, monkeypatch):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 1 << 30)], direct_io="off", retry_s=60)
    monkeypatch.setattr(os, "pwritev", lambda *a: (_ for _ in ()).throw(OSError(errno.EBADF, "bad fd")))
    assert not write(tier, key(1), b"x" * 1000)
    s = tier.snapshot()
    assert s["io_errors"] == 1 and not s["dirs"][0]["degraded"] and s["used_bytes"] == 0
    assert all_files(d0) == []
    monkeypatch.undo()
    assert write(tier, key(1), b"x" * 1000) and read(tier, key(1)) == b"x" * 1000


def test_all_directories_degraded_drops_writes(tmp_path, monkeypatch):
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30), (str(tmp_path / "d1"), 1 << 30)], direct_io="off",
                    retry_s=60)
    monkeypatch.setattr(os, "pwritev", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert not write(tier, key(1, dir_of=0), b"x" * 1000)
    assert not write(tier, key(2, dir_of=1), b"x" * 1000)
    monkeypatch.undo()
    s = tier.snapshot()
    assert [d["degraded"] for d in s["dirs"]] == [True, True] and s["io_errors"] == 2
    assert not write(tier, key(3), b"x" * 1000)  # nowhere to go: dropped, not attempted
    assert tier.stats.dropped_writes == 1 and tier.stats.io_errors == 2


# ---- tenants --------------------------------------------------------------------------------

BLK = 8 * KiB
FILE = PAGE + BLK  # bytes on disk of one BLK-sized raw block


def check_tenants(tier: ColdTier, *dirs) -> None:
    """Each indexed file is filed under one tenant, whose bytes add up to its files' sizes
    (nothing in flight); the files on disk are exactly the indexed ones."""
    filed = [k for lru in tier._groups.values() for k in lru]
    assert len(filed) == len(set(filed)) and set(filed) == set(tier._index)
    for g, lru in tier._groups.items():
        assert tier.group_used.get(g, 0) == sum(lru.values()), g
    assert all(v >= 0 for v in tier.group_used.values()), tier.group_used
    assert sorted(path_of(tier, k, ns) for ns, k in tier._index) == block_files(*dirs)
    assert sum(d.used for d in tier.dirs) == sum(disk_bytes(d) for d in dirs)


def test_a_namespace_moved_to_another_tenant_keeps_nvme_accounting_straight(tmp_path):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 1 << 30)], direct_io="off")
    tier.group_of, tier.quotas = (lambda ns: "A"), {"A": 10 * FILE}
    for i in range(4):
        assert write(tier, key(i), rnd(BLK, i), ns="x")
    # a reload moves namespace x to tenant B: x's files stay charged to A, where they were written
    tier.group_of = lambda ns: "B" if ns == "x" else "A"
    tier.quotas = {"A": 10 * FILE, "B": 10 * FILE}
    assert tier.delete("x", key(0))
    assert tier.group_used == {"A": 3 * FILE}
    check_tenants(tier, d0)
    for i in range(100, 110):  # A over its quota: its oldest files (x's, written as A's) go first
        assert write(tier, key(i), rnd(BLK, i), ns="y")
        check_tenants(tier, d0)
    assert tier.group_used["A"] == 10 * FILE and tier.group_used.get("B", 0) == 0
    assert not any(tier.contains("x", key(i)) for i in range(4))
    for i in range(4):  # B writes x afresh, under its own quota
        assert write(tier, key(i), rnd(BLK, i), ns="x")
    assert tier.group_used == {"A": 10 * FILE, "B": 4 * FILE}
    assert read(tier, key(3), ns="x") == rnd(BLK, 3)
    assert read(tier, key(105), ns="y") == rnd(BLK, 105)
    check_tenants(tier, d0)


def test_files_of_a_moved_namespace_go_by_directory_pressure_too(tmp_path):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 6 * FILE)], direct_io="off")
    tier.group_of, tier.quotas = (lambda ns: "A"), {"A": 4 * FILE}
    for i in range(4):
        assert write(tier, key(i), rnd(BLK, i), ns="x")
    tier.group_of = lambda ns: "B" if ns == "x" else "A"
    tier.quotas = {"A": 4 * FILE, "B": 4 * FILE}
    for i in range(100, 104):  # the directory fills: x's old files go, credited back to A
        assert write(tier, key(i), rnd(BLK, i), ns="x")
        check_tenants(tier, d0)
    assert tier.group_used == {"A": 2 * FILE, "B": 4 * FILE}
    for i in range(200, 204):  # A's quota now counts only A's own files
        assert write(tier, key(i), rnd(BLK, i), ns="y")
        check_tenants(tier, d0)
    assert tier.group_used["A"] <= 4 * FILE and tier.group_used["B"] <= 4 * FILE


def test_a_write_that_the_quota_cannot_take_leaves_no_file_behind(tmp_path, monkeypatch):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 1 << 30)], direct_io="off")
    tier.group_of, tier.quotas = (lambda ns: "A"), {"A": 3 * FILE}
    assert write(tier, key(0), rnd(BLK, 0))
    real, gate, entered = tier._write_file, threading.Event(), []

    def slow(*a):
        entered.append(1)
        gate.wait(10)
        return real(*a)

    monkeypatch.setattr(tier, "_write_file", slow)
    threads = [threading.Thread(target=write, args=(tier, key(i), rnd(BLK, i))) for i in (1, 2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(entered) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        # two blocks in flight: a larger one cannot fit even with every written file gone
        assert not write(tier, key(3), rnd(2 * BLK, 3))
        assert tier.stats.dropped_writes == 1
    finally:
        gate.set()
        for t in threads:
            t.join(10)
    check_tenants(tier, d0)


# ---- removal racing a rewrite ---------------------------------------------------------------

@pytest.mark.parametrize("removed_by", ["eviction", "delete"])
def test_a_key_rewritten_while_its_old_file_is_removed_keeps_the_new_file(tmp_path, monkeypatch, removed_by):
    d0 = str(tmp_path / "d0")
    tier = ColdTier([(d0, 2 * FILE)], direct_io="off")
    k = key(0)
    assert write(tier, k, rnd(BLK, "old")) and write(tier, key(1), rnd(BLK, 1))
    target, real, rewrites = path_of(tier, k), C.ColdTier._unlink, []

    def unlink(path):
        if path == target and not rewrites:
            # the old file is out of the index but still on disk: the key is written afresh now
            t = threading.Thread(target=lambda: rewrites.append(write(tier, k, rnd(BLK, "new"))))
            rewrites.append(t)
            t.start()
            t.join(0.3)
        real(path)

    monkeypatch.setattr(tier, "_unlink", unlink)
    if removed_by == "eviction":
        assert write(tier, key(2), rnd(BLK, 2))  # the directory is full: k, least recently used, goes
    else:
        assert tier.delete(NS, k)
    assert rewrites, "the old file was not removed"
    rewrites[0].join(10)
    assert rewrites[1:] == [True]
    assert read(tier, k) == rnd(BLK, "new")
    check_tenants(tier, d0)


@pytest.mark.parametrize("bounce", [True, False], ids=["bounced", "in-place"])
def test_a_read_whose_buffer_went_away_is_a_miss_and_keeps_the_file(tmp_path, bounce):
    """At shutdown the arena closes under a promotion still reading: its slot is a released
    memoryview. That is no fault of the file, which must stay (it used to be removed as corrupt)."""
    tier = ColdTier([(str(tmp_path / "d0"), 1 << 30)], direct_io="auto", bounce_reads=bounce)
    data = rnd(300_000, "gone")
    assert write(tier, key(1), data)

    def released(n):
        v = memoryview(mmap.mmap(-1, rounded(n)))
        v.release()
        return v

    def refusing(n):
        raise ValueError("operation forbidden on released memoryview object")
    for dest in (released, refusing):
        assert tier.read(NS, key(1), dest) is None
        assert os.path.exists(path_of(tier, key(1)))
    assert tier.stats.checksum_failures == 0 and tier.stats.misses == 2
    assert read(tier, key(1)) == data


def test_a_short_direct_write_is_finished_without_o_direct(tmp_path, monkeypatch):
    """A short O_DIRECT write (a filesystem filling up) is finished buffered: the rest starts off
    a page boundary, which O_DIRECT refuses with EINVAL."""
    if not probe_direct(str(tmp_path)):
        pytest.skip("no O_DIRECT on this filesystem")
    buf = mmap.mmap(-1, 4 * C.PAGE)
    buf[:] = os.urandom(len(buf))
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    real, calls = os.pwritev, []

    def short(fd_, bufs, offset):
        calls.append(offset)
        if len(calls) == 1:
            return real(fd_, [memoryview(bufs[0])[:C.PAGE]], offset) - 100  # 1 page written, 100 B "lost"
        return real(fd_, bufs, offset)
    monkeypatch.setattr(os, "pwritev", short)
    try:
        C._pwritev_all(fd, [memoryview(buf)], 0)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == bytes(buf)
