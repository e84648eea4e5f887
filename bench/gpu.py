"""GPU data path of the vLLM connector: arena <-> GPU copies, and loading KV against prefill.

    python -m bench.gpu --json bench-gpu.json --markdown bench-gpu.md
    python -m bench.gpu --quick        # 8K tokens only, fewer rounds

Needs a CUDA GPU and runs from the repository root. It starts a kvtier daemon
(``python -m kvtier.cli serve``, arena on /dev/shm) and drives the connector's worker half
(kvtier.vllm.worker.WorkerHalf, kvtier.vllm.blocks.BlockCopier) with KV tensors laid out as
vLLM's FlashAttention backend lays them out for a Llama-3-8B-shaped model: per layer
``[2, num_blocks, 16, 8, 128]`` bf16, 32 layers, 128 KiB of KV per token, chunks of 256
tokens (32 MiB records). vLLM itself is not needed: where it is not installed, the two marker
base classes the connector's metadata derives from are provided by ``stub_vllm_base``.

1. Copy bandwidth, in the same run: GPU -> arena (``BlockCopier.save`` into reserved arena
   slots) and arena -> GPU (``BlockCopier.load``), with the arena registered by
   ``cudaHostRegister`` as the worker does it, against the machine's limit: one
   ``cudaMemcpyAsync`` (torch ``copy_``) of the same bytes between a ``pin_memory`` host
   buffer and the GPU, each direction. Also the arena without registration (pageable), to
   show what registering buys. Ratio = kvtier GB/s / pinned GB/s.
2. Load against prefill, at 8K, 16K and 32K tokens: prefill of a random-weight Llama-3-8B
   shape (transformers ``LlamaModel``, bf16, SDPA attention, no LM head) timed on the GPU;
   its KV is copied into the paged tensors, stored through the worker half (Reserve + copy +
   Commit), the paged tensors are zeroed, and loaded back through the worker half's
   synchronous load (Acquire + copy + xxh3-128 check + Release), which must reproduce the
   prefill's KV exactly. Ratio = prefill time / load time.

Targets (issue #5): copies >= 0.8x pinned cudaMemcpy; loading 32K tokens >= 8x faster than
recomputing them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import types
from types import SimpleNamespace

from . import emit

LAYERS, KV_HEADS, HEAD_DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256


def stub_vllm_base() -> None:
    """Make ``kvtier.vllm.meta`` importable without vLLM: it only subclasses two marker
    classes of vLLM's connector base module. Does nothing when vLLM is installed."""
    try:
        import vllm.distributed.kv_transfer.kv_connector.v1.base  # noqa: F401
        return
    except ImportError:
        pass
    name = "vllm.distributed.kv_transfer.kv_connector.v1.base"
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    base = sys.modules[name]
    base.KVConnectorMetadata = type("KVConnectorMetadata", (), {})
    base.KVConnectorHandshakeMetadata = type("KVConnectorHandshakeMetadata", (), {})


def cuda_torch(prog: str):
    """torch, ready for the connector's worker half (vLLM's base classes stubbed where vLLM is
    missing); None, said on stderr, where there is no CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        print(f"{prog}: no CUDA GPU here; nothing to measure", file=sys.stderr)
        return None
    stub_vllm_base()
    return torch


def paged_kv(num_blocks: int, fill: bool = True):
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = {}
    for i in range(LAYERS):
        t = torch.empty((2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
        if fill:
            t.normal_(generator=g)
        kv[f"model.layers.{i}.self_attn.attn"] = t
    return kv


def timed(fn) -> float:
    import torch
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def worker_half(address: str, num_blocks: int, verify: bool = True):
    from kvtier.vllm.settings import ConnectorSettings
    from kvtier.vllm.worker import WorkerHalf
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BLOCK, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model="bench/llama-3-8b-shape", revision=""),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, rank=0))
    settings = ConnectorSettings(address=address, chunk_size=CHUNK, verify=verify, worker_timeout_s=60.0)
    return WorkerHalf(cfg, SimpleNamespace(num_blocks=num_blocks), settings)


def start_daemon(stack: contextlib.ExitStack, tmp: str, arena_dir: str, arena_bytes: int) -> str:
    """``kvtier serve`` in a subprocess with its arena under ``arena_dir``; its address."""
    import shutil
    import uuid
    from kvtier.client import Client
    from .core import Proc, wait_for
    adir = os.path.join(arena_dir, f"kvtier-bench-gpu-{uuid.uuid4().hex[:8]}")
    stack.callback(shutil.rmtree, adir, True)
    sock = os.path.join(tmp, "d.sock")
    cfg = os.path.join(tmp, "daemon.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nsocket = "{sock}"\ndrain_timeout_s = 1.0\nlog_level = "warning"\n'
                f'[ram]\narena_path = "{adir}/arena"\ncapacity = {arena_bytes}\n[metrics]\nlisten = ""\n')
    proc = Proc("kvtier daemon", [sys.executable, "-m", "kvtier.cli", "serve", "--config", cfg],
                os.path.join(tmp, "daemon.log"))
    stack.callback(proc.stop)
    address = f"unix://{sock}"

    def ready() -> bool:
        with Client(address, timeout=2) as c:
            c.stats()
        return True
    wait_for("kvtier daemon", proc, ready)
    return address


# ---- 1. copy bandwidth -----------------------------------------------------------------------

def copy_bandwidth(address: str, rounds: int, chunks: int) -> dict:
    import torch
    from kvtier.client import Client
    from kvtier.vllm.blocks import BlockCopier
    cb = CHUNK // BLOCK
    nb = chunks * cb
    kv = paged_kv(nb)
    cp = BlockCopier(kv, nb)
    size = cp.record_size(cb)
    total = size * chunks
    out: dict = {"record_bytes": size, "bytes_per_round": total, "chunks": chunks}
    with Client(address, timeout=60) as c:
        c.attach()
        assert c.path == "arena", c.path
        t0 = time.perf_counter()
        cp.register_host(c.arena_view())
        out["register_s"] = time.perf_counter() - t0
        out["registered"] = cp._registered is not None
        out["arena_bytes"] = c.info.arena_size
        keys = [os.urandom(16) for _ in range(chunks)]
        res = c.reserve("bench-gpu", keys, [size] * chunks)
        views = res.views
        blocks = [list(range(i * cb, (i + 1) * cb)) for i in range(chunks)]

        items_save = [(b, v) for v, b in zip(views, blocks)]
        items_load = [(v, cb, 0, b) for v, b in zip(views, blocks)]
        save = lambda: cp.save_many(items_save)  # noqa: E731  (what the worker does per batch)
        load = lambda: cp.load_many(items_load)  # noqa: E731
        slots = [torch.frombuffer(v, dtype=torch.uint8) for v in views]

        def raw(direction):
            """The arena's own DMA limit: the same slots copied whole, no gather or scatter."""
            def run():
                for i, t in enumerate(slots):
                    part = dev[i * size:(i + 1) * size]
                    (t.copy_(part, non_blocking=True) if direction == "d2h" else part.copy_(t, non_blocking=True))
            return run

        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(total, dtype=torch.uint8, device="cuda")
        d2h = lambda: host.copy_(dev, non_blocking=True)  # noqa: E731
        h2d = lambda: dev.copy_(host, non_blocking=True)  # noqa: E731
        cases = {"save": save, "load": load, "pinned_d2h": d2h, "pinned_h2d": h2d,
                 "arena_d2h": raw("d2h"), "arena_h2d": raw("h2d")}
        for f in cases.values():  # warm up
            timed(f)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for k in order:
                times[k].append(timed(cases[k]))
        # correctness: what was saved loads back into fresh blocks unchanged
        ref = {k: t.clone() for k, t in kv.items()}
        save()
        for t in kv.values():
            t.zero_()
        load()
        torch.cuda.synchronize()
        out["roundtrip_exact"] = all(torch.equal(kv[k], ref[k]) for k in kv)
        del ref
        # the same copies with the arena not registered (pageable memory)
        cp.close()
        pageable = {"save": [timed(save) for _ in range(max(2, rounds // 3))],
                    "load": [timed(load) for _ in range(max(2, rounds // 3))]}
        del slots
        c.abort(res)
    del host, dev, kv
    torch.cuda.empty_cache()

    def gbps(ts):
        return total / statistics.median(ts) / 1e9
    out["gbps"] = {k: gbps(v) for k, v in times.items()}
    out["gbps_pageable"] = {k: gbps(v) for k, v in pageable.items()}
    out["times_s"] = times
    out["ratio"] = {"gpu_to_arena": out["gbps"]["save"] / out["gbps"]["pinned_d2h"],
                    "arena_to_gpu": out["gbps"]["load"] / out["gbps"]["pinned_h2d"],
                    "gpu_to_arena_vs_raw_arena": out["gbps"]["save"] / out["gbps"]["arena_d2h"],
                    "arena_to_gpu_vs_raw_arena": out["gbps"]["load"] / out["gbps"]["arena_h2d"]}
    return out


# ---- 2. load against prefill -----------------------------------------------------------------

def llama_8b_shape(max_tokens: int):
    import torch
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=LAYERS, num_attention_heads=32, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, max_position_embeddings=max(8192, max_tokens),
                      rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def prefill(model, ids):
    import torch
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True).past_key_values


def layer_kv(cache, i: int):
    """(keys, values) of layer i, each [1, heads, tokens, dim], across transformers versions."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i]


def load_vs_prefill(address: str, token_counts: list[int], repeats: int) -> dict:
    import torch
    from kvtier.vllm.meta import LoadSpec, StepMeta, StoreSpec
    longest = max(token_counts)
    nb = longest // BLOCK + 8
    model = llama_8b_shape(longest)
    params = sum(p.numel() for p in model.parameters())
    warm = torch.randint(0, 128256, (1, 1024), device="cuda")
    timed(lambda: prefill(model, warm))
    kv = paged_kv(nb, fill=False)
    results = []
    for n in token_counts:
        ids = torch.randint(0, 128256, (1, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
        pre = []
        cache = None
        for _ in range(repeats):
            cache = None
            torch.cuda.empty_cache()
            box = {}
            pre.append(timed(lambda: box.setdefault("c", prefill(model, ids))))
            cache = box["c"]
        # the prefill's KV into the paged layout: block b holds tokens b*16 .. b*16+15
        names = list(kv)
        nblk = n // BLOCK
        for i, name in enumerate(names):
            k, v = layer_kv(cache, i)
            kv[name][0, :nblk].copy_(k[0].transpose(0, 1).reshape(nblk, BLOCK, KV_HEADS, HEAD_DIM))
            kv[name][1, :nblk].copy_(v[0].transpose(0, 1).reshape(nblk, BLOCK, KV_HEADS, HEAD_DIM))
        del cache, box
        torch.cuda.empty_cache()
        ref = {name: kv[name][:, :nblk].clone() for name in names}
        row = {"tokens": n, "kv_bytes": n * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2, "prefill_s": pre,
               "store_s": [], "store_daemon_hashes_s": []}
        # stores, alternately: the worker hashes each group of records as its DMA lands and sends
        # the checksums (the default on a GPU), and the daemon hashes the slots at commit
        w = worker_half(address, nb)
        w.register_kv_caches(kv)
        cb = CHUNK // BLOCK
        blocks = [list(range(c * cb, (c + 1) * cb)) for c in range(n // CHUNK)]
        for _ in range(repeats):
            for hash_stores, key in ((None, "store_s"), (False, "store_daemon_hashes_s")):
                w.hash_stores = hash_stores
                hashes = [os.urandom(32) for _ in blocks]
                store = StepMeta(stores=[StoreSpec("r", "", "", hashes, blocks)])
                row[key].append(timed(lambda: (w.wait_for_save(store), w.flush())))
                assert not w.stats["store_failures"], "a store failed"
                time.sleep(1.0)  # the daemon's background check of the first kind runs, untimed
                w.link.call(lambda c: c.delete(w.ns, w._keys("", "", hashes)))
        w.shutdown()
        for verify in (True, False):
            w = worker_half(address, nb, verify=verify)
            w.register_kv_caches(kv)
            hashes = [os.urandom(32) for _ in blocks]
            store = StepMeta(stores=[StoreSpec("r", "", "", hashes, blocks)])
            w.wait_for_save(store)
            w.flush()
            loads, exact = [], True
            for _ in range(repeats):
                for name in names:
                    kv[name].zero_()
                meta = StepMeta(loads=[LoadSpec("r", "", "", hashes, 0, list(range(nblk)))], load_async=False)
                loads.append(timed(lambda: w.start_load_kv(meta)))
                w.get_finished(set())
                errs = w.get_block_ids_with_load_errors()
                exact = exact and not errs and all(torch.equal(kv[name][:, :nblk], ref[name]) for name in names)
            key = "load" if verify else "load_noverify"
            row[key + "_s"] = loads
            row[key + "_exact"] = exact
            row["stored_chunks"] = w.stats["stored_chunks"]
            with contextlib.suppress(Exception):
                w.link.call(lambda c: c.delete(w.ns, w._keys("", "", hashes)))
            w.shutdown()
        del ref
        torch.cuda.empty_cache()
        row["ratio"] = min(row["prefill_s"]) / statistics.median(row["load_s"])
        row["ratio_noverify"] = min(row["prefill_s"]) / statistics.median(row["load_noverify_s"])
        results.append(row)
    del model, kv
    torch.cuda.empty_cache()
    return {"params": params, "rows": results}


# ---- report ----------------------------------------------------------------------------------

def report(saved: dict) -> str:
    m = saved["machine"]
    bw = saved["copy"]
    g = bw["gbps"]
    lines = [
        "# GPU data path: `bench/gpu.py`", "",
        f"{m['gpu']}, torch {m['torch']}, CUDA {m['cuda']}, {m['cpus']} CPUs; git {m['git']}.", "",
        f"Command: `{saved['command']}`", "",
        f"## Copy bandwidth ({bw['chunks']} chunks of {bw['record_bytes'] >> 20} MiB per round, "
        f"{bw['rounds']} rounds, median)", "",
        "| direction | kvtier (registered arena) | pinned cudaMemcpy | ratio | target "
        "| raw DMA, same arena slots | ratio to raw | pageable arena |",
        "|---|---|---|---|---|---|---|---|",
        f"| GPU -> arena (store) | {g['save']:.1f} GB/s | {g['pinned_d2h']:.1f} GB/s | "
        f"{bw['ratio']['gpu_to_arena']:.2f}x | >= 0.8x | {g['arena_d2h']:.1f} GB/s | "
        f"{bw['ratio']['gpu_to_arena_vs_raw_arena']:.2f}x | {bw['gbps_pageable']['save']:.1f} GB/s |",
        f"| arena -> GPU (load) | {g['load']:.1f} GB/s | {g['pinned_h2d']:.1f} GB/s | "
        f"{bw['ratio']['arena_to_gpu']:.2f}x | >= 0.8x | {g['arena_h2d']:.1f} GB/s | "
        f"{bw['ratio']['arena_to_gpu_vs_raw_arena']:.2f}x | {bw['gbps_pageable']['load']:.1f} GB/s |",
        "",
        f"Arena on {saved['arena_fs']} ({saved['arena_dir']}). "
        f"cudaHostRegister of the {bw['arena_bytes'] >> 30} GiB arena: {bw['register_s']:.2f} s "
        f"(registered: {bw['registered']}); save+load round trip exact: {bw['roundtrip_exact']}.", "",
    ]
    lp = saved.get("load_vs_prefill")
    if not lp:
        return "\n".join(lines) + "\n"
    lines += [
        f"## Loading KV against prefill (Llama-3-8B shape, {lp['params'] / 1e9:.2f}B random "
        "parameters, bf16, SDPA)", "",
        "| tokens | KV | prefill | store | store, daemon hashes | load (checked) | load (unchecked) "
        "| prefill / load | target | exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lp["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['kv_bytes'] / 2**30:.2f} GiB | {min(r['prefill_s']) * 1e3:.0f} ms | "
            f"{statistics.median(r['store_s']) * 1e3:.0f} ms | "
            f"{statistics.median(r['store_daemon_hashes_s']) * 1e3:.0f} ms | "
            f"{statistics.median(r['load_s']) * 1e3:.0f} ms | "
            f"{statistics.median(r['load_noverify_s']) * 1e3:.0f} ms | {r['ratio']:.1f}x "
            f"({r['ratio_noverify']:.1f}x unchecked) | {'>= 8x at 32K' if r['tokens'] >= 32768 else '-'} | "
            f"{r['load_exact'] and r['load_noverify_exact']} |")
    return "\n".join(lines) + "\n"


def table_rows(saved: dict) -> list[dict]:
    """The headline numbers as rows of ``python -m bench``'s table."""
    g = saved["copy"]["gbps"]
    rows = []
    for what, mine, base in (("GPU -> arena copies (store)", "save", "pinned_d2h"),
                             ("arena -> GPU copies (load)", "load", "pinned_h2d")):
        ratio = g[mine] / g[base]
        rows.append({"measure": what, "kvtier": g[mine], "unit": "GB/s", "baseline": g[base],
                     "baseline_name": "pinned cudaMemcpy", "ratio": ratio, "target": ">= 0.8x",
                     "holds": ratio >= 0.8,
                     "false_if": "records stop crossing the bus whole (one DMA per layer and block "
                                 "runs at about half the bus's speed) or the arena is not registered"})
    for r in (saved.get("load_vs_prefill") or {}).get("rows", []):
        load = statistics.median(r["load_s"])
        rows.append({"measure": f"load {r['tokens']} tokens of Llama-3-8B KV vs prefill", "kvtier": load * 1e3,
                     "unit": "ms", "baseline": min(r["prefill_s"]) * 1e3, "baseline_name": "prefill (H100, bf16)",
                     "ratio": r["ratio"], "target": ">= 8x" if r["tokens"] >= 32768 else "",
                     "holds": (r["ratio"] >= 8 and r["load_exact"]) if r["tokens"] >= 32768 else None,
                     "false_if": "the load's checksums stop running beside the copies, or the copies "
                                 "fall under about 35 GB/s"})
    return rows


def machine(torch) -> dict:
    import subprocess
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip() or "?"
    except Exception:
        git = "?"
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "git": git}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8K tokens only, fewer rounds")
    p.add_argument("--tokens", default="8192,16384,32768", help="prompt lengths for the prefill comparison")
    p.add_argument("--arena-dir", default="/dev/shm", metavar="DIR",
                   help="where the daemon's arena lives: tmpfs (default) or a hugetlbfs mount")
    p.add_argument("--copy-only", action="store_true", help="measure the copy bandwidth only")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--markdown", metavar="OUT", help="write the report to this Markdown file")
    args = p.parse_args(argv)
    torch = cuda_torch("bench.gpu")
    if torch is None:
        return 2
    tokens = [8192] if args.quick else [int(x) for x in args.tokens.split(",")]
    rounds = 6 if args.quick else 12
    saved: dict = {"command": "python -m bench.gpu" + (" --quick" if args.quick else ""),
                   "machine": machine(torch)}
    arena = max(8 << 30, 2 * max(tokens) * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2)
    with tempfile.TemporaryDirectory(prefix="kvt-gpu-") as tmp, contextlib.ExitStack() as stack:
        address = start_daemon(stack, tmp, args.arena_dir, arena)
        saved["arena_dir"] = args.arena_dir
        from kvtier.arena import backing_of
        saved["arena_fs"] = backing_of(args.arena_dir)
        print("copy bandwidth ...", file=sys.stderr, flush=True)
        saved["copy"] = copy_bandwidth(address, rounds, chunks=64)
        saved["copy"]["rounds"] = rounds
        if not args.copy_only:
            print("load vs prefill ...", file=sys.stderr, flush=True)
            saved["load_vs_prefill"] = load_vs_prefill(address, tokens, repeats=2 if args.quick else 3)
    saved["rows"] = table_rows(saved)
    emit(report(saved), saved, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
