"""Benchmarks of non_local against its PyTorch reference."""

CASES = []
