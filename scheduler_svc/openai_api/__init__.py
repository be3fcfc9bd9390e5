"""The OpenAI-compatible HTTP API of the scheduler (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``), served by uvicorn on the scheduler's own event loop.

It reaches requests only through ``gateway.CoreGateway``, the same admission, queue, policy,
Redis log, failover and cancel path the gRPC ``SchedulerService`` uses.
"""
