"""Copies of KV blocks between the tiers, and the GPU staging blocks those copies go through.

A ``CopyEngine`` runs block copies in submission order (FIFO: a load issued after a store of the
same blocks sees the stored data) and returns a ``CopyHandle`` per call. On CUDA the copies run on a
separate copy stream, start only after the compute already queued (the KV they read was just
written), and a handle is a CUDA event; on CPU they are plain copies, done on return. A layer's
blocks are copied as runs of consecutive ids, so a contiguous allocation is one copy, and all the
runs of one call go in one batched call (``copy_runs_batched``: index kernels on one device, a
foreach copy across devices) rather than a ``copy_`` per run.
``StagingPool`` hands out contiguous staging ranges and takes one back only once the copy that reads
or writes it is done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from worker_svc.kv.id_tensor import run_starts


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


def runs_array(src_ids: Sequence[int], dst_ids: Sequence[int]) -> np.ndarray:
    """``coalesce`` as a [K, 3] int64 array of (src, dst, length) rows."""
    runs = coalesce(list(src_ids), list(dst_ids))
    return np.array([(r.src, r.dst, r.length) for r in runs], dtype=np.int64).reshape(-1, 3)


def expand_runs(runs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (src, dst) block id pair of ``runs`` [K, 3], as two [sum(lengths)] int64 tensors."""
    lens = torch.from_numpy(np.ascontiguousarray(runs[:, 2]))  # [K]
    starts = torch.cumsum(lens, 0) - lens  # [K] where each run begins in the flat list
    within = torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)
    src = torch.repeat_interleave(torch.from_numpy(np.ascontiguousarray(runs[:, 0])), lens) + within
    dst = torch.repeat_interleave(torch.from_numpy(np.ascontiguousarray(runs[:, 1])), lens) + within
    return src, dst


def copy_each_run(src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray, non_blocking: bool = False) -> None:
    """``runs`` [K, 3] (src id, dst id, length) copied one slice copy per run (K calls)."""
    for s, d, n in runs.tolist():
        dst[d:d + n].copy_(src[s:s + n], non_blocking=non_blocking)


def copy_runs_indexed(src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray,
                      non_blocking: bool = False) -> None:
    """``runs`` [K, 3] as one gather of every source block and one scatter into ``dst`` (two
    kernels on one device; index tensors built once for the call)."""
    src_ids, dst_ids = expand_runs(runs)
    dst.index_copy_(0, dst_ids.to(dst.device, non_blocking=non_blocking),
                    src.index_select(0, src_ids.to(src.device, non_blocking=non_blocking)))


def copy_runs_foreach(src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray,
                      non_blocking: bool = False) -> None:
    """``runs`` [K, 3] as one foreach copy of the runs' slices: across devices the DMA still takes
    each run as it is (no gather through host memory, which would be a CPU memcpy of every
    streamed context), but the K copies are issued by one call, not K Python-level ``copy_``."""
    triples = runs.tolist()
    torch._foreach_copy_([dst[d:d + n] for _, d, n in triples], [src[s:s + n] for s, _, n in triples],
                         non_blocking=non_blocking)


def copy_runs_batched(src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray,
                      non_blocking: bool = False) -> None:
    """``runs`` [K, 3] in one call, the same bytes as ``copy_each_run``: indexed on one device,
    a foreach copy across devices (the host tier and a GPU)."""
    if not len(runs):
        return
    (copy_runs_indexed if src.device == dst.device else copy_runs_foreach)(src, dst, runs, non_blocking)


class CopyEngine:
    """Synchronous copies (CPU): the same code path as CUDA, with nothing to overlap."""

    def copy_blocks(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor,
                    dst_ids: list[int]) -> CopyHandle:
        """Copy blocks ``src[src_ids]`` into ``dst[dst_ids]``; tensors are [N, 2, bs, Hkv, D]."""
        return self.copy_runs(src, dst, runs_array(src_ids, dst_ids))

    def copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray) -> CopyHandle:
        """Copy ``runs`` [K, 3] int64 rows (src id, dst id, length) of consecutive blocks.

        Few runs, or long ones (a host layer's contexts): one slice copy each. Many short ones (a
        decode's written block of every request): one gather and one scatter, as the per-call cost
        of hundreds of small copies exceeds the extra pass."""
        if len(runs) > _MANY_RUNS and int(runs[:, 2].sum()) < _LONG_RUN * len(runs):
            copy_runs_batched(src, dst, runs)
            return DoneHandle()
        copy_each_run(src, dst, runs)
        return DoneHandle()


_MANY_RUNS = 8  # CPU copies: above this many runs, index ops beat a slice copy per run ...
_LONG_RUN = 64  # ... unless runs average this many blocks (the per-call cost is amortised)


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

    def __init__(self, device: torch.device, timing: bool = False, batched: bool = True) -> None:
        self._stream = torch.cuda.Stream(device=device)
        self.timing = timing
        self.batched = batched  # False: one ``copy_`` per run (the older path, kept to compare)
        self.timed_copies: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    def copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray) -> CopyHandle:
        # One call per layer and direction (``copy_runs_batched``), not one ``copy_`` per run: a
        # b256 x 16k half-host step has ~19k runs, and each Python-level copy_ costs microseconds.
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())  # the KV to copy is written by work queued so far
        done = torch.cuda.Event(enable_timing=self.timing)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            start = torch.cuda.Event(enable_timing=True) if self.timing else None
            if start is not None:
                start.record(self._stream)
            (copy_runs_batched if self.batched else copy_each_run)(src, dst, runs, non_blocking=True)
            done.record(self._stream)
        if start is not None:
            block_bytes = src[0].numel() * src.element_size()
            self.timed_copies.append((start, done, int(runs[:, 2].sum()) * block_bytes))
        return CudaEventHandle(done)


def make_copy_engine(device: torch.device) -> CopyEngine:
    return CudaCopyEngine(device) if device.type == "cuda" else CopyEngine()


@dataclass
class _Range:
    lo: int  # first staging id
    hi: int  # one past the last
    handle: CopyHandle | None = None  # the copy that must finish before reuse; None while held


class StagingPool:
    """GPU staging blocks: where host-placed layers' KV sits while it is computed or copied.

    A step takes one contiguous range per host-read layer (``take``): even layers from the bottom
    of the pool, odd layers from the top, so a layer and the next one (streamed in while it
    computes) never overlap while admission keeps any adjacent pair within the pool. A range is
    returned with ``release_after(lo, handle)`` and reusable only once ``handle`` is done; ``take``
    first drops finished copies, then waits for any still-running one its range overlaps (time it
    adds to ``wait_s``: compute waiting for copies). Ids only: O(1) per range, whatever its length.
    """

    def __init__(self, num_blocks: int, first_id: int) -> None:
        self.num_blocks = num_blocks
        self.first_id = first_id
        self._ranges: list[_Range] = []  # held or waiting for a copy, in take order
        self.wait_s = 0.0

    @property
    def num_free(self) -> int:
        return self.num_blocks - sum(r.hi - r.lo for r in self._ranges)

    def reclaim(self) -> None:
        self._ranges = [r for r in self._ranges if r.handle is None or not r.handle.done()]

    def take(self, n: int, side: int) -> int:
        """First id of ``n`` contiguous staging blocks at the bottom (``side`` 0) or top (1)."""
        assert 0 <= n <= self.num_blocks, (f"staging needs {n} blocks, the pool has {self.num_blocks} "
                                           f"(admission should have prevented this)")
        lo = self.first_id if side == 0 else self.first_id + self.num_blocks - n
        hi = lo + n
        self.reclaim()
        for r in list(self._ranges):
            if r.lo < hi and lo < r.hi:
                assert r.handle is not None, (f"staging [{lo}, {hi}) overlaps [{r.lo}, {r.hi}) still in use "
                                              f"(admission should have prevented this)")
                start = time.perf_counter()
                r.handle.wait()
                self.wait_s += time.perf_counter() - start
                self._ranges.remove(r)
        if n:
            self._ranges.append(_Range(lo, hi))
        return lo

    def _held(self, lo: int) -> _Range:
        for r in self._ranges:
            if r.lo == lo and r.handle is None:
                return r
        raise AssertionError(f"no staging range held at {lo}")

    def release_after(self, lo: int, handle: CopyHandle) -> None:
        """The range taken at ``lo`` is free once ``handle`` is done."""
        r = self._held(lo)
        if handle.done():
            self._ranges.remove(r)
        else:
            r.handle = handle

    def release(self, lo: int) -> None:
        self._ranges.remove(self._held(lo))

    @property
    def idle(self) -> bool:
        self.reclaim()
        return not self._ranges
