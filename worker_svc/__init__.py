"""One engine replica: model, per-layer paged KV (GPU and host tiers), offload, the Worker gRPC service."""
