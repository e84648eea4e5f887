"""PNG plots of a ``python -m bench`` run, for the README and docs/.

    .venv/bin/python -m bench.plots docs/bench-results.json --out docs/img    # redraw from saved results
    .venv/bin/python -m bench.plots --scale s.json --scaleout o.json --out docs/img   # from single benchmarks' --json

``python -m bench`` calls this at the end of its run. Needs matplotlib (the ``bench`` extra).
Each plot is drawn only when the run has its figures:

* ``scaleout-hit-rate.png``: cumulative chunk hit rate over the trace of ``bench.scaleout``,
  with and without the cluster tier, session affinity, and the trace's ideal;
* ``throughput-block-size.png``: arena put+get GB/s against block size (``bench.scale``,
  1 client process), beside memcpy in as many processes;
* ``throughput-clients.png``: the same against the number of client processes, per block size;
* ``latency-index-size.png``: Lookup / Acquire / Reserve median latency against blocks held;
* ``cluster-value-size.png``: cluster tier GET into / PUT against value size, beside redis-py.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

KiB, MiB = 1 << 10, 1 << 20
DPI = 100
SIZE = (6.4, 3.8)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})   # no version stamp: reruns differ only in data
    _plt().close(fig)
    return path


def _footer(ax, doc: dict, bench: str) -> None:
    b = doc["benchmarks"].get(bench, {})
    cmd, sha = b.get("command", f"python -m bench.{bench}"), b.get("git_sha", doc["machine"]["git_sha"])
    ax.annotate(f"{cmd}  ({sha[:10]}, {doc['machine']['cpu_count']} CPUs)",
                xy=(0, 0), xycoords="figure fraction", xytext=(4, 3), textcoords="offset points",
                fontsize=7, color="0.4")


def hit_rate(doc: dict, out: pathlib.Path) -> pathlib.Path | None:
    so = doc["results"].get("scaleout")
    if not so or not so.get("configs"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    names = {"cluster": "round robin, cluster tier on", "local": "round robin, each daemon alone",
             "sticky": "session affinity, no cluster tier"}
    for name, x in so["configs"].items():
        hits = chunks = 0
        ys = []
        for _, _, c, h, _ in x["per_request"]:
            hits, chunks = hits + h, chunks + c
            ys.append(hits / max(1, chunks))
        ax.plot(range(1, len(ys) + 1), ys, label=f"{names.get(name, name)}: {x['chunk_hit_rate']:.2f}")
    ax.axhline(so["trace"]["chunk_hit_rate"], color="0.5", ls=":",
               label=f"ideal (one unbounded store): {so['trace']['chunk_hit_rate']:.2f}")
    s = so["settings"]
    ax.set(xlabel="request (trace order)", ylabel="cumulative chunk hit rate", ylim=(0, 1),
           title=f"{s['daemons']} daemons, {s['conversations']} conversations x {s['turns']} turns")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _footer(ax, doc, "scaleout")
    return _save(fig, out / "scaleout-hit-rate.png")


def _clients(doc: dict):
    sc = doc["results"].get("scale")
    return sc["clients"] if sc and sc.get("clients") else None


def throughput_block_size(doc: dict, out: pathlib.Path) -> pathlib.Path | None:
    cs = _clients(doc)
    if not cs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    blocks = sorted(cs["blocks"], key=int)
    counts = sorted({int(n) for b in blocks for n in cs["blocks"][b]})
    for n in counts:
        have = [b for b in blocks if str(n) in cs["blocks"][b]]
        xs = [int(b) for b in have]
        line, = ax.plot(xs, [cs["blocks"][b][str(n)]["kvtier"]["gbps"] for b in have], "o-",
                        label=f"kvtier, {n} client{'s' if n > 1 else ''}")
        ax.plot(xs, [cs["blocks"][b][str(n)]["memcpy"]["gbps"] for b in have], "x--", color=line.get_color(),
                alpha=0.5, label=f"memcpy, {n} process{'es' if n > 1 else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(b) for b in blocks], [_label(int(b)) for b in blocks])
    ax.set(xlabel="block size", ylabel="GB/s (put + get, each byte once per direction)",
           title="Arena path throughput against block size")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _footer(ax, doc, "scale")
    return _save(fig, out / "throughput-block-size.png")


def throughput_clients(doc: dict, out: pathlib.Path) -> pathlib.Path | None:
    cs = _clients(doc)
    if not cs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    for b in sorted(cs["blocks"], key=int):
        by_n = cs["blocks"][b]
        ns = sorted(by_n, key=int)
        line, = ax.plot([int(n) for n in ns], [by_n[n]["kvtier"]["gbps"] for n in ns], "o-",
                        label=f"kvtier, {_label(int(b))} blocks")
        ax.plot([int(n) for n in ns], [by_n[n]["memcpy"]["gbps"] for n in ns], "x--", color=line.get_color(),
                alpha=0.5, label=f"memcpy, {_label(int(b))} blocks")
    ax.set_xscale("log", base=2)
    ns = sorted({int(n) for b in cs["blocks"].values() for n in b})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(xlabel=f"concurrent client processes ({doc['machine']['cpu_count']} CPUs)", ylabel="GB/s, all clients",
           title="Arena path throughput against concurrent clients")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _footer(ax, doc, "scale")
    return _save(fig, out / "throughput-clients.png")


def latency_index(doc: dict, out: pathlib.Path) -> pathlib.Path | None:
    sc = doc["results"].get("scale")
    if not sc or not sc.get("index"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    sizes = sorted(sc["index"]["sizes"], key=int)
    xs = [int(n) for n in sizes]
    for keys, style in ((1, "o-"), (256, "s--")):
        for kind in ("Lookup", "Acquire", "Reserve"):
            ax.plot(xs, [sc["index"]["sizes"][n][f"calls_{keys}"][kind]["median"] for n in sizes], style,
                    label=f"{kind}, {keys} key{'s' if keys > 1 else ''}")
    ax.plot(xs, [sc["index"]["sizes"][n]["calls_1"]["bare gRPC echo"]["median"] for n in sizes], ":", color="0.4",
            label="bare gRPC echo, 16 bytes")
    ax.set_xscale("log")
    ax.set(xlabel="blocks in the RAM index", ylabel="median ms per call", ylim=(0, None),
           title="Call latency against index size")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _footer(ax, doc, "scale")
    return _save(fig, out / "latency-index-size.png")


def cluster_value_size(doc: dict, out: pathlib.Path) -> pathlib.Path | None:
    sc = doc["results"].get("scale")
    if not sc or not sc.get("cluster"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    sizes = sorted(sc["cluster"]["sizes"], key=int)
    xs = [int(s) for s in sizes]
    for op in ("GET into", "PUT"):
        t = [next(x for x in sc["cluster"]["sizes"][s]["rows"] if x["op"] == op and x["case"].startswith("ClusterTier"))
             for s in sizes]
        line, = ax.plot(xs, [x["median_gbs"] for x in t], "o-", label=f"ClusterTier {op}")
        ax.plot(xs, [x["median_gbs"] / x["ratio"] for x in t], "x--", color=line.get_color(), alpha=0.5,
                label=f"best redis-py {op.split()[0]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [_label(x) for x in xs])
    ax.set(xlabel="value size", ylabel="GB/s", title="Cluster tier (3-master Valkey Cluster) against value size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _footer(ax, doc, "scale")
    return _save(fig, out / "cluster-value-size.png")


PLOTS = (hit_rate, throughput_block_size, throughput_clients, latency_index, cluster_value_size)


def plot_all(doc: dict, out: pathlib.Path) -> list[pathlib.Path]:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (f(doc, out) for f in PLOTS) if p is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", help="bench-results.json written by python -m bench")
    ap.add_argument("--scale", help="--json of python -m bench.scale (instead of, or over, the results' own)")
    ap.add_argument("--scaleout", help="--json of python -m bench.scaleout (likewise)")
    ap.add_argument("--out", default="docs/img", help="directory of the PNGs (default docs/img)")
    a = ap.parse_args(argv)
    if a.results:
        doc = json.loads(pathlib.Path(a.results).read_text())
    else:
        from bench.__main__ import machine
        doc = {"machine": machine(), "benchmarks": {}, "results": {}}
    for name in ("scale", "scaleout"):
        path = getattr(a, name)
        if path:
            saved = json.loads(pathlib.Path(path).read_text())
            doc["results"][name] = saved["result"]
            doc["benchmarks"][name] = {"command": saved["command"],
                                       "git_sha": saved["result"]["machine_start"]["git_sha"]}
    for p in plot_all(doc, pathlib.Path(a.out)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
