"""What the scheduler half tells the worker halves each step, and what workers tell it once.

``StepMeta`` is pickled from the engine core to every worker. It names chunks by their vLLM
block hash plus the request's tenant and cache salt; each worker derives the keys of its own
TP/PP rank (kvtier.vllm.keys), so one message serves every rank. ``namespace`` is the daemon
namespace the scheduler chose for the request ("" = the engine's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)


@dataclass
class LoadSpec:
    """Copy chunks ``chunk_hashes`` (whole records) into vLLM blocks: block ``first`` of the
    first chunk goes to ``block_ids[0]``, and so on through the last chunk."""
    req_id: str
    tenant: str
    cache_salt: str
    chunk_hashes: list[bytes]
    first: int
    block_ids: list[int]
    namespace: str = ""
    pin: bool = False   # the request asks its chunks pinned (pin/ttl): loaded ones too, once loaded
    pin_s: int = 0


@dataclass
class StoreSpec:
    """Write each chunk ``chunk_hashes[i]`` from vLLM blocks ``block_ids[i]``."""
    req_id: str
    tenant: str
    cache_salt: str
    chunk_hashes: list[bytes]
    block_ids: list[list[int]]
    pin: bool = False
    pin_s: int = 0
    namespace: str = ""
    overwrite: bool = False   # replace a copy already stored (it may be bad: a failed sync load)


@dataclass
class DeleteSpec:
    """Delete chunks ``chunk_hashes`` from the daemon (each rank its own keys), after the
    stores this rank queued in earlier steps and before this step's."""
    tenant: str
    cache_salt: str
    chunk_hashes: list[bytes]
    namespace: str = ""


@dataclass
class StepMeta(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    load_async: bool = True
    stores: list[StoreSpec] = field(default_factory=list)
    # chunks computed on a failed synchronous load (see SchedulerHalf._taint)
    deletes: list[DeleteSpec] = field(default_factory=list)
    # requests preempted this step: their pending stores finish before blocks are reused
    preempted: set[str] = field(default_factory=set)
    # the step computes nothing (every request waits, e.g. for its loads): get_finished may
    # wait a moment for a load to land instead of handing the engine back a busy loop
    idle: bool = False


@dataclass
class RankLayout(KVConnectorHandshakeMetadata):
    """A worker's view of its KV, sent once to the scheduler half: the keys' fingerprint
    needs it, and only the worker can read it from the tensors."""
    layout: str
    kv_dtype: str
    path: str = ""  # how the worker reached the daemon ("arena", "data", "grpc", "" = not yet)
