"""Benchmarks of squeeze_excitation against its PyTorch reference."""

CASES = []
