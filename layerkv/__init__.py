"""The ``layerkv`` command line: one entry point for the engine, the services and the benchmarks."""
