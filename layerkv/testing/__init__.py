"""Process-level support shared by the tests, ``layerkv bench`` and ``layerkv up``: free ports, a
real redis-server launcher, and scheduler/worker child processes that can be killed, stopped,
continued and restarted. Torch-free and importable from an installed package."""
