"""Keys and namespaces: validation and the packed-batch encoding of the wire.

A block is addressed by (namespace, key). The key is an opaque digest of one
of the accepted sizes (16 or 32 bytes); the daemon never interprets it. A
namespace is 1-64 characters of ``[a-z0-9_.-]`` starting with a letter or
digit: short enough to print, safe in file names and Redis keys.
"""
from __future__ import annotations

import re
from typing import Sequence

from .errors import BadKey, BadNamespace

KEY_SIZES = (16, 32)
NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
CHECKSUM_SIZE = 16
ZERO_CHECKSUM = bytes(CHECKSUM_SIZE)


def check_namespace(ns: str) -> str:
    if not isinstance(ns, str) or NAMESPACE_RE.fullmatch(ns) is None:
        raise BadNamespace(
            f"invalid namespace {ns!r}: use 1-64 characters of [a-z0-9_.-], starting with a letter or digit"
        )
    return ns


def check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) not in KEY_SIZES:
        n = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise BadKey(f"key must be {' or '.join(map(str, KEY_SIZES))} bytes, got {n}")
    return bytes(key)


def unpack_keys(packed: bytes, key_size: int, max_batch: int) -> list[bytes]:
    """Split a packed batch into keys, validating sizes and count."""
    if key_size not in KEY_SIZES:
        raise BadKey(f"key_size must be {' or '.join(map(str, KEY_SIZES))}, got {key_size}")
    if not packed or len(packed) % key_size:
        raise BadKey(f"keys must be a non-empty multiple of key_size={key_size} bytes, got {len(packed)}")
    n = len(packed) // key_size
    if n > max_batch:
        raise BadKey(f"batch of {n} keys exceeds max_batch={max_batch}")
    return [packed[i:i + key_size] for i in range(0, len(packed), key_size)]


def pack_keys(keys: Sequence[bytes]) -> tuple[bytes, int]:
    """Join keys of one size for the wire; returns (packed, key_size). One join and one length
    check for the whole batch; the slow per-key walk runs only to name a bad key."""
    if not keys:
        raise BadKey("empty batch")
    size = len(keys[0])
    try:
        packed = b"".join(keys)
    except TypeError:
        packed = None
    if size not in KEY_SIZES or packed is None or len(packed) != size * len(keys):
        for k in keys:
            check_key(k)
            if len(k) != size:
                raise BadKey("all keys of a batch must have the same size")
    return packed, size
