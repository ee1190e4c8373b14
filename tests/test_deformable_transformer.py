"""The whole Deformable DETR transformer against the torch reference (upstream's names)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerDecoder,
    get_valid_ratio,
)
from flax_attention.functional.deformable_attention import SpatialShapes
from flax_attention.interop.torch import from_torch
from tests.helpers import assert_close, nhwc_to_torch, randomize_, state_dict
from tests.reference import deformable_attention as R

LEVELS = ((6, 5), (3, 3))
B, Q, C, HEADS, FFN = 2, 4, 32, 2, 40
# Example 0 is padded at the bottom and right (valid 4 x 3 and 2 x 2 pixels), example 1 is not.
VALID = (((4, 3), (2, 2)), ((6, 5), (3, 3)))
SIZES = dict(d_model=C, nhead=HEADS, num_encoder_layers=1, num_decoder_layers=1,
             dim_feedforward=FFN, dropout=0.0, num_feature_levels=len(LEVELS), dec_n_points=2,
             enc_n_points=3)


def _masks() -> list[np.ndarray]:
    masks = []
    for level, (h, w) in enumerate(LEVELS):
        mask = np.ones((B, h, w), bool)
        for i, valid in enumerate(VALID):
            vh, vw = valid[level]
            mask[i, :vh, :vw] = False
        masks.append(mask)
    return masks


def _inputs(seed: int = 0):
    """srcs, masks, pos_embeds (NHWC lists), query_embed `[Q, 2C]`."""
    rng = np.random.default_rng(seed)
    srcs = [rng.standard_normal((B, h, w, C)).astype(np.float32) for h, w in LEVELS]
    pos = [rng.standard_normal((B, h, w, C)).astype(np.float32) for h, w in LEVELS]
    return srcs, _masks(), pos, rng.standard_normal((Q, 2 * C)).astype(np.float32)


def _torch_model(intermediate: bool) -> torch.nn.Module:
    model = R.DeformableTransformer(**SIZES, return_intermediate_dec=intermediate)
    return randomize_(model, seed=1, scale=0.3).eval()


def test_valid_ratio_counts_the_unpadded_rows_and_columns():
    ratios = np.asarray(get_valid_ratio(_masks()[0]))
    np.testing.assert_allclose(ratios, [[3 / 5, 4 / 6], [1, 1]], rtol=1e-6)
    for mask in _masks():
        expected = R.get_valid_ratio(torch.tensor(mask)).numpy()
        np.testing.assert_allclose(get_valid_ratio(mask), expected, rtol=1e-6)


def _torch_outputs(torch_model, srcs, masks, pos, query, g=None):
    """The model's (hs, init_reference, inter_references), and with `g` the gradients of
    sum(hs * g) w.r.t. srcs + pos_embeds (NHWC) and query_embed."""
    leaves = [nhwc_to_torch(x).requires_grad_() for x in srcs + pos]
    query_t = torch.tensor(query, requires_grad=True)
    levels = len(srcs)
    out = torch_model(leaves[:levels], [torch.tensor(m) for m in masks], leaves[levels:],
                      query_t)[:3]
    if g is None:
        return [t.detach().numpy() for t in out], None
    (out[0] * torch.tensor(g)).sum().backward()
    grads = [np.moveaxis(t.grad.numpy(), 1, -1) for t in leaves] + [query_t.grad.numpy()]
    return [t.detach().numpy() for t in out], grads


def test_matches_torch_with_padding_values_and_input_gradients():
    """Every decoder layer's output and the reference points (fp32), and the gradients of
    sum(hs * g) w.r.t. the feature maps, position embeddings and queries (loose)."""
    torch_model = _torch_model(True)
    srcs, masks, pos, query = _inputs()
    g = np.random.default_rng(3).standard_normal((1, B, Q, C)).astype(np.float32)
    expected, expected_grads = _torch_outputs(torch_model, srcs, masks, pos, query, g)
    model = DeformableTransformer(**SIZES, return_intermediate_dec=True)
    variables = from_torch(model, state_dict(torch_model))

    @jax.jit
    def run(srcs, pos, query):
        out, vjp = jax.vjp(lambda *a: model.apply(variables, a[0], masks, *a[1:]),
                           srcs, pos, query)
        return out, vjp((jnp.asarray(g), *(jnp.zeros_like(x) for x in out[1:])))

    out, (d_srcs, d_pos, d_query) = run(srcs, pos, query)
    for a, b, shape in zip(out, expected, [(1, B, Q, C), (B, Q, 2), (1, B, Q, 2)], strict=True):
        assert a.shape == shape
        assert_close(a, b, rtol=2e-5)
    for a, b in zip([*d_srcs, *d_pos, d_query], expected_grads, strict=True):
        assert_close(a, b, rtol=1e-4)


@pytest.mark.slow
def test_last_layer_only_and_no_padding_matches_torch():
    """`return_intermediate_dec=False` returns the last layer's `[B, Q, C]`; masks None equals
    all-False masks (valid ratios 1)."""
    torch_model = _torch_model(False)
    srcs, masks, pos, query = _inputs(seed=4)
    unpadded = [np.zeros_like(m) for m in masks]
    expected, _ = _torch_outputs(torch_model, srcs, unpadded, pos, query)
    model = DeformableTransformer(**SIZES)
    variables = from_torch(model, state_dict(torch_model))
    for given in (None, unpadded):
        out = jax.jit(model.apply)(variables, srcs, given, pos, query)
        for a, b in zip(out, expected, strict=True):
            assert a.shape == b.shape
            assert_close(a, b, rtol=2e-5)


@pytest.mark.slow
def test_fresh_model_has_upstream_initialisation():
    srcs, _, pos, query = _inputs()
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (srcs, pos, query))
    params = DeformableTransformer(**SIZES).lazy_init(jax.random.key(0), spec[0], None,
                                                      *spec[1:])["params"]
    assert params["level_embed"].shape == (len(LEVELS), C)
    assert 0.5 < float(np.std(params["level_embed"])) < 1.5  # normal(0, 1)
    assert not np.any(params["reference_points"]["bias"])
    bound = np.sqrt(6 / (C + 2))  # xavier uniform
    assert 0.3 * bound < np.abs(params["reference_points"]["kernel"]).max() <= bound
    attention = params["decoder"]["layers_0"]["cross_attn"]
    assert not np.any(attention["attention_weights"]["kernel"])
    assert attention["sampling_offsets"]["bias"].shape == (HEADS * len(LEVELS) * 2 * 2,)


def test_decoder_stack_with_reference_boxes_matches_torch():
    """The decoder alone (upstream's `decoder.*` keys) on 4-d reference boxes, which are
    scaled by the valid ratios twice (centre and size), and refuses misshaped valid ratios."""
    torch_model = _torch_model(True)
    weights = {k.removeprefix("decoder."): v for k, v in state_dict(torch_model).items()
               if k.startswith("decoder.")}
    rng = np.random.default_rng(5)
    tgt, query_pos = rng.standard_normal((2, B, Q, C)).astype(np.float32)
    boxes = rng.uniform(0.1, 0.9, (B, Q, 4)).astype(np.float32)
    src = rng.standard_normal((B, sum(h * w for h, w in LEVELS), C)).astype(np.float32)
    ratios = rng.uniform(0.5, 1, (B, len(LEVELS), 2)).astype(np.float32)
    starts = np.array([0, 30])  # upstream's level_start_index
    expected = torch_model.decoder(*map(torch.tensor, (tgt, boxes, src)), LEVELS,
                                   torch.tensor(starts), torch.tensor(ratios),
                                   torch.tensor(query_pos))
    decoder = DeformableTransformerDecoder(C, FFN, 0.0, "relu", len(LEVELS), HEADS, 2,
                                           num_layers=1, return_intermediate=True)
    variables = from_torch(decoder, weights)
    # upstream's positional order; jitted, the level_start_index is traced (shape checked)
    out = jax.jit(decoder.apply)(variables, tgt, boxes, src, SpatialShapes(LEVELS), starts,
                                 ratios, query_pos)
    for a, b in zip(out, expected, strict=True):
        assert_close(a, b.detach().numpy(), rtol=2e-5)
    by_keyword = decoder.apply(variables, tgt, boxes, src, LEVELS, src_valid_ratios=ratios,
                               query_pos=query_pos)
    eager = decoder.apply(variables, tgt, boxes, src, LEVELS, starts, ratios, query_pos)
    for a, b, c in zip(eager, by_keyword, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert_close(c, b, rtol=1e-6)
    with pytest.raises(ValueError, match=r"src_valid_ratios must have shape \[B, L, 2\]"):
        decoder.apply(variables, tgt, boxes, src, LEVELS, src_valid_ratios=ratios[:, :1])
    with pytest.raises(ValueError, match=r"src_level_start_index must be \[0, 30\], the levels' "
                                         r"starts for src_spatial_shapes \(\(6, 5\), \(3, 3\)\)"):
        decoder.apply(variables, tgt, boxes, src, LEVELS, [0, 9], ratios)
    with pytest.raises(TypeError, match="needs src_valid_ratios"):
        decoder.apply(variables, tgt, boxes, src, LEVELS, starts)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(two_stage=True), NotImplementedError, "two_stage"),
        (dict(num_feature_levels=3), ValueError, "srcs must hold num_feature_levels = 3"),
        (dict(d_model=16), ValueError, r"srcs\[0\] must have shape"),
        ({"query": (Q, C)}, ValueError, "query_embed and 2 \\* d_model must agree"),
        ({"mask": 1}, ValueError, r"masks\[1\] must be boolean"),
    ],
)
def test_bad_input_raises(change, error, match):
    srcs, masks, pos, query = _inputs()
    if "query" in change:
        query = np.zeros(change.pop("query"), np.float32)
    if "mask" in change:
        masks[change.pop("mask")] = masks[1].astype(np.float32)
    with pytest.raises(error, match=match):
        DeformableTransformer(**SIZES | change).init(jax.random.key(0), srcs, masks, pos, query)
