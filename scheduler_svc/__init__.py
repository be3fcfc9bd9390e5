"""The fleet brain: client API, waiting queue, per-worker per-layer budget ledger, policies (no torch)."""
