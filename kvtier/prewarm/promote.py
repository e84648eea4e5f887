"""The promote phase: bring the plan's chunks back into RAM before the morning.

Chunks the daemon moved to NVMe (RAM eviction, a restart) or that only the cluster tier
(Redis/Valkey) still holds are read back into RAM by an ``Acquire``: the daemon promotes every
hit into an arena slot before leasing it. The lease is released at once; customers whose pin
class is ``ram`` are pinned again (for their ttl), so the chunks stay until the morning.

Order: customers with pin class ``ram`` first, then the others, each in plan order, each
context from its first chunk on (a prefix is what requests can use). The RAM budget counts
the bytes of every chunk of the plan that is in RAM after this phase, those already there
included and those contexts share once, and is never exceeded: a context is promoted up to
its first chunk that does not fit, the rest of it is reported as not promoted, and the phase
goes on with the next context.
A chunk's size must be known before it is read: it is recorded (in the state) from a chunk
seen in RAM, or taken from another context of the same engine; a context whose size is not
known yet is not promoted. A daemon that runs out of room (pinned or leased blocks
everywhere) stops the phase; what was promoted stays.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from .. import errors
from ..client import Client
from ..config import format_size
from ..errors import ConfigError
from .plan import Plan, Tenant
from .report import ContextResult
from .run import acquire, chunk_bytes, pin
from .state import Entry, State

log = logging.getLogger("kvtier.prewarm")
BATCH = 64  # keys per Acquire (at least one chunk's)


def promote_plan(plan: Plan, kv: Client, state: State, results: dict[str, ContextResult],
                 digests: dict[str, str]) -> int:
    """Promote within plan.ram_budget; returns the bytes of the plan's chunks in RAM."""
    check_budget(plan)
    budget = _Budget(plan.ram_budget)
    for t in sorted(plan.tenants, key=lambda t: t.pin != "ram"):
        for c in t.contexts:
            e = state.get(c.id)
            if e is None or not e.keys or digests.get(c.id) != e.digest:
                continue
            if not _promote(kv, state, c.id, e, t, results[c.id], budget):
                return budget.used
    return budget.used


@dataclass
class _Budget:
    """The bytes the plan's chunks in RAM take, each key counted once: contexts that share a
    prefix share its chunks."""
    limit: int
    used: int = 0
    counted: set[tuple[str, bytes]] = field(default_factory=set)

    def fit(self, ns: str, keys: list[bytes], ranks: int, chunks: int, size: int) -> tuple[int, int]:
        """How many of the first ``chunks`` chunks fit, and the bytes they add."""
        add = 0
        for c in range(chunks):
            new = any((ns, k) not in self.counted for k in keys[c * ranks:(c + 1) * ranks])
            if new and self.used + add + size > self.limit:
                return c, add
            add += size if new else 0
        return chunks, add

    def count(self, ns: str, keys: list[bytes], lengths: list[int]) -> None:
        for k, n in zip(keys, lengths):
            if n and (ns, k) not in self.counted:
                self.counted.add((ns, k))
                self.used += n


def _promote(kv: Client, state: State, cid: str, e: Entry, t: Tenant, r: ContextResult, budget: _Budget) -> bool:
    """Promote one context's present prefix as far as the budget allows; False when the daemon
    ran out of room."""
    keys, ranks = e.key_bytes(), max(1, e.ranks)
    tiers, _ = kv.lookup(e.namespace, keys)
    chunks = next((c for c in range(len(keys) // ranks) if not all(tiers[c * ranks:(c + 1) * ranks])),
                  len(keys) // ranks)  # a lookup stops at the first gap
    lower = [c for c in range(chunks) if any(x > 1 for x in tiers[c * ranks:(c + 1) * ranks])]
    size = e.chunk_bytes or chunk_bytes(kv, e.namespace, keys, tiers, ranks) or _same_engine(state, e)
    if size != e.chunk_bytes:
        state.put(cid, dataclasses.replace(e, chunk_bytes=size))
    if not size:
        if lower:
            r.not_promoted = "the size of its chunks is not known yet (none was seen in RAM)"
        return True
    fit, add = budget.fit(e.namespace, keys, ranks, chunks, size)
    if lower and lower[-1] >= fit:
        left = max(0, budget.limit - budget.used - add)
        r.not_promoted = (f"chunks {max(fit, lower[0]) + 1} to {chunks} of {len(keys) // ranks} would go over "
                          f"the RAM budget ({format_size(size)} a chunk, {format_size(left)} "
                          f"of {format_size(budget.limit)} left)")
    step = max(1, BATCH // ranks) * ranks
    for i in range(0, fit * ranks, step):
        batch = keys[i:min(i + step, fit * ranks)]
        try:
            got, promoted = acquire(kv, e.namespace, batch)
        except errors.ResourceExhausted as ex:
            log.warning("prewarm: the daemon has no room to promote more (%s)", ex)
            r.not_promoted = f"the daemon has no room left in RAM ({ex})"
            return False
        budget.count(e.namespace, batch, got)
        r.promoted_chunks += promoted // ranks
        if t.pin == "ram":  # this phase's count replaces the first pin's, batch by batch
            r.unpinned_chunks = pin(kv, e.namespace, batch, t.ttl_s, ranks) + (r.unpinned_chunks if i else 0)
        if not all(got):
            break  # a gap: the rest of this context is no use to a prefix lookup
    return True


def _same_engine(state: State, e: Entry) -> int:
    """The chunk size recorded for another context stored by the same engine (namespace,
    model, chunk size, ranks), whose chunks are the same size; 0 if none."""
    same = (e.namespace, e.model, e.chunk_size, e.ranks)
    return next((x.chunk_bytes for x in list(state.entries.values())
                 if x.chunk_bytes and (x.namespace, x.model, x.chunk_size, x.ranks) == same), 0)


def check_budget(plan: Plan) -> None:
    if plan.ram_budget <= 0:
        raise ConfigError(f"{plan.path or 'plan'}: promote.ram_budget must be set (e.g. \"200GiB\") "
                          "to promote")
