"""The shared-memory arena: one file on tmpfs (or hugetlbfs) mapped by the
daemon and by same-node clients.

Layout (all integers little-endian):

    offset 0     header page (4096 bytes)
                   0  8s   magic  b"KVTARENA"
                   8  u32  format version (1)
                  12  u32  reserved (0)
                  16  u64  generation: random per arena creation, never 0
                  24  u64  total size in bytes
                  32  u64  data_offset: first byte of the slot region
                  40  u64  arena id: random when the file is made, kept by every re-attach
                           (an arena an older version made gets one at its first re-attach);
                           the slot table names it
    data_offset  slots, allocated by kvtier.alloc in 4 KiB multiples

The daemon creates the file (mode 0660), or re-attaches the one a previous
run left (``ram.persist``; see kvtier.slots), sizes it, maps it shared and tries
to ``mlock`` it so the kernel never swaps or migrates it; a client maps the
same file and checks the generation it got from ``Attach`` against the header,
so it can never read a stale or foreign arena. Every start writes a new
generation, so clients of the previous run re-attach. The file holds only
block bytes; what is committed where is recorded in the slot table beside it.

Locking is best effort: when RLIMIT_MEMLOCK forbids it the daemon runs anyway
and says so in its log and in Stats (``locked``, ``lock_detail``).

Ownership: one daemon per arena. The daemon holds an exclusive ``flock`` on
``<arena_path>.lock`` (beside the arena, on tmpfs or hugetlbfs alike) from before
it touches the arena until it closes it; a second daemon on the same arena path
fails to start instead of re-attaching or replacing the live arena. The lock
dies with the process (kill -9 included), so a restart never finds it stale.
Clients map the arena without it.

Who else can touch it: the arena's directory, when it is the per-user default
(``/dev/shm/kvtier-<uid>``), must be a real directory of the daemon's user that
no one else may write; a configured one may be writable by everyone only with
the sticky bit (as /tmp). The arena, its lock and its slot table are opened
without following a symbolic link and used only when the opened file is a
regular file of the daemon's user: a file another user left or swapped in at
the path is never re-attached (its bytes would be theirs to read), nor removed;
the daemon refuses to start and names it.

Page size: on hugetlbfs the arena is 2 MiB pages by construction. On tmpfs it is
2 MiB pages where the mount allows them (``huge=within_size`` or ``always``, or
``huge=advise``, for which the mapping is advised ``MADV_HUGEPAGE``) and the kernel
found them; ``huge_pages`` says what the kernel gave, read from ``/proc/self/smaps``
once the lock faulted every page in. On such an arena a 2 MiB block's slot is
physically contiguous, so an O_DIRECT read from NVMe lands in it as one request and
needs no bounce buffer (``nvme.bounce_reads = "auto"``, kvtier.store).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import pathlib
import resource
import secrets
import stat
import struct
import threading
from typing import Callable

from .errors import ConfigError

HEADER = struct.Struct("<8sIIQQQ")
ARENA_ID = struct.Struct("<Q")  # at HEADER.size
MAGIC = b"KVTARENA"
VERSION = 1
DATA_OFFSET = 4096
HUGEPAGE = 2 << 20

# The arena is locked (its pages faulted in, which is most of making it) this much at a time: a stop
# asked for meanwhile is seen within one piece, and progress can be told between them.
LOCK_CHUNK = 1 << 30

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _mount_of(path: str) -> tuple[str, set[str]]:
    """The type and options of the filesystem holding path ("" and none when unknown)."""
    p = os.path.realpath(path)
    best, fstype, options = "", "", set()
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype, options = mnt, parts[2], set(parts[3].split(","))
    except OSError:
        pass
    return fstype, options


def backing_of(path: str) -> str:
    """'tmpfs', 'hugetlbfs' or 'file' for the filesystem holding path."""
    fstype, _ = _mount_of(path)
    return fstype if fstype in ("tmpfs", "hugetlbfs") else "file"


def tmpfs_may_be_huge(path: str, shmem_enabled: str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled") -> bool:
    """Can the tmpfs holding path give its files 2 MiB pages: mounted huge=always, within_size or
    advise, or forced system-wide (shmem_enabled "force"), and not denied ("deny")?"""
    try:
        with open(shmem_enabled) as f:
            chosen = next((w[1:-1] for w in f.read().split() if w.startswith("[")), "")
    except OSError:
        chosen = ""
    if chosen == "deny":
        return False
    _, options = _mount_of(path)
    return chosen == "force" or bool(options & {"huge=always", "huge=within_size", "huge=advise"})


def _address(mm: mmap.mmap) -> int:
    buf = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


HUGE_SHARE = 0.99  # of the arena on 2 MiB pages before reads land in it without a bounce


def huge_share(address: int, smaps: str = "/proc/self/smaps") -> float:
    """The share of the shared mapping that starts at ``address`` which the kernel maps with
    2 MiB pages (ShmemPmdMapped, or FilePmdMapped, over Rss); 0.0 when it cannot tell."""
    start = f"{address:08x}-"
    try:
        with open(smaps) as f:
            for line in f:
                if line.startswith(start):
                    break
            else:
                return 0.0
            rss = pmd = 0
            for line in f:
                head, _, rest = line.partition(":")
                if head == "Rss":
                    rss = int(rest.split()[0])
                elif head in ("ShmemPmdMapped", "FilePmdMapped"):
                    pmd += int(rest.split()[0])
                elif head == "VmFlags":
                    break
    except (OSError, ValueError, IndexError):
        return 0.0
    return pmd / rss if rss else 0.0


def secure_dir(path: str, private: bool, what: str) -> None:
    """Create directory ``path`` (and its parents) if missing, then refuse one that lets another
    user read or replace the daemon's files in it (ConfigError naming it and the fix).

    ``private``: a per-user default the daemon makes for itself (``/dev/shm/kvtier-<uid>``,
    ``/tmp/kvtier-<uid>``): it must be a directory, not a symbolic link, owned by the daemon's
    effective uid and writable by no one else. Otherwise (a configured path, which a deployment
    may make a symbolic link, own by root or share with a group) it must be a directory that
    everyone may write only with the sticky bit; the files in it are checked as they are opened."""
    try:  # an OSError (a file in the way, a read-only filesystem) names its path for the caller
        pathlib.Path(path).mkdir(parents=True, exist_ok=True, mode=0o755)
    except FileExistsError:
        if not (private and os.path.islink(path)):  # a dangling link: said below
            raise
    problem = dir_problem(path, private, what)
    if problem:
        raise ConfigError(problem)


CAP_IPC_LOCK = 14


def may_lock_past_limit(status: str = "/proc/self/status") -> bool:
    """Whether this process may mlock past RLIMIT_MEMLOCK: it has CAP_IPC_LOCK in its effective
    set (root normally; a service given AmbientCapabilities=CAP_IPC_LOCK too; root in a container
    without it not). ``status``: the process's status file."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def dir_problem(path: str, private: bool, what: str, euid: int | None = None) -> str | None:
    """Why ``secure_dir`` would refuse the existing ``path`` for a daemon of ``euid`` (default: this
    process's), or None; it creates nothing (``kvtier config check`` asks it too)."""
    st = os.lstat(path) if private else os.stat(path)
    euid, mode = os.geteuid() if euid is None else euid, stat.S_IMODE(st.st_mode)
    remove = (f"remove it (rm -r {path}; another user's needs root) and start the daemon again: it "
              f"creates the directory itself; or set ram.arena_path and server.socket to a directory "
              f"of the daemon's own")
    if stat.S_ISLNK(st.st_mode):
        problem, fix = "is a symbolic link", remove
    elif not stat.S_ISDIR(st.st_mode):
        problem, fix = "is not a directory", remove
    elif private and st.st_uid != euid:
        problem, fix = f"is owned by uid {st.st_uid}, not by the daemon's uid {euid}", remove
    elif private and mode & 0o022:
        who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[mode & 0o022]
        problem, fix = f"is writable by {who} (mode {mode:04o})", f"chmod go-w {path}, or {remove}"
    elif mode & 0o002 and not mode & stat.S_ISVTX:
        problem, fix = (f"is writable by every user without the sticky bit (mode {mode:04o})",
                        f"chmod o-w {path} (or chmod +t), or choose another directory")
    else:
        return None
    return (f"{what} {path} {problem}: another user could read or replace the daemon's files "
            f"in it; {fix}")


def open_own(path: str, flags: int, what: str, mode: int = 0o600) -> int:
    """Open ``path`` without following a symbolic link, and return the fd only when the opened file
    is a regular file of the daemon's effective uid (checked on the fd: no race with a swap at the
    path); else ConfigError naming it. FileNotFoundError passes through. Nothing is removed."""
    fix = f"if it is not the daemon's own, remove it (rm {path}) and start the daemon again"
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NOCTTY, mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symbolic link, which the daemon does not follow; "
                              f"remove it (rm {path}) and start the daemon again") from None
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            owner = os.geteuid()
        if owner == os.geteuid():
            raise  # not another user's doing (a read-only filesystem, no space): as it is
        raise ConfigError(f"{what} {path} cannot be opened ({e.strerror}) and is owned by uid {owner}, "
                          f"not by the daemon's uid {os.geteuid()}; {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not by the daemon's uid {os.geteuid()}"
        elif st.st_nlink != 1:  # a hard link to another file of ours: writing it would write that one
            problem = f"has {st.st_nlink} names (hard links)"
        else:
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise ConfigError(f"{what} {path} {problem}: the daemon neither uses nor removes it; {fix}")


def lock_path(arena_path: str) -> str:
    return arena_path + ".lock"


def _own(arena_path: str) -> int:
    """Take the arena's lock (exclusive, not waiting); the fd that holds it. ConfigError when another
    daemon holds it."""
    path = lock_path(arena_path)
    while True:
        fd = open_own(path, os.O_RDWR | os.O_CREAT, "arena lock", 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another daemon holds the arena {arena_path} (lock {path}); stop it, "
                              f"or give this one its own ram.arena_path") from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder removes the file as it lets go: a lock on the file it removed is no lock
        try:
            st, held = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class Interrupted(Exception):
    """A stop was asked for while the arena was being locked; nothing of it is left (an arena
    file re-attached is kept, with the blocks of the run before)."""


class Arena:
    """The daemon's side: create, map and lock the arena file."""

    def __init__(self, path: str, size: int, lock: bool = True, reattach: bool = False,
                 private_dir: bool = False, stop: threading.Event | None = None,
                 progress: Callable[[int, int], None] | None = None):
        """Create the arena, or with ``reattach`` reuse an existing arena file of the same size
        (its bytes kept, a new generation written) so a restarted daemon keeps its RAM tier.
        ``private_dir``: the directory is the per-user default, held to ``secure_dir``'s
        stricter rule. ``stop`` set while the arena is locked ends it with Interrupted;
        ``progress(bytes locked, size)`` is called after each LOCK_CHUNK."""
        self.path = os.path.abspath(path)
        self.backing = backing_of(os.path.dirname(self.path) or ".")
        align = HUGEPAGE if self.backing == "hugetlbfs" else 4096
        self.size = size // align * align
        if self.size <= DATA_OFFSET + 4096:
            raise ValueError(f"arena of {size} bytes is too small")
        self.data_offset = DATA_OFFSET
        self.generation = secrets.randbits(63) | 1
        secure_dir(os.path.dirname(self.path), private_dir, "arena directory")
        self._owner = _own(self.path)  # before anything reads, replaces or unlinks the arena
        try:
            self._open(reattach, lock, stop, progress)
        except BaseException:
            self._disown()
            raise

    def _open(self, reattach: bool, lock: bool, stop, progress) -> None:
        # the file the previous run left, if any, opened once: what is checked is what is mapped
        try:
            fd = open_own(self.path, os.O_RDWR, "arena")
        except FileNotFoundError:
            fd = -1
        try:
            # why an arena file left by the previous run is not re-attached ("" when none is there)
            why = self._why_not_reusable(fd) if fd >= 0 else ""
            self.reattached = reattach and why is None
            self.not_reused = (why or "") if reattach else ""
            if not self.reattached:
                # a new inode, never the old file truncated: a client that outlived a crashed daemon
                # keeps its mapping of the old file and cannot write into the new arena
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                fd = open_own(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "arena", 0o660)
            os.fchmod(fd, 0o660)
            if not self.reattached:
                os.ftruncate(fd, self.size)
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            if fd >= 0:
                os.close(fd)
        try:
            # the generation of the run that used the arena last: the slot table's pins hold only
            # if that run was one that keeps them (kvtier.slots, pins_generation)
            self.previous_generation = HEADER.unpack_from(self.mm)[3] if self.reattached else 0
            self.arena_id = ARENA_ID.unpack_from(self.mm, HEADER.size)[0] if self.reattached else 0
            if not self.arena_id:  # written before the header's magic: a header that reads valid has its id
                self.arena_id = secrets.randbits(63) | 1
                ARENA_ID.pack_into(self.mm, HEADER.size, self.arena_id)
            self.mm[:HEADER.size] = HEADER.pack(MAGIC, VERSION, 0, self.generation, self.size, self.data_offset)
            self.view = memoryview(self.mm)
            if self.backing == "tmpfs":  # honoured by a tmpfs mounted huge=advise; ignored elsewhere
                try:
                    self.mm.madvise(mmap.MADV_HUGEPAGE)
                except (AttributeError, OSError):
                    pass
            self.locked, self.lock_detail = False, "mlock disabled in config"
            if lock:
                self._lock(stop, progress)
        except BaseException:  # a new arena goes again; a re-attached one keeps the last run's blocks
            if not hasattr(self, "view"):
                self.view = memoryview(b"")
            self.close(unlink=not self.reattached, disown=False)
            raise
        # on tmpfs only a locked arena is known: unlocked, its pages are not there yet. smaps is read
        # only where the mount can give huge pages: for a large arena of 4 KiB pages it is a walk of
        # every page table entry
        self.huge_pages = self.backing == "hugetlbfs" or (
            self.backing == "tmpfs" and self.locked and tmpfs_may_be_huge(self.path)
            and huge_share(_address(self.mm)) >= HUGE_SHARE)

    def _why_not_reusable(self, fd: int) -> str | None:
        """None when the open file ``fd`` (the daemon's own, found at the arena's path) is an arena
        of this size to re-attach; else why not."""
        try:
            have = os.fstat(fd).st_size
            if have != self.size:
                return f"it is {have} bytes, this arena {self.size}"
            magic, version, _, gen, size, data_offset = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        except (OSError, struct.error) as e:
            return f"it cannot be read: {e}"
        if magic != MAGIC or version != VERSION or size != self.size or data_offset != DATA_OFFSET:
            return "its header is not one of this version's arenas"
        return None

    def _lock(self, stop: threading.Event | None, progress) -> None:
        addr = _address(self.mm)
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        # over the limit mlock fails before it faults a page in: asked for at once, it says so at once
        # (a process with CAP_IPC_LOCK, root's or the unit's AmbientCapabilities, may lock past it)
        step = (LOCK_CHUNK if soft == resource.RLIM_INFINITY or soft >= self.size or may_lock_past_limit()
                else self.size)
        done = 0
        while done < self.size:
            if stop is not None and stop.is_set():
                self._lock_range(addr, done, unlock=True)
                raise Interrupted(f"stopped while locking the arena ({done} of {self.size} bytes)")
            n = min(step, self.size - done)
            if not self._lock_range(addr + done, n):
                err = ctypes.get_errno()
                self._lock_range(addr, done, unlock=True)
                lim = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
                self.lock_detail = (f"mlock failed: {os.strerror(err)} (RLIMIT_MEMLOCK is {lim}; "
                                    f"set LimitMEMLOCK=infinity in the unit or run as root); running unlocked")
                return
            done += n
            if progress is not None:
                progress(done, self.size)
        self.locked, self.lock_detail = True, ""

    @staticmethod
    def _lock_range(addr: int, n: int, unlock: bool = False) -> bool:
        if not n:
            return True
        fn = _libc.munlock if unlock else _libc.mlock
        return fn(ctypes.c_void_p(addr), ctypes.c_size_t(n)) == 0

    def _disown(self) -> None:
        if self._owner < 0:
            return
        try:  # removed while still held: the next daemon checks it locked the file at the path
            os.unlink(lock_path(self.path))
        except FileNotFoundError:
            pass
        os.close(self._owner)
        self._owner = -1

    def close(self, unlink: bool = True, disown: bool = True) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a slice is still exported (a connection mid-send); the mapping goes with the process
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if disown:
            self._disown()  # last: the arena is ours until its files are in their final state


class ArenaMapping:
    """A client's view of the daemon's arena: map the file, check its generation."""

    def __init__(self, path: str, size: int, generation: int):
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise OSError(f"arena {path} is {st.st_size} bytes, the daemon says {size}")
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, version, _, gen, hsize, _ = HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC or version != VERSION or gen != generation or hsize != size:
            self.mm.close()
            raise OSError(f"arena {path} is not the daemon's (generation {gen}, expected {generation})")
        self.path, self.size, self.generation = path, size, generation
        self.view = memoryview(self.mm)

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass
