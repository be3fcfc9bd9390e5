"""Torch-free pieces shared by the scheduler and the workers: domain types, errors, config, store."""
