"""The connector's CUDA path: KV tensors on a GPU, the arena registered with cudaHostRegister,
copies on a side stream. Skipped without a CUDA GPU (the same code runs on CPU tensors in
test_vllm_blocks.py and test_vllm_e2e.py). On a GPU node:
``python -m pytest tests/test_vllm_cuda.py`` (vLLM is not needed)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

import xxhash  # noqa: E402

from kvtier.client import Client  # noqa: E402
from kvtier.vllm.blocks import BlockCopier  # noqa: E402

NB = 24


def raw(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t  # torch.equal has no fp8 kernel


def layouts(device):
    g = torch.Generator().manual_seed(1)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).to(device)
    return {
        "flash_attn": r(2, NB, 16, 2, 64),                    # [2, B, tokens, heads, dim]
        "flashinfer": r(NB, 2, 16, 2, 64),                    # [B, 2, tokens, heads, dim]
        "mla": r(NB, 16, 576),                                # one latent per token
        "fp8": torch.randint(0, 255, (2, NB, 16, 2, 64), generator=g, dtype=torch.uint8)
                    .view(torch.float8_e4m3fn).to(device),
        "strided": r(NB, 2, 64, 16).transpose(2, 3),          # not contiguous
    }


def test_registered_arena_round_trip_matches_the_cpu_record(daemon):
    kv = layouts("cuda")
    cp = BlockCopier(kv, NB)
    assert cp.cuda
    cb, blocks = 4, [[5, 1, 9, 2], [0, 23, 11, 7]]
    size = cp.record_size(cb)
    keys = [os.urandom(16) for _ in blocks]
    with Client(daemon.address) as c:
        c.attach()
        assert c.path == "arena"
        cp.register_host(c.arena_view())
        assert cp._registered is not None, "cudaHostRegister of the arena failed"
        res = c.reserve("gpu", keys, [size] * len(keys))
        for v, b in zip(res.views, blocks):
            cp.save(b, v, after=cp.compute_done_event())
        c.commit(res)
        # the GPU wrote what the CPU path writes for the same tensors: records are portable
        cpu = BlockCopier({k: t.cpu() for k, t in kv.items()}, NB)
        assert cpu.layout() == cp.layout()
        ref = {k: t.clone() for k, t in kv.items()}
        for t in kv.values():
            t.zero_()
        lease = c.acquire("gpu", keys, 10_000)
        try:
            for v, digest, b in zip(lease.views, lease.checksums, blocks):
                want = bytearray(cpu.record_size(cb))
                cpu.save(b, memoryview(want))
                assert bytes(v) == bytes(want)
                assert xxhash.xxh3_128_digest(v) == digest
                cp.load(v, cb, 1, b[:3])                       # blocks 1..3 of the record
        finally:
            c.release(lease)
    for name, t in kv.items():
        bd = 1 if name in ("flash_attn", "fp8") else 0
        got, want = raw(t).movedim(bd, 0), raw(ref[name]).movedim(bd, 0)
        for rec in blocks:
            for src, dst in zip(rec[1:], rec[:3]):
                assert torch.equal(got[dst], want[src]), (name, dst, src)
    cp.close()
    assert cp._registered is None


def test_store_waits_for_the_forward_that_wrote_the_kv(daemon):
    kv = {"l0": torch.zeros(NB, 16, 256, device="cuda")}
    cp = BlockCopier(kv, NB)
    with Client(daemon.address) as c:
        c.attach()
        cp.register_host(c.arena_view())
        res = c.reserve("gpu", [os.urandom(16)], [cp.record_size(2)])
        torch.cuda._sleep(200_000_000)         # a long "forward" on the compute stream ...
        kv["l0"][3].fill_(7.0)                 # ... that ends by writing the KV
        cp.save([3, 4], res.views[0], after=cp.compute_done_event())
        got = torch.frombuffer(res.views[0], dtype=torch.float32).view(2, 16, 256)
        assert torch.all(got[0] == 7.0) and torch.all(got[1] == 0.0)
        c.abort(res)
    cp.close()


def test_worker_half_stores_and_loads_gpu_blocks(make_daemon):
    # "sync": the daemon hashes the slots at commit and refuses checksums that do not match,
    # so a worker that hashed a record before its DMA landed fails its store here
    daemon = make_daemon(ram={"verify_on_commit": "sync"})
    from bench.gpu import stub_vllm_base
    stub_vllm_base()
    from kvtier.vllm.meta import LoadSpec, StepMeta, StoreSpec
    from kvtier.vllm.settings import ConnectorSettings
    from kvtier.vllm.worker import WorkerHalf
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=16, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model="tiny", revision=""),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, rank=0))
    w = WorkerHalf(cfg, SimpleNamespace(num_blocks=NB),
                   ConnectorSettings(address=daemon.address, chunk_size=32))
    kv = {f"layer{i}": torch.randn(2, NB, 16, 2, 64, device="cuda", dtype=torch.bfloat16) for i in range(3)}
    w.register_kv_caches(kv)
    assert w.link.path == "arena" and w.copier._registered is not None
    assert w._hash_stores()                            # on a GPU stores send their checksums
    ref = {k: t.clone() for k, t in kv.items()}
    hashes = [os.urandom(32) for _ in range(3)]
    w.wait_for_save(StepMeta(stores=[StoreSpec("r1", "", "", hashes, [[0, 1], [2, 3], [4, 5]])]))
    assert w.flush(30) and w.stats["stored_chunks"] == 3 and not w.stats["store_failures"]
    for t in kv.values():
        t.zero_()
    # the prefix from block 1 on (a partial first chunk), into other blocks
    w.start_load_kv(StepMeta(loads=[LoadSpec("r2", "", "", hashes, 1, [10, 11, 12, 13, 14])], load_async=False))
    assert w.get_finished(set()) == (None, None)       # synchronous: nothing reported as received
    assert w.get_block_ids_with_load_errors() == set()
    for k in kv:
        assert torch.equal(kv[k][:, 10:15], ref[k][:, 1:6]), k
        assert not kv[k][:, :10].any()
    # a chunk that is gone fails only its own blocks, which vLLM then recomputes
    w.link.call(lambda c: c.delete(w.ns, w._keys("", "", hashes[1:2])))
    w.start_load_kv(StepMeta(loads=[LoadSpec("r3", "", "", hashes, 0, [16, 17, 18, 19, 20, 21])], load_async=False))
    w.get_finished(set())                              # vLLM asks for errors after this
    assert w.get_block_ids_with_load_errors() == {18, 19}
    assert w.stats["loaded_chunks"] == 3 + 2
    w.shutdown()


@pytest.mark.parametrize("uniform", [False, True])            # True: every layer's blocks one size
@pytest.mark.parametrize("stage_records", [0, 1, 3, 100])   # 0: records larger than the stage
def test_batched_copies_group_records_through_the_staging_buffer(stage_records, uniform, monkeypatch):
    from kvtier.vllm import blocks as blocks_mod
    kv = layouts("cuda")
    if uniform:  # the layer-major gather: several layouts and element types of one block size
        kv = {k: kv[k] for k in ("flash_attn", "flashinfer")}
        kv["flash_attn_2"] = torch.randn_like(kv["flash_attn"])
        kv["fp8_wide"] = torch.randint(0, 255, (2, NB, 16, 2, 128), dtype=torch.uint8,
                                       device="cuda").view(torch.float8_e4m3fn)
        kv["strided_wide"] = torch.randn(NB, 2, 128, 16, device="cuda", dtype=torch.bfloat16).transpose(2, 3)
    cp = BlockCopier(kv, NB)
    assert (len({L.block_bytes for L in cp.layers}) == 1) == uniform
    cb = 3
    monkeypatch.setattr(blocks_mod, "STAGE_MAX", max(1, stage_records * cp.record_size(cb)))
    cpu = BlockCopier({k: t.cpu() for k, t in kv.items()}, NB)
    ids = [[i, (i + 7) % NB, (i * 5 + 1) % NB] for i in range(7)]
    recs = [bytearray(cp.record_size(cb)) for _ in ids]
    seen = []

    def landed(i, j):  # what each record holds when it is reported: hashed at once by the worker
        seen.append((i, j, [bytes(recs[k]) for k in range(i, j)]))
    cp.save_many([(b, memoryview(r)) for b, r in zip(ids, recs)], after=cp.compute_done_event(),
                 landed=landed)
    assert [k for i, j, _ in seen for k in range(i, j)] == list(range(len(ids)))
    assert len(seen) == {0: 7, 1: 7, 3: 3, 100: 1}[stage_records]
    early = {k: got for i, j, snap in seen for k, got in zip(range(i, j), snap)}
    for k, (b, r) in enumerate(zip(ids, recs)):
        want = bytearray(cpu.record_size(cb))
        cpu.save(b, memoryview(want))
        assert r == want
        assert early[k] == want, f"record {k} reported before its bytes landed"
    # loads of several kinds in one batch: whole records, a partial first one, a short last one
    dst = {k: torch.zeros_like(t) for k, t in kv.items()}
    if not uniform:
        dst["strided"] = torch.zeros(NB, 2, 64, 16, device="cuda", dtype=torch.bfloat16).transpose(2, 3)
    out = BlockCopier(dst, NB)
    items = [(memoryview(recs[0]), cb, 1, [0, 1]), (memoryview(recs[1]), cb, 0, [2, 3, 4]),
             (memoryview(recs[2]), cb, 0, [5, 6, 7]), (memoryview(recs[3]), cb, 0, [8, 9, 10]),
             (memoryview(recs[4]), cb, 0, [11])]
    out.load_many(items)
    want = {k: torch.zeros_like(t).cpu() for k, t in dst.items()}
    ref = BlockCopier(want, NB)
    for r, c, first, b in items:
        ref.load(r, c, first, b)
    for k in dst:
        assert torch.equal(raw(dst[k]).cpu(), raw(want[k])), k
