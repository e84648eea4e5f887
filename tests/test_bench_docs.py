"""The pages' generated blocks: written from the last full run, and in step with it in the repository."""
from __future__ import annotations

import copy
import json
import pathlib
import re

import pytest

from bench import docs
from bench.__main__ import gpu_file, main as bench_main

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_doc(**benchmarks) -> dict:
    """A full run's results as bench/__main__.py writes them, with the rows given per benchmark."""
    rows, status = [], {}
    for name, rs in benchmarks.items():
        if rs is None:
            status[name] = {"status": "skipped: torch.cuda.is_available() is False"}
            continue
        status[name] = {"status": "ok", "command": f"python -m bench.{name}", "wall_s": 1.0}
        rows += [{"benchmark": name, "command": f"python -m bench.{name}", **r} for r in rs]
    return {"command": "python -m bench", "mode": "full", "started": "2026-11-24T01:25:45+00:00",
            "machine": {"git_sha": "0123456789abcdef" * 2 + "01234567", "cpu_model": "Test CPU", "cpu_count": 2,
                        "mem_total_gib": 23.5, "kernel": "6.1", "python": "3.11.7",
                        "disk": {"device": "/dev/vda", "fstype": "ext4", "dir": "/tmp"}, "load_avg_1m": 0.5},
            "benchmarks": status, "results": {}, "rows": rows, "wall_s": 600.0, "load_avg_1m_end": 1.5,
            "limits": [{"limit": "memcpy (numpy), 2 MiB blocks", "value": 21.8, "unit": "GB/s", "benchmark": "core"},
                       {"limit": "raw O_DIRECT read", "value": 3.04, "unit": "GB/s", "benchmark": "nvme"}]}


def r(measure, kvtier, unit="GB/s", baseline=None, name="", ratio=None, target="", holds=None, false_if="x"):
    return {"measure": measure, "kvtier": kvtier, "unit": unit, "baseline": baseline, "baseline_name": name,
            "ratio": ratio, "target": target, "holds": holds, "false_if": false_if}


CORE = [r("arena put+get, 2 MiB blocks", 17.5, baseline=21.8, name="memcpy", ratio=0.803, target=">= 0.8x",
          holds=True, false_if="round trips get dearer"),
        r("arena put+get, 64 KiB blocks", 8.9, baseline=22.4, name="memcpy", ratio=0.397),
        r("Lookup of 1000 keys over unix, median", 0.355, "ms", 0.376, "bare gRPC echo", 0.944, "<= 2 ms", True)]
NVME = [r("daemon read-back 1 client (commit), 2 MiB blocks", 2.59, baseline=3.05, name="raw read", ratio=0.849,
          target=">= 0.9x", holds=False, false_if="other I/O shares the disk")]
GPU_SAVED = {"command": "python -m bench.gpu", "machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11",
                                                          "cuda": "13.0", "cpus": 16, "git": "1a34852"},
             "rows": [r("arena -> GPU copies (load)", 52.8, baseline=55.0, name="pinned cudaMemcpy", ratio=0.96,
                        target=">= 0.8x", holds=True, false_if="the arena is not registered")]}

PAGE = """# A page

Prose the run does not touch.

<!-- bench: run -->
<!-- /bench -->

<!-- bench: rows core match="2 MiB|Lookup" -->
stale text that goes
<!-- /bench -->

More prose.

<!-- bench: limits nvme -->
<!-- /bench -->

<!-- bench: rows gpu -->
<!-- /bench -->
"""


def tree(tmp_path: pathlib.Path, doc: dict, page: str = PAGE, readme: str = "# R\n\n<!-- bench: headline -->\n<!-- /bench -->\n",
         gpu: dict | None = GPU_SAVED) -> pathlib.Path:
    (tmp_path / "docs" / "history").mkdir(parents=True)
    (tmp_path / "docs" / "bench-results.json").write_text(json.dumps(doc))
    if gpu is not None:
        (tmp_path / "docs" / "bench-gpu-h100.json").write_text(json.dumps(gpu))
    (tmp_path / "docs" / "page.md").write_text(page)
    (tmp_path / "README.md").write_text(readme)
    return tmp_path


def test_committed_pages_are_written_from_the_committed_run():
    """Every generated block of README.md and docs/ is what docs/bench-results.json gives: edit the
    results by running `python -m bench`, then the pages follow (`python -m bench.docs`)."""
    blocks = sum(p.read_text().count("<!-- bench: ") for p in docs.pages(REPO))
    assert blocks >= 5, "the README and the benchmark pages show their numbers through generated blocks"
    assert "<!-- bench: headline -->" in (REPO / "README.md").read_text()
    stale = docs.refresh(REPO, check=True)
    assert stale == [], f"out of date with docs/bench-results.json: {stale}; run python -m bench.docs"


def test_blocks_are_rewritten_from_the_run_and_nothing_else_changes(tmp_path):
    root = tree(tmp_path, run_doc(core=CORE, nvme=NVME, gpu=None))
    hist = root / "docs" / "history" / "old.md"
    hist.write_text("# Old\n\n<!-- bench: rows core -->\nkept as it was\n<!-- /bench -->\n")
    changed = docs.refresh(root)
    assert sorted(p.name for p in changed) == ["README.md", "page.md"]
    page = (root / "docs" / "page.md").read_text()
    assert "stale text that goes" not in page
    for kept in ("# A page\n\nProse the run does not touch.\n", "More prose.\n"):
        assert kept in page
    assert "2026-11-24 01:25Z, at commit 0123456" in page
    assert "| arena put+get, 2 MiB blocks | 17.5 GB/s | 21.8 GB/s (memcpy) | 0.803 | >= 0.8x | yes | round trips get dearer |" in page
    assert "| Lookup of 1000 keys over unix, median | 0.355 ms |" in page
    assert "64 KiB" not in page.split("<!-- bench: limits")[0], "match keeps only the rows asked for"
    assert "| raw O_DIRECT read | 3.04 GB/s | `python -m bench.nvme` |" in page
    assert "memcpy (numpy)" not in page, "limits nvme shows nvme's limits only"
    # the GPU rows come from the saved GPU run, which the caption names
    assert "NVIDIA H100 80GB HBM3" in page and "1a34852" in page and "[bench-gpu-h100.json](bench-gpu-h100.json)" in page
    assert "| arena -> GPU copies (load) | 52.8 GB/s |" in page
    assert hist.read_text().count("kept as it was") == 1, "history pages are records, not regenerated"
    # the README's table: a failing target reads **no**; links point into docs/
    readme = (root / "README.md").read_text()
    assert "| daemon read-back 1 client (commit), 2 MiB blocks | 2.59 GB/s | 3.05 GB/s (raw read) | 0.849 | >= 0.9x | **no** | `python -m bench.nvme` |" in readme
    assert "[bench-results.md](docs/bench-results.md)" in readme and "(docs/bench-gpu-h100.json)" in readme
    assert readme.index("arena -> GPU") < readme.index("arena put+get, 2 MiB"), "HEADLINE order"
    assert docs.refresh(root) == [], "a second pass changes nothing"


def test_a_new_run_changes_the_numbers_in_place(tmp_path):
    doc = run_doc(core=CORE, nvme=NVME, gpu=None)
    root = tree(tmp_path, doc)
    docs.refresh(root)
    newer = copy.deepcopy(doc)
    newer["started"] = "2026-11-25T03:00:00+00:00"
    newer["rows"][0].update(kvtier=18.9, ratio=0.867)
    (root / "docs" / "bench-results.json").write_text(json.dumps(newer))
    assert {p.name for p in docs.refresh(root, check=True)} == {"README.md", "page.md"}
    assert "17.5 GB/s" in (root / "docs" / "page.md").read_text(), "check writes nothing"
    docs.refresh(root)
    page = (root / "docs" / "page.md").read_text()
    assert "| arena put+get, 2 MiB blocks | 18.9 GB/s |" in page and "17.5 GB/s" not in page
    assert "2026-11-25 03:00Z" in page and page.count("<!-- /bench -->") == 4


def test_gpu_rows_of_the_run_win_over_the_saved_ones(tmp_path):
    ran = [r("arena -> GPU copies (load)", 99.0, baseline=100.0, name="pinned cudaMemcpy", ratio=0.99)]
    root = tree(tmp_path, run_doc(core=CORE, nvme=NVME, gpu=ran))
    docs.refresh(root)
    page = (root / "docs" / "page.md").read_text()
    assert "| arena -> GPU copies (load) | 99 GB/s |" in page and "52.8" not in page
    assert "`python -m bench.gpu` in the full run of 2026-11-24 01:25Z" in page and "H100" not in page


def test_no_saved_gpu_run_says_so(tmp_path):
    root = tree(tmp_path, run_doc(core=CORE, nvme=NVME, gpu=None), gpu=None)
    docs.refresh(root)
    assert "No run with a GPU saved yet" in (root / "docs" / "page.md").read_text()


@pytest.mark.parametrize("block, why", [
    ("<!-- bench: rows core match=\"nothing like it\" -->\n<!-- /bench -->\n", "no row of core matches"),
    ("<!-- bench: rows nosuch -->\n<!-- /bench -->\n", "no benchmark 'nosuch'"),
    ("<!-- bench: table core -->\n<!-- /bench -->\n", "unknown directive 'table'"),
    ("<!-- bench: rows core when=now -->\n<!-- /bench -->\n", "unknown option"),
    ("<!-- bench: rows core -->\nno end\n", "has no '<!-- /bench -->' end"),
    ("<!-- bench: rows core match=\"open -->\n<!-- /bench -->\n", "bad directive"),
])
def test_a_bad_block_names_the_page_and_writes_nothing(tmp_path, block, why):
    root = tree(tmp_path, run_doc(core=CORE, nvme=NVME, gpu=None), page=PAGE + block)
    before = (root / "README.md").read_text()
    with pytest.raises(docs.DocError, match="page.md") as e:
        docs.refresh(root)
    assert why in str(e.value)
    # the pages are written only after all of them rendered: README (first in order) is unchanged
    assert (root / "README.md").read_text() == before


def test_a_partial_or_quick_run_is_refused_into_docs(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--quick", "--only", "core", "--out", str(REPO / "docs")])
    assert e.value.code == 2
    assert "docs/ holds the last full run" in capsys.readouterr().err


def test_saved_gpu_runs_are_named_by_benchmark_and_gpu_model():
    assert gpu_file("gpu", {"machine": {"gpu": "NVIDIA H100 80GB HBM3"}}) == "bench-gpu-h100.json"
    assert gpu_file("gpu_store", {"machine": {"gpu": "NVIDIA H200"}}) == "bench-gpu-store-h200.json"
    assert gpu_file("gpu", {}) == "bench-gpu-gpu.json"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for m in re.finditer(r"^#+ (.+)$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_every_relative_link_of_the_pages_resolves():
    """The pages moved dated experiments to docs/history/: each link still lands on a file and,
    where it names one, on a heading."""
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
