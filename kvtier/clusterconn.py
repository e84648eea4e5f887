"""The servers behind the cluster tier: where each key lives, connections to them, and failure.

``Servers`` knows one server (standalone) or the masters of a Redis/Valkey
Cluster and the slot map that routes keys to them (CLUSTER SLOTS, CRC16 of the
hash tag, as redis-py computes it). Each server has up to ``connections``
pipelined connections (``kvtier.resp``), opened lazily, authenticated (AUTH,
ACL user) and optionally over TLS.

Failure model: any trouble on a server (refused, reset, TLS or AUTH failure,
an error reply that is not about one key, a call that received nothing from
it for ``timeout_ms``, three lookups in a row cut at ``lookup_timeout_ms``
with nothing received) marks it down: its connections are cut (so no late
reply lands in a buffer a caller has reused), calls routed to it fail at once
(``Unavailable``) and a maintenance task reconnects with backoff (0.1 s when
it goes down, doubling at each failed probe up to ``reconnect_max_s``; the
other calls that fail in the same outage change nothing; every server's
probe runs on its own, so one that answers nothing delays no other's
recovery), logging once when it goes down and once when it is back. A call
that lends the caller's memory and is cancelled disowns its own requests
(``kvtier.resp.Lending``): their replies are read aside, other calls on the
same connections go on, and the server stays up. A connection this process
dropped itself (``resp.Aborted``) is never a failure of its server.
In Cluster mode a down master, MOVED or CLUSTERDOWN reloads the slot map
from any node that answers, which is how failovers and reshards are followed.
Nothing here raises to the tier's callers: ``on()`` turns trouble into False.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import ssl
import time
from typing import Sequence

from redis.connection import parse_url
from redis.crc import key_slot

from .config import ClusterConfig
from .errors import ConfigError
from .resp import Aborted, Connection, Lending, ReplyError

log = logging.getLogger("kvtier.cluster")

SLOTS = 16384
DEPTH = 4               # requests in flight per connection in fanout()
# Measured with bench/cluster.py (2 MiB blocks): 4 MiB socket buffers beat the kernel's autotuning.
SOCK_BUF = 4 << 20      # SO_SNDBUF/SO_RCVBUF of each connection (the kernel caps it at net.core.*mem_max)
NET_ERRORS = (OSError, TimeoutError, ReplyError, EOFError)
LOOKUP_CUTS = 3         # lookups in a row cut with nothing received that mark a server down
CUT_SLACK = 0.005       # a lookup cancelled this close to its deadline (by its caller's) counts as cut
# A command on several keys of a slot that migrates is refused (TRYAGAIN) while its keys are on
# both sides; a reshard moves a slot's keys a few at a time (MIGRATE ... KEYS), milliseconds
# apart. It is sent again after each of these waits (seconds), then fails.
TRYAGAIN_WAITS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)


# the servers redirects (MOVED/ASK) are being followed to inside an on(), a list per on(): when
# its time runs out while they keep it waiting, they are the slow ones, not the server that
# answered with the redirect (a list shared with the tasks its work starts)
_following: contextvars.ContextVar = contextvars.ContextVar("kvtier_cluster_following", default=None)


class Unavailable(Exception):
    """The server is marked down (or no server holds the key's slot): fail at once."""


class Node:
    __slots__ = ("host", "port", "conns", "opening", "up", "down_until", "backoff", "reason", "seen_up", "probe",
                 "cuts")

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conns: list[Connection] = []
        self.opening: asyncio.Task | None = None
        self.up = False
        self.seen_up = False
        self.down_until = 0.0
        self.backoff = 0.0
        self.reason = ""
        self.probe: asyncio.Task | None = None  # the maintenance task's PING in flight
        self.cuts = 0                            # lookups cut in a row with nothing received

    def last_read(self) -> float:
        """When any of its connections last received bytes (0.0: never)."""
        return max((c.last_read for c in self.conns), default=0.0)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def live(self) -> list[Connection]:
        return [c for c in self.conns if not c.closed]

    def cut(self) -> None:
        for c in self.conns:
            c.abort()
        self.conns = []


def target(cfg: ClusterConfig) -> dict:
    """Host, port, TLS, credentials and database from cluster.url (and the explicit settings)."""
    scheme, sep, rest = cfg.url.partition("://")
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme.lower(), scheme.lower())
    try:
        kw = parse_url(f"{scheme}{sep}{rest}")
    except ValueError as e:
        raise ConfigError(f"cluster.url: {e}") from None
    if "host" not in kw:
        raise ConfigError("cluster.url: a host is required")
    return {"host": kw["host"], "port": int(kw.get("port") or 6379), "tls": scheme == "rediss",
            "username": cfg.username or kw.get("username") or "",
            "password": _password(cfg) or kw.get("password") or "", "db": int(kw.get("db") or 0)}


def _password(cfg: ClusterConfig) -> str:
    """cluster.password, or the first line of cluster.password_file (a file written by echo ends
    in a newline that is not part of the password)."""
    if not cfg.password_file:
        return cfg.password
    try:
        with open(cfg.password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cluster.password_file: cannot read {cfg.password_file}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    if not password:
        raise ConfigError(f"cluster.password_file: {cfg.password_file} holds no password (its first line is empty)")
    return password


def ssl_context(cfg: ClusterConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca or None)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cluster TLS settings: {e}") from None
    return ctx


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # awaited by whoever needs it; a background top-up may fail unobserved


class Servers:
    def __init__(self, cfg: ClusterConfig, stats):
        t = target(cfg)
        self.cfg, self.stats = cfg, stats
        self.cluster_mode = cfg.cluster
        self.host, self.port = t["host"], t["port"]
        self.auth = {"username": t["username"], "password": t["password"], "db": 0 if cfg.cluster else t["db"]}
        self.ssl = ssl_context(cfg) if t["tls"] else None
        self.seeds = [(t["host"], t["port"])] + [(s.rpartition(":")[0].strip("[]"), int(s.rpartition(":")[2]))
                                                 for s in cfg.seeds]
        self.timeout = cfg.timeout_ms / 1000
        self.connect_timeout = cfg.connect_timeout_ms / 1000
        self.backoff_max = cfg.reconnect_max_s
        self.nodes: dict[tuple[str, int], Node] = {}
        self.slots: list[Node | None] = []
        self.want_refresh = cfg.cluster
        self._topo_backoff = 0.0
        self._topo_until = 0.0
        self._refreshing: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._quiet: dict[str, float] = {}
        self._probes: set[asyncio.Task] = set()  # PINGs of the maintenance task in flight
        self.shut = False
        if not cfg.cluster:
            self.single = self.node(self.host, self.port)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._kick = asyncio.Event()
        self._task = asyncio.create_task(self._maintain(), name="kvtier-cluster-maintain")

    async def close(self) -> None:
        self.shut = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        probes = list(self._probes)
        for t in probes:
            t.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for node in self.nodes.values():
            node.cut()

    def connected(self) -> bool:
        routed = bool(self.slots) and all(n is not None for n in self.slots) if self.cluster_mode else True
        return routed and bool(self.nodes) and all(n.up for n in self.nodes.values())

    def describe(self) -> list[dict]:
        return [{"address": n.addr, "up": n.up, "connections": len(n.live()), "down_reason": n.reason}
                for n in self.nodes.values()]

    # ---- routing -----------------------------------------------------------------------------

    def node(self, host: str, port: int) -> Node:
        node = self.nodes.get((host, port))
        if node is None:
            node = self.nodes[(host, port)] = Node(host, port)
        return node

    async def group(self, names: Sequence[bytes]) -> dict[Node, list[int]]:
        """Key indexes by the server that holds them; keys with no known server are left out."""
        if not self.cluster_mode:
            return {self.single: list(range(len(names)))}
        if not self.slots:
            await self._ensure_topology()
        groups: dict[Node, list[int]] = {}
        slots = self.slots
        for i, name in enumerate(names):
            node = slots[key_slot(name)] if slots else None
            if node is not None:
                groups.setdefault(node, []).append(i)
        if sum(len(v) for v in groups.values()) < len(names):
            self.stats.unavailable += 1
        return groups

    # ---- connections and failure ---------------------------------------------------------------

    async def conns(self, node: Node, probe: bool = False) -> list[Connection]:
        """The server's live connections, opening them if none. Unavailable while it is down: from
        the failure that marked it until a probe (probe=True, the maintenance task's PING, at most
        once per backoff step) gets an answer. A server that accepts connections and answers
        nothing (stopped, swapping) thus costs callers one timeout, not one per backoff step."""
        if node.reason and not probe or node.down_until > time.monotonic():
            raise Unavailable(node.addr)
        live = node.live()
        if len(live) < self.cfg.connections:
            if node.opening is None or node.opening.done():
                node.opening = asyncio.ensure_future(self._open(node, self.cfg.connections - len(live)))
                node.opening.add_done_callback(_retrieved)
            if not live:
                await asyncio.shield(node.opening)
                live = node.live()
                if not live:
                    raise ConnectionError(f"no connection to {node.addr}")
        return live

    async def _open(self, node: Node, n: int) -> None:
        res = await asyncio.gather(*(Connection.open(node.host, node.port, ssl=self.ssl,
                                                     server_hostname=self.cfg.tls_server_name or None,
                                                     timeout=self.connect_timeout, sock_buf=SOCK_BUF, **self.auth)
                                     for _ in range(n)), return_exceptions=True)
        ok = [c for c in res if isinstance(c, Connection)]
        if self.shut:
            for c in ok:
                c.abort()
            return
        node.conns = node.live() + ok
        if not node.conns:
            raise next(e for e in res if isinstance(e, BaseException))  # the caller's on() marks the node
        # not up yet: a stopped server's kernel still completes the handshake; an answer (on()) marks it up

    def _succeeded(self, node: Node) -> None:
        if not node.up:
            if node.seen_up:
                self.stats.reconnects += 1
                log.warning("cluster: %s is back", node.addr)
            else:
                log.info("cluster: connected to %s", node.addr)
            node.up = node.seen_up = True
        node.backoff = 0.0
        node.down_until = 0.0
        node.reason = ""
        node.cuts = 0

    def failed(self, node: Node, exc: BaseException, probe: bool = False) -> None:
        """Mark a server down: cut its connections, retry it after the next backoff step. The
        backoff steps when an outage starts and at each failed probe (probe=True, the maintenance
        task's PING); any other call failing on a server already down changes nothing: one outage
        met by many calls at once is one step, not one per call."""
        if node.reason and not probe:
            return
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if node.up or not node.reason:
            log.warning("cluster: %s unavailable (%s); serving from local tiers, retrying with backoff",
                        node.addr, reason)
        node.up = False
        node.cuts = 0
        node.reason = reason
        node.backoff = min(max(0.1, node.backoff * 2), self.backoff_max)
        node.down_until = time.monotonic() + node.backoff
        node.cut()
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self.cluster_mode:
            self.want_refresh = True
        if self._kick is not None:
            self._kick.set()

    def reply_error(self, err: ReplyError) -> None:
        """An error reply about one key: count it (a redirect as ``moved``, any other as one of
        ``errors``); reload the slot map when it says so."""
        if err.redirect is not None:
            self.stats.moved += 1
        else:
            self.stats.errors += 1
        if err.code in ("MOVED", "CLUSTERDOWN", "TRYAGAIN"):  # not ASK: the slot map stays until the move ends
            self._refresh_soon()
        elif err.code == "OOM":
            self.warn("OOM", f"cluster: writes refused, the server is out of memory ({err}): blocks stay in "
                             "local tiers only and are not retried; raise its maxmemory or give it an eviction "
                             "policy (maxmemory-policy allkeys-lru)")
        else:
            self.warn(err.code, f"cluster: server replied {err}")

    async def redirected(self, err: ReplyError, cmds: list, sinks: list | None = None, lent: bool = False):
        """The replies to cmds from the server a MOVED or ASK reply names (each after ASKING for
        an ASK, which holds for one command), or None when that server failed (counted, as any
        call). sinks and lent as in request() and on(). One hop: a further redirect is a reply."""
        _, host, port = err.redirect
        node = self.node(host or self.host, port)
        out: list = [None]
        if err.code == "ASK":
            cmds = [c for cmd in cmds for c in ((b"ASKING",), cmd)]
            sinks = None if sinks is None else [s for sink in sinks for s in (None, sink)]

        async def work(node: Node) -> None:
            conns = await self.conns(node)
            c = min(conns, key=lambda c: c.inflight)
            replies = await c.request(cmds, sinks)
            out[0] = replies[1::2] if err.code == "ASK" else replies

        waiting = _following.get()  # the caller's on(): this server keeps it waiting meanwhile
        if waiting is not None:
            waiting.append(node)
        await self.on(node, work, lent)
        if waiting is not None:
            waiting.remove(node)
        return out[0]

    async def command(self, key: bytes, cmd: tuple):
        """One command on the server holding key's slot (all the keys it names are in that slot):
        MOVED and ASK are followed (redirected()), and TRYAGAIN, which leaves the command undone,
        is sent again after each of TRYAGAIN_WAITS. Its reply; None if it failed (counted, as any
        call). It returns with no await since the reply came."""
        for wait in TRYAGAIN_WAITS + (None,):
            groups = await self.group([key])
            if not groups:
                return None
            (node, _), = groups.items()
            out: list = [None]

            async def work(node: Node) -> None:
                conns = await self.conns(node)
                r = (await min(conns, key=lambda c: c.inflight).request([cmd]))[0]
                if isinstance(r, ReplyError) and r.redirect is not None:
                    self.reply_error(r)
                    r = await self.redirected(r, [cmd])
                    r = None if r is None else r[0]
                out[0] = r

            if not await self.on(node, work):
                return None
            r = out[0]
            if not isinstance(r, ReplyError):
                return r
            if r.code != "TRYAGAIN" or wait is None:
                self.reply_error(r)
                return None
            await asyncio.sleep(wait)

    def warn(self, what: str, msg: str) -> None:
        """Log at most once per 10 s for each kind of trouble."""
        now = time.monotonic()
        if self._quiet.get(what, 0.0) <= now:
            self._quiet[what] = now + 10.0
            log.warning("%s", msg)

    async def on(self, node: Node, work, lent: bool = False, *, probe: bool = False, cut_at: float | None = None,
                 cuts: list | None = None) -> bool:
        """Run work(node) against one server. Redis trouble is counted, marks the server down and
        returns False. The call times out when none of the servers it waits on (the node, and
        those it follows redirects to meanwhile) sent any bytes for timeout_ms: a batch that keeps
        receiving may take longer, a server that answers nothing is found out within timeout_ms.

        lent: the call writes into buffers of the caller; however it ends, its requests still
        unanswered are disowned (``Lending``), so none of their replies lands there afterwards.
        probe: the maintenance task's PING (a failure steps the backoff, failed()).
        cut_at: a lookup's deadline (loop time): past it the call stops and returns False, the
        node is appended to cuts, and it is not a failure unless the server sent nothing during
        its last LOOKUP_CUTS cut lookups in a row."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiting: list[Node] = []
        outer = _following.set(waiting)
        lending = Lending().__enter__() if lent else None
        why: list[str] = []       # what ended the call early: "stalled" or "cut"
        timer = asyncio.timeout(None)
        watch: asyncio.TimerHandle | None = None

        def last_read() -> float:
            return max([start, node.last_read()] + [n.last_read() for n in waiting])

        def check() -> None:
            nonlocal watch
            due = last_read() + self.timeout
            if cut_at is not None and cut_at < due:
                due, what = cut_at, "cut"
            else:
                what = "stalled"
            if due <= loop.time() + 0.001:
                why.append(what)
                timer.reschedule(loop.time())
            else:
                watch = loop.call_at(due, check)

        try:
            async with timer:
                watch = loop.call_at(start + self.timeout if cut_at is None else min(cut_at, start + self.timeout),
                                     check)
                await work(node)
            self._succeeded(node)
            return True
        except Unavailable:
            self.stats.unavailable += 1
        except Aborted:  # this process dropped the connection (the server was marked down, or left the map)
            self.stats.unavailable += 1
        except asyncio.CancelledError:
            if cut_at is not None and loop.time() >= cut_at - CUT_SLACK:
                self._cut(node, waiting, start, None)  # its caller's own deadline for the lookup came first
            raise
        except NET_ERRORS as e:
            ours = isinstance(e, TimeoutError) and timer.expired() and bool(why)
            if ours and why[0] == "cut":
                self._cut(node, waiting, start, cuts)
                return False
            self.stats.errors += 1
            if isinstance(e, TimeoutError):
                self.stats.timeouts += 1
                if ours:
                    e = TimeoutError(f"nothing received for {self.cfg.timeout_ms} ms")
            for slow in set(waiting) if ours and waiting else (node,):
                self.failed(slow, e, probe)
        finally:
            if watch is not None:
                watch.cancel()
            if lending is not None:
                lending.__exit__(None, None, None)
            _following.reset(outer)
        return False

    def _cut(self, node: Node, waiting: list[Node], start: float, cuts: list | None) -> None:
        """A lookup cut at its deadline: a server (the one it waited on) that sent nothing
        meanwhile is marked down at its LOOKUP_CUTS-th such lookup in a row."""
        if cuts is not None:
            cuts.append(node)
        for slow in set(waiting) or (node,):
            if slow.last_read() >= start:     # it is answering, only not fast enough
                slow.cuts = 0
                continue
            slow.cuts += 1
            if slow.cuts >= LOOKUP_CUTS:
                self.stats.errors += 1
                self.stats.timeouts += 1
                self.failed(slow, TimeoutError(f"no answer to {LOOKUP_CUTS} lookups in a row within "
                                               f"lookup_timeout_ms = {self.cfg.lookup_timeout_ms} ms"))

    async def run(self, groups: dict[Node, list[int]], fn, lent: bool = False, cut_s: float | None = None) -> int:
        """on() for each server's share of a batch, all servers at once. cut_s: a lookup's deadline
        from now, seconds (on()'s cut_at); returns how many servers' shares it cut."""
        cut_at = None if cut_s is None else asyncio.get_running_loop().time() + cut_s
        cuts: list[Node] = []
        if len(groups) == 1:
            (node, idxs), = groups.items()
            await self.on(node, lambda n: fn(n, idxs), lent, cut_at=cut_at, cuts=cuts)
        elif groups:
            await asyncio.gather(*(self.on(node, lambda n, i=idxs: fn(n, i), lent, cut_at=cut_at, cuts=cuts)
                                   for node, idxs in groups.items()))
        return len(cuts)

    @staticmethod
    async def fanout(conns: list[Connection], cmds: list, weight: int, depth: int = DEPTH) -> list:
        """Spread single-command requests over the connections, at most depth in flight on each;
        replies in the order of cmds. Raises the first failure after every lane stopped."""
        replies: list = [None] * len(cmds)
        conns = sorted(conns, key=lambda c: c.inflight)
        k = min(len(conns), len(cmds))

        async def lane(ci: int) -> None:
            c = conns[ci]
            window: collections.deque = collections.deque()
            for i in range(ci, len(cmds), k):
                window.append((i, c.request([cmds[i]], None, weight)))
                if len(window) >= depth:
                    j, f = window.popleft()
                    replies[j] = (await f)[0]
            while window:
                j, f = window.popleft()
                replies[j] = (await f)[0]

        res = await asyncio.gather(*(lane(ci) for ci in range(k)), return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException):
                raise r
        return replies

    # ---- the slot map (Cluster mode) and maintenance -------------------------------------------

    async def _ensure_topology(self) -> None:
        if self._topo_until > time.monotonic():
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        try:
            await asyncio.wait_for(asyncio.shield(self._refreshing), self.timeout)
        except TimeoutError:
            pass

    async def _refresh(self) -> bool:
        """Reload the slot map from the first node that answers CLUSTER SLOTS."""
        known = sorted(self.nodes.values(), key=lambda n: not n.up)
        candidates = list(dict.fromkeys([(n.host, n.port) for n in known] + self.seeds))
        last: BaseException | None = None
        for host, port in candidates:
            c = None
            try:
                c = await Connection.open(host, port, ssl=self.ssl, server_hostname=self.cfg.tls_server_name or None,
                                          timeout=self.connect_timeout, **self.auth)
                async with asyncio.timeout(self.timeout):
                    reply = (await c.request([(b"CLUSTER", b"SLOTS")]))[0]
                if isinstance(reply, ReplyError):
                    raise reply
                if reply:
                    self._apply_slots(reply, host)
                    self._topo_backoff = self._topo_until = 0.0
                    return True
            except NET_ERRORS as e:
                last = e
            finally:
                if c is not None:
                    c.abort()
        self._topo_backoff = min(max(0.1, self._topo_backoff * 2), self.backoff_max)
        self._topo_until = time.monotonic() + self._topo_backoff
        self.warn("topology", f"cluster: no node answered CLUSTER SLOTS ({last}); retrying with backoff")
        return False

    def _apply_slots(self, reply: list, via_host: str) -> None:
        slots: list[Node | None] = [None] * SLOTS
        masters: set[tuple[str, int]] = set()
        for entry in reply:
            start, end, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if not host or host == "?":
                host = via_host
            node = self.node(host, int(master[1]))
            masters.add((node.host, node.port))
            slots[start:end + 1] = [node] * (end + 1 - start)
        for addr in [a for a in self.nodes if a not in masters]:
            self.nodes.pop(addr).cut()
        changed = [n.addr for n in slots if n is not None] != [n.addr for n in self.slots if n is not None]
        self.slots = slots
        self.want_refresh = any(n is None for n in slots)
        self.stats.topology_refreshes += 1
        if changed:
            log.info("cluster: slot map loaded, masters %s", ", ".join(sorted(f"{h}:{p}" for h, p in masters)))

    async def _maintain(self) -> None:
        """Reconnect failed servers with backoff and keep the slot map current. Each server's probe
        runs on its own, so one that answers nothing (stopped) delays no other's recovery."""
        while not self.shut:
            self._kick.clear()  # a probe that ends from here on wakes the next round
            delay = self.backoff_max
            try:
                if self.cluster_mode and (self.want_refresh or not self.slots):
                    if self._topo_until <= time.monotonic():
                        await self._ensure_topology()
                    delay = min(delay, max(0.05, self._topo_until - time.monotonic()) if self._topo_until else 0.1)
                for node in list(self.nodes.values()):
                    if node.up and node.live() or node.probe is not None and not node.probe.done():
                        continue
                    wait = node.down_until - time.monotonic()
                    if wait > 0:
                        delay = min(delay, wait)
                        continue
                    node.probe = asyncio.ensure_future(self.on(node, self._ping, probe=True))
                    self._probes.add(node.probe)
                    node.probe.add_done_callback(self._probed)
            except Exception:
                log.exception("cluster: maintenance failed")
            try:
                await asyncio.wait_for(self._kick.wait(), delay)
            except TimeoutError:
                pass

    def _probed(self, task: asyncio.Task) -> None:
        self._probes.discard(task)
        self._kick.set()

    async def _ping(self, node: Node) -> None:
        conns = await self.conns(node, probe=True)
        reply = (await conns[0].request([(b"PING",)]))[0]
        if isinstance(reply, ReplyError):
            raise reply
