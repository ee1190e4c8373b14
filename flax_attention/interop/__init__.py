"""Interoperability with the PyTorch reference implementations."""
