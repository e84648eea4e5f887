"""Benchmarks: one script per published claim; each docstring holds its exact command.
``python -m bench`` runs them all and writes docs/bench-results.md, the plots, and every
generated table of README.md and docs/ (``bench.docs``); docs/history/ keeps dated experiments."""

import json
import pathlib


def emit(text: str, saved: dict, args) -> None:
    """Print a report, and write it (--markdown) and every figure behind it (--json) on request."""
    print(text)
    if getattr(args, "json", None):
        pathlib.Path(args.json).write_text(json.dumps(saved, indent=1))
    if getattr(args, "markdown", None):
        pathlib.Path(args.markdown).write_text(text)
