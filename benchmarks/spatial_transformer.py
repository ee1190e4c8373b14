"""Benchmarks of spatial_transformer against its PyTorch reference."""

CASES = []
