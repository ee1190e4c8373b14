"""Benchmarks of danet against its PyTorch reference."""

CASES = []
