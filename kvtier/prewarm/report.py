"""What a prewarm run reports: per context, per customer, as a table or JSON.

Coverage is measured where requests will find it: the prompt's whole chunks, in order, as the
daemon holds them now. A chunk counts only if every chunk before it is present (a lookup
stops at the first gap) and every rank's key of it is present; it counts for the slowest tier
any of its rank keys is on. The denominator is the prompt's whole chunks (the tail shorter
than a chunk is never stored, by design). A context that failed or was not run covers
nothing, and a customer with one has no full coverage.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Sequence

from ..config import format_size

TIER_NAMES = {1: "ram", 2: "nvme", 3: "redis"}
STATUSES = ("stored", "resident", "failed", "not run")


@dataclass
class ContextResult:
    tenant: str
    name: str
    status: str = "not run"       # one of STATUSES
    tokens: int = 0               # prompt tokens (0 when never computed)
    chunk_size: int = 0
    stored_chunks: int = 0        # chunks this run stored
    loaded_tokens: int = 0        # tokens vLLM loaded from kvtier while computing it
    coverage: dict[str, int] = field(default_factory=lambda: {"ram": 0, "nvme": 0, "redis": 0})
    promoted_chunks: int = 0
    unpinned_chunks: int = 0      # chunks in RAM the daemon did not pin (its ram.max_pinned share full)
    not_promoted: str = ""        # why the promote phase left chunks of it out of RAM
    seconds: float = 0.0
    attempts: int = 0
    error: str = ""
    namespace: str = ""
    started: float = 0.0          # monotonic; for the customer's wall time
    ended: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def cacheable(self) -> int:
        return self.tokens // self.chunk_size * self.chunk_size if self.chunk_size else 0

    @property
    def covered(self) -> int:
        return sum(self.coverage.values())


def coverage(tiers: Sequence[int], ranks: int, chunk_size: int, tokens: int) -> dict[str, int]:
    """Tokens of the present chunk prefix per tier (see the module docstring)."""
    out = {"ram": 0, "nvme": 0, "redis": 0}
    ranks = max(1, ranks)
    for c in range(tokens // chunk_size if chunk_size else 0):
        t = tiers[c * ranks:(c + 1) * ranks]
        if len(t) < ranks or not all(t):
            break
        out[TIER_NAMES.get(max(t), "redis")] += chunk_size
    return out


@dataclass
class TenantReport:
    name: str
    contexts: list[ContextResult]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.contexts)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.contexts)

    @property
    def cacheable(self) -> int:
        return sum(c.cacheable for c in self.contexts)

    def fraction(self, tier: str | None = None) -> float:
        """Covered share of the cacheable tokens (tier None: any tier); 0 with a context that
        failed or did not run, since its size is unknown or its chunks absent."""
        n = self.cacheable
        got = sum(c.coverage[tier] if tier else c.covered for c in self.contexts)
        if not n:
            return 0.0 if self.incomplete else 1.0
        return got / n

    @property
    def incomplete(self) -> bool:
        return any(c.status in ("failed", "not run") for c in self.contexts)

    @property
    def seconds(self) -> float:
        ran = [c for c in self.contexts if c.ended]
        return max(c.ended for c in ran) - min(c.started for c in ran) if ran else 0.0

    def summary(self) -> dict:
        return {
            "tenant": self.name, "contexts": len(self.contexts),
            **{s.replace(" ", "_"): self.count(s) for s in STATUSES},
            "tokens": self.tokens, "cacheable_tokens": self.cacheable,
            "stored_chunks": sum(c.stored_chunks for c in self.contexts),
            "promoted_chunks": sum(c.promoted_chunks for c in self.contexts),
            "unpinned_chunks": sum(c.unpinned_chunks for c in self.contexts),
            "coverage": {"ram": self.fraction("ram"), "nvme": self.fraction("nvme"),
                         "redis": self.fraction("redis"), "total": self.fraction()},
            "seconds": round(self.seconds, 3),
            "failures": [{"context": c.name, "error": c.error} for c in self.contexts if c.status == "failed"],
        }


@dataclass
class Report:
    tenants: list[TenantReport]
    started_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    deadline: str = ""
    late: bool = False            # the run started after its deadline
    stopped_at_deadline: bool = False
    stopped_at_max_run: bool = False   # after_deadline = "slow": the run's end came
    promoted: bool = False
    ram_budget: int = 0
    ram_budget_used: int = 0
    min_coverage: float = 0.0
    min_ram_coverage: float = 0.0

    def under_threshold(self) -> list[str]:
        """Customers whose coverage is under a threshold that is set."""
        out = []
        for t in self.tenants:
            if (self.min_coverage and (t.fraction() < self.min_coverage or t.incomplete)) or \
               (self.min_ram_coverage and (t.fraction("ram") < self.min_ram_coverage or t.incomplete)):
                out.append(t.name)
        return out

    @property
    def nothing_prewarmed(self) -> bool:
        """The plan has contexts and none is stored or resident: every one failed or did not
        run. A night that leaves the morning nothing, whatever the thresholds."""
        done = [c.status in ("stored", "resident") for t in self.tenants for c in t.contexts]
        return bool(done) and not any(done)

    def to_dict(self) -> dict:
        def ctx(c: ContextResult) -> dict:
            d = asdict(c)
            for k in ("started", "ended"):
                d.pop(k)
            d["seconds"] = round(c.seconds, 3)
            d["cacheable_tokens"] = c.cacheable
            return d
        return {
            "started_at": self.started_at, "finished_at": self.finished_at, "deadline": self.deadline,
            "late": self.late, "stopped_at_deadline": self.stopped_at_deadline,
            "stopped_at_max_run": self.stopped_at_max_run, "promoted": self.promoted,
            "ram_budget": self.ram_budget, "ram_budget_used": self.ram_budget_used,
            "min_coverage": self.min_coverage, "min_ram_coverage": self.min_ram_coverage,
            "under_threshold": self.under_threshold(), "nothing_prewarmed": self.nothing_prewarmed,
            "tenants": [{**t.summary(), "context_results": [ctx(c) for c in t.contexts]} for t in self.tenants],
        }

    def write_json(self, out: IO[str]) -> None:
        json.dump(self.to_dict(), out, indent=2)
        out.write("\n")

    def write_table(self, out: IO[str]) -> None:
        cols = ("customer", "contexts", "tokens", "stored", "RAM", "NVMe", "Redis", "total", "time", "failed")
        rows = []
        for t in self.tenants:
            s = t.summary()
            ctx = f"{s['contexts']}"
            if s["resident"]:
                ctx += f" ({s['resident']} resident)"
            cov = [_pct(s["coverage"][k]) for k in ("ram", "nvme", "redis", "total")]
            if t.incomplete:
                cov[-1] += "*"
            rows.append((t.name, ctx, f"{s['tokens']:,}", f"{s['stored_chunks']:,}", *cov,
                         f"{s['seconds']:.1f}s", str(s["failed"] + s["not_run"])))
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out.write(fmt.format(*cols) + "\n")
        for r in rows:
            out.write(fmt.format(*r) + "\n")
        notes = []
        for t in self.tenants:
            for c in t.contexts:
                if c.status == "failed":
                    notes.append(f"  {c.id}: failed after {c.attempts} attempt(s): {c.error}")
                elif c.status == "not run":
                    notes.append(f"  {c.id}: not run ({c.error or 'deadline'})")
                if c.not_promoted:
                    notes.append(f"  {c.id}: not promoted: {c.not_promoted}")
                if c.unpinned_chunks:
                    notes.append(f"  {c.id}: {c.unpinned_chunks} chunk(s) in RAM left unpinned: the daemon's "
                                 f"pinned share (ram.max_pinned) is full; they may be evicted before the morning")
        if any(t.incomplete for t in self.tenants):
            notes.insert(0, "* of the contexts that ran; those below are missing from it")
        if notes:
            out.write("\n" + "\n".join(notes) + "\n")
        if self.late:
            out.write(f"\nstarted after the deadline ({self.deadline})\n")
        elif self.stopped_at_deadline:
            out.write(f"\nstopped at the deadline ({self.deadline})\n")
        if self.stopped_at_max_run:
            out.write("\nstopped at run.max_run after the start (after_deadline = \"slow\")\n")
        if self.promoted:
            out.write(f"\npromoted into RAM: {sum(c.promoted_chunks for t in self.tenants for c in t.contexts)}"
                      f" chunk(s); the plan's blocks take {format_size(self.ram_budget_used)} of a "
                      f"{format_size(self.ram_budget)} RAM budget\n")
        under = self.under_threshold()
        if under:
            out.write(f"\ncoverage under the threshold for: {', '.join(under)}\n")
        if self.nothing_prewarmed:
            out.write("\nnothing was prewarmed: every context failed or did not run\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


class Progress:
    """A one-line bar on a terminal, a line per finished context otherwise (logs, journal)."""

    def __init__(self, total: int, out: IO[str] | None = None, tty: bool | None = None):
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.total, self.done, self.tokens, self.failed = total, 0, 0, 0

    def update(self, r: ContextResult) -> None:
        self.done += 1
        self.tokens += r.tokens
        self.failed += r.status == "failed"
        if self.tty:
            width = 24
            fill = width * self.done // max(1, self.total)
            bar = "#" * fill + "-" * (width - fill)
            fail = f"  {self.failed} failed" if self.failed else ""
            self.out.write(f"\r\033[K[{bar}] {self.done}/{self.total}  {self.tokens:,} tokens{fail}  {r.id}")
            if self.done == self.total:
                self.out.write("\n")
        else:
            what = {"stored": f"stored {r.stored_chunks} chunk(s)", "resident": "already resident",
                    "failed": f"failed: {r.error}", "not run": f"not run ({r.error or 'deadline'})"}[r.status]
            self.out.write(f"prewarm {self.done}/{self.total} {r.id}: {what}, {r.tokens:,} tokens, "
                           f"{r.seconds:.1f}s\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.done < self.total:
            self.out.write("\n")
            self.out.flush()
