"""The client's arena copies (kvtier.client._copy_all, kvtier.copying): large batches are dealt out over threads
that copy without the GIL; results stay in order, hashes match the bytes, and an error in any
share is raised only after every share has stopped writing."""
import os
import threading

import pytest
import xxhash

from kvtier import client as C
from kvtier import copying

MiB = 1 << 20


def blocks(n: int, size: int) -> list[memoryview]:
    return [memoryview(os.urandom(size)) for _ in range(n)]


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(C, "COPY_THREADS", 2)
    monkeypatch.setattr(C, "_copy_pool_", None)  # a pool of this size, not one made before
    yield
    if C._copy_pool_ is not None:
        C._copy_pool_.shutdown()


@pytest.fixture
def seen(monkeypatch) -> set:
    """Names of the threads that ran a copy."""
    names: set = set()
    for name in ("copy_into", "copy_hashed"):
        def spy(d, s, real=getattr(copying, name)):
            names.add(threading.current_thread().name)
            return real(d, s)
        monkeypatch.setattr(copying, name, spy)
    return names


def test_a_large_batch_is_copied_on_several_threads_in_order(two_threads, seen):
    src = blocks(9, 1 * MiB)
    dst = [memoryview(bytearray(MiB + 100)) for _ in src]  # larger buffers: only len(src) is written
    hashed = [i % 3 != 0 for i in range(len(src))]
    got = C._copy_all([(d, s, h) for d, s, h in zip(dst, src, hashed)])
    assert len(seen) == 2 and any(n.startswith("kvtier-copy") for n in seen)
    for d, s, h, digest in zip(dst, src, hashed, got):
        assert d[:len(s)] == s and d[len(s):] == bytes(100)
        assert digest == (xxhash.xxh3_128_digest(s) if h else None)


def test_small_batches_and_small_blocks_stay_on_the_calling_thread(two_threads, seen):
    for src in (blocks(2, 1 * MiB), blocks(100, 64 << 10)):  # 2 MiB in all; 64 KiB blocks
        dst = [memoryview(bytearray(len(s))) for s in src]
        C._copy_all([(d, s, True) for d, s in zip(dst, src)])
        assert all(d == s for d, s in zip(dst, src))
    assert seen == {threading.current_thread().name}


def test_an_error_in_one_share_is_raised_after_every_share_ended(two_threads):
    src = blocks(8, 1 * MiB)
    dst = [memoryview(bytearray(MiB)) for _ in src]
    dst[3] = memoryview(bytearray(10))  # too small: numpy refuses, on the pool's share (odd index)
    with pytest.raises(ValueError):
        C._copy_all([(d, s, True) for d, s in zip(dst, src)])
    # the calling thread's share (even blocks) ran to its end; the pool's stopped at block 3
    assert all(dst[i] == src[i] for i in (0, 2, 4, 6, 1))
    assert all(dst[i] == bytes(MiB) for i in (5, 7))
