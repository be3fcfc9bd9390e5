"""The KV tensors of the two tiers, with the same per-block layout [N, 2, block_size, Hkv, D].

The GPU tensor holds the GPU-tier blocks (ids ``0 .. gpu_blocks-1``) followed by the staging blocks,
so attention reads resident and staged layers through one block table. The host tensor lives in CPU
memory, pinned when CUDA is present so copies can be asynchronous.

With ``host_in_place`` (the compute device is the CPU, so the host tier is its own memory) both
tiers are views of one tensor, ``compute`` (GPU-tier ids first, then host id ``h`` at
``host_offset + h``): attention reads a host-placed layer in place through the same block table,
and no staging exists.
"""

from __future__ import annotations

import torch

from common.types import KVGeometry


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
            self.compute = torch.zeros((gpu_blocks + host_blocks, *block_shape), dtype=dtype)
            self.gpu = self.compute[:gpu_blocks]
            self.host = self.compute[gpu_blocks:]
            self.host_offset = gpu_blocks
            return
        # [gpu_blocks + staging_blocks, 2, bs, Hkv, D]
        self.gpu = torch.zeros((gpu_blocks + staging_blocks, *block_shape), device=device, dtype=dtype)
        self.compute = self.gpu  # what attention reads: resident and staged blocks
        pin = device.type == "cuda"
        # [host_blocks, 2, bs, Hkv, D]
        self.host = torch.zeros((host_blocks, *block_shape), dtype=dtype, pin_memory=pin)

    @property
    def staging_first_id(self) -> int:
        return self.gpu_blocks
