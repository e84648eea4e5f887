"""The gRPC service: proto messages in, hot-tier calls, proto messages out.

Owns no state and no policy: every rule lives in ``kvtier.hot``. Each handler
validates its request (namespace, key sizes, batch limits), calls the tier,
and maps a ``KvtierError`` to its status code; any other exception is logged
and becomes INTERNAL, so no request can kill the daemon. Hashing of block
bytes runs in worker threads, never on the event loop.

The unary handlers also answer calls that arrive on the data channel
(``KVTierService.call``, the OP_CALL frame): the same coroutine runs on the
connection's thread with a ``ChannelContext`` in place of gRPC's, so checks,
status codes, metrics and logs are one implementation. Off the event loop a
handler never waits for it, except for the cluster tier, whose connections
live on the loop: those steps are handed to it.
"""
from __future__ import annotations

import asyncio
import functools
import os
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import xxhash

from . import __version__, copying, datachannel, errors
from .hot import checksum
from .auth import token_from_metadata
from .cluster import NullCluster
from .commitcheck import hash_at_commit
from .keys import CHECKSUM_SIZE, KEY_SIZES, check_key, check_namespace, unpack_keys
from .v1 import kvtier_pb2 as pb
from .v1 import kvtier_pb2_grpc as pb_grpc

log = logging.getLogger("kvtier.service")
GET_CHUNK = 1 << 20
HASH_THREADS = max(1, os.cpu_count() or 1)
LOOP_WAIT_S = 60.0  # longest a data-channel call waits for a step handed to the event loop
ZERO_ON_LOOP = 1 << 20  # slots a Reserve zeroes on the event loop, bytes at most; more on a thread
_SERVICE = pb.DESCRIPTOR.services_by_name["KVTier"]
# unary RPC name -> its request class: what the data channel may call
UNARY = {m.name: getattr(pb, m.input_type.name) for m in _SERVICE.methods
         if not (m.client_streaming or m.server_streaming)}
_hashers: ThreadPoolExecutor | None = None
_hashers_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """Threads that hash the shares of a large commit beside the thread that asked (copying.spread)."""
    global _hashers
    with _hashers_lock:
        if _hashers is None:
            _hashers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="kvtier-hash")
        return _hashers


def _zero_all(slots: list[memoryview]) -> None:
    for v in slots:
        copying.zero(v)


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class ChannelContext:
    """What the handlers use of grpc's ServicerContext, for a call from the data channel: the
    caller's token (from the connection's HELLO) as metadata, its peer, and abort()."""

    def __init__(self, token: str | None, peer: str):
        self._md = (("authorization", f"Bearer {token}"),) if token else ()
        self._peer = peer
        self.code, self.details = grpc.StatusCode.OK, ""

    def invocation_metadata(self):
        return self._md

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


class _Outcome:
    """Maps what a handler raised to its status, and times it (one place for unary and streams)."""

    def __init__(self, service, name: str, context):
        self.s, self.name, self.ctx = service, name, context

    async def __aenter__(self):
        self.t0, self.code = time.perf_counter(), "OK"
        return self

    async def __aexit__(self, et, e, tb):
        status = None
        if isinstance(e, asyncio.CancelledError):
            self.code = "CANCELLED"
        elif isinstance(e, errors.KvtierError):
            self.code, status = e.code.name, (e.code, str(e))
        elif isinstance(e, Exception) and not isinstance(e, grpc.aio.AbortError):
            self.code, status = "INTERNAL", (grpc.StatusCode.INTERNAL, f"internal error in {self.name}: {et.__name__}")
            log.error("%s failed", self.name, exc_info=(et, e, tb))
        # timed before the status goes out: a caller that has its answer finds the call counted
        self.s.d.metrics.observe(self.name, self.code, time.perf_counter() - self.t0)
        if status is not None:
            await self.ctx.abort(*status)
        return False


def _handler(fn):
    """KvtierError -> its status; anything else -> INTERNAL (logged); every call timed."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        async with _Outcome(self, fn.__name__, context):
            return await fn(self, request, context)
    return wrapper


def _stream_handler(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        async with _Outcome(self, fn.__name__, context):
            async for item in fn(self, request, context):
                yield item
    return wrapper


class KVTierService(pb_grpc.KVTierServicer):
    def __init__(self, daemon):
        self.d = daemon
        self.hot = daemon.store  # the tiered store; hot-tier calls pass through it
        self.view: memoryview = daemon.arena.view
        self.cfg = daemon.cfg
        self.max_batch = daemon.cfg.server.max_batch
        self.loop = asyncio.get_running_loop()
        self._pin_warned = 0.0  # when a Pin last logged blocks left unpinned (ram.max_pinned)
        self._socket_mode = int(daemon.cfg.server.socket_mode, 8)

    def call(self, method: str, payload, token: str | None, peer: str) -> tuple[grpc.StatusCode, str, bytes]:
        """Run a unary RPC for a caller on the data channel, on the calling thread. Returns (status,
        details, serialized response); the handler is the gRPC one, with its checks and metrics."""
        cls = UNARY.get(method)
        if cls is None:
            return grpc.StatusCode.UNIMPLEMENTED, "Method not found!", b""
        try:
            request = cls.FromString(payload)
        except Exception:  # protobuf's DecodeError, or a message too deeply nested
            return grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.__name__}", b""
        ctx = ChannelContext(token, peer)
        coro = getattr(self, method)(request, ctx)
        try:
            try:
                coro.send(None)
            except StopIteration as done:
                return grpc.StatusCode.OK, "", done.value.SerializeToString()
            coro.close()  # it waited for the loop: a step below is missing its off-loop path
            log.error("%s waited for the event loop on a data-channel thread", method)
            return grpc.StatusCode.INTERNAL, f"internal error in {method}: RuntimeError", b""
        except grpc.aio.AbortError:
            return ctx.code, ctx.details, b""

    def _loop_run(self, coro):
        """Run a coroutine of the cluster tier (its connections live on the loop) from a data-channel
        thread, and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(LOOP_WAIT_S)

    def _tenant(self, ctx):
        """The caller's tenant (None when single-tenant); UNAUTHENTICATED without a valid token."""
        return self.d.access.identify(token_from_metadata(ctx.invocation_metadata()))

    def _count_saved(self, ns: str, a, tokens_per_key: int) -> None:
        """The prefill a read spared its caller: the keys it found x the caller's tokens_per_key."""
        self.hot.count_tokens_saved(ns, (len(a.tiers) - a.tiers.count(0)) * tokens_per_key)

    def _trusted_with_arena(self, ctx) -> bool:
        """Whether the caller may see any bytes of the arena: without tenants, every caller (no
        isolation is promised); with tenants, a caller on a Unix socket that only the arena's
        group can open (it can map the arena file). Another caller's Reserve gets its slots
        zeroed: a slot holds the bytes of whatever block was there before, another tenant's,
        and a Commit without writing (a caller that cannot map the arena cannot write it) would
        store them in the caller's namespace for it to read back."""
        return not self.d.access.enabled or ctx.peer().startswith("unix:") and not self._socket_mode & 0o007

    def _ns(self, ns: str, ctx) -> str:
        check_namespace(ns)
        self.d.access.authorize(self._tenant(ctx), ns)
        return ns

    def _keys(self, req, ctx) -> tuple[str, list[bytes]]:
        ns = self._ns(req.namespace, ctx)
        return ns, unpack_keys(req.keys, req.key_size, self.max_batch)

    async def _hash(self, slots: list[tuple[int, int]]) -> list[bytes]:
        """xxh3-128 of each slot; large batches are split over the cores (xxh3 releases the GIL)."""
        view = self.view
        total = sum(n for _, n in slots)
        if total < (256 << 10):
            return [checksum(view[o:o + n]) for o, n in slots]
        parts = max(1, min(len(slots), HASH_THREADS, total // (1 << 20)))

        def hash_share(share):
            return [checksum(view[o:o + n]) for o, n in share]
        if _on_loop():  # the loop only waits: its share goes to a worker thread too
            return await asyncio.to_thread(copying.spread, _hash_pool(), hash_share, slots, parts)
        return copying.spread(_hash_pool(), hash_share, slots, parts)  # a data-channel thread hashes a share

    async def _drop_replaced(self, rid: int) -> None:
        """An overwrite's old NVMe copy is unlinked before its commit answers (Store.drop_replaced),
        off the loop."""
        if self.hot.replaces_on_nvme(rid):
            if _on_loop():
                await asyncio.to_thread(self.hot.drop_replaced, rid)
            else:
                self.hot.drop_replaced(rid)

    async def _commit(self, rid: int, given: bytes) -> bytes:
        slots = self.hot.begin_commit(rid)
        try:
            await self._drop_replaced(rid)
            # trusted (None): with "background" the hot tier queues the blocks for kvtier.commitcheck
            computed = await self._hash(slots) if hash_at_commit(self.cfg.ram.verify_on_commit, given) else None
        except BaseException:
            self.hot.discard(rid)
            raise
        return self.hot.finish_commit(rid, computed, given)

    async def _tiered(self, on_loop, blocking, *args):
        """A store call that may ask the cluster tier (whose connections live on the loop): awaited
        on the loop. On a data-channel thread: without a cluster tier, its blocking form on this
        thread (what the async form runs, NVMe reads and unlinks in a worker, which this thread may
        as well be), else the async form handed to the loop."""
        if _on_loop():
            return await on_loop(*args)
        if isinstance(self.hot.cluster, NullCluster):
            return blocking(*args)
        return self._loop_run(on_loop(*args))

    async def _acquire(self, ns, keys, lease_ms=0, prefix_only=False, background=False, counted=True):
        if background:  # without a cluster tier, on this thread: its NVMe reads go to a pool
            return await self._tiered(functools.partial(self.hot.acquire_async, background=True, counted=counted),
                                      functools.partial(self.hot.acquire_background, counted=counted),
                                      ns, keys, lease_ms, prefix_only)
        return await self._tiered(functools.partial(self.hot.acquire_async, counted=counted),
                                  functools.partial(self.hot.acquire, counted=counted), ns, keys, lease_ms,
                                  prefix_only)

    async def _lookup(self, ns, keys):
        if _on_loop() or isinstance(self.hot.cluster, NullCluster):  # without a cluster it never waits
            return await self.hot.lookup_async(ns, keys)
        return self._loop_run(self.hot.lookup_async(ns, keys))

    async def _delete(self, ns, keys):
        return await self._tiered(self.hot.delete_async, self.hot.delete, ns, keys)

    # ---- RPCs -----------------------------------------------------------------------------

    @_handler
    async def Attach(self, request, context):
        self._tenant(context)
        a = self.d.arena
        data_address = self.d.data_address_for(context.peer())
        return pb.AttachResponse(
            arena_path=a.path, arena_size=a.size, generation=a.generation, data_offset=a.data_offset,
            data_address=data_address, max_block_bytes=self.hot.max_block_bytes,
            max_batch=self.max_batch, key_sizes=list(KEY_SIZES),
            max_message_bytes=self.cfg.server.max_message_bytes, version=__version__,
            default_lease_ms=self.hot.lease_ms, default_reservation_ms=self.hot.reservation_ms,
            data_channel_version=datachannel.VERSION if data_address else 0, max_ttl_ms=self.d.hot.max_ttl_ms)

    @_handler
    async def Lookup(self, request, context):
        ns, keys = self._keys(request, context)
        tiers, prefix = await self._lookup(ns, keys)
        return pb.LookupResponse(tiers=tiers, prefix_len=prefix)

    def _check_generation(self, gen: int) -> None:
        if gen and gen != self.d.arena.generation:
            raise errors.StaleArena(f"arena generation {gen} is gone (now {self.d.arena.generation}); attach again")

    @_handler
    async def Reserve(self, request, context):
        self._check_generation(request.generation)
        ns, keys = self._keys(request, context)
        r = self.hot.reserve(ns, keys, list(request.sizes), request.ttl_ms, request.overwrite)
        if not self._trusted_with_arena(context):  # whatever it commits unwritten reads as zeros
            slots = [self.view[off:off + size] for st, off, size in zip(r.status, r.offsets, request.sizes)
                     if st == 0]
            if _on_loop() and sum(map(len, slots)) > ZERO_ON_LOOP:  # a batch of large blocks: seconds
                await asyncio.to_thread(_zero_all, slots)
            else:
                _zero_all(slots)
        return pb.ReserveResponse(reservation_id=r.reservation_id, status=r.status, offsets=r.offsets,
                                  ttl_ms=r.ttl_ms)

    @_handler
    async def Commit(self, request, context):
        self._tenant(context)
        digests = await self._commit(request.reservation_id, request.checksums)
        return pb.CommitResponse(committed=len(digests) // CHECKSUM_SIZE, checksums=digests)

    @_handler
    async def Abort(self, request, context):
        self._tenant(context)
        self.hot.abort(request.reservation_id)
        return pb.AbortResponse()

    @_handler
    async def Acquire(self, request, context):
        self._check_generation(request.generation)
        ns, keys = self._keys(request, context)
        a = await self._acquire(ns, keys, request.lease_ms, request.prefix_only, request.background,
                                not request.uncounted)
        self._count_saved(ns, a, request.tokens_per_key)
        return pb.AcquireResponse(lease_id=a.lease_id, tiers=a.tiers, offsets=a.offsets, lengths=a.lengths,
                                  checksums=a.checksums, lease_ms=a.lease_ms)

    @_handler
    async def Release(self, request, context):
        self._tenant(context)
        self.hot.release(request.lease_id)
        return pb.ReleaseResponse()

    @_handler
    async def Put(self, request_iterator, context):
        sums: list[bytes] = []
        status = bytearray()
        stored = 0
        cur = None  # [rid or 0, offset, length, written, hasher, given]
        chunks = request_iterator.__aiter__()
        try:
            while True:
                try:
                    if cur is None:
                        chunk = await chunks.__anext__()
                    else:  # a client stalled mid-block must not hold its slot forever (as on the data channel)
                        async with asyncio.timeout(datachannel.PAYLOAD_TIMEOUT_S):
                            chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"no data for {datachannel.PAYLOAD_TIMEOUT_S:g}s after {cur[3]} of {cur[2]} bytes of "
                        f"block {len(sums)}; its reservation was aborted") from None
                if chunk.HasField("header"):
                    if cur is not None:
                        raise errors.InvalidArgument(f"block {len(sums)} ended after {cur[3]} of {cur[2]} bytes")
                    h = chunk.header
                    ns = self._ns(h.namespace, context)
                    key = check_key(h.key)
                    if h.checksum and len(h.checksum) != CHECKSUM_SIZE:
                        raise errors.InvalidArgument(f"checksum must be {CHECKSUM_SIZE} bytes")
                    if h.length == 0:
                        raise errors.InvalidArgument("block size must be >= 1 byte")
                    r = self.hot.reserve(ns, [key], [h.length], overwrite=h.overwrite, expires=False)
                    status.append(r.status[0])
                    cur = [r.reservation_id, r.offsets[0], h.length, 0, xxhash.xxh3_128(), h.checksum]
                elif cur is None:
                    raise errors.InvalidArgument("data before the first header")
                data = chunk.data
                if data:
                    if cur is None:
                        raise errors.InvalidArgument("data after a complete block without a new header")
                    rid, off, length, written, hasher, _ = cur
                    if written + len(data) > length:
                        raise errors.InvalidArgument(f"block {len(sums)} is longer than its header's {length} bytes")
                    if rid:
                        self.view[off + written:off + written + len(data)] = data
                    hasher.update(data)
                    cur[3] = written + len(data)
                if cur is not None and cur[3] == cur[2]:
                    rid, _, _, _, hasher, given = cur
                    digest = hasher.digest()
                    if given and given != digest:
                        if rid:
                            self.hot.discard(rid)
                        cur = None
                        raise errors.DataLoss(f"checksum mismatch for block {len(sums)}; not stored")
                    if rid:
                        self.hot.begin_commit(rid)
                        try:
                            await self._drop_replaced(rid)
                        except BaseException:
                            self.hot.discard(rid)
                            raise
                        # the digest was computed over exactly the bytes written to the slot
                        self.hot.finish_commit(rid, [digest], given)
                        stored += 1
                    sums.append(digest)
                    cur = None
            if cur is not None:
                raise errors.InvalidArgument(f"stream ended after {cur[3]} of {cur[2]} bytes of block {len(sums)}")
        finally:
            if cur is not None and cur[0]:
                self.hot.discard(cur[0])
        return pb.PutResponse(checksums=b"".join(sums), stored=stored, status=bytes(status))

    @_stream_handler
    async def Get(self, request, context):
        ns, keys = self._keys(request, context)
        chunk = request.chunk_bytes or GET_CHUNK
        chunk = min(chunk, max(1 << 16, self.cfg.server.max_message_bytes - 1024))
        a = await self._acquire(ns, keys, counted=not request.uncounted)
        self._count_saved(ns, a, request.tokens_per_key)
        try:
            for i in range(len(keys)):
                tier, off, n = a.tiers[i], a.offsets[i], a.lengths[i]
                head = pb.GetHeader(index=i, tier=tier, length=n,
                                    checksum=a.checksums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE] if tier else b"")
                if not tier:
                    yield pb.GetChunk(header=head)
                    continue
                first = True
                for p in range(0, n, chunk):
                    data = bytes(self.view[off + p:off + min(n, p + chunk)])
                    yield pb.GetChunk(header=head, data=data) if first else pb.GetChunk(data=data)
                    first = False
        finally:
            if a.lease_id:
                try:
                    self.hot.release(a.lease_id)
                except errors.UnknownLease:
                    if not context.cancelled():  # a client gone mid-stream: its lease ran out meanwhile
                        log.warning("lease of a Get stream expired before it finished; the client verifies "
                                    "checksums")

    @_handler
    async def Delete(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.DeleteResponse(deleted=await self._delete(ns, keys))

    @_handler
    async def Pin(self, request, context):
        ns, keys = self._keys(request, context)
        hot = self.d.hot
        refused = hot.pins_refused
        pinned = self.hot.pin(ns, keys, request.ttl_s)
        refused = hot.pins_refused - refused  # (a concurrent Pin's refusals may be counted in too)
        now = time.monotonic()
        if refused > 0 and now >= self._pin_warned + 10.0:  # at most every 10 s
            self._pin_warned = now
            log.warning("%d blocks left unpinned: pinned blocks would pass ram.max_pinned of the arena (%d of "
                        "at most %d bytes pinned) or of their tenant's ram_quota; raise it, or pin less "
                        "(prewarm: promote.ram_budget)",
                        refused, hot.pinned_bytes, hot.max_pinned_bytes)
        return pb.PinResponse(pinned=pinned)

    @_handler
    async def Unpin(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.UnpinResponse(unpinned=self.hot.unpin(ns, keys))

    @_handler
    async def Stats(self, request, context):
        tenant = self._tenant(context)
        if request.namespace:
            self._ns(request.namespace, context)
        s = self.hot.snapshot()
        a = self.d.arena
        cc = s["commit_checks"]
        # RAM's hits are the reads no lower tier served (as the metrics count them); its misses,
        # the reads it could not serve, whether a lower tier then did or not
        below = sum(s.get("nvme_hits_by_namespace", {}).values()) + sum(s.get("cluster_hits_by_namespace", {}).values())
        counted = [*s["namespaces"].values(), s["folded"]]  # folded: namespaces since forgotten
        ram = pb.TierStats(
            name="ram", capacity_bytes=s["capacity_bytes"], used_bytes=s["used_bytes"], blocks=s["blocks"],
            hits=sum(n.hits - n.lower_hits for n in counted),
            misses=sum(n.misses for n in counted) + below,
            checksum_failures=cc["failures"] if cc is not None else 0,
            evictions=s["evictions"], policy=s["policy"], largest_free_bytes=s["largest_free_bytes"],
            reserved_bytes=s["reserved_bytes"], pinned_blocks=s["pinned_blocks"],
            leased_blocks=s["leased_blocks"], locked=a.locked, lock_detail=a.lock_detail, backing=a.backing,
            huge_pages=a.huge_pages)
        tiers = [ram]
        cl = s["cluster"]
        if cl is not None:
            tiers.append(pb.TierStats(
                name="cluster", hits=cl["hits"], misses=cl["misses"], checksum_failures=cl["checksum_failures"],
                evictions=cl["evictions"],
                # writes not done: dropped from the queue, or failed (a quota refusal is one of those)
                io_errors=cl["errors"], dropped_writes=cl["dropped"] + cl["put_failures"],
                queued_bytes=cl["queued_bytes"],
                policy=cl["write_policy"], backing=cl["mode"],
                degraded=[] if cl["connected"] else ["disconnected"]))
        c = s["nvme"]
        if c is not None:
            tiers.append(pb.TierStats(
                name="nvme", capacity_bytes=c["capacity_bytes"], used_bytes=c["used_bytes"], blocks=c["blocks"],
                evictions=c["evictions"], hits=c["hits"], misses=c["misses"],
                checksum_failures=c["checksum_failures"], io_errors=c["io_errors"],
                dropped_writes=c["dropped_writes"] + c["queue_dropped"], queued_bytes=c["queued_bytes"],
                promotions=c["promotions"], demotions=c["demotions"],
                degraded=[d["path"] for d in c["dirs"] if d["degraded"]],
                direct_io=all(d["direct_io"] for d in c["dirs"] if not d.get("missing")),
                bounce_reads=c["bounce_reads"]))
        nss = []
        saved = s["prefill_tokens_saved_by_namespace"]
        for name, n in sorted(s["namespaces"].items()):
            if request.namespace and name != request.namespace:
                continue
            if not self.d.access.allowed(tenant, name):
                continue
            nss.append(pb.NamespaceStats(
                name=name, blocks=n.blocks, bytes=n.bytes, hits=n.hits, misses=n.misses, puts=n.puts,
                put_bytes=n.put_bytes, get_bytes=n.get_bytes, evictions=n.evictions, lookups=n.lookups,
                prefill_tokens_saved=saved.get(name, 0)))
        return pb.StatsResponse(
            version=__version__, uptime_s=time.monotonic() - self.d.started, generation=a.generation,
            arena_path=a.path, leases=s["leases"], reservations=s["reservations"], tiers=tiers,
            namespaces=nss, expired_leases=s["expired_leases"], expired_reservations=s["expired_reservations"])
