"""bench.nvme part C under write_policy "evict", at a small size: every read-back case is
reported under its own condition and against its own baseline (seconds of work, not a
measurement)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

from bench import nvme
from bench.__main__ import rows_nvme


def test_evict_read_back_is_reported_per_condition_and_client_count(tmp_path):
    path = tempfile.mkdtemp(prefix="kvtier-test-bench-nvme-", dir=nvme.default_base())
    try:
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(nvme.THREADS) as pool:
            device = nvme.machine(path)["device"]
            c = nvme.part_c(path, str(tmp_path), 2, 96 * nvme.BLOCK, ["evict"], nvme.Sources(), pool, stack,
                            device, 0.0, ram="80MiB")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    cs = c["policies"]["evict"]["cases"]
    written = [f"read-back 1 client, {nvme.READ_WRITTEN}", f"read-back {nvme.THREADS} clients, {nvme.READ_WRITTEN}"]
    clean = [f"read-back 1 client, {nvme.READ_CLEAN}", f"read-back {nvme.THREADS} clients, {nvme.READ_CLEAN}"]
    for name in written + clean:
        assert cs[name]["rounds"] == 1 and cs[name]["median_gbs"] > 0   # each count read first in one round
    for name in written:
        assert cs[name]["baseline"] == nvme.RAW_READ_WRITE
        assert abs(cs[name]["ratio"] - cs[name]["median_gbs"] / cs[nvme.RAW_READ_WRITE]["median_gbs"]) < 1e-9
    for name in clean:
        assert cs[name]["baseline"] == "raw read"
    # the condition each case is named for, as the daemon counted it: in the first half every
    # block read back evicted one that had to be written, in the second half none did
    for w, cl in zip(written, clean):
        assert cs[w]["written_per_block"] >= 0.9 and cs[cl]["written_per_block"] <= 0.1, cs
    rows = rows_nvme({"c": c})
    measures = [r["measure"] for r in rows]
    assert measures == ["daemon spill (evict), 2 MiB blocks"] + [f"daemon {n} (evict), 2 MiB blocks"
                                                                  for n in written + clean]
    assert all(r["target"] == ">= 0.9x" for r in rows)
    res = {"machine_start": nvme.machine(str(tmp_path)), "machine_end": nvme.machine(str(tmp_path)), "c": c}
    text = nvme.markdown(res, "python -m bench.nvme --parts c --policies evict")
    assert "every promotion writes its victim" in text and "Blocks written (victims copied out)" in text
    assert f"| {nvme.RAW_READ_WRITE} |" in text and f"| {written[0]} |" in text
    # what the daemon said of its arena: reads bounce exactly where its pages are 4 KiB
    assert c["arena_backing"] == "tmpfs" and c["bounce_reads"] is (not c["huge_pages"])
    assert ("4 KiB pages, NVMe reads through huge-page buffers" if c["bounce_reads"] else
            "2 MiB pages, NVMe reads straight into the arena") in text
    # the second arena's run is reported apart, or why it did not run
    huge = {**c, "huge_pages": True, "bounce_reads": False, "arena_how": "a tmpfs of 8 MiB mounted for the run"}
    rows = rows_nvme({"c": c, "c_huge": huge})
    assert [r["measure"] for r in rows[len(measures):]] == [
        m.replace("(evict)", f"(evict, {nvme.ARENA_HUGE})") for m in measures]
    text = nvme.markdown({**res, "c_huge": huge}, "python -m bench.nvme --parts c --policies evict")
    assert f'write_policy = "evict", {nvme.ARENA_HUGE}' in text and "a tmpfs of 8 MiB mounted for the run" in text
    text = nvme.markdown({**res, "c_huge": {"skipped": "not root"}}, "python -m bench.nvme --parts c")
    assert f"## C: {nvme.ARENA_HUGE}: not run" in text and "not root." in text
    assert len(rows_nvme({"c": c, "c_huge": {"skipped": "not root"}})) == len(measures)


def test_a_read_back_is_timed_until_the_victims_it_wrote_have_landed(monkeypatch):
    """Under "evict" the promotions' victims are written behind the gets: the read-back round
    waits for the write queue to empty, so those writes count in its time and not in the next
    case's."""
    import time
    from types import SimpleNamespace

    queue = [3 * nvme.BLOCK, 2 * nvme.BLOCK, nvme.BLOCK, 0]   # what Stats says, call after call
    polls = []

    def stats(client, name):
        if name != "nvme":
            raise AssertionError(name)
        polls.append(time.perf_counter())
        q = queue.pop(0) if len(polls) > 1 and queue else 0   # the first call: demotions before
        return SimpleNamespace(queued_bytes=q, demotions=len(polls))

    class Fake:
        def lookup(self, ns, keys):
            return [2] * len(keys), None

        def get_many(self, ns, keys, into=None):
            return [b"x"] * len(keys)

    monkeypatch.setattr(nvme, "tier_stats", stats)
    rb = nvme.readback_round(Fake(), SimpleNamespace(cpu_seconds=lambda: 0.0), [b"k%d" % i for i in range(20)], 1,
                             [None])
    assert queue == [], "polled until the queue was empty"
    # polls[0] is before the clock starts, polls[1] the first wait after the gets, polls[-1] after it stops
    assert rb["blocks"] == 20 and rb["seconds"] >= polls[-2] - polls[1]


def test_the_disk_view_of_a_read_case_comes_from_diskstats_counters():
    """Requests per block, KiB per request, reads in flight (Little's law over the milliseconds
    spent reading) and the busy share, from two /proc/diskstats samples; the report's table."""
    v = nvme.disk_view((100, 0, 1000, 5000), (164, 64 * 4096, 1000 + 3 * 400, 5000 + 360), 64, 0.4)
    assert v == {"requests_per_block": 1.0, "kib_per_request": 2048.0, "in_flight": 3.0, "busy": 0.9}
    assert nvme.disk_view((1, 1, 1, 1), (1, 1, 1, 1), 64, 0.4) is None   # the device did not move
    half = dict(v, busy=0.5, in_flight=1.0)
    assert nvme.median_view([v, half, v]) == v
    lines = nvme.disk_lines({"raw read": {"disk": v}, "read-back 1 client": {"disk": half}, "spill": {}})
    assert "| raw read | 1.00 | 2,048 | 3.0 | 90% |" in lines and "| read-back 1 client | 1.00 | 2,048 | 1.0 | 50% |" in lines
    assert nvme.disk_lines({"spill": {}}) == []
    got = nvme.disk_reads(nvme.machine(nvme.default_base())["device"])
    assert len(got) == 4 and all(x >= 0 for x in got)


def test_the_scheduler_part_times_both_acquires_against_a_raw_read(tmp_path):
    path = tempfile.mkdtemp(prefix="kvtier-test-bench-nvme-", dir=nvme.default_base())
    try:
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(nvme.THREADS) as pool:
            device = nvme.machine(path)["device"]
            s = nvme.part_sched(path, str(tmp_path), 1, nvme.Sources(), pool, stack, device, ram="80MiB", n=8)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    cs = s["cases"]
    assert s["blocks"] == 8 and set(cs) == {"raw read", *nvme.SCHED_CASES}
    for k in nvme.SCHED_CASES:
        assert cs[k]["runs"] == 1 and cs[k]["median_s"] > 0
        assert abs(cs[k]["ratio"] - cs[k]["median_s"] / cs["raw read"]["median_s"]) < 1e-9
    # the answer that did not wait came before the bytes it announced were in RAM
    assert cs["background: answer"]["median_s"] < cs["background: bytes in RAM"]["median_s"]
    rows = rows_nvme({"s": s})
    assert [r["measure"] for r in rows] == [f"scheduler Acquire of 8 x 2 MiB only on NVMe, {k}"
                                            for k in nvme.SCHED_CASES]
    assert [r["target"] for r in rows] == ["<= 0.1x", "", ""]
    assert rows[0]["holds"] == (cs["background: answer"]["ratio"] <= 0.1)
    res = {"machine_start": nvme.machine(str(tmp_path)), "machine_end": nvme.machine(str(tmp_path)), "s": s}
    text = nvme.markdown(res, "python -m bench.nvme --parts s")
    assert "## S: the scheduler's Acquire of a prefix only on NVMe" in text
    assert "| background: answer |" in text and "| raw O_DIRECT read |" in text
