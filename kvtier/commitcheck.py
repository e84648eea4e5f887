"""Background verification of trusted commits (``ram.verify_on_commit = "background"``).

A client that sends checksums at Commit (or in a data-channel PUT header)
computed them right after copying each block, while the bytes were hot in its
cache; hashing them again in the daemon before the commit returns is the
largest fixed cost of a put. In "background" mode the commit trusts them and
returns at once; the hot tier then hands the committed blocks here
(``HotTier.on_trusted``) and one worker thread re-hashes each off the request
path. A block whose bytes do not match its checksum is dropped from the index
as Delete drops it (a reader holding a lease keeps it, DOOMED, until release),
and counted. Every reader verifies anyway, so until then a bad block can only
be a miss, never wrong data.

Each block is checked CHECK_DELAY_S after its commit rather than at once: a
block deleted or replaced by then needs no check, and the pass over its bytes
does not compete with the writer reading back what it just stored (on a small
machine the hash and that copy share the memory bus and the cores).

A commit's blocks are queued as one batch and held (against eviction and slot
reuse) CHECK_GROUP at a time while they are hashed, so the per-block cost
besides the hash is a few dict lookups under the hot-tier lock.

The queue is bounded: when it is full a block is not checked (counted in
``unchecked``) and the commit is never made to wait.

A lower tier may already hold a copy of a block found bad (write-behind to
NVMe, write-through to Redis): it is left there, carrying the same checksum,
and every read from those tiers verifies it and deletes it as corrupt.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from .hot import Block, HotTier, checksum

log = logging.getLogger("kvtier.commitcheck")
QUEUE_BLOCKS = 65536  # blocks waiting to be checked; beyond this new ones go unchecked
CHECK_DELAY_S = 0.25  # a block is checked this long after its commit, not at once
CHECK_GROUP = 64  # blocks held at a time while they are hashed


def hash_at_commit(mode: str, given: bytes) -> bool:
    """Whether a commit hashes its slots before it returns: always in "sync" mode, and in any
    mode when the client gave no checksums (the daemon needs them)."""
    return mode == "sync" or not given


class CommitChecker:
    def __init__(self, hot: HotTier, view: memoryview, max_queued: int = QUEUE_BLOCKS,
                 delay_s: float = CHECK_DELAY_S):
        self.hot, self.view, self.delay_s, self.max_queued = hot, view, delay_s, max_queued
        self._batches: collections.deque[tuple[float, list[Block]]] = collections.deque()
        self._queued = 0  # blocks in _batches
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self.checked = 0    # blocks re-hashed
        self.failures = 0   # of which did not match their checksum (dropped)
        self.unchecked = 0  # not checked: the queue was full (a block gone before its turn needs no check)
        self._thread = threading.Thread(target=self._run, name="kvtier-commit-check", daemon=True)
        self._thread.start()

    def submit(self, blocks: list[Block]) -> None:
        """Queue one commit's blocks for checking, as one batch (hot lock held: never blocks)."""
        with self._cv:
            room = max(0, self.max_queued - self._queued)
            if len(blocks) > room:
                self.unchecked += len(blocks) - room
                blocks = blocks[:room]
            if blocks:
                self._batches.append((time.monotonic() + self.delay_s, list(blocks)))
                self._queued += len(blocks)
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._batches and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return
                due, blocks = self._batches.popleft()
                self._queued -= len(blocks)
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            for i in range(0, len(blocks), CHECK_GROUP):
                try:
                    self.check_many(blocks[i:i + CHECK_GROUP])
                except Exception:  # a bug must not end the checks; the blocks stay (readers verify)
                    log.exception("background check of committed blocks failed")

    def check_many(self, blocks: list[Block]) -> list[bool | None]:
        """Re-hash committed blocks; drop those whose bytes do not match. Per block None when it
        was gone (deleted, evicted, replaced) before its check, else whether it matched."""
        held = self.hot.hold_committed(blocks)
        results: list[tuple[Block, bool]] = []
        try:  # held: their slots cannot be freed or reused while hashed here, outside the lock
            for b in held:
                results.append((b, checksum(self.view[b.offset:b.offset + b.length]) == b.checksum))
        finally:  # those not hashed (an error) are let go unharmed
            dropped = self.hot.end_check(results + [(b, True) for b in held[len(results):]])
        bad = sum(not ok for _, ok in results)
        self.checked += len(results)
        self.failures += bad
        if bad:
            log.warning("%d committed blocks' bytes do not match the checksums their client gave; %d dropped",
                        bad, dropped)
        by_id = {id(b): ok for b, ok in results}
        return [by_id.get(id(b)) for b in blocks]

    def check(self, b: Block) -> bool | None:
        """check_many of one block."""
        return self.check_many([b])[0]

    def snapshot(self) -> dict:
        return {"checked": self.checked, "failures": self.failures, "unchecked": self.unchecked}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (blocks still queued go unchecked) and wait for it, so nothing hashes
        the arena after it is unmapped."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout)
