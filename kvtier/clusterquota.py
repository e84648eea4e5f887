"""Per-tenant Redis quotas, accounted in Redis/Valkey itself so every daemon sharing it agrees.

A tenant (the group that owns a namespace, ``kvtier.auth``) over its
``redis_quota`` evicts its own least recently written or read blocks, never
another tenant's. The accounting lives next to the blocks, under one hash tag
per tenant (one slot, so one master in Cluster mode)::

    <prefix>:tenant:{<tenant>}:lru    sorted set  block name -> last write or read, microseconds
    <prefix>:tenant:{<tenant>}:size   hash        block name -> bytes stored (all its values)
    <prefix>:tenant:{<tenant>}:exp    sorted set  block name -> expiry, ms (blocks with a TTL)
    <prefix>:tenant:{<tenant>}:used   string      the sum of :size
    <prefix>:tenant:{<tenant>}:seq    string      reservations made: each one's place in their order

Writes: before a block is written, one Lua script on that master (atomic, so
two daemons writing for one tenant see one quota) forgets blocks past their
expiry (Redis removed them), replaces the block's old size by the new one and,
while the tenant would be over its quota, takes its least recently used blocks
out of the accounting and returns them. The writer unlinks those (on whichever
masters hold them; an unlink its server refuses now is made once it answers),
then writes. A victim the same daemon has reserved and not written yet (an
earlier block of the same batch: all of a batch is reserved before any of it
is written; or another writer task's) is not written, or unlinked once its
write ends. Each reservation returns its place in the tenant's order of reservations (:seq):
replies from several connections may reach the writer tasks in another order than the script
ran in, and only the order tells a reservation that gave up a block reserved before it (that
block is not written, or unlinked) from one that gave up the value a later reservation of the
same block replaces (that block is written, and stays). A block larger than the whole quota is
refused (``quota_refused``); so is any write whose accounting call failed.
Deletes and corrupt records leave the accounting through a second script;
reads refresh their blocks' recency (``ZADD XX``) off the read path.

Drift, and why the quota still bounds: a block that vanished another way
(maxmemory, an operator, FLUSHALL) stays accounted until its turn to be
evicted comes (unlinking a missing key frees nothing and costs nothing); a
write that fails after its script stays accounted the same way. Both count too
much, never too little. The one undercount: a block one daemon evicts while
another daemon rewrites it can survive unaccounted until its TTL or its next
write or delete. Sizes are value bytes; Redis's own per-key overhead is not counted.
A counter reset (FLUSHALL, a restart from an older snapshot) cannot make a daemon keep a block
the quota gave up: places in the order never go below the writer's clock (microseconds). A
namespace a reload moved to another tenant leaves the old tenant's accounting when its turn to
be evicted comes, and stays (``ClusterTier._doom``).

Every tenant is accounted, with a quota or not, so a quota added by a reload
starts from true usage; namespaces no tenant owns (no tenants file) are not.

Slots that move: the scripts (and the recency refresh) follow MOVED and ASK to
the master the reply names, as reads and writes do, and a script refused with
TRYAGAIN (the slot migrating, some of its keys moved and some not) is sent
again a few times, milliseconds apart (``clusterconn.TRYAGAIN_WAITS``), since
a reshard moves a slot's keys a few at a time. Redis counts a key that does not
exist as not on the migrating side, so :lru, :size and :exp always hold an
entry named "" (inf, 0 bytes, inf: never evicted, never expired) that keeps
them in existence: else a tenant with no block with a TTL (no :exp) could not
write for as long as the migration lasts.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable, Sequence

from .clusterconn import Servers

log = logging.getLogger("kvtier.cluster")

# The entries named '' that keep lru, size and exp in existence (see "Slots that move" above).
KEPT = b"""
local function kept()
  redis.call('ZADD', KEYS[1], 'inf', '')
  redis.call('HSET', KEYS[2], '', 0)
  redis.call('ZADD', KEYS[3], 'inf', '')
end
"""

# KEYS: lru, size, exp, used, seq. ARGV: name ("" = only trim), size, now ms, expires ms (0 = none), quota
# (0 = none), recency (now in microseconds: writes a millisecond apart must not tie in the LRU order).
# Returns {1, used, seq, victim names...} or {0, used, seq} when the block alone is larger than the quota;
# seq orders the tenant's reservations (the order the script ran in, whatever order the replies arrive in);
# it is at least the recency, so it stays above every place given out before a reset of the counter
# (FLUSHALL, a restart without persistence or from an older snapshot, a failover to a replica that
# lagged): daemons remember places given out (_doom), and a smaller one would keep a block it gave up.
RESERVE = KEPT + b"""
local seq = redis.call('INCR', KEYS[5])
if seq < tonumber(ARGV[6]) then
  seq = tonumber(ARGV[6])
  redis.call('SET', KEYS[5], ARGV[6])
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
local function forget(n)
  local s = redis.call('HGET', KEYS[2], n)
  if s then
    used = used - tonumber(s)
    redis.call('HDEL', KEYS[2], n)
  end
  redis.call('ZREM', KEYS[1], n)
  redis.call('ZREM', KEYS[3], n)
end
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[3], 'LIMIT', 0, 1024)) do
  forget(n)
end
local name, size, quota = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
if name ~= '' and quota > 0 and size > quota then
  redis.call('SET', KEYS[4], used)
  kept()
  return {0, used, seq}
end
if name ~= '' then forget(name) end
local out = {1, 0, seq}
if quota > 0 then
  while used + size > quota do
    local lru = redis.call('ZRANGE', KEYS[1], 0, 0)
    if #lru == 0 or lru[1] == '' then
      used = 0
      break
    end
    forget(lru[1])
    out[#out + 1] = lru[1]
  end
end
if name ~= '' then
  redis.call('HSET', KEYS[2], name, size)
  redis.call('ZADD', KEYS[1], ARGV[6], name)
  if ARGV[4] ~= '0' then redis.call('ZADD', KEYS[3], ARGV[4], name) end
  used = used + size
end
if used < 0 then used = 0 end
redis.call('SET', KEYS[4], used)
kept()
out[2] = used
return out
"""

# KEYS: lru, size, exp, used. ARGV: block names. Returns used.
RELEASE = KEPT + b"""
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
for i = 1, #ARGV do
  local s = redis.call('HGET', KEYS[2], ARGV[i])
  if s then
    used = used - tonumber(s)
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
end
if used < 0 then used = 0 end
redis.call('SET', KEYS[4], used)
kept()
return used
"""

_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def _tenant_base(prefix: bytes, tenant: str) -> bytes:
    tag = tenant if _SAFE.fullmatch(tenant) else "x" + tenant.encode().hex()
    return b"%s:tenant:{%s}:" % (prefix, tag.encode())


def tenant_keys(prefix: bytes, tenant: str) -> tuple[bytes, bytes, bytes, bytes]:
    """The accounting keys of a tenant (lru, size, exp, used); a name that could break the hash tag
    is hex-encoded."""
    base = _tenant_base(prefix, tenant)
    return base + b"lru", base + b"size", base + b"exp", base + b"used"


def seq_key(prefix: bytes, tenant: str) -> bytes:
    """The counter that orders a tenant's reservations (same hash tag as its accounting)."""
    return _tenant_base(prefix, tenant) + b"seq"


class Accounts:
    """The cluster tier's per-tenant accounting; inert until set_tenants() names a group_of."""

    def __init__(self, servers: Servers, prefix: bytes, stats):
        self.servers, self.prefix, self.stats = servers, prefix, stats
        self.group_of: Callable[[str], str] = lambda ns: ""
        self.quotas: dict[str, int] = {}
        self.used: dict[str, int] = {}    # bytes per tenant, as the last script run here saw them
        self._tasks: set[asyncio.Task] = set()  # recency refreshes under way (touch_soon)
        self._closed = False

    def set_tenants(self, group_of: Callable[[str], str], quotas: dict[str, int]) -> None:
        self.group_of, self.quotas = group_of, dict(quotas)

    async def _eval(self, tenant: str, script: bytes, args: Sequence, keys: tuple = ()) -> object:
        """Run a script on the tenant's master (KEYS: its accounting keys, then keys), following
        its slot while it migrates (Servers.command); None when it failed (counted, never raised)."""
        keys = tenant_keys(self.prefix, tenant) + tuple(keys)
        return await self.servers.command(keys[0], (b"EVAL", script, len(keys), *keys, *args))

    async def reserve(self, tenant: str, name: bytes, size: int,
                      expires_ms: int) -> tuple[bool, list[bytes], int] | None:
        """Account a block about to be written: (allowed, blocks to evict first, the reservation's
        place in the tenant's order of reservations), or None when the accounting could not be
        reached (the write must not happen). It returns with no await since the script answered."""
        now_us = time.time_ns() // 1000
        r = await self._eval(tenant, RESERVE, (name, size, now_us // 1000, expires_ms, self.quotas.get(tenant, 0),
                                               now_us), (seq_key(self.prefix, tenant),))
        if not isinstance(r, list) or len(r) < 3:
            return None
        self.used[tenant] = int(r[1])
        if not r[0]:
            self.stats.quota_refused += 1
            self.servers.warn(f"quota-{tenant}", f"cluster: tenant {tenant}: a block of {size} bytes is larger than "
                                                 f"its redis quota of {self.quotas.get(tenant, 0)} bytes; not written")
            return False, [], int(r[2])
        return True, list(r[3:]), int(r[2])

    async def trim(self, tenant: str) -> tuple[list[bytes], int]:
        """Blocks to evict so the tenant fits its (possibly lowered) quota, and the trim's place in
        the order of reservations (0: the accounting could not be reached)."""
        res = await self.reserve(tenant, b"", 0, 0)
        return (res[1], res[2]) if res else ([], 0)

    async def release(self, tenant: str, names: Sequence[bytes]) -> None:
        """Blocks deleted (or found corrupt): out of the accounting."""
        if names:
            r = await self._eval(tenant, RELEASE, tuple(names))
            if isinstance(r, int):
                self.used[tenant] = r

    def touch_soon(self, tenant: str, names: Sequence[bytes]) -> None:
        """Blocks just read are recently used: refresh their rank in the background (not once
        closing: close() ends the refreshes under way)."""
        if names and not self._closed:
            t = asyncio.ensure_future(self._touch(tenant, list(names)))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Before the connections close: cancel the recency refreshes under way (a refresh is a
        hint, losing one costs a block's place in the LRU order only), so none runs on closed
        connections, logs a server down after the tier closed, or outlives the tier."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _touch(self, tenant: str, names: list[bytes]) -> None:
        lru = tenant_keys(self.prefix, tenant)[0]
        now = time.time_ns() // 1000  # recency in microseconds, as RESERVE writes it
        await self.servers.command(lru, (b"ZADD", lru, b"XX") + tuple(x for n in names for x in (now, n)))

    def snapshot(self) -> dict:
        return {"used": dict(self.used), "quotas": dict(self.quotas)}
