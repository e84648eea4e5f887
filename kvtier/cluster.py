"""The cluster tier: blocks shared by every node through Redis or Valkey (standalone or Cluster).

A prefix computed on node A serves node B: every daemon writes the blocks it
commits (or evicts) to the same server(s) and reads them back on a local miss.

Interface (coroutines run on the daemon's event loop, the one that ran start()):

    tier = from_config(cfg.cluster)    # ClusterTier, or NullCluster (holds nothing) when url = ""
    await tier.start()                 # returns at once; connects in the background, never raises
    tier.enqueue_put(ns, key, data, checksum, on_done=None, replaces=False) -> bool   # never blocks; any thread
    await tier.exists_many(ns, keys, timeout_s=None) -> [bool]   # within lookup_timeout_ms by default
    await tier.get(ns, key, into=None) -> (block bytes, checksum) | None
    await tier.get_many(ns, keys, into=None) -> [(block bytes, checksum) | None]
    await tier.delete_many(ns, keys) -> int
    tier.set_tenants(group_of, quotas)  # namespace -> tenant, tenant -> redis quota in bytes
    await tier.enforce_quotas() -> int  # evict what a lowered quota no longer holds
    await tier.close(timeout) -> bool  # drains the write queue for up to timeout seconds
    tier.snapshot() -> dict            # NullCluster: None

Keys and slots: a block lives at ``<prefix>:<namespace>:{<key hex>}`` and its
part i, if split, at ``...:{<key hex>}:<i>``. The Cluster hash tag is the
key's digest alone, so a namespace's blocks spread evenly over all 16384
slots and every master, while a block and its parts share one slot (one
master, one UNLINK).

Values (``kvtier.clustervalue``): a block is one record in the block format
(unaligned header with namespace, key, lengths, xxh3-128 of the raw bytes,
created/expires; raw or lz4 payload under the NVMe tier's rules). TTL
(``namespace_ttl_s``, else ``ttl_s``) is both a server-side expiry and the
record's ``expires``.

Parts and atomicity: with ``part_bytes`` > 0 a longer record is cut into
parts, each prefixed by an envelope with a random write id; parts 1..n-1 are
written first and part 0 (at the block's key) last. A reader reads part 0,
then the others, and accepts a part only with part 0's write id. Each SET is
atomic, so a read racing an overwrite gets the old block, the new one, or a
miss (``torn_reads``), never a mix; the checksum is still checked over the
whole. An overwrite with fewer parts unlinks the parts it no longer uses. A
split write that fails once any of its parts may have landed (a part or part 0
refused, e.g. out of memory; the connection lost) unlinks the block with every
part name it, or the value it replaces, made: else those parts stay for ever
(a delete finds parts through part 0) and an old part 0 over new parts is
present for Lookup and a torn miss for get.
Default: whole values (one GET is atomic by itself): parts cost on PUT and win
GET only sometimes, on one server (``docs/benchmarks-cluster.md``).

Movement: ``enqueue_put`` queues the block (bounded by ``queue_bytes``; a full
queue drops and counts, calling on_done at once) for writer tasks that
pipeline over ``connections`` connections per server (small blocks queued
together go out as one pipeline per server, ``BATCH_*``); on_done runs once the
server acknowledged, failed or the put was dropped. Writes of one key land in
the order they were made: a put of a key replaces its put still queued (whose
on_done runs at once), and a key is never in two writes at a time (a put of a
key being written waits for that write to end). A delete cancels the puts of
its keys still queued and waits for those being written before it unlinks,
so no write made before it lands after it. An overwrite (``replaces``) that is
dropped or fails unlinks its key instead, unless a later put of the key is
queued: other nodes then miss rather than read the old content. An unlink
that cannot be made (its server down or unreachable: a delete, a quota
eviction, that unlink, the removal of a failed split write) waits in a
bounded set (``unlinks_pending``; ``PENDING_MAX`` names, past it lost: logged,
``unlinks_lost``) and is made once the server answers (one that answers and
refuses it, a slot left migrating, is asked less and less often, down to once
per ``reconnect_max_s``); meanwhile a get of such a key is a miss, and the key's next write makes the unlink first. Reads group keys by
master (all masters at once; per master one block in flight, widening to about
``READ_WINDOW_BYTES`` of small blocks) and receive payloads straight into their
final buffer (``kvtier.resp``): a fresh one, or the caller's when it passes ``into``
(e.g. an arena slot: no copy and no fresh memory, the fastest path). Lookups
are one pipelined round trip per batch per master.

Quotas (``kvtier.clusterquota``): with tenants, each tenant's bytes in Redis
are accounted in Redis itself (one sorted set and hash per tenant), so daemons
sharing a server enforce one quota; a write over it first evicts the tenant's
own least recently used blocks (``evictions``), never another tenant's. A
block this daemon has reserved but not written yet (an earlier one of the same
batch, or one another writer task holds) that a later reservation gives up is
not written, or is unlinked once written (``evictions``, not ``put_failures``),
so what a tenant holds in Redis stays what its accounting holds. Which of two
reservations came later is told by the place each script returns in the
tenant's order, not by the order their replies reach the writer tasks (over
several connections they may arrive the other way round): a block given up by
a reservation made before its own is the old value it replaces, and stays.

Integrity: every read is verified: header check, names and lengths, then the
xxh3-128 of the raw bytes after decompression. A corrupt record is a miss; it
is unlinked (with all its parts) and counted in ``checksum_failures``. A record
of a format version this daemon does not read (another kvtier's, during a
rolling upgrade) is a miss counted in ``version_skips`` and left in place.
A value of another type (a hash, a list) at a block's name is a corrupt record
too: the prefix is kvtier's namespace. exists_many reads each value's first
bytes (GETRANGE), so a lookup and a get agree on all of this.

Failure (``kvtier.clusterconn``): nothing raises to the caller for Redis
trouble. A refused connection, a reset, an error reply, a failed TLS
handshake or AUTH, or a call that receives nothing for ``timeout_ms`` is a miss (get),
False (exists), 0 (delete) or a failed write (``put_failures``; on_done still
runs), counted, and logged once per change of state. The server is marked
down: calls routed to it miss at once while a background task reconnects with
backoff (0.1 s doubling to ``reconnect_max_s``). In Cluster mode a failed
master, MOVED or CLUSTERDOWN reloads the slot map, so failovers and
reshards are followed without manual action. A read, a lookup, a write of
an unsplit value and an unlink (a delete, a quota eviction, the unlink that
replaces a failed overwrite, or of the parts an overwrite leaves
unreachable) that meet MOVED or ASK follow it once (ASK
after ASKING): while a slot migrates, keys already moved are read and
written on the slot's new master, and a block removed meanwhile does not
stay there. So do the quota's accounting scripts, sent again for a bounded
time while TRYAGAIN says their keys are on both sides (``kvtier.clusterquota``).
A split value written into a moving slot fails (``put_failures``).
Loss is allowed (it is a cache); wrong bytes never.

Threads: ``enqueue_put`` may be called from any thread; on_done runs on the
loop's thread (or at once in the caller's when the put is refused, or when a
later put of its key replaces it).
Compression and decompression of large payloads run in the loop's default
executor; checksums (xxh3, tens of GB/s) run inline.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from redis.crc import key_slot

from . import record
from .clusterconn import Node, Servers
from .clusterquota import Accounts
from .clustervalue import ENVELOPE, PEEK, BlockSink, PartSink, block_name, part_count, part_name, peek_state, split
from .config import ClusterConfig
from .errors import ConfigError
from .record import CorruptRecord, Meta
from .resp import Connection, ReplyError

log = logging.getLogger("kvtier.cluster")

# Measured with bench/cluster.py (2 MiB blocks): one block in flight per server and call beat
# deeper windows (2 to 8) in most comparisons, never clearly lost. Smaller blocks are not split
# into parts, so one in flight leaves the connection idle a round trip per block: once the
# first block of a call is in, the window widens to about READ_WINDOW_BYTES in flight.
READ_WINDOW = 1          # blocks one get_many reads from one server at once, to begin with
READ_WINDOW_BYTES = 1 << 20
READ_WINDOW_MAX = 64
THREAD_MIN = 256 * 1024  # compress / decompress payloads at least this large in a worker thread
# A writer that takes a block under BATCH_VALUE_MAX from the queue takes the small ones behind
# it too (at most BATCH_MAX, BATCH_BYTES together) and writes them as one pipeline per server:
# a round trip per block kept 4 KiB puts at 0.44x of redis-py's pipelined SETs.
BATCH_VALUE_MAX = 256 * 1024
BATCH_MAX = 64
BATCH_BYTES = 1 << 20
# Unlinks that could not be made (their server down or unreachable) wait, at most PENDING_MAX block
# names (past it they are lost: logged, counted in unlinks_lost), and are retried every
# PENDING_RETRY_S while any waits, on the servers that answer again; while those refuse them all
# (a slot left migrating: TRYAGAIN), every time twice as long, up to reconnect_max_s.
PENDING_MAX = 1 << 15
PENDING_RETRY_S = 0.05
# Blocks whose writes ended remembered with their reservation's place in the order (_doom): a
# reservation that gave up an older value of one, answered after that write ended, must not unlink
# the value written since.
RECENT_MAX = 4096


@dataclass
class ClusterStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_bytes: int = 0
    get_bytes: int = 0
    dropped: int = 0             # puts refused: queue full or tier closing
    put_failures: int = 0        # puts queued but not stored (server down, error, timeout)
    deletes: int = 0
    errors: int = 0              # calls to a server that failed (connection, error reply, timeout)
    timeouts: int = 0
    lookups_cut: int = 0         # existence checks (Lookup, background Acquire) past lookup_timeout_ms (misses)
    unavailable: int = 0         # calls refused at once because their server was marked down
    checksum_failures: int = 0   # corrupt records found (and unlinked)
    version_skips: int = 0       # records of a format version this daemon does not read (a miss, kept)
    torn_reads: int = 0          # split blocks overwritten or expired while read (a miss)
    moved: int = 0               # MOVED/ASK replies (MOVED reloads the slot map)
    reconnects: int = 0
    topology_refreshes: int = 0
    evictions: int = 0           # blocks unlinked, or not written, to keep a tenant within its redis quota
    quota_refused: int = 0       # writes refused: one block larger than its tenant's whole quota
    unlinks_lost: int = 0        # unlinks that could not be made and found the pending set full (logged)


def _stale_parts(base: bytes, old, kept: int) -> list[bytes]:
    """The part names a value written over ``old`` (its envelope, as GETRANGE read it) leaves
    unreachable when the new value has ``kept`` parts."""
    return [part_name(base, p) for p in range(kept, part_count(old))]


class _Reserved:
    """A block a writer task is reserving in its tenant's quota, or has reserved and not finished
    writing (_put_batch). Replies from several connections may reach the writer tasks in another
    order than the reservations ran in, so a reservation that gives the block up only records its
    place in the order here (_doom): the block's writer compares it with its own and unlinks the
    block if it was given up after its reservation."""
    __slots__ = ("tenant", "seq", "doom")

    def __init__(self, tenant: str):
        self.tenant = tenant
        self.seq = 0    # its reservation's place in the tenant's order; 0 until the script answered
        self.doom = 0   # the latest reservation that gave up this block's name (0: none)

    def given_up(self) -> bool:
        """Given up by a reservation made after its own: the accounting does not hold it."""
        return 0 < self.seq < self.doom


def _call(on_done) -> None:
    if on_done is not None:
        try:
            on_done()
        except Exception:
            log.exception("cluster: on_done callback failed")


class ClusterTier:
    name = "cluster"

    def __init__(self, cfg: ClusterConfig):
        if not cfg.url:
            raise ConfigError("cluster.url: not set (use NullCluster)")
        self.cfg = cfg
        self.stats = ClusterStats()
        self.servers = Servers(cfg, self.stats)
        self.accounts = Accounts(self.servers, cfg.prefix.encode(), self.stats)
        self.write_policy = cfg.write_policy
        self.prefix = cfg.prefix.encode()
        self.codec = record.CODECS[cfg.codec]
        self.part_bytes = cfg.part_bytes
        self.ttls = dict(cfg.namespace_ttl_s)
        self.queue_limit = cfg.queue_bytes
        # puts in the order made; one replaced by a later put of its key stays here, dead, until taken
        self._queue: collections.deque = collections.deque()
        # key -> its put waiting to be written. In _queue, unless the key is being written (_sending):
        # then it joins _queue when that write ends, so a key's writes never overtake each other.
        self._queued: dict[tuple[str, bytes], tuple] = {}
        self._sending: dict[tuple[str, bytes], asyncio.Future] = {}  # keys being written -> done when settled
        self._qlock = threading.Lock()
        self.queued_bytes = 0
        self._closing = False    # no new puts; writers stop when the queue is empty
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._work: asyncio.Event | None = None
        self._writers: list[asyncio.Task] = []
        self._unlinks: set[asyncio.Task] = set()  # keys whose new content could not be written (_unlink_soon)
        # unlinks not made yet (server down): block name -> least part count to unlink with it (_defer)
        self._pending: dict[bytes, int] = {}
        self._flusher: asyncio.Task | None = None   # makes them once their servers answer (_flush_loop)
        self._flush_stopped = False
        self._flush_seen: tuple | None = None      # the servers' state when a scan last left all of them waiting
        # blocks being reserved in their tenant's quota or written -> their reservation (_put_batch, _doom)
        self._inflight: dict[bytes, _Reserved] = {}
        # blocks whose writes ended lately -> (tenant, their reservation's place in the order) (_doom)
        self._recent: dict[bytes, tuple[str, int]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writers and the reconnect task. Returns at once; never raises for Redis."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._work = asyncio.Event()
        self._writers = [asyncio.create_task(self._writer(), name=f"kvtier-cluster-writer-{i}")
                         for i in range(max(2, 2 * self.cfg.connections))]
        self.servers.start()
        if self._queue:
            self._work.set()

    async def close(self, timeout: float = 5.0) -> bool:
        """Refuse new puts, let queued ones finish for up to timeout seconds, then drop the rest
        (each still gets its on_done) and close every connection. True if the queue drained."""
        self._closing = True
        drained = True
        if self._work is not None:
            self._work.set()
            if self._writers:
                _, pending = await asyncio.wait(self._writers, timeout=timeout)
                drained = not pending
        for t in self._writers:
            t.cancel()
        for t in self._writers:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        with self._qlock:
            left, self._queue, self._queued = list(self._queued.values()), collections.deque(), {}
            self.queued_bytes = 0
            self.stats.dropped += len(left)
        for item in left:
            _call(item[4])
            if item[6]:
                self._unlink_soon(item[0], item[1])
        if self._unlinks:
            await asyncio.wait(list(self._unlinks), timeout=timeout)
        await self._stop_flushing(timeout)
        await self.accounts.close()
        await self.servers.close()
        if left:
            log.warning("cluster: %d queued writes dropped at close", len(left))
        return drained and not left

    def _name(self, ns: str, key: bytes) -> bytes:
        return block_name(self.prefix, ns, key)

    def _ttl(self, ns: str) -> int:
        return self.ttls.get(ns, self.cfg.ttl_s)

    # ---- quotas --------------------------------------------------------------------------------

    def set_tenants(self, group_of: Callable[[str], str], quotas: dict[str, int]) -> None:
        """Which tenant owns a namespace, and each tenant's redis quota (bytes; absent = none)."""
        self.accounts.set_tenants(group_of, quotas)

    async def enforce_quotas(self) -> int:
        """Evict what each tenant's quota no longer holds (after a reload lowered it); never raises."""
        n = 0
        for tenant in list(self.accounts.quotas):
            try:
                victims, seq = await self.accounts.trim(tenant)
                n += await self._evict(self._doom(tenant, victims, seq))
            except Exception:
                log.exception("cluster: enforcing the quota of tenant %s failed", tenant)
        return n

    def _doom(self, tenant: str, names: list[bytes], seq: int) -> list[bytes]:
        """Blocks the accounting gave up in the reservation at place seq of the tenant's order: those
        left for the caller to unlink. One a writer task is reserving or writing is left to it: it
        is not written, or unlinked once written, if given up after its own reservation, and
        written over otherwise (_put_batch). One whose write ended after a reservation made since
        this one holds that write's value, not the one given up: it stays. One whose namespace
        another tenant owns now (a reload moved it) is that tenant's: it leaves this tenant's
        accounting and stays. Call it with no await since the script answered."""
        mine = []
        for n in names:
            k = self._key_of(n)
            if k is not None and self.accounts.group_of(k[0]) != tenant:
                continue
            r, ended = self._inflight.get(n), self._recent.get(n)
            if r is not None and r.tenant == tenant:
                r.doom = max(r.doom, seq)
            elif ended is None or ended[0] != tenant or ended[1] < seq:
                mine.append(n)
        return mine

    def _settled(self, name: bytes, r: _Reserved) -> None:
        """A block's write ended: remember its reservation's place for a while (_doom)."""
        if r.seq:
            self._recent.pop(name, None)
            self._recent[name] = (r.tenant, r.seq)
            if len(self._recent) > RECENT_MAX:
                del self._recent[next(iter(self._recent))]

    async def _evict(self, names: list[bytes]) -> int:
        """Unlink blocks the accounting gave up (with their parts); returns how many existed."""
        if not names:
            return 0
        n = await self._unlink_names(names)
        self.stats.evictions += n
        return n

    # ---- writes --------------------------------------------------------------------------------

    def enqueue_put(self, ns: str, key: bytes, data, checksum: bytes, on_done: Callable[[], None] | None = None,
                    replaces: bool = False) -> bool:
        """Queue a block for writing; never blocks. data must stay valid until on_done() is called
        (exactly once: written, failed, dropped or replaced by a later put of the key before it was
        sent). False (and counted) when the queue is full. ``replaces``: the block is new content for
        a key the servers may hold (an overwrite); if this put is dropped or fails, the key is
        unlinked instead, so no node goes on reading the old content."""
        n = memoryview(data).nbytes
        k = (ns, key)
        item = (ns, key, data, checksum, on_done, n, replaces)
        with self._qlock:
            old = self._queued.pop(k, None)  # superseded: its content is not the key's any more
            if old is not None:
                self.queued_bytes -= old[5]
            ok = not self._closing and self.queued_bytes + n <= self.queue_limit
            if ok:
                self._queued[k] = item
                self.queued_bytes += n
                if k not in self._sending:
                    self._queue.append(item)
            else:
                self.stats.dropped += 1
        if old is not None:
            _call(old[4])
        if not ok:
            _call(on_done)
            if replaces:
                self._unlink_soon(ns, key)
            return False
        if self._work is not None:
            if threading.get_ident() == self._thread:
                self._work.set()
            else:
                self._loop.call_soon_threadsafe(self._work.set)
        return True

    def _head(self) -> tuple | None:
        """The next put to write, left in the queue; replaced ones before it are discarded (queue
        lock held)."""
        q = self._queue
        while q:
            item = q[0]
            if self._queued.get((item[0], item[1])) is item:
                return item
            q.popleft()
        return None

    def _take(self, sent: asyncio.Future) -> tuple:
        """Take the put _head() returned: its key is being written until sent is done."""
        item = self._queue.popleft()
        k = (item[0], item[1])
        del self._queued[k]
        self._sending[k] = sent
        return item

    async def _writer(self) -> None:
        while True:
            with self._qlock:
                item = self._head()
                if item is None:
                    if self._closing:
                        return
                    self._work.clear()
                else:
                    sent = self._loop.create_future()
                    batch = [self._take(sent)]
                    if item[5] < BATCH_VALUE_MAX:  # small blocks queued behind it go along
                        total = item[5]
                        while len(batch) < BATCH_MAX:
                            nxt = self._head()
                            if nxt is None or nxt[5] >= BATCH_VALUE_MAX or total + nxt[5] > BATCH_BYTES:
                                break
                            batch.append(self._take(sent))
                            total += nxt[5]
            if item is None:
                await self._work.wait()
                continue
            oks = [False] * len(batch)
            try:
                oks = await self._put_batch(batch)
            except Exception:
                log.exception("cluster: write of %d block(s) failed", len(batch))
            finally:
                for (ns, key, _, _, on_done, n, replaces), ok in zip(batch, oks):
                    if ok is False and replaces:   # (None: evicted for its quota, and unlinked as such)
                        with self._qlock:
                            later = (ns, key) in self._queued   # its next put replaces the content anyway
                        if not later:
                            self._unlink_soon(ns, key)
                    if ok:
                        self.stats.puts += 1
                        self.stats.put_bytes += n
                    elif ok is False:
                        self.stats.put_failures += 1
                    with self._qlock:
                        self.queued_bytes -= n
                    _call(on_done)
                self._release([(it[0], it[1]) for it in batch], sent)

    def _release(self, keys: list[tuple[str, bytes]], sent: asyncio.Future) -> None:
        """Keys held (being written, or their pending unlinks made) are free: their next puts may go."""
        with self._qlock:
            for k in keys:
                del self._sending[k]
                nxt = self._queued.get(k)
                if nxt is not None:
                    self._queue.append(nxt)
                    self._work.set()
        sent.set_result(None)

    async def _put_batch(self, items: list[tuple]) -> list[bool | None]:
        """Write queued blocks (one, or small ones queued together), per server in one pipeline
        (_set_whole). A block whose record is split is written on its own (_write_one).

        Quotas: every block of the batch is reserved first, then the blocks the reservations gave
        up are unlinked, then the writes go out. A block given up by a reservation made after its
        own (a later one of this batch, another writer's, enforce_quotas) is not written, or is
        unlinked once written: the accounting has forgotten it, so it must not stay in Redis
        (_Reserved, _doom). Per block: True (stored), False (not stored) or None (evicted for its
        tenant's quota)."""
        ok: list = [False] * len(items)
        recs: list[tuple[int, bytes, list, int]] = []   # (item index, name, values, ttl)
        held: list[tuple[int, bytes, _Reserved]] = []   # the blocks of a tenant, in self._inflight

        def kept(rs: list) -> list:
            """rs less the blocks given up since their reservation (not written: evicted)."""
            keep = []
            for r in rs:
                res = self._inflight.get(r[1])
                if res is not None and res.given_up():
                    ok[r[0]] = None
                else:
                    keep.append(r)
            return keep

        try:
            victims: list[bytes] = []
            for i, (ns, key, data, checksum, *_) in enumerate(items):
                base = self._name(ns, key)
                tenant = self.accounts.group_of(ns)
                res = None
                if tenant:  # before its reservation is sent: a reservation answered earlier may give it up
                    res = self._inflight[base] = _Reserved(tenant)
                    held.append((i, base, res))
                rec = await self._record(ns, key, data, checksum, res)
                if rec is None:
                    continue
                values, ttl, evict = rec
                if evict:
                    victims += self._doom(tenant, evict, res.seq)  # no await since the script
                recs.append((i, base, values, ttl))
            if victims:
                await self._evict(victims)        # room first
            live = kept(recs)
            for r in live:
                if len(r[2]) > 1 and kept([r]):
                    ok[r[0]] = await self._write_one(*r[1:])
            whole = kept([r for r in live if len(r[2]) == 1])

            async def work(node: Node, idxs: list[int]) -> None:
                done = await self._set_whole(await self.servers.conns(node),
                                             [(whole[j][1], whole[j][2][0], whole[j][3]) for j in idxs])
                for j, d in zip(idxs, done):
                    ok[whole[j][0]] = d

            if whole:
                await self.servers.run(await self.servers.group([r[1] for r in whole]), work)
        except BaseException:
            gone, old = self._settle(held, ok)
            for name in gone + old:
                self._defer(name, 1)              # unlinked once possible (_flush_pending)
            raise
        gone, old = self._settle(held, ok)
        if gone:   # given up: the accounting does not hold them (nor, if any, the value each replaces)
            await self._unlink_names(gone)
        if old:    # a value given up before this block's reservation, which this block did not replace
            await self._evict(old)
        return ok

    def _settle(self, held: list[tuple[int, bytes, _Reserved]], ok: list) -> tuple[list[bytes], list[bytes]]:
        """The writes of a batch ended: its blocks leave self._inflight, with no await since the
        decision. Returns the names to unlink: those given up after their reservation (written or
        not; ok None, counted as evictions), and those whose older value a reservation gave up
        that no write of this batch replaced (their writer task is the one to unlink it, _doom)."""
        gone, old = [], []
        for i, base, res in held:
            del self._inflight[base]
            self._settled(base, res)
            if res.given_up():
                ok[i] = None
                self.stats.evictions += 1
                gone.append(base)
            elif res.doom and not ok[i]:
                old.append(base)
        return gone, old

    async def _set_whole(self, conns: list[Connection], recs: list[tuple[bytes, tuple, int]]) -> list[bool]:
        """SET unsplit records (name, value, ttl) on one server in one pipeline, each after a
        GETRANGE of the value it replaces; then one UNLINK of the parts that replaced split
        values leave unreachable. Which SETs the server acknowledged."""
        await self._unlink_pending(conns, [base for base, _, _ in recs])
        c = min(conns, key=lambda c: c.inflight)
        cmds = []
        for base, value, ttl in recs:
            cmds += [(b"GETRANGE", base, 0, ENVELOPE.size - 1), (b"SET", base, value) + ((b"PX", ttl * 1000) if ttl else ())]
        replies = await c.request(cmds, weight=sum(memoryview(p).nbytes for _, value, _ in recs for p in value))
        ok, stale = [], []
        for k, (base, _, _) in enumerate(recs):
            old, r = replies[2 * k], replies[2 * k + 1]
            if isinstance(r, ReplyError) and r.redirect is not None:  # a new key in a slot that moves
                ok.append(await self._set_there(r, cmds[2 * k:2 * k + 2]))
                continue
            ok.append(r == "OK")
            if r == "OK":
                stale += _stale_parts(base, old, 1)
            elif isinstance(r, ReplyError):
                self.servers.reply_error(r)
        if stale:
            await self._unlink_stale(c, stale)
        return ok

    async def _unlink_stale(self, c: Connection, parts: list[bytes]) -> None:
        """Unlink parts no envelope reaches any more (left by a longer value), where a MOVED or ASK
        reply points if need be (a migration moved them already). Refused otherwise (TRYAGAIN: some
        moved, some not), they are counted and stay, unreachable, until their TTL or an operator."""
        cmd = (b"UNLINK",) + tuple(parts)
        r = (await c.request([cmd]))[0]
        if isinstance(r, ReplyError) and r.redirect is not None:
            self.servers.reply_error(r)
            r = await self._there(r, cmd)
        if isinstance(r, ReplyError):
            self.servers.reply_error(r)

    async def _set_there(self, redirect: ReplyError, cmds: list) -> bool:
        """An unsplit record's GETRANGE and SET on the server a MOVED or ASK reply names, then the
        UNLINK of the parts it leaves unreachable there; whether that server stored it."""
        self.servers.reply_error(redirect)
        replies = await self.servers.redirected(redirect, cmds)
        if replies is None:
            return False
        old, r = replies
        if r != "OK":
            if isinstance(r, ReplyError):
                self.servers.reply_error(r)
            return False
        stale = _stale_parts(cmds[0][1], old, 1)
        if stale:
            await self._there(redirect, (b"UNLINK",) + tuple(stale))
        return True

    async def _record(self, ns: str, key: bytes, data, checksum: bytes,
                      res: _Reserved | None) -> tuple[list, int, list] | None:
        """The block's record's values and TTL, and the blocks its tenant's quota gave up to make
        room for it (to evict before it is written); None if the quota refused it. res: the
        block's reservation when its namespace has a tenant (its place in the order is set here).
        It returns with no await since the quota's script answered (_put_batch relies on it)."""
        mv = memoryview(data).cast("B")
        codec, payload = record.CODEC_RAW, mv
        if self.codec != record.CODEC_RAW:
            if len(mv) >= THREAD_MIN:
                codec, payload = await self._loop.run_in_executor(None, record.choose_payload, self.codec, mv)
            else:
                codec, payload = record.choose_payload(self.codec, mv)
            payload = memoryview(payload).cast("B")
        ttl = self._ttl(ns)
        now_ms = int(time.time() * 1000)
        meta = Meta(ns, key, len(mv), len(payload), bytes(checksum), codec, now_ms, now_ms + ttl * 1000 if ttl else 0)
        header = record.encode_header(meta, aligned=False)
        base = self._name(ns, key)
        values = split(header, payload, self.part_bytes)
        if res is None:
            return values, ttl, []
        size = sum(memoryview(p).nbytes for v in values for p in v)  # room within the quota first, or no write
        got = await self.accounts.reserve(res.tenant, base, size,
                                          meta.expires_ms + self.cfg.timeout_ms if ttl else 0)
        if got is None:
            return None
        res.seq = got[2]
        return (values, ttl, got[1]) if got[0] else None

    async def _write_one(self, base: bytes, values: list, ttl: int) -> bool:
        """Write a split record (_write_record). If it fails once any of its parts may have landed
        (a part or part 0 refused, e.g. out of memory; the connection lost; no answer), the block
        is unlinked with every part name this write or the one it replaces made: now, or once its
        server answers (_defer). Its parts are unreachable otherwise (a delete finds parts through
        part 0), and its part 0 may be the old one over new parts: present for Lookup, a torn
        miss for get, for ever without a TTL."""
        groups = await self.servers.group([base])
        if not groups:
            return False
        (node, _), = groups.items()
        state = {"ok": False, "sent": False, "old": None}

        async def work(node: Node) -> None:
            state["ok"] = await self._write_record(node, base, values, ttl, state)

        if await self.servers.on(node, work) and state["ok"]:
            return True
        if state["sent"]:
            await self._unlink_names([base], [max(len(values), part_count(state["old"]))])
        return False

    async def _write_record(self, node: Node, base: bytes, values: list[tuple], ttl: int,
                            state: dict | None = None) -> bool:
        """Write a record on one server: whole (_set_whole) or in parts, part 0 last. state, for a
        split one: "sent" once parts may land, "old" the envelope of the value it replaces."""
        conns = await self.servers.conns(node)
        if len(values) == 1:
            return (await self._set_whole(conns, [(base, values[0], ttl)]))[0]
        await self._unlink_pending(conns, [base])
        px = (b"PX", ttl * 1000) if ttl else ()
        peek = (b"GETRANGE", base, 0, ENVELOPE.size - 1)  # the old value's envelope, if it was split
        rest = [(b"SET", part_name(base, i), v) + px for i, v in enumerate(values) if i]
        if state is not None:
            state["sent"] = True
        old, *replies = await self.servers.fanout(conns, [peek] + rest, self.part_bytes)
        if state is not None:
            state["old"] = old
        if all(r == "OK" for r in replies):   # part 0 last: it makes the others reachable
            c = min(conns, key=lambda c: c.inflight)
            replies = await c.request([(b"SET", base, values[0]) + px], weight=self.part_bytes)
        for r in replies:
            if r != "OK":
                if isinstance(r, ReplyError):
                    self.servers.reply_error(r)
                return False
        stale = _stale_parts(base, old, len(values))
        if stale:  # the previous write had more parts: unreachable now, remove them
            await self._unlink_stale(conns[0], stale)
        return True

    # ---- reads ---------------------------------------------------------------------------------

    async def exists_many(self, ns: str, keys: Sequence[bytes], timeout_s: float | None = None) -> list[bool]:
        """Which blocks the cluster holds: one pipelined round trip per server, reading the first
        bytes of each value, so that Lookup and get agree: a record of a format version this
        daemon does not read is absent (counted in ``version_skips``, left in place), and a value
        that is no record (another type under kvtier's name) is absent, counted as corrupt and
        unlinked, as a get would. A server that fails or is down answers False for its keys
        (counted). A server that has not answered within timeout_s (None: lookup_timeout_ms)
        answers False too (counted once per call in ``lookups_cut``); one that sent nothing
        during three such lookups in a row is marked down."""
        out = [False] * len(keys)
        if not keys:
            return out
        names = [self._name(ns, k) for k in keys]
        corrupt: list[bytes] = []

        async def one(node: Node, idxs: list[int]) -> None:
            conns = await self.servers.conns(node)
            c = min(conns, key=lambda c: c.inflight)
            replies = await c.request([(b"GETRANGE", names[i], 0, PEEK - 1) for i in idxs])

            async def there(j: int, redirect: ReplyError) -> None:  # the key's slot is moving, or moved
                self.servers.reply_error(redirect)
                replies[j] = await self._there(redirect, (b"GETRANGE", names[idxs[j]], 0, PEEK - 1))

            await asyncio.gather(*(there(j, r) for j, r in enumerate(replies)
                                   if isinstance(r, ReplyError) and r.redirect is not None))
            doomed, counts = [], []
            for i, r in zip(idxs, replies):
                state, version = peek_state(r)
                out[i] = state == "record"
                if state == "version":
                    self._version_skipped(version)
                elif state == "corrupt":
                    self._corrupt(ns, keys[i], "not a kvtier record" if isinstance(r, bytes) else str(r))
                    doomed.append(names[i])
                    counts.append(part_count(r[:ENVELOPE.size]) if isinstance(r, bytes) else 1)
                elif isinstance(r, ReplyError):
                    self.servers.reply_error(r)
            if doomed:
                await self._unlink(conns, doomed, counts)
                corrupt.extend(doomed)

        limit = self.cfg.lookup_timeout_ms / 1000 if timeout_s is None else timeout_s
        if await self.servers.run(self._not_pending(await self.servers.group(names), names), one, cut_s=limit):
            self.stats.lookups_cut += 1
        tenant = self.accounts.group_of(ns)
        if tenant and corrupt:
            await self.accounts.release(tenant, corrupt)
        return out

    def _version_skipped(self, version: int) -> None:
        self.stats.version_skips += 1
        self.servers.warn("version", f"cluster: records of format version {version} found (this kvtier reads "
                                     f"{record.VERSION}): misses here, left for the daemons that read them")

    def _corrupt(self, ns: str, key: bytes, why: str) -> None:
        self.stats.checksum_failures += 1
        self.servers.warn("corrupt", f"cluster: corrupt record {ns}/{key.hex()}: {why}; removed")

    async def get(self, ns: str, key: bytes, into: Callable[[int], object] | None = None):
        """(raw block bytes, checksum) or None. The checksum is verified. into(n), if given, returns
        a writable buffer of at least n bytes (or None to decline) that the block is read into;
        the bytes returned are then a view of it."""
        wrapped = None if into is None else (lambda i, n: into(n))
        return (await self.get_many(ns, [key], wrapped))[0]

    async def get_many(self, ns: str, keys: Sequence[bytes], into: Callable[[int, int], object] | None = None) -> list:
        """get() for a batch: [(bytes, checksum) | None] in the order of keys. into(i, n) as in
        get(), with the key's index. A buffer lent through into() is never written after this
        returns (a failed or cancelled call cuts its connections first); after a miss its
        content is undefined."""
        out: list = [None] * len(keys)
        if not keys:
            return out
        names = [self._name(ns, k) for k in keys]
        blocks = [BlockSink(ns, k, i, into) for i, k in enumerate(keys)]

        async def one(node: Node, idxs: list[int]) -> None:
            conns = await self.servers.conns(node)
            mine = [blocks[i] for i in idxs]
            await self._read(conns, [names[i] for i in idxs], mine)
            doomed = []
            for b in mine:
                res = await self._finish(b)
                if res is None and b.bad:
                    doomed.append(b)
                out[b.index] = res
            if doomed:
                await self._unlink(conns, [names[b.index] for b in doomed], [b.count for b in doomed])
                corrupt.extend(names[b.index] for b in doomed)

        corrupt: list[bytes] = []
        await self.servers.run(self._not_pending(await self.servers.group(names), names), one, lent=into is not None)
        for r in out:
            if r is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self.stats.get_bytes += len(r[0])
        tenant = self.accounts.group_of(ns)
        if tenant:
            self.accounts.touch_soon(tenant, [n for n, r in zip(names, out) if r is not None])
            if corrupt:
                await self.accounts.release(tenant, corrupt)
        return out

    async def _read(self, conns: list[Connection], names: list[bytes], blocks: list[BlockSink]) -> None:
        """Read blocks from one server: READ_WINDOW blocks at a time over the connections in turn
        (more once the first block's size is known, about READ_WINDOW_BYTES in flight),
        a split block's other parts the moment its first value is in,
        spread over every connection. Raises the first connection failure once all settled."""
        loop = asyncio.get_running_loop()
        settled = loop.create_future()
        rr = itertools.cycle(conns)
        errors: list[BaseException] = []
        state = {"next": 0, "open": 0, "window": READ_WINDOW, "reading": 0}

        def send(cmd: tuple, sink, then) -> None:
            f = next(rr).request([cmd], [sink], 1 << 20)
            state["open"] += 1
            f.add_done_callback(then)

        def settle(f: asyncio.Future) -> bool:
            state["open"] -= 1
            ok = not f.cancelled() and f.exception() is None
            if not ok:
                errors.append(f.exception() if not f.cancelled() else ConnectionError("request cancelled"))
            return ok

        def done_if_idle() -> None:
            if state["open"] == 0 and (errors or state["next"] >= len(blocks)) and not settled.done():
                settled.set_result(None)

        def ask_next() -> None:
            while not errors and state["next"] < len(blocks) and state["reading"] < state["window"]:
                i = state["next"]
                state["next"] += 1
                state["reading"] += 1
                send((b"GET", names[i]), blocks[i], functools.partial(on_block, i))

        def on_block(i: int, f: asyncio.Future) -> None:
            state["reading"] -= 1
            if settle(f):
                b, r = blocks[i], f.result()[0]
                if isinstance(r, ReplyError) and r.code == "WRONGTYPE":  # kvtier's name, not its value
                    b.present, b.bad = True, str(r)
                elif isinstance(r, ReplyError) and r.redirect is not None:
                    moved.append((i, r))     # read where it points once this server's reads are done
                elif isinstance(r, ReplyError):
                    self.servers.reply_error(r)
                    b.present = False
                else:
                    if r is b and b.total:
                        state["window"] = max(1, min(READ_WINDOW_MAX, READ_WINDOW_BYTES // b.total))
                    if r is b and b.wants_parts() and not errors:
                        for j in range(1, b.count):
                            ps = PartSink(b, j)
                            send((b"GET", part_name(names[i], j)), ps, functools.partial(on_part, ps))
                ask_next()
            done_if_idle()

        def on_part(ps: PartSink, f: asyncio.Future) -> None:
            if settle(f):
                r = f.result()[0]
                if r is not ps:                      # nil (expired, evicted, unlinked) or an error
                    if isinstance(r, ReplyError):
                        self.servers.reply_error(r)
                    ps.blk.torn = True
            done_if_idle()

        moved: list[tuple[int, ReplyError]] = []
        ask_next()
        await settled
        if errors:
            raise errors[0]
        if moved:
            await asyncio.gather(*(self._read_there(err, names[i], blocks[i]) for i, err in moved))

    async def _read_there(self, redirect: ReplyError, name: bytes, b: BlockSink) -> None:
        """Read a block (and its parts) from the server a MOVED or ASK reply names: while a slot
        migrates, the keys already moved are read from the slot's new master, not missed."""
        self.servers.reply_error(redirect)  # counted; a MOVED reloads the slot map
        lent = b.into is not None
        r = await self.servers.redirected(redirect, [(b"GET", name)], [b], lent)
        r = None if r is None else r[0]
        if isinstance(r, ReplyError):
            self.servers.reply_error(r)
        if r is not b or not b.wants_parts():
            return
        sinks = [PartSink(b, j) for j in range(1, b.count)]
        replies = await self.servers.redirected(redirect, [(b"GET", part_name(name, j)) for j in range(1, b.count)],
                                                sinks, lent)
        for ps, r in zip(sinks, replies or [None] * len(sinks)):
            if r is not ps:                          # nil (not moved yet, or gone) or an error
                if isinstance(r, ReplyError):
                    self.servers.reply_error(r)
                b.torn = True

    async def _finish(self, b: BlockSink):
        """The block of a completed read, verified, or None (a miss; b.bad set if corrupt)."""
        if not b.present or b.refused:
            return None
        if b.version:
            self._version_skipped(b.version)
            return None
        meta = b.meta
        if not b.bad and b.torn:
            self.stats.torn_reads += 1
            return None
        if not b.bad and b.got != meta.stored_len:
            b.bad = f"the parts cover {b.got} of {meta.stored_len} bytes"
        try:
            if b.bad:
                raise CorruptRecord(b.bad)
            if meta.expires_ms and meta.expires_ms < time.time() * 1000:
                return None
            if meta.codec == record.CODEC_RAW:
                raw = b.buf if b.buf is not None else b.dest
            else:
                if meta.stored_len >= THREAD_MIN:
                    raw = await self._loop.run_in_executor(None, record.decompress, meta.codec, b.dest, meta.raw_len)
                else:
                    raw = record.decompress(meta.codec, b.dest, meta.raw_len)
                if b.into is not None:
                    dest = b.caller_buffer(meta.raw_len)
                    if dest is None:
                        return None
                    dest[:] = raw
                    raw = dest
            record.verify(meta, raw)
            return raw, meta.checksum
        except CorruptRecord as e:
            b.bad = b.bad or str(e)
            self._corrupt(b.ns, b.key, b.bad)
            return None

    async def _unlink(self, conns: list[Connection], bases: list[bytes], counts: list[int],
                      failed: list | None = None) -> int:
        """Unlink blocks with their parts on one server; a block whose slot moved (MOVED, or ASK
        while its slot migrates) is unlinked where the reply points (_unlink_there); those whose
        server there failed are appended to failed."""
        cmds = [(b"UNLINK", base) + tuple(part_name(base, i) for i in range(1, count))
                for base, count in zip(bases, counts)]
        replies = await conns[0].request(cmds)
        n = 0
        for base, r in zip(bases, replies):
            if isinstance(r, ReplyError):
                self.servers.reply_error(r)
                # a redirect is followed; any other error (TRYAGAIN: a slot migrating with the
                # block's names on both sides; CLUSTERDOWN) leaves the block: unlinked later
                r = await self._unlink_there(r, base) if r.redirect is not None else None
                if r is None and failed is not None:
                    failed.append(base)
            n += isinstance(r, int) and r > 0
        return n

    async def _unlink_there(self, redirect: ReplyError, base: bytes):
        """UNLINK's reply for a block (with its parts, counted there) on the server a redirect
        names, or None. Else a delete, or an overwrite that failed, would leave the block on its
        slot's new master for every node to read once the slot has moved."""
        head = await self._there(redirect, (b"GETRANGE", base, 0, ENVELOPE.size - 1))
        if isinstance(head, bytes):
            r = await self._there(
                redirect, (b"UNLINK", base) + tuple(part_name(base, i) for i in range(1, part_count(head))))
            if not isinstance(r, ReplyError):
                return r
            head = r
        if isinstance(head, ReplyError):
            self.servers.reply_error(head)
        return None

    async def _there(self, redirect: ReplyError, cmd: tuple):
        """One command's reply from the server a redirect names, or None if that server failed."""
        replies = await self.servers.redirected(redirect, [cmd])
        return None if replies is None else replies[0]

    # ---- removal -------------------------------------------------------------------------------

    def _unlink_soon(self, ns: str, key: bytes) -> None:
        """Unlink a key whose new content could not be written (any thread). Ordered like any
        delete: after a write of the key being sent; a put of it queued meanwhile is cancelled
        (a loss, which is allowed; the old content served as the new one would not be)."""
        def start() -> None:
            t = asyncio.ensure_future(self.delete_many(ns, [key]))
            self._unlinks.add(t)
            t.add_done_callback(self._unlinks.discard)
        if self._loop is None or self._loop.is_closed():
            return
        if threading.get_ident() == self._thread:
            start()
        else:
            self._loop.call_soon_threadsafe(start)

    async def delete_many(self, ns: str, keys: Sequence[bytes]) -> int:
        """Unlink blocks (and their parts); returns how many existed. Failures count as 0 (and the
        unlink is made once the server answers: _defer). Puts of
        the keys still queued are cancelled (on_done at once); those being written finish first,
        else they would land after the unlink and bring the block back for every node."""
        if not keys:
            return 0
        cancelled = []
        with self._qlock:
            for k in keys:
                item = self._queued.pop((ns, k), None)
                if item is not None:
                    self.queued_bytes -= item[5]
                    cancelled.append(item)
        for item in cancelled:
            _call(item[4])
        # the keys are held (as if being written) while they are unlinked and their accounting
        # released: a put of one made meanwhile waits and is written after, else its write could
        # land before the unlink (lost) or be forgotten by the release (stored, unaccounted)
        held = list(dict.fromkeys((ns, k) for k in keys))
        while True:
            with self._qlock:
                busy = {f for k in held if (f := self._sending.get(k)) is not None}
                if not busy:
                    sent = self._loop.create_future()
                    for k in held:
                        self._sending[k] = sent
                    break
            await asyncio.wait(busy)
        try:
            names = [self._name(ns, k) for k in keys]
            n = await self._unlink_names(names)
            self.stats.deletes += n
            tenant = self.accounts.group_of(ns)
            if tenant:
                await self.accounts.release(tenant, names)
            return n
        finally:
            self._release(held, sent)

    async def _unlink_names(self, names: list[bytes], least: list[int] | None = None) -> int:
        """Unlink blocks by name, each with its parts (as part 0's envelope says, and at least
        least[i] of them with part 0), on whichever servers hold them. Those that cannot be
        unlinked now (server down, unreachable) wait in the pending set (_defer); those made
        leave it. Returns how many existed."""
        least = [max(self._pending.get(nm, 1), least[i] if least else 1) for i, nm in enumerate(names)]
        n = [0]
        made: set[int] = set()

        async def one(node: Node, idxs: list[int]) -> None:
            conns = await self.servers.conns(node)
            removed, failed = await self._unlink_here(conns, [names[i] for i in idxs], [least[i] for i in idxs])
            n[0] += removed  # not "+= await": another server's coroutine may add meanwhile
            made.update(i for i in idxs if names[i] not in failed)

        await self.servers.run(await self.servers.group(names), one)
        for i, nm in enumerate(names):
            if i in made:
                self._pending.pop(nm, None)
            else:
                self._defer(nm, least[i])
        return n[0]

    async def _unlink_here(self, conns: list[Connection], bases: list[bytes], least: list[int]):
        """Unlink blocks on one server, each with the parts its envelope names and at least
        least[i]: (how many existed, the names whose redirect could not be followed)."""
        heads = await conns[0].request([(b"GETRANGE", b, 0, ENVELOPE.size - 1) for b in bases])
        failed: list[bytes] = []
        n = await self._unlink(conns, bases, [max(m, part_count(h)) for m, h in zip(least, heads)], failed)
        return n, failed

    async def _unlink_pending(self, conns: list[Connection], bases: list[bytes]) -> None:
        """Before blocks are written on this server: make the unlinks still pending for them (else
        the unlink, made later, would remove the new content, or the parts it leaves)."""
        pend = [b for b in bases if b in self._pending]
        if pend:
            _, failed = await self._unlink_here(conns, pend, [self._pending[b] for b in pend])
            for b in pend:
                if b not in failed:
                    self._pending.pop(b, None)

    def _not_pending(self, groups: dict[Node, list[int]], names: list[bytes]) -> dict[Node, list[int]]:
        """groups less the blocks whose unlink is not made yet: what a server holds there is no
        node's to read (a Lookup and a get of them are misses)."""
        if not self._pending:
            return groups
        return {node: kept for node, idxs in groups.items() if (kept := [i for i in idxs if names[i] not in self._pending])}

    def _defer(self, name: bytes, least: int) -> None:
        """An unlink that could not be made: keep it until its server answers (bounded)."""
        self._flush_seen = None  # scan again
        if name in self._pending:
            self._pending[name] = max(self._pending[name], least)
        elif len(self._pending) >= PENDING_MAX:
            self.stats.unlinks_lost += 1
            self.servers.warn("unlinks", f"cluster: {len(self._pending)} unlinks already wait for their servers to "
                                         f"answer; more are not made (unlinks_lost): blocks deleted, evicted or "
                                         f"overwritten meanwhile may be read again once their server is back")
        else:
            self._pending[name] = least
        if self._pending and not self._flush_stopped and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.ensure_future(self._flush_loop())

    async def _flush_loop(self) -> None:
        wait = PENDING_RETRY_S
        while self._pending and not self._flush_stopped:
            await asyncio.sleep(wait)
            refused = False
            try:
                refused = await self._flush_pending()
            except Exception:
                log.exception("cluster: pending unlinks failed")
            wait = min(2 * wait, max(PENDING_RETRY_S, self.cfg.reconnect_max_s)) if refused else PENDING_RETRY_S

    def _node_of(self, name: bytes) -> Node | None:
        s = self.servers
        if not s.cluster_mode:
            return s.single
        return s.slots[key_slot(name)] if s.slots else None

    def _key_of(self, name: bytes) -> tuple[str, bytes] | None:
        """(namespace, key) of a block name; None if it is no block name of this prefix."""
        head, sep, tail = name.rpartition(b":{")
        pre = self.prefix + b":"
        if not sep or not tail.endswith(b"}") or not head.startswith(pre):
            return None
        try:
            return head[len(pre):].decode(), bytes.fromhex(tail[:-1].decode())
        except ValueError:
            return None

    async def _flush_pending(self) -> bool:
        """Make the pending unlinks whose servers answer again (not marked down). A key being
        written is left to that write, which makes its unlink first (_unlink_pending); the others
        are held as if being written meanwhile, so no put of them lands before the unlink. The
        names are scanned again only once a server or the slot map changed, or unlinks were added.
        True when unlinks were sent and every one is still pending (refused)."""
        s = self.servers
        seen = (id(s.slots), tuple((n.addr, not n.reason) for n in s.nodes.values()))
        if seen == self._flush_seen:
            return False
        ready = [nm for nm in self._pending if (node := self._node_of(nm)) is not None and not node.reason]
        if not ready:
            self._flush_seen = seen
            return False
        sent = self._loop.create_future()
        names, keys = [], []
        with self._qlock:
            for nm in ready:
                k = self._key_of(nm)
                if k is not None:
                    if k in self._sending:
                        continue
                    self._sending[k] = sent
                    keys.append(k)
                names.append(nm)
        try:
            if names:
                await self._unlink_names(names)
        finally:
            self._release(keys, sent)
        return bool(names) and all(nm in self._pending for nm in names)

    async def _stop_flushing(self, timeout: float) -> None:
        """At close: one last try at the pending unlinks, then log what is left."""
        self._flush_stopped = True
        f, self._flusher = self._flusher, None
        if f is not None:
            f.cancel()
            try:
                await f
            except (asyncio.CancelledError, Exception):
                pass
        if self._pending:
            try:
                await asyncio.wait_for(self._flush_pending(), timeout)
            except (TimeoutError, Exception):
                pass
        if self._pending:
            log.warning("cluster: %d unlinks not made at close (their servers did not answer): blocks deleted, "
                        "evicted or overwritten may be read again by other nodes", len(self._pending))

    # ---- stats ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        with self._qlock:
            queued, queued_bytes = len(self._queued), self.queued_bytes
        return {
            "mode": "cluster" if self.servers.cluster_mode else "standalone",
            "connected": self.servers.connected(),
            "nodes": self.servers.describe(),
            "write_policy": self.write_policy,
            "queued": queued,
            "queued_bytes": queued_bytes,
            "queue_limit_bytes": self.queue_limit,
            "unlinks_pending": len(self._pending),
            "tenants": self.accounts.snapshot(),
            **{f: getattr(self.stats, f) for f in self.stats.__dataclass_fields__},
        }


class NullCluster:
    """The cluster tier when none is configured: holds nothing, every read misses."""
    name = "cluster"
    write_policy = "off"
    queue_limit = 0  # nothing waits for a write

    async def start(self) -> None:
        return None

    async def close(self, timeout: float = 0.0) -> bool:
        return True

    def enqueue_put(self, ns, key, data, checksum, on_done=None, replaces=False) -> bool:
        _call(on_done)
        return False

    async def exists_many(self, ns, keys, timeout_s=None) -> list[bool]:
        return [False] * len(keys)

    async def get(self, ns, key, into=None):
        return None

    async def get_many(self, ns, keys, into=None) -> list:
        return [None] * len(keys)

    async def delete_many(self, ns, keys) -> int:
        return 0

    def set_tenants(self, group_of, quotas) -> None:
        pass

    async def enforce_quotas(self) -> int:
        return 0

    def snapshot(self) -> None:
        return None


def from_config(cfg: ClusterConfig) -> ClusterTier | NullCluster:
    """The tier for a [cluster] section: NullCluster when no url is set."""
    return ClusterTier(cfg) if cfg.url else NullCluster()
