"""Copies of block bytes that leave the GIL to other threads, and a copy that hashes as it goes.

Used where blocks move between buffers in bulk: the client's arena copies (kvtier.client) and
reads from NVMe that land in a bounce buffer first (kvtier.cold). ``copy_into`` runs numpy's
copy, which releases the GIL, so other threads (the event loop, other reads) run meanwhile;
``copy_hashed`` hashes the destination right after each piece is copied, while it is still in
the CPU's cache. python-xxhash releases the GIL as well while it hashes a large buffer.
"""
from __future__ import annotations

import numpy as np
import xxhash

HASH_CHUNK = 1 << 20  # blocks above 4 of these are copied and hashed piece by piece


def copy_into(dst: memoryview, src: memoryview) -> None:
    """dst[:len(src)] = src, without holding the GIL for large copies."""
    np.copyto(np.frombuffer(dst, np.uint8, len(src)), np.frombuffer(src, np.uint8))


def copy_hashed(dst: memoryview, src: memoryview) -> bytes:
    """Copy src into dst and return the xxh3-128 of dst, hashed while the bytes are still in
    the CPU's cache (a large block in HASH_CHUNK pieces): about half the cost of hashing after."""
    n = len(src)
    if n <= 4 * HASH_CHUNK:
        if len(dst) != n:
            dst = dst[:n]
        copy_into(dst, src)
        return xxhash.xxh3_128_digest(dst)
    h = xxhash.xxh3_128()
    for i in range(0, n, HASH_CHUNK):
        j = min(n, i + HASH_CHUNK)
        copy_into(dst[i:j], src[i:j])
        h.update(dst[i:j])
    return h.digest()
