"""Settings of the vLLM connector: ``kv_connector_extra_config`` and per-request options.

Engine-wide, from ``--kv-transfer-config '{..., "kv_connector_extra_config": {...}}'``
(every field optional; an unknown name or a wrong type is an error at engine start):

    address        kvtier daemon address; default $KVTIER_ADDRESS or the default socket
    token          bearer token; default $KVTIER_TOKEN
    tls_ca         PEM file of the CA that signed the daemon's certificate: TLS to a tcp://
                   address (a daemon on another node); default $KVTIER_TLS_CA, else no TLS
    tls_cert, tls_key  PEM client certificate and its key, for a daemon that asks for one
                   (server.tls_client_ca); default $KVTIER_TLS_CERT, $KVTIER_TLS_KEY
    tls_server_name  name to check in the daemon's certificate (default: the address's host);
                   default $KVTIER_TLS_SERVER_NAME
                   The TLS files are read at engine start: a missing or unreadable one, or a
                   key that is not the certificate's, is an error there. Unix sockets ignore them.
    namespace      kvtier namespace of the engine's chunks ("vllm")
    chunk_size     tokens per stored chunk, a multiple of the block size
                   (default: the largest multiple of the block size <= 256, at least one block)
    load_async     load between steps (True) or inside the step that needs the KV (False)
    load, store    read from / write to kvtier at all (True, True)
    store_decode   also store blocks filled by generated tokens (True)
    lease_ms       how long looked-up chunks stay leased for the load (30000 ms; 0 = the
                   daemon's ram.lease_ms). At most the daemon's ram.max_ttl_ms (600000 by
                   default), which refuses longer leases: every lookup and load would miss
    timeout_s      deadline of one daemon call from the scheduler (1.0 s)
    worker_timeout_s  the same for the workers' calls, which move the data (5.0 s)
    retry_s        after a failed call, calls skip the daemon this long, then reconnect (1.0 s)
    verify         check every loaded chunk against its xxh3-128 checksum (True)
    tenant         default tenant mixed into keys ("")
    tenant_namespace  namespace of a request with a tenant, a template over {namespace} and
                   {tenant}, e.g. "{namespace}-{tenant}": each tenant's chunks then live in
                   their own daemon namespace (quotas, stats, deletion per tenant). A tenant
                   whose namespace would be invalid (1-64 characters of [a-z0-9_.-], starting
                   with a letter or digit) gets neither loads nor stores.
                   Default: one namespace for every tenant (the tenant is still in the keys)
    revision       model revision in the fingerprint (default: vLLM's model revision)
    request_options  the per-request options below that this engine honours, a list of names
                   (default: all of them). Whoever can send requests sets them: an engine that
                   serves callers who must not choose their tenant (another customer's cache
                   scope) or pin chunks in RAM lists only what they may, e.g. ["skip"], or []
                   (kvtier prewarm needs tenant, pin, ttl and return_keys on its engine); an
                   option not listed is logged and ignored

Per request, ``kv_transfer_params={"kvtier": {...}}`` (a bad value is logged and ignored,
never a failed request):

    tenant         tenant mixed into this request's keys
    pin            pin this request's chunks (stored or loaded): True until unpinned, or a number of
                   seconds from 1 to 2**32-1 to pin them for (0 is not a duration, and the
                   daemon takes no longer one: ignored, with a warning)
    ttl            seconds (1 to 2**32-1) to keep the stored chunks in RAM: a pin for that long
                   (the daemon has no per-block expiry; ``"pin": false`` turns it off)
    skip           neither load nor store this request (False)
    load, store    load / store for this request (True, True)
    return_keys    list the keys of the request's cached chunks (hex, every rank) in the
                   finished request's kv_transfer_params (False: they can be long)
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..client import TLS
from ..errors import ConfigError
from ..keys import NAMESPACE_RE

_NS_RULE = "1-64 characters of [a-z0-9_.-], starting with a letter or digit"
MAX_PIN_S = 2**32 - 1  # the longest pin the daemon takes (Pin's ttl_s is a uint32)
MAX_LEASE_MS = 2**32 - 1  # Acquire's lease_ms is a uint32 (the daemon's ram.max_ttl_ms is lower)
REQUEST_OPTIONS = ("tenant", "pin", "ttl", "skip", "load", "store", "return_keys")
TLS_SETTINGS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")  # each defaults to $KVTIER_<NAME>


@dataclass(frozen=True)
class ConnectorSettings:
    address: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    namespace: str = "vllm"
    chunk_size: int | None = None
    load_async: bool = True
    load: bool = True
    store: bool = True
    store_decode: bool = True
    lease_ms: int = 30_000
    timeout_s: float = 1.0
    worker_timeout_s: float = 5.0
    retry_s: float = 1.0
    verify: bool = True
    tenant: str = ""
    tenant_namespace: str | None = None
    revision: str | None = None
    request_options: str = ",".join(REQUEST_OPTIONS)  # given as a list; kept comma-joined (hashable)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None,
                   env: Mapping[str, str] | None = None) -> "ConnectorSettings":
        """The engine's settings; ``env`` (default os.environ) gives the TLS settings not in extra."""
        extra = dict(extra or {})
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"kv_connector_extra_config: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
        out = {}
        for name, val in extra.items():
            if name == "request_options":
                out[name] = _option_names(val)
                continue
            out[name] = _coerce(f"kv_connector_extra_config.{name}", known[name].type, val)
        from_env = {n: env["KVTIER_" + n.upper()] for n in TLS_SETTINGS
                    if n not in out and env.get("KVTIER_" + n.upper())}
        s = cls(**out, **from_env)
        if not (s.address or env.get("KVTIER_ADDRESS") or "unix:").startswith("unix:"):
            _check_tls(s, from_env)  # a Unix socket ignores them: a stale $KVTIER_TLS_CA must not stop the engine
        from ..keys import check_namespace
        try:
            check_namespace(s.namespace)
        except Exception as e:
            raise ConfigError(f"kv_connector_extra_config.namespace: {e}") from None
        if not 0 <= s.lease_ms <= MAX_LEASE_MS:
            raise ConfigError(f"kv_connector_extra_config.lease_ms must be 0..{MAX_LEASE_MS} "
                              "(and at most the daemon's ram.max_ttl_ms)")
        for name in ("timeout_s", "worker_timeout_s"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"kv_connector_extra_config.{name} must be > 0")
        if s.retry_s < 0:
            raise ConfigError("kv_connector_extra_config.retry_s must be >= 0")
        if s.chunk_size is not None and s.chunk_size <= 0:
            raise ConfigError("kv_connector_extra_config.chunk_size must be > 0")
        if s.tenant_namespace is not None:
            _check_template(s.tenant_namespace, s.namespace)
            if s.tenant:
                try:
                    s.namespace_for(s.tenant)
                except ValueError as e:
                    raise ConfigError(f"kv_connector_extra_config.tenant: {e}") from None
        return s

    @property
    def tls(self) -> TLS | None:
        """TLS to the daemon, when a CA is set (tls_ca)."""
        if not self.tls_ca:
            return None
        return TLS(self.tls_ca, self.tls_cert or None, self.tls_key or None, self.tls_server_name or None)

    def namespace_for(self, tenant: str) -> str:
        """The daemon namespace of a request with this tenant; ValueError if it is not valid."""
        if not self.tenant_namespace or not tenant:
            return self.namespace
        ns = self.tenant_namespace.format(namespace=self.namespace, tenant=tenant)
        if NAMESPACE_RE.fullmatch(ns) is None:
            raise ValueError(f"tenant {tenant!r} gives namespace {ns!r}, which is not valid ({_NS_RULE})")
        return ns

    def resolve_chunk_size(self, block_size: int) -> int:
        if self.chunk_size is None:
            return max(block_size, 256 // block_size * block_size)
        if self.chunk_size % block_size:
            raise ConfigError(f"kv_connector_extra_config.chunk_size={self.chunk_size} is not a "
                              f"multiple of the block size {block_size}")
        return self.chunk_size


def _check_tls(s: ConnectorSettings, from_env: Mapping[str, str]) -> None:
    """Read the TLS files now: one that cannot work would otherwise turn every call into a miss."""
    names = {n: "$KVTIER_" + n.upper() if n in from_env else f"kv_connector_extra_config.{n}" for n in TLS_SETTINGS}
    if s.tls is None:
        if s.tls_cert or s.tls_key:
            given = names["tls_cert"] if s.tls_cert else names["tls_key"]
            raise ConfigError(f"{given}: needs {names['tls_ca']} (the CA of the daemon's certificate)")
        return
    s.tls.check({"ca": names["tls_ca"], "cert": names["tls_cert"], "key": names["tls_key"]})


def _option_names(val: Any) -> str:
    where = "kv_connector_extra_config.request_options"
    if not isinstance(val, (list, tuple)) or not all(isinstance(v, str) for v in val):
        raise ConfigError(f"{where} must be a list of option names, got {val!r}")
    bad = sorted(set(val) - set(REQUEST_OPTIONS))
    if bad:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(bad)}; known: {', '.join(REQUEST_OPTIONS)}")
    return ",".join(v for v in REQUEST_OPTIONS if v in val)


def _check_template(template: str, namespace: str) -> None:
    where = "kv_connector_extra_config.tenant_namespace"
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if "tenant" not in names or not names <= {"namespace", "tenant"}:
        raise ConfigError(f"{where}: {template!r} must contain {{tenant}} and may contain "
                          "{namespace}, nothing else in braces")
    if NAMESPACE_RE.fullmatch(template.format(namespace=namespace, tenant="t")) is None:
        raise ConfigError(f"{where}: {template!r} does not make a valid namespace ({_NS_RULE})")


def _coerce(where: str, typ: str, val: Any) -> Any:
    t = typ.replace(" ", "")
    optional = t.endswith("|None")
    base = t[:-len("|None")] if optional else t
    if val is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be null")
    if base == "bool":
        if isinstance(val, bool):
            return val
        raise ConfigError(f"{where} must be true or false, got {val!r}")
    if base == "int":
        if isinstance(val, int) and not isinstance(val, bool):
            return val
        raise ConfigError(f"{where} must be an integer, got {val!r}")
    if base == "float":
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
        raise ConfigError(f"{where} must be a number, got {val!r}")
    if base == "str":
        if isinstance(val, str):
            return val
        raise ConfigError(f"{where} must be a string, got {val!r}")
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


@dataclass(frozen=True)
class RequestOptions:
    tenant: str = ""
    pin: bool = False
    pin_s: int = 0           # with pin: 0 = until unpinned
    load: bool = True
    store: bool = True
    namespace: str = "vllm"  # the daemon namespace of this request's chunks
    return_keys: bool = False


def request_options(params: Mapping[str, Any] | None, settings: ConnectorSettings,
                    warn=None) -> RequestOptions:
    """The request's ``kv_transfer_params["kvtier"]`` over the engine's defaults.
    A bad value is reported through ``warn(message)`` and the default kept."""
    base = RequestOptions(tenant=settings.tenant, load=settings.load, store=settings.store,
                          namespace=settings.namespace_for(settings.tenant))
    raw = (params or {}).get("kvtier") if isinstance(params, Mapping) else None
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        if warn:
            warn(f"kv_transfer_params.kvtier must be an object, got {type(raw).__name__}: ignored")
        return base
    out = dict(tenant=base.tenant, pin=False, pin_s=0, load=base.load, store=base.store,
               return_keys=False)
    ttl = None
    honoured = set(settings.request_options.split(","))
    for name, val in raw.items():
        ok = True
        if name in REQUEST_OPTIONS and name not in honoured:
            if warn:
                warn(f"kv_transfer_params.kvtier.{name} is not among this engine's "
                     f"kv_connector_extra_config.request_options: ignored")
            continue
        if name == "tenant" and isinstance(val, str) and "\n" not in val and len(val) <= 256:
            out["tenant"] = val
        elif name == "pin" and isinstance(val, bool):
            out["pin"] = val
        elif name == "pin" and isinstance(val, int) and 0 < val <= MAX_PIN_S:  # the daemon's 0 is "for ever"
            out["pin"], out["pin_s"] = True, val
        elif name == "ttl" and isinstance(val, int) and not isinstance(val, bool) and 0 < val <= MAX_PIN_S:
            ttl = val
        elif name == "return_keys" and isinstance(val, bool):
            out["return_keys"] = val
        elif name == "skip" and isinstance(val, bool):
            if val:
                out["load"] = out["store"] = False
        elif name in ("load", "store") and isinstance(val, bool):
            out[name] = out[name] and val
        else:
            ok = False
        if not ok and warn:
            warn(f"kv_transfer_params.kvtier.{name}={val!r} is not understood: ignored")
    if ttl is not None and raw.get("pin") is not False:
        out["pin"], out["pin_s"] = True, ttl
    try:
        out["namespace"] = settings.namespace_for(out["tenant"])
    except ValueError as e:
        if warn:
            warn(f"{e}: neither loaded nor stored")
        out["namespace"], out["load"], out["store"] = settings.namespace, False, False
    return RequestOptions(**out)
