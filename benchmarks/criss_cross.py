"""Benchmarks of criss_cross against its PyTorch reference."""

CASES = []
