"""A connector store on the GPU taken apart: Reserve, copies, hashes, Commit.

    python -m bench.gpu_store                       # 32K tokens of Llama-3-8B KV, 6 rounds
    python -m bench.gpu_store --quick               # 8K tokens, 3 rounds

Needs a CUDA GPU; runs from the repository root like ``bench.gpu`` (same daemon, same KV
layout: 32 layers of ``[2, num_blocks, 16, 8, 128]`` bf16, records of 32 MiB). Each round
stores the same blocks under new keys twice, alternately:

- "worker hashes" (the default on a GPU): ``BlockCopier.save_many`` reports each group of
  records as its DMA lands, the records are hashed on a thread pool of the worker's size
  meanwhile, and Commit carries the checksums (the daemon re-checks them in the background);
- "daemon hashes": the same copies, and Commit without checksums, so the daemon hashes the
  slots before it answers.

It prints, per kind, the median of each phase: Reserve, the copies (``save_many`` returning),
the wait for the last hashes after that, Commit, and when the first and last group were
reported. The machine's limit for the copies is in ``bench.gpu`` (pinned cudaMemcpy).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from . import emit
from .gpu import BLOCK, CHUNK, cuda_torch, machine, paged_kv, start_daemon, worker_half

KINDS = ("worker hashes", "daemon hashes")
PHASES = ("reserve", "copies", "hash_wait", "commit", "total", "first_landed", "last_landed")


def one_store(w, pool, blocks: list[list[int]], size: int, worker_hashes: bool) -> dict:
    import xxhash
    keys = [os.urandom(16) for _ in blocks]
    t0 = time.perf_counter()
    res = w.link.call(lambda c: c.reserve(w.ns, keys, [size] * len(keys)))
    t1 = time.perf_counter()
    todo = list(zip(blocks, res.views))
    sums: list = [None] * len(todo)
    marks: list[float] = []

    def landed(i: int, j: int) -> None:
        marks.append(time.perf_counter() - t1)
        for k in range(i, j):
            sums[k] = pool.submit(xxhash.xxh3_128_digest, todo[k][1])
    w.copier.save_many(todo, None, landed if worker_hashes else None)
    t2 = time.perf_counter()
    digests = [f.result() for f in sums] if worker_hashes else []
    t3 = time.perf_counter()
    w.link.call(lambda c: c.commit(res, digests))
    t4 = time.perf_counter()
    time.sleep(1.0)  # the daemon's background check runs, untimed
    w.link.call(lambda c: c.delete(w.ns, keys))
    return {"reserve": t1 - t0, "copies": t2 - t1, "hash_wait": t3 - t2, "commit": t4 - t3,
            "total": t4 - t0, "first_landed": marks[0] if marks else None,
            "last_landed": marks[-1] if marks else None}


def report(saved: dict) -> str:
    m = saved["machine"]
    lines = ["# A store on the GPU taken apart: `bench/gpu_store.py`", "",
             f"{m['gpu']}, torch {m['torch']}, {m['cpus']} CPUs; git {m['git']}. "
             f"{saved['tokens']} tokens = {saved['records']} records of {saved['record_bytes'] >> 20} MiB, "
             f"{saved['rounds']} rounds, medians in ms.", "",
             f"Command: `{saved['command']}`", "",
             "| kind | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 1) + "|"]
    for kind in KINDS:
        med = saved["median_ms"][kind]
        lines.append(f"| {kind} | " + " | ".join("-" if med[p] is None else f"{med[p]:.0f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_store", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens of KV per store")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="8K tokens, 3 rounds")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--markdown", metavar="OUT", help="write the report to this Markdown file")
    args = p.parse_args(argv)
    torch = cuda_torch("bench.gpu_store")
    if torch is None:
        return 2
    if args.quick:
        args.tokens, args.rounds = 8192, 3
    nb = args.tokens // BLOCK + 8
    cb = CHUNK // BLOCK
    blocks = [list(range(c * cb, (c + 1) * cb)) for c in range(args.tokens // CHUNK)]
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="kvt-gpu-") as tmp, contextlib.ExitStack() as stack:
        address = start_daemon(stack, tmp, "/dev/shm", max(8 << 30, 3 * args.tokens * (128 << 10)))
        w = worker_half(address, nb)
        stack.callback(w.shutdown)
        w.register_kv_caches(paged_kv(nb))
        size = w.copier.record_size(cb)
        pool = ThreadPoolExecutor(w._hash_pool._max_workers)  # the worker's verify pool's size
        stack.callback(pool.shutdown)
        one_store(w, pool, blocks, size, True)  # warm-up: staging buffers, first launches
        for _ in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(one_store(w, pool, blocks, size, kind == "worker hashes"))
    median = {kind: {p: (statistics.median(r[p] for r in rows) * 1e3 if rows[0][p] is not None else None)
                     for p in PHASES} for kind, rows in runs.items()}
    saved = {"command": "python -m bench.gpu_store" + (" --quick" if args.quick else
                                                       (f" --tokens {args.tokens}" if args.tokens != 32768 else "")
                                                       + (f" --rounds {args.rounds}" if args.rounds != 6 else "")),
             "machine": machine(torch), "tokens": args.tokens, "records": len(blocks), "record_bytes": size,
             "rounds": args.rounds, "median_ms": median, "runs_s": runs}
    mine, base = median["worker hashes"]["total"], median["daemon hashes"]["total"]
    saved["rows"] = [{"measure": f"store {args.tokens} tokens of Llama-3-8B KV, checksums from the worker",
                      "kvtier": mine, "unit": "ms", "baseline": base,
                      "baseline_name": "same store, the daemon hashing at Commit", "ratio": base / mine,
                      "target": "", "holds": None,
                      "false_if": "hashing starts only after the last copy (save_many's landed reports "
                                  "come at the end), or the worker's hash pool shrinks"}]
    emit(report(saved), saved, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
