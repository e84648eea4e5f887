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

The queue is bounded: when it is full a block is not checked (counted in
``unchecked``) and the commit is never made to wait.

A lower tier may already hold a copy of a block found bad (write-behind to
NVMe, write-through to Redis): it is left there, carrying the same checksum,
and every read from those tiers verifies it and deletes it as corrupt.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from .hot import Block, HotTier, checksum

log = logging.getLogger("kvtier.commitcheck")
MODES = ("sync", "background", "off")
QUEUE_BLOCKS = 65536  # blocks waiting to be checked; beyond this new ones go unchecked
CHECK_DELAY_S = 0.25  # a block is checked this long after its commit, not at once


def hash_at_commit(mode: str, given: bytes) -> bool:
    """Whether a commit hashes its slots before it returns: always in "sync" mode, and in any
    mode when the client gave no checksums (the daemon needs them)."""
    return mode == "sync" or not given


class CommitChecker:
    def __init__(self, hot: HotTier, view: memoryview, max_queued: int = QUEUE_BLOCKS,
                 delay_s: float = CHECK_DELAY_S):
        self.hot, self.view, self.delay_s = hot, view, delay_s
        self._q: queue.Queue[Block | None] = queue.Queue(max_queued)
        self._stop = threading.Event()
        self.checked = 0    # blocks re-hashed
        self.failures = 0   # of which did not match their checksum (dropped)
        self.unchecked = 0  # not checked: the queue was full (a block gone before its turn needs no check)
        self._thread = threading.Thread(target=self._run, name="kvtier-commit-check", daemon=True)
        self._thread.start()

    def submit(self, blocks: list[Block]) -> None:
        """Queue committed blocks for checking (hot lock held: never blocks)."""
        for b in blocks:
            try:
                self._q.put_nowait(b)
            except queue.Full:
                self.unchecked += 1

    def _run(self) -> None:
        while True:
            b = self._q.get()
            if b is None or self._stop.is_set():
                return
            wait = b.created + self.delay_s - time.time()
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                self.check(b)
            except Exception:  # a bug must not end the checks; the block stays (readers verify)
                log.exception("background check of a committed block failed")

    def check(self, b: Block) -> bool | None:
        """Re-hash one committed block; drop it if its bytes do not match. None when the block was
        gone (deleted, evicted, replaced) before its check, else whether it matched."""
        if not self.hot.hold_committed(b):
            return None
        ok = False
        try:  # held: its slot cannot be freed or reused while it is hashed here, outside the lock
            ok = checksum(self.view[b.offset:b.offset + b.length]) == b.checksum
        finally:
            dropped = self.hot.end_check(b, ok)
        self.checked += 1
        if not ok:
            self.failures += 1
            if dropped:
                log.warning("namespace %s: a committed block's bytes do not match the checksum its client "
                            "gave; dropped", b.ns)
        return ok

    def snapshot(self) -> dict:
        return {"checked": self.checked, "failures": self.failures, "unchecked": self.unchecked}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (blocks still queued go unchecked) and wait for it, so nothing hashes
        the arena after it is unmapped."""
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass  # the worker is busy: it sees the stop after its current block
        self._thread.join(timeout)
