"""kvtier.hugepages (the block index on transparent 2 MiB pages): which mappings get
collapsed, how a pass reacts to the kernel's answers, and (where the kernel has MADV_COLLAPSE) that a dense mapping really ends
up on huge pages while a sparse one is left alone."""
import errno
import mmap
import threading
import urllib.request

import pytest

from kvtier.arena import _address
from kvtier.client import Client
from kvtier.config import from_dict
from kvtier.errors import ConfigError
from kvtier.hugepages import HUGE, MADV_COLLAPSE, Collapser, huge_bytes, parse_smaps

MiB = 1 << 20
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux

def _mapping(span: str, perms: str, where: str, size_kb: int, rss_kb: int, huge_kb: int, flags: str) -> str:
    """One mapping as /proc/PID/smaps shows it (the fields the collapser reads)."""
    return (f"{span} {perms} {where}\nSize: {size_kb:>14} kB\nRss: {rss_kb:>15} kB\n"
            f"AnonHugePages: {huge_kb:>5} kB\nVmFlags: {flags}\n")


ANON = "00000000 00:00 0"
SMAPS = "".join([
    _mapping("55d000000000-55d000a00000", "rw-p", ANON + " [heap]", 10240, 10240, 0, "rd wr mr mw me ac"),
    _mapping("7f0000000000-7f0001000000", "rw-p", ANON, 16384, 15360, 2048, "rd wr mr mw me ac"),
    _mapping("7f0002000000-7f0002800000", "rw-p", ANON, 8192, 64, 0, "rd wr mr mw me ac"),
    _mapping("7f0003000000-7f0003400000", "rw-s", "00000000 00:19 42 /dev/shm/kvtier-0/arena", 4096, 4096, 0,
             "rd wr sh mr mw me ms"),
    _mapping("7f0004000000-7f0004400000", "rw-p", "00000000 08:01 7 /usr/lib/libfoo.so", 4096, 4096, 0,
             "rd wr mr mw me ac"),
    _mapping("7f0005000000-7f0005400000", "rw-p", ANON, 4096, 4096, 0, "rd wr mr mw me ac nh"),
    _mapping("7f0006000000-7f0006400000", "rw-p", ANON, 4096, 4096, 4096, "rd wr mr mw me ac"),
    _mapping("7f0007100000-7f0007300000", "rw-p", ANON, 2048, 2048, 0, "rd wr mr mw me ac"),
])


def test_only_dense_private_anonymous_memory_not_yet_huge_is_chosen():
    maps = parse_smaps(SMAPS)
    assert len(maps) == 8
    chosen = [m.start for m in maps if m.worth_collapsing()]
    # the heap and the dense anonymous mapping; not: the sparse one (a thread stack), the shared
    # arena, a file, one marked MADV_NOHUGEPAGE, one already huge, one that holds no whole 2 MiB page
    assert chosen == [0x55d000000000, 0x7f0000000000]
    heap = maps[0]
    assert (heap.size, heap.rss, heap.huge) == (10 * MiB, 10 * MiB, 0)
    assert maps[7].range() == (0x7f0007200000, 0x7f0007200000)  # unaligned: no whole huge page inside


def _collapser(answers=None, probe_answer=0, **kw):
    """A Collapser whose madvise is recorded and answered from `answers` (address -> errno);
    its first call, on a scratch mapping of its own, is the probe (answered probe_answer)."""
    calls = []

    def advise(addr, length, advice):
        if not probed:
            probed.append(addr)
            return probe_answer
        calls.append((addr, length, advice))
        return (answers or {}).get(addr, 0)

    probed: list = []
    return Collapser(1.0, advise=advise, **kw), calls


def test_a_pass_collapses_the_aligned_part_of_each_chosen_mapping(tmp_path):
    p = tmp_path / "smaps"
    p.write_text(SMAPS)
    c, calls = _collapser(smaps=str(p))
    assert c.run_once() == 10 * MiB + 16 * MiB
    assert calls == [(0x55d000000000, 10 * MiB, MADV_COLLAPSE), (0x7f0000000000, 16 * MiB, MADV_COLLAPSE)]
    assert (c.runs, c.collapsed_bytes, c.unsupported) == (1, 26 * MiB, "")


def test_a_busy_range_is_tried_again_a_refusing_one_skipped_and_a_kernel_without_it_stops_the_passes(tmp_path):
    p = tmp_path / "smaps"
    p.write_text(SMAPS)
    c, calls = _collapser(answers={0x55d000000000: errno.EAGAIN}, smaps=str(p))
    assert c.run_once() == 16 * MiB and not c.unsupported
    assert c.run_once() == 16 * MiB and len(calls) == 4      # EAGAIN: asked again
    c2, calls2 = _collapser(answers={0x55d000000000: errno.EINVAL}, smaps=str(p))
    assert c2.run_once() == 16 * MiB and not c2.unsupported  # one mapping refused, the other collapsed
    assert c2.run_once() == 16 * MiB
    assert [a for a, _, _ in calls2] == [0x55d000000000, 0x7f0000000000, 0x7f0000000000]  # not asked again
    c3, calls3 = _collapser(smaps=str(p), probe_answer=errno.EINVAL)  # no MADV_COLLAPSE at all
    assert c3.run_once() == 0 and "EINVAL" in c3.unsupported and calls3 == []
    assert c3.tick() is False  # never again
    c4, calls4 = _collapser(answers={0x55d000000000: errno.EPERM}, smaps=str(p))
    c4.run_once()
    assert "EPERM" in c4.unsupported


def test_tick_runs_a_pass_on_its_own_thread_once_per_interval(tmp_path):
    p = tmp_path / "smaps"
    p.write_text(SMAPS)
    now = [100.0]
    started = threading.Event()
    release = threading.Event()

    def advise(addr, length, advice):
        started.set()
        release.wait(5)
        return 0

    c = Collapser(10.0, clock=lambda: now[0], smaps=str(p), advise=advise)
    assert c.tick() is False           # not yet due
    now[0] = 110.0
    assert c.tick() is True
    assert started.wait(5)             # the pass is running and tick() did not wait for it
    now[0] = 125.0
    assert c.tick() is False           # due, but the last pass still runs
    release.set()
    c.join(5)
    assert c.runs == 1 and c.collapsed_bytes == 26 * MiB
    now[0] = 136.0
    assert c.tick() is True
    c.join(5)
    assert c.runs == 2
    assert Collapser(0.0, smaps=str(p)).tick() is False  # 0 = never


def test_an_unreadable_smaps_stops_the_passes(tmp_path):
    c = Collapser(1.0, smaps=str(tmp_path / "missing"))
    assert c.run_once() == 0 and "cannot read" in c.unsupported


def _mapping_huge_bytes(addr: int) -> int:
    for m in parse_smaps(open("/proc/self/smaps").read()):
        if m.start <= addr < m.end:
            return m.huge
    raise AssertionError("mapping not found")


def test_a_dense_mapping_ends_up_on_huge_pages_and_a_sparse_one_does_not():
    size = 16 * MiB
    # different flags, so the kernel does not merge the two into one mapping of half density
    dense = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    sparse = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for off in range(0, len(dense), 4096):
            dense[off] = 1
        sparse[0] = 1
        addr_dense, addr_sparse = _address(dense), _address(sparse)
        c = Collapser(1.0)
        c.run_once()
        if c.unsupported:
            pytest.skip(c.unsupported)
        got = _mapping_huge_bytes(addr_dense)
        if got == 0:
            pytest.skip("the kernel collapsed nothing (no free huge pages?)")
        assert got >= size - HUGE           # the aligned 2 MiB ranges of the dense mapping
        assert _mapping_huge_bytes(addr_sparse) == 0
        assert bytes(dense[:4]) == b"\x01\0\0\0" and dense[4096] == 1  # contents kept
        assert huge_bytes() >= got
    finally:
        dense.close()
        sparse.close()


def test_the_setting_is_checked():
    with pytest.raises(ConfigError, match="huge_pages_s"):
        from_dict({"server": {"huge_pages_s": -1}})


def test_the_daemon_runs_passes_and_reports_them(make_daemon):
    d = make_daemon(server={"huge_pages_s": 0.2}, metrics={"listen": "127.0.0.1:0"})
    with Client(d.address) as c:
        c.put_many("ns", [(bytes([i]) * 16, b"v" * 64) for i in range(50)])
    hp = d.daemon.huge_pages
    for _ in range(50):
        if hp.runs >= 2 or hp.unsupported:
            break
        threading.Event().wait(0.1)
    assert hp.runs >= 2 or hp.unsupported
    with urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "kvtier_huge_page_bytes " in text and "kvtier_huge_page_collapsed_bytes_total " in text
