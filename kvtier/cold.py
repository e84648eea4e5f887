"""The NVMe cold tier: one file per block on local drives.

Layout: each configured directory (typically one per drive) holds
``<dir>/<k0k1>/<keyhex>.<namespace>.kvb``, where ``k0k1`` are the first two
hex digits of the key (256 subdirectories; keys are digests, so they spread
evenly). A file is one record (``kvtier.record``) whose header is padded to
4096 bytes so the payload is page-aligned: with O_DIRECT it moves straight
between the drive and the arena slot, with no copy in between.

Writes: temp file ``.<name>.<random>.tmp`` in the same subdirectory, written
(O_DIRECT when the filesystem allows it, probed at start), optionally
fdatasync'd, renamed into place, and optionally the directory fsync'd
(``durability``: "none" survives a process crash, "data" and "full" survive
power loss with increasing cost). A reader therefore never sees a partial
file. Blocks are placed by key hash on a directory with room; a directory that
returns ENOSPC or an I/O error is skipped for ``retry_s`` (logged, counted)
and retried after, so the tier degrades to the other directories, or to
RAM-only, and recovers when space returns.

Restart: the index is rebuilt from every file's header (names are only a
hint); orphan temp files are removed; a file whose header is corrupt or
disagrees with its name is removed. Reads verify the payload checksum: a
flipped bit or a truncated file is a counted miss and the file is removed,
never data. A file that vanished mid-read (evicted meanwhile) is a plain miss.

Bounds: each directory has a hard capacity (bytes on disk); a write evicts
that directory's least recently used files first.

Thread-safe: the index is under one lock; file I/O happens outside it, in
the caller's thread (the store runs it in worker threads, never on the event
loop).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from . import record
from .record import PAGE, CorruptRecord, Meta

log = logging.getLogger("kvtier.nvme")
SUFFIX = ".kvb"
_DEGRADING = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def aligned(buf) -> bool:
    """Is buf's first byte on a page boundary (required for O_DIRECT)?"""
    import numpy as np
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data % PAGE == 0


def file_name(ns: str, key: bytes) -> tuple[str, str]:
    h = key.hex()
    return h[:2], f"{h}.{ns}{SUFFIX}"


def parse_name(name: str) -> tuple[str, bytes] | None:
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    h, _, ns = name[:-len(SUFFIX)].partition(".")
    try:
        return ns, bytes.fromhex(h)
    except ValueError:
        return None


def probe_direct(path: str) -> bool:
    """Can this directory take O_DIRECT writes of page-aligned buffers?"""
    if not hasattr(os, "O_DIRECT"):
        return False
    p = os.path.join(path, f".direct-probe-{secrets.token_hex(4)}")
    buf = mmap.mmap(-1, PAGE)
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        try:
            return os.pwritev(fd, [buf], 0) == PAGE
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        buf.close()
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class _Scratch(threading.local):
    """Per-thread page-aligned buffers: one page for headers, one growing buffer for payloads."""

    def header(self) -> mmap.mmap:
        buf = getattr(self, "head", None)
        if buf is None:
            buf = self.head = mmap.mmap(-1, PAGE)
        return buf

    def get(self, n: int) -> mmap.mmap:
        buf = getattr(self, "buf", None)
        if buf is None or len(buf) < n:
            # the old buffer is unmapped by the GC once no view of it is left
            buf = self.buf = mmap.mmap(-1, max(_round(n), 1 << 20))
        return buf


@dataclass
class Dir:
    path: str
    capacity: int
    direct: bool = False
    used: int = 0        # bytes of files, written or being written
    inflight: int = 0    # of which: bytes of writes not finished yet
    lru: OrderedDict = field(default_factory=OrderedDict)  # (ns, key) -> bytes on disk
    degraded_until: float = 0.0
    degraded_reason: str = ""


@dataclass
class ColdStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    write_bytes: int = 0
    read_bytes: int = 0
    evictions: int = 0
    checksum_failures: int = 0
    io_errors: int = 0
    dropped_writes: int = 0
    orphans_removed: int = 0
    corrupt_removed: int = 0


class ColdTier:
    name = "nvme"

    def __init__(self, dirs: list[tuple[str, int]], *, durability: str = "none", direct_io: str = "auto",
                 codec: str = "none", retry_s: float = 10.0):
        self.dirs: list[Dir] = []
        for path, cap in dirs:
            os.makedirs(path, exist_ok=True)
            d = Dir(os.path.abspath(path), cap)
            d.direct = direct_io == "on" or (direct_io == "auto" and probe_direct(d.path))
            if direct_io == "on" and not probe_direct(d.path):
                raise OSError(f"nvme.direct_io = 'on' but {path} does not accept O_DIRECT")
            self.dirs.append(d)
        self.durability = durability
        self.codec = record.CODECS[codec]
        self.retry_s = retry_s
        self.lock = threading.Lock()
        self._index: dict[tuple[str, bytes], int] = {}  # -> dir number
        self._writing: set[tuple[str, bytes]] = set()
        # Tenants: group_of maps a namespace to its tenant; a tenant with an NVMe quota evicts its
        # own least recently used files, never another tenant's.
        self.group_of: Callable[[str], str] = lambda ns: ""
        self.quotas: dict[str, int] = {}
        self._groups: dict[str, OrderedDict] = {}  # group -> (ns, key) -> bytes on disk
        self.group_used: dict[str, int] = {}        # written and in-flight bytes per group
        self.stats = ColdStats()
        self._scratch = _Scratch()

    # ---- startup ----------------------------------------------------------------------

    def scan(self) -> int:
        """Rebuild the index from the files' headers; remove orphans and corrupt files."""
        found = []
        for di, d in enumerate(self.dirs):
            for sub in sorted(os.listdir(d.path)):
                sp = os.path.join(d.path, sub)
                if len(sub) != 2 or not os.path.isdir(sp):
                    continue
                with os.scandir(sp) as it:
                    for e in it:
                        if e.name.endswith(".tmp"):
                            self._unlink(e.path)
                            self.stats.orphans_removed += 1
                            continue
                        hint = parse_name(e.name)
                        if hint is None:
                            continue
                        try:
                            meta, size, mtime = self._read_header(e.path)
                        except (CorruptRecord, OSError, ValueError):
                            self._unlink(e.path)
                            self.stats.corrupt_removed += 1
                            continue
                        if (meta.ns, meta.key) != hint or (meta.expires_ms and meta.expires_ms < time.time() * 1000):
                            self._unlink(e.path)
                            self.stats.corrupt_removed += 1
                            continue
                        found.append((mtime, di, (meta.ns, meta.key), size))
        found.sort()
        with self.lock:
            for _, di, k, size in found:
                self._index[k] = di
                self.dirs[di].lru[k] = size
                self.dirs[di].used += size
                self._group_add(k, size)
        if self.stats.orphans_removed or self.stats.corrupt_removed:
            log.warning("nvme scan: removed %d orphan temp files and %d corrupt or expired files",
                        self.stats.orphans_removed, self.stats.corrupt_removed)
        return len(found)

    def _read_header(self, path: str) -> tuple[Meta, int, float]:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            head = os.pread(fd, 512, 0)
        finally:
            os.close(fd)
        meta = record.decode_header(head)
        if st.st_size != meta.total_len:
            raise CorruptRecord(f"file is {st.st_size} bytes, header says {meta.total_len}")
        return meta, st.st_size, st.st_mtime

    # ---- queries ----------------------------------------------------------------------

    def contains(self, ns: str, key: bytes) -> bool:
        return (ns, key) in self._index

    def contains_many(self, ns: str, keys) -> list[bool]:
        idx = self._index
        return [(ns, k) in idx for k in keys]

    def _path(self, di: int, ns: str, key: bytes) -> str:
        sub, name = file_name(ns, key)
        return os.path.join(self.dirs[di].path, sub, name)

    # ---- write ------------------------------------------------------------------------

    def _pick_dir(self, key: bytes, need: int, now: float) -> int | None:
        n = len(self.dirs)
        start = int.from_bytes(key[:4], "little") % n
        for i in range(n):
            di = (start + i) % n
            d = self.dirs[di]
            if d.degraded_until > now or need > d.capacity:
                continue
            return di
        return None

    def _group_add(self, k, size: int, counted: bool = False) -> None:
        g = self.group_of(k[0])
        self._groups.setdefault(g, OrderedDict())[k] = size
        if not counted:
            self.group_used[g] = self.group_used.get(g, 0) + size

    def _evict_key(self, k) -> str:
        """Forget a written block (lock held); returns its path to unlink."""
        di = self._index.pop(k)
        d = self.dirs[di]
        size = d.lru.pop(k)
        d.used -= size
        g = self.group_of(k[0])
        self._groups.get(g, {}).pop(k, None)
        self.group_used[g] = self.group_used.get(g, 0) - size
        self.stats.evictions += 1
        return self._path(di, *k)

    def _make_room(self, d: Dir, need: int) -> list[str]:
        """Evict LRU entries of d until need bytes fit; returns paths to unlink (lock held)."""
        doomed = []
        while d.used + need > d.capacity and d.lru:
            doomed.append(self._evict_key(next(iter(d.lru))))
        return doomed

    def _make_group_room(self, g: str, need: int) -> list[str] | None:
        """Evict the group's LRU files until need more bytes fit its quota (lock held); None when
        the quota cannot hold them (the rest is being written)."""
        q = self.quotas.get(g, 0)
        if not q:
            return []
        lru = self._groups.get(g, OrderedDict())
        doomed = []
        while self.group_used.get(g, 0) + need > q and lru:
            doomed.append(self._evict_key(next(iter(lru))))
        return doomed if self.group_used.get(g, 0) + need <= q else None

    def write(self, ns: str, key: bytes, src: memoryview, raw_len: int, digest: bytes,
              expires_ms: int = 0, pin_class: int = 0) -> bool:
        """Store a block whose bytes are src[:raw_len]. ``src`` may extend to a page multiple
        (an arena slot) so O_DIRECT can write it in place. False when not written (already
        present, no directory with room, I/O error); never raises for I/O problems."""
        k = (ns, key)
        codec, payload = record.choose_payload(self.codec, src[:raw_len])
        stored = len(payload)
        meta = Meta(ns, key, raw_len, stored, digest, codec, int(time.time() * 1000), expires_ms, pin_class)
        meta = record.with_header_size(meta, aligned=True)
        size = meta.total_len
        now = time.monotonic()
        with self.lock:
            if k in self._index or k in self._writing:
                return False
            di = self._pick_dir(key, size, now)
            if di is None:
                self.stats.dropped_writes += 1
                return False
            d = self.dirs[di]
            if d.inflight + size > d.capacity:  # the room is taken by writes in flight
                self.stats.dropped_writes += 1
                return False
            g = self.group_of(ns)
            doomed = self._make_group_room(g, size)
            if doomed is None:
                self.stats.dropped_writes += 1
                return False
            doomed += self._make_room(d, size)
            d.used += size  # counted now so concurrent writers respect the bound
            d.inflight += size
            self.group_used[g] = self.group_used.get(g, 0) + size
            self._writing.add(k)
        for p in doomed:
            self._unlink(p)
        ok = False
        try:
            self._write_file(d, self._path(di, ns, key), meta, payload, codec == record.CODEC_RAW and src)
            ok = True
        except OSError as e:
            self.stats.io_errors += 1
            if e.errno in _DEGRADING:
                with self.lock:
                    if d.degraded_until <= time.monotonic():
                        log.error("nvme dir %s: %s; skipping it for %.0fs", d.path, os.strerror(e.errno),
                                  self.retry_s)
                    d.degraded_until = time.monotonic() + self.retry_s
                    d.degraded_reason = os.strerror(e.errno)
            else:
                log.exception("nvme write to %s failed", d.path)
        finally:
            with self.lock:
                self._writing.discard(k)
                d.inflight -= size
                if ok:
                    self._index[k] = di
                    d.lru[k] = size
                    self._group_add(k, size, counted=True)
                    self.stats.writes += 1
                    self.stats.write_bytes += raw_len
                else:
                    d.used -= size
                    self.group_used[g] -= size
        return ok

    def _write_file(self, d: Dir, path: str, meta: Meta, payload, src) -> None:
        sub = os.path.dirname(path)
        os.makedirs(sub, exist_ok=True)
        tmp = os.path.join(sub, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        head = record.encode_header(meta, aligned=True)
        hs, stored = len(head), meta.stored_len
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        direct = d.direct
        if direct:
            flags |= os.O_DIRECT
        fd = os.open(tmp, flags, 0o640)
        try:
            if direct:
                padded = _round(stored)
                if src is not False and len(src) >= padded and aligned(src):
                    body = src[:padded]           # the arena slot itself: page-aligned, page-sized
                    buf = self._scratch.header() if hs <= PAGE else self._scratch.get(hs)
                    buf[:hs] = head
                    iov = [memoryview(buf)[:hs], body]
                else:                             # compressed or unpadded: stage in an aligned buffer
                    buf = self._scratch.get(hs + padded)
                    buf[:hs] = head
                    buf[hs:hs + stored] = payload
                    buf[hs + stored:hs + padded] = bytes(padded - stored)
                    iov = [memoryview(buf)[:hs + padded]]
                _pwritev_all(fd, iov, 0)
                os.ftruncate(fd, hs + stored)
            else:
                _pwritev_all(fd, [head, memoryview(payload)], 0)
            if self.durability in ("data", "full"):
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            self._unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise
        if self.durability == "full":
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # ---- read -------------------------------------------------------------------------

    def read(self, ns: str, key: bytes, dest: Callable[[int], memoryview]) -> Meta | None:
        """Read a block into ``dest(raw_len)`` (a buffer of at least raw_len bytes, page-aligned
        and page-padded for the in-place O_DIRECT path) and verify it. None on a miss (absent,
        vanished, corrupt: the last is counted and the file removed). ``dest`` may raise to
        refuse (e.g. no room in RAM); that propagates."""
        k = (ns, key)
        with self.lock:
            di = self._index.get(k)
            if di is None:
                self.stats.misses += 1
                return None
            d = self.dirs[di]
            if k in d.lru:
                d.lru.move_to_end(k)
            glru = self._groups.get(self.group_of(ns))
            if glru is not None and k in glru:
                glru.move_to_end(k)
        path = self._path(di, ns, key)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if d.direct else 0))
        except FileNotFoundError:
            self._forget(k)
            self.stats.misses += 1
            return None
        try:
            head = self._scratch.header()
            got = os.preadv(fd, [memoryview(head)[:PAGE]], 0)
            meta = record.decode_header(memoryview(head)[:got])
            if meta.header_size % PAGE and d.direct:
                raise CorruptRecord(f"header size {meta.header_size} is not page-aligned")
            if (meta.ns, meta.key) != k:
                raise CorruptRecord("header names another block")
            if meta.expires_ms and meta.expires_ms < time.time() * 1000:
                self._drop(k, path, corrupt=False)
                self.stats.misses += 1
                return None
            out = dest(meta.raw_len)
            hs = meta.header_size
            if meta.codec == record.CODEC_RAW:
                n = _round(meta.raw_len) if d.direct else meta.raw_len
                if d.direct and (len(out) < n or not aligned(out)):
                    tmp = self._scratch.get(n)
                    got = _preadv_all(fd, memoryview(tmp)[:n], hs)
                    out[:meta.raw_len] = memoryview(tmp)[:meta.raw_len]
                else:
                    got = _preadv_all(fd, out[:n], hs)
                if got < meta.raw_len:
                    raise CorruptRecord(f"truncated: {got} of {meta.raw_len} bytes")
            else:
                n = _round(meta.stored_len)
                tmp = self._scratch.get(n)
                got = _preadv_all(fd, memoryview(tmp)[:n], hs)
                if got < meta.stored_len:
                    raise CorruptRecord(f"truncated: {got} of {meta.stored_len} bytes")
                out[:meta.raw_len] = record.decompress(meta.codec, memoryview(tmp)[:meta.stored_len], meta.raw_len)
            record.verify(meta, out[:meta.raw_len])
        except (CorruptRecord, ValueError) as e:
            log.warning("nvme %s: %s; removed", path, e)
            self.stats.checksum_failures += 1
            self._drop(k, path, corrupt=True)
            self.stats.misses += 1
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._forget(k)
                self.stats.misses += 1
                return None
            self.stats.io_errors += 1
            log.error("nvme read %s: %s", path, e)
            self.stats.misses += 1
            return None
        finally:
            os.close(fd)
        self.stats.hits += 1
        self.stats.read_bytes += meta.raw_len
        return meta

    # ---- removal ----------------------------------------------------------------------

    def _forget(self, k) -> str | None:
        with self.lock:
            if k not in self._index:
                return None
            path = self._evict_key(k)
            self.stats.evictions -= 1  # a removal, not an eviction
            return path

    def _drop(self, k, path: str, corrupt: bool) -> None:
        self._forget(k)
        self._unlink(path)
        if corrupt:
            self.stats.corrupt_removed += 1

    def delete(self, ns: str, key: bytes) -> bool:
        path = self._forget((ns, key))
        if path is None:
            return False
        self._unlink(path)
        return True

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # ---- stats ------------------------------------------------------------------------

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self.lock:
            return {
                "capacity_bytes": sum(d.capacity for d in self.dirs),
                "used_bytes": sum(d.used for d in self.dirs),
                "blocks": len(self._index),
                "dirs": [{"path": d.path, "capacity_bytes": d.capacity, "used_bytes": d.used,
                          "blocks": len(d.lru), "direct_io": d.direct,
                          "degraded": d.degraded_until > now, "degraded_reason": d.degraded_reason}
                         for d in self.dirs],
                **{f: getattr(self.stats, f) for f in self.stats.__dataclass_fields__},
            }


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    if done == total:
        return
    flat = memoryview(b"".join(bytes(b) for b in bufs))  # rare: short write, finish buffered-style
    while done < total:
        done += os.pwrite(fd, flat[done:], offset + done)


def _preadv_all(fd: int, buf: memoryview, offset: int) -> int:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


# ---- offline check (kvtier check) ---------------------------------------------------------------

@dataclass
class CheckReport:
    files: int = 0
    ok: int = 0
    bytes: int = 0
    corrupt: list = field(default_factory=list)   # (path, reason)
    orphans: list = field(default_factory=list)   # temp files left by a crash
    removed: int = 0


def verify_file(path: str) -> Meta:
    """Read a block file whole and verify header, name and payload; raises CorruptRecord."""
    with open(path, "rb") as f:
        data = f.read()
    meta = record.decode_header(data)
    hs = meta.header_size
    if len(data) != hs + meta.stored_len:
        raise CorruptRecord(f"file is {len(data)} bytes, header says {hs + meta.stored_len}")
    if parse_name(os.path.basename(path)) != (meta.ns, meta.key):
        raise CorruptRecord("header names another block than the file name")
    payload = memoryview(data)[hs:]
    raw = payload if meta.codec == record.CODEC_RAW else record.decompress(meta.codec, payload, meta.raw_len)
    record.verify(meta, raw)
    return meta


def check_dir(path: str, repair: bool = False) -> CheckReport:
    """Verify every block file under one NVMe directory; with repair, remove what fails."""
    rep = CheckReport()
    for sub in sorted(os.listdir(path)):
        sp = os.path.join(path, sub)
        if len(sub) != 2 or not os.path.isdir(sp):
            continue
        for name in sorted(os.listdir(sp)):
            p = os.path.join(sp, name)
            if name.endswith(".tmp"):
                rep.orphans.append(p)
            elif parse_name(name) is not None:
                rep.files += 1
                try:
                    meta = verify_file(p)
                    rep.ok += 1
                    rep.bytes += meta.raw_len
                except (CorruptRecord, OSError, ValueError) as e:
                    rep.corrupt.append((p, str(e)))
    if repair:
        for p in rep.orphans + [p for p, _ in rep.corrupt]:
            ColdTier._unlink(p)
            rep.removed += 1
    return rep
