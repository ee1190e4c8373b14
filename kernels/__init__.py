"""Pallas kernels of flax-attention, importable as `flax_attention.kernels`.

Each kernel sits behind `jax.custom_vjp` beside a plain XLA reference; the public functions of
`flax_attention.functional` pick one with `implementation="xla"|"pallas"|None`.
"""
