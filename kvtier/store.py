"""The tiered store: the hot tier (RAM arena) over the cold tier (NVMe files) and the
cluster tier (Redis/Valkey, shared by every node).

Movement:
* commit -> RAM, visible at once; then, with ``nvme.write_policy = "commit"``,
  written behind to NVMe by the I/O threads (the block is held in RAM, not
  evictable, until its file is written);
* RAM eviction -> demotion: a block not yet on NVMe is copied out of its slot
  (under the hot tier's lock, before the slot is reused) and queued for
  writing; with ``write_policy = "evict"`` this is the only way to NVMe;
* lookup sees both tiers; Acquire of blocks on NVMe first reads them into
  fresh arena slots (O_DIRECT straight into the slot), several at a time on
  the NVMe read threads, verifies, commits and leases each; inline reads do
  the same, or with ``promote = "second"`` serve the first read from a
  transient buffer and promote on the second.

Commits that trust the client's checksums (``ram.verify_on_commit =
"background"``) are re-hashed right after by ``kvtier.commitcheck``, which
drops any block whose bytes do not match.

Restart: the NVMe index comes from the file names and sizes, and the daemon
serves at once; the headers are checked by a background thread meanwhile
(``ColdTier.verify_pending``). Every read verifies header and checksum anyway.

Delete against promotions: a promotion (from NVMe or the cluster tier) reads
its block into a reservation that no other call sees, so Delete cannot remove
it and the file or value it was read from may be gone by the time it commits.
A promotion therefore commits only if no Delete of its key began since it
started (checked and committed under one lock, ``_plock``); one that began
later removes the committed block like any other. A promotion that starts
while its key is being deleted is a miss.

Writes that cannot be queued (``queue_bytes`` reached) are dropped and counted:
a put never waits for the disk. Loss is allowed, corruption never: every NVMe
read is verified, and a block deleted or replaced while its write was queued or
in flight puts no file in place (a write renaming its file already is waited
for, and the file removed, before the Delete or overwrite answers). A Delete or
overwrite whose old NVMe file cannot be unlinked fails (FailedPrecondition) and
leaves that file indexed: answered, it would be undone by the next start's scan.
RAM evicting the old content while its overwrite commits demotes nothing: its
old file is unlinked by then, and a copy renaming into place as the commit
answered would be found by the restart after a crash.

Cluster tier (``kvtier.cluster``, on the daemon's event loop): with
``cluster.write_policy = "commit"`` each committed block is written through
asynchronously (held in RAM until written; a full queue drops and counts);
with "evict" a copy is queued when RAM evicts it. Lookups and Acquire ask it
for keys no local tier has, one pipelined round trip per batch; blocks found
are read straight into fresh arena slots, committed with their verified
checksum and leased like any other. Blocks that came up from a lower tier are
never written back up.

A disabled NVMe tier is ``NullTier`` and a disabled cluster tier
``NullCluster``: they hold nothing, so the store never asks whether they are
configured.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import mmap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from . import errors
from .cluster import NullCluster
from .cold import HUGE, huge_buffer, ColdTier
from .commitcheck import CommitChecker
from .config import Config
from .hot import COMMITTED, TIER_MISSING, TIER_RAM, Acquired, Block, HotTier, Superseded
from .keys import CHECKSUM_SIZE

log = logging.getLogger("kvtier.store")
TIER_NVME, TIER_CLUSTER = 2, 3
VERIFY_THREADS = 8  # header reads in flight while the NVMe index is checked after a restart
BACKGROUND_THREADS = 4  # background Acquires landing NVMe blocks at once (more wait their turn)
_REMOVING = "removing"  # _queued: a cancelled write's copy is being removed now (truthy, not True)
LANDING_WAIT_S = 5.0  # at most this long a read waits for a demotion being written (then: a miss)


class NullTier:
    """A tier that holds nothing (NVMe not configured)."""
    name = "nvme"

    def scan(self, progress=None) -> int:
        return 0

    def verify_pending(self, threads: int = 1, stop=None) -> tuple[int, int]:
        return 0, 0

    def contains(self, ns, key) -> bool:
        return False

    def contains_many(self, ns, keys) -> list[bool]:
        return [False] * len(keys)

    def read(self, ns, key, dest):
        return None

    def write(self, *a, **k) -> bool:
        return False

    def delete(self, ns, key, wait: bool = False) -> bool:
        return False

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        pass


class _Present(Exception):
    pass


class _Join:
    """The lease that the promotions of one Acquire join, each as soon as its block is in RAM."""

    def __init__(self, lease_id: int, lease_ms: int):
        self.lease_id, self.lease_ms = lease_id, lease_ms
        self.lock = threading.Lock()


class _Moving:
    """The promotions of one key in flight, and the Deletes of it (in flight, and begun so far);
    ``reading``: set when the promotion that reserved the key's slot ends (the others wait for it)."""
    __slots__ = ("promoting", "deleting", "deletes", "reading")

    def __init__(self):
        self.promoting = self.deleting = self.deletes = 0
        self.reading: threading.Event | None = None


def open_cold(cfg: Config) -> ColdTier:
    """The NVMe tier of cfg.nvme.dirs, each directory locked for this daemon (ConfigError when
    another daemon uses one); closed by the Store it is given to."""
    n = cfg.nvme
    return ColdTier([(d, n.capacity) for d in n.dirs],  # 0: automatic, from the free space (kvtier.cold)
                    durability=n.durability, direct_io=n.direct_io, codec=n.codec, retry_s=n.retry_s,
                    exclusive=True)


class Store:
    def __init__(self, cfg: Config, hot: HotTier, view: memoryview, arena_huge_pages: bool = False,
                 cold: ColdTier | None = None):
        """``cold``: the NVMe tier, already opened (``open_cold``: the daemon takes its directories
        before it makes the arena); made here when not given. The store closes it from now on."""
        self.cfg, self.hot, self.view = cfg, hot, view
        n = cfg.nvme
        if n.dirs:
            self.cold = cold if cold is not None else open_cold(cfg)
            # a 2 MiB slot of an arena on 4 KiB pages is physically contiguous only by luck, and a read
            # into it is split into as many requests as it has runs of pages (kvtier.cold)
            self.cold.bounce_reads = n.bounce_reads == "on" or (n.bounce_reads == "auto" and not arena_huge_pages)
        else:
            self.cold = NullTier()
        try:
            self._init(cfg, hot, view)
        except BaseException:
            self.cold.close()  # a store never made is never closed: its directories go now
            raise

    def _init(self, cfg: Config, hot: HotTier, view: memoryview) -> None:
        n = cfg.nvme
        if n.dirs:
            self.io = ThreadPoolExecutor(n.io_threads, thread_name_prefix="kvtier-nvme")
            # promotions have threads of their own: a read never queues behind the write-behind backlog
            self.reads = ThreadPoolExecutor(n.io_threads, thread_name_prefix="kvtier-nvme-read")
        else:
            self.io = self.reads = None
        self.write_at_commit = bool(n.dirs) and n.write_policy == "commit"
        self.promote_first = n.promote == "first"
        # a stuck disk must not hold most of RAM: at most half the arena waits for writing
        self.queue_limit = min(n.queue_bytes, hot.alloc.capacity // 2)
        if n.dirs and self.queue_limit < n.queue_bytes:
            log.info("nvme.queue_bytes: %d bytes, more than half the arena: %d bytes may wait for "
                     "writing", n.queue_bytes, self.queue_limit)
        self.queued_bytes = 0
        self._queued: dict[tuple[str, bytes], bool] = {}  # key -> cancelled (deleted/overwritten meanwhile)
        # demotions being written: evicted from RAM, not yet on NVMe (reads wait for them)
        self._landing: dict[tuple[str, bytes], threading.Event] = {}
        self._seen_once: dict[tuple[str, bytes], None] = {}
        self._holding: dict[tuple[str, bytes], Block | None] = {}  # promotions to hold at commit (see promote)
        # promotions and Deletes in flight, by key: a promotion commits only if no Delete of its key
        # began since it started (_promotions_begin); _plock orders that check and the commit
        # against a Delete's start. Taken before the hot lock, never under it.
        self._moving: dict[tuple[str, bytes], _Moving] = {}
        self._plock = threading.Lock()
        self._pool: dict[int, list[mmap.mmap | memoryview]] = {}  # demotion buffers by size, kept for reuse
        self._pool_bytes = 0  # of which free
        self._mapped = 0      # bytes of demotion buffers, free or in use
        self._qlock = threading.Lock()
        self._stop = threading.Event()  # ends the background header check at shutdown
        self._verifier: threading.Thread | None = None
        self.demotions = 0
        self.promotions = 0
        self.nvme_hits: dict[str, int] = {}  # per namespace: reads served by promoting from NVMe
        self.dropped_writes = 0
        self.cluster = NullCluster()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cluster_hits: dict[str, int] = {}
        # background Acquires (acquire_async(background=True)): their promotion tasks, and the
        # cluster keys they are reading (a future each, done when the key has landed or missed)
        self._background: set[asyncio.Task] = set()
        self._arriving: dict[tuple[str, bytes], asyncio.Future] = {}
        # their NVMe reads: a few coordinating threads (each hands its batch to the read threads)
        self._bg_pool = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="kvtier-landing")
        self._background_closed = False
        self.tokens_saved: dict[str, int] = {}  # per namespace: found keys x the client's tokens_per_key
        hot.on_commit = self._on_commit
        hot.on_evict = self._on_evict
        # "background": blocks committed on the client's checksums are re-hashed by a worker thread
        self.checker = CommitChecker(hot, view) if cfg.ram.verify_on_commit == "background" else None
        if self.checker is not None:
            hot.on_trusted = self.checker.submit

    # Everything not defined here (reserve, commit, release, pin, ...) is the hot tier's.
    def __getattr__(self, name):
        return getattr(self.hot, name)

    def start(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Rebuild the NVMe index from file names and sizes (blocking; run in a thread), then check
        the headers in a background thread while the daemon serves. ``progress``: the scan's."""
        n = self.cold.scan(progress)
        if n:
            self._verifier = threading.Thread(target=self._verify, name="kvtier-nvme-verify", daemon=True)
            self._verifier.start()
        return n

    def _verify(self) -> None:
        t0 = time.monotonic()
        try:
            read, removed = self.cold.verify_pending(VERIFY_THREADS, self._stop)
        except Exception:
            log.exception("nvme: the background header check failed; blocks are still checked when read")
            return
        log.info("nvme: %d headers checked in the background in %.2fs, %d files removed", read,
                 time.monotonic() - t0, removed)

    def close(self, timeout: float) -> bool:
        """Wait up to timeout seconds for queued writes; True if they all finished."""
        self._stop.set()
        self._background_closed = True
        self._bg_pool.shutdown(wait=False, cancel_futures=True)  # stop_background waited for them
        if self.checker is not None:  # before the arena goes: nothing may hash it after
            self.checker.close(timeout)
        if self.io is None:
            return True
        self.reads.shutdown(wait=False)
        done = threading.Event()

        def drain() -> None:
            try:
                self.io.shutdown(wait=True)
                self.reads.shutdown(wait=True)
                if self._verifier is not None:
                    self._verifier.join()
            finally:
                # the directories are ours until nothing of ours touches them: a late write ends
                # first, else the next daemon's scan would take it for an orphan
                self.cold.close()
                done.set()
        threading.Thread(target=drain, daemon=True, name="kvtier-nvme-drain").start()
        ok = done.wait(timeout)
        if not ok and self.queued_bytes:
            log.warning("%d bytes of NVMe writes still queued at exit; they are lost (the RAM copies too)",
                        self.queued_bytes)
        elif not ok:
            log.warning("NVMe reads or the background header check still running at exit; nothing is lost")
        return ok

    # ---- write-behind ---------------------------------------------------------------------

    def _admit(self, k, n: int) -> bool:
        """Account a queued write of n bytes (queue lock held by caller)."""
        if k in self._queued or self.cold.contains(*k):
            return False
        if self.queued_bytes + n > self.queue_limit:
            self.dropped_writes += 1
            return False
        self._queued[k] = False
        self.queued_bytes += n
        return True


    def _cancel_queued(self, ns: str, key: bytes) -> bool:
        """Mark a queued write of the key cancelled (its copy goes once written); whether one was."""
        with self._qlock:
            queued = (ns, key) in self._queued
            if queued:
                self._queued[(ns, key)] = True
        return queued

    def _forget_lower(self, ns: str, key: bytes) -> bool:
        """Drop the NVMe copy and cancel a queued write of it (delete, overwrite); whether there
        was either. Returns once no file of it is left to unlink (a removal or a write's rename
        under way included); not from the NVMe threads. OSError when the file cannot be
        unlinked: it stays indexed."""
        queued = self._cancel_queued(ns, key)
        return self.cold.delete(ns, key, wait=True) or queued

    def _cancelled(self, k: tuple[str, bytes]) -> bool:
        """Whether the queued write of k was cancelled; asked by that write under the NVMe tier's
        lock (no queue lock: a cancel is made before the canceller asks the NVMe tier for k)."""
        return self._queued.get(k) is not False

    def replaces_on_nvme(self, rid: int) -> bool:
        """Whether a commit must call drop_replaced() before it answers: an overwrite, with an
        NVMe tier."""
        return self.io is not None and bool(self.hot.overwritten(rid))

    def drop_replaced(self, rid: int) -> None:
        """Between begin_commit and finish_commit of an overwrite: the old content's NVMe file is
        unlinked (not only queued for unlinking) before the commit answers, so a crash after the
        answer cannot bring the old bytes back at the restart's scan. Blocking: on a thread, not
        the loop (a stalled filesystem stalls this commit only). Nothing for other commits.
        FailedPrecondition when the old file cannot be unlinked: the caller discards the
        reservation, and the key keeps its old content."""
        if self.io is None:
            return
        for ns, key in self.hot.overwritten(rid):
            try:
                self._forget_lower(ns, key)
            except OSError as e:
                raise errors.FailedPrecondition(
                    f"nvme: the old content's file could not be removed ({e.strerror}); nothing "
                    f"overwritten") from e

    def _forget_lower_soon(self, ns: str, key: bytes) -> None:
        """_forget_lower() for a caller holding the hot lock on the loop (an overwrite's commit,
        after drop_replaced() unlinked what was there: this catches a copy of the old content
        written since): the copy leaves the index now, its file is unlinked on an NVMe thread, so
        a stalled filesystem stalls that unlink, not every RAM operation. A new write of the key
        (queued after it) waits for the unlink."""
        self._cancel_queued(ns, key)
        doomed = self.cold.forget(ns, key)
        if doomed is None:
            return
        try:
            self.io.submit(self.cold.remove, doomed)
        except RuntimeError:  # the writers are shut down (the daemon stops)
            self.cold.remove(doomed)

    def attach_cluster(self, cluster, loop: asyncio.AbstractEventLoop) -> None:
        self.cluster, self.loop = cluster, loop
        # blocks waiting for a cluster write hold their RAM slots: a slow or stopped server must
        # not hold most of the arena (with NVMe's half, at most three quarters wait for writing)
        limit = min(cluster.queue_limit, self.hot.alloc.capacity // 4)
        if limit < cluster.queue_limit:
            log.info("cluster.queue_bytes: %d bytes, more than a quarter of the arena: %d bytes may "
                     "wait for writing", cluster.queue_limit, limit)
        cluster.queue_limit = limit

    def _on_commit(self, blocks: list[Block]) -> list[Block]:  # hot lock held
        if self._holding and blocks[0].promoted:  # a promotion whose caller leases it next: hold it till then
            k = (blocks[0].ns, blocks[0].key)
            if k in self._holding:
                self._holding[k] = blocks[0]
                return [blocks[0]]
        for b in blocks:
            if b.overwrite:  # the NVMe copy, if any, is the old content now
                if self.io is not None:
                    self._forget_lower_soon(b.ns, b.key)
                if not isinstance(self.cluster, NullCluster) and self.cluster.write_policy != "commit":
                    self.loop.call_soon_threadsafe(self._cluster_delete_soon, b.ns, b.key)  # else replaced by the write
        held = []
        if self.write_at_commit:
            with self._qlock:
                for b in blocks:
                    if self._admit((b.ns, b.key), b.length):
                        # as a demotion's: a promotion of the key (deleted from RAM meanwhile)
                        # waits until the write has ended, and a delete that overlapped it with it
                        self._landing[(b.ns, b.key)] = threading.Event()
                        held.append(b)
            for i, b in enumerate(held):
                try:
                    self.io.submit(self._write_held, b)
                except RuntimeError:  # the writers are shut down (the daemon stops): not written
                    for b2 in held[i:]:
                        self._written((b2.ns, b2.key), b2.length)
                    del held[i:]
                    break
        if self.cluster.write_policy == "commit":
            up = [b for b in blocks if not b.promoted]
            if up:
                held += up
                self.loop.call_soon_threadsafe(self._cluster_put_held, up)
        return held

    def _cluster_put_held(self, blocks: list[Block]) -> None:  # on the loop, hot lock not held
        for b in blocks:
            if b.state != COMMITTED:  # deleted or replaced since its commit: its bytes are nobody's now
                self.hot.unhold(b)
                continue
            view = self.view[b.offset:b.offset + b.length]
            self.cluster.enqueue_put(b.ns, b.key, view, b.checksum, on_done=lambda b=b: self.hot.unhold(b),
                                     replaces=b.overwrite)

    def _cluster_delete_soon(self, ns: str, key: bytes) -> None:
        self.loop.create_task(self.cluster.delete_many(ns, [key]))

    def _write_held(self, b: Block) -> None:
        k = (b.ns, b.key)
        try:
            slot = self.view[b.offset:b.offset + self.hot.alloc.round(b.length)]
            self.cold.write(b.ns, b.key, slot, b.length, b.checksum,
                            cancelled=functools.partial(self._cancelled, k))
        except Exception:
            log.exception("write-behind of a block failed")
        finally:
            self._written(k, b.length)
            self.hot.unhold(b)

    def _written(self, k: tuple[str, bytes], length: int) -> None:
        """A queued write (at commit, or a demotion) has ended, written or not: its copy goes if
        the key was deleted or replaced meanwhile (do not resurrect it), and promotions waiting
        for it go on. The key counts as cancelled (_queued: True, then _REMOVING) until that copy
        is gone: never as on NVMe, so a put of it in between is not answered "present". (A write
        cancelled before its rename left no copy; one cancelled during it by an overwrite's
        commit, which cannot wait on the loop, left one.) A copy that cannot be unlinked is
        logged and left out of the index: its content is no longer the key's."""
        try:
            while True:
                with self._qlock:
                    if self._queued.get(k) is not True:
                        break
                    self._queued[k] = _REMOVING  # a cancel from now on sets True again: once more
                doomed = self.cold.forget(*k)
                if doomed is not None:
                    self.cold.remove(doomed)
        finally:
            with self._qlock:
                self.queued_bytes -= length
                self._queued.pop(k, None)
                landed = self._landing.pop(k, None)
            if landed is not None:
                landed.set()

    def _on_evict(self, b: Block) -> None:  # hot lock held: copy out before the slot is reused
        # content whose overwrite is committing goes to no lower tier: the commit has unlinked (or
        # is unlinking) its NVMe file, and a copy written now could still be renaming into place as
        # the commit answers (a crash then leaves the old bytes for the restart's scan); its
        # cluster copy is deleted as the commit ends, and a put queued now could land after that
        if self.hot.being_replaced(b):
            return
        if self.cluster.write_policy == "evict" and not b.promoted:
            data = bytes(self.view[b.offset:b.offset + b.length])
            self.loop.call_soon_threadsafe(self.cluster.enqueue_put, b.ns, b.key, data, b.checksum)
        if self.io is None:
            return
        k = (b.ns, b.key)
        with self._qlock:
            if not self._admit(k, b.length):
                return
            self._landing[k] = threading.Event()
        data = None
        try:
            data = self._buffer(self.hot.alloc.round(b.length))  # page-aligned: O_DIRECT writes it as is
            data[:b.length] = self.view[b.offset:b.offset + b.length]
            self.io.submit(self._write_copy, b.ns, b.key, data, b.length, b.checksum)
        except BaseException:
            # no memory for the copy, or the writers are shut down: the write is not queued after all,
            # else the key would count as on its way to NVMe for good and its gets wait for it
            if data is not None:
                self._return_buffer(data)
            self._written(k, b.length)
            raise
        self.demotions += 1

    def _write_copy(self, ns: str, key: bytes, data: mmap.mmap | memoryview, length: int, digest: bytes) -> None:
        try:
            with memoryview(data) as mv:
                self.cold.write(ns, key, mv, length, digest, cancelled=functools.partial(self._cancelled, (ns, key)))
        except Exception:
            log.exception("demotion of a block failed")
        finally:
            self._return_buffer(data)
            self._written((ns, key), length)

    def _on_nvme(self, ns: str, key: bytes) -> bool:
        """On NVMe, or on its way there (a demotion being written: a read waits for it); not when
        that write was cancelled (by a Delete or an overwrite: its file goes once it lands), else a
        put of the key after the Delete was answered "present" and the key was then lost."""
        k = (ns, key)  # no lock: a Lookup asks this of every key RAM lacks; each read is atomic
        if self._queued.get(k, False):
            return False
        return k in self._landing or self.cold.contains(ns, key)

    def _buffer(self, size: int) -> mmap.mmap | memoryview:
        """A page-aligned buffer for a demotion copy, reused when one of that size is free: a
        fresh mapping costs its page faults on every copy and an unmap after (together ~10x the
        copy itself). Buffers stay mapped for the next demotion, together at most the write
        queue's bound (``queue_limit``): idle ones of other sizes are unmapped to make room."""
        idle = []
        with self._qlock:
            pool = self._pool.get(size)
            if pool:
                self._pool_bytes -= size
                return pool.pop()
            while self._mapped + size > self.queue_limit and self._pool_bytes:
                buf = next(p for p in self._pool.values() if p).pop()
                self._pool_bytes -= len(buf)
                self._mapped -= len(buf)
                idle.append(buf)
            self._mapped += size
        for buf in idle:
            if isinstance(buf, memoryview):
                buf.release()  # a huge_buffer: its mapping goes with the last view
            else:
                buf.close()
        # a multiple of 2 MiB: huge pages where the kernel gives them, so the O_DIRECT write of the
        # copy is one device request, not one per few hundred scattered 4 KiB pages
        return huge_buffer(size) if size % HUGE == 0 else mmap.mmap(-1, size)

    def _return_buffer(self, buf: mmap.mmap | memoryview) -> None:
        with self._qlock:
            self._pool.setdefault(len(buf), []).append(buf)
            self._pool_bytes += len(buf)

    def reserve(self, ns: str, keys: Sequence[bytes], sizes: Sequence[int], ttl_ms: int = 0,
                overwrite: bool = False, expires: bool = True):
        """The hot tier's reserve; keys already on NVMe count as present."""
        return self.hot.reserve(ns, keys, sizes, ttl_ms, overwrite, present=self._on_nvme, expires=expires)

    # ---- reads ------------------------------------------------------------------------------

    def lookup(self, ns: str, keys: Sequence[bytes]) -> tuple[bytes, int]:
        tiers, _ = self.hot.lookup(ns, keys)
        i = tiers.find(TIER_MISSING)
        if i >= 0:  # only the keys RAM lacks are looked up on NVMe
            t = bytearray(tiers)
            contains = self._on_nvme
            while i >= 0:
                if contains(ns, keys[i]):
                    t[i] = TIER_NVME
                i = tiers.find(TIER_MISSING, i + 1)
            tiers = bytes(t)
        p = tiers.find(TIER_MISSING)
        return tiers, (len(keys) if p < 0 else p)

    def promote(self, ns: str, key: bytes, hold: bool = False) -> Block | bool:
        """Bring a block from NVMe into the arena (blocking). True if it is in RAM now. With hold,
        the block is held from the moment it is committed (no eviction can take it before the
        caller leases it) and returned; the caller unholds it."""
        gen = self._promotions_begin(ns, [key])[0]
        if gen is None:  # being deleted: a miss
            return False
        holder: dict = {}
        try:
            return self._promote(ns, key, hold, gen, holder)
        finally:
            ev = holder.get("ev")
            if ev is not None:  # promotions that found the key reserved by this one look again
                with self._plock:
                    self._moving[(ns, key)].reading = None
                ev.set()
            self._moving_end(ns, [key], "promoting")

    def _promote(self, ns: str, key: bytes, hold: bool, gen: int, holder: dict) -> Block | bool:
        k = (ns, key)
        landing = self._landing.get(k)
        if landing is not None:  # evicted a moment ago: its demotion is being written
            landing.wait(LANDING_WAIT_S)

        def dest(n: int) -> memoryview:
            if "r" in holder:  # asked again (a compressed record): the first slot had the wrong size
                self.hot.discard(holder.pop("r"))
            # no expiry: a read stalled past reservation_ms (a disk's I/O timeout is 30 s) must not
            # land in a slot given to another block meanwhile; every path here ends it
            r = self.hot.reserve(ns, [key], [n], expires=False, promotion=True)
            if not r.reservation_id:
                raise _Present()
            holder["r"] = r.reservation_id
            if "ev" not in holder:
                with self._plock:
                    e = self._moving[k]
                    if e.reading is None:
                        e.reading = holder["ev"] = threading.Event()
            off = r.offsets[0]
            return self.view[off:off + self.hot.alloc.round(n)]

        try:
            meta = self.cold.read(ns, key, dest)
        except _Present:
            if "r" in holder:
                self.hot.discard(holder["r"])
            # in RAM, or reserved: by a put (a miss until it commits) or by a promotion of the same
            # key reading it now (two requests sharing a prefix): wait for that one, not a miss.
            # The other promotion reserves first and says it reads a moment later: while the slot
            # is reserved and it has not said so yet, look again.
            deadline = time.monotonic() + LANDING_WAIT_S
            while not self.hot.contains(ns, key):
                with self._plock:
                    e = self._moving[k]
                    ev, others = e.reading, e.promoting - 1
                if ev is not None:
                    ev.wait(max(0.0, deadline - time.monotonic()))
                    break
                if not others or time.monotonic() >= deadline:
                    break  # a put holds the slot (a miss until it commits), or nothing came
                time.sleep(0.0005)
            return self.hot.contains(ns, key)
        except errors.ResourceExhausted:
            if "r" in holder:
                self.hot.discard(holder["r"])
            return False
        except BaseException:
            if "r" in holder:
                self.hot.discard(holder["r"])
            raise
        rid = holder.get("r")
        if meta is None:
            if rid:
                self.hot.discard(rid)
            return False
        with self._plock:
            if self._moving[k].deletes != gen:  # deleted while we read: the bytes must not come back
                b = False
            else:
                if hold:
                    self._holding[k] = None  # _on_commit holds it and puts the block here
                replaced = False
                try:
                    self.hot.begin_commit(rid)
                    self.hot.finish_commit(rid, [meta.checksum], promoted=True)  # verified by cold.read
                except Superseded:  # overwritten while we read: the old bytes must not come back
                    replaced = True
                finally:
                    b = self._holding.pop(k, None) if hold else None
                if replaced:
                    b = False
        if b is False:
            self.hot.discard(rid)
            return False
        self.promotions += 1
        return b if b is not None else True

    def _promotions_begin(self, ns: str, keys: Sequence[bytes]) -> list[int | None]:
        """Register promotions of keys; for each, the count of its Deletes so far (compared at
        commit), or None for a key being deleted now (not registered: the caller misses)."""
        out: list[int | None] = []
        with self._plock:
            for key in keys:
                e = self._moving.get((ns, key))
                if e is None:
                    e = self._moving[(ns, key)] = _Moving()
                elif e.deleting:
                    out.append(None)
                    continue
                e.promoting += 1
                out.append(e.deletes)
        return out

    def _deletes_begin(self, ns: str, keys: Sequence[bytes]) -> None:
        """A Delete of keys begins: promotions in flight will not commit, new ones miss until
        _moving_end."""
        with self._plock:
            for key in keys:
                e = self._moving.get((ns, key))
                if e is None:
                    e = self._moving[(ns, key)] = _Moving()
                e.deleting += 1
                e.deletes += 1

    def _moving_end(self, ns: str, keys: Sequence[bytes], what: str) -> None:
        """End promotions ("promoting": those _promotions_begin gave a count for) or Deletes
        ("deleting") of keys."""
        with self._plock:
            for key in keys:
                k = (ns, key)
                e = self._moving[k]
                setattr(e, what, getattr(e, what) - 1)
                if e.promoting == e.deleting == 0:
                    del self._moving[k]

    def _acquire_ram(self, ns: str, keys: Sequence[bytes], lease_ms: int,
                     prefix_only: bool, counted: bool = True) -> tuple[Acquired, list[int]]:
        """Lease what RAM holds (no I/O: fit for the event loop); returns the lease and the
        positions to promote from NVMe. Only the keys RAM lacks are looked up on NVMe."""
        a = self.hot.acquire(ns, keys, lease_ms, prefix_only, count_misses=False, counted=counted)
        i = a.tiers.find(TIER_MISSING)
        if i < 0:
            return a, []
        if prefix_only and i + 1 < len(keys) and self._on_nvme(ns, keys[i]):
            # the gap is on NVMe: what RAM holds past it belongs to the answer too
            if not self._lease_into(ns, keys, a, range(i + 1, len(keys)), lease_ms, counted):
                return a, []  # the lease ran out already: stop at the gap
        todo = []
        tiers = a.tiers
        while i >= 0:
            if self._on_nvme(ns, keys[i]):
                todo.append(i)
            elif prefix_only:
                break
            i = tiers.find(TIER_MISSING, i + 1)
        if todo and not a.lease_id:  # past the tenant's lease bounds: refused before any read
            self.hot.check_lease_room(ns, len(todo))
        return a, todo

    def _promote_join(self, ns: str, key: bytes, join: _Join,
                      counted: bool = True) -> tuple[int, int, bytes, bool] | None:
        """Promote one block and add it to the lease at once; its (offset, length, checksum, read
        here: False when another promotion read it), or None for a miss."""
        held = None
        try:
            held = self.promote(ns, key, hold=True)
            if not held:
                return None
            with join.lock:
                b = self.hot.acquire(ns, [key], join.lease_ms, lease_id=join.lease_id, count_misses=False,
                                     counted=counted, lower=isinstance(held, Block))
                if not b.tiers[0]:
                    return None
                join.lease_id = join.lease_id or b.lease_id
            return b.offsets[0], b.lengths[0], b.checksums, isinstance(held, Block)
        except (errors.UnknownLease, errors.ResourceExhausted):  # the lease ran out while we promoted,
            return None  # or its tenant's bounds were reached meanwhile: a miss
        except Exception:
            log.exception("promotion of a block from NVMe failed; counted as a miss")
            return None
        finally:
            if isinstance(held, Block):
                self.hot.unhold(held)  # leased now (or a miss): the hold from its commit ends

    def _promote_all(self, ns: str, keys: Sequence[bytes], a: Acquired, todo: list[int], lease_ms: int,
                     prefix_only: bool, counted: bool = True) -> Acquired:
        """Promote the blocks at positions todo (blocking): this thread reads the first, the NVMe
        read threads the others, all at once. Each joins the lease as soon as it is in RAM, so a
        batch larger than free RAM cannot evict its own earlier blocks before they are read;
        results are taken in key order. With prefix_only, reads past the first block not promoted
        are cancelled if they have not started."""
        join = _Join(a.lease_id, lease_ms)
        futs = {}
        for i in todo[1:]:
            try:
                futs[i] = self.reads.submit(self._promote_join, ns, keys[i], join, counted)
            except RuntimeError:  # shutting down: this thread reads the rest
                break
        got = {todo[0]: self._promote_join(ns, keys[todo[0]], join, counted)}
        tiers, sums = bytearray(a.tiers), bytearray(a.checksums)
        gap = -1
        found = 0
        for i in todo:
            f = futs.get(i)
            if i in got:
                r = got[i]
            elif f is None:
                r = None if gap >= 0 else self._promote_join(ns, keys[i], join, counted)
            else:
                r = None if f.cancelled() else f.result()
            if r is None:
                if prefix_only and gap < 0:
                    gap = i
                    for f in futs.values():
                        f.cancel()  # not started yet: not read at all
                continue
            if gap >= 0:
                continue
            tiers[i] = TIER_NVME
            a.offsets[i], a.lengths[i] = r[0], r[1]
            sums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE] = r[2]
            found += r[3]  # one NVMe hit per read: not again for an Acquire that waited for another's
        if found and counted:
            self.nvme_hits[ns] = self.nvme_hits.get(ns, 0) + found
        a.lease_id = join.lease_id
        a.tiers, a.checksums = bytes(tiers), bytes(sums)
        return a

    def acquire(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0, prefix_only: bool = False,
                count_misses: bool = True, counted: bool = True) -> Acquired:
        """Lease blocks in the arena, promoting those found on NVMe first (blocking when it
        promotes). With prefix_only, nothing past the first key found in no tier is reported.
        counted=False: no hit, miss or byte is counted (an earlier Acquire counted this read)."""
        a, todo = self._acquire_ram(ns, keys, lease_ms, prefix_only, counted)
        if todo:
            a = self._promote_all(ns, keys, a, todo, lease_ms, prefix_only, counted)
        if prefix_only:
            _cut(a)
        if count_misses and counted and TIER_MISSING in a.tiers:
            self.hot.count_misses(ns, _misses(a.tiers, prefix_only))
        return a

    # ---- the cluster tier (coroutines on the daemon's loop) ----------------------------------

    async def lookup_async(self, ns: str, keys: Sequence[bytes]) -> tuple[bytes, int]:
        """lookup() that also asks the cluster tier for keys no local tier has (within
        cluster.lookup_timeout_ms)."""
        tiers, prefix = self.lookup(ns, keys)
        missing = [i for i, t in enumerate(tiers) if t == TIER_MISSING]
        if missing:
            found = await self._exists_within(ns, [keys[i] for i in missing])
            if any(found):
                t = bytearray(tiers)
                for i, f in zip(missing, found):
                    if f:
                        t[i] = TIER_CLUSTER
                tiers = bytes(t)
                p = tiers.find(TIER_MISSING)
                prefix = len(keys) if p < 0 else p
        return tiers, prefix

    async def promote_from_cluster(self, ns: str, keys: Sequence[bytes]) -> list[bool]:
        """Read blocks from the cluster tier straight into fresh arena slots and commit them (not
        those deleted meanwhile)."""
        gens = self._promotions_begin(ns, keys)
        try:
            return await self._promote_from_cluster(ns, keys, gens)
        finally:
            self._moving_end(ns, [k for k, g in zip(keys, gens) if g is not None], "promoting")

    async def _promote_from_cluster(self, ns: str, keys: Sequence[bytes], gens: list[int | None]) -> list[bool]:
        rids: dict[int, int] = {}
        hot = self.hot

        def into(i: int, n: int):
            if gens[i] is None:
                return None  # being deleted: a miss
            try:
                r = hot.reserve(ns, [keys[i]], [n], expires=False, promotion=True)  # ended below, as _promote's
            except errors.KvtierError:
                return None  # no room: a miss
            if not r.reservation_id:
                return None  # arrived meanwhile
            rids[i] = r.reservation_id
            off = r.offsets[0]
            return self.view[off:off + n]

        try:
            got = await self.cluster.get_many(ns, list(keys), into)
        except BaseException:
            for rid in rids.values():
                hot.discard(rid)
            raise
        out = []
        for i, g in enumerate(got):
            rid = rids.get(i)
            if g is None or rid is None:
                if rid is not None:
                    hot.discard(rid)
                out.append(g is not None and hot.contains(ns, keys[i]))
                continue
            with self._plock:
                ok = self._moving[(ns, keys[i])].deletes == gens[i]  # else deleted while we read
                if ok:
                    try:
                        hot.begin_commit(rid)
                        hot.finish_commit(rid, [g[1]], promoted=True)  # verified by the cluster tier
                    except Superseded:  # overwritten while we read
                        ok = False
            if not ok:
                hot.discard(rid)
            out.append(ok)
        return out

    async def acquire_async(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0,
                            prefix_only: bool = False, background: bool = False, counted: bool = True) -> Acquired:
        """acquire() (in a worker thread when it touches NVMe), then the cluster tier for keys
        still missing: found blocks are promoted and join the same lease. With prefix_only,
        nothing past the first key found in no tier is leased or reported. With background,
        see _acquire_background: the answer does not wait for NVMe or cluster reads."""
        if self._arriving and not background:
            await self._await_arriving(ns, keys)
        a, todo = self._acquire_ram(ns, keys, lease_ms, prefix_only, counted)
        if background:
            return await self._acquire_background(ns, keys, a, todo, lease_ms, prefix_only, counted)
        if todo:
            a = await asyncio.to_thread(self._promote_all, ns, keys, a, todo, lease_ms, prefix_only, counted)
        if prefix_only:
            _cut(a)
        gap = a.tiers.find(TIER_MISSING)
        if gap < 0:
            return a
        if isinstance(self.cluster, NullCluster):
            if counted:
                self.hot.count_misses(ns, _misses(a.tiers, prefix_only))
            return a
        # misses are counted once, after the cluster tier had its say
        todo = list(range(gap, len(keys))) if prefix_only else \
            [i for i, t in enumerate(a.tiers) if t == TIER_MISSING]
        absent = [i for i in todo if not self.hot.contains(ns, keys[i])]
        if absent and not a.lease_id:  # past the tenant's lease bounds: refused before any read
            self.hot.check_lease_room(ns, len(absent))
        ok = dict(zip(absent, await self.promote_from_cluster(ns, [keys[i] for i in absent])))
        tiers, sums = bytearray(a.tiers), bytearray(a.checksums)
        found = 0
        for i in todo:
            b = None
            if ok.get(i, True) and self.hot.contains(ns, keys[i]):
                try:
                    b = self.hot.acquire(ns, [keys[i]], lease_ms, lease_id=a.lease_id, count_misses=False,
                                         counted=counted, lower=i in ok)
                except (errors.UnknownLease, errors.ResourceExhausted):  # bounds reached meanwhile: a miss
                    b = None
            if b is None or not b.tiers[0]:
                if prefix_only:
                    break
                continue
            a.lease_id = a.lease_id or b.lease_id
            tiers[i] = TIER_CLUSTER if i in ok else TIER_RAM
            a.offsets[i], a.lengths[i] = b.offsets[0], b.lengths[0]
            sums[i * 16:(i + 1) * 16] = b.checksums
            found += i in ok
        if found and counted:
            self.cluster_hits[ns] = self.cluster_hits.get(ns, 0) + found
        a.tiers, a.checksums = bytes(tiers), bytes(sums)
        if counted:
            self.hot.count_misses(ns, _misses(a.tiers, prefix_only))
        return a

    def acquire_background(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0,
                           prefix_only: bool = False, counted: bool = True) -> Acquired:
        """acquire_async(background=True) for a daemon without a cluster tier, on the calling
        thread (no I/O here: NVMe reads go to the background pool)."""
        a, todo = self._acquire_ram(ns, keys, lease_ms, prefix_only, counted)
        return self._background_finish(ns, keys, a, self._with_nvme(a, todo), todo, [], lease_ms, prefix_only,
                                       counted)

    async def _acquire_background(self, ns: str, keys: Sequence[bytes], a: Acquired, todo: list[int],
                                  lease_ms: int, prefix_only: bool, counted: bool = True) -> Acquired:
        """The answer of an Acquire that leaves promotions for later: RAM's blocks leased now;
        blocks on NVMe or (after one existence check, within cluster.lookup_timeout_ms) in the
        cluster tier reported with their tier but no slot (offset and length 0), read into RAM
        after the answer, each joining the lease when it lands (the lease is opened empty when
        RAM had none). A caller that needs the bytes acquires them again: it waits for those
        still landing. What the scheduler of an inference engine asks while every running
        request waits for it: it needs to know the hit, not the bytes."""
        tiers = self._with_nvme(a, todo)
        cl: list[int] = []
        gap = tiers.find(TIER_MISSING)
        if gap >= 0 and not isinstance(self.cluster, NullCluster):
            if prefix_only:
                # RAM stopped at the gap: the blocks it holds past it count if the cluster fills it
                if self._lease_into(ns, keys, a, [i for i in range(gap + 1, len(keys))
                                                  if tiers[i] == TIER_MISSING], lease_ms, counted):
                    tiers = self._with_nvme(a, todo)
            ask = [i for i in range(gap if prefix_only else 0, len(keys)) if tiers[i] == TIER_MISSING]
            found = await self._exists_within(ns, [keys[i] for i in ask]) if ask else []
            cl = [i for i, f in zip(ask, found) if f]
            for i in cl:
                tiers[i] = TIER_CLUSTER
        return self._background_finish(ns, keys, a, tiers, todo, cl, lease_ms, prefix_only, counted)

    def _lease_into(self, ns: str, keys: Sequence[bytes], a: Acquired, positions: Sequence[int],
                    lease_ms: int, counted: bool = True) -> bool:
        """Lease the blocks RAM holds at these positions of keys into a's lease (a new one when a
        has none), filling in their tier, slot and checksum; False when a's lease ran out."""
        if not positions:
            return True
        try:
            r = self.hot.acquire(ns, [keys[i] for i in positions], lease_ms, lease_id=a.lease_id,
                                 count_misses=False, counted=counted)
        except errors.UnknownLease:
            return False
        tiers, sums = bytearray(a.tiers), bytearray(a.checksums)
        for j, i in enumerate(positions):
            if r.tiers[j]:
                tiers[i] = r.tiers[j]
                a.offsets[i], a.lengths[i] = r.offsets[j], r.lengths[j]
                sums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE] = r.checksums[j * CHECKSUM_SIZE:(j + 1) * CHECKSUM_SIZE]
        a.tiers, a.checksums, a.lease_id = bytes(tiers), bytes(sums), a.lease_id or r.lease_id
        return True

    @staticmethod
    def _with_nvme(a: Acquired, nvme: list[int]) -> bytearray:
        """a's tiers with the positions being read from NVMe marked so."""
        tiers = bytearray(a.tiers)
        for i in nvme:
            tiers[i] = TIER_NVME
        return tiers

    def _background_finish(self, ns: str, keys: Sequence[bytes], a: Acquired, tiers: bytearray, nvme: list[int],
                           cl: list[int], lease_ms: int, prefix_only: bool, counted: bool = True) -> Acquired:
        """The answer of a background Acquire, and the reads that land its blocks: NVMe reads on
        the background pool, cluster reads in a task on the loop."""
        a.tiers = bytes(tiers)
        if prefix_only:
            _cut(a)
            gap = a.tiers.find(TIER_MISSING)
            if gap >= 0:
                nvme, cl = [i for i in nvme if i < gap], [i for i in cl if i < gap]
        if (nvme or cl) and not self._background_closed and not a.lease_id:
            a.lease_id = self.hot.open_lease(ns, lease_ms)  # first: past the bounds, the call fails whole
        if counted:
            self.hot.count_misses(ns, _misses(a.tiers, prefix_only))
        if (not nvme and not cl) or self._background_closed:
            return a  # nothing to land (or shutting down: a worker's own Acquire reads or misses)
        if nvme:
            n = len(keys)
            stub = Acquired(a.lease_id, bytes(n), [0] * n, [0] * n, bytes(n * CHECKSUM_SIZE), lease_ms)
            try:
                self._bg_pool.submit(self._promote_all, ns, keys, stub, nvme, lease_ms, False, counted)
            except RuntimeError:  # the pool shut down meanwhile
                pass
        if cl:
            owned, others = [], []  # keys this Acquire reads / keys another one is reading already
            for i in cl:
                k = (ns, keys[i])
                if k in self._arriving:
                    others.append(i)
                else:
                    self._arriving[k] = self.loop.create_future()
                    owned.append(i)
            task = asyncio.ensure_future(self._land(ns, keys, owned, others, a.lease_id, lease_ms, counted))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return a

    async def _land(self, ns: str, keys: Sequence[bytes], owned: list[int], others: list[int],
                    lease_id: int, lease_ms: int, counted: bool = True) -> None:
        """Read a background Acquire's cluster-tier blocks into its lease: those it owns (each
        key's waiters are told as soon as its read ended) and those another Acquire is reading
        (joined when they have landed)."""
        def join(key: bytes, lower: bool) -> bool:
            try:
                return bool(self.hot.acquire(ns, [key], lease_ms, lease_id=lease_id, count_misses=False,
                                             counted=counted, lower=lower).tiers[0])
            except errors.UnknownLease:
                return False  # released or expired meanwhile: the block stays in RAM, unleased

        async def mine() -> None:
            ks = [keys[i] for i in owned]
            try:
                ok = await self.promote_from_cluster(ns, ks)
            finally:
                self._arrived(ns, ks)
            found = sum(1 for k, good in zip(ks, ok) if good and join(k, True))
            if found and counted:
                self.cluster_hits[ns] = self.cluster_hits.get(ns, 0) + found

        async def theirs() -> None:
            await self._await_arriving(ns, [keys[i] for i in others])
            for i in others:
                join(keys[i], False)
        try:
            jobs = ([mine()] if owned else []) + ([theirs()] if others else [])
            for r in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(r, Exception):
                    log.error("a background promotion from the cluster tier failed; its blocks are misses: %s", r)
        finally:
            self._arrived(ns, [keys[i] for i in owned])

    def _arrived(self, ns: str, ks: Sequence[bytes]) -> None:
        for k in ks:
            f = self._arriving.pop((ns, k), None)
            if f is not None and not f.done():
                f.set_result(None)

    async def _exists_within(self, ns: str, keys: list[bytes]) -> list[bool]:
        """The cluster tier's existence check within cluster.lookup_timeout_ms: a slow server (not a
        down one: that answers at once) makes the keys misses rather than hold the caller. The
        tier cuts each server's share at that deadline itself (counted in lookups_cut; a server
        that sends nothing during three cut lookups in a row is marked down); the deadline here,
        twice as long, only bounds what it spends before (waiting for a slot map)."""
        if isinstance(self.cluster, NullCluster):
            return [False] * len(keys)
        try:
            async with asyncio.timeout(2 * self.cluster.cfg.lookup_timeout_ms / 1000):
                return await self.cluster.exists_many(ns, keys)
        except TimeoutError:
            self.cluster.stats.lookups_cut += 1
            return [False] * len(keys)

    async def _await_arriving(self, ns: str, keys: Sequence[bytes]) -> None:
        """Wait for the blocks of keys that a background Acquire is reading from the cluster
        tier (reading them again would find their slots reserved and answer a miss), at most
        as long as such a read may take."""
        futs = {f for f in (self._arriving.get((ns, k)) for k in keys) if f is not None}
        if futs:
            await asyncio.wait(futs, timeout=LANDING_WAIT_S + self.cluster.cfg.timeout_ms / 1000)

    async def stop_background(self) -> None:
        """Shutdown: no new background reads; cancel those from the cluster, let those from NVMe
        finish (they write into the arena, which closes next)."""
        self._background_closed = True
        tasks = list(self._background)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for f in self._arriving.values():
            if not f.done():
                f.set_result(None)
        self._arriving.clear()
        await asyncio.to_thread(self._bg_pool.shutdown, True, cancel_futures=True)

    def acquire_blocking(self, ns: str, keys: Sequence[bytes], lease_ms: int = 0, counted: bool = True) -> Acquired:
        """acquire_async() from a thread that is not the loop's (the data channel)."""
        if isinstance(self.cluster, NullCluster) or self.loop is None:
            return self.acquire(ns, keys, lease_ms, counted=counted)
        fut = asyncio.run_coroutine_threadsafe(self.acquire_async(ns, keys, lease_ms, counted=counted), self.loop)
        return fut.result(timeout=60)

    async def delete_async(self, ns: str, keys: Sequence[bytes]) -> int:
        """Delete from every tier; the count is of keys found in a local tier, or the cluster's
        count when no local tier had any."""
        self._deletes_begin(ns, keys)  # until the cluster's copies are gone too: a promotion may read them
        try:
            n, stuck = await asyncio.to_thread(self._delete_local, ns, keys)
            c = await self.cluster.delete_many(ns, list(keys))
        finally:
            self._moving_end(ns, keys, "deleting")
        _refuse_stuck(stuck, len(keys))
        return n or c

    def read_inline(self, ns: str, key: bytes) -> tuple[int, bytes, bytes] | None:
        """For inline gets of a block that is only on NVMe, under ``promote = "second"``: serve the
        first read from a transient buffer. Returns (tier, data, checksum) or None when the caller
        should promote (or the block is absent)."""
        if self.promote_first or self.hot.contains(ns, key) or not self._on_nvme(ns, key):
            return None
        k = (ns, key)
        with self._qlock:
            if k in self._seen_once:
                del self._seen_once[k]
                return None
            self._seen_once[k] = None
            while len(self._seen_once) > 100_000:
                self._seen_once.pop(next(iter(self._seen_once)))
        buf: dict = {}

        def dest(n: int) -> memoryview:
            buf["b"] = bytearray(-(-n // 4096) * 4096)
            return memoryview(buf["b"])

        meta = self.cold.read(ns, key, dest)
        if meta is None:
            return None
        return TIER_NVME, bytes(memoryview(buf["b"])[:meta.raw_len]), meta.checksum

    # ---- removal and stats -------------------------------------------------------------------

    def count_tokens_saved(self, ns: str, tokens: int) -> None:
        """Prefill a read spared its client, as the client valued it (the read's tokens_per_key).
        From the loop and the data channel's threads."""
        if tokens:
            with self._qlock:
                self.tokens_saved[ns] = self.tokens_saved.get(ns, 0) + tokens

    def delete(self, ns: str, keys: Sequence[bytes]) -> int:
        """Remove keys from every local tier; returns how many keys were present in any. Promotions
        of them in flight do not commit. FailedPrecondition when the NVMe file of some could not
        be unlinked (the others are deleted all the same)."""
        self._deletes_begin(ns, keys)
        try:
            n, stuck = self._delete_local(ns, keys)
        finally:
            self._moving_end(ns, keys, "deleting")
        _refuse_stuck(stuck, len(keys))
        return n

    def _delete_local(self, ns: str, keys: Sequence[bytes]) -> tuple[int, list[OSError]]:
        """delete() within a Delete begun by the caller: the count, and the errors of the keys
        whose NVMe file stays (still indexed and served: the next start would find it)."""
        n, stuck = 0, []
        for k in keys:
            in_ram = self.hot.delete(ns, [k])
            try:
                on_disk = self._forget_lower(ns, k)
            except OSError as e:
                stuck.append(e)
                on_disk = True
            n += bool(in_ram or on_disk)
        return n, stuck

    def snapshot(self) -> dict:
        s = self.hot.snapshot()
        c = self.cold.snapshot()
        if c is not None:
            with self._qlock:
                c["queued_bytes"] = self.queued_bytes
                c["queue_dropped"] = self.dropped_writes
            c["demotions"] = self.demotions
            c["promotions"] = self.promotions
        s["nvme"] = c
        s["nvme_hits_by_namespace"] = dict(self.nvme_hits)
        s["cluster"] = self.cluster.snapshot()
        s["cluster_hits_by_namespace"] = dict(self.cluster_hits)
        s["prefill_tokens_saved_by_namespace"] = dict(self.tokens_saved)
        s["commit_checks"] = self.checker.snapshot() if self.checker is not None else None
        return s


def _refuse_stuck(stuck: list[OSError], total: int) -> None:
    """A Delete some of whose NVMe files could not be unlinked fails: answered, the next start
    would serve those keys again."""
    if stuck:
        raise errors.FailedPrecondition(
            f"nvme: the files of {len(stuck)} of {total} keys could not be removed ({stuck[0].strerror}); "
            f"they stay on NVMe and are served until a Delete of them succeeds")


def _misses(tiers: bytes, prefix_only: bool) -> int:
    """Keys a read counts as missed: every absent one; with prefix_only, every key from the first
    gap on (none past it is served)."""
    if prefix_only:
        g = tiers.find(TIER_MISSING)
        return 0 if g < 0 else len(tiers) - g
    return tiers.count(TIER_MISSING)


def _cut(a: Acquired) -> None:
    """Report nothing past the first gap (blocks leased past it stay leased until release)."""
    g = a.tiers.find(TIER_MISSING)
    n = len(a.tiers)
    if g < 0 or a.tiers.count(TIER_MISSING, g) == n - g:
        return
    a.tiers = a.tiers[:g] + bytes(n - g)
    a.offsets[g:], a.lengths[g:] = [0] * (n - g), [0] * (n - g)
    a.checksums = a.checksums[:g * CHECKSUM_SIZE] + bytes((n - g) * CHECKSUM_SIZE)
