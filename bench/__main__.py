"""Every benchmark in one run: the numbers of docs/bench-results.md and the plots in docs/img/.

    .venv/bin/python -m bench                  # full run, about 12 minutes on a 2-CPU VM (ttft included; gpu where CUDA is)
    .venv/bin/python -m bench --quick          # about 6 minutes: every harness path, fewer rounds
    .venv/bin/python -m bench --only scale,scaleout --out /tmp/results    # a subset, elsewhere

Run from the repository root with the test and bench extras installed
(``pip install -e '.[test,bench]'``). Each benchmark runs as its own subprocess with its
``--json`` flag (and ``--quick`` in quick mode; ``--tiny`` passes through to the benchmarks that
have it): ``bench.core`` (arena and data channel against memcpy and raw sockets),
``bench.nvme`` (against raw O_DIRECT), ``bench.compression``, ``bench.cluster`` (against raw
redis-py), ``bench.scale`` (cost growth), ``bench.scaleout`` (three daemons and a Valkey
Cluster), ``bench.ttft`` when vLLM is importable, and ``bench.gpu`` when it exists and
``torch.cuda.is_available()``, and ``bench.gpu_store`` (a store on the GPU taken apart) with it
(each skipped otherwise, and said so). Each one measures
the machine's own limit beside kvtier in the same run; the section "Machine limits" of the
table collects them (memcpy, raw socket echo, raw O_DIRECT, raw redis-py).

Writes, under ``--out`` (default docs/ for a full run of every benchmark, bench-out/ for a quick
or partial one: the pages in docs/ are written from a full run, never from a part of one):

* ``bench-results.json``: git sha (``git rev-parse HEAD``), machine facts (CPU model, cores,
  RAM, kernel, Python, the disk under the NVMe benchmarks, /dev/shm), settings (mode and each
  benchmark's exact command, wall time and exit status) and each benchmark's figures (raw
  per-round samples longer than 100 values left out; the benchmark's own --json keeps them);
* ``bench-results.md``: one table: benchmark, measure, kvtier, baseline, ratio, target, holds?,
  command, and the condition that would make the number false;
* ``img/*.png`` through ``bench.plots`` (when matplotlib is installed);
* into docs/ only: ``bench-gpu-<gpu>.json`` and ``bench-gpu-store-<gpu>.json`` when the GPU
  benchmarks ran (the rows pages show on machines without a GPU), then every generated block
  of README.md and docs/*.md through ``bench.docs``: one full run rewrites every measured
  number the pages show.

A benchmark that fails is reported as failed, and the others still run; the exit status is
then 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.docs import DocError, num, refresh, row_cells

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHES = ("core", "nvme", "compression", "cluster", "scale", "scaleout", "ttft", "gpu", "gpu_store")
TINY_CAPABLE = ("scale", "scaleout")
TIMEOUT_S = {"full": 3600, "quick": 900, "tiny": 300}
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def gpu_available() -> tuple[bool, str]:
    if not (REPO / "bench" / "gpu.py").exists():
        return False, "bench/gpu.py not present"
    r = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"],
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    if r.returncode == 3:
        return False, "torch.cuda.is_available() is False"
    if r.returncode:
        return False, "torch is not importable"
    return True, ""


def vllm_available() -> tuple[bool, str]:
    if not (REPO / "bench" / "ttft.py").exists():
        return False, "bench/ttft.py not present"
    r = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, env=env(), cwd=REPO,
                       timeout=300)
    return (True, "") if r.returncode == 0 else (False, "vllm is not importable (see kvtier/vllm/SUPPORTED.md)")


def flags_of(name: str) -> str:
    r = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], capture_output=True, text=True, env=env(),
                       cwd=REPO, timeout=120)
    return r.stdout


def command(name: str, mode: str, json_path: str, md_path: str | None) -> list[str]:
    argv = [sys.executable, "-m", f"bench.{name}"]
    help_text = flags_of(name) if name == "gpu" else ""
    if mode == "tiny" and name in TINY_CAPABLE:
        argv.append("--tiny")
    elif mode in ("quick", "tiny") and (name != "gpu" or "--quick" in help_text):
        argv.append("--quick")
    argv += ["--json", json_path]
    if md_path and name != "core":            # bench.core prints its report; it has no --markdown
        argv += ["--markdown", md_path]
    return argv


def shown(argv: list[str]) -> str:
    """The command as a user types it: no interpreter path, no temporary output files."""
    out, skip = ["python"], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--json", "--markdown"):
            skip = True
            continue
        out.append(a)
    return " ".join(out)


def prune(x):
    """Drop raw sample lists (more than 100 numbers): summaries stay."""
    if isinstance(x, dict):
        return {k: prune(v) for k, v in x.items()
                if not (isinstance(v, list) and len(v) > 100 and all(isinstance(i, (int, float)) for i in v[:100]))}
    if isinstance(x, list):
        return [prune(v) for v in x]
    return x


# ---- machine facts ------------------------------------------------------------------------------

def machine() -> dict:
    def read(p: str) -> str:
        try:
            return pathlib.Path(p).read_text()
        except OSError:
            return ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) * KiB for ln in read("/proc/meminfo").splitlines()
                if ln.startswith("MemTotal")), 0)
    from bench import nvme
    base = nvme.default_base()
    disk = nvme.mount_of(base)
    st = os.statvfs(base)
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"git_sha": sha, "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "mem_total_gib": round(mem / GiB, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "disk": {**disk, "dir": base, "free_gib": round(st.f_bavail * st.f_frsize / GiB, 1)},
            "dev_shm_gib": round(shm.f_blocks * shm.f_frsize / GiB, 1) if shm else None,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# ---- rows of the table, per benchmark ---------------------------------------------------------

def row(measure, kvtier, unit, baseline=None, baseline_name="", ratio=None, target="", holds=None, false_if=""):
    return {"measure": measure, "kvtier": kvtier, "unit": unit, "baseline": baseline, "baseline_name": baseline_name,
            "ratio": ratio, "target": target, "holds": holds, "false_if": false_if}


def size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def rows_core(r: dict) -> list[dict]:
    out = []
    for a in r.get("arena", []):
        k, m = a["cases"]["kvtier_arena"]["gbps"]["median"], a["cases"]["memcpy"]["gbps"]["median"]
        big = a["block_bytes"] == 2 * MiB
        out.append(row(f"arena put+get, {size(a['block_bytes'])} blocks", k, "GB/s", m, "memcpy", k / m,
                       ">= 0.8x" if big else "", k / m >= 0.8 if big else None,
                       "the per-round fixed cost (3 control round trips waited for: Reserve, Commit, Acquire; 2 client xxh3 passes over bytes still in L2; the daemon's background re-hash on the same cores) changes against memcpy"))
    for i in r.get("inline", []):
        k, b = i["cases"]["kvtier_data"]["gbps"]["median"], i["cases"]["raw_echo"]["gbps"]["median"]
        out.append(row(f"data channel put+get over {i['transport']}, {size(i['block_bytes'])} blocks", k, "GB/s", b,
                       "raw socket echo", k / b, ">= 0.8x", k / b >= 0.8,
                       "a fresh connection lands on a slow or fast loopback path (the VM's variance)"))
    for lk in r.get("lookup", []):
        v = lk["ms"]["median"]
        echo = lk["round_trips_ms"]["grpc_echo_1byte"]["median"]
        out.append(row(f"Lookup of {lk['keys']} keys over {lk['transport']}, median", v, "ms", echo,
                       "bare gRPC echo, 1 byte", v / echo, "<= 2 ms", v <= 2.0,
                       "per-key work in the daemon or the client changes"))
    return out


def rows_nvme(r: dict) -> list[dict]:
    out = []
    ab = r.get("ab")
    if ab:
        for op in ("write", "read"):
            k, b = ab["cases"][f"kvtier {op}"], ab["cases"][f"raw {op}"]
            out.append(row(f"ColdTier {op}, 2 MiB blocks, 4 threads", k["median_gbs"], "GB/s", b["median_gbs"],
                           f"raw O_DIRECT {op}", k["ratio"], ">= 0.9x", k["ratio"] >= 0.9,
                           "the directory is on another device or O_DIRECT is not available"))
    from bench.nvme import ARENA_HUGE
    for c, arena in ((r.get("c"), ""), (r.get("c_huge"), ARENA_HUGE)):
        for policy, p in (c or {}).get("policies", {}).items():
            cs = p["cases"]
            for name in [k for k in cs if k == "spill" or k.startswith("read-back")]:
                base = cs[name].get("baseline") or ("raw write" if name == "spill" else "raw read")
                why = "other I/O shares the disk while it runs"
                if name.startswith("read-back"):
                    why += (", or the arena's tmpfs gives no 2 MiB pages (reads then bounce)" if arena else
                            ", or the arena gets 2 MiB pages (reads then land in place, no bounce copy)")
                if name.startswith("read-back 1 client"):
                    why += ", or one client's copy and checksum cannot keep the disk busy between batches"
                out.append(row(f"daemon {name} ({policy}{', ' + arena if arena else ''}), 2 MiB blocks",
                               cs[name]["median_gbs"], "GB/s", cs[base]["median_gbs"], f"{base} O_DIRECT",
                               cs[name]["ratio"], ">= 0.9x", cs[name]["ratio"] >= 0.9, why))
    sc = r.get("s")
    if sc:
        from bench.nvme import SCHED_CASES, TARGET_SCHED_RATIO
        raw = sc["cases"]["raw read"]["median_s"]
        n = f"{sc['blocks']} x {size(sc['block_bytes'])}"
        for k in SCHED_CASES:
            c = sc["cases"][k]
            main = k == "background: answer"
            out.append(row(f"scheduler Acquire of {n} only on NVMe, {k}", c["median_s"] * 1e3, "ms", raw * 1e3,
                           "raw O_DIRECT read of as many", c["ratio"],
                           f"<= {TARGET_SCHED_RATIO}x" if main else "", c["ratio"] <= TARGET_SCHED_RATIO if main else None,
                           "the answer waits for a read again (it would grow with the bytes)" if main else
                           "other I/O shares the disk while it runs"))
    e = r.get("e")
    if e:
        for n in sorted(e["sizes"], key=int):
            d = e["sizes"][n]["daemon"]["median_s"]
            big = int(n) == 100_000
            out.append(row(f"restart with {int(n):,} blocks on disk", d, "s", e["sizes"][n]["headers32"]["median_s"],
                           "headers read on 32 threads", None, "<= 5 s" if big else "", d <= 5.0 if big else None,
                           "the kernel's dentry, inode and page caches are cold"))
    return out


def rows_compression(r: dict) -> list[dict]:
    out = []
    for s in r.get("sets", []):
        if not s["name"].startswith("KV"):
            continue
        for codec in ("lz4", "shuffle-lz4"):
            c = s["codecs"].get(codec)
            if c:
                out.append(row(f"{codec} on {s['name']}: size ratio (compress {c['compress_gbs']:.2f} GB/s)",
                               c["ratio"], "x", s.get("entropy_bound_ratio"), "order-0 entropy bound",
                               c["ratio"] / s["entropy_bound_ratio"] if s.get("entropy_bound_ratio") else None,
                               false_if="real KV has other statistics than the synthetic tensors"))
    return out


def rows_cluster(r: dict) -> list[dict]:
    out = []
    last = r["runs"][-1]
    for topo, name in (("single", "single valkey-server"), ("cluster", "3-master Cluster")):
        for op, want in (("GET into", 2.5), ("GET", 2.5), ("PUT", 1.0)):
            rows_ = [x for x in last.get(topo, []) if x["op"] == op and x["case"].startswith("ClusterTier")]
            if not rows_:
                continue
            b = max(rows_, key=lambda x: x["ratio"])
            out.append(row(f"cluster tier {op}, 2 MiB, {name} (best setting: {b['case'][12:]})", b["median_gbs"],
                           "GB/s", b["median_gbs"] / b["ratio"], "best raw redis-py", b["ratio"], f">= {want}x",
                           b["ratio"] >= want, "the baseline and the tier ran against other servers or runs"))
        w = next((x for x in last.get(topo, []) if x["op"] == "GET" and x["case"].startswith("loopback TCP")), None)
        got = [x for x in last.get(topo, []) if x["op"] == "GET into" and x["case"].startswith("ClusterTier")]
        if w and got:
            b = max(got, key=lambda x: x["median_gbs"])
            out.append(row(f"cluster tier GET into, 2 MiB, {name}, against the bare wire (wire = "
                           f"{w['ratio']:.2f}x redis-py)", b["median_gbs"], "GB/s", w["median_gbs"],
                           "one loopback TCP stream, no protocol", b["median_gbs"] / w["median_gbs"],
                           false_if="the wire case and the tier ran in other rounds or on another loop"))
    return out


def rows_saved(r: dict) -> list[dict]:
    return list(r.get("rows", []))


ROWS = {"core": rows_core, "nvme": rows_nvme, "compression": rows_compression, "cluster": rows_cluster,
        "scale": rows_saved, "scaleout": rows_saved, "ttft": rows_saved, "gpu": rows_saved,
        "gpu_store": rows_saved}


def unwrap(name: str, saved: dict) -> dict:
    """Each benchmark's --json has its own envelope; return the figures."""
    if name == "cluster":
        return saved
    return saved.get("result", saved) if isinstance(saved, dict) else {}


def limits(results: dict) -> list[dict]:
    """The machine's own limits, as each benchmark measured them in this run."""
    out = []
    core = results.get("core")
    if core:
        for a in core.get("arena", []):
            out.append({"limit": f"memcpy (numpy), {size(a['block_bytes'])} blocks",
                        "value": a["cases"]["memcpy"]["gbps"]["median"], "unit": "GB/s", "benchmark": "core"})
        for i in core.get("inline", []):
            out.append({"limit": f"raw socket echo over {i['transport']}, {size(i['block_bytes'])} blocks",
                        "value": i["cases"]["raw_echo"]["gbps"]["median"], "unit": "GB/s", "benchmark": "core"})
    nv = results.get("nvme")
    if nv and nv.get("ab"):
        for op in ("write", "read"):
            out.append({"limit": f"raw O_DIRECT {op}, 2 MiB blocks, 4 threads",
                        "value": nv["ab"]["cases"][f"raw {op}"]["median_gbs"], "unit": "GB/s", "benchmark": "nvme"})
    cl = results.get("cluster")
    if cl:
        for topo in ("single", "cluster"):
            for op in ("GET", "PUT"):
                best = max((x for x in cl["runs"][-1].get(topo, []) if x["op"] == op and x["case"].startswith("redis")),
                           key=lambda x: x["median_gbs"], default=None)
                if best:
                    out.append({"limit": f"raw redis-py {op}, 2 MiB, {topo} ({best['case']})",
                                "value": best["median_gbs"], "unit": "GB/s", "benchmark": "cluster"})
            w = next((x for x in cl["runs"][-1].get(topo, []) if x["op"] == "GET" and x["case"].startswith("loopback")),
                     None)
            if w:
                out.append({"limit": f"one loopback TCP stream, no protocol, 32 MiB rounds (beside the {topo} runs)",
                            "value": w["median_gbs"], "unit": "GB/s", "benchmark": "cluster"})
    sc = results.get("scale")
    if sc and sc.get("index"):
        top = max(sc["index"]["sizes"], key=int)
        c = sc["index"]["sizes"][top]["calls_1"]
        out.append({"limit": "raw Unix socket echo, 16 bytes, round trip", "value": c["raw socket echo"]["median"],
                    "unit": "ms", "benchmark": "scale"})
        out.append({"limit": "bare gRPC echo over a Unix socket, 16 bytes", "value": c["bare gRPC echo"]["median"],
                    "unit": "ms", "benchmark": "scale"})
    return out


# ---- report -------------------------------------------------------------------------------------

def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Benchmark results", "",
             f"Generated by `{doc['command']}` (from the repository root; `bench/__main__.py` says what it runs), "
             f"{doc['started']}, {doc['wall_s']:.0f} s, at {m['git_sha'][:12]}. Do not edit: run it again.", "",
             f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, /dev/shm "
             f"{m['dev_shm_gib']} GiB, kernel {m['kernel']}, Python {m['python']}; disk under the NVMe benchmarks: "
             f"{m['disk']['device']} ({m['disk']['fstype']}) at {m['disk']['dir']}. Load average (1 min) "
             f"{m['load_avg_1m']} at start, {doc['load_avg_1m_end']} at end.", "",
             "Each benchmark measures the machine's own limit beside kvtier in the same run; ratio = kvtier / "
             "baseline (for times, above 1 is slower). Details, and what every case does: the benchmark's "
             "docstring and [benchmarks.md](benchmarks.md), [benchmarks-nvme.md](benchmarks-nvme.md), "
             "[benchmarks-cluster.md](benchmarks-cluster.md), [benchmarks-scale.md](benchmarks-scale.md), "
             "[benchmarks-vllm.md](benchmarks-vllm.md), [benchmarks-gpu.md](benchmarks-gpu.md); how the "
             "numbers got here: [history/](history/).", ""]
    st = doc["benchmarks"]
    lines += ["| benchmark | command | status | seconds |", "|---|---|---|---:|"]
    for name, b in st.items():
        lines.append(f"| {name} | `{b.get('command', '')}` | {b['status']} | {b.get('wall_s', 0):.0f} |")
    lines += ["", "## Machine limits measured in this run", "", "| limit | value | benchmark |", "|---|---:|---|"]
    for x in doc["limits"]:
        lines.append(f"| {x['limit']} | {num(x['value'])} {x['unit']} | {x['benchmark']} |")
    lines += ["", "## Results", "",
              "| benchmark | measure | kvtier | baseline | ratio | target | holds? | command | false if |",
              "|---|---|---:|---|---:|---|---|---|---|"]
    for x in doc["rows"]:
        kvtier, base, ratio, holds = row_cells(x)
        lines.append(f"| {x['benchmark']} | {x['measure']} | {kvtier} | {base} | {ratio} | {x['target']} | {holds} | "
                     f"`{x['command']}` | {x['false_if']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark's --quick (about 6 minutes)")
    ap.add_argument("--tiny", action="store_true", help="--tiny where a benchmark has it, else --quick")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--out", help="where to write the results (default docs/ for a full run of everything, "
                                  "else bench-out/)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    if set(names) - set(BENCHES):
        ap.error(f"unknown benchmarks: {', '.join(sorted(set(names) - set(BENCHES)))}")
    whole = mode == "full" and not args.only
    out = pathlib.Path(args.out) if args.out else REPO / ("docs" if whole else "bench-out")
    to_docs = out.resolve() == (REPO / "docs").resolve()
    if to_docs and not whole:
        ap.error("docs/ holds the last full run of every benchmark, which its pages are written from: "
                 "write a quick or partial run elsewhere (--out)")
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench" + ("" if mode == "full" else f" --{mode}") + (f" --only {args.only}" if args.only else "")
    doc = {"command": cmd, "mode": mode,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "benchmarks": {}, "results": {}, "rows": [], "limits": []}
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-all-")
    failed = False
    saved_gpu = {}
    try:
        for name in names:
            entry = doc["benchmarks"][name] = {}
            if name in ("gpu", "gpu_store", "ttft"):
                ok, why = vllm_available() if name == "ttft" else gpu_available()
                if not ok:
                    entry["status"] = f"skipped: {why}"
                    log(f"{name}: skipped ({why})")
                    continue
            jp, mp = os.path.join(tmp, f"{name}.json"), os.path.join(tmp, f"{name}.md")
            argv_ = command(name, mode, jp, mp)
            entry["command"] = shown(argv_)
            log(f"== {entry['command']}")
            b0 = time.monotonic()
            with open(os.path.join(tmp, f"{name}.log"), "w") as logf:
                try:
                    rc = subprocess.run(argv_, cwd=REPO, env=env(), stdout=logf, stderr=logf,
                                        timeout=TIMEOUT_S[mode]).returncode
                except subprocess.TimeoutExpired:
                    rc = -1
            entry["wall_s"] = round(time.monotonic() - b0, 1)
            if rc or not os.path.exists(jp):
                failed = True
                tail = pathlib.Path(tmp, f"{name}.log").read_text()[-3000:]
                entry["status"] = f"failed (exit {rc})"
                entry["log_tail"] = tail
                log(f"{name}: failed (exit {rc}):\n{tail}")
                continue
            entry["status"] = "ok"
            saved = json.loads(pathlib.Path(jp).read_text())
            figures = unwrap(name, saved)
            if name in ("gpu", "gpu_store"):
                saved_gpu[name] = saved
            doc["results"][name] = prune(figures)
            try:
                rs = ROWS[name](figures)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                rs = []
                entry["status"] = f"ok (no table rows: {type(e).__name__}: {e})"
            for x in rs:
                doc["rows"].append({"benchmark": name, "command": entry["command"], **x})
            log(f"{name}: ok in {entry['wall_s']:.0f} s, {len(rs)} rows")
        doc["limits"] = limits(doc["results"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    doc["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    (out / "bench-results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "bench-results.md").write_text(markdown(doc))
    log(f"wrote {out / 'bench-results.json'} and {out / 'bench-results.md'}")
    if not args.no_plots:
        try:
            from bench import plots
            for p in plots.plot_all(doc, out / "img"):
                log(f"wrote {p}")
        except ImportError as e:
            log(f"plots skipped: {e} (pip install -e '.[bench]')")
    if to_docs:
        for name, saved in saved_gpu.items():
            p = out / gpu_file(name, saved)
            p.write_text(json.dumps(saved, indent=1) + "\n")
            log(f"wrote {p}")
        try:
            for p in refresh():
                log(f"wrote the generated blocks of {p.relative_to(REPO)}")
        except DocError as e:
            log(f"pages not written: {e}")
            failed = True
    return 1 if failed else 0


def gpu_file(name: str, saved: dict) -> str:
    """bench-gpu-h100.json, bench-gpu-store-h200.json: one saved GPU run per benchmark and GPU model."""
    gpu = (saved.get("machine") or {}).get("gpu", "")
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", gpu)
    slug = m.group(1).lower() if m else (re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu")
    return f"bench-{name.replace('_', '-')}-{slug}.json"


if __name__ == "__main__":
    sys.exit(main())
