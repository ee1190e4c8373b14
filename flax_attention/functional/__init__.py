"""The math of every mechanism as pure functions (arrays in, arrays out), NHWC.

One file per mechanism family; everything public is re-exported here, so
`flax_attention.functional.criss_cross_attention` is the name to use.
"""
