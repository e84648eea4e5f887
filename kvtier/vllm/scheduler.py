"""Scheduler half: decides what to load and what to store (engine core process, one per engine).

Loads: when vLLM admits a request, ``get_num_new_matched_tokens`` derives the keys of the
prompt's chunks past vLLM's own hit, for every TP x PP rank, and asks the daemon (Acquire,
prefix only, background): that both finds the longest prefix present on every rank and leases
those chunks, so eviction cannot take them before a worker has copied them. Chunks on NVMe or
in the cluster tier are answered at once and read into RAM after the answer, joining the
lease as they land (the worker's own Acquire waits for those still landing): vLLM's scheduler
waits for this call, and with it every running request, so it must not wait for disk or
network reads (gigabytes for a long context). A prompt with more
keys than the daemon takes in one call (``max_batch``) is asked in parts of whole chunks,
until a part is not wholly present; the request holds every part's lease. The answer is
that prefix minus vLLM's hit, loaded asynchronously by default (``load_async``); a synchronous
load never covers the whole prompt (vLLM must compute at least one token). The lease is
released when every worker reported the load done (or when the request ends). vLLM asks
again at every step for a request it has no room for yet: the lease and the answer are kept
for it meanwhile (up to half of ``lease_ms``), not asked of the daemon each time.

Stores: every step, ``build_connector_meta`` turns chunks that the step fills (prompt chunks,
chunked prefill included, and with ``store_decode`` chunks filled by generated tokens) into
store jobs for the workers. A request that had store jobs is freed only after every worker
reports them done (``request_finished`` returns True), so a store never reads a reused block.
A step whose synchronous load fails stores nothing (the workers drop its stores: its forward
ran on the failed blocks); when vLLM reports the failed blocks, the requests that had stores
in that step plan those chunks again. Only the ranks whose load failed know it, though, and
at TP > 1 the forward's all-reduce carries the bad KV into every rank's later layers; and with
async scheduling (or pipeline parallelism) vLLM builds the next steps before it reports the
failure, so a chunked prefill may go on computing on the bad KV there. So when vLLM reports
failed blocks of a synchronous load, the scheduler deletes from the daemon, on every rank,
every chunk planned for storing in that step and in every step built after it, and plans
those chunks again (``_taint``). A worker may still be storing them then: the next step
also tells every worker to delete them, after the stores it queued before (``deletes``).

Namespaces: a request's chunks live in the engine's namespace, or with ``tenant_namespace``
in its tenant's own (``RequestOptions.namespace``); lookups, loads and stores all use it.

Failure: a daemon that is down or slow makes ``get_num_new_matched_tokens`` answer 0 (a miss)
within ``timeout_s``, and the link then skips the daemon for ``retry_s`` before reconnecting.
A request whose load failed is never offered kvtier's KV from its first failed block on
again: the same load would likely fail again, and when it fails before any valid block vLLM
asks again, which would offer the same hit for ever instead of recomputing. Errors that are
not about the connection (a refused lease, bad input) are logged as warnings, at most one
per ``WARN_EVERY_S`` per kind. A daemon without an arena for this process (on another node)
is asked with Lookup (no lease) instead of Acquire, and Acquire is tried again after
``LOOKUP_RETRY_S`` or on a new connection.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from .keys import chunk_key, check_hash_stability, scope_digest
from .link import DaemonLink, Quiet
from .meta import DeleteSpec, LoadSpec, RankLayout, StepMeta, StoreSpec
from .settings import ConnectorSettings, RequestOptions, request_options
from .worker import fingerprint

log = logging.getLogger("kvtier.vllm")

# daemon tier number -> vLLM cache-hit source name (see get_external_cache_hit_sources)
TIER_SOURCES = {1: "host", 2: "disk", 3: "external_unspecified"}
# after an Acquire found no arena (daemon on another node), Lookup only for this long
LOOKUP_RETRY_S = 60.0
WARN_EVERY_S = 10.0


def _taken(loads: list) -> int:
    """Tokens taken from kvtier by a request's loads, each once: a request preempted and resumed
    loads its prefix again; a load that failed counts up to its first failed block."""
    spans = sorted((ld.start, ld.end if ld.cut < 0 else ld.cut) for ld in loads)
    n, reach = 0, 0
    for lo, hi in spans:
        lo = max(lo, reach)
        if hi > lo:
            n += hi - lo
            reach = hi
    return n


@dataclass
class _Load:
    """A load into a request's blocks: block_ids[0] is the request's block b0; tokens
    [start, end) come from kvtier."""
    req_id: str
    b0: int
    block_ids: list[int]
    start: int
    end: int
    cut: int = -1                   # first token not taken after all (a failure), -1 = end
    freed: bool = False             # the request was preempted since: its blocks went back to vLLM
    leases: list = field(default_factory=list)  # the lookup's, until the step is reported


@dataclass
class _Step:
    """A step built while synchronous loads may fail: its synchronous loads and its stores,
    {req_id: (next_store before the step, chunks planned, specs)}."""
    seq: int
    loads: list[_Load]
    planned: dict[str, tuple[int, int, list[StoreSpec]]]


@dataclass
class _Req:
    request: Any                    # vllm.v1.request.Request (its block_hashes grow)
    opts: RequestOptions
    scopes: list[bytes]             # per rank
    local: int = 0                  # vLLM's own hit at the last lookup (tokens)
    ext: int = 0                    # tokens offered from kvtier at the last lookup
    chunk_tiers: list[int] = field(default_factory=list)  # from chunk local//chunk_size on
    loads: list = field(default_factory=list)  # its _Loads: the tokens taken from kvtier (loaded_tokens)
    hit_tiers: dict[str, int] = field(default_factory=dict)
    block_ids: list[int] = field(default_factory=list)
    next_store: int = 0             # first chunk not yet stored or known present
    load: _Load | None = None       # an asynchronous load not yet reported received
    redo: set[int] = field(default_factory=set)  # chunks whose stored copy may be bad: replace them
    redo_at: int = 0                # ... in a step built from this one on (see _taint)
    stored_chunks: int = 0
    stores_issued: bool = False
    failed_at: int | None = None    # first token of a block whose load failed: no hit past it
    asked_at: float = 0.0           # time.monotonic() of the lookup that offered ``ext``

    @property
    def loaded(self) -> int:
        """Tokens loaded from kvtier (less those whose load failed), a reload after a
        preemption not again."""
        return _taken(self.loads)


class SchedulerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        self.vllm_config, self.kv_cache_config, self.settings = vllm_config, kv_cache_config, settings
        cc, pc = vllm_config.cache_config, vllm_config.parallel_config
        self.ns = settings.namespace
        _refuse_dcp(pc, kv_cache_config)
        self.block_size = cc.block_size
        self.chunk_size = settings.resolve_chunk_size(self.block_size)
        self.cb = self.chunk_size // self.block_size
        self.hash_algo = check_hash_stability(str(getattr(cc, "prefix_caching_hash_algo", "sha256")))
        self.ranks = [(pp, tp) for pp in range(pc.pipeline_parallel_size)
                      for tp in range(pc.tensor_parallel_size)]
        self.enabled = len(getattr(kv_cache_config, "kv_cache_groups", [None])) == 1
        if not self.enabled:
            log.error("kvtier: %d KV cache groups (hybrid model); the connector handles one: "
                      "disabled", len(kv_cache_config.kv_cache_groups))
        self.digests: list[bytes] | None = None  # per rank, once the workers sent their layout
        self.link = DaemonLink(settings.address, timeout_s=settings.timeout_s, retry_s=settings.retry_s,
                               token=settings.token, tls=settings.tls, name="kvtier scheduler")
        # daemon on another node: Lookup instead of Acquire, on this connection until then
        self._lookup_client: Any = None
        self._lookup_until = 0.0
        self._reqs: dict[str, _Req] = {}
        self._leases: dict[str, list[Any]] = {}
        self._loads: list[LoadSpec] = []
        self._load_recs: list[_Load] = []  # the synchronous loads among _loads
        self._recving: set[str] = set()    # requests with an asynchronous load in flight
        # Steps built while a synchronous load's outcome may be unknown: vLLM reports a step's
        # outcome after it has built up to max_concurrent_batches - 1 more steps (async
        # scheduling, pipeline parallelism); one more for margin. Steps built before those
        # have been reported: their loads are done (see update_connector_output).
        self._seq = 0
        self._window = max(1, int(getattr(vllm_config, "max_concurrent_batches", 1) or 1)) + 1
        self._steps: deque[_Step] = deque()
        self._deletes: list[DeleteSpec] = []  # for the workers, with the next step (see _taint)
        self._quiet = Quiet(WARN_EVERY_S)
        self._warned_layout = False

    # ---- setup --------------------------------------------------------------------------

    def set_layouts(self, layouts: dict[tuple[int, int], Any]) -> None:
        """Each rank's RankLayout, keyed (pp_rank, tp_rank), from the workers' handshake."""
        digests = []
        for pp, tp in self.ranks:
            m = layouts.get((pp, tp))
            if not isinstance(m, RankLayout):
                log.error("kvtier: no KV layout from worker pp%d/tp%d; the connector stays off", pp, tp)
                return
            fp = fingerprint(self.vllm_config, self.settings, self.chunk_size, m.layout, m.kv_dtype, tp, pp)
            digests.append(fp.digest())
        self._check_lease_ms()
        self.digests = digests
        log.info("kvtier: connector ready: namespace %s, chunks of %d tokens, %d rank(s), %s loads",
                 self.ns, self.chunk_size, len(self.ranks), "async" if self.settings.load_async else "sync")

    def _check_lease_ms(self) -> None:
        """The daemon refuses a lease longer than its ram.max_ttl_ms: with such a lease_ms no
        lookup would ever hit (nor any worker's load). ConfigError at start if the daemon
        tells its limit at Attach; otherwise each refused lookup says so (_lookup_failed)."""
        if not self.settings.lease_ms:
            return
        try:
            info = self.link.call(lambda c: c.info)
        except Exception as e:
            log.info("kvtier: lease_ms not checked against the daemon at start (%s)", e)
            return
        limit = int(getattr(info, "max_ttl_ms", 0) or 0)  # 0: a daemon that does not tell it
        if limit and self.settings.lease_ms > limit:
            raise errors.ConfigError(
                f"kv_connector_extra_config.lease_ms={self.settings.lease_ms} is above the daemon's "
                f"ram.max_ttl_ms={limit}: it refuses every lease that long, so nothing would ever "
                f"load from kvtier; set lease_ms to at most {limit}")

    def _lookup_failed(self, req_id: str, e: Exception) -> None:
        if isinstance(e, errors.InvalidArgument) and "lease_ms" in str(e):
            self._quiet.warn("lease_ms", "kvtier: the daemon refuses leases of kv_connector_extra_config."
                             "lease_ms=%d ms (%s): it is above the daemon's ram.max_ttl_ms, so nothing "
                             "loads from kvtier; lower lease_ms", self.settings.lease_ms, e, level=logging.ERROR)
        else:
            self._quiet.warn(type(e).__name__, "kvtier: lookup for %s failed (%s: %s); a miss",
                             req_id, type(e).__name__, e)

    def _ready(self) -> bool:
        if self.digests is None and self.enabled and not self._warned_layout:
            self._warned_layout = True
            log.error("kvtier: the workers' KV layout never arrived (handshake); the connector "
                      "neither loads nor stores")
        return self.enabled and self.digests is not None

    @property
    def hash_block_size(self) -> int:
        return getattr(self.kv_cache_config, "hash_block_size", None) or self.block_size

    def _state(self, request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            opts = request_options(getattr(request, "kv_transfer_params", None), self.settings,
                                   warn=lambda m: log.warning("kvtier: request %s: %s", request.request_id, m))
            salt = getattr(request, "cache_salt", None) or ""
            scopes = [scope_digest(d, opts.tenant, salt) for d in (self.digests or [])]
            st = self._reqs[request.request_id] = _Req(request, opts, scopes)
        return st

    def _chunk_hash(self, request, c: int) -> bytes:
        per = self.chunk_size // self.hash_block_size
        return bytes(request.block_hashes[(c + 1) * per - 1])

    def _num_chunks(self, request, num_tokens: int) -> int:
        return min(num_tokens, len(request.block_hashes) * self.hash_block_size) // self.chunk_size

    # ---- loads --------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if not self._ready():
            return 0, False
        st = self._state(request)
        if (st.ext and st.local == num_computed_tokens and request.request_id in self._leases
                and time.monotonic() - st.asked_at < self.settings.lease_ms / 2000):
            # asked again, not admitted last time (no room yet): the chunks offered then are
            # still leased; asking the daemon at every step would count them as hits each time
            return st.ext, self.settings.load_async
        self._release(request.request_id)  # asked again after a while: look again
        st.local, st.ext, st.chunk_tiers = num_computed_tokens, 0, []
        if not st.opts.load or getattr(request, "skip_reading_prefix_cache", False):
            # prompt logprobs (or an explicit skip): vLLM computes every prompt token and drops
            # any hit offered, so leasing chunks (and counting them as hits) would be for nothing
            return 0, False
        first = num_computed_tokens // self.chunk_size
        n = self._num_chunks(request, request.num_tokens)
        if first >= n:
            return 0, False
        R = len(self.ranks)
        hashes = [self._chunk_hash(request, c) for c in range(first, n)]
        keys = [chunk_key(scope, h) for h in hashes for scope in st.scopes]
        try:
            tiers, leases = self.link.call(lambda c: self._find(c, st.opts.namespace, keys))
        except (errors.Unavailable, errors.DeadlineExceeded) as e:  # the link warns about these
            log.debug("kvtier: lookup for %s failed: %s", request.request_id, e)
            return 0, False
        except Exception as e:
            self._lookup_failed(request.request_id, e)
            return 0, False
        present = next((i for i, t in enumerate(tiers) if not t), len(tiers)) // R
        if leases:
            self._leases[request.request_id] = leases
        hit = (first + present) * self.chunk_size
        if st.failed_at is not None and hit > st.failed_at:
            hit = st.failed_at  # this request's load failed there: it recomputes from there
        if not self.settings.load_async and hit >= request.num_tokens:
            # a synchronous load must leave vLLM at least one token to compute: load every
            # whole block but the last (the last chunk is then loaded in part)
            hit = (request.num_tokens - 1) // self.block_size * self.block_size
        present = max(0, -(-hit // self.chunk_size) - first)
        ext = hit - num_computed_tokens
        if ext <= 0:
            self._release(request.request_id)
            return 0, False
        st.ext, st.asked_at = ext, time.monotonic()
        st.chunk_tiers = [max(tiers[c * R:(c + 1) * R]) for c in range(present)]
        return ext, self.settings.load_async

    def _find(self, client, ns: str, keys: list[bytes]) -> tuple[list[int], list[Any]]:
        """Tiers of ``keys`` and the leases that hold the present prefix: Acquire, or Lookup
        (no lease) while this connection has no arena (the daemon is on another node). That
        is asked again after LOOKUP_RETRY_S, and at once on a new connection."""
        if client is not self._lookup_client or time.monotonic() >= self._lookup_until:
            try:
                return self._acquire_prefix(client, ns, keys)
            except errors.FailedPrecondition as e:  # no arena here: the daemon is remote
                if self._lookup_client is not client:
                    log.info("kvtier: %s; looking up without leases (trying again every %.0fs)",
                             e, LOOKUP_RETRY_S)
                self._lookup_client, self._lookup_until = client, time.monotonic() + LOOKUP_RETRY_S
        tiers, _ = client.lookup(ns, keys)  # the client splits a Lookup by max_batch itself
        return tiers, []

    def _acquire_prefix(self, client, ns: str, keys: list[bytes]) -> tuple[list[int], list[Any]]:
        """Tiers of ``keys`` (0 past the longest present prefix, or fewer of them) and the leases
        that hold that prefix. The daemon refuses a call with more than ``max_batch`` keys, so
        a long prompt (at TP=8, about 131K tokens with the defaults) is asked in parts of whole
        chunks (every rank's key), each only if the part before it was wholly present."""
        R = len(self.ranks)
        per = max(1, (client.info.max_batch or 1024) // R) * R
        tiers: list[int] = []
        leases: list[Any] = []
        try:
            for i in range(0, len(keys), per):
                # background: chunks on NVMe or in the cluster tier are read into RAM after the
                # answer (joining the lease), not while every running request waits for this step.
                # The prefill saved is counted by the workers' reads (what is loaded, not offered)
                lease = client.acquire(ns, keys[i:i + per], self.settings.lease_ms, prefix_only=True,
                                       background=True)
                if lease.id:
                    leases.append(lease)
                tiers += lease.tiers
                if not all(lease.tiers):
                    break
        except BaseException:
            for lease in leases:
                try:
                    client.release(lease)
                except errors.KvtierError:
                    pass  # expired or daemon gone: the lease ends by itself
            raise
        return tiers, leases

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0:
            st.load = None
            if st.ext:  # offered but not taken (vLLM kept its own hit): nothing will load
                st.ext = 0
                self._release(request.request_id)
            return
        block_ids = blocks.get_block_ids()[0]
        bs, cs = self.block_size, self.chunk_size
        b0, nb = st.local // bs, num_external_tokens // bs
        c0 = st.local // cs
        c1 = -(-(st.local + num_external_tokens) // cs)
        spec = LoadSpec(request.request_id, st.opts.tenant, getattr(request, "cache_salt", None) or "",
                        [self._chunk_hash(request, c) for c in range(c0, c1)],
                        (st.local % cs) // bs, list(block_ids[b0:b0 + nb]), st.opts.namespace,
                        pin=st.opts.pin, pin_s=st.opts.pin_s)
        self._loads.append(spec)
        load = _Load(request.request_id, b0, spec.block_ids, st.local, st.local + num_external_tokens)
        if self.settings.load_async:  # its lease ends when every worker reported it received
            st.load = load
            self._recving.add(request.request_id)
        else:  # its outcome is known with the step's (see _steps), and its lease ends then: the
            st.load = None  # workers have taken leases of their own to copy by then
            load.leases = self._leases.pop(request.request_id, [])
            self._load_recs.append(load)
        st.loads.append(load)
        st.next_store = max(st.next_store, (st.local + num_external_tokens) // cs)
        st.hit_tiers = {}
        for i, tier in enumerate(st.chunk_tiers[:c1 - c0]):
            lo = max((c0 + i) * cs, st.local)
            hi = min((c0 + i + 1) * cs, st.local + num_external_tokens)
            src = TIER_SOURCES.get(tier, "external_unspecified")
            st.hit_tiers[src] = st.hit_tiers.get(src, 0) + max(0, hi - lo)
        st.ext = 0

    def hit_sources(self, request, num_external_tokens: int) -> dict[str, int]:
        st = self._reqs.get(request.request_id)
        if not num_external_tokens:
            return {}
        if st is None or sum(st.hit_tiers.values()) != num_external_tokens:
            return {"external_unspecified": num_external_tokens}
        return {k: v for k, v in st.hit_tiers.items() if v}

    def _release(self, req_id: str) -> None:
        """End the request's leases: its lookup's, and those of its synchronous loads in steps
        not reported yet (an engine that goes idle builds no step that would end them)."""
        leases = list(self._leases.pop(req_id, ()))
        for step in self._steps:
            for load in step.loads:
                if load.req_id == req_id:
                    leases += load.leases
                    load.leases = []
        self._release_leases(leases)

    def _end_leases(self, step: _Step) -> None:
        for load in step.loads:
            leases, load.leases = load.leases, []
            self._release_leases(leases)

    def _release_leases(self, leases) -> None:
        for lease in leases:
            try:
                self.link.call(lambda c: c.release(lease))
            except Exception:
                pass  # expired or daemon gone: the lease ends by itself

    def update_connector_output(self, output) -> None:
        invalid = getattr(output, "invalid_block_ids", None)
        if invalid:  # vLLM recomputes these blocks: store their chunks again afterwards
            for st in self._reqs.values():  # asynchronous loads (reported with or before their end)
                if st.load is not None:
                    self._failed(st, st.load, invalid)
            self._sync_failed(invalid)
        for req_id in getattr(output, "finished_recving", None) or ():
            self._recving.discard(req_id)
            st = self._reqs.get(req_id)
            if st is not None:
                st.load = None  # done: its blocks are the request's own from now on
            self._release(req_id)

    def _sync_failed(self, invalid: set[int]) -> None:
        """Synchronous loads of the steps whose outcome may not have been reported yet (the
        last ``_window`` steps built): the oldest step with a load into ``invalid`` and every
        step built after it computed on the failed blocks (see _taint)."""
        first = None
        for step in self._steps:
            if step.seq <= self._seq - self._window:
                continue  # reported already: its blocks may belong to other requests by now
            for load in step.loads:
                if any(b in invalid for b in load.block_ids):
                    first = step if first is None else first
                    st = self._reqs.get(load.req_id)
                    if st is not None and not load.freed:
                        self._failed(st, load, invalid)
            kept, failed = [], []
            for ld in step.loads:
                (failed if any(b in invalid for b in ld.block_ids) else kept).append(ld)
            step.loads = kept
            self._end_leases(_Step(step.seq, failed, {}))  # reported, and over: their leases end
        if first is not None:
            self._taint([step for step in self._steps if step.seq >= first.seq])

    def _failed(self, st: _Req, load: _Load, invalid: set[int]) -> bool:
        """Apply a failure in ``load``'s blocks: vLLM recomputes from the first failed one."""
        bad = next((i for i, b in enumerate(load.block_ids) if b in invalid), None)
        if bad is None:
            return False
        block = load.b0 + bad
        st.next_store = min(st.next_store, block // self.cb)
        failed = block * self.block_size
        st.failed_at = failed if st.failed_at is None else min(st.failed_at, failed)
        # recomputed from there, not loaded (once: ranks may report their failures apart)
        cut = load.end if load.cut < 0 else load.cut
        load.cut = min(cut, max(load.start, failed))
        return True

    def _taint(self, steps: list[_Step]) -> None:
        """Steps whose forward ran on blocks whose synchronous load failed. The ranks whose
        load failed dropped the first one's stores, but the others stored it (their KV is
        bad too past the TP all-reduce), and later steps built before the failure was known
        stored chunks computed on it on every rank. A stored chunk is never replaced by a
        later store of the same key, so: delete every chunk those steps planned, on every
        rank, and plan them again (the requests vLLM recomputes store them once recomputed).
        The delete here takes the copies stored by now. A rank may still be storing one (its
        store thread runs behind the steps; with async scheduling a step built before the
        failure was reported may not even have run), so the next step built carries the
        chunks to every worker as ``deletes``: each rank deletes its own keys on its store
        thread, after every store it queued in earlier steps and before any store of that
        step or a later one, whether the request still runs or not. The chunks planned again
        are stored once vLLM has reported every one of those steps, with ``overwrite``: they
        replace a copy that a failed delete left."""
        keys: dict[str, list[bytes]] = defaultdict(list)
        for step in steps:
            planned, step.planned = step.planned, {}
            for req_id, (before, n, specs) in planned.items():
                st = self._reqs.get(req_id)
                if st is not None:
                    st.next_store = min(st.next_store, before)
                    st.stored_chunks -= n
                    st.redo.update(range(before, before + n))
                    st.redo_at = self._seq + self._window - 1  # steps up to _seq reported by then
                for spec in specs:
                    keys[spec.namespace or self.ns] += self._spec_keys(spec)
                    self._deletes.append(DeleteSpec(spec.tenant, spec.cache_salt, spec.chunk_hashes,
                                                    spec.namespace))
        self._delete(keys, "computed on a failed load")

    def _spec_keys(self, spec: StoreSpec) -> list[bytes]:
        scopes = [scope_digest(d, spec.tenant, spec.cache_salt) for d in (self.digests or [])]
        return [chunk_key(scope, h) for h in spec.chunk_hashes for scope in scopes]

    def _delete(self, keys: dict[str, list[bytes]], why: str) -> None:
        for ns, ks in keys.items():
            if not ks:
                continue
            try:
                self.link.call(lambda c: c.delete(ns, ks))
            except Exception as e:
                self._quiet.warn("delete", "kvtier: could not delete %d key(s) %s (%s)", len(ks), why, e)

    # ---- stores -------------------------------------------------------------------------

    def build_connector_meta(self, so) -> StepMeta:
        # vLLM builds a step's metadata at every schedule, with or without requests of ours:
        # the deletes go out with the first step built after _taint, before its stores
        meta = StepMeta(loads=self._loads, load_async=self.settings.load_async, deletes=self._deletes,
                        preempted=set(getattr(so, "preempted_req_ids", None) or ()),
                        idle=getattr(so, "total_num_scheduled_tokens", 1) == 0)
        self._loads, load_recs, self._load_recs, self._deletes = [], self._load_recs, [], []
        self._seq += 1
        while self._steps and self._steps[0].seq <= self._seq - self._window:
            self._end_leases(self._steps.popleft())  # reported: its loads are done
        if not self._ready():
            return meta
        for req_id in meta.preempted:
            # the workers finish a preempted request's stores before its blocks are reused and
            # then forget them: vLLM need not wait for them when it frees the request (a resumed
            # request aborted during its load is freed when the load is reported, and a second
            # report as sent would free it twice)
            st = self._reqs.get(req_id)
            if st is not None:
                st.stores_issued = False
                st.load = None  # its blocks go back to vLLM: a failure in them is not its own
            for step in self._steps:
                for load in step.loads:
                    if load.req_id == req_id:
                        load.freed = True
        planned: dict[str, tuple[int, int, list[StoreSpec]]] = {}
        if not meta.load_async:
            self._steps.append(_Step(self._seq, load_recs, planned))
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._plan_store(st, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta, planned)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(nb[0]) if nb else []
            elif nb:
                st.block_ids.extend(nb[0])
            self._plan_store(st, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta, planned)
        return meta

    def _plan_store(self, st: _Req, done_tokens: int, meta: StepMeta,
                    planned: dict[str, tuple[int, int, list[StoreSpec]]]) -> None:
        if not st.opts.store:
            return
        req = st.request
        limit = done_tokens if self.settings.store_decode else min(done_tokens, req.num_prompt_tokens)
        n = min(self._num_chunks(req, limit), len(st.block_ids) // self.cb)
        if n <= st.next_store:
            return
        cs = range(st.next_store, n)
        redo = [c for c in cs if c in st.redo]
        if redo and self._seq < st.redo_at:
            return  # once the tainted steps are reported (see _taint)
        specs = []
        for part, again in ((redo, True), ([c for c in cs if c not in st.redo], False)):
            if not part:
                continue
            spec = StoreSpec(
                req.request_id, st.opts.tenant, getattr(req, "cache_salt", None) or "",
                [self._chunk_hash(req, c) for c in part],
                [st.block_ids[c * self.cb:(c + 1) * self.cb] for c in part],
                pin=st.opts.pin, pin_s=st.opts.pin_s, namespace=st.opts.namespace)
            spec.overwrite = again  # replace a bad copy the workers' delete missed (see _taint)
            specs.append(spec)
        meta.stores += specs
        st.redo.difference_update(redo)
        planned[req.request_id] = (st.next_store, n - st.next_store, specs)
        st.stored_chunks += n - st.next_store
        st.next_store = n
        st.stores_issued = True

    def request_finished(self, request) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if request.request_id not in self._recving:
            # no asynchronous load in flight (whose lease ends with its finished-recving)
            self._release(request.request_id)
        if st is None:
            return False, None
        params = {"kvtier": {
            "namespace": st.opts.namespace,
            "chunk_size": self.chunk_size,
            "loaded_tokens": st.loaded,
            "stored_chunks": st.stored_chunks,
            "stored_tokens": st.stored_chunks * self.chunk_size,
            "cached_tokens": st.next_store * self.chunk_size,
        }}
        if st.opts.tenant:
            params["kvtier"]["tenant"] = st.opts.tenant
        if st.opts.return_keys and st.scopes:
            # chunk by chunk, every rank's key of the chunk: what a Lookup of the prefix asks
            params["kvtier"]["ranks"] = len(st.scopes)
            params["kvtier"]["keys"] = [chunk_key(scope, self._chunk_hash(request, c)).hex()
                                        for c in range(st.next_store) for scope in st.scopes]
        return st.stores_issued, params

    def shutdown(self) -> None:
        for req_id in list(self._leases):
            self._release(req_id)
        for step in self._steps:
            self._end_leases(step)
        self.link.close()


def _refuse_dcp(pc, kv_cache_config) -> None:
    """Decode context parallelism: vLLM's scheduler blocks then hold block_size x DCP tokens
    (each rank's block a share of them), while chunks, keys and the workers' copies count
    blocks of block_size tokens: loads would go into blocks vLLM does not count as loaded."""
    dcp = int(getattr(pc, "decode_context_parallel_size", 1) or 1)
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    spec = getattr(groups[0], "kv_cache_spec", None) if groups else None
    if dcp > 1 and getattr(spec, "dcp_sharded", True):
        raise errors.ConfigError(
            f"kvtier: decode context parallelism (decode_context_parallel_size={dcp}, "
            "--decode-context-parallel-size) is not supported by the kvtier connector: run with "
            "decode_context_parallel_size=1, or without the connector")
