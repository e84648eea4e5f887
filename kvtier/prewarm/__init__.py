"""``kvtier prewarm PLAN.toml``: compute customers' large, stable contexts at night through
a running vLLM (with the kvtier connector), keep them in kvtier, and report coverage.

    plan     the plan file: customers, their contexts, the server, pace and deadline
    run      sending contexts, skipping resident ones, retries, pace, deadline
    promote  bringing the plan's chunks back into RAM within a budget
    state    what each context stored last time (resumable, idempotent runs)
    report   coverage per customer: table, JSON, progress

docs/prewarm.md is the operator's guide.
"""
from __future__ import annotations

from .plan import Plan, load
from .run import run_plan

__all__ = ["Plan", "load", "run_plan"]
