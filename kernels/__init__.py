"""Pallas kernels of flax-attention, importable as `flax_attention.kernels`.

One op a file, each on one template (jax's `pallas/ops/gpu/attention.py`): a frozen
`BlockSizes`, the kernels over refs, jitted wrappers taking `interpret=`, the `jax.custom_vjp`
and a plain `<op>_reference` (the XLA math the kernel must equal):

    criss_cross.py  BlockSizes, criss_cross_attention, criss_cross_reference
    bilinear.py     BlockSizes, bilinear_gather (gather, corner_dots, scatter),
                    bilinear_gather_reference
    deformable_attention.py  BlockSizes, deformable_gather (forward; the backward runs
                    bilinear's scatter and corner_dots), deformable_gather_reference
    flash.py        BlockSizes, flash_attention (flash_attention_forward,
                    flash_attention_backward), flash_attention_reference

`_common.py` holds what they share: the supported dtypes, the mask value, the minimum block and
the `implementation="xla"|"pallas"|"cudnn"|None` vocabulary of the public functions of
`flax_attention.functional`, which pick between these kernels and their XLA paths.
"""
