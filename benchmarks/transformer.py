"""Benchmarks of transformer against its PyTorch reference."""

CASES = []
