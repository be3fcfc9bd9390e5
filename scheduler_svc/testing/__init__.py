"""Test doubles shared by the scheduler tests and the overhead benchmark (torch-free)."""
