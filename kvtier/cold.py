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
returns ENOSPC or an I/O error, was removed, or is no longer on the filesystem
it was on at start (a drive unmounted under it; the tier creates subdirectories,
never the directory itself) is skipped for ``retry_s`` (logged, counted)
and retried after, so the tier degrades to the other directories, or to
RAM-only, and recovers when space returns. A directory that is missing at start
and cannot be created, or lies under a mount point of /etc/fstab that is not
mounted (a drive that did not mount at boot: its blocks would fill the root
filesystem), is skipped until a restart.

Restart: ``scan()`` rebuilds the index from the file names and sizes alone
(one ``stat`` per file, no file opened), so the daemon serves within about a
second of listing the directories; orphan temp files are removed, and so are
the oldest files beyond a capacity lowered since the last run.
``verify_pending()`` then checks every header in the background: a file
whose header is corrupt, names another block, disagrees with the file's size
or has expired is dropped from the index and removed. Until then a block is
served like any other, because every read checks the header and the payload
checksum anyway: a flipped bit or a truncated file is a counted miss and the
file is removed, never data. A file that vanished mid-read (evicted
meanwhile) is a plain miss.

Reads: the index knows each file's size, and the header size follows from
namespace and key, so a raw record (the common case) is read with one
``preadv`` of header page + payload, the payload straight into the caller's
buffer; the header is checked after. A compressed record, found only then,
is decompressed and ``dest`` is asked again for its raw size.

Bounds: each directory has a hard capacity (bytes on disk); a write evicts
that directory's least recently used files first. A capacity of 0 is
automatic: 90% of the filesystem's free space plus the tier's own files found
by ``scan()``, so a restart does not count the files of the last run as taken
by someone else (and evict them). An evicted file that cannot be unlinked (a
read-only or failing filesystem) stays the block's: indexed again, counted and
served, as the next start would find it, and first to go at the next eviction;
its directory is skipped for ``retry_s`` and the write that needed the room is
dropped, so the files on disk never exceed the capacity unaccounted.

Ownership: one daemon per directory. A daemon's tier (``exclusive``) holds an exclusive
``flock`` on the directory itself (an open descriptor of it) from before it probes, scans or
writes it until ``close()``; a second daemon on the same directory (by any path to it) fails to
start with a ConfigError instead of taking the first one's writes in flight for orphans and
evicting its files. The lock dies with the process (kill -9 included) and leaves no file behind
(a lock file could be created by root and then be unreadable to the service user, or be deleted
under a running daemon). The held descriptor keeps the filesystem busy: unmount a drive after
stopping the daemon, or with ``umount -l``. ``check_dir`` reads without the lock (a daemon may
run meanwhile); with ``repair`` it takes it, so it never removes a running daemon's files.

Thread-safe: the index is under one lock; file I/O happens outside it, in
the caller's thread (the store runs it in worker threads, never on the event
loop). A key whose old file is being unlinked is written again only once that
file is gone, so a removal never takes a newer file at the same path.

Cancelled writes: a write may be given ``cancelled``, asked under the lock before it starts and
again just before its rename: a write whose key was deleted or overwritten meanwhile puts no
file in place. A ``delete(wait=True)`` waits out a write past that last check (its rename under
way) and removes the file it renamed, so no file of a key answered deleted can land after the
answer. A delete whose unlink fails (a read-only or failing filesystem) raises and leaves the key
indexed: the next start would find the file, so the delete did not happen.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from . import copying, record
from .keys import KEY_SIZES, NAMESPACE_RE
from .arena import _address
from .errors import ConfigError
from .record import PAGE, CorruptRecord, Meta

log = logging.getLogger("kvtier.nvme")
SUFFIX = ".kvb"
LOCK_PATIENCE_S = 0.5  # a lock held this briefly is a `kvtier check` looking, not another daemon
AUTO_SHARE = 0.9  # an automatic capacity: this share of the filesystem's free space plus the tier's own files
# ENOENT: the directory is gone; ENODEV: it is on another filesystem than at start (a drive unmounted)
FULL_LOG_S = 60.0  # how often a filesystem full below the capacity is logged
_DEGRADING = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOENT, errno.ENODEV}


class _Doomed(NamedTuple):
    """A block taken out of the index whose file is to be unlinked (remove()): where it was, to
    index it again when its file stays. ``stale``: its content is no longer the key's (forget()),
    so a file that stays is never indexed again."""
    k: tuple[str, bytes]
    path: str
    di: int
    size: int
    group: str | None
    stale: bool = False


class _Cancelled(Exception):
    """A write's key was deleted or overwritten before its file was renamed into place."""


class _DestinationGone(Exception):
    """The buffer a read was to land in is gone (its arena closed): not the file's fault."""


def _destination(dest: Callable[[int], memoryview], n: int) -> memoryview:
    try:
        return dest(n)
    except ValueError as e:  # e.g. a slice of a released memoryview
        raise _DestinationGone(str(e)) from e


def _released(buf) -> bool:
    """Whether buf is a memoryview that was released (or over a closed mapping)."""
    if buf is None:
        return False
    try:
        memoryview(buf).nbytes
        return False
    except ValueError:
        return True


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
    """(namespace, key) of a block file's name; None for any other name (a namespace or key the
    daemon would refuse, bytes that are not UTF-8)."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    h, _, ns = name[:-len(SUFFIX)].partition(".")
    try:
        key = bytes.fromhex(h)
    except ValueError:
        return None
    if len(key) not in KEY_SIZES or not _valid_namespace(ns):
        return None
    return ns, key


@functools.lru_cache(maxsize=4096)
def _valid_namespace(ns: str) -> bool:
    """NAMESPACE_RE, once per namespace: a restart's scan asks it for every file (millions)."""
    return NAMESPACE_RE.fullmatch(ns) is not None


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


FSTAB = "/etc/fstab"
MOUNTS = "/proc/mounts"


def _mount_points(table: str) -> list[str]:
    """The mount points (second field, octal escapes decoded) of an fstab-format file."""
    out = []
    with open(table, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2 or parts[0].startswith("#") or not parts[1].startswith("/"):
                continue
            out.append(os.path.normpath(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])))
    return out


def unmounted_mount_point(path: str, fstab: str | None = None, mounts: str | None = None) -> str | None:
    """The mount point of /etc/fstab that holds path but is not mounted now (its drive did not
    mount, or was unmounted: path would be on the filesystem beneath it, usually the root
    filesystem), else None. Unknown (no fstab, no /proc) is None."""
    p = os.path.realpath(path)
    try:
        wanted = [m for m in _mount_points(fstab or FSTAB) if m != "/" and (p == m or p.startswith(m + "/"))]
        if not wanted:
            return None
        mounted = set(_mount_points(mounts or MOUNTS))
    except OSError:
        return None
    nearest = max(wanted, key=len)
    return None if nearest in mounted else nearest


def _open_dir(path: str) -> int:
    """A descriptor of directory path itself, to flock: the lock is the directory's, no file."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def own_dir(path: str, remedy: str = "stop it, or give this daemon a directory of its own") -> int:
    """Take directory path's lock (exclusive); the fd that holds it. ConfigError when another
    process holds it past LOCK_PATIENCE_S: a kvtier daemon using the directory, or a repair."""
    fd = _open_dir(path)
    try:
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(f"nvme.dirs: another process holds {path} (a kvtier daemon using it, "
                                      f"or `kvtier check --repair`); {remedy}") from None
                time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def _in_use(path: str) -> bool:
    """Does a process hold directory path's lock right now? Looked at, not kept: a shared lock
    taken and dropped at once (own_dir waits out such a look)."""
    try:
        fd = _open_dir(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock


HUGE = 2 << 20  # a transparent huge page (x86-64, and arm64 with 4 KiB pages)


def huge_buffer(n: int) -> memoryview:
    """n bytes, rounded up to 2 MiB, of private anonymous memory, 2 MiB-aligned and offered to
    the kernel for transparent huge pages (taken where THP is "madvise" or "always"): physically
    contiguous 2 MiB at a time, so an O_DIRECT transfer into it is one segment per 2 MiB, not one
    per 4 KiB page. Ordinary pages where THP is off."""
    size = max(1, -(-n // HUGE)) * HUGE
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    off = -_address(m) % HUGE
    with contextlib.suppress(AttributeError, OSError, ValueError):
        m.madvise(mmap.MADV_HUGEPAGE, off, size)
    return memoryview(m)[off:off + size]  # the view keeps the mapping alive


class _Scratch(threading.local):
    """Per-thread page-aligned buffers: one page for headers, one growing buffer (huge pages where
    the kernel gives them) for payloads."""

    def header(self) -> mmap.mmap:
        buf = getattr(self, "head", None)
        if buf is None:
            buf = self.head = mmap.mmap(-1, PAGE)
        return buf

    def get(self, n: int) -> memoryview:
        buf = getattr(self, "buf", None)
        if buf is None or len(buf) < n:
            # the old buffer is unmapped by the GC once no view of it is left
            buf = self.buf = huge_buffer(n)
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
    dev: int = 0         # st_dev at start: files go nowhere else
    auto: bool = False   # capacity 0 in the settings: AUTO_SHARE of what the tier may use on the filesystem


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
    other_version: int = 0  # files of a record format version this daemon does not read: left in place


class ColdTier:
    name = "nvme"

    def __init__(self, dirs: list[tuple[str, int]], *, durability: str = "none", direct_io: str = "auto",
                 codec: str = "none", retry_s: float = 10.0, bounce_reads: bool = False,
                 exclusive: bool = False):
        """``exclusive`` (the daemon): take each directory's lock before touching it, and refuse
        (ConfigError) a directory another process holds; close() lets them go. A failure here
        leaves none of them held."""
        self.dirs: list[Dir] = []
        self.missing: list[str] = []  # configured directories absent at start that could not be made
        self._owners: list[int] = []  # fds holding the directories' locks
        try:
            self._open_dirs(dirs, direct_io, exclusive)
        except BaseException:
            self.close()
            raise
        self.durability = durability
        # O_DIRECT reads go through a per-thread huge-page buffer, then one copy into the target:
        # into 4 KiB pages a 2 MiB read is a list of 512 segments, which the block layer splits
        # into several requests (virtio-blk: at most 254 segments each)
        self.bounce_reads = bounce_reads
        self.codec = record.CODECS[codec]
        self.retry_s = retry_s
        self.lock = threading.Lock()
        self._index: dict[tuple[str, bytes], int] = {}  # -> dir number
        self._writing: set[tuple[str, bytes]] = set()
        # Keys taken out of the index whose file is being unlinked outside the lock: a new write
        # of such a key waits until the old file is gone, else the unlink could take its new file.
        self._removing: set[tuple[str, bytes]] = set()
        # Keys whose write passed its last cancel check and is renaming its file into place: a
        # delete(wait=True) waits for it, then removes the file.
        self._renaming: set[tuple[str, bytes]] = set()
        self._removed = threading.Condition(self.lock)  # notified as keys leave both sets
        self._full_logged = -FULL_LOG_S
        # Tenants: group_of maps a namespace to its tenant; a tenant with an NVMe quota evicts its
        # own least recently used files, never another tenant's. A file stays filed under (and
        # charged to) the group it was written for: a reload that moves a namespace to another
        # tenant changes the group of new files only, as in the hot tier.
        self.group_of: Callable[[str], str] = lambda ns: ""
        self.quotas: dict[str, int] = {}
        self._groups: dict[str, OrderedDict] = {}  # group -> (ns, key) -> bytes on disk
        self.group_used: dict[str, int] = {}        # written and in-flight bytes per group
        self.stats = ColdStats()
        self._scratch = _Scratch()
        self._unverified: set[tuple[str, bytes]] = set()  # indexed by scan(), header not checked yet
        self._verify_order: list[tuple[str, bytes]] = []

    def _open_dirs(self, dirs: list[tuple[str, int]], direct_io: str, exclusive: bool) -> None:
        seen: dict[tuple[int, int], str] = {}
        for path, cap in dirs:
            unmounted = unmounted_mount_point(path)
            if unmounted:  # the files would fill the filesystem beneath, and vanish under the mount
                log.error("nvme.dirs: %s is on %s, which /etc/fstab mounts but is not mounted: running "
                          "without it until a restart finds it mounted", path, unmounted)
                self.missing.append(os.path.abspath(path))
                continue
            try:
                os.makedirs(path, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise  # a file in the way: the configuration's error
            except OSError as e:
                # a drive that did not mount (under kvtier.service its mount point is read-only):
                # the tier runs on the other directories, or RAM alone, instead of not at all
                log.error("nvme.dirs: %s does not exist and cannot be created (%s): running without it "
                          "until a restart finds it (is its drive mounted?)", path, e.strerror)
                self.missing.append(os.path.abspath(path))
                continue
            st = os.stat(path)
            if exclusive:
                other = seen.setdefault((st.st_dev, st.st_ino), path)
                if other != path:  # its second lock would be refused as another daemon's
                    raise ConfigError(f"nvme.dirs: {other} and {path} are the same directory")
                self._owners.append(own_dir(path))  # before the probe, the scan or any write
            d = Dir(os.path.abspath(path), cap, dev=st.st_dev, auto=not cap)
            if d.auto:  # scan() adds the files already there
                d.capacity = _auto_capacity(d.path, 0)
            d.direct = direct_io != "off" and probe_direct(d.path)
            if direct_io == "on" and not d.direct:
                raise OSError(f"nvme.direct_io = 'on' but {path} does not accept O_DIRECT")
            self.dirs.append(d)

    def close(self) -> None:
        """Let the directories' locks go (idempotent). Only once no write of this tier is left:
        another daemon may take the directories at once."""
        owners, self._owners = self._owners, []
        for fd in owners:
            os.close(fd)

    # ---- startup ----------------------------------------------------------------------

    def scan(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Rebuild the index from file names and sizes (blocking, no file opened); remove orphan
        temp files and files that cannot be a record (too short, not at their canonical path).
        Every block indexed here is unverified until verify_pending() or a read checks it.
        ``progress(directories read, directories)`` is called before each subdirectory (a cold
        scan of millions of files takes minutes); an exception it raises ends the scan, nothing
        indexed."""
        found = []
        smallest: dict = {}  # (namespace, key length) -> header size: a record is longer
        subs = [(di, d, sorted(os.listdir(d.path))) for di, d in enumerate(self.dirs)]
        total, done = sum(len(names) for _, _, names in subs), 0
        for di, d, names in subs:
            for sub in names:
                if progress is not None:
                    progress(done, total)
                done += 1
                sp = os.path.join(d.path, sub)
                if len(sub) != 2 or not os.path.isdir(sp):
                    continue
                try:
                    found += self._scan_sub(di, sub, sp, smallest)
                except OSError as e:  # a subdirectory that cannot be listed: its files stay unindexed
                    self.stats.io_errors += 1
                    log.error("nvme scan: cannot read %s (%s); its blocks are not served", sp, e)
        found.sort()
        # the same block in two directories (nvme.dirs changed between runs, a rewrite after an
        # unlink that failed): the newest copy is the block, the older ones go
        newest = {f[2]: f for f in found}
        stale = [f for f in found if newest[f[2]] is not f]
        if stale:
            found = [f for f in found if newest[f[2]] is f]
            for _, di, k, _, _ in stale:
                self._try_unlink(self._path(di, *k))
            log.warning("nvme scan: %d blocks were in more than one directory; removed the older copies",
                        len(stale))
        groups: dict = {}
        with self.lock:
            index, unverified, used = self._index, self._unverified, self.group_used
            for _, di, k, size, _ in found:
                index[k] = di
                d = self.dirs[di]
                d.lru[k] = size
                d.used += size
                g = groups.get(k[0])
                if g is None:
                    g = groups[k[0]] = self.group_of(k[0])
                self._groups.setdefault(g, OrderedDict())[k] = size
                used[g] = used.get(g, 0) + size
                unverified.add(k)
            doomed = []
            for d in self.dirs:
                if d.auto:  # the files of an earlier run take space the tier may use again
                    d.capacity = _auto_capacity(d.path, d.used)
                doomed += self._make_room(d, 0)  # a capacity lowered since: the oldest files go
        if doomed:
            self.remove(doomed)
            log.warning("nvme scan: removed %d files over the capacity", len(doomed))
            found = [f for f in found if f[2] in self._index]
        self._verify_order = [k for _, k in sorted([(f[4], f[2]) for f in found])]  # inode order: about disk order
        if self.stats.orphans_removed or self.stats.corrupt_removed:
            log.warning("nvme scan: removed %d orphan temp files and %d files that cannot be records",
                        self.stats.orphans_removed, self.stats.corrupt_removed)
        return len(found)

    def verify_pending(self, threads: int = 8, stop: threading.Event | None = None) -> tuple[int, int]:
        """Check the header of every block scan() indexed that no read has checked since, on
        ``threads`` threads (blocking; the store runs it in the background). A file whose header is
        corrupt, names another block, disagrees with the file's size or has expired is dropped
        and removed. Returns (headers read, files removed); stops early when ``stop`` is set."""
        order, self._verify_order = self._verify_order, []
        chunks = [order[i:i + 64] for i in range(0, len(order), 64)]  # neighbours on disk, read together

        def work(chunk) -> tuple[int, int]:
            read = removed = 0
            for k in chunk:
                if stop is not None and stop.is_set():
                    break
                r = self._verify_one(k)
                if r is not None:
                    read += 1
                    removed += r
            return read, removed

        todo, done, lock = iter(chunks), [], threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    chunk = next(todo, None)
                if chunk is None:
                    return
                done.append(work(chunk))

        # daemon threads: a process that exits before the check ends does not wait for it
        workers = [threading.Thread(target=worker, name="kvtier-nvme-verify", daemon=True)
                   for _ in range(max(1, min(threads, len(chunks))))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        read, removed = sum(r for r, _ in done), sum(x for _, x in done)
        if removed:
            log.warning("nvme: removed %d corrupt or expired files found after start", removed)
        return read, removed

    def _scan_sub(self, di: int, sub: str, sp: str, smallest: dict) -> list[tuple]:
        """(mtime, directory, key, size, inode) of the block files in subdirectory ``sp``; temp
        files (orphans of a crash) and files that cannot be records are removed, where they can be
        (a read-only filesystem keeps them: logged, and the start goes on)."""
        found = []
        with os.scandir(sp) as it:
            for e in it:
                name = e.name
                if name.endswith(".tmp"):
                    self._try_unlink(e.path)
                    self.stats.orphans_removed += 1
                    continue
                k = parse_name(name)
                if k is None:
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue  # a directory or link named like a record: not one of ours
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    self.stats.io_errors += 1
                    log.error("nvme scan: %s: %s", e.path, err)
                    continue
                hs = smallest.get((k[0], len(k[1])))
                if hs is None:
                    hs = smallest[(k[0], len(k[1]))] = record.header_size(k[0], k[1], aligned=True)
                if st.st_size <= hs or file_name(*k) != (sub, name):
                    self._try_unlink(e.path)
                    self.stats.corrupt_removed += 1
                    continue
                found.append((st.st_mtime, di, k, st.st_size, e.inode()))
        return found

    def _verify_one(self, k) -> bool | None:
        """Check one unverified block's header; True if it was dropped, None if there was nothing to do."""
        with self.lock:
            if k not in self._unverified:
                return None  # read, deleted or evicted meanwhile
            di = self._index[k]
            size = self.dirs[di].lru[k]
        bad = True
        try:
            meta = self._read_header(self._path(di, *k))
            bad = (meta.ns, meta.key) != k or meta.total_len != size or \
                meta.header_size != record.header_size(*k, aligned=True) or \
                bool(meta.expires_ms and meta.expires_ms < time.time() * 1000)
        except FileNotFoundError:
            self._drop_entry(k, di, size, unlink=False, unverified=True)  # gone behind our back: a miss
            return False
        except record.UnknownVersion as e:
            self._set_aside(k, di, size, str(e), unverified=True)
            return False
        except (CorruptRecord, ValueError):
            pass
        except OSError:  # EIO, EMFILE, EACCES: the file may be sound; left unverified, as a read
            self.stats.io_errors += 1  # counts such errors and keeps the file
            return False
        if not bad:
            with self.lock:
                self._unverified.discard(k)
            return False
        if not self._drop_entry(k, di, size, unverified=True):
            return None
        self.stats.corrupt_removed += 1
        return True

    @staticmethod
    def _read_header(path: str) -> Meta:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(fd, PAGE, 0)
        finally:
            os.close(fd)
        return record.decode_header(head)

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

    def _group_holding(self, k) -> str | None:
        """The group k's file is filed under and charged to (lock held): its namespace's group,
        unless a reload has moved the namespace since the file was written."""
        g = self.group_of(k[0])
        lru = self._groups.get(g)
        if lru is not None and k in lru:
            return g
        return next((g for g, lru in self._groups.items() if k in lru), None)

    def _evict_key(self, k) -> _Doomed:
        """Forget a written block (lock held); returns what its file's unlink needs. Its bytes go
        back to the group they were charged to."""
        di = self._index.pop(k)
        self._unverified.discard(k)
        d = self.dirs[di]
        size = d.lru.pop(k)
        d.used -= size
        g = self._group_holding(k)
        if g is not None:
            del self._groups[g][k]
            self.group_used[g] -= size
        self.stats.evictions += 1
        return _Doomed(k, self._path(di, *k), di, size, g)

    def _doom(self, k) -> _Doomed:
        """Forget a written block whose file the caller unlinks after the lock, with remove()
        (lock held)."""
        self._removing.add(k)
        return self._evict_key(k)

    def remove(self, doomed: list[_Doomed]) -> bool:
        """Unlink the files of doomed blocks (lock not held), then let new writes of their keys
        start; whether every file went. A file that cannot be unlinked (a read-only or failing
        drive) is logged and counted, not raised, and its directory is skipped for retry_s (else
        every write there would try it again first). It stays the block's: indexed again, first
        to go at the next eviction, counted against the capacity and served, as the next start
        would find it (a Delete of it tries again, and fails while it cannot). A stale copy's
        (forget()) stays out of the index."""
        stuck = []
        try:
            for x in doomed:
                try:
                    self._unlink(x.path)
                except OSError as e:
                    self.stats.io_errors += 1
                    log.error("nvme unlink %s: %s%s", x.path, e, "" if x.stale else "; the block stays")
                    stuck.append((x, e.errno))
        finally:
            self._removals_ended(doomed, stuck)
        return not stuck

    def _removals_ended(self, doomed: list[_Doomed], stuck: list[tuple[_Doomed, int]] = ()) -> None:
        """Index again the evicted blocks whose file stayed (with the unlink's errno) and skip
        their directories for retry_s, then let new writes of the doomed blocks' keys start, and
        delete(wait=True) go on."""
        with self.lock:
            for x, err in stuck:
                if not x.stale:
                    self._index_again(x)
                    self.stats.evictions -= 1  # not evicted after all
                self._degrade(self.dirs[x.di], err)
            self._removing.difference_update(x.k for x in doomed)
            self._removed.notify_all()

    def _free_after_full(self, d: Dir, size: int) -> int:
        """A write of ``size`` bytes found d's filesystem full though the capacity had room (it is
        shared: another directory of the tier with an automatic capacity, another program):
        evict d's oldest files until that much is free, so the next write fits; the bytes freed
        (0 with no file of the tier's there: the directory is skipped for retry_s instead)."""
        doomed, freed = [], 0
        with self.lock:
            while freed < size and d.lru:
                k = next(iter(d.lru))
                freed += d.lru[k]
                doomed.append(self._doom(k))
        if doomed:
            self.remove(doomed)
            now = time.monotonic()
            if now >= self._full_logged + FULL_LOG_S:
                self._full_logged = now
                log.warning("nvme dir %s: the filesystem is full below the tier's capacity (shared with "
                            "another directory or program): its oldest files make room", d.path)
        return freed

    def _make_room(self, d: Dir, need: int) -> list:
        """Evict LRU entries of d until need bytes fit; returns them for remove() (lock held)."""
        doomed = []
        while d.used + need > d.capacity and d.lru:
            doomed.append(self._doom(next(iter(d.lru))))
        return doomed

    def _make_group_room(self, g: str, need: int) -> tuple[list, bool]:
        """Evict the group's LRU files until need more bytes fit its quota (lock held); returns
        them for remove(), and False when the quota cannot hold them even so (the rest is being
        written): what was evicted is gone from the index all the same and must be unlinked."""
        q = self.quotas.get(g, 0)
        if not q:
            return [], True
        lru = self._groups.get(g, OrderedDict())
        doomed = []
        while self.group_used.get(g, 0) + need > q and lru:
            doomed.append(self._doom(next(iter(lru))))
        return doomed, self.group_used.get(g, 0) + need <= q

    def write(self, ns: str, key: bytes, src: memoryview, raw_len: int, digest: bytes,
              expires_ms: int = 0, pin_class: int = 0, cancelled: Callable[[], bool] | None = None) -> bool:
        """Store a block whose bytes are src[:raw_len]. ``src`` may extend to a page multiple
        (an arena slot) so O_DIRECT can write it in place. False when not written (already
        present, no directory with room, I/O error, ``cancelled()`` true before it began or
        before its rename); never raises for I/O problems. ``cancelled`` is asked under the
        lock: its caller cancels before it deletes the key here."""
        k = (ns, key)
        codec, payload = record.choose_payload(self.codec, src[:raw_len])
        stored = len(payload)
        meta = Meta(ns, key, raw_len, stored, digest, codec, int(time.time() * 1000), expires_ms, pin_class)
        meta = record.with_header_size(meta, aligned=True)
        size = meta.total_len
        now = time.monotonic()
        with self.lock:
            while k in self._removing:  # the old file of k is being unlinked: not over the new one
                self._removed.wait()
            if k in self._index or k in self._writing or (cancelled is not None and cancelled()):
                return False
            di = self._pick_dir(key, size, now)
            if di is None:
                self.stats.dropped_writes += 1
                return False
            d = self.dirs[di]
            if d.inflight + size > d.capacity:  # the room is taken by writes in flight
                self.stats.dropped_writes += 1
                return False
            g = self.group_of(ns)  # charged now; the file is filed under g when written
            doomed, fits = self._make_group_room(g, size)
            if fits:
                doomed += self._make_room(d, size)
                d.used += size  # counted now so concurrent writers respect the bound
                d.inflight += size
                self.group_used[g] = self.group_used.get(g, 0) + size
                self._writing.add(k)
            else:
                self.stats.dropped_writes += 1
        made = not doomed or self.remove(doomed)
        if not fits:
            return False
        ok = False
        try:
            if made:
                self._write_file(d, self._path(di, ns, key), meta, payload, codec == record.CODEC_RAW and src,
                                 functools.partial(self._claim, k, cancelled))
                ok = True
            else:  # a file that was to make room stayed: the capacity holds, this block goes nowhere
                self.stats.dropped_writes += 1
        except _Cancelled:
            pass
        except OSError as e:
            self.stats.io_errors += 1
            freed = self._free_after_full(d, size) if e.errno in (errno.ENOSPC, errno.EDQUOT) else 0
            if e.errno in _DEGRADING and not freed:
                with self.lock:
                    self._degrade(d, e.errno)
            else:
                log.exception("nvme write to %s failed", d.path)
        finally:
            with self.lock:
                self._writing.discard(k)
                if k in self._renaming:
                    self._renaming.discard(k)
                    self._removed.notify_all()
                d.inflight -= size
                if ok:
                    self._index[k] = di
                    d.lru[k] = size
                    self._groups.setdefault(g, OrderedDict())[k] = size
                    self.stats.writes += 1
                    self.stats.write_bytes += raw_len
                else:
                    d.used -= size
                    self.group_used[g] -= size
        return ok

    def _degrade(self, d: Dir, err: int) -> None:
        """Skip d for retry_s after err (lock held); logged once per spell."""
        if d.degraded_until <= time.monotonic():
            log.error("nvme dir %s: %s; skipping it for %.0fs", d.path, os.strerror(err), self.retry_s)
        d.degraded_until = time.monotonic() + self.retry_s
        d.degraded_reason = os.strerror(err)

    def _claim(self, k, cancelled: Callable[[], bool] | None) -> None:
        """Just before a write's rename: _Cancelled when its key was deleted or overwritten
        meanwhile, else the key counts as renaming (delete(wait=True) waits for the file)."""
        with self.lock:
            if cancelled is not None and cancelled():
                raise _Cancelled()
            self._renaming.add(k)

    @staticmethod
    def _make_sub(d: Dir, sub: str) -> None:
        """Create a subdirectory of d, never d itself: a directory removed or unmounted while the
        daemon runs is an error (the directory is skipped), not a new one on the root filesystem."""
        if os.stat(d.path).st_dev != d.dev:
            raise OSError(errno.ENODEV, f"{d.path} is no longer on the filesystem it was on at start")
        with contextlib.suppress(FileExistsError):
            os.mkdir(sub)

    def _write_file(self, d: Dir, path: str, meta: Meta, payload, src, claim: Callable[[], None]) -> None:
        """Write the record to a temp file, then ``claim()`` (raises to leave no file) and rename."""
        sub = os.path.dirname(path)
        tmp = os.path.join(sub, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        head = record.encode_header(meta, aligned=True)
        hs, stored = len(head), meta.stored_len
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        direct = d.direct
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(tmp, flags, 0o640)
        except FileNotFoundError:
            self._make_sub(d, sub)
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
            claim()
            os.rename(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise
        if self.durability == "full":
            try:
                dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except BaseException:  # the write fails: its file must not stay, unindexed and uncounted
                self._try_unlink(path)
                raise

    # ---- read -------------------------------------------------------------------------

    def read(self, ns: str, key: bytes, dest: Callable[[int], memoryview]) -> Meta | None:
        """Read a block into ``dest(raw_len)`` (a buffer of at least raw_len bytes, page-aligned
        and page-padded for the in-place O_DIRECT path) and verify it. None on a miss (absent,
        vanished, corrupt: the last is counted and the file removed). ``dest`` is first asked for
        the payload size the file implies; for a compressed record it is asked again, for the raw
        size, and the first buffer is no longer used. ``dest`` may raise to refuse (e.g. no room
        in RAM); that propagates."""
        k = (ns, key)
        with self.lock:
            di = self._index.get(k)
            if di is None:
                self.stats.misses += 1
                return None
            d = self.dirs[di]
            size = d.lru[k]
            d.lru.move_to_end(k)
            g = self._group_holding(k)
            if g is not None:
                self._groups[g].move_to_end(k)
        path = self._path(di, ns, key)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if d.direct else 0))
        except FileNotFoundError:
            self._drop_entry(k, di, size, unlink=False)
            self.stats.misses += 1
            return None
        except OSError as e:  # EIO, EACCES: a failing drive is a counted miss, never an exception
            return self._read_error(path, e)
        out = None
        try:
            hs = record.header_size(ns, key, aligned=True)
            n = size - hs  # the payload, raw or compressed
            if n <= 0:
                raise CorruptRecord(f"file is {size} bytes")
            out = _destination(dest, n)
            pad = _round(n) if d.direct else n
            # O_DIRECT needs an aligned target; a bounced read lands in one contiguous buffer
            staged = d.direct and (self.bounce_reads or len(out) < pad or not aligned(out))
            if staged:
                whole = self._scratch.get(hs + pad)
                head, body = whole[:hs], whole[hs:hs + pad]
                got = _preadv_full(fd, [whole[:hs + pad]], 0)
            else:
                body = out[:pad]
                head = memoryview(self._scratch.header())[:hs]  # hs is one page: namespace and key are short
                got = _preadv_full(fd, [head, body], 0)
            meta = record.decode_header(head[:min(got, hs)])
            if (meta.ns, meta.key) != k:
                raise CorruptRecord("header names another block")
            if meta.header_size != hs or meta.total_len != size:
                raise CorruptRecord(f"header says {meta.header_size} + {meta.stored_len} bytes, file is {size}")
            if got < size:
                raise CorruptRecord(f"truncated: {got - hs} of {meta.stored_len} bytes")
            if meta.expires_ms and meta.expires_ms < time.time() * 1000:
                self._drop_entry(k, di, size, fd=fd)
                self.stats.misses += 1
                return None
            if meta.codec == record.CODEC_RAW:
                if meta.raw_len != n:
                    raise CorruptRecord(f"raw record of {meta.raw_len} bytes stored as {n}")
                if staged:  # copy out of the bounce buffer without the GIL, hashing as it copies
                    record.verify_digest(meta, copying.copy_hashed(out[:n], body[:n]))
                else:
                    record.verify(meta, out[:n])
            else:
                raw = record.decompress(meta.codec, body[:n], meta.raw_len)
                out = _destination(dest, meta.raw_len)
                out[:meta.raw_len] = raw
                record.verify(meta, out[:meta.raw_len])
        except record.UnknownVersion as e:
            self._set_aside(k, di, size, str(e))
            self.stats.misses += 1
            return None
        except (CorruptRecord, ValueError, _DestinationGone) as e:
            if isinstance(e, _DestinationGone) or (isinstance(e, ValueError) and _released(out)):
                self.stats.misses += 1  # the buffer to read into went away (shutdown): the file is fine
                return None
            if self._drop_entry(k, di, size, fd=fd):  # else replaced while we read: what we saw was a mix
                log.warning("nvme %s: %s; removed", path, e)
                self.stats.checksum_failures += 1
                self.stats.corrupt_removed += 1
            self.stats.misses += 1
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._drop_entry(k, di, size, unlink=False)
                self.stats.misses += 1
                return None
            return self._read_error(path, e)
        finally:
            os.close(fd)
        if k in self._unverified:  # checked now: the background pass can skip it
            with self.lock:
                self._unverified.discard(k)
        self.stats.hits += 1
        self.stats.read_bytes += meta.raw_len
        return meta

    def _read_error(self, path: str, e: OSError) -> None:
        self.stats.io_errors += 1
        log.error("nvme read %s: %s", path, e)
        self.stats.misses += 1

    # ---- removal ----------------------------------------------------------------------

    def _holds(self, k, di: int, size: int, unverified: bool) -> bool:
        """Whether the index still holds the entry of k that was read (lock held): same directory
        and size, and with ``unverified`` still unchecked (a rewrite since is not)."""
        return self._index.get(k) == di and self.dirs[di].lru.get(k) == size and \
            (not unverified or k in self._unverified)

    def _drop_entry(self, k, di: int, size: int, unlink: bool = True, fd: int | None = None,
                    unverified: bool = False) -> bool:
        """Forget k and remove its file, if the index still holds the entry that was read; False
        when k was deleted or replaced meanwhile (a plain miss). The entry is the one read when
        its directory and size match and: the file at its path is the one read (``fd``), or
        (``unlink=False``: the file was not found) there is none; with ``unverified``, k is still
        unchecked (a rewrite since is not). The file goes under the lock, so a new write of k
        cannot start before it is gone."""
        with self.lock:
            if not self._holds(k, di, size, unverified):
                return False
            at = self._path(di, *k)
            if fd is not None or not unlink:
                try:
                    now = os.stat(at).st_ino
                except OSError:
                    now = None
                if now is not None and (not unlink or now != os.fstat(fd).st_ino):
                    return False  # a newer write of k renamed its file into place since
            path = self._evict_key(k).path
            self.stats.evictions -= 1  # a removal, not an eviction
            if unlink:
                self._try_unlink(path)
        return True

    def _set_aside(self, k, di: int, size: int, why: str, unverified: bool = False) -> None:
        """Forget k and leave its file: a record of a format version this daemon does not read (a
        newer kvtier's, before a rollback) is a miss here, kept for the version that reads it
        (not counted against the capacity, never evicted; a write of k replaces it). No-op when k
        was replaced meanwhile (as _drop_entry)."""
        with self.lock:
            if not self._holds(k, di, size, unverified):
                return
            self._evict_key(k)
            self.stats.evictions -= 1  # not evicted: set aside
            self.stats.other_version += 1
            first = self.stats.other_version == 1
        if first:
            log.warning("nvme %s: %s; such files are misses here, left in place for the kvtier version "
                        "that wrote them (counted in other_version)", self._path(di, *k), why)

    def forget(self, ns: str, key: bytes) -> list[_Doomed] | None:
        """Drop key from the index at once (no I/O) for good: its content is no longer the key's
        (a cancelled write's copy, an overwrite's old file). The file goes with remove() of what
        this returns (one that cannot be unlinked is not indexed again), and new writes of the
        key wait for that. None when the tier does not hold it."""
        k = (ns, key)
        with self.lock:
            if k not in self._index:
                return None
            doomed = [self._doom(k)._replace(stale=True)]
            self.stats.evictions -= 1  # a removal, not an eviction
        return doomed

    def delete(self, ns: str, key: bytes, wait: bool = False) -> bool:
        """Remove key's file; whether there was one. With wait, first wait for a write of the key
        renaming its file into place (the file is removed then) and for a removal of it under
        way (an overwrite's): a Delete answered before the file is gone would be undone by a
        crash. (Not from the threads that run writes and removals.) An unlink that fails (a
        read-only or failing filesystem) raises OSError and leaves the key indexed: the next
        start would find its file, so the delete did not happen."""
        k = (ns, key)
        with self.lock:
            while wait and (k in self._removing or k in self._renaming):
                self._removed.wait(1.0)
            if k not in self._index:
                return False
            x = self._doom(k)
            self.stats.evictions -= 1  # a removal, not an eviction
        try:
            self._unlink(x.path)
        except OSError as e:
            self.stats.io_errors += 1
            log.error("nvme unlink %s: %s; the block stays", x.path, e)
            with self.lock:  # its caller is told: no retry by every write to space out
                self._index_again(x)
            raise
        finally:
            self._removals_ended([x])
        return True

    def _index_again(self, x: _Doomed) -> None:
        """Put back the entry of a block whose file could not be removed, first in line for the
        next eviction (lock held; its key is still being removed, so no write of it came
        meanwhile)."""
        k, d = x.k, self.dirs[x.di]
        self._index[k] = x.di
        d.lru[k] = x.size
        d.lru.move_to_end(k, last=False)
        d.used += x.size
        if x.group is not None:
            lru = self._groups.setdefault(x.group, OrderedDict())
            lru[k] = x.size
            lru.move_to_end(k, last=False)
            self.group_used[x.group] = self.group_used.get(x.group, 0) + x.size

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _try_unlink(self, path: str) -> None:
        """Unlink; a failure (a read-only or failing filesystem) is logged and counted, not raised."""
        try:
            self._unlink(path)
        except OSError as e:
            self.stats.io_errors += 1
            log.error("nvme unlink %s: %s", path, e)

    # ---- stats ------------------------------------------------------------------------

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self.lock:
            return {
                "capacity_bytes": sum(d.capacity for d in self.dirs),
                "used_bytes": sum(d.used for d in self.dirs),
                "blocks": len(self._index),
                "unverified_blocks": len(self._unverified),
                "bounce_reads": self.bounce_reads,
                "dirs": [{"path": d.path, "capacity_bytes": d.capacity, "used_bytes": d.used,
                          "blocks": len(d.lru), "direct_io": d.direct,
                          "degraded": d.degraded_until > now, "degraded_reason": d.degraded_reason}
                         for d in self.dirs] +
                        [{"path": p, "capacity_bytes": 0, "used_bytes": 0, "blocks": 0, "direct_io": False,
                          "degraded": True, "degraded_reason": "missing at start", "missing": True}
                         for p in self.missing],
                **{f: getattr(self.stats, f) for f in self.stats.__dataclass_fields__},
            }


def _auto_capacity(path: str, own: int) -> int:
    """AUTO_SHARE of the free space at path plus own, the bytes of the tier's files there."""
    st = os.statvfs(path)
    return int((st.f_bavail * st.f_frsize + own) * AUTO_SHARE)


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    if done == total:
        return
    # rare (a filesystem filling up): a short write; finish buffered. The rest starts at no page
    # boundary in no aligned buffer, which O_DIRECT refuses (EINVAL, hiding the real error), so
    # the descriptor leaves O_DIRECT first
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & getattr(os, "O_DIRECT", 0):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    flat = memoryview(b"".join(bytes(b) for b in bufs))
    while done < total:
        n = os.pwrite(fd, flat[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, "a write made no progress")
        done += n


def _preadv_full(fd: int, bufs: list, offset: int) -> int:
    """Fill bufs from offset, in one preadv unless it comes back short; bytes read (fewer at EOF)."""
    got = os.preadv(fd, bufs, offset)
    pos = 0
    for b in bufs:  # rare: a short read; go on buffer by buffer
        if got < pos + len(b):
            more = _preadv_all(fd, b[got - pos:], offset + got) if got >= pos else 0
            got += more
            if got < pos + len(b):
                return got
        pos += len(b)
    return got


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
    other_version: list = field(default_factory=list)  # (path, reason): another kvtier's, left alone
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
    """Verify every block file under one NVMe directory; with repair, remove what fails (not the
    files of another record format version: another kvtier's, sound, reported apart).

    Without repair it reads only and takes no lock, so it may run beside the daemon: a file the
    daemon evicts meanwhile is skipped, and while the daemon holds the directory its temp files
    are writes in flight, not orphans. With repair it holds the directory's lock throughout
    (ConfigError when a daemon uses it): removing files under a running daemon could take a
    write in flight or a new file at a corrupt one's path, and the daemon removes the corrupt
    files it finds itself."""
    owner = own_dir(path, "--repair would remove files under it: stop it first, or check without "
                          "--repair (the daemon removes the corrupt files it reads)") if repair else -1
    try:
        live = not repair and _in_use(path)
        rep = CheckReport()
        for sub in sorted(os.listdir(path)):
            sp = os.path.join(path, sub)
            if len(sub) != 2 or not os.path.isdir(sp):
                continue
            for name in sorted(os.listdir(sp)):
                p = os.path.join(sp, name)
                if name.endswith(".tmp"):
                    if not live:
                        rep.orphans.append(p)
                elif parse_name(name) is not None:
                    try:
                        meta = verify_file(p)
                    except FileNotFoundError:
                        continue  # evicted by the daemon since the listing
                    except record.UnknownVersion as e:
                        rep.other_version.append((p, str(e)))
                    except (CorruptRecord, OSError, ValueError) as e:
                        rep.corrupt.append((p, str(e)))
                    else:
                        rep.ok += 1
                        rep.bytes += meta.raw_len
                    rep.files += 1
        if repair:
            for p in rep.orphans + [p for p, _ in rep.corrupt]:
                ColdTier._unlink(p)
                rep.removed += 1
        return rep
    finally:
        if owner >= 0:
            os.close(owner)
