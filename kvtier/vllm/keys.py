"""Chunk keys for vLLM KV: vLLM's chained block hashes mixed with a compatibility fingerprint.

Pure Python (hashlib only): the scheduler half, the worker half and the tests derive the
same keys without importing torch or vLLM.

A *chunk* is ``chunk_size`` consecutive tokens (a whole number of vLLM blocks). vLLM's block
hashes are chained (each covers the whole prefix up to its block), so the hash of a chunk's
last block names the chunk and everything before it. A kvtier key is

    scope  = sha256(engine_digest || u32 len(tenant) || tenant || u32 len(salt) || salt)
    key    = sha256(b"kvtier-vllm-chunk\\0" || scope || chunk_hash)          (32 bytes)

where ``engine_digest`` is ``Fingerprint.digest()``: sha256 over the fingerprint's fields
written as ``name=value`` lines in a fixed order. Every field that changes the bytes of a
chunk is in the fingerprint (model and revision, what else changes the weights' numbers under
the same model name: a quantization method or config overrides, the KV encoding (element
type; for a quantized cache also vLLM's cache dtype, e.g. fp8_e4m3 vs fp8_e5m2 that are both
uint8 tensors, and the KV scales), layout, block size, chunk size, TP size and rank, PP size
and rank, the block-hash algorithm, this format's version), so KV
computed by other weights, another layout or another rank is never served: it simply has
other keys. The tenant and the request's cache salt scope keys per request.

Changing anything here changes every key (a cold cache, never wrong KV); the golden vectors
in tests/test_vllm_keys.py make that a conscious act: bump ``FORMAT_VERSION`` with it.

Hash stability: vLLM's ``sha256`` / ``sha256_cbor`` block hashes are seeded with a fixed
value and are stable across processes and nodes. ``xxhash`` / ``xxhash_cbor`` are seeded
randomly per process unless ``PYTHONHASHSEED`` is set, so their hashes never match another
engine's: ``check_hash_stability`` refuses them (a cache nobody can hit) unless the seed is
pinned.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Sequence

FORMAT_VERSION = 1
KEY_SIZE = 32
_KEY_PREFIX = b"kvtier-vllm-chunk\0"

STABLE_HASH_ALGOS = ("sha256", "sha256_cbor")
SEEDED_HASH_ALGOS = ("xxhash", "xxhash_cbor")


class UnstableHashError(ValueError):
    """vLLM's block hashes would differ between processes: no engine could reuse the KV."""


def check_hash_stability(algo: str, env: Mapping[str, str] | None = None) -> str:
    """Return ``algo`` if its block hashes are the same in every process, else raise.

    ``xxhash*`` is accepted only with ``PYTHONHASHSEED`` set (the same value must be set on
    every engine that shares the cache; that part cannot be checked from one process).
    """
    env = os.environ if env is None else env
    if algo in STABLE_HASH_ALGOS:
        return algo
    if algo in SEEDED_HASH_ALGOS:
        if env.get("PYTHONHASHSEED") not in (None, "", "random"):
            return algo
        raise UnstableHashError(
            f"prefix_caching_hash_algo={algo!r} seeds block hashes randomly per process, so no "
            "other engine could ever hit what this one stores: set PYTHONHASHSEED to the same "
            "value on every engine, or use sha256 (vLLM's default)")
    raise UnstableHashError(f"unknown prefix_caching_hash_algo {algo!r}: kvtier knows "
                            f"{', '.join(STABLE_HASH_ALGOS + SEEDED_HASH_ALGOS)}")


@dataclass(frozen=True)
class Fingerprint:
    """What must match for two engines' KV chunks to be interchangeable (one per rank)."""
    model: str              # model name or path as given to vLLM
    revision: str           # model revision ("" when none was given)
    kv_dtype: str           # KV encoding: element type, e.g. "bfloat16"; a quantized cache adds
                            # its cache dtype and scales (worker.kv_encoding()), e.g. "uint8
                            # cache_dtype=fp8_e4m3 kv_scales=sha256:..."
    layout: str             # per-layer block shapes as the worker sees them (layout_tag())
    block_size: int         # tokens per vLLM block
    chunk_size: int         # tokens per kvtier chunk (a multiple of block_size)
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    hash_algo: str          # vLLM's prefix_caching_hash_algo
    format_version: int = FORMAT_VERSION
    # other numbers from the same model name: vLLM's quantization method and hf_overrides, as
    # one line (weights_variant()); "" = neither, and then no line (the keys stay as they were)
    variant: str = ""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.chunk_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must be a positive multiple of "
                             f"block_size ({self.block_size})")
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"rank out of range: tp {self.tp_rank}/{self.tp_size}, "
                             f"pp {self.pp_rank}/{self.pp_size}")

    def canonical(self) -> bytes:
        """The fields as ``name=value`` lines, in declaration order (what digest() hashes); an
        empty ``variant`` has no line."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "variant" and not v:
                continue
            if isinstance(v, str) and ("\n" in v or "\r" in v):
                raise ValueError(f"fingerprint field {f.name} must be one line")
            lines.append(f"{f.name}={v}")
        return ("\n".join(lines) + "\n").encode()

    def digest(self) -> bytes:
        return hashlib.sha256(b"kvtier-vllm-fingerprint\0" + self.canonical()).digest()


def _canonical_json(v) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


def weights_variant(quantization=None, hf_overrides=None, hf_config=None) -> str:
    """The fingerprint's ``variant``: what makes an engine's KV differ from another's with the
    same model name and revision. ``hf_overrides`` given as a function (vLLM allows one) cannot
    be compared across engines (two closures share a name): the model config it produced
    (``hf_config.to_dict()``) stands in for it, hashed."""
    parts = []
    if quantization:
        parts.append(f"quantization={quantization}")
    if hf_overrides:
        if callable(hf_overrides):
            to_dict = getattr(hf_config, "to_dict", None)
            if to_dict is None:
                raise ValueError("hf_overrides is a function and the model config it made is not known: "
                                 "kvtier cannot tell its KV from another engine's")
            text = "config-sha256:" + hashlib.sha256(_canonical_json(to_dict()).encode()).hexdigest()
        else:
            text = _canonical_json(hf_overrides)
        parts.append(f"hf_overrides={text}")
    return " ".join(parts).replace("\n", " ").replace("\r", " ")


def layout_tag(layers: Iterable[tuple[str, Sequence[int], str]]) -> str:
    """A one-line description of the bytes of one block in every layer.

    ``layers``: (layer name, shape of one block of that layer's KV tensor with the block
    dimension removed, dtype) in the order the worker copies them.
    """
    parts = []
    for name, shape, dtype in layers:
        parts.append(f"{name}:{'x'.join(str(int(d)) for d in shape)}:{dtype}")
    if not parts:
        raise ValueError("no KV layers")
    return ";".join(parts)


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def scope_digest(engine_digest: bytes, tenant: str = "", cache_salt: str = "") -> bytes:
    """The per-request part: one engine fingerprint, one tenant, one cache salt."""
    return hashlib.sha256(b"kvtier-vllm-scope\0" + engine_digest + _lp(tenant.encode())
                          + _lp(cache_salt.encode())).digest()


def chunk_key(scope: bytes, chunk_hash: bytes) -> bytes:
    """The kvtier key (32 bytes) of one chunk, named by the vLLM hash of its last block."""
    return hashlib.sha256(_KEY_PREFIX + scope + bytes(chunk_hash)).digest()


def chunk_hashes(block_hashes: Sequence[bytes], num_tokens: int, chunk_size: int,
                 hash_block_size: int) -> list[bytes]:
    """Names of the chunks wholly inside the first ``num_tokens`` tokens.

    ``block_hashes`` are vLLM's request.block_hashes, one per ``hash_block_size`` tokens.
    """
    if chunk_size % hash_block_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of the hash block size "
                         f"{hash_block_size}")
    per = chunk_size // hash_block_size
    n = min(num_tokens, len(block_hashes) * hash_block_size) // chunk_size
    return [bytes(block_hashes[(c + 1) * per - 1]) for c in range(n)]


def chunk_keys(engine_digest: bytes, hashes: Iterable[bytes], tenant: str = "",
               cache_salt: str = "") -> list[bytes]:
    scope = scope_digest(engine_digest, tenant, cache_salt)
    return [chunk_key(scope, h) for h in hashes]
