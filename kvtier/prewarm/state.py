"""The prewarm state file: what each context's last successful run stored.

One JSON object, rewritten whole (temp file, fsync, rename, fsync of the directory), so a
crash leaves the previous version or the new one, never a torn file:

    {"version": 1, "contexts": {"TENANT/CONTEXT": {
        "digest": hex,        # sha256 of the request that computed it (model + prompt)
        "namespace": str,     # the daemon namespace the connector stored it in
        "chunk_size": int, "ranks": int, "tokens": int,   # prompt tokens
        "keys": [hex, ...],   # chunk by chunk, every rank's key (the connector's order)
        "stored_at": float,   # unix time
        "model": str,         # the model that computed it
        "pinned_ttl_s": int | null,     # the pin TTL its keys last got from prewarm (null: none/unknown)
        "chunk_bytes": int}}}           # one chunk's blocks, every rank's (0: not known yet)

A context whose digest is unchanged and whose keys are all present in some tier is not sent
again. A missing or unreadable file is an empty state (everything is sent again), never an
error: the state only saves work. A field this version does not know (one a later version
added) is ignored, so that running an older version once does not throw the state away. A
state that cannot be written is logged, never fatal to the run (``check_writable`` finds it
before a run starts). ``lock`` keeps a second run of the same state from running beside the
first.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields

log = logging.getLogger("kvtier.prewarm")
VERSION = 1


@dataclass
class Entry:
    digest: str
    namespace: str
    chunk_size: int
    ranks: int
    tokens: int
    keys: list[str]
    stored_at: float = 0.0
    model: str = ""
    pinned_ttl_s: int | None = None
    chunk_bytes: int = 0          # read from a chunk found in RAM; promote needs it before reading one

    def key_bytes(self) -> list[bytes]:
        return [bytes.fromhex(k) for k in self.keys]

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        """An entry from its JSON object, without the fields this version does not know."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class State:
    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._dirty = False
        self._last_save = 0.0
        self._timer: threading.Timer | None = None

    @classmethod
    def load(cls, path: str) -> "State":
        st = cls(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}")
            for cid, e in data["contexts"].items():
                st.entries[cid] = Entry.from_dict(e)
                st.entries[cid].key_bytes()  # keys that are not hex would fail the context every run
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("prewarm state %s is unreadable (%s): every context is sent again", path, e)
            st.entries = {}
        return st

    def get(self, cid: str) -> Entry | None:
        with self._lock:
            return self.entries.get(cid)

    def put(self, cid: str, entry: Entry) -> None:
        with self._lock:
            self.entries[cid] = entry
            self._dirty = True
        self._soon()

    def drop(self, cids) -> None:
        """Forget contexts (no longer in the plan)."""
        with self._lock:
            for cid in cids:
                if self.entries.pop(cid, None) is not None:
                    self._dirty = True
        self._soon()

    def _soon(self) -> None:
        wait = 2.0 - (time.monotonic() - self._last_save)
        if wait <= 0:
            self._try_save()
            return
        # within 2 s of the last write: write when they are up, not only when the next context
        # finishes (hours later, for a long one) or at the end, so a killed run keeps it
        with self._lock:
            if self._timer is None:
                self._timer = threading.Timer(wait, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
        self._try_save()

    def _try_save(self) -> None:
        try:
            self.save()
        except OSError as e:  # the next put or the end of the run tries again
            log.warning("prewarm state %s: cannot write it (%s)", self.path, e)

    def check_writable(self) -> str | None:
        """Why the state file cannot be written (its directory made, a file created there), or
        None: a run that cannot save its state sends every context again every night."""
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".prewarm-check-", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            return f"cannot write the state file {self.path} in {d}: {e.strerror or e}"
        return None

    def lock(self) -> int:
        """Hold the state's lock (``<state>.lock``, flock) for this process; raises Busy when
        another run holds it. Returns the descriptor to close when done."""
        path = self.path + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another prewarm run of this state ({self.path}) is running; "
                           f"it holds {path}") from None
            raise
        return fd

    def save(self) -> None:
        """Write the file if anything changed (crash-safe)."""
        with self._lock:
            if not self._dirty:
                return
            data = {"version": VERSION, "contexts": {k: asdict(v) for k, v in sorted(self.entries.items())}}
            self._dirty = False
            self._last_save = time.monotonic()
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".prewarm-", dir=d)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                self._dirty = True
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


class Busy(Exception):
    """Another run holds the state."""
