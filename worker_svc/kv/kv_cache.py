"""The KV tensors of the two tiers, with the same per-block layout [N, 2, block_size, Hkv, D].

The GPU tensor holds the GPU-tier blocks (ids ``0 .. gpu_blocks-1``) followed by the staging blocks,
so attention reads resident and staged layers through one block table. The host tensor lives in CPU
memory, pinned when CUDA is present so copies can be asynchronous.

With ``host_in_place`` (the compute device is the CPU, so the host tier is its own memory) both
tiers are views of one tensor, ``compute`` (GPU-tier ids first, then host id ``h`` at
``host_offset + h``): attention reads a host-placed layer in place through the same block table,
and no staging exists.

Tensors in CPU memory (the in-place pool, and the GPU tier where the compute device is the CPU)
are allocated on transparent huge pages where Linux grants them on request (``madvise`` mode):
decode attention reads each row's blocks from anywhere in a pool of hundreds of MB, and with 4 KB
pages every 16 KB block costs four TLB misses (the in-place decode kernel took 9-20 % less time
over a huge-page pool than over a 4 KB-page one in a cold-cache micro-benchmark).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from common.types import KVGeometry

_HUGE = 2 << 20  # the x86-64 / arm64 transparent huge page
_MADV_HUGEPAGE = 14  # Linux's value on every architecture


def _madvise_huge(t: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MB pages inside ``t``'s (not yet touched) memory with huge
    pages; whether the advice was taken. Best effort: False off Linux or where libc refuses."""
    if not sys.platform.startswith("linux"):
        return False
    lo = -(-t.data_ptr() // _HUGE) * _HUGE
    hi = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
    if hi <= lo:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return int(libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)) == 0
    except (OSError, AttributeError):
        return False


def cpu_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros`` in CPU memory, on transparent huge pages where Linux grants them: the
    advice must come before the pages are first touched, so allocate, advise, then zero."""
    t = torch.empty(shape, dtype=dtype)
    _madvise_huge(t)
    return t.zero_()


class KVCache:
    def __init__(self, geometry: KVGeometry, gpu_blocks: int, staging_blocks: int, host_blocks: int,
                 device: torch.device, dtype: torch.dtype, host_in_place: bool = False) -> None:
        self.geometry = geometry
        self.gpu_blocks = gpu_blocks
        self.staging_blocks = staging_blocks
        self.host_blocks = host_blocks
        block_shape = (2, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
        self.host_offset: int | None = None  # host id h is compute id host_offset + h (in place only)
        if host_in_place:
            assert device.type == "cpu" and staging_blocks == 0, "in-place host reads: CPU, no staging"
            # [gpu_blocks + host_blocks, 2, bs, Hkv, D]: the GPU tier, then the host tier
            self.compute = cpu_zeros((gpu_blocks + host_blocks, *block_shape), dtype)
            self.gpu = self.compute[:gpu_blocks]
            self.host = self.compute[gpu_blocks:]
            self.host_offset = gpu_blocks
            return
        # [gpu_blocks + staging_blocks, 2, bs, Hkv, D]
        gpu_shape = (gpu_blocks + staging_blocks, *block_shape)
        self.gpu = (cpu_zeros(gpu_shape, dtype) if device.type == "cpu"
                    else torch.zeros(gpu_shape, device=device, dtype=dtype))
        self.compute = self.gpu  # what attention reads: resident and staged blocks
        pin = device.type == "cuda"
        # [host_blocks, 2, bs, Hkv, D]
        self.host = torch.zeros((host_blocks, *block_shape), dtype=dtype, pin_memory=pin)

    @property
    def staging_first_id(self) -> int:
        return self.gpu_blocks
