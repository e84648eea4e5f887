"""The promote phase: bring the plan's chunks back into RAM before the morning.

Chunks the daemon moved to NVMe (RAM eviction, a restart) or that only the cluster tier
(Redis/Valkey) still holds are read back into RAM by an ``Acquire``: the daemon promotes every
hit into an arena slot before leasing it. The lease is released at once; customers whose pin
class is ``ram`` are pinned again (for their ttl), so the chunks stay until the morning.

Order: customers with pin class ``ram`` first, then the others, each in plan order, each
context from its first chunk on (a prefix is what requests can use). The RAM budget counts
the bytes of every chunk of the plan that is in RAM after this phase, those already there
included; the phase stops before a batch would go over it. A daemon that runs out of room
(pinned or leased blocks everywhere) stops the phase too; what was promoted stays.
"""
from __future__ import annotations

import logging

from .. import errors
from ..client import Client
from ..errors import ConfigError
from .plan import Plan
from .report import ContextResult
from .run import pin
from .state import State

log = logging.getLogger("kvtier.prewarm")
BATCH = 64  # chunks per Acquire


def promote_plan(plan: Plan, kv: Client, state: State, results: dict[str, ContextResult],
                 digests: dict[str, str]) -> int:
    """Promote within plan.ram_budget; returns the bytes of the plan's chunks in RAM."""
    check_budget(plan)
    tenants = sorted(plan.tenants, key=lambda t: t.pin != "ram")
    used, size = 0, 0
    for t in tenants:
        for c in t.contexts:
            e = state.get(c.id)
            if e is None or not e.keys or digests.get(c.id) != e.digest:
                continue
            keys = e.key_bytes()
            step = max(e.ranks, BATCH // e.ranks * e.ranks)
            i = 0
            while i < len(keys):
                n = min(step, len(keys) - i)
                if size:
                    fit = (plan.ram_budget - used) // size
                    n = min(n, fit // e.ranks * e.ranks)
                else:
                    n = min(n, e.ranks)  # learn the chunk size from the first one
                if n <= 0:
                    log.info("prewarm: RAM budget reached (%d of %d bytes)", used, plan.ram_budget)
                    return used
                batch = keys[i:i + n]
                try:
                    got, promoted = _acquire(kv, e.namespace, batch)
                except errors.ResourceExhausted as ex:
                    log.warning("prewarm: the daemon has no room to promote more (%s)", ex)
                    return used
                used += sum(got)
                size = max([size, *got])
                results[c.id].promoted_chunks += promoted // max(1, e.ranks)
                if t.pin == "ram":  # this phase's count replaces the first pin's, batch by batch
                    left = pin(kv, e.namespace, batch, t.ttl_s, e.ranks)
                    results[c.id].unpinned_chunks = left + (results[c.id].unpinned_chunks if i else 0)
                if not all(got):
                    break  # a gap: the rest of this context is no use to a prefix lookup
                i += n
    return used


def check_budget(plan: Plan) -> None:
    if plan.ram_budget <= 0:
        raise ConfigError(f"{plan.path or 'plan'}: promote.ram_budget must be set (e.g. \"200GiB\") "
                          "to promote")


def _acquire(kv: Client, ns: str, keys: list[bytes]) -> tuple[list[int], int]:
    """Bytes of each key now in RAM (0 = absent), and how many came up from a lower tier."""
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
