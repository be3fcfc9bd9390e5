"""The per-layer paged KV cache: block pools, layer block tables, tensors per tier, offload copies."""
