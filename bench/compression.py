"""Codecs on KV-like data: compression ratio and speed of none / lz4 / shuffle-lz4, and what
``record.choose_payload`` keeps.

    .venv/bin/python -m bench.compression                  # about 10 seconds
    .venv/bin/python -m bench.compression --quick          # a few seconds
    .venv/bin/python -m bench.compression --json bench-compression.json --markdown compression.md

Nothing is downloaded: the tensors are synthesised with numpy (seeded, so every run sees the
same bytes) in vLLM's CPU layout, one tensor per layer of shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K in the first head_size entries of
the last dimension, V in the second), 8 KV heads, head_size 128, block size 16 or 32. Values
imitate a Llama-style model's cache:

* K, per layer and head: every channel has its own offset (normal, std 0.8) and scale
  (log-normal around 1.2); 4 of the 128 channels are outliers (offset +-6..12, scale 2-4), as in
  the massive-activation channels of real keys; values are normal around that; then RoPE
  (GPT-NeoX pairing: channel i with i + 64, base 10000) rotates each pair by the token's position,
  so most outliers are smeared over a rotating pair and only the slow, low-frequency pairs keep
  a stable offset. Overall std about 1.5 with tails past 10.
* V: near-zero-mean normal values, per-channel std uniform in 0.4..1.0, no outliers.

fp16 is numpy's float16; bf16 is the upper 16 bits of float32, rounded to nearest even as
torch's conversion does (plain truncation is measured too). One kvtier record is what the
connector stores (``kvtier/vllm/blocks.py``): for each layer, a run of whole vLLM blocks;
here 4 layers of a 2 MiB record (8 blocks of 16 tokens, or 4 of 32, per layer), each layer
with its own channel statistics. Controls: random bytes (incompressible) and zeros.

For each data set and codec: compressed size / raw size over all records (ratio = raw /
compressed), compress and decompress GB/s of raw bytes through ``kvtier.record.compress`` and
``decompress`` (per record: median and p90 / p99 / slowest of the timed passes), and the codec
``choose_payload`` (the NVMe and cluster tiers' write path, which keeps raw bytes unless the
codec saves >= 10%) actually stored. "Wasted" = compress time spent on records that were then
stored raw. Beside them, the order-0 entropy of each byte plane of the 16-bit words: the best
ratio any coder that models single bytes of each plane (Huffman or ANS after the shuffle) could
reach; lz4 has no entropy stage, so it only finds repeated byte strings. And the two halves of
shuffle-lz4's extra work timed alone (numpy's byte-plane split and merge), beside the same merge
done as uint16 shift-or (not kvtier's code: what a faster merge costs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from bench import emit

MiB = 1 << 20
RECORD = 2 * MiB
HEADS, HEAD = 8, 128
LAYERS_PER_RECORD = 4
REPO = pathlib.Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- synthetic KV -----------------------------------------------------------------------------

def rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """GPT-NeoX RoPE over the last dimension (pairs i, i + d/2) for tokens at positions pos."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2 / d)
    ang = pos[:, None] * inv[None, :]                       # [tokens, half]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def layer_kv(rng: np.random.Generator, num_blocks: int, block_size: int, start_pos: int) -> np.ndarray:
    """float32 [num_blocks, HEADS, block_size, 2*HEAD] for one layer, K then V in the last dim."""
    tokens = num_blocks * block_size
    pos = np.arange(start_pos, start_pos + tokens, dtype=np.float64)
    k = np.empty((HEADS, tokens, HEAD), dtype=np.float32)
    v = np.empty((HEADS, tokens, HEAD), dtype=np.float32)
    for h in range(HEADS):
        offset = rng.normal(0, 0.8, HEAD)
        scale = np.exp(rng.normal(np.log(1.2), 0.3, HEAD))
        out = rng.choice(HEAD, 4, replace=False)
        offset[out] = rng.uniform(6, 12, 4) * rng.choice([-1, 1], 4)
        scale[out] = rng.uniform(2, 4, 4)
        pre = (offset + scale * rng.standard_normal((tokens, HEAD))).astype(np.float32)
        k[h] = rope(pre, pos)
        vs = rng.uniform(0.4, 1.0, HEAD)
        v[h] = (rng.normal(0, 0.05, HEAD) + vs * rng.standard_normal((tokens, HEAD))).astype(np.float32)
    kv = np.concatenate([k, v], axis=-1)                    # [HEADS, tokens, 2*HEAD]
    kv = kv.reshape(HEADS, num_blocks, block_size, 2 * HEAD).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(kv)


def to_16bit(x: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 words of fp16, bf16 (round to nearest even) or bf16 truncated."""
    if dtype == "fp16":
        return x.astype(np.float16).view(np.uint16)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if dtype == "bf16-trunc":
        return (u >> 16).astype(np.uint16)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def kv_records(n: int, block_size: int, dtype: str, seed: int) -> list[bytes]:
    """n records of RECORD bytes: LAYERS_PER_RECORD layers, each a run of whole vLLM blocks."""
    rng = np.random.default_rng(seed)
    block_bytes = HEADS * block_size * 2 * HEAD * 2
    per_layer = RECORD // LAYERS_PER_RECORD // block_bytes
    out = []
    for r in range(n):
        layers = [to_16bit(layer_kv(rng, per_layer, block_size, r * per_layer * block_size), dtype)
                  for _ in range(LAYERS_PER_RECORD)]
        rec = b"".join(l.tobytes() for l in layers)
        assert len(rec) == RECORD
        out.append(rec)
    return out


def describe(records: list[bytes], dtype: str) -> dict:
    """Value statistics of K and V (as float32), to show the data is what the docstring says."""
    words = np.frombuffer(records[0], dtype=np.uint16)
    if dtype == "fp16":
        vals = words.view(np.float16).astype(np.float32)
    else:
        vals = (words.astype(np.uint32) << 16).view(np.float32)
    kv = vals.reshape(-1, 2 * HEAD)
    k, v = kv[:, :HEAD], kv[:, HEAD:]
    return {"k_std": float(k.std()), "k_absmax": float(np.abs(k).max()), "v_std": float(v.std()),
            "v_absmax": float(np.abs(v).max())}


def plane_entropy(records: list[bytes]) -> tuple[float, float]:
    """Order-0 entropy (bits per byte) of the low and high byte planes of the 16-bit words."""
    a = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(-1, 2)
    out = []
    for plane in (a[:, 0], a[:, 1]):
        p = np.bincount(plane, minlength=256) / len(plane)
        p = p[p > 0]
        out.append(max(0.0, float(-(p * np.log2(p)).sum())))
    return out[0], out[1]


# ---- measurement -----------------------------------------------------------------------------

def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def merge_shift_or(planes: bytes, n: int) -> np.ndarray:
    """unshuffle2's result for an even n, built as uint16 words (high plane << 8 | low plane) in
    a fresh array: the merge without numpy's transposed strided copy."""
    b = np.frombuffer(planes, dtype=np.uint8)
    out = np.empty(n // 2, dtype=np.uint16)
    np.left_shift(b[n // 2:n], 8, out=out, dtype=np.uint16)
    np.bitwise_or(out, b[:n // 2], out=out)
    return out


def measure(records: list[bytes], passes: int) -> dict:
    from kvtier import record
    raw = sum(len(r) for r in records)
    res = {}
    for name, codec in record.CODECS.items():
        if codec == record.CODEC_RAW:
            t_cmp = []
            kept_raw = len(records)
            for _ in range(passes):
                for r in records:
                    t0 = time.perf_counter()
                    record.choose_payload(codec, r)
                    t_cmp.append(time.perf_counter() - t0)
            res[name] = {"ratio": 1.0, "stored_bytes": raw, "choose_payload_raw": kept_raw,
                         "choose_payload_s_per_gb": statistics.median(t_cmp) / RECORD * 1e9}
            continue
        packed = [record.compress(codec, r) for r in records]
        for p, r in zip(packed, records):   # round trip
            assert record.decompress(codec, p, len(r)) == r
        t_c, t_d = [], []
        for _ in range(passes):
            for r, p in zip(records, packed):
                t0 = time.perf_counter()
                record.compress(codec, r)
                t1 = time.perf_counter()
                record.decompress(codec, p, len(r))
                t_d.append(time.perf_counter() - t1)
                t_c.append(t1 - t0)
        if codec == record.CODEC_SHUFFLE_LZ4:   # its two halves, to see where the time goes
            t_s, t_u, t_m = [], [], []
            for r in records:
                t0 = time.perf_counter()
                sh = record.shuffle2(r)
                t1 = time.perf_counter()
                record.unshuffle2(sh, len(r))
                t2 = time.perf_counter()
                merged = merge_shift_or(sh, len(r))
                t_m.append(time.perf_counter() - t2)
                t_u.append(t2 - t1)
                t_s.append(t1 - t0)
                assert merged.tobytes() == r
        chosen = [record.choose_payload(codec, r) for r in records]
        kept_raw = sum(c == record.CODEC_RAW for c, _ in chosen)
        stored = sum(len(p) for _, p in chosen)
        comp = sum(len(p) for p in packed)
        med_c = statistics.median(t_c)
        res[name] = {
            "ratio": raw / comp, "saving": 1 - comp / raw, "stored_ratio": raw / stored,
            "choose_payload_raw": kept_raw, "records": len(records),
            "compress_gbs": RECORD / med_c / 1e9, "compress_p90_gbs": RECORD / pct(t_c, 90) / 1e9,
            "compress_p99_gbs": RECORD / pct(t_c, 99) / 1e9, "compress_worst_gbs": RECORD / max(t_c) / 1e9,
            "decompress_gbs": RECORD / statistics.median(t_d) / 1e9,
            "decompress_p90_gbs": RECORD / pct(t_d, 90) / 1e9,
            "decompress_p99_gbs": RECORD / pct(t_d, 99) / 1e9, "decompress_worst_gbs": RECORD / max(t_d) / 1e9,
            # CPU seconds per GB of blocks written spent compressing records that were then stored raw
            "wasted_cpu_s_per_gb": kept_raw / len(records) * med_c / RECORD * 1e9,
        }
        if codec == record.CODEC_SHUFFLE_LZ4:
            res[name]["shuffle2_gbs"] = RECORD / statistics.median(t_s) / 1e9
            res[name]["unshuffle2_gbs"] = RECORD / statistics.median(t_u) / 1e9
            res[name]["merge_shift_or_gbs"] = RECORD / statistics.median(t_m) / 1e9
    return res


def datasets(n: int) -> list[tuple[str, str, list[bytes]]]:
    out = []
    for dtype in ("fp16", "bf16", "bf16-trunc"):
        for bs in (16, 32):
            if dtype == "bf16-trunc" and bs == 32:
                continue
            out.append((f"KV {dtype}, block {bs}", dtype, kv_records(n, bs, dtype, seed=100 + bs)))
    rng = np.random.default_rng(9)
    out.append(("random bytes", "", [rng.integers(0, 256, RECORD, dtype=np.uint8).tobytes() for _ in range(n)]))
    out.append(("zeros", "", [bytes(RECORD) for _ in range(n)]))
    return out


def machine() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = ""
    import lz4
    return {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": sha,
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "numpy": np.__version__, "lz4": lz4.__version__}


def run(args) -> dict:
    n = 4 if args.quick else 16
    passes = 2 if args.quick else 5
    res = {"machine_start": machine(), "records": n, "record_bytes": RECORD, "passes": passes, "sets": []}
    for name, dtype, recs in datasets(n):
        log(f"{name}: {n} records of {RECORD // MiB} MiB")
        row = {"name": name, "codecs": measure(recs, passes)}
        if dtype:
            row["values"] = describe(recs, dtype)
        lo, hi = plane_entropy(recs)
        row["entropy_bits"] = {"low": lo, "high": hi}
        row["entropy_bound_ratio"] = 16 / (lo + hi) if lo + hi > 0.01 else None
        res["sets"].append(row)
    res["machine_end"] = machine()
    return res


def markdown(res: dict, command: str) -> str:
    m0, m1 = res["machine_start"], res["machine_end"]
    lines = [f"Command: `{command}`. Run {m0['when']} at {m0['git']} on {m0['cpus']} CPUs, Python {m0['python']}, "
             f"numpy {m0['numpy']}, lz4 {m0['lz4']}; load average (1 min) {m0['load_avg_1m']} at start, "
             f"{m1['load_avg_1m']} at end. {res['records']} records of {res['record_bytes'] // MiB} MiB per data "
             f"set, {res['passes']} timed passes (GB/s of raw bytes, one thread: median, then p90 / slowest).", "",
             "| data | K std / max, V std / max | codec | ratio | choose_payload stored raw | compress GB/s | "
             "decompress GB/s | wasted compress CPU s/GB | entropy bound (low, high plane bits) |",
             "|---|---|---|---:|---:|---|---|---:|---|"]
    for s in res["sets"]:
        v = s.get("values")
        vals = f"{v['k_std']:.2f} / {v['k_absmax']:.1f}, {v['v_std']:.2f} / {v['v_absmax']:.1f}" if v else ""
        e = s["entropy_bits"]
        bound = (f"{s['entropy_bound_ratio']:.2f}x" if s["entropy_bound_ratio"] else "unbounded") + \
            f" ({max(0.0, e['low']):.2f}, {max(0.0, e['high']):.2f})"
        for name, c in s["codecs"].items():
            if name == "none":
                lines.append(f"| {s['name']} | {vals} | none | 1.00x | all | | | 0 | {bound} |")
                continue
            lines.append(
                f"| {s['name']} | {vals} | {name} | {c['ratio']:.3f}x | {c['choose_payload_raw']} of {c['records']} | "
                f"{c['compress_gbs']:.2f} ({c['compress_p90_gbs']:.2f} / {c['compress_worst_gbs']:.2f}) | "
                f"{c['decompress_gbs']:.2f} ({c['decompress_p90_gbs']:.2f} / {c['decompress_worst_gbs']:.2f}) | "
                f"{c['wasted_cpu_s_per_gb']:.3f} | {bound} |")
    lines += ["", "Where shuffle-lz4's time goes (numpy byte-plane split and merge alone, GB/s, median):", "",
              "| data | shuffle2 | unshuffle2 | the same merge as uint16 shift-or |", "|---|---:|---:|---:|"]
    for s in res["sets"]:
        c = s["codecs"].get("shuffle-lz4", {})
        if "shuffle2_gbs" in c:
            lines.append(f"| {s['name']} | {c['shuffle2_gbs']:.2f} | {c['unshuffle2_gbs']:.2f} | "
                         f"{c['merge_shift_or_gbs']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and passes")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--from-json", help="only render the table of a run saved with --json")
    args = ap.parse_args()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.from_json:
        saved = json.loads(pathlib.Path(args.from_json).read_text())
        res, command = saved["result"], saved["command"]
    else:
        res = run(args)
        command = "python -m bench.compression" + (" --quick" if args.quick else "")
    emit(markdown(res, command), {"command": command, "result": res}, args)


if __name__ == "__main__":
    main()
