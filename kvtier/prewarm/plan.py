"""The prewarm plan: a TOML file read once into frozen dataclasses.

``configs/prewarm.example.toml`` documents every setting. Paths in the plan are relative to
the plan file's directory. Contexts are described here and read only when they are sent
(``load_context``), so a plan parses without touching their files (one that cannot be read
fails its context only); the daemon's TLS files, without which no run reaches the daemon,
are read as the plan loads. A bad value is a ``ConfigError`` naming the plan file, the line
where it can be found and the setting.
"""
from __future__ import annotations

import datetime as dt
import glob
import json
import math
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ..client import TLS
from ..config import locate, parse_size, read_toml
from ..errors import ConfigError

PIN_CLASSES = ("ram", "none")
AFTER_DEADLINE = ("stop", "slow")
KINDS = ("text", "files", "messages", "tokens")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*")
_UNIT_S = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True)
class Context:
    """One prompt to compute: exactly one source (text, files, messages or tokens)."""
    tenant: str
    name: str
    kind: str                     # one of KINDS
    text: str = ""                # kind "text"
    files: tuple[str, ...] = ()   # kind "files": paths or globs, read in order, each sorted
    separator: str = "\n"         # between files
    header: str = ""              # before each file; "{path}" is replaced by its path
    messages: str = ""            # kind "messages": JSONL, one chat message per line
    tools: str = ""               # with messages: JSON list of tool schemas
    tokens: str = ""              # kind "tokens": JSONL, token ids (an id or a list per line)

    @property
    def id(self) -> str:
        return f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class Tenant:
    name: str
    pin: str = "ram"              # "ram": pinned in RAM for ttl_s; "none": not pinned
    ttl_s: int = 0                # pin duration; 0 = until unpinned
    contexts: tuple[Context, ...] = ()


@dataclass(frozen=True)
class Plan:
    path: str = ""
    # [vllm]
    url: str = "http://127.0.0.1:8000"
    model: str = ""               # "" = the server's first model
    api_key_env: str = "VLLM_API_KEY"
    timeout_s: float = 600.0      # one request
    # [daemon]
    address: str = ""             # "" = $KVTIER_ADDRESS or the default socket
    store_wait_s: float = 10.0    # how long stores may take to appear after a response
    tls_ca: str = ""              # CA of the daemon's certificate: TLS to a tcp:// address; "" = none
    tls_cert: str = ""            # client certificate and its key, for a daemon asking for one
    tls_key: str = ""
    tls_server_name: str = ""     # name to check in the daemon's certificate; "" = the address's host
    # [run]
    state: str = "/var/lib/kvtier/prewarm-state.json"
    concurrency: int = 2
    max_tokens_per_s: float = 0.0  # prompt tokens per second; 0 = no limit
    deadline: str = ""            # "HH:MM" (local time), a duration ("5h"), or "" = none
    max_run_s: int = 12 * 3600    # a clock deadline further away than this has passed already
    after_deadline: str = "stop"  # "stop" or "slow"
    late_tokens_per_s: float = 1000.0
    retries: int = 3
    retry_backoff_s: float = 2.0
    # [promote]
    promote: bool = False
    ram_budget: int = 0           # bytes; required to promote
    # [report]
    min_coverage: float = 0.0
    min_ram_coverage: float = 0.0
    tenants: tuple[Tenant, ...] = ()

    @property
    def daemon_tls(self) -> TLS | None:
        """TLS to the daemon, when the plan names its CA."""
        if not self.tls_ca:
            return None
        return TLS(self.tls_ca, self.tls_cert or None, self.tls_key or None, self.tls_server_name or None)

    def deadline_in(self, start: dt.datetime) -> tuple[float | None, bool]:
        """(seconds, late): how long after ``start`` (local time) a run's deadline comes (< 0
        when it has passed; None: no deadline), and whether the run started after it (a clock
        deadline more than max_run_s away). A time of day is wall-clock time: the night clocks
        change, it is an hour nearer or further than the clocks' difference."""
        if not self.deadline:
            return None, False
        if ":" not in self.deadline:
            return float(parse_duration(self.deadline, "run.deadline")), False
        h, m = (int(x) for x in self.deadline.split(":"))
        at = start.replace(hour=h, minute=m, second=0, microsecond=0)
        if at <= start:
            at += dt.timedelta(days=1)
        left = _wall_seconds(start, at)
        if left > self.max_run_s:
            return _wall_seconds(start, at - dt.timedelta(days=1)), True
        return left, False


def _wall_seconds(start: dt.datetime, end: dt.datetime) -> float:
    """Seconds from one local time to another, through the local time zone."""
    return time.mktime(end.timetuple()) - time.mktime(start.timetuple())


def parse_duration(value: Any, name: str) -> int:
    """Seconds from an int or a string such as "90s", "30m", "36h", "2d"."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None:
            raise ConfigError(f"{name}: cannot read duration {value!r} (use seconds or e.g. '30m', '36h', '2d')")
        n = int(float(m.group(1)) * _UNIT_S[m.group(2)])
    else:
        raise ConfigError(f"{name}: expected a duration, got {type(value).__name__}")
    if n < 0:
        raise ConfigError(f"{name}: must be >= 0, got {n}")
    return n


# section -> {key: (Plan field, kind)}
_SECTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "vllm": {"url": ("url", "str"), "model": ("model", "str"), "api_key_env": ("api_key_env", "str"),
             "timeout_s": ("timeout_s", "float")},
    "daemon": {"address": ("address", "str"), "store_wait_s": ("store_wait_s", "float"),
               "tls_ca": ("tls_ca", "path"), "tls_cert": ("tls_cert", "path"), "tls_key": ("tls_key", "path"),
               "tls_server_name": ("tls_server_name", "str")},
    "run": {"state": ("state", "path"), "concurrency": ("concurrency", "int"),
            "max_tokens_per_s": ("max_tokens_per_s", "float"), "deadline": ("deadline", "str"),
            "max_run": ("max_run_s", "duration"), "after_deadline": ("after_deadline", "str"),
            "late_tokens_per_s": ("late_tokens_per_s", "float"), "retries": ("retries", "int"),
            "retry_backoff_s": ("retry_backoff_s", "float")},
    "promote": {"enabled": ("promote", "bool"), "ram_budget": ("ram_budget", "size")},
    "report": {"min_coverage": ("min_coverage", "float"), "min_ram_coverage": ("min_ram_coverage", "float")},
}
_TENANT_KEYS = ("name", "pin", "ttl", "context")
_CONTEXT_KEYS = ("name", "text", "files", "separator", "header", "messages", "tools", "tokens")


def _value(name: str, kind: str, v: Any, base: str) -> Any:
    if kind == "size":
        return parse_size(v, name)
    if kind == "duration":
        return parse_duration(v, name)
    if kind == "float" and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if kind == "float" and isinstance(v, float) and not math.isfinite(v):  # TOML has inf and nan
        raise ConfigError(f"{name}: expected a finite number, got {v!r}")
    want = {"str": str, "path": str, "int": int, "float": float, "bool": bool}[kind]
    if not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise ConfigError(f"{name}: expected {want.__name__}, got {v!r}")
    return _path(base, v) if kind == "path" and v else v


def _path(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def from_dict(data: dict[str, Any], base: str = ".", path: str = "") -> Plan:
    """A Plan from parsed TOML; ``base`` is the directory relative paths start from."""
    kw: dict[str, Any] = {"path": path}
    defaults = {"pin": "ram", "ttl": 0}
    tenants_raw = None
    for section, value in data.items():
        if section == "tenant":
            tenants_raw = value
            continue
        if section == "defaults":
            if not isinstance(value, dict):
                raise ConfigError("[defaults] must be a table")
            for k, v in value.items():
                if k not in defaults:
                    raise ConfigError(f"defaults.{k}: unknown setting (known: pin, ttl)")
                defaults[k] = v
            continue
        keys = _SECTIONS.get(section)
        if keys is None:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join([*_SECTIONS, 'defaults', 'tenant'])})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{section}] must be a table")
        for k, v in value.items():
            if k not in keys:
                raise ConfigError(f"{section}.{k}: unknown setting (known: {', '.join(keys)})")
            fname, kind = keys[k]
            kw[fname] = _value(f"{section}.{k}", kind, v, base)
    if tenants_raw is None:
        raise ConfigError("no [[tenant]]: the plan names no customer")
    if not isinstance(tenants_raw, list):
        raise ConfigError("tenant: write each customer as a [[tenant]] table")
    kw["tenants"] = tuple(_tenant(i, t, defaults, base) for i, t in enumerate(tenants_raw))
    names = [t.name for t in kw["tenants"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"tenant {dup[0]!r}: listed twice")
    plan = Plan(**kw)
    _validate(plan)
    return plan


def _tenant(i: int, t: Any, defaults: dict, base: str) -> Tenant:
    if not isinstance(t, dict):
        raise ConfigError(f"tenant #{i + 1}: must be a table")
    name = t.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"tenant #{i + 1}: name must be 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
    where = f"tenant {name!r}"
    for k in t:
        if k not in _TENANT_KEYS:
            raise ConfigError(f"{where}: unknown setting {k!r} (known: {', '.join(_TENANT_KEYS)})")
    pin = t.get("pin", defaults["pin"])
    if pin not in PIN_CLASSES:
        raise ConfigError(f"{where}: pin must be one of {', '.join(PIN_CLASSES)}, got {pin!r}")
    ttl = parse_duration(t.get("ttl", defaults["ttl"]), f"{where}: ttl")
    raw = t.get("context", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: no [[tenant.context]]")
    ctxs = tuple(_context(name, j, c, base) for j, c in enumerate(raw))
    names = [c.name for c in ctxs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: context {dup[0]!r} listed twice")
    return Tenant(name, pin, ttl, ctxs)


def _context(tenant: str, j: int, c: Any, base: str) -> Context:
    where = f"tenant {tenant!r} context #{j + 1}"
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: must be a table")
    name = c.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: name must be 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
    where = f"tenant {tenant!r} context {name!r}"
    for k in c:
        if k not in _CONTEXT_KEYS:
            raise ConfigError(f"{where}: unknown setting {k!r} (known: {', '.join(_CONTEXT_KEYS)})")
    kinds = [k for k in KINDS if k in c]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    kw: dict[str, Any] = {"tenant": tenant, "name": name, "kind": kind}
    for k in ("text", "separator", "header", "messages", "tools", "tokens"):
        if k in c:
            if not isinstance(c[k], str):
                raise ConfigError(f"{where}: {k} must be a string, got {c[k]!r}")
            kw[k] = _path(base, c[k]) if k in ("messages", "tools", "tokens") else c[k]
    if kind == "files":
        files = c["files"]
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise ConfigError(f"{where}: files must be a path or glob, or a list of them")
        kw["files"] = tuple(_path(base, f) for f in files)
    if kind == "text" and not c["text"]:
        raise ConfigError(f"{where}: text is empty")
    if "tools" in c and kind != "messages":
        raise ConfigError(f"{where}: tools go with messages")
    return Context(**kw)


def _validate(p: Plan) -> None:
    try:
        u = urllib.parse.urlsplit(p.url)
        u.port  # a port that is not a number, or out of range, would only fail when the run connects
    except ValueError as e:  # "http://[::1:8000" (an unclosed bracket), a bad port
        raise ConfigError(f"vllm.url: {e}, got {p.url!r}") from None
    if "@" in u.netloc:  # never sent (the key goes in a header), and not to be echoed in logs
        raise ConfigError("vllm.url: credentials in the URL are not used: put the API key in the environment "
                          "variable named by vllm.api_key_env")
    if not re.match(r"https?://[^/\s]+", p.url):
        raise ConfigError(f"vllm.url: expected http://host:port, got {p.url!r}")
    if any(c.isspace() for c in p.url) or not u.hostname:
        raise ConfigError(f"vllm.url: expected http://host:port, got {p.url!r}")
    if u.path.rstrip("/").endswith("/v1"):  # an OpenAI client's base URL: every path would be /v1/v1/...
        raise ConfigError(f"vllm.url: the server's own URL, without /v1 (prewarm adds it), got {p.url!r}")
    if not 0 < p.timeout_s <= 86400:
        raise ConfigError(f"vllm.timeout_s: must be more than 0 and at most 86400 (a day), got {p.timeout_s}")
    if p.store_wait_s < 0:
        raise ConfigError(f"daemon.store_wait_s: must be >= 0, got {p.store_wait_s}")
    _check_tls(p)
    if not 1 <= p.concurrency <= 256:
        raise ConfigError(f"run.concurrency: must be 1..256, got {p.concurrency}")
    for name, v in (("run.max_tokens_per_s", p.max_tokens_per_s), ("run.retry_backoff_s", p.retry_backoff_s)):
        if v < 0:
            raise ConfigError(f"{name}: must be >= 0, got {v}")
    if p.late_tokens_per_s <= 0:
        raise ConfigError(f"run.late_tokens_per_s: must be > 0, got {p.late_tokens_per_s}")
    if p.retries < 0:
        raise ConfigError(f"run.retries: must be >= 0, got {p.retries}")
    if p.after_deadline not in AFTER_DEADLINE:
        raise ConfigError(f"run.after_deadline: {p.after_deadline!r} is not one of {', '.join(AFTER_DEADLINE)}")
    if p.deadline:
        m = re.fullmatch(r"(\d{1,2}):(\d{2})", p.deadline)
        if m:
            if int(m.group(1)) > 23 or int(m.group(2)) > 59:
                raise ConfigError(f"run.deadline: {p.deadline!r} is not a time of day")
        else:
            if parse_duration(p.deadline, "run.deadline") <= 0:
                raise ConfigError("run.deadline: a duration must be > 0")
    if p.promote and p.ram_budget <= 0:  # the run would refuse to start, every night
        raise ConfigError("promote.ram_budget: must be set (e.g. \"200GiB\") when promote.enabled is true")
    if p.max_run_s <= 0 or p.max_run_s > 86400:
        raise ConfigError(f"run.max_run: must be more than 0 and at most 24h, got {p.max_run_s}s")
    if p.after_deadline == "slow" and p.deadline and ":" not in p.deadline and \
            parse_duration(p.deadline, "run.deadline") >= p.max_run_s:  # a slow run ends at max_run
        raise ConfigError(f"run.deadline: {p.deadline} is not before run.max_run ({p.max_run_s / 3600:g}h), where "
                          "a run with after_deadline = \"slow\" ends: shorten it or raise run.max_run")
    for name, v in (("report.min_coverage", p.min_coverage), ("report.min_ram_coverage", p.min_ram_coverage)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name}: a fraction from 0 to 1, got {v}")


def _check_tls(p: Plan) -> None:
    """Read the daemon's TLS files: one that cannot work would fail every night's run."""
    if p.daemon_tls is None:
        if p.tls_cert or p.tls_key:
            raise ConfigError(f"daemon.{'tls_cert' if p.tls_cert else 'tls_key'}: needs daemon.tls_ca "
                              "(the CA of the daemon's certificate)")
        return
    p.daemon_tls.check({"ca": "daemon.tls_ca", "cert": "daemon.tls_cert", "key": "daemon.tls_key"})


def load(path: str) -> Plan:
    """Read and check a plan file; errors name the file and, where found, the line."""
    data = read_toml(path, "plan")
    try:
        return from_dict(data, os.path.dirname(os.path.abspath(path)), str(path))
    except ConfigError as e:
        line = _locate_plan(path, str(e))
        raise ConfigError(f"{path}:{line}: {e}" if line else f"{path}: {e}") from None


def _locate_plan(path: str, message: str) -> int | None:
    """The line of a tenant's or context's name for messages about them, else config.locate."""
    names = re.findall(r"(?:tenant|context) '([^']+)'", message)
    if not names:
        return locate(path, message)
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    at, found = 0, None
    for n in names:
        pat = re.compile(rf"\s*name\s*=\s*[\"']{re.escape(n)}[\"']")
        for i in range(at, len(lines)):
            if pat.match(lines[i]):
                at, found = i + 1, i + 1
                break
    return found


# ---- reading contexts ---------------------------------------------------------------------

@dataclass
class Prompt:
    """What one request sends: a text or token-id prompt (completions) or chat messages."""
    endpoint: str                 # "/v1/completions" or "/v1/chat/completions"
    body: dict = field(default_factory=dict)   # without model, max_tokens and kv_transfer_params
    files: int = 0


def load_context(ctx: Context) -> Prompt:
    """Read a context's sources into the request it makes; OSError/ValueError when they are bad."""
    if ctx.kind == "text":
        return Prompt("/v1/completions", {"prompt": ctx.text})
    if ctx.kind == "files":
        paths: list[str] = []
        for pattern in ctx.files:
            found = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            found = [p for p in found if os.path.isfile(p)] if glob.has_magic(pattern) else found
            if not found:
                raise ValueError(f"no file matches {pattern}")
            paths += [p for p in found if p not in paths]
        parts = []
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                parts.append(ctx.header.replace("{path}", p) + f.read())
        return Prompt("/v1/completions", {"prompt": ctx.separator.join(parts)}, files=len(paths))
    if ctx.kind == "tokens":
        ids: list[int] = []
        for n, v in _jsonl(ctx.tokens):
            items = v if isinstance(v, list) else [v]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items):
                raise ValueError(f"{ctx.tokens}:{n}: expected a token id or a list of them")
            ids += items
        if not ids:
            raise ValueError(f"{ctx.tokens}: no token ids")
        return Prompt("/v1/completions", {"prompt": ids})
    msgs = []
    for n, v in _jsonl(ctx.messages):
        if not isinstance(v, dict) or not isinstance(v.get("role"), str) or "content" not in v:
            raise ValueError(f"{ctx.messages}:{n}: expected a message {{\"role\": ..., \"content\": ...}}")
        msgs.append(v)
    if not msgs:
        raise ValueError(f"{ctx.messages}: no messages")
    # no generation prompt: the rendered messages stay a prefix of the conversations that
    # continue them, so their chunks are what those requests look up
    body: dict[str, Any] = {"messages": msgs, "add_generation_prompt": False}
    if ctx.tools:
        with open(ctx.tools, encoding="utf-8") as f:
            tools = json.load(f)
        if not isinstance(tools, list):
            raise ValueError(f"{ctx.tools}: expected a JSON list of tool schemas")
        body["tools"] = tools
    return Prompt("/v1/chat/completions", body)


def _jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: {e.msg}") from None
