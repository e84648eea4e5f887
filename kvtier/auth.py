"""Tenants, bearer tokens and namespace access.

With no tenants file the daemon is single-tenant (``AllowAll``): the Unix
socket's permissions are the boundary. With ``[auth] tenants_file`` every
call, on every transport, must carry a bearer token (gRPC metadata
``authorization: Bearer <token>``; on the data channel a HELLO frame) that
maps to a tenant; a tenant sees only namespaces matching its patterns:
Lookup, Reserve, Acquire, Get, Put, Delete, Pin, Unpin on another
namespace are PERMISSION_DENIED, and Stats lists only its own namespaces.
Reservation and lease ids are random 63-bit numbers, so one tenant cannot
guess another's. The arena is one file for all tenants: a process that may
open it (same node, the service's group) reads and writes every block, so
tenants separate what reaches the daemon only through its calls.

Tenants file (TOML)::

    [tenants.acme]
    # SHA-256 (hex) of each accepted token: the file never holds a token itself.
    token_sha256 = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    namespaces = ["acme", "acme-*"]     # fnmatch patterns
    ram_quota = "200GiB"                # 0 or absent: no quota
    nvme_quota = "2TiB"
    redis_quota = "500GiB"

    [tenants.ops]
    token_sha256 = ["..."]
    namespaces = ["*"]

Quotas bound what a tenant's namespaces hold per tier (a namespace two tenants
may use counts against the one naming it most closely: "acme-*" before "*"); a tenant over one
evicts its own least recently used blocks, never another tenant's: RAM in
``kvtier.hot``, NVMe in ``kvtier.cold``, Redis in ``kvtier.clusterquota``
(accounted in Redis itself, so every daemon sharing it enforces one quota).
A reload (SIGHUP) applies new quotas; a lowered Redis quota evicts at once.

``kvtier token`` prints a new random token and the line to put in the file.
Tokens never appear in logs: only the tenant's name does.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field

from .config import parse_size, read_toml
from .errors import ConfigError, PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Tenant:
    name: str
    token_hashes: tuple[str, ...]
    patterns: tuple[str, ...]
    ram_quota: int = 0
    nvme_quota: int = 0
    redis_quota: int = 0

    def allows(self, ns: str) -> bool:
        return any(fnmatch.fnmatchcase(ns, p) for p in self.patterns)

    def claim(self, ns: str) -> tuple[bool, int] | None:
        """How closely this tenant's patterns name ns (the closest one's), None if none matches:
        an exact name before any pattern, then the longer literal start ("acme-*" before "*")."""
        best = None
        for p in self.patterns:
            if fnmatch.fnmatchcase(ns, p):
                wild = next((i for i, ch in enumerate(p) if ch in "*?["), None)
                c = (wild is None, len(p) if wild is None else wild)
                best = c if best is None or c > best else best
        return best


class AllowAll:
    """No tenants configured: every caller may use every namespace."""
    enabled = False
    tenants: dict = {}

    def identify(self, token: str | None) -> Tenant | None:
        return None

    def authorize(self, tenant: Tenant | None, ns: str) -> None:
        pass

    def allowed(self, tenant: Tenant | None, ns: str) -> bool:
        return True

    def group_of(self, ns: str) -> str:
        return ""


@dataclass
class Tenants:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    enabled = True

    def __post_init__(self) -> None:
        self._by_hash = {h: t for t in self.tenants.values() for h in t.token_hashes}
        self._group_cache: dict[str, str] = {}

    @classmethod
    def load(cls, path: str) -> "Tenants":
        return cls.from_dict(read_toml(path, "tenants file"), path)

    @classmethod
    def from_dict(cls, data: dict, where: str = "tenants") -> "Tenants":
        unknown = set(data) - {"tenants"}
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; use [tenants.NAME]")
        out: dict[str, Tenant] = {}
        seen: dict[str, str] = {}
        tenants = data.get("tenants") or {}
        if not isinstance(tenants, dict):
            raise ConfigError(f"{where}: tenants must be tables, one per tenant: [tenants.NAME]")
        for name, t in tenants.items():
            at = f"{where}: tenants.{name}"
            if not isinstance(t, dict):
                raise ConfigError(f"{at} must be a table")
            extra = set(t) - {"token_sha256", "namespaces", "ram_quota", "nvme_quota", "redis_quota"}
            if extra:
                raise ConfigError(f"{at}.{sorted(extra)[0]}: unknown setting")
            hashes = t.get("token_sha256", [])
            if isinstance(hashes, str):
                hashes = [hashes]
            if not isinstance(hashes, list) or not hashes or not all(isinstance(h, str) and _HEX64.fullmatch(h)
                                                                     for h in hashes):
                raise ConfigError(f"{at}.token_sha256: a list of 64-hex-digit SHA-256 digests is required")
            for h in hashes:
                if h.lower() in seen:
                    raise ConfigError(f"{at}.token_sha256: the same token also belongs to {seen[h.lower()]}")
                seen[h.lower()] = name
            pats = t.get("namespaces", [])
            # a string is refused, not read as a list of its characters (one of them "*": every namespace)
            if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
                raise ConfigError(f"{at}.namespaces: a non-empty list of namespace patterns is required, "
                                  f"e.g. [\"acme\", \"acme-*\"]; got {pats!r}")
            out[name] = Tenant(name, tuple(h.lower() for h in hashes), tuple(pats),
                               *(parse_size(t.get(q, 0), f"{at}.{q}") for q in ("ram_quota", "nvme_quota",
                                                                                 "redis_quota")))
        if not out:
            raise ConfigError(f"{where}: no [tenants.NAME] defined")
        return cls(out)

    def identify(self, token: str | None) -> Tenant:
        if not token:
            raise Unauthenticated("a bearer token is required (authorization: Bearer <token>)")
        t = self._by_hash.get(hashlib.sha256(token.encode()).hexdigest())
        if t is None:
            raise Unauthenticated("unknown token")
        return t

    def authorize(self, tenant: Tenant, ns: str) -> None:
        if not tenant.allows(ns):
            raise PermissionDenied(f"tenant {tenant.name} may not use namespace {ns!r}")

    def allowed(self, tenant: Tenant | None, ns: str) -> bool:
        return tenant is not None and tenant.allows(ns)

    def group_of(self, ns: str) -> str:
        """The tenant owning a namespace, for quotas: the one whose patterns name it most closely
        (Tenant.claim: "acme" or "acme-*" before an operator's "*", wherever each is in the file),
        the first in the file among equals."""
        g = self._group_cache.get(ns)
        if g is None:
            g, best = "", None
            for t in self.tenants.values():
                c = t.claim(ns)
                if c is not None and (best is None or c > best):
                    g, best = t.name, c
            if len(self._group_cache) < 100_000:
                self._group_cache[ns] = g
        return g


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def token_from_metadata(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            v = v.decode() if isinstance(v, bytes) else v
            return v[7:].strip() if v[:7].lower() == "bearer " else None
    return None


def new_token() -> tuple[str, str]:
    """A random token and its SHA-256 for the tenants file."""
    import secrets
    tok = secrets.token_urlsafe(32)
    return tok, hashlib.sha256(tok.encode()).hexdigest()
