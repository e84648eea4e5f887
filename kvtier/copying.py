"""Copies of block bytes that leave the GIL to other threads, and a copy that hashes as it goes.

Used where blocks move between buffers in bulk: the client's arena copies (kvtier.client) and
reads from NVMe that land in a bounce buffer first (kvtier.cold). ``spread`` deals such work
out over threads (the client's copies, the daemon's hashes at commit). ``copy_into`` runs numpy's
copy, which releases the GIL, so other threads (the event loop, other reads) run meanwhile;
``copy_hashed`` hashes the destination right after each piece is copied, while it is still in
the CPU's cache. python-xxhash releases the GIL as well while it hashes a large buffer.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Sequence

import numpy as np
import xxhash

# A block larger than this is copied and hashed in pieces of this size: each piece is hashed
# while source and destination (twice this) still sit in the core's L2 cache (1-2 MiB per core
# on current server CPUs). With 1 MiB pieces the destination had partly left it: copying and
# hashing 16 x 2 MiB on two threads went from 0.85-0.90x of a plain copy's time to 1.0x.
HASH_CHUNK = 256 << 10


def copy_into(dst: memoryview, src: memoryview) -> None:
    """dst[:len(src)] = src, without holding the GIL for large copies."""
    np.copyto(np.frombuffer(dst, np.uint8, len(src)), np.frombuffer(src, np.uint8))


def zero(dst: memoryview) -> None:
    """dst[:] = 0, without holding the GIL for large buffers."""
    np.frombuffer(dst, np.uint8).fill(0)


def copy_hashed(dst: memoryview, src: memoryview) -> bytes:
    """Copy src into dst and return the xxh3-128 of dst, hashed while the bytes are still in
    the CPU's cache (a block above HASH_CHUNK piece by piece): about half the cost of hashing
    after."""
    n = len(src)
    d, s = np.frombuffer(dst, np.uint8, n), np.frombuffer(src, np.uint8)
    if n <= HASH_CHUNK:
        np.copyto(d, s)
        return xxhash.xxh3_128_digest(d)
    h = xxhash.xxh3_128()
    for i in range(0, n, HASH_CHUNK):
        piece = d[i:i + HASH_CHUNK]
        np.copyto(piece, s[i:i + HASH_CHUNK])
        h.update(piece)
    return h.digest()


def spread(pool: concurrent.futures.Executor, fn: Callable[[Sequence], list], items: Sequence, k: int) -> list:
    """fn over k interleaved shares of items (items[i::k]), the first on this thread and the
    others on pool; fn returns one result per item of its share. The results come back in the
    items' order, and only once every share has ended (also when one raises), so no thread is
    still working on an item when the caller moves on."""
    shares = [items[i::k] for i in range(k)]
    futs = [pool.submit(fn, share) for share in shares[1:]]
    try:
        done = [fn(shares[0])]
    finally:
        concurrent.futures.wait(futs)
    done += [f.result() for f in futs]
    out: list = [None] * len(items)
    for i, got in enumerate(done):
        out[i::k] = got
    return out
