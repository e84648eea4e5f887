"""Worker half: copies chunks between this rank's KV tensors and the daemon (one per TP x PP rank).

Per step (vLLM calls, in order): ``handle_preemptions`` (finish the stores of preempted
requests before their blocks are reused) → ``start_load_kv`` (loads: on the load thread when
asynchronous, inline before the forward when synchronous) → ``wait_for_save`` (queue this
step's stores on the store thread; the blocks they read stay allocated because the scheduler
half delays freeing a request with stores until this rank reports it in finished-sending) →
``get_finished`` → ``get_block_ids_with_load_errors``.

Data path: Acquire + copy out + Release for loads and Reserve + copy in + Commit for stores,
one batched call per step and thread, through the shared-memory arena; when the arena cannot
be mapped (daemon on another node), the same copies go through ``get_many`` / ``put_many``.

Failure: any error (daemon down, timeout, lease lost, checksum mismatch, no room) fails only
the chunks concerned. A failed load reports its blocks as load errors (vLLM recomputes them
with ``kv_load_failure_policy="recompute"``) and the request is still reported as received;
a failed store is a future miss. Nothing waits longer than one daemon call's deadline.
A synchronous load that fails has already put whatever it copied into the blocks, and the
step's forward runs on them: that step stores nothing (its chunks may be computed on the bad
KV; the scheduler half plans them again once vLLM has recomputed them). The chunks the
scheduler half then names in a step's ``deletes`` (stored on the other ranks, or in later
steps) are deleted on the store thread, after the stores queued before them; a delete that
fails is logged and counted, and leaves the copy until a store with ``overwrite`` replaces it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
import xxhash

from .. import errors
from ..keys import ZERO_CHECKSUM
from .blocks import BlockCopier
from .keys import Fingerprint, chunk_key, layout_tag, scope_digest, weights_variant
from .link import DaemonLink, Quiet
from .meta import DeleteSpec, LoadSpec, RankLayout, StepMeta, StoreSpec
from .settings import ConnectorSettings

log = logging.getLogger("kvtier.vllm")

# An engine step that computes nothing (every request waits for its loads) ends in
# get_finished, and the engine calls again at once: tens of microseconds per empty step, the
# GIL held nearly throughout, while the load thread needs it for its every Python line.
# Waiting this long there for a load to land costs a step with nothing to do at most this.
IDLE_WAIT_S = 0.002


class _Done:
    """A result already computed, shaped like a finished Future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Jobs(list):
    """Load or store jobs of one namespace."""

    def __init__(self, namespace: str):
        super().__init__()
        self.namespace = namespace


class _WorkerLink(DaemonLink):
    """The worker's link to the daemon: before it drops a client (a failed call, close), and
    with it the client's arena mapping, ``unpin`` unregisters the arena for DMA. A restarted
    daemon's arena is a new file, often mapped at the old address: pages pinned for the old
    one must not stay registered there."""

    def __init__(self, *args, unpin=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpin = unpin

    def _unpin(self) -> None:
        if self.unpin is not None:
            try:
                self.unpin()
            except Exception as e:  # never into the engine
                log.warning("%s: could not unpin the arena (%s)", self.name, e)

    def _fail(self, client, exc) -> None:
        # only when this client is the current one: once replaced, it was unpinned when it
        # was dropped, and what is pinned now may be the new client's arena
        if self._client is client:
            self._unpin()
        super()._fail(client, exc)

    def close(self) -> None:
        self._unpin()
        super().close()


def rank_of(vllm_config) -> tuple[int, int]:
    """(tp_rank, pp_rank) of this worker."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        return get_tp_group().rank_in_group, get_pp_group().rank_in_group
    except Exception:
        pc = vllm_config.parallel_config
        rank = getattr(pc, "rank", 0)
        return rank % pc.tensor_parallel_size, rank // pc.tensor_parallel_size


# vLLM cache dtypes stored as they are computed (no quantization, no scales): "auto" is the
# model's dtype, which the KV tensors' element type names
_UNQUANTIZED = frozenset({"auto", "float16", "bfloat16", "float32", "half", "float"})


def _fp8_fnuz() -> bool:
    """Whether this platform stores fp8 as float8_e4m3fnuz (ROCm MI300), which reads the bytes
    of float8_e4m3fn otherwise. Asked of vLLM only where it is loaded (it is in a worker)."""
    mod = sys.modules.get("vllm.platforms")
    try:
        return bool(mod is not None and mod.current_platform.is_fp8_fnuz())
    except Exception:
        return False


def _layer_scales(layer) -> list | None:
    """The K and V scales an attention layer quantizes its KV with (per tensor or per head)."""
    if layer is None:
        return None
    out = []
    for name in ("_k_scale", "_v_scale"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            out.append(t.detach().to("cpu", torch.float64).reshape(-1).tolist())
        else:
            v = getattr(layer, name + "_float", None)
            out.append(None if v is None else float(v))
    return out


def kv_encoding(vllm_config, tensor_dtype: str, layer_names) -> str:
    """The fingerprint's ``kv_dtype``: how this worker's KV bytes encode the K and V values.

    The tensors' element type(s) say it all for an unquantized cache (and then nothing is
    added: the keys stay what they were). A quantized cache adds what the tensors cannot tell:
    vLLM allocates fp8, fp8_e4m3 and fp8_e5m2 alike as uint8, and the scales each layer
    quantizes with (from the checkpoint, 1.0 without one) are not in the tensors at all:

        "<element types> cache_dtype=<each layer's cache dtype> kv_scales=<source>[ fp8=fnuz]"

    The layers (vLLM's attention modules, in ``compilation_config.static_forward_context``)
    give their effective cache dtype and scales; without them (another vLLM), the config's
    cache dtype and ``kv_scales=model`` (the scales follow from model, revision and
    quantization, which the fingerprint holds). ``calculate_kv_scales`` (older vLLM) gives
    ``kv_scales=calculated``: scales from the engine's first batch, which no other engine shares.
    Only the worker can read this: the scheduler half takes it from the worker's handshake.
    """
    cc = vllm_config.cache_config
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None)
    layers = [ctx.get(n) for n in layer_names] if isinstance(ctx, dict) else []
    found = [L for L in layers if L is not None]
    dtypes = {str(getattr(L, "kv_cache_dtype", None) or "auto") for L in found}
    if len(found) < len(layer_names) or not found:
        dtypes.add(str(getattr(cc, "cache_dtype", None) or "auto"))
    if dtypes <= _UNQUANTIZED:
        return tensor_dtype
    if getattr(cc, "calculate_kv_scales", False):
        scales = "calculated"
    elif found:
        values = repr([_layer_scales(L) for L in layers]).encode()
        scales = "sha256:" + hashlib.sha256(values).hexdigest()[:32]
    else:
        scales = "model"
    enc = f"{tensor_dtype} cache_dtype={','.join(sorted(dtypes))} kv_scales={scales}"
    if any(d.startswith("fp8") for d in dtypes) and _fp8_fnuz():
        enc += " fp8=fnuz"
    return enc


def fingerprint(vllm_config, settings: ConnectorSettings, chunk_size: int, layout: str,
                kv_dtype: str, tp_rank: int, pp_rank: int) -> Fingerprint:
    """The fingerprint of one rank's KV. ``layout`` and ``kv_dtype`` come from the worker
    (layout_tag() and kv_encoding()): the scheduler half gets them from its handshake."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    return Fingerprint(
        model=str(mc.model), revision=str(settings.revision or getattr(mc, "revision", None) or ""),
        kv_dtype=kv_dtype, layout=layout, block_size=cc.block_size, chunk_size=chunk_size,
        tp_size=pc.tensor_parallel_size, tp_rank=tp_rank,
        pp_size=pc.pipeline_parallel_size, pp_rank=pp_rank,
        hash_algo=str(getattr(cc, "prefix_caching_hash_algo", "sha256")),
        variant=weights_variant(getattr(mc, "quantization", None), getattr(mc, "hf_overrides", None),
                                getattr(mc, "hf_config", None)))


class WorkerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        self.vllm_config, self.settings = vllm_config, settings
        self.ns = settings.namespace
        self.block_size = vllm_config.cache_config.block_size
        self.chunk_size = settings.resolve_chunk_size(self.block_size)
        self.cb = self.chunk_size // self.block_size
        self.num_blocks = kv_cache_config.num_blocks
        self.tp_rank, self.pp_rank = rank_of(vllm_config)
        pc = vllm_config.parallel_config  # each rank reads its share of a chunk: the tokens it saves
        self._tokens_per_key = self.chunk_size // max(1, pc.tensor_parallel_size * pc.pipeline_parallel_size)
        self.link = _WorkerLink(settings.address, timeout_s=settings.worker_timeout_s,
                                retry_s=settings.retry_s, token=settings.token, tls=settings.tls,
                                name=f"kvtier worker tp{self.tp_rank}/pp{self.pp_rank}",
                                unpin=self._unpin_arena)
        self.copier: BlockCopier | None = None
        self.fp: Fingerprint | None = None
        self._digest = b""
        self._scopes: dict[tuple[str, str], bytes] = {}
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-store")
        # xxh3 releases the GIL: loads check their chunks on several cores
        self._hash_pool = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)),
                                             thread_name_prefix="kvtier-verify")
        # stores send checksums with Commit: None = on CUDA only (see _hash_stores)
        self.hash_stores: bool | None = None
        self._lock = threading.Lock()
        self._landed = threading.Condition(self._lock)  # an asynchronous load or a store finished
        self._loads_running = 0
        self._recv_done: set[str] = set()
        self._load_errors: set[int] = set()
        self._errors_out: set[int] = set()
        self._store_pending: dict[str, int] = defaultdict(int)
        self._store_reqs: set[str] = set()
        self._finishing: set[str] = set()
        self._store_futures: list[Future] = []
        self._sync_failed: StepMeta | None = None  # the step whose synchronous load failed
        # counters, added to by the engine, load and store threads: through _count only
        self.stats = defaultdict(int)
        self._stats_lock = threading.Lock()
        self._quiet = Quiet()

    # ---- setup --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            self.copier = BlockCopier(kv_caches, self.num_blocks)
        except ValueError as e:  # a layout this connector cannot copy: run without kvtier
            log.error("kvtier worker: cannot copy this KV layout (%s); the connector stays off", e)
            return
        encoding = kv_encoding(self.vllm_config, self.copier.kv_dtype(), list(kv_caches))
        if " kv_scales=calculated" in encoding:
            log.error("kvtier worker: calculate_kv_scales takes the KV scales from this engine's "
                      "first batch, so no other engine's quantized KV has the same bytes (nor this "
                      "one's after a restart); the connector stays off")
            self.copier = None
            return
        self.fp = fingerprint(self.vllm_config, self.settings, self.chunk_size,
                              layout_tag(self.copier.layout()), encoding,
                              self.tp_rank, self.pp_rank)
        self._digest = self.fp.digest()
        try:
            self.link.call(lambda c: c.attach())
            self._pin_arena()
        except Exception as e:  # the daemon may come later: every call reconnects
            log.warning("kvtier worker: daemon not reachable at start (%s); running without it "
                        "until it is", e)
        log.info("kvtier worker tp%d/pp%d: %d layers, %d bytes per block, chunks of %d blocks "
                 "(%d bytes), path %s", self.tp_rank, self.pp_rank, len(self.copier.layers),
                 self.copier.block_bytes, self.cb, self.copier.record_size(self.cb),
                 self.link.path or "-")

    def _pin_arena(self, client=None) -> None:
        """Register the arena for DMA (CUDA only; again after the daemon restarted)."""
        if self.copier is None or not self.copier.cuda:
            return
        client = client or self.link._client
        self.copier.register_host(client.arena_view() if client is not None else None)

    def _unpin_arena(self) -> None:
        """The link is about to drop its client and unmap the arena: unregister it first."""
        if self.copier is not None:
            self.copier.unregister_host()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def handshake(self) -> RankLayout | None:
        if self.fp is None:
            return None
        return RankLayout(layout=self.fp.layout, kv_dtype=self.fp.kv_dtype, path=self.link.path)

    def _keys(self, tenant: str, salt: str, hashes) -> list[bytes]:
        scope = self._scopes.get((tenant, salt))
        if scope is None:
            if len(self._scopes) > 4096:
                self._scopes.clear()
            scope = self._scopes[(tenant, salt)] = scope_digest(self._digest, tenant, salt)
        return [chunk_key(scope, h) for h in hashes]

    # ---- loads --------------------------------------------------------------------------

    def start_load_kv(self, meta: StepMeta) -> None:
        if not meta.loads:
            return
        if self.copier is None:  # no KV registered: nothing can load, let vLLM recompute
            failed = {b for s in meta.loads for b in s.block_ids}
            self._finish_loads(meta.loads, failed, meta.load_async)
        elif meta.load_async:
            with self._lock:
                self._loads_running += 1
            self._load_pool.submit(self._run_async_loads, list(meta.loads))
            return
        else:
            failed = self._run_loads(meta.loads, False)
        if failed and not meta.load_async:
            # this step's forward runs on the failed blocks: what it computes must not be stored
            self._sync_failed = meta

    def _run_async_loads(self, specs: list[LoadSpec]) -> None:
        try:
            self._run_loads(specs, True)
        finally:
            with self._lock:
                self._loads_running -= 1
                self._landed.notify_all()

    def _run_loads(self, specs: list[LoadSpec], is_async: bool) -> set[int]:
        failed: set[int] = set()
        try:
            jobs: dict[str, _Jobs] = {}  # per namespace: (key, first block in chunk, blocks)
            for s in specs:
                keys = self._keys(s.tenant, s.cache_salt, s.chunk_hashes)
                pos = 0
                for j, key in enumerate(keys):
                    start = s.first if j == 0 else 0
                    n = min(self.cb - start, len(s.block_ids) - pos)
                    if n <= 0:
                        break
                    ns = s.namespace or self.ns
                    jobs.setdefault(ns, _Jobs(ns)).append((key, start, s.block_ids[pos:pos + n]))
                    pos += n
            for part in jobs.values():
                failed |= self.link.call(lambda c: self._load_jobs(c, part))
        except Exception as e:
            failed |= {b for s in specs for b in s.block_ids}
            self._count("load_failures")
            self._quiet.warn("load", "kvtier: load of %d request(s) failed (%s); vLLM recomputes them",
                             len(specs), e)
        else:
            self._pin_loaded(specs, failed)
        self._finish_loads(specs, failed, is_async)
        return failed

    def _pin_loaded(self, specs: list[LoadSpec], failed: set[int]) -> None:
        """Pin the chunks a request asking for pins (pin, ttl) loaded: no store names them (they
        are stored already), so the request's pin would otherwise depend on where its hit came
        from. A chunk whose blocks failed to load is not pinned (it is recomputed and stored)."""
        groups: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        for s in specs:
            if not s.pin:
                continue
            keys = self._keys(s.tenant, s.cache_salt, s.chunk_hashes)
            pos = 0
            for j, key in enumerate(keys):
                n = min(self.cb - (s.first if j == 0 else 0), len(s.block_ids) - pos)
                if n <= 0:
                    break
                if not failed.intersection(s.block_ids[pos:pos + n]):
                    groups[(s.namespace or self.ns, s.pin_s)].append(key)
                pos += n
        for (ns, pin_s), keys in groups.items():
            try:
                self.link.call(lambda c: c.pin(ns, keys, pin_s))
            except Exception as e:  # loaded all the same
                self._count("pin_failures")
                self._quiet.warn("pin", "kvtier: pin of %d loaded chunk(s) failed (%s); they stay unpinned",
                                 len(keys), e)

    def _finish_loads(self, specs, failed: set[int], is_async: bool) -> None:
        with self._lock:
            self._load_errors |= failed
            if is_async:
                self._recv_done.update(s.req_id for s in specs)

    def _load_jobs(self, client, jobs) -> set[int]:
        failed: set[int] = set()
        size = self.copier.record_size(self.cb)
        ns = getattr(jobs, "namespace", self.ns)
        keys = [k for k, _, _ in jobs]
        if client.path == "":
            client.attach()
        if client.path != "arena":
            # verified by the client; counted as the arena's read below is
            datas = client.get_many(ns, keys, counted=False, tokens_per_key=self._tokens_per_key)
            for (key, start, blocks), data in zip(jobs, datas):
                if data is None or len(data) != size:
                    failed.update(blocks)
                    continue
                self.copier.load(memoryview(data), self.cb, start, blocks)
                self._count("loaded_chunks")
            return failed
        self._pin_arena(client)
        step = max(1, client.info.max_batch or 1024)
        bad: list[bytes] = []
        for i in range(0, len(jobs), step):
            part = jobs[i:i + step]
            # the scheduler's Acquire counted these hits (and the misses): this read counts only the
            # prefill it saves, its share of each chunk's tokens (kvtier_prefill_tokens_saved_total)
            lease = client.acquire(ns, [k for k, _, _ in part], self.settings.lease_ms, counted=False,
                                   tokens_per_key=self._tokens_per_key)
            try:
                found = []
                for job, view, digest in zip(part, lease.views, lease.checksums):
                    if view is None or len(view) != size:
                        failed.update(job[2])
                    else:
                        found.append((job, view, digest))
                check = [self.settings.verify and digest != ZERO_CHECKSUM for _, _, digest in found]
                # on a GPU the copies are DMA: the checksums run on other cores meanwhile (the
                # lease keeps the slots); on CPU the copies already take the cores, and handing
                # chunks to threads costs more than it saves
                sums = [self._hash_pool.submit(xxhash.xxh3_128_digest, view) if c else None
                        for (_, view, _), c in zip(found, check)] if self.copier.cuda else None
                self.copier.load_many([(view, self.cb, start, blocks)
                                       for (_, start, blocks), view, _ in found])
                if sums is None:
                    sums = [_Done(xxhash.xxh3_128_digest(view)) if c else None
                            for (_, view, _), c in zip(found, check)]
                loaded = 0
                for ((key, _, blocks), _, digest), fut in zip(found, sums):
                    if fut is not None and fut.result() != digest:
                        self._count("checksum_failures")
                        log.warning("kvtier: chunk %s failed its checksum; recomputing it", key.hex()[:16])
                        failed.update(blocks)
                        bad.append(key)
                    else:
                        loaded += 1
            finally:
                try:
                    client.release(lease)
                except errors.UnknownLease:
                    # expired during the copy: the slots may hold other blocks by now
                    loaded = 0
                    failed.update(b for _, _, blocks in part for b in blocks)
            self._count("loaded_chunks", loaded)
        if bad:  # drop what cannot be read back, so the recomputed chunk is stored again
            try:
                client.delete(ns, bad)
            except errors.KvtierError:
                pass
        return failed

    # ---- stores -------------------------------------------------------------------------

    def wait_for_save(self, meta: StepMeta) -> None:
        bad_step, self._sync_failed = self._sync_failed is meta, None
        if meta.deletes and self.copier is not None:
            # after the stores queued in earlier steps (they may be storing these chunks), before
            # this step's: the store thread runs its jobs in order
            self._submit_store(self._run_deletes, list(meta.deletes))
        if not meta.stores:
            return
        specs = list(meta.stores)
        with self._lock:
            for s in specs:
                self._store_pending[s.req_id] += 1
                self._store_reqs.add(s.req_id)
        if bad_step:
            # A synchronous load of this step failed and the forward ran on what it left in
            # the blocks. Every chunk of a request on those blocks (its own, or another's
            # through vLLM's prefix cache) may be computed on bad KV and would pass its
            # checksum: store nothing this step. The requests still count as sent, and the
            # scheduler half plans these chunks again after vLLM recomputed them.
            n = sum(len(s.chunk_hashes) for s in specs)
            self._count("stores_dropped", n)
            self._quiet.warn("dropped", "kvtier: a synchronous load failed; not storing the %d "
                             "chunk(s) computed in that step", n)
            self._stores_done(specs)
            return
        if self.copier is None:
            self._stores_done(specs)
            return
        self._submit_store(self._run_stores, specs, self.copier.compute_done_event())

    def _submit_store(self, fn, *args) -> None:
        fut = self._store_pool.submit(fn, *args)
        with self._lock:
            self._store_futures = [f for f in self._store_futures if not f.done()] + [fut]

    def _run_stores(self, specs: list[StoreSpec], after) -> None:
        try:
            groups: dict[tuple, _Jobs] = {}
            for s in specs:
                keys = self._keys(s.tenant, s.cache_salt, s.chunk_hashes)
                ns = s.namespace or self.ns
                for key, blocks in zip(keys, s.block_ids):
                    groups.setdefault((ns, s.pin, s.pin_s, s.overwrite), _Jobs(ns)).append((key, blocks))
            for (ns, pin, pin_s, overwrite), jobs in groups.items():
                try:
                    self.link.call(lambda c: self._store_jobs(c, jobs, after, overwrite))
                except Exception as e:
                    self._count("store_failures")
                    self._quiet.warn("store", "kvtier: store of %d chunk(s) failed (%s); they stay misses",
                                     len(jobs), e)
                    continue
                if pin:
                    try:
                        self.link.call(lambda c: c.pin(ns, [k for k, _ in jobs], pin_s))
                    except Exception as e:  # stored all the same: hits, evictable as any block
                        self._count("pin_failures")
                        self._quiet.warn("pin", "kvtier: pin of %d stored chunk(s) failed (%s); they stay "
                                         "stored, unpinned", len(jobs), e)
        finally:
            self._stores_done(specs)

    def _run_deletes(self, specs: list[DeleteSpec]) -> None:
        keys: dict[str, list[bytes]] = defaultdict(list)
        for s in specs:
            keys[s.namespace or self.ns] += self._keys(s.tenant, s.cache_salt, s.chunk_hashes)
        for ns, ks in keys.items():
            try:
                self.link.call(lambda c: c.delete(ns, ks))
            except Exception as e:  # never into the engine
                self._count("delete_failures")
                self._quiet.warn("delete", "kvtier: could not delete %d chunk(s) computed on a failed "
                                 "load (%s); they stay until stored again with overwrite", len(ks), e)

    def _stores_done(self, specs) -> None:
        with self._lock:
            for s in specs:
                self._store_pending[s.req_id] -= 1
            self._landed.notify_all()

    def _store_jobs(self, client, jobs, after, overwrite: bool = False) -> None:
        ns = getattr(jobs, "namespace", self.ns)
        size = self.copier.record_size(self.cb)
        if client.path == "":
            client.attach()
        if client.path != "arena":
            items = []
            for key, blocks in jobs:
                buf = bytearray(size)
                self.copier.save(blocks, memoryview(buf), after)
                items.append((key, buf))
            client.put_many(ns, items, overwrite)
            self._count("stored_chunks", len(items))
            return
        self._pin_arena(client)
        per = max(1, min(client.info.max_batch or 1024, (client.info.arena_size // 4) // max(1, size)))
        for i in range(0, len(jobs), per):
            part = jobs[i:i + per]
            res = client.reserve(ns, [k for k, _ in part], [size] * len(part), overwrite=overwrite)
            try:
                todo = [(blocks, view) for (_, blocks), view in zip(part, res.views)
                        if view is not None]  # None: already stored
                sums: list = [None] * len(todo) if self._hash_stores() else []

                def landed(i: int, j: int) -> None:
                    for k in range(i, j):
                        sums[k] = self._hash_pool.submit(xxhash.xxh3_128_digest, todo[k][1])
                self.copier.save_many(todo, after, landed if sums else None)
                digests = [f.result() for f in sums]
                self._count("stored_chunks", len(todo))
            except BaseException:
                try:
                    client.abort(res)
                except errors.KvtierError:
                    pass
                raise
            client.commit(res, digests)

    def _hash_stores(self) -> bool:
        """Whether stores hash their records and send the checksums with Commit. On a GPU the
        copies are DMA: each group of records is hashed on other cores as soon as it has landed
        while the next group is on the bus, and the daemon (``ram.verify_on_commit =
        "background"``) commits without hashing the slots itself before it answers. On CPU the
        copies already take the cores and the daemon's own pass at commit costs the same."""
        return self.hash_stores if self.hash_stores is not None else bool(self.copier.cuda)

    def handle_preemptions(self, meta: StepMeta) -> None:
        """Blocks of preempted requests are reused by this step: finish their stores first."""
        if not meta.preempted:
            return
        with self._lock:
            busy = any(self._store_pending.get(r, 0) for r in meta.preempted)
            futs = list(self._store_futures)
        if busy:
            wait(futs)
        with self._lock:  # done: the scheduler half no longer waits for them (build_connector_meta)
            for r in meta.preempted:
                self._store_reqs.discard(r)
                self._store_pending.pop(r, None)

    # ---- completion ---------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str], idle: bool = False) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose stores finished (sending) and whose asynchronous loads did (receiving).
        ``idle``: the step computed nothing, so the engine would only call again at once; with
        loads running and none landed, or a finished request's stores still running, wait up
        to IDLE_WAIT_S for one to end (the GIL goes to the load or store thread meanwhile,
        instead of to a loop of empty steps)."""
        with self._lock:
            self._finishing.update(r for r in finished_req_ids if r in self._store_reqs)
            sent = self._sent_now()
            if idle and not sent and not self._recv_done and (self._loads_running or self._finishing):
                self._landed.wait(IDLE_WAIT_S)   # nothing to report yet
                sent = self._sent_now()
            for r in sent:
                self._finishing.discard(r)
                self._store_reqs.discard(r)
                self._store_pending.pop(r, None)
            recv, self._recv_done = self._recv_done, set()
            self._errors_out |= self._load_errors
            self._load_errors = set()
        return (sent or None), (recv or None)

    def _sent_now(self) -> set[str]:  # lock held
        """The finished requests whose stores have all ended."""
        return {r for r in self._finishing if self._store_pending.get(r, 0) <= 0}

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            out, self._errors_out = self._errors_out, set()
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the stores queued so far; True if they all finished in time."""
        with self._lock:
            futs = list(self._store_futures)
        return not wait(futs, timeout).not_done

    def shutdown(self) -> None:
        self._load_pool.shutdown(wait=True)
        self._store_pool.shutdown(wait=True)
        self._hash_pool.shutdown(wait=True)
        if self.copier is not None:
            self.copier.close()
        self.link.close()
