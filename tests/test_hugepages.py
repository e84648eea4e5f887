"""The arena on hugetlbfs (configs/h200-node.toml): the daemon starts, serves, and keeps its
RAM tier across a restart, with the slot table in /dev/shm (hugetlbfs holds only whole huge
pages). Needs a hugetlbfs mount with free huge pages: an existing one, or (as root, when the
kernel has free huge pages) a private mount made here; skipped otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from kvtier.arena import _mount_of, backing_of, huge_share, tmpfs_may_be_huge
from kvtier.client import Client
from kvtier.server import DaemonThread
from kvtier.slots import table_path

from conftest import make_config

NS = "huge"


def _free_hugepages() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.fixture
def hugetlbfs():
    if _free_hugepages() < 8:
        pytest.skip("no free 2 MiB huge pages (vm.nr_hugepages)")
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2:3] == ["hugetlbfs"]]
    for m in mounts:
        if os.access(m, os.W_OK):
            d = os.path.join(m, f"kvtier-test-{uuid.uuid4().hex[:8]}")
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    if os.geteuid() != 0:
        pytest.skip("no writable hugetlbfs mount, and not root to make one")
    mnt = tempfile.mkdtemp(prefix="kvt-huge-")
    if subprocess.run(["mount", "-t", "hugetlbfs", "none", mnt], capture_output=True).returncode:
        os.rmdir(mnt)
        pytest.skip("could not mount hugetlbfs")
    try:
        yield os.path.join(mnt, "kvtier")
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        os.rmdir(mnt)


def test_table_path_leaves_hugetlbfs_for_tmpfs():
    assert table_path("/dev/shm/kvtier/arena", "tmpfs") == "/dev/shm/kvtier/arena.slots"
    assert table_path("/dev/hugepages/kvtier/arena", "hugetlbfs") == \
        "/dev/shm/kvtier-slots.dev_hugepages_kvtier_arena"


def test_arena_on_hugetlbfs_serves_and_survives_a_restart(hugetlbfs):
    sock_dir = tempfile.mkdtemp(prefix="kvt-")
    cfg = make_config(sock_dir, hugetlbfs, ram={"capacity": "8MiB"},
                      nvme={"dirs": [os.path.join(sock_dir, "nvme")], "capacity": "64MiB"})
    slots = table_path(cfg.arena_path, "hugetlbfs")
    data = [(bytes([i]) * 16, os.urandom(100_000 + i)) for i in range(8)]
    try:
        with DaemonThread(cfg) as d:
            assert backing_of(os.path.dirname(cfg.arena_path)) == "hugetlbfs"
            assert os.path.exists(slots)
            assert d.daemon.store.cold.bounce_reads is False  # "auto": huge pages already, reads land in place
            c = Client(d.address)
            c.put_many(NS, data)
            assert c.path == "arena"
            assert c.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
        with DaemonThread(cfg) as d:
            tiers, _ = c.lookup(NS, [k for k, _ in data])
            assert tiers == [1] * len(data)  # the RAM tier came back from the huge pages
            assert c.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
        c.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
        if os.path.exists(slots):
            os.unlink(slots)


def test_huge_share_reads_the_mapping_that_starts_at_the_arena(tmp_path):
    """Arena.huge_pages on tmpfs: the kernel's own account of the mapping's 2 MiB pages."""
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "00400000-00800000 r-xp 00000000 08:02 173521 /usr/bin/x\nRss: 4096 kB\nFilePmdMapped: 2048 kB\nVmFlags: rd ex\n"
        "7f5000000000-7f5004000000 rw-s 00000000 00:1a 5 /dev/shm/a\nRss: 65536 kB\nShmemPmdMapped: 61440 kB\n"
        "FilePmdMapped: 0 kB\nVmFlags: rd wr sh\n"
        "7f6000000000-7f6000400000 rw-s 00000000 00:1b 6 /mnt/h/a\nRss: 4096 kB\nShmemPmdMapped: 0 kB\n"
        "FilePmdMapped: 4096 kB\nVmFlags: rd wr sh\n")
    assert huge_share(0x7f5000000000, str(smaps)) == 61440 / 65536
    assert huge_share(0x7f6000000000, str(smaps)) == 1.0
    assert huge_share(0x400000, str(smaps)) == 0.5         # its start is written zero-padded
    assert huge_share(0x7f5000001000, str(smaps)) == 0.0   # no mapping starts there
    assert huge_share(0x7f5000000000, str(tmp_path / "absent")) == 0.0


def test_a_tmpfs_may_give_huge_pages_by_its_mount_options_or_when_forced(tmp_path):
    """The smaps walk (every page table entry of the arena) is only taken where it can say yes."""
    if any(o.startswith("huge=") for o in _mount_of(str(tmp_path))[1]):
        pytest.skip("the test directory's own mount names a huge= option")
    shmem = tmp_path / "shmem_enabled"
    for chosen, huge in (("never", False), ("advise", False), ("force", True), ("deny", False)):
        shmem.write_text(" ".join(f"[{w}]" if w == chosen else w
                                  for w in ("always", "within_size", "advise", "never", "deny", "force")) + "\n")
        assert tmpfs_may_be_huge(str(tmp_path), str(shmem)) is huge, chosen
    assert tmpfs_may_be_huge(str(tmp_path), str(tmp_path / "absent")) is False
