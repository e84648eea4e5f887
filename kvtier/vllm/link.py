"""A connection to the daemon that never stalls the engine and reconnects by itself.

``DaemonLink.call(fn)`` runs ``fn(client)`` on a ``kvtier.client.Client``. When a call fails
because the daemon is unreachable, slow or restarted (Unavailable, DeadlineExceeded, a broken
arena mapping), the link drops that client and answers ``Down`` without calling the daemon
for ``retry_s``; the next call after that builds a fresh client (a fresh gRPC channel, a
fresh arena mapping), so a restarted daemon is used again within about ``retry_s``. Errors
that say nothing about the connection (no room, bad input) pass through unchanged.

Callers turn every error into a miss: nothing here is allowed to fail a request.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Callable, TypeVar

from .. import errors
from ..client import TLS, Client

log = logging.getLogger("kvtier.vllm")


class Quiet:
    """At most one warning per ``every_s`` per kind, with the count of those left out."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self._last, self._skipped = every_s, {}, defaultdict(int)

    def warn(self, kind: str, msg: str, *args, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e18) < self.every_s:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        n, self._skipped[kind] = self._skipped[kind], 0
        log.log(level, msg + (f" ({n} more like it since the last report)" if n else ""), *args)
T = TypeVar("T")


class Down(errors.Unavailable):
    """The daemon failed recently; the link is waiting before it tries again."""


class DaemonLink:
    def __init__(self, address: str | None, *, timeout_s: float, retry_s: float,
                 token: str | None = None, tls: TLS | None = None, name: str = "kvtier"):
        self.address, self.timeout_s, self.retry_s, self.token = address, timeout_s, retry_s, token
        self.tls = tls
        self.name = name
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._down_until = 0.0
        self._was_down = False
        self.failures = 0

    def _get(self) -> Client:
        with self._lock:
            now = time.monotonic()
            if now < self._down_until:
                raise Down(f"{self.name}: daemon unavailable, retrying in {self._down_until - now:.1f}s")
            if self._client is None:
                self._client = Client(self.address, timeout=self.timeout_s, token=self.token, tls=self.tls)
            return self._client

    def call(self, fn: Callable[[Client], T]) -> T:
        client = self._get()
        try:
            out = fn(client)
        except (errors.Unavailable, errors.DeadlineExceeded, errors.StaleArena, OSError) as e:
            self._fail(client, e)
            raise errors.Unavailable(f"{self.name}: {e}") from e
        if self._was_down:
            with self._lock:
                if self._was_down:
                    self._was_down = False
                    log.warning("%s: daemon reachable again", self.name)
        return out

    def _fail(self, client: Client, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            if self._client is client:
                self._client = None
                self._down_until = time.monotonic() + self.retry_s
                if not self._was_down:
                    log.warning("%s: daemon call failed (%s); treating chunks as misses, "
                                "retrying every %.1fs", self.name, exc, self.retry_s)
                self._was_down = True
            else:
                client = None  # already replaced by another thread
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client must not raise into the engine
                pass

    @property
    def path(self) -> str:
        c = self._client
        return c.path if c is not None else ""

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
