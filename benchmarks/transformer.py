"""Benchmarks of the DETR Transformer and multi-head attention against their PyTorch references.

DETR's sizes: d_model 256, 8 heads, feed-forward 2048, 6 + 6 layers, 100 object queries, a
25 x 34 feature map (an 800 x 1066 image at stride 32), batch 2 with the second image padded.
Eval mode (no dropout); the decoder returns every layer's output, as DETR builds it.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

BATCH, HEIGHT, WIDTH, D_MODEL, HEADS, QUERIES = 2, 25, 34, 256, 8, 100
DETR = dict(d_model=D_MODEL, nhead=HEADS, num_encoder_layers=6, num_decoder_layers=6,
            dim_feedforward=2048, return_intermediate_dec=True)


def _inputs():
    """Feature map and position embedding `[B, H, W, C]`, padding mask, object queries."""
    rng = np.random.default_rng(0)
    src = rng.standard_normal((BATCH, HEIGHT, WIDTH, D_MODEL), np.float32)
    pos = rng.standard_normal((BATCH, HEIGHT, WIDTH, D_MODEL), np.float32)
    mask = np.zeros((BATCH, HEIGHT, WIDTH), bool)
    mask[1, 20:, :] = mask[1, :, 27:] = True
    return src, pos, mask, rng.standard_normal((QUERIES, D_MODEL), np.float32)


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _jax_transformer():
    import jax

    from flax_attention.transformer import Transformer

    src, pos, mask, query = _inputs()
    module = Transformer(**DETR)
    variables = jax.jit(module.init)(jax.random.key(0), src, mask, query, pos)
    return jax_steps(lambda v, s, q, p: module.apply(v, s, mask, q, p)[0],
                     variables, src, query, pos)


def _torch_transformer():
    import torch

    from tests.reference.transformer import Transformer

    src, pos, mask, query = _inputs()
    model = Transformer(**DETR).eval()
    mask_t = torch.from_numpy(mask)
    return torch_steps(lambda s, q, p: model(s, mask_t, q, p)[0],
                       _nchw(src), torch.from_numpy(query), _nchw(pos))


def _sequences():
    """Self-attention over the flattened feature map: `[B, HW, C]` tokens, positions, padding."""
    src, pos, mask, _ = _inputs()
    flat = (BATCH, HEIGHT * WIDTH)
    return src.reshape(*flat, D_MODEL), pos.reshape(*flat, D_MODEL), mask.reshape(flat)


def _jax_attention():
    import jax

    from flax_attention.transformer import MultiHeadAttention

    x, pos, padding = _sequences()
    module = MultiHeadAttention(HEADS)
    variables = jax.jit(module.init)(jax.random.key(0), x, x, x)
    return jax_steps(lambda v, x, p: module.apply(v, x, x, x, p, p, padding), variables, x, pos)


def _torch_attention():
    import torch

    x, pos, padding = _sequences()
    mha = torch.nn.MultiheadAttention(D_MODEL, HEADS).eval()
    padding_t = torch.from_numpy(padding)

    def fn(x, p):  # DETR's call: sequence first, q = k = x + pos, v = x
        q = x + p
        return mha(q, q, x, key_padding_mask=padding_t)[0]

    def seq_first(a):
        return torch.from_numpy(np.ascontiguousarray(a.swapaxes(0, 1)))

    return torch_steps(fn, seq_first(x), seq_first(pos))


CASES = [
    Case("detr transformer 6+6 d256 25x34", _jax_transformer, _torch_transformer, goal=1.0),
    Case("detr multi-head attention 850 tok", _jax_attention, _torch_attention),
]
