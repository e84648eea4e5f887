"""Running a plan: send each context through vLLM so the connector stores its KV, then check
with the daemon what is there.

Per context: read its sources; if the state file has the same request (digest) and the
daemon still holds every key it recorded, skip it (refreshing its pin); otherwise POST it to
vLLM's OpenAI API (``max_tokens: 1``, ``kv_transfer_params.kvtier``: tenant, pin/ttl,
``return_keys``), wait up to ``store_wait_s`` for the returned keys to appear in the daemon
(stores finish after the response), pin them, and record them in the state file.

Pins follow the plan: once the contexts have run, the keys of a context's previous request
(its sources changed), of a context gone from the plan, and of a customer now ``pin = "none"``
are unpinned, except those the plan's pinned contexts hold now (a shared prefix); a customer
whose ``ttl`` changed gets its pins made again (the daemon only ever lengthens a pin).

Pace: at most ``concurrency`` requests in flight and, with ``max_tokens_per_s``, prompt
tokens paced to that rate: each request books an estimate of its tokens before it is sent
(last run's count, else about 4 characters a token), corrected by the count in its answer, so
the rate holds on average with requests in parallel too.
Deadline: no request starts after it; with ``after_deadline = "slow"`` the run goes on one
request at a time at ``late_tokens_per_s`` instead, so a run that is late (or started late)
leaves daytime traffic its GPUs, until ``max_run`` after its start: no request starts after
that, and the run ends with its report, well before the timer's unit would kill it.
Transient errors (connection refused or reset, timeouts, HTTP 408/429/5xx) are retried
``retries`` times with exponential backoff; others fail the context at once. A failed context
never stops the others. ``timeout_s`` bounds a whole request, an answer that trickles in
included. A stop (SIGTERM) ends waits for the pace or a retry at once, leaving their contexts
not run ("interrupted"), not failed; requests in flight finish.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import IO, Any

from .. import errors
from ..client import Client
from ..hot import TIER_RAM
from .plan import Context, Plan, Tenant, load_context
from .report import ContextResult, Progress, Report, TenantReport, coverage
from .state import Entry, State

log = logging.getLogger("kvtier.prewarm")
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)



def pin(kv: Client, ns: str, keys: list[bytes], ttl_s: int, ranks: int) -> int:
    """Pin keys in RAM for ttl_s; the chunks (of ``ranks`` keys each) the daemon left unpinned
    although in RAM: its pinned share (ram.max_pinned) was full. (A key not pinned and not in RAM
    is on a lower tier: not a refusal.)"""
    pinned = kv.pin(ns, keys, ttl_s)
    if all(pinned):
        return 0
    tiers, _ = kv.lookup(ns, keys)
    refused = {i // max(1, ranks) for i, (p, t) in enumerate(zip(pinned, tiers)) if not p and t == TIER_RAM}
    return len(refused)


def acquire(kv: Client, ns: str, keys: list[bytes]) -> tuple[list[int], int]:
    """Bring keys into RAM: the bytes of each now there (0 = absent), and how many came up
    from a lower tier. The lease is released at once."""
    try:
        lease = kv.acquire(ns, keys, lease_ms=30_000, counted=False)  # not traffic: no hits, no misses
    except errors.FailedPrecondition:  # the arena is not mapped here: inline reads promote too
        before, _ = kv.lookup(ns, keys)
        datas = kv.get_many(ns, keys)
        return [len(d) if d is not None else 0 for d in datas], \
            sum(1 for t, d in zip(before, datas) if d is not None and t > 1)
    try:
        return [n if t else 0 for t, n in zip(lease.tiers, lease.lengths)], sum(t > 1 for t in lease.tiers)
    finally:
        try:
            kv.release(lease)
        except errors.UnknownLease:
            pass


def chunk_bytes(kv: Client, ns: str, keys: list[bytes], tiers: list[int], ranks: int) -> int:
    """Bytes of one chunk (every rank's block), read from the first chunk wholly in RAM, which
    an Acquire leaves where it is; 0 when none is. Reading one from a lower tier would bring it
    into RAM, and the promote phase must know the size before that: its budget is a limit."""
    ranks = max(1, ranks)
    for c in range(len(keys) // ranks):
        if all(t == TIER_RAM for t in tiers[c * ranks:(c + 1) * ranks]):
            got, _ = acquire(kv, ns, keys[c * ranks:(c + 1) * ranks])
            return sum(got) if all(got) else 0
    return 0


class Transient(Exception):
    """Worth retrying: the server may answer next time."""


class Permanent(Exception):
    """Retrying would give the same answer."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the API key to wherever it points, and turn
    the POST into a GET without its body."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Watch(threading.local):
    """The request this thread is making: its socket, for the watchdog that ends it at timeout_s."""
    box: dict | None = None


_watch = _Watch()


def _watched(base):
    class Connection(base):
        def connect(self):
            super().connect()
            box = _watch.box
            if box is not None:
                with box["lock"]:
                    box["sock"] = self.sock
                    if box["expired"]:  # the deadline came while it connected
                        self.sock.shutdown(socket.SHUT_RDWR)
    return Connection


class _HTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection), req, context=self._context)


_opener = urllib.request.build_opener(_NoRedirect, _HTTP, _HTTPS)


class OpenAIServer:
    """The few calls prewarm makes to a vLLM OpenAI-compatible server (standard library only)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.url, self.api_key, self.timeout_s = url.rstrip("/"), api_key, timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        # the socket timeout bounds each read; a server that sends a byte now and then would hold
        # the request for ever: a watchdog ends it at timeout_s
        box: dict = {"lock": threading.Lock(), "sock": None, "expired": False}

        def expire():
            with box["lock"]:
                box["expired"] = True
                if box["sock"] is not None:
                    try:
                        box["sock"].shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        watchdog = threading.Timer(self.timeout_s, expire)
        watchdog.daemon = True
        _watch.box = box
        watchdog.start()
        try:
            with _opener.open(req, timeout=self.timeout_s) as r:
                raw = r.read()
            if box["expired"]:
                raise TimeoutError
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                where = urllib.parse.urlsplit(e.headers.get("Location") or "")
                host = where.netloc.rpartition("@")[2]  # no credentials in the message
                raise Permanent(f"HTTP {e.code} from {path}: redirected to {where.scheme}://{host}; set "
                                "vllm.url to the server itself") from None
            detail = e.read()[:300].decode("utf-8", "replace").strip()
            err = Transient if e.code in TRANSIENT_HTTP else Permanent
            raise err(f"HTTP {e.code} from {path}: {detail}") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            if box["expired"]:
                raise Transient(f"{self.url}{path}: no whole answer within vllm.timeout_s "
                                f"({self.timeout_s:g} s)") from None
            raise Transient(f"{self.url}: {getattr(e, 'reason', e) or type(e).__name__}") from None
        finally:
            watchdog.cancel()
            _watch.box = None
        try:
            out = json.loads(raw)
        except ValueError:
            out = None
        if not isinstance(out, dict):
            raise Permanent(f"{path}: the answer is not a JSON object: {raw[:200]!r}")
        return out

    def first_model(self) -> str:
        return self.model("")

    def model(self, wanted: str) -> str:
        """The model to ask for: ``wanted`` if the server serves it (else Permanent), or the first
        it lists. Asked at the start of every run: an unreachable server is Transient here, once,
        not a failure of every context (which would end the run as if all were well)."""
        data = self._call("GET", "/v1/models").get("data") or []
        if not data:
            raise Permanent("the server lists no model")
        ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if not ids or not all(isinstance(i, str) for i in ids):
            # not an OpenAI server's answer (a proxy, another service on the port)
            raise Permanent(f"/v1/models: no model id in the answer: {json.dumps(data)[:200]}; "
                            "set vllm.model, or check vllm.url")
        if wanted and wanted not in ids:
            raise Permanent(f"vllm.model {wanted!r} is not served there (it serves {', '.join(ids[:10])})")
        return wanted or ids[0]

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)


class Pacer:
    """Spaces requests so that prompt tokens average at most ``rate`` per second."""

    def __init__(self, rate: float):
        self.rate = rate
        self.next_at = 0.0
        self._lock = threading.Lock()

    def wait_s(self) -> float:
        with self._lock:
            return max(0.0, self.next_at - time.monotonic()) if self.rate else 0.0

    def spend(self, tokens: int) -> None:
        if self.rate:
            with self._lock:
                self.next_at = max(self.next_at, time.monotonic()) + tokens / self.rate

    def book(self, tokens: int) -> float:
        """Take ``tokens`` (an estimate) now, before sending; seconds to wait first. Booked
        before the answer, so that requests in parallel are spaced too, not only one after
        the other."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(self.next_at, now)
            self.next_at = start + tokens / self.rate
            return start - now

    def correct(self, tokens: int) -> None:
        """The answer's count differs from the booked estimate by ``tokens`` (may be < 0)."""
        if self.rate:
            with self._lock:
                self.next_at += tokens / self.rate


def estimate_tokens(body: dict) -> int:
    """Prompt tokens of a request before the server counts them: exact for token ids, about
    4 characters a token for text."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    text = prompt if isinstance(prompt, str) else json.dumps(body.get("messages") or []) + \
        json.dumps(body.get("tools") or [])
    return max(1, len(text) // 4)


def request_digest(model: str, endpoint: str, body: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model, "endpoint": endpoint, "body": body},
                                     sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def kvtier_params(t: Tenant) -> dict:
    p: dict[str, Any] = {"tenant": t.name, "return_keys": True}
    if t.pin == "ram":
        p.update({"ttl": t.ttl_s} if t.ttl_s else {"pin": True})
    else:
        p["pin"] = False
    return p


class Run:
    def __init__(self, plan: Plan, kv: Client, server: OpenAIServer, state: State,
                 progress: Progress, clock=time.monotonic, now=None, force: bool = False):
        self.plan, self.kv, self.server, self.state, self.progress = plan, kv, server, state, progress
        self.force = force  # send every context, resident or not
        self.clock = clock
        left, self.late = plan.deadline_in(now or dt.datetime.now())
        t0 = clock()
        self.deadline = None if left is None else t0 + left   # on the monotonic clock
        # no request starts after this: the deadline, or max_run after the start for a run that
        # goes on slowly after its deadline
        self.stop_at = self.deadline if plan.after_deadline == "stop" or self.deadline is None \
            else t0 + plan.max_run_s
        self.pacer = Pacer(plan.max_tokens_per_s)
        self.slow_pacer = Pacer(plan.late_tokens_per_s)
        self.slow_lock = threading.Lock()
        self.stopped = ""  # why contexts were left not run: _why_stopped()
        self.cancelled = False  # interrupted: nothing new starts
        self._cancel = threading.Event()  # ends waits for the pace or a retry
        self.model = ""
        self.digests: dict[str, str] = {}
        self._replaced: list[tuple[str, list[str]]] = []  # (namespace, keys) of requests replaced this run
        self._replaced_lock = threading.Lock()

    def cancel(self) -> None:
        self.cancelled = True
        self._cancel.set()

    def past_deadline(self) -> bool:
        return self.late or (self.deadline is not None and self.clock() >= self.deadline)

    def must_stop(self) -> bool:
        return self.cancelled or (self.stop_at is not None and self.clock() >= self.stop_at)

    def _sleep(self, seconds: float) -> bool:
        """Sleep, but not past where the run stops, nor past a stop; False if either came."""
        if self.stop_at is not None and self.clock() + seconds >= self.stop_at:
            self._cancel.wait(max(0.0, self.stop_at - self.clock()))
            return False
        return not self._cancel.wait(seconds)

    # ---- one context --------------------------------------------------------------------

    def context(self, tenant: Tenant, ctx: Context) -> ContextResult:
        r = ContextResult(tenant.name, ctx.name, started=self.clock())
        try:
            self._context(tenant, ctx, r)
        except (Transient, Permanent, OSError, ValueError, errors.KvtierError) as e:
            r.status, r.error = "failed", str(e) or type(e).__name__
        except (KeyError, TypeError, AttributeError) as e:  # an answer without the fields the connector sends
            r.status, r.error = "failed", f"unexpected answer from vLLM: {type(e).__name__}: {e}"
        r.ended = self.clock()
        r.seconds = r.ended - r.started
        return r

    def _context(self, tenant: Tenant, ctx: Context, r: ContextResult) -> None:
        if self.cancelled:
            r.error = "interrupted"
            return
        prompt = load_context(ctx)
        digest = request_digest(self.model, prompt.endpoint, prompt.body)
        self.digests[ctx.id] = digest
        entry = self.state.get(ctx.id)
        if entry is not None and entry.digest == digest and not self.force:
            keys = entry.key_bytes()
            tiers, _ = self.kv.lookup(entry.namespace, keys) if keys else ([], 0)
            if all(tiers):
                pinned = self._pin(tenant, entry.namespace, keys, r, entry.ranks, entry.pinned_ttl_s)
                if pinned is not None and pinned != entry.pinned_ttl_s:  # not pinning: release_stale's
                    self.state.put(ctx.id, dataclasses.replace(entry, pinned_ttl_s=pinned))
                r.status, r.tokens, r.chunk_size, r.namespace = "resident", entry.tokens, entry.chunk_size, \
                    entry.namespace
                return
        if self.must_stop():  # after the deadline only resident contexts are looked at
            self._stopped(r)
            return
        body = {"model": self.model, **prompt.body, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"kvtier": kvtier_params(tenant)}}
        # last time's count when there is one: the same context, most often about the same size
        estimate = entry.tokens if entry is not None and entry.tokens else estimate_tokens(prompt.body)
        resp = self._send(prompt.endpoint, body, r, estimate)
        if resp is None:
            return
        params = resp.get("kv_transfer_params")
        params = params.get("kvtier") if isinstance(params, dict) else None
        tokens = int((resp.get("usage") or {}).get("prompt_tokens") or 0)
        if not isinstance(params, dict) or "keys" not in params:
            raise Permanent("the response has no kv_transfer_params.kvtier.keys: is vLLM running with the "
                            "kvtier connector (a version with return_keys)?")
        keys = [bytes.fromhex(k) for k in params["keys"]]
        ns, cs, ranks = params["namespace"], int(params["chunk_size"]), int(params.get("ranks") or 1)
        self._wait_stored(ns, keys)
        # the connector pinned the keys it stored with the tenant's TTL; others it found stored
        # keep the pins they had: as for a resident context, a different TTL is pinned anew
        pinned = self._pin(tenant, ns, keys, r, ranks, entry.pinned_ttl_s if entry is not None else tenant.ttl_s)
        r.status, r.tokens, r.chunk_size, r.namespace = "stored", tokens, cs, ns
        r.stored_chunks = int(params.get("stored_chunks") or 0)
        r.loaded_tokens = int(params.get("loaded_tokens") or 0)
        if entry is not None and ((entry.namespace, entry.keys) != (ns, list(params["keys"])) or
                                  pinned is None and entry.pinned_ttl_s is not None):
            with self._replaced_lock:  # unpinned once the run is over, but for keys still in use
                self._replaced.append((entry.namespace, entry.keys))
        self.state.put(ctx.id, Entry(digest, ns, cs, ranks, tokens, list(params["keys"]), time.time(),
                                     self.model, pinned))

    def _send(self, endpoint: str, body: dict, r: ContextResult, estimate: int = 0) -> dict | None:
        p = self.plan
        for attempt in range(p.retries + 1):
            if self.must_stop():
                self._stopped(r)
                return None
            slow = self.past_deadline()
            pacer = self.slow_pacer if slow else self.pacer
            lock = self.slow_lock if slow else None
            if lock:
                lock.acquire()
            try:
                # checked again after waiting for the lock and the pace: a stop or the deadline
                # may have come meanwhile
                if self.must_stop() or not self._sleep(pacer.book(estimate)) or self.must_stop():
                    pacer.correct(-estimate)
                    self._stopped(r)
                    return None
                r.attempts += 1
                try:
                    resp = self.server.post(endpoint, body)
                except Transient as e:
                    pacer.correct(-estimate)  # nothing was computed
                    if attempt == p.retries:
                        raise
                    log.info("prewarm %s/%s: %s; retrying", r.tenant, r.name, e)
                    err = e
                except BaseException:
                    pacer.correct(-estimate)
                    raise
                else:
                    pacer.correct(int((resp.get("usage") or {}).get("prompt_tokens") or 0) - estimate)
                    return resp
            finally:
                if lock:
                    lock.release()
            if not self._sleep(min(60.0, p.retry_backoff_s * 2 ** attempt)):
                if self.cancelled:  # a stop, not a failure of the context: the next run sends it
                    self._stopped(r)
                    return None
                raise Transient(f"{err} (no retry: {self._why_stopped()})")
        return None  # pragma: no cover - the loop returns or raises

    def _stopped(self, r: ContextResult) -> None:
        """Leave ``r`` not run, saying why."""
        self.stopped = r.error = self._why_stopped()

    def _why_stopped(self) -> str:
        """Why no request starts now: a stop, the deadline, or the end of a slow run."""
        if self.cancelled:
            return "interrupted"
        if self.plan.after_deadline == "slow":
            return "run.max_run reached"
        return "started after the deadline" if self.late else "deadline"

    def _wait_stored(self, ns: str, keys: list[bytes]) -> None:
        """Stores complete after vLLM answers: wait a little for every key to show up."""
        if not keys:
            return
        until = self.clock() + self.plan.store_wait_s
        delay = 0.02
        while True:
            tiers, _ = self.kv.lookup(ns, keys)
            if all(tiers) or self.clock() >= until:
                return
            time.sleep(delay)
            delay = min(0.5, delay * 2)

    def _pin(self, tenant: Tenant, ns: str, keys: list[bytes], r: ContextResult, ranks: int,
             was: int | None) -> int | None:
        """Pin keys as the tenant asks; ``was``: the TTL they were pinned with (None: not pinned by
        prewarm, or unknown). Returns the TTL they have now (None: not pinned). A pin of another
        TTL is made anew (the daemon only lengthens one); keys of a tenant that no longer pins
        are unpinned by release_stale()."""
        if tenant.pin != "ram" or not keys:
            return None
        if was != tenant.ttl_s:
            self.kv.unpin(ns, keys)
        r.unpinned_chunks = pin(self.kv, ns, keys, tenant.ttl_s, ranks)
        return tenant.ttl_s

    def release_stale(self) -> int:
        """Unpin what the plan no longer pins: keys of requests replaced this run, of contexts
        gone from the plan (their entries are dropped), of tenants now ``pin = "none"``; never
        keys a pinned context of the plan holds now (contexts sharing a prefix share keys).
        Returns the keys unpinned."""
        plan_ids = {c.id: t for t in self.plan.tenants for c in t.contexts}
        wanted: set[tuple[str, str]] = set()
        stale: list[tuple[str, list[str]]] = []
        with self._replaced_lock:
            stale += self._replaced
            self._replaced = []
        gone = []
        for cid, e in list(self.state.entries.items()):
            t = plan_ids.get(cid)
            if t is None:
                gone.append(cid)
                stale.append((e.namespace, e.keys))
            elif t.pin == "ram":
                wanted.update((e.namespace, k) for k in e.keys)
            elif e.pinned_ttl_s is not None:
                stale.append((e.namespace, e.keys))
                self.state.put(cid, dataclasses.replace(e, pinned_ttl_s=None))
        by_ns: dict[str, set[str]] = {}
        for ns, keys in stale:
            by_ns.setdefault(ns, set()).update(k for k in keys if (ns, k) not in wanted)
        n = 0
        for ns, keys in sorted(by_ns.items()):
            if keys:
                self.kv.unpin(ns, [bytes.fromhex(k) for k in sorted(keys)])
                n += len(keys)
        self.state.drop(gone)
        if n:
            log.info("prewarm: unpinned %d keys of contexts changed, removed or no longer pinned", n)
        return n

    # ---- the whole plan -----------------------------------------------------------------

    def prewarm(self) -> dict[str, ContextResult]:
        self.model = self.server.model(self.plan.model)
        jobs = [(t, c) for t in self.plan.tenants for c in t.contexts]
        out: dict[str, ContextResult] = {}
        pool = ThreadPoolExecutor(self.plan.concurrency, thread_name_prefix="kvtier-prewarm")
        try:
            futs = [pool.submit(self.context, t, c) for t, c in jobs]
            for f in as_completed(futs):
                r = f.result()
                out[r.id] = r
                self.progress.update(r)
        except BaseException:  # interrupted: requests in flight finish, nothing new starts
            self.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            try:
                self.release_stale()
            except errors.KvtierError as e:  # the next run finds the gone and the unpinned again
                log.warning("prewarm: could not unpin what the plan no longer pins: %s", e)
            self.save_state()
            self.progress.close()
        return out

    def save_state(self) -> None:
        try:
            self.state.save()
        except OSError as e:  # the report still counts: the work is in the daemon
            log.error("prewarm state %s: cannot write it (%s): the next run sends every context "
                      "again", self.state.path, e)

    def look(self) -> dict[str, ContextResult]:
        """What the daemon holds of each context's recorded request, sending nothing (the
        promote-only run): resident as in a full run, when every key is in some tier."""
        out = {}
        for t in self.plan.tenants:
            for c in t.contexts:
                r = out[c.id] = ContextResult(t.name, c.name)
                e = self.state.get(c.id)
                try:
                    p = load_context(c)
                except (OSError, ValueError) as ex:
                    r.status, r.error = "failed", str(ex)
                    continue
                self.digests[c.id] = request_digest(self.plan.model or (e.model if e else ""), p.endpoint, p.body)
                if e is None or e.digest != self.digests[c.id]:
                    r.error = "not prewarmed yet"
                    continue
                ranks = max(1, e.ranks)
                tiers, _ = self.kv.lookup(e.namespace, e.key_bytes()) if e.keys else ([], 0)
                missing = len({i // ranks for i, t in enumerate(tiers) if not t})
                if missing:
                    r.error = f"{missing} of {len(tiers) // ranks} chunks no longer stored: the next run sends it again"
                else:
                    r.status = "resident"
        return out

    def measure(self, results: dict[str, ContextResult]) -> None:
        """Coverage of every context whose recorded request is the one the plan makes now; the
        size of its chunks recorded once one is seen in RAM."""
        for r in results.values():
            entry = self.state.get(r.id)
            digest = self.digests.get(r.id)
            if entry is None or digest is None or entry.digest != digest:
                continue
            keys = entry.key_bytes()
            tiers, _ = self.kv.lookup(entry.namespace, keys) if keys else ([], 0)
            r.tokens, r.chunk_size, r.namespace = entry.tokens, entry.chunk_size, entry.namespace
            r.coverage = coverage(tiers, entry.ranks, entry.chunk_size, entry.tokens)
            if not entry.chunk_bytes:
                size = chunk_bytes(self.kv, entry.namespace, keys, tiers, entry.ranks)
                if size:
                    self.state.put(r.id, dataclasses.replace(entry, chunk_bytes=size))


def run_plan(plan: Plan, *, promote: bool | None = None, promote_only: bool = False, force: bool = False,
             progress_out: IO[str] | None = None, tty: bool | None = None,
             min_coverage: float | None = None, min_ram_coverage: float | None = None) -> Report:
    """Run a plan (prewarm, then promote if asked) and report. Raises kvtier errors when the
    daemon is unreachable, Transient/Permanent when the vLLM server is."""
    from .promote import check_budget
    promoting = promote_only or (plan.promote if promote is None else promote)
    if promoting:
        check_budget(plan)  # before any work
    problem = State(plan.state).check_writable()
    if problem:  # every night would send every context again, and pins would never be released
        raise errors.ConfigError(f"run.state: {problem}")
    lock = State(plan.state).lock()  # before reading it: another run may be writing it
    try:
        return _run_plan(plan, State.load(plan.state), promoting, promote_only, force, progress_out, tty, min_coverage,
                         min_ram_coverage)
    finally:
        os.close(lock)


def _run_plan(plan: Plan, state: State, promoting: bool, promote_only: bool, force: bool,
              progress_out: IO[str] | None, tty: bool | None, min_coverage: float | None,
              min_ram_coverage: float | None) -> Report:
    from .promote import promote_plan
    server = OpenAIServer(plan.url, os.environ.get(plan.api_key_env) or None, plan.timeout_s)
    rep = Report([], deadline=plan.deadline,
                 min_coverage=plan.min_coverage if min_coverage is None else min_coverage,
                 min_ram_coverage=plan.min_ram_coverage if min_ram_coverage is None else min_ram_coverage)
    jobs = [(t, c) for t in plan.tenants for c in t.contexts]
    with Client(plan.address or None, timeout=max(30.0, plan.store_wait_s), tls=plan.daemon_tls) as kv:
        kv.stats()  # unreachable daemon: fail now, not once per context
        run = Run(plan, kv, server, state, Progress(0 if promote_only else len(jobs), progress_out, tty),
                  force=force)
        rep.late = run.late
        if promote_only:  # no vLLM needed: the model is the plan's or the one recorded
            results = run.look()
        else:
            results = run.prewarm()
            rep.stopped_at_deadline = run.stopped == "deadline"
            rep.stopped_at_max_run = run.stopped == "run.max_run reached"
        if promoting:
            rep.promoted = True
            rep.ram_budget = plan.ram_budget
            rep.ram_budget_used = promote_plan(plan, kv, state, results, run.digests)
        run.measure(results)
        run.save_state()
    rep.tenants = [TenantReport(t.name, [results[c.id] for c in t.contexts]) for t in plan.tenants]
    rep.finished_at = time.time()
    return rep
