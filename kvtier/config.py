"""Configuration: TOML parsed once into frozen dataclasses.

Every field is optional; ``configs/kvtier.toml`` documents each default and
unit. With no file the daemon runs on embedded defaults that fit the machine:
a RAM arena of a quarter of physical memory (capped by the free space of its
tmpfs) and a Unix socket in a user-writable directory. A bad value is a
``ConfigError`` naming the field, never silently clamped; unknown keys are
errors too (a typo must not turn into a default).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .keys import NAMESPACE_RE

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KiB, "m": 1000**2, "mb": 1000**2, "mib": MiB,
          "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": TiB}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def format_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_size(value: Any, name: str) -> int:
    """Bytes from an int or a string such as "64MiB", "2 GiB", "1.5GB"."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{name}: cannot read size {value!r} (use bytes or e.g. '64MiB', '2GiB')")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ConfigError(f"{name}: expected a size, got {type(value).__name__}")
    if n < 0:
        raise ConfigError(f"{name}: size must be >= 0, got {n}")
    return n


# The systemd unit's socket (RuntimeDirectory=kvtier): where a client given no address looks last.
SYSTEM_SOCKET = "/run/kvtier/kvtier.sock"


def runtime_dir() -> pathlib.Path:
    """Where the daemon's socket lives by default: $XDG_RUNTIME_DIR/kvtier (when that directory is
    ours to write, as systemd's RuntimeDirectory makes /run/kvtier for user kvtier, or can be made
    there), else /tmp/kvtier-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        d = pathlib.Path(base) / "kvtier"
        try:  # one there already must be ours (root may write another user's: the unit's /run/kvtier)
            ours = d.stat().st_uid == os.geteuid() and d.is_dir() and os.access(d, os.W_OK)
        except OSError:
            ours = not os.path.lexists(d) and os.path.isdir(base) and os.access(base, os.W_OK)
        if ours:
            return d
    return pathlib.Path(f"/tmp/kvtier-{os.getuid()}")


def default_socket() -> str:
    return str(runtime_dir() / "kvtier.sock")


def default_arena_path() -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return f"/dev/shm/kvtier-{os.getuid()}/arena"
    return str(runtime_dir() / "arena")


def default_address() -> str:
    """The address clients use when given none: $KVTIER_ADDRESS, else the default socket of this
    user, else (when only it exists) the systemd unit's socket, which a client of another user (a
    vLLM worker in group kvtier) reaches without being told."""
    env = os.environ.get("KVTIER_ADDRESS")
    if env:
        return env
    own = default_socket()
    if not os.path.exists(own) and os.path.exists(SYSTEM_SOCKET):
        return f"unix://{SYSTEM_SOCKET}"
    return f"unix://{own}"


def _arena_free(arena_path: str) -> tuple[pathlib.Path, os.statvfs_result | None, int]:
    """The nearest existing directory of arena_path, its statvfs (None if unreadable), and the
    bytes an arena file already at arena_path takes: the previous run's arena, which a restart
    re-attaches (ram.persist) or replaces, so its space counts as free for the new one."""
    d = pathlib.Path(arena_path).parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
    except OSError:
        return d, None, 0
    try:
        old = os.stat(arena_path)
        return d, st, min(old.st_blocks * 512, old.st_size)
    except OSError:
        return d, st, 0


def auto_capacity(arena_path: str) -> int:
    """A quarter of physical RAM, capped by 90% of the free space where the arena lives. The space
    an arena file already at arena_path takes counts as free: it is the previous run's arena, kept
    (ram.persist) only if the new one has its size, so a restart must come to the same size."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cap = total // 4
    _, st, old = _arena_free(arena_path)
    if st is not None:
        cap = min(cap, int((st.f_bavail * st.f_frsize + old) * 0.9))
    return max(MiB * 64, cap // MiB * MiB)


def arena_room_problem(cfg: "Config", hugepages_dir: str = "/sys/kernel/mm/hugepages") -> str | None:
    """Why a configured ram.capacity cannot be had where ram.arena_path lives, or None. The daemon
    locks its whole arena in RAM: one larger than its tmpfs's free space, or than the machine's
    memory, fills the tmpfs and gets the daemon (or another process) killed for memory, and one
    larger than the free huge pages of a hugetlbfs fails to map."""
    cap = cfg.ram.capacity
    if not cap:
        return None  # auto-sized to fit
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cap > total:
        return (f"ram.capacity: {format_size(cap)} is more than this machine's memory ({format_size(total)}); "
                f"lower it (0 = auto)")
    d, st, old = _arena_free(cfg.arena_path)
    if st is None:
        return None
    if st.f_blocks:
        free = st.f_bavail * st.f_frsize + old
        if cap > free:
            return (f"ram.capacity: {format_size(cap)} does not fit in {d} ({format_size(free)} free); "
                    f"lower it (0 = auto) or free space there")
        return None
    # no size at all: hugetlbfs mounted without size=, bounded by the kernel's free huge pages
    pages = os.path.join(hugepages_dir, f"hugepages-{st.f_bsize // KiB}kB")
    try:
        with open(os.path.join(pages, "free_hugepages")) as f, open(os.path.join(pages, "resv_hugepages")) as r:
            free = (int(f.read()) - int(r.read())) * st.f_bsize + old
    except (OSError, ValueError):
        return None
    if cap > free:
        return (f"ram.capacity: {format_size(cap)} does not fit in the free huge pages under {d} "
                f"({format_size(free)}, {pages}); reserve more (nr_hugepages) or lower ram.capacity")
    return None


@dataclass(frozen=True)
class ServerConfig:
    # Unix socket of the gRPC control plane; "" = $XDG_RUNTIME_DIR/kvtier/kvtier.sock or /tmp/kvtier-<uid>/kvtier.sock.
    socket: str = ""
    # Permission bits of the socket files (octal string).
    socket_mode: str = "0660"
    # TCP "host:port" for gRPC; "" = no TCP (Unix socket only).
    listen: str = ""
    # TCP "host:port" of the framed data channel; "" = none over TCP. The Unix data socket is always <socket>.data.
    data_listen: str = ""
    # Serve the framed data channel (fast inline bytes) beside gRPC.
    data_channel: bool = True
    # Data-channel connections served at once, Unix and TCP together (each holds a thread of the
    # daemon); further ones are closed at once, told why, logged and counted
    # (kvtier_data_connections_refused_total).
    data_max_connections: int = 1024
    # Largest gRPC message accepted or sent, bytes (a request is read whole before its token is
    # checked: what a caller without one makes the daemon hold per call).
    max_message_bytes: int = 4 * MiB
    # Most keys in one batch call.
    max_batch: int = 4096
    # Seconds SIGTERM waits for in-flight calls before exiting; as long again for the NVMe and
    # the cluster write queues (up to 3x in all).
    drain_timeout_s: float = 10.0
    # Every this many seconds, move what is alive out of the cyclic GC's reach (gc.freeze), so a
    # full collection does not walk every block of a large index (kvtier.gcfreeze); 0 = never.
    gc_freeze_s: float = 60.0
    # Every this many seconds, collapse the daemon's densely used private memory (the block index) into
    # 2 MiB pages (MADV_COLLAPSE), so a lookup at a million blocks misses the TLB less (kvtier.hugepages);
    # 0 = never.
    huge_pages_s: float = 30.0
    # "debug", "info", "warning", "error".
    log_level: str = "info"
    # TLS for the TCP listeners (gRPC and data channel): PEM certificate chain and key.
    tls_cert: str = ""
    tls_key: str = ""
    # PEM CA bundle: when set, TCP clients must present a certificate it signed (mutual TLS).
    tls_client_ca: str = ""
    # Allow TCP listeners without TLS (loopback benchmarks, trusted networks only).
    insecure_tcp: bool = False


@dataclass(frozen=True)
class RamConfig:
    # Arena file on tmpfs or hugetlbfs; "" = /dev/shm/kvtier-<uid>/arena.
    arena_path: str = ""
    # Arena size in bytes; 0 = auto (a quarter of RAM, capped by the filesystem's free space).
    capacity: int = 0
    # Lock the arena in RAM (mlock). Failure is logged and reported in Stats; the daemon runs on.
    mlock: bool = True
    # Eviction policy: "lru" or "s3fifo".
    policy: str = "s3fifo"
    # Largest block accepted, bytes (also capped by the arena).
    max_block_bytes: int = 256 * MiB
    # Lease lifetime when a request gives none, milliseconds.
    lease_ms: int = 30_000
    # Reservation lifetime when a request gives none, milliseconds.
    reservation_ms: int = 30_000
    # Longest lease or reservation a client may ask for, milliseconds.
    max_ttl_ms: int = 600_000
    # Checksums given at commit: "sync" (re-hash before the commit returns; a mismatch commits nothing),
    # "background" (trust them, re-hash right after off the request path and drop a block that does not
    # match) or "off" (trust them). Without client checksums the daemon always hashes at commit.
    # TOML true = "sync", false = "off".
    verify_on_commit: str = "background"
    # Keep the RAM tier across daemon restarts: re-attach the arena file and rebuild the index from its slot table.
    persist: bool = True
    # Share of the arena that pinned blocks may hold (0 < x <= 1): a Pin past it leaves those blocks
    # unpinned (answered as not pinned, counted, logged), so pins never take the RAM tier from traffic.
    max_pinned: float = 0.5
    # On such a restart, re-hash every block and drop those whose bytes no longer match.
    verify_on_restart: bool = True


@dataclass(frozen=True)
class NvmeConfig:
    # Directories for block files, typically one per drive; empty = no NVMe tier.
    dirs: tuple = ()
    # Capacity of EACH directory in bytes; 0 = auto (90% of the filesystem's free space at start plus the tier's files there).
    capacity: int = 0
    # When blocks go to NVMe: "commit" (write-behind right after each commit) or "evict" (only when RAM evicts them).
    write_policy: str = "commit"
    # "none": survives a process crash; "data": fdatasync each file; "full": also fsync the directory.
    durability: str = "none"
    # O_DIRECT: "auto" (probe each directory), "on" (required), "off".
    direct_io: str = "auto"
    # O_DIRECT reads through a huge-page buffer and one copy into the arena: "auto" (when the arena is
    # not on hugetlbfs: a 2 MiB read into 4 KiB pages is split into several device requests), "on", "off".
    bounce_reads: str = "auto"
    # Payload codec: "none", "lz4", "shuffle-lz4" (byte planes of 16-bit words, then lz4; kept only when it saves >= 10%).
    codec: str = "none"
    # Promote a block from NVMe into RAM on its "first" read, or only on its "second" read (a first read is served from a transient slot).
    promote: str = "first"
    # Bytes of blocks waiting to be written; beyond this new writes are dropped and counted. At most half of ram.capacity.
    queue_bytes: int = 1 * GiB
    # Threads doing NVMe I/O.
    io_threads: int = 4
    # Seconds a directory that failed with ENOSPC or an I/O error is skipped before it is tried again.
    retry_s: float = 10.0


@dataclass(frozen=True)
class AuthConfig:
    # Tenants file mapping bearer tokens to namespaces and quotas (docs in kvtier/auth.py); "" = single tenant, no tokens.
    tenants_file: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus endpoint "host:port" (http://host:port/metrics); keep it on loopback. "" = off.
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class ClusterConfig:
    # Redis/Valkey to share blocks through: redis://, rediss:// (TLS), valkey:// or valkeys://, with optional
    # user:password@ and /db. "" = no cluster tier.
    url: str = ""
    # Redis Cluster / Valkey Cluster mode: url (and seeds) are seed nodes; the slot map is discovered.
    cluster: bool = False
    # More seed nodes for Cluster mode, "host:port" each.
    seeds: tuple = ()
    # When blocks are written: "commit" (write-through, asynchronous), "evict" (when RAM evicts them) or "off".
    write_policy: str = "commit"
    # Expiry of written blocks, seconds; 0 = no expiry.
    ttl_s: int = 0
    # Per-namespace expiry overriding ttl_s, seconds (table namespace -> seconds; 0 = no expiry).
    namespace_ttl_s: tuple = ()
    # Payload codec: "none", "lz4", "shuffle-lz4" (kept only when it saves >= 10%, as on NVMe).
    codec: str = "none"
    # Prefix of every key, so several deployments can share one server.
    prefix: str = "kvt"
    # Bytes of blocks waiting to be written; beyond this new writes are dropped and counted. At most a quarter of
    # ram.capacity (under write_policy "commit" waiting blocks hold their RAM slots).
    queue_bytes: int = 256 * MiB
    # Connections per server (per master in Cluster mode).
    connections: int = 2
    # Values larger than this are split into parts of this size, bytes; 0 = whole values (fastest in bench/cluster.py).
    part_bytes: int = 0
    # Longest a call (a batch on one server) may go without receiving anything from it, milliseconds; past it the
    # call is a miss and the server is marked down. A batch that keeps receiving may take longer.
    timeout_ms: int = 2000
    # Longest a Lookup or an engine scheduler's lookup (Acquire with background) waits for the existence check,
    # milliseconds; past it the keys are misses (the engine computes them). A server that sent nothing during three
    # such cut lookups in a row is marked down; one that is only slow is not.
    lookup_timeout_ms: int = 100
    # Longest a connection attempt may take, milliseconds.
    connect_timeout_ms: int = 1000
    # Longest wait between reconnection attempts to a failed server (backoff from 0.1 s doubles up to it), seconds.
    reconnect_max_s: float = 5.0
    # ACL user name; "" = the url's, or none.
    username: str = ""
    # Password; "" = the url's, or none. Anyone who can read this file can read it.
    password: str = ""
    # File holding the password (its first line), read at start, instead of password: the config may then be
    # readable by others (the arena's group), the password by the daemon's user only.
    password_file: str = ""
    # CA bundle that signs the servers' certificates (rediss://, valkeys://); "" = the system's.
    tls_ca: str = ""
    # Client certificate (PEM) for mutual TLS; "" = none.
    tls_cert: str = ""
    # Private key of tls_cert (PEM); "" = in tls_cert's file.
    tls_key: str = ""
    # Name the servers' certificates must carry; "" = the host name or address connected to.
    tls_server_name: str = ""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ram: RamConfig = field(default_factory=RamConfig)
    nvme: NvmeConfig = field(default_factory=NvmeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    # Resolved values (defaults that depend on the machine).
    @property
    def socket_path(self) -> str:
        return self.server.socket or default_socket()

    @property
    def arena_path(self) -> str:
        return self.ram.arena_path or default_arena_path()

    @property
    def arena_capacity(self) -> int:
        return self.ram.capacity or auto_capacity(self.arena_path)


_SIZE_FIELDS = {("server", "max_message_bytes"), ("ram", "capacity"), ("ram", "max_block_bytes"),
                ("nvme", "capacity"), ("nvme", "queue_bytes"), ("cluster", "queue_bytes"), ("cluster", "part_bytes")}
_TABLE_FIELDS = {("cluster", "namespace_ttl_s")}
_SECTIONS = {"server": ServerConfig, "ram": RamConfig, "nvme": NvmeConfig, "metrics": MetricsConfig,
             "auth": AuthConfig, "cluster": ClusterConfig}
_CHOICES = {
    ("ram", "policy"): None,  # filled from kvtier.policy.POLICIES at validation
    ("server", "log_level"): ("debug", "info", "warning", "error"),
    ("nvme", "write_policy"): ("commit", "evict"),
    ("nvme", "durability"): ("none", "data", "full"),
    ("nvme", "direct_io"): ("auto", "on", "off"),
    ("nvme", "bounce_reads"): ("auto", "on", "off"),
    ("nvme", "codec"): ("none", "lz4", "shuffle-lz4"),
    ("nvme", "promote"): ("first", "second"),
    ("cluster", "write_policy"): ("commit", "evict", "off"),
    ("cluster", "codec"): ("none", "lz4", "shuffle-lz4"),
    ("ram", "verify_on_commit"): ("sync", "background", "off"),
}
# Choices that also take a boolean (what the setting was before it had more than two values).
_BOOL_CHOICES = {("ram", "verify_on_commit"): {True: "sync", False: "off"}}
CLUSTER_SCHEMES = ("redis", "rediss", "valkey", "valkeys")


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    name = f"{section}.{f.name}"
    if (section, f.name) in _SIZE_FIELDS:
        return parse_size(value, name)
    if isinstance(value, bool) and (section, f.name) in _BOOL_CHOICES:
        return _BOOL_CHOICES[(section, f.name)][value]
    if (section, f.name) in _TABLE_FIELDS:
        if not isinstance(value, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value.values()):
            raise ConfigError(f"{name}: expected a table of name = integer, got {value!r}")
        return tuple(sorted(value.items()))
    want = f.type if isinstance(f.type, type) else \
        {"str": str, "int": int, "bool": bool, "float": float, "tuple": tuple}[f.type]
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name}: expected a list of paths, got {value!r}")
        return tuple(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {want.__name__}, got {value!r}")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """A validated 'host:port' as (host, port); an empty host (':7070') is every IPv4 address."""
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _host_port(name: str, value: str, empty_host: bool) -> None:
    """'host:port' (or '[v6]:port'), port 0..65535; an empty host (':7070', every address) only
    where empty_host."""
    m = re.fullmatch(r"(\[?[\w.:\-]*\]?):(\d{1,5})", value)
    if m is None or int(m.group(2)) > 65535 or not (m.group(1) or empty_host):
        raise ConfigError(f"{name}: expected 'host:port' with a port of 0-65535, got {value!r}")


def _section_name(section) -> str:
    return next(k for k, cls in _SECTIONS.items() if isinstance(section, cls))


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its NUL)


def check_socket_path(name: str, path: str) -> None:
    """The socket and the data channel's beside it ("<socket>.data") must fit a Unix address."""
    n = len(os.fsencode(os.path.abspath(path) + ".data"))
    if n > UNIX_PATH_MAX:
        raise ConfigError(f"{name}: {path} is too long for a Unix socket: with the data channel's "
                          f"\".data\" it is {n} bytes, at most {UNIX_PATH_MAX}; choose a shorter path")


def _validate(cfg: Config) -> None:
    s, r, n = cfg.server, cfg.ram, cfg.nvme
    from .policy import POLICIES  # late: policy imports nothing from here
    for (section, name), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        choices = choices or tuple(sorted(POLICIES))
        if value not in choices:
            also = " (or true/false)" if (section, name) in _BOOL_CHOICES else ""
            raise ConfigError(f"{section}.{name}: {value!r} is not one of {', '.join(choices)}{also}")
    if (s.listen or s.data_listen) and not s.tls_cert and not s.insecure_tcp:
        raise ConfigError("server.listen: TCP needs TLS (server.tls_cert and server.tls_key), "
                          "or server.insecure_tcp = true for a trusted network")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key go together")
    if s.tls_client_ca and not s.tls_cert:
        raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key")
    if n.io_threads <= 0:
        raise ConfigError(f"nvme.io_threads: must be > 0, got {n.io_threads}")
    if n.retry_s < 0:
        raise ConfigError(f"nvme.retry_s: must be >= 0, got {n.retry_s}")
    if len(set(n.dirs)) != len(n.dirs):
        raise ConfigError("nvme.dirs: a directory is listed twice")
    if s.socket:  # the default is checked where it is made (it depends on the environment)
        check_socket_path("server.socket", s.socket)
    try:
        mode = int(s.socket_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"server.socket_mode: {s.socket_mode!r} is not a permission mode such as '0660'")
    for name, val in (("server.listen", s.listen), ("server.data_listen", s.data_listen),
                      ("metrics.listen", cfg.metrics.listen)):
        if val:
            _host_port(name, val, empty_host=True)
    if r.capacity and r.capacity < 4 * MiB:
        raise ConfigError(f"ram.capacity: at least 4MiB, got {r.capacity}")
    for name, val in (("ram.lease_ms", r.lease_ms), ("ram.reservation_ms", r.reservation_ms),
                      ("ram.max_ttl_ms", r.max_ttl_ms), ("server.max_batch", s.max_batch),
                      ("server.data_max_connections", s.data_max_connections),
                      ("ram.max_block_bytes", r.max_block_bytes), ("server.max_message_bytes", s.max_message_bytes)):
        if val <= 0:
            raise ConfigError(f"{name}: must be > 0, got {val}")
    if s.max_message_bytes >= 2 * GiB:  # gRPC takes it as a C int
        raise ConfigError(f"server.max_message_bytes: must be under 2GiB, got {s.max_message_bytes}")
    if r.lease_ms > r.max_ttl_ms or r.reservation_ms > r.max_ttl_ms:
        raise ConfigError(f"ram.lease_ms and ram.reservation_ms: at most ram.max_ttl_ms ({r.max_ttl_ms}), got "
                          f"{r.lease_ms} and {r.reservation_ms}")
    if not 0 < r.max_pinned <= 1:
        raise ConfigError(f"ram.max_pinned: a share of the arena, more than 0 and at most 1, got {r.max_pinned}")
    if n.queue_bytes <= 0:
        raise ConfigError(f"nvme.queue_bytes: must be > 0 (writes beyond it are dropped), got {n.queue_bytes}")
    for section in (s, r, n, cfg.metrics, cfg.auth, cfg.cluster):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{_section_name(section)}.{f.name}: must be a finite number, got {v}")
    if s.drain_timeout_s < 0:
        raise ConfigError(f"server.drain_timeout_s: must be >= 0, got {s.drain_timeout_s}")
    if s.gc_freeze_s < 0:
        raise ConfigError(f"server.gc_freeze_s: must be >= 0 (0 = never), got {s.gc_freeze_s}")
    if s.huge_pages_s < 0:
        raise ConfigError(f"server.huge_pages_s: must be >= 0 (0 = never), got {s.huge_pages_s}")
    _validate_cluster(cfg.cluster)


def _validate_cluster(c: ClusterConfig) -> None:
    if c.url:
        scheme = c.url.partition("://")[0].lower() if "://" in c.url else ""
        if scheme not in CLUSTER_SCHEMES:
            raise ConfigError(f"cluster.url: {c.url!r} must start with one of "
                              f"{', '.join(s + '://' for s in CLUSTER_SCHEMES)}")
        try:
            parts = urllib.parse.urlsplit(c.url)
            host, _ = parts.hostname, parts.port  # .port: a port that is not a number (or > 65535) raises
        except ValueError as e:
            raise ConfigError(f"cluster.url: {e}") from None
        if not host:
            raise ConfigError(f"cluster.url: a host is required, got {c.url!r}")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"cluster.url: the database after the host must be a number, got {db!r}")
        if db and int(db) and c.cluster:
            raise ConfigError(f"cluster.url: a Valkey Cluster has only database 0, got {db}")
    elif c.cluster or c.seeds:
        raise ConfigError("cluster.url: required when cluster.cluster or cluster.seeds is set")
    for seed in c.seeds:
        _host_port("cluster.seeds", seed, empty_host=False)
    if c.seeds and not c.cluster:
        raise ConfigError("cluster.seeds: only used in Cluster mode (cluster.cluster = true)")
    if c.ttl_s < 0:
        raise ConfigError(f"cluster.ttl_s: must be >= 0, got {c.ttl_s}")
    for ns, ttl in c.namespace_ttl_s:
        if NAMESPACE_RE.fullmatch(ns) is None:
            raise ConfigError(f"cluster.namespace_ttl_s: {ns!r} is not a valid namespace")
        if ttl < 0:
            raise ConfigError(f"cluster.namespace_ttl_s: {ns} must be >= 0, got {ttl}")
    if not re.fullmatch(r"[\w.\-]{1,32}", c.prefix):
        raise ConfigError(f"cluster.prefix: 1-32 characters of [A-Za-z0-9_.-], got {c.prefix!r}")
    if not 1 <= c.connections <= 64:
        raise ConfigError(f"cluster.connections: must be 1..64, got {c.connections}")
    if c.part_bytes and c.part_bytes < 64 * KiB:
        raise ConfigError(f"cluster.part_bytes: 0 (whole values) or at least 64KiB, got {c.part_bytes}")
    for name, val in (("cluster.timeout_ms", c.timeout_ms), ("cluster.connect_timeout_ms", c.connect_timeout_ms),
                      ("cluster.lookup_timeout_ms", c.lookup_timeout_ms),
                      ("cluster.reconnect_max_s", c.reconnect_max_s), ("cluster.queue_bytes", c.queue_bytes)):
        if val <= 0:
            raise ConfigError(f"{name}: must be > 0, got {val}")
    if c.tls_key and not c.tls_cert:
        raise ConfigError("cluster.tls_key: given without cluster.tls_cert")
    if c.password and c.password_file:
        raise ConfigError("cluster.password_file: given with cluster.password; set one, not both")


def from_dict(data: dict[str, Any]) -> Config:
    parts: dict[str, Any] = {}
    for section, value in data.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            hint = " (a tenants file? name it in [auth] tenants_file)" if section == "tenants" else ""
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(_SECTIONS)}){hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{section}] must be a table")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in value.items():
            if k not in fields:
                raise ConfigError(f"{section}.{k}: unknown setting (known: {', '.join(fields)})")
            kw[k] = _coerce(section, fields[k], v)
        parts[section] = cls(**kw)
    cfg = Config(**parts)
    _validate(cfg)
    return cfg


def read_toml(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; unreadable or malformed files are a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib lets a bad byte through as this
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None


# settings that name files or directories: in a config file, a relative one is relative to the
# file's directory (as a prewarm plan's are to the plan's), not to wherever the daemon was started
# (systemd starts it in /)
FILE_SETTINGS = (("server", "tls_cert"), ("server", "tls_key"), ("server", "tls_client_ca"),
                 ("cluster", "tls_ca"), ("cluster", "tls_cert"), ("cluster", "tls_key"),
                 ("cluster", "password_file"), ("auth", "tenants_file"))
PATH_SETTINGS = FILE_SETTINGS + (("server", "socket"), ("ram", "arena_path"), ("nvme", "dirs"))


def _relative_to(data: dict, base: str) -> dict:
    def resolve(v):
        return os.path.join(base, v) if isinstance(v, str) and v and not os.path.isabs(v) else v
    out = dict(data)
    for section, key in PATH_SETTINGS:
        sec = out.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        v = sec[key]
        out[section] = {**sec, key: [resolve(x) for x in v] if isinstance(v, list) else resolve(v)}
    return out


def load(path: str | os.PathLike | None) -> Config:
    """Read a TOML file (None: embedded defaults). Relative paths in it are relative to its
    directory (PATH_SETTINGS)."""
    if path is None:
        return from_dict({})
    data = _relative_to(read_toml(path), os.path.dirname(os.path.abspath(path)))
    try:
        return from_dict(data)
    except ConfigError as e:
        line = locate(path, str(e))
        raise ConfigError(f"{path}:{line}: {e}" if line else f"{path}: {e}") from None


def locate(path, message: str) -> int | None:
    """Line number of the setting a message names ("section.key: ..." or "[section]")."""
    m = re.match(r"(?:unknown section \[)?(\w+)(?:\.(\w+))?", message)
    if not m:
        return None
    section, key = m.group(1), m.group(2)
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    head = re.compile(rf"\s*\[\s*{re.escape(section)}\s*(\]\s*(#.*)?$|\.)")  # [section], or [section.sub]
    for i, line in enumerate(lines):
        if head.match(line):
            if key is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if re.match(r"\s*\[", lines[j]):
                    break
                if re.match(rf"\s*{re.escape(key)}\s*=", lines[j]):
                    return j + 1
            return i + 1
    return None


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some fields changed, e.g. replace(cfg, ram={"capacity": 64*MiB})."""
    new = {name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    out = dataclasses.replace(cfg, **new)
    _validate(out)
    return out
