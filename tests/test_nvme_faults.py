"""The NVMe tier against its filesystem changing under it: space taken by the files of an earlier
run, a directory removed or unmounted, a capacity lowered between runs, a filesystem that refuses
to remove files. Faults are made without mounts: a fake ``statvfs``, removed directories and an
injected ``os.unlink`` failure, so these run anywhere.
"""
from __future__ import annotations

import errno
import glob
import os
import random
import shutil

from kvtier import cold as C
from kvtier import record as R
from kvtier.client import Client
from kvtier.cold import ColdTier
from kvtier.server import DaemonThread
from test_cold import NS as COLD_NS, key as cold_key, read, write
from test_tiering import blob, key, nvme, wait_for

KiB, MiB = 1024, 1024 * 1024
NS = "nvme-faults"


def block_files(d) -> list[str]:
    return sorted(glob.glob(os.path.join(str(d), "??", "*" + C.SUFFIX)))


def ckey(i: int) -> bytes:
    return random.Random(f"fault-{i}").randbytes(16)


def disk_bytes(d) -> int:
    return sum(os.path.getsize(p) for p in block_files(d))


def test_automatic_capacity_counts_the_files_of_the_last_run(tmp_path, monkeypatch):
    """nvme.capacity = 0 takes 90% of the free space; after a restart the tier's own files are not
    free space any more, and must not shrink the capacity below them (which would evict them)."""
    nv = tmp_path / "nvme0"
    size = 7 * MiB  # a small virtual filesystem: its free space is what our files leave
    real = os.statvfs

    class St:
        def __init__(self, free: int):
            self.f_bavail, self.f_frsize, self.f_bsize = free // 4096, 4096, 4096

    def statvfs(p):
        if os.path.abspath(str(p)).startswith(str(nv)):
            return St(size - disk_bytes(nv))
        return real(p)

    monkeypatch.setattr(os, "statvfs", statvfs)
    cfg = {"ram": {"capacity": "8MiB", "policy": "lru", "persist": False},
           "nvme": {"dirs": [str(nv)], "capacity": 0, "io_threads": 2, "write_policy": "commit"}}
    from conftest import _dirs, make_config
    sock_dir, arena_dir = _dirs()
    d = DaemonThread(make_config(sock_dir, arena_dir, **cfg)).start()
    try:
        with Client(d.address) as c:
            for i in range(10):
                c.put(NS, key(i), blob(512 * KiB, i))
            wait_for(lambda: nvme(c).blocks == 10 and nvme(c).queued_bytes == 0, what="10 blocks on NVMe")
            assert nvme(c).evictions == 0
        d.stop()
        d = DaemonThread(d.cfg).start()
        with Client(d.address) as c:
            t = nvme(c)
            assert t.blocks == 10 and t.capacity_bytes >= t.used_bytes, t
            c.put(NS, key(10), blob(512 * KiB, 10))
            wait_for(lambda: nvme(c).blocks == 11 and nvme(c).queued_bytes == 0, what="the new block on NVMe",
                     show=lambda: nvme(c))
            assert nvme(c).evictions == 0
            for i in range(11):
                assert c.get(NS, key(i)) == blob(512 * KiB, i)
    finally:
        d.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


def test_a_removed_directory_is_skipped_not_created_again(tmp_path):
    """A directory removed while the daemon runs (or a drive unmounted under it) is not created
    again, which would put the blocks on whatever filesystem holds its parent: writes there fail,
    the directory is skipped, the other one takes the blocks, and it is used again once restored."""
    gone, fine = tmp_path / "mnt" / "kv", tmp_path / "fine"
    tier = ColdTier([(str(gone), 1 << 30), (str(fine), 1 << 30)], direct_io="off", retry_s=60)
    first = cold_key(0, dir_of=0)
    assert write(tier, first, b"a" * 5000)
    shutil.rmtree(gone)
    # keys spread over both directories: the first write to the removed one fails, then it is skipped
    landed = [i for i in range(1, 11) if write(tier, ckey(i), bytes([i]) * 5000)]
    assert len(landed) == 9 and not gone.exists()
    s = tier.snapshot()
    assert s["dirs"][0]["degraded"] and s["dirs"][0]["degraded_reason"] == os.strerror(errno.ENOENT), s
    assert s["io_errors"] == 1 and len(block_files(fine)) == 9
    assert all(read(tier, ckey(i)) == bytes([i]) * 5000 for i in landed)
    assert read(tier, first) is None  # its file went with the directory: a plain miss
    gone.mkdir()
    tier.dirs[0].degraded_until = 0  # the retry time is up
    for i in range(20, 40):
        assert write(tier, ckey(i), b"c" * 5000)
    assert block_files(gone) and not tier.snapshot()["dirs"][0]["degraded"]


def test_a_directory_on_another_filesystem_than_at_start_is_skipped(tmp_path):
    """A drive unmounted from under its directory leaves the mount point, on the root filesystem:
    the tier sees the directory's device change and writes nothing there."""
    d0 = tmp_path / "d0"
    tier = ColdTier([(str(d0), 1 << 30)], direct_io="off", retry_s=60)
    tier.dirs[0].dev += 1  # as if what was mounted there is gone
    assert not write(tier, ckey(1), b"x" * 5000)
    s = tier.snapshot()
    assert s["dirs"][0]["degraded"] and s["io_errors"] == 1 and s["used_bytes"] == 0
    assert os.listdir(d0) == []


def test_a_capacity_lowered_between_runs_is_kept_from_the_start(tmp_path):
    """Files beyond a capacity lowered since the last run are evicted by the startup scan, oldest
    first, so the bound and the used bytes (those of the files on disk) hold before any write."""
    d0 = tmp_path / "d0"
    tier = ColdTier([(str(d0), 16 * MiB)], direct_io="off")
    for i in range(6):
        assert write(tier, ckey(i), bytes([i]) * MiB)
        os.utime(tier._path(0, COLD_NS, ckey(i)), (1000 + i, 1000 + i))  # the order of age, whatever the clock
    tier2 = ColdTier([(str(d0), 3 * MiB + 3 * 8192)], direct_io="off")
    assert tier2.scan() == 3
    s = tier2.snapshot()
    assert s["used_bytes"] <= s["capacity_bytes"] and s["used_bytes"] == disk_bytes(d0) and s["blocks"] == 3
    assert [tier2.contains(COLD_NS, ckey(i)) for i in range(6)] == [False] * 3 + [True] * 3
    assert all(read(tier2, ckey(i)) == bytes([i]) * MiB for i in range(3, 6))


def test_a_corrupt_file_that_cannot_be_removed_is_still_a_miss(tmp_path, monkeypatch):
    """On a filesystem gone read-only, a corrupt file found by a read or by the check after a
    restart cannot be removed: still a counted miss, never an exception out of the tier."""
    d0 = tmp_path / "d0"
    tier = ColdTier([(str(d0), 1 << 30)], direct_io="off")
    for i in range(2):
        assert write(tier, ckey(i), bytes([i + 1]) * 8192)
    for p in block_files(d0):
        with open(p, "r+b") as f:  # a flipped payload bit, and a flipped header bit
            f.seek(R.PAGE + 100 if p == tier._path(0, COLD_NS, ckey(0)) else 20)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 1]))
    after = ColdTier([(str(d0), 1 << 30)], direct_io="off")
    assert after.scan() == 2

    def unlink(p, *a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)

    monkeypatch.setattr(os, "unlink", unlink)
    assert read(tier, ckey(0)) is None
    assert after.verify_pending(threads=1) == (2, 1)  # headers only: the flipped header bit
    s, s2 = tier.snapshot(), after.snapshot()
    assert s["checksum_failures"] == 1 and s["io_errors"] == 1 and s["blocks"] == 1
    assert s2["corrupt_removed"] == 1 and s2["io_errors"] == 1 and s2["blocks"] == 1


def test_a_file_that_cannot_be_opened_is_a_counted_miss(tmp_path, monkeypatch):
    """A failing drive (EIO on open) makes a read a miss counted as an I/O error, not an exception
    out of the tier; the block is served again once the drive answers."""
    d0 = tmp_path / "d0"
    tier = ColdTier([(str(d0), 1 << 30)], direct_io="off")
    assert write(tier, ckey(1), b"z" * 8192)
    real = os.open

    def failing_open(p, *a, **kw):
        if str(p).endswith(C.SUFFIX):
            raise OSError(errno.EIO, os.strerror(errno.EIO), p)
        return real(p, *a, **kw)

    monkeypatch.setattr(os, "open", failing_open)
    assert read(tier, ckey(1)) is None
    s = tier.snapshot()
    assert s["io_errors"] == 1 and s["misses"] == 1 and s["blocks"] == 1
    monkeypatch.undo()
    assert read(tier, ckey(1)) == b"z" * 8192
