"""kvtier's vLLM connector (``kv_connector_module_path: "kvtier.vllm"``).

Importing this package is cheap: it imports neither torch nor vLLM. ``KVTierConnector`` is
loaded on first access, which vLLM does after importing itself.

Supported vLLM versions are listed in ``SUPPORTED_VLLM`` (and SUPPORTED.md beside this file);
tests/test_vllm_e2e.py checks the installed one against it.
"""
from __future__ import annotations

import re

# Versions the connector is tested with: exact versions or "X.Y.*" for every patch release.
SUPPORTED_VLLM = ("0.32.0", "0.33.*")

__all__ = ["KVTierConnector", "SUPPORTED_VLLM", "is_supported"]


def is_supported(version: str) -> bool:
    """Is this vLLM version (e.g. "0.32.0", "0.32.0+cpu") one the connector supports?"""
    base = re.split(r"[+]", version, maxsplit=1)[0]
    for v in SUPPORTED_VLLM:
        if v.endswith(".*"):
            if base.startswith(v[:-1]) and re.fullmatch(r"\d+", base[len(v) - 1:].split(".")[0] or "x"):
                return True
        elif base == v:
            return True
    return False


def __getattr__(name: str):
    if name == "KVTierConnector":
        from .connector import KVTierConnector
        return KVTierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
