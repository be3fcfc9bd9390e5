"""The KV tensors of the two tiers, with the same per-block layout [N, 2, block_size, Hkv, D].

The GPU tensor holds the GPU-tier blocks (ids ``0 .. gpu_blocks-1``) followed by the staging blocks,
so attention reads resident and staged layers through one block table. The host tensor lives in CPU
memory, pinned when CUDA is present so copies can be asynchronous. On a CPU-only machine both are
ordinary memory and the code path is the same.
"""

from __future__ import annotations

import torch

from common.types import KVGeometry


class KVCache:
    def __init__(self, geometry: KVGeometry, gpu_blocks: int, staging_blocks: int, host_blocks: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.geometry = geometry
        self.gpu_blocks = gpu_blocks
        self.staging_blocks = staging_blocks
        self.host_blocks = host_blocks
        block_shape = (2, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
        # [gpu_blocks + staging_blocks, 2, bs, Hkv, D]
        self.gpu = torch.zeros((gpu_blocks + staging_blocks, *block_shape), device=device, dtype=dtype)
        pin = device.type == "cuda"
        # [host_blocks, 2, bs, Hkv, D]
        self.host = torch.zeros((host_blocks, *block_shape), dtype=dtype, pin_memory=pin)

    @property
    def staging_first_id(self) -> int:
        return self.gpu_blocks
