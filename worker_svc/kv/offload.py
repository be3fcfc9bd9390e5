"""Copies of KV blocks between the tiers, and the GPU staging blocks those copies go through.

A ``CopyEngine`` runs block copies in submission order (FIFO: a load issued after a store of the
same blocks sees the stored data) and returns a ``CopyHandle`` per call. On CUDA the copies run on a
separate copy stream, start only after the compute already queued (the KV they read was just
written), and a handle is a CUDA event; on CPU they are plain copies, done on return. A layer's
blocks are copied as runs of consecutive ids, so a contiguous allocation is one copy.
``StagingPool`` hands out staging blocks and takes a block back only once the copy that reads or
writes it is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from worker_svc.kv.block_pool import BlockPool
from worker_svc.kv.id_tensor import id_tensor, run_starts


class CopyHandle(Protocol):
    def done(self) -> bool:
        """The copy has completed (non-blocking query)."""
        ...

    def wait(self) -> None:
        """Block the host until the copy has completed."""
        ...

    def order_compute_after(self) -> None:
        """Make later compute-stream work wait for this copy (GPU-side; no host wait)."""
        ...


class DoneHandle:
    """A copy that already happened."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def order_compute_after(self) -> None:
        return None


@dataclass(frozen=True)
class CopyRun:
    """``length`` consecutive blocks from ``src`` to ``dst``."""

    src: int
    dst: int
    length: int


def coalesce(src_ids: list[int], dst_ids: list[int]) -> list[CopyRun]:
    """Group block pairs into runs where both sides are consecutive ids (found with array ops: a
    step's copy lists can hold every block of a layer's context)."""
    assert len(src_ids) == len(dst_ids), "source and destination block lists differ in length"
    starts = run_starts(src_ids, dst_ids)
    ends = [*starts[1:], len(src_ids)] if starts else []
    return [CopyRun(src_ids[a], dst_ids[a], b - a) for a, b in zip(starts, ends, strict=True)]


class CopyEngine:
    """Synchronous copies (CPU): the same code path as CUDA, with nothing to overlap."""

    def copy_blocks(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor,
                    dst_ids: list[int]) -> CopyHandle:
        """Copy blocks ``src[src_ids]`` into ``dst[dst_ids]``; tensors are [N, 2, bs, Hkv, D].

        Few runs: one slice copy each. Many (a batch's contexts, each its own run): one gather and
        one scatter, as the per-call cost of hundreds of small copies exceeds the extra pass."""
        runs = coalesce(src_ids, dst_ids)
        if len(runs) > _MANY_RUNS:
            dst.index_copy_(0, id_tensor(dst_ids), src.index_select(0, id_tensor(src_ids)))
            return DoneHandle()
        for run in runs:
            dst[run.dst:run.dst + run.length].copy_(src[run.src:run.src + run.length])
        return DoneHandle()


_MANY_RUNS = 8  # CPU copies: above this many runs, index ops beat a slice copy per run


class CudaEventHandle:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()

    def order_compute_after(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


class CudaCopyEngine(CopyEngine):
    """Copies on a dedicated CUDA stream, overlapped with compute.

    With ``timing`` each call also records start/end events, so a benchmark can measure the copy
    stream's own throughput (``timed_copies``: start event, end event, bytes).
    """

    def __init__(self, device: torch.device, timing: bool = False) -> None:
        self._stream = torch.cuda.Stream(device=device)
        self.timing = timing
        self.timed_copies: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    def copy_blocks(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor,
                    dst_ids: list[int]) -> CopyHandle:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())  # the KV to copy is written by work queued so far
        done = torch.cuda.Event(enable_timing=self.timing)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            start = torch.cuda.Event(enable_timing=True) if self.timing else None
            if start is not None:
                start.record(self._stream)
            for run in coalesce(src_ids, dst_ids):
                dst[run.dst:run.dst + run.length].copy_(src[run.src:run.src + run.length], non_blocking=True)
            done.record(self._stream)
        if start is not None:
            block_bytes = src[0].numel() * src.element_size()
            self.timed_copies.append((start, done, len(src_ids) * block_bytes))
        return CudaEventHandle(done)


def make_copy_engine(device: torch.device) -> CopyEngine:
    return CudaCopyEngine(device) if device.type == "cuda" else CopyEngine()


class StagingPool:
    """GPU staging blocks: where host-placed layers' KV sits while it is computed or copied.

    A block is returned with ``release_after(ids, handle)`` and reusable only once ``handle`` is done;
    ``allocate`` first reclaims finished copies, then waits for the oldest ones (time it adds to
    ``wait_s``: compute waiting for copies).
    """

    def __init__(self, num_blocks: int, first_id: int) -> None:
        self.pool = BlockPool(num_blocks, first_id)
        self._pending: list[tuple[CopyHandle, list[int]]] = []  # in release order
        self.wait_s = 0.0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def reclaim(self) -> None:
        still: list[tuple[CopyHandle, list[int]]] = []
        for handle, ids in self._pending:
            if handle.done():
                self.pool.free(ids)
            else:
                still.append((handle, ids))
        self._pending = still

    def allocate(self, n: int) -> list[int]:
        self.reclaim()
        while not self.pool.can_allocate(n):
            assert self._pending, (f"staging needs {n} blocks, {self.pool.num_free} of "
                                   f"{self.pool.num_blocks} free and no copy to wait for "
                                   f"(admission should have prevented this)")
            handle, ids = self._pending.pop(0)
            start = time.perf_counter()
            handle.wait()
            self.wait_s += time.perf_counter() - start
            self.pool.free(ids)
        got = self.pool.allocate(n)
        assert got is not None
        return got

    def release_after(self, ids: list[int], handle: CopyHandle) -> None:
        if handle.done():
            self.pool.free(ids)
        else:
            self._pending.append((handle, ids))

    def release(self, ids: list[int]) -> None:
        self.pool.free(ids)

    @property
    def idle(self) -> bool:
        self.reclaim()
        return not self._pending
