"""The numbers in README.md and docs/*.md, written from the last full run of ``python -m bench``.

    .venv/bin/python -m bench.docs            # rewrite every generated block from docs/bench-results.json
    .venv/bin/python -m bench.docs --check    # exit 1 when a block differs from what the results give
    .venv/bin/python -m bench.docs --page docs/benchmarks.md   # print one page as it would be written

``python -m bench`` (a full run of everything, into docs/) calls this at its end, so one command
regenerates every measured number the README and the benchmark pages show. A page asks for
numbers with a block; everything between the two comments is replaced on each run::

    <!-- bench: rows core match="arena put+get|Lookup" -->
    <!-- /bench -->

Directives (arguments are shell words):

``run``
    one paragraph: when, at which commit, on which machine, how long.
``rows BENCHMARK [match="A|B"]``
    the result rows of one benchmark (those whose measure contains A or B), as a table with
    baseline, ratio, target, whether it holds, and the condition that would make it false.
``limits [BENCHMARK]``
    the machine's own limits measured in the run (memcpy, raw sockets, O_DIRECT, redis-py).
``headline``
    the README's table: a few rows of every benchmark (``HEADLINE``).

GPU numbers come from a machine with a GPU: when the run had none, ``rows gpu`` and
``rows gpu_store`` show the last GPU run's saved results (``docs/bench-gpu-*.json`` and
``docs/bench-gpu-store-*.json``, which ``python -m bench`` writes whenever the GPU benchmarks
ran), and say which machine and commit they come from.

Pages under ``docs/history/`` hold dated experiments (A/B runs of code that has since changed);
they name their commit and command and are not regenerated.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BLOCK = re.compile(r"<!-- bench: (?P<directive>[^\n]*?) -->\n(?P<body>.*?)<!-- /bench -->", re.S)
OPEN = re.compile(r"<!-- bench: ")
CARRIED = {"gpu": "bench-gpu-*.json", "gpu_store": "bench-gpu-store-*.json"}

# (benchmark, measure contains) for the README's table, in the order shown
HEADLINE = [
    ("ttft", "TTFT with kvtier hits"),
    ("gpu", "copies"),
    ("gpu", "load 32768 tokens"),
    ("gpu_store", "store 32768 tokens"),
    ("scaleout", "3 daemons, cluster: chunk hit rate"),
    ("scaleout", "3 daemons, local: chunk hit rate"),
    ("core", "arena put+get, 2 MiB"),
    ("core", "data channel put+get over unix, 64 KiB"),
    ("core", "Lookup of 1000 keys over unix"),
    ("scale", "memory per block"),
    ("scale", "Lookup of 1 key"),
    ("scale", "Lookup of 256 keys"),
    ("scale", "Acquire of 256 keys"),
    ("scale", "2 MiB blocks, 8 client processes"),
    ("nvme", "daemon spill (commit)"),
    ("nvme", "daemon read-back 1 client (commit)"),
    ("nvme", "daemon read-back 4 clients (commit)"),
    ("nvme", "daemon read-back 1 client (commit, arena on 2 MiB"),
    ("nvme", "daemon read-back 4 clients (commit, arena on 2 MiB"),
    ("nvme", "scheduler Acquire of 64 x 2 MiB only on NVMe, background: answer"),
    ("nvme", "restart with 100,000"),
    ("cluster", "GET into, 2 MiB, single valkey-server (best"),
    ("cluster", "PUT, 2 MiB, single valkey-server"),
    ("cluster", "GET into, 2 MiB, single valkey-server, against the bare wire"),
    ("cluster", "GET into, 2 MiB, 3-master Cluster (best"),
]


class DocError(ValueError):
    """A generated block that cannot be written: bad directive, unknown benchmark, no end."""


def num(v) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def load(docs: pathlib.Path = DOCS) -> dict:
    """The last run (bench-results.json) and the GPU results carried from the last GPU run."""
    doc = json.loads((docs / "bench-results.json").read_text())
    carried = {}
    for name, pattern in CARRIED.items():
        ran = doc.get("benchmarks", {}).get(name, {}).get("status") == "ok"
        if ran:
            continue
        files = sorted(p for p in docs.glob(pattern) if name == "gpu_store" or not p.name.startswith("bench-gpu-store"))
        carried[name] = [(p.name, json.loads(p.read_text())) for p in files]
    return {"doc": doc, "carried": carried}


def short_time(iso: str) -> str:
    """2026-11-24T01:25:45+00:00 -> 2026-11-24 01:25Z."""
    return iso[:10] + " " + iso[11:16] + "Z" if len(iso) >= 16 else iso


def run_line(doc: dict) -> str:
    m = doc["machine"]
    return (f"Full run of `{doc['command']}`, {short_time(doc['started'])}, at commit {m['git_sha'][:7]}, "
            f"{doc['wall_s'] / 60:.0f} minutes, on {m['cpu_count']} CPUs ({m['cpu_model']}), "
            f"{m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, Python {m['python']}; disk under the NVMe "
            f"benchmarks {m['disk']['device']} ({m['disk']['fstype']}). Load average {m['load_avg_1m']} at the "
            f"start, {doc['load_avg_1m_end']} at the end. Every row of the run: [bench-results.md](bench-results.md); "
            f"GPU rows come from the saved runs their captions name.")


def row_cells(x: dict) -> tuple[str, str, str, str]:
    unit = f" {x['unit']}" if x.get("unit") else ""
    base = f"{num(x['baseline'])}{unit} ({x['baseline_name']})" if x.get("baseline") is not None else ""
    holds = "" if x.get("holds") is None else ("yes" if x["holds"] else "**no**")
    return f"{num(x['kvtier'])}{unit}", base, num(x.get("ratio")), holds


def table(rows: list[dict], with_benchmark: bool = False) -> list[str]:
    head = "| measure | kvtier | baseline | ratio | target | holds? | false if |"
    rule = "|---|---:|---|---:|---|---|---|"
    if with_benchmark:
        head = "| measure | kvtier | baseline | ratio | target | holds? | command | false if |"
        rule = "|---|---:|---|---:|---|---|---|---|"
    out = [head, rule]
    for x in rows:
        k, base, ratio, holds = row_cells(x)
        cmd = f" `{x['command']}` |" if with_benchmark else ""
        out.append(f"| {x['measure']} | {k} | {base} | {ratio} | {x.get('target', '')} | {holds} |{cmd} "
                   f"{x.get('false_if', '')} |")
    return out


def matching(rows: list[dict], match: str | None) -> list[dict]:
    if not match:
        return rows
    wanted = [w for w in match.split("|") if w]
    return [x for x in rows if any(w in x["measure"] for w in wanted)]


def carried_sources(data: dict, name: str) -> list[tuple[str, list[dict]]]:
    """(caption, rows) per saved run of a GPU benchmark that did not run in the last full run."""
    out = []
    for fname, saved in data["carried"][name]:
        m = saved.get("machine", {})
        rows = [{**x, "command": saved.get("command", f"python -m bench.{name}")} for x in saved.get("rows", [])]
        out.append((f"Carried from the last run with a GPU: `{saved.get('command', 'python -m bench.' + name)}` on "
                    f"{m.get('gpu', 'a GPU')} ({m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}) at commit "
                    f"{m.get('git', '?')}, saved as [{fname}]({fname}); `python -m bench` on a machine with a GPU "
                    f"writes it again.", rows))
    return out


def render(directive: str, data: dict, prefix: str = "") -> str:
    """The body of one block. ``prefix`` is the path from the page to docs/ ("docs/" in the README)."""
    try:
        words = shlex.split(directive)
    except ValueError as e:
        raise DocError(f"bad directive {directive!r}: {e}") from None
    if not words:
        raise DocError("empty directive")
    kind, args = words[0], words[1:]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    pos = [a for a in args if "=" not in a]
    if set(opts) - {"match"}:
        raise DocError(f"{directive!r}: unknown option {sorted(set(opts) - {'match'})}")
    doc = data["doc"]
    benches = doc.get("benchmarks", {})
    if kind == "run":
        if pos or opts:
            raise DocError(f"{directive!r}: run takes no arguments")
        return link(run_line(doc), prefix) + "\n"
    if kind == "rows":
        if len(pos) != 1:
            raise DocError(f"{directive!r}: rows takes one benchmark")
        if pos[0] not in benches and pos[0] not in data["carried"]:
            raise DocError(f"{directive!r}: no benchmark {pos[0]!r} in the run ({', '.join(benches)})")
        return render_rows(directive, pos[0], opts.get("match"), data, prefix)
    if kind == "limits":
        got = [x for x in doc.get("limits", []) if not pos or x["benchmark"] in pos]
        if not got:
            raise DocError(f"{directive!r}: no limit measured")
        lines = ["| limit | value | measured by |", "|---|---:|---|"]
        lines += [f"| {x['limit']} | {num(x['value'])} {x['unit']} | `python -m bench.{x['benchmark']}` |" for x in got]
        return "\n".join(lines) + "\n"
    if kind == "headline":
        if pos or opts:
            raise DocError(f"{directive!r}: headline takes no arguments")
        return headline(data, prefix)
    raise DocError(f"unknown directive {kind!r} (run, rows, limits, headline)")


def render_rows(directive: str, name: str, match: str | None, data: dict, prefix: str) -> str:
    """A benchmark's rows as a table under a caption naming their run; a saved GPU run's (one
    table each) when the last full run had no GPU."""
    if name in data["carried"]:
        lines = []
        for caption, rows in carried_sources(data, name):
            got = matching(rows, match)
            if not got:
                raise DocError(f"{directive!r}: no row matches in {caption}")
            lines += [link(caption, prefix), ""] + table(got) + [""]
        if not lines:
            return "No run with a GPU saved yet: `python -m bench` on a machine with one writes these rows.\n"
        return "\n".join(lines[:-1]) + "\n"
    doc = data["doc"]
    b = doc["benchmarks"][name]
    if b.get("status") != "ok":
        return f"`python -m bench.{name}` did not run in the last full run: {b.get('status')}.\n"
    got = matching([x for x in doc["rows"] if x["benchmark"] == name], match)
    if not got:
        raise DocError(f"{directive!r}: no row of {name} matches")
    caption = (f"`{b['command']}` in the full run of {short_time(doc['started'])} at "
               f"{doc['machine']['git_sha'][:7]} ([bench-results.md](bench-results.md)):")
    return "\n".join([link(caption, prefix), ""] + table(got)) + "\n"


def headline(data: dict, prefix: str) -> str:
    doc = data["doc"]
    picked, gpu_notes = [], []
    for name, want in HEADLINE:
        if name in data["carried"]:
            for caption, rows in carried_sources(data, name):
                got = [x for x in rows if want in x["measure"]]
                picked += got
                if got and caption not in gpu_notes:
                    gpu_notes.append(caption)
            continue
        picked += [x for x in doc["rows"] if x["benchmark"] == name and want in x["measure"]]
    lines = [link(run_line(doc), prefix)]
    for note in gpu_notes:
        lines += ["", "GPU rows: " + link(note[0].lower() + note[1:], prefix)]
    lines += [""] + table(picked, with_benchmark=True)
    return "\n".join(lines) + "\n"


def link(text: str, prefix: str) -> str:
    """Point the relative links of generated text (written for docs/) from the page's directory."""
    if not prefix:
        return text
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", text)


def rewrite(text: str, data: dict, prefix: str = "", where: str = "") -> str:
    """Replace the body of every block of a page; the rest of the page is left as it is."""
    if len(OPEN.findall(text)) != len(BLOCK.findall(text)):
        raise DocError(f"{where}: a '<!-- bench: ... -->' block has no '<!-- /bench -->' end")

    def one(m: re.Match) -> str:
        try:
            body = render(m.group("directive"), data, prefix)
        except DocError as e:
            raise DocError(f"{where}: {e}") from None
        return f"<!-- bench: {m.group('directive')} -->\n{body}<!-- /bench -->"
    return BLOCK.sub(one, text)


def pages(repo: pathlib.Path = REPO) -> list[pathlib.Path]:
    """README.md and every page of docs/ that is not history."""
    docs = repo / "docs"
    return [repo / "README.md"] + sorted(p for p in docs.rglob("*.md") if "history" not in p.relative_to(docs).parts)


def prefix_of(page: pathlib.Path, repo: pathlib.Path = REPO) -> str:
    """The path from a page's directory to docs/: "docs/" for the README, "../" for docs/history/."""
    if page.parent == repo:
        return "docs/"
    try:
        return "../" * (len(page.relative_to(repo / "docs").parts) - 1)
    except ValueError:
        return ""


def refresh(repo: pathlib.Path = REPO, check: bool = False) -> list[pathlib.Path]:
    """Rewrite the generated blocks; return the pages that changed (or would, with check)."""
    data = load(repo / "docs")
    changed = []
    for p in pages(repo):                 # every page renders before any is written
        text = p.read_text()
        new = rewrite(text, data, prefix_of(p, repo), str(p.relative_to(repo)))
        if new != text:
            changed.append((p, new))
    if not check:
        for p, new in changed:
            p.write_text(new)
    return [p for p, _ in changed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is out of date")
    ap.add_argument("--page", help="print this page with its blocks written; change nothing")
    args = ap.parse_args(argv)
    try:
        if args.page:
            p = pathlib.Path(args.page).resolve()
            sys.stdout.write(rewrite(p.read_text(), load(), prefix_of(p), args.page))
            return 0
        changed = refresh(check=args.check)
    except DocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {p.relative_to(REPO)}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
