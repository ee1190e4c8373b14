"""Multi-scale deformable attention against Deformable DETR's pure-torch path
(`tests/reference/deformable_attention.py`): `ms_deform_attn` values and gradients w.r.t. the
values, locations and weights (float64), locations outside [0, 1], non-square levels of
different sizes, odd P and N; hand-checkable cases; jit, vmap, grad, bfloat16; the Pallas kernel
in interpret mode against XLA; `MSDeformAttn` and the encoder/decoder layers after
`from_torch`; bad input.

Shared shapes: levels 5x7, 3x2, 1x4 (S = 45), B = 2, Q = 6, N = 3, P = 3, D = 5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from flax_attention.deformable_attention import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MSDeformAttn,
    radial_offsets,
)
from flax_attention.functional import _xla_deformable_attention as XLA
from flax_attention.functional import deformable_attention as F
from flax_attention.interop.torch import from_torch
from flax_attention.kernels import deformable_attention as K
from tests.helpers import assert_close, randomize_, state_dict
from tests.reference import deformable_attention as R

SHAPES = ((5, 7), (3, 2), (1, 4))
B, Q, N, P, D = 2, 6, 3, 3, 5
S, L = sum(h * w for h, w in SHAPES), len(SHAPES)
STARTS = np.array([0, 35, 41])  # upstream's level_start_index of SHAPES


def _inputs(seed: int = 0, spread: float = 0.3, dtype=np.float32):
    """value, locations in [-spread, 1 + spread] (many outside), weights, output gradient."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, S, N, D)).astype(dtype),
            rng.uniform(-spread, 1 + spread, (B, Q, N, L, P, 2)).astype(dtype),
            rng.uniform(0, 1, (B, Q, N, L, P)).astype(dtype),
            rng.standard_normal((B, Q, N * D)).astype(dtype))


def _vjp(implementation, value, locations, weights, g):
    fn = functools.partial(F.ms_deform_attn, spatial_shapes=SHAPES,
                           implementation=implementation)
    out, vjp = jax.vjp(lambda v, loc, w: fn(v, sampling_locations=loc, attention_weights=w),
                       *map(jnp.asarray, (value, locations, weights)))
    return (out, *vjp(jnp.asarray(g)))


def _torch_vjp(value, locations, weights, g):
    leaves = [torch.tensor(a, requires_grad=True) for a in (value, locations, weights)]
    out = R.ms_deform_attn_core_pytorch(leaves[0], SHAPES, *leaves[1:])
    out.backward(torch.tensor(g))
    return (out.detach().numpy(), *(t.grad.numpy() for t in leaves))


# --- ms_deform_attn -------------------------------------------------------------------------


def test_matches_torch_values_and_gradients_in_float64():
    inputs = _inputs(dtype=np.float64)
    with jax.enable_x64(True):
        ours = _vjp("xla", *inputs)
    for a, b in zip(ours, _torch_vjp(*inputs), strict=True):
        assert a.dtype == jnp.float64
        assert_close(a, b, rtol=1e-12)


def test_matches_torch_in_float32_with_locations_far_outside():
    inputs = _inputs(seed=1, spread=1.5)
    for a, b in zip(_vjp("xla", *inputs), _torch_vjp(*inputs), strict=True):
        assert_close(a, b, rtol=2e-5)


def test_gradients_at_pixel_centres_and_borders_follow_grid_sample():
    """Locations on pixel centres (the slope from the right/below), on level edges and exactly
    one pixel outside: torch's conventions."""
    value, _, weights, g = _inputs(seed=2, dtype=np.float64)
    rng = np.random.default_rng(3)
    sizes = np.asarray([(w, h) for h, w in SHAPES], np.float64)[:, None]  # [L, 1, 2]
    pixels = rng.integers(-2, 9, (B, Q, N, L, P, 2)).astype(np.float64)
    locations = (pixels + rng.choice([0.0, 0.5], pixels.shape)) / sizes
    with jax.enable_x64(True):
        ours = _vjp("xla", value, locations, weights, g)
    for a, b in zip(ours, _torch_vjp(value, locations, weights, g), strict=True):
        assert_close(a, b, rtol=1e-12)


def test_a_point_of_weight_one_at_a_pixel_centre_returns_that_pixel():
    value = _inputs()[0]
    locations = np.full((B, Q, N, L, P, 2), -5.0, np.float32)  # everything else outside
    weights = np.zeros((B, Q, N, L, P), np.float32)
    h, w = SHAPES[0]
    y, x = 3, 4
    locations[:, :, :, 0, 1] = ((x + 0.5) / w, (y + 0.5) / h)
    weights[:, :, :, 0, 1] = 1.0
    out = F.ms_deform_attn(value, SHAPES, locations, weights).reshape(B, Q, N, D)
    expected = np.broadcast_to(value[:, None, y * w + x], out.shape)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_the_midpoint_of_two_pixels_of_the_second_level_is_their_mean():
    value = _inputs()[0]
    locations = np.full((B, Q, N, L, P, 2), 2.0, np.float32)
    weights = np.zeros((B, Q, N, L, P), np.float32)
    (h0, w0), (h, w) = SHAPES[:2]
    locations[..., 1, 0, :] = (1.0 / w, 1.5 / h)  # between (1, 0) and (1, 1) of level 1
    weights[..., 1, 0] = 2.0
    out = F.ms_deform_attn(value, SHAPES, locations, weights).reshape(B, Q, N, D)
    first = h0 * w0 + w  # row 1, column 0 of level 1
    expected = value[:, first] + value[:, first + 1]
    assert_close(out, np.broadcast_to(expected[:, None], out.shape))


def test_jit_vmap_and_grad():
    value, locations, weights, _ = _inputs(seed=4)
    attend = functools.partial(F.ms_deform_attn, spatial_shapes=SHAPES)
    eager = attend(value, sampling_locations=locations, attention_weights=weights)
    jitted = jax.jit(lambda v, loc, w: attend(v, sampling_locations=loc,
                                              attention_weights=w))(value, locations, weights)
    mapped = jax.vmap(lambda v, loc, w: attend(v[None], sampling_locations=loc[None],
                                               attention_weights=w[None])[0])(
        value, locations, weights)
    assert_close(jitted, eager)
    assert_close(mapped, eager)

    def loss(v, loc, w):
        return jnp.sum(attend(v, sampling_locations=loc, attention_weights=w) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, locations, weights)
    leaves = [torch.tensor(a, requires_grad=True) for a in (value, locations, weights)]
    (R.ms_deform_attn_core_pytorch(leaves[0], SHAPES, *leaves[1:]) ** 2).sum().backward()
    for a, t in zip(grads, leaves, strict=True):
        assert_close(a, t.grad.numpy(), rtol=2e-5)


def test_bfloat16_accumulates_in_float32():
    value, locations, weights, g = _inputs(seed=5)
    out, *grads = _vjp(None, value.astype(jnp.bfloat16), locations, weights,
                       g.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    assert grads[1].dtype == jnp.float32
    reference = _vjp(None, value.astype(jnp.bfloat16).astype(np.float32), locations, weights, g)
    assert_close(out.astype(np.float32), reference[0], rtol=1e-2)
    for a, b in zip(grads, reference[1:], strict=True):
        assert bool(jnp.all(jnp.isfinite(a.astype(np.float32))))
        assert_close(a.astype(np.float32), b, rtol=2e-2)


@pytest.mark.parametrize("per_chunk", [5, pytest.param(1, marks=pytest.mark.slow)])
def test_the_query_chunks_do_not_change_the_result(monkeypatch, per_chunk):
    """B * Q = 12 queries in chunks of 5 (the last padded) or of 1, against one chunk."""
    value, locations, weights, g = _inputs(seed=6)
    whole = _vjp("xla", value, locations, weights, g)
    monkeypatch.setattr(XLA, "_CHUNK_ELEMENTS", per_chunk * N * L * P)
    attend = jax.jit(XLA._ms_deform_attn, static_argnums=1)  # traced anew: sees the new chunks
    out, vjp = jax.vjp(lambda v, loc, w: attend(v, F.SpatialShapes(SHAPES), loc, w),
                       *map(jnp.asarray, (value, locations, weights)))
    for a, b in zip((out, *vjp(jnp.asarray(g))), whole, strict=True):
        assert_close(a, b, rtol=1e-6)


def test_pallas_in_interpret_mode_equals_xla():
    inputs = _inputs(seed=7)
    for a, b in zip(_vjp("pallas", *inputs), _vjp("xla", *inputs), strict=True):
        assert_close(a, b, rtol=1e-5)


def test_kernel_equals_its_reference():
    rng = np.random.default_rng(8)
    value = jnp.asarray(rng.standard_normal((40, 20)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, 40, (4, 3, 70)), jnp.int32)
    weights = jnp.asarray(rng.uniform(-1, 1, (4, 3, 70)), jnp.float32)
    out = K.deformable_gather(value, rows, weights, 40, K.BlockSizes(), True)
    assert_close(out, K.deformable_gather_reference(value, rows, weights))
    with pytest.raises(ValueError, match="BlockSizes.rows must be a power of two"):
        K.BlockSizes(rows=24)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (dict(value=np.zeros((B, S, N))), "value must have rank 4"),
        (dict(value=np.zeros((B, S + 1, N, D))), "value must have S = sum"),
        (dict(spatial_shapes=((5, 7), (3, 0), (1, 4))), "spatial_shapes must be"),
        (dict(spatial_shapes=((5, 7), (5, 2))), "sampling_locations must have shape"),
        (dict(sampling_locations=np.zeros((B, Q, N, L, P, 3))), "sampling_locations must have"),
        (dict(sampling_locations=np.zeros((B, Q, N + 1, L, P, 2))), r"\[B, Q, N, L, P, 2\]"),
        (dict(attention_weights=np.zeros((B, Q, N, L, P + 1))), "attention_weights must have"),
        (dict(implementation="cudnn"), "implementation must be one of"),
    ],
)
def test_bad_input_raises(args, match):
    value, locations, weights, _ = _inputs()
    kwargs = dict(value=value, spatial_shapes=SHAPES, sampling_locations=locations,
                  attention_weights=weights) | args
    with pytest.raises(ValueError, match=match):
        F.ms_deform_attn(**kwargs)


def test_reference_points_match_torch():
    ratios = np.random.default_rng(9).uniform(0.5, 1, (B, L, 2)).astype(np.float32)
    expected = R.get_reference_points(SHAPES, torch.tensor(ratios)).numpy()
    assert_close(F.get_reference_points(SHAPES, ratios), expected)


# --- modules --------------------------------------------------------------------------------

C = 24


def _sequences(seed: int, *lengths: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, n, C)).astype(np.float32) for n in lengths]


def test_fresh_module_has_deformable_detrs_initialisation():
    module = MSDeformAttn(C, L, N, P)
    query, x = _sequences(10, Q, S)
    reference = np.random.default_rng(10).uniform(0, 1, (B, Q, L, 2)).astype(np.float32)
    params = module.init(jax.random.key(0), query, reference, x, SHAPES)["params"]
    torch_module = R.MSDeformAttn(C, L, N, P)
    np.testing.assert_allclose(params["sampling_offsets"]["bias"],
                               torch_module.sampling_offsets.bias.detach().numpy())
    np.testing.assert_allclose(radial_offsets(4, 1, 2).reshape(4, 2, 2)[:, 1],
                               [[2, 0], [0, 2], [-2, 0], [0, -2]], atol=1e-6)
    for name in ("sampling_offsets", "attention_weights"):
        assert not np.any(params[name]["kernel"])
    assert not np.any(params["attention_weights"]["bias"])
    bound = np.sqrt(6 / (2 * C))  # xavier uniform
    assert 0.5 * bound < np.abs(params["value_proj"]["kernel"]).max() <= bound


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_module_matches_torch_with_padding(box):
    torch_module = randomize_(R.MSDeformAttn(C, L, N, P), scale=0.3)
    query, x = _sequences(11, Q, S)
    rng = np.random.default_rng(11)
    reference = rng.uniform(0, 1, (B, Q, L, 4 if box else 2)).astype(np.float32)
    mask = rng.uniform(size=(B, S)) < 0.2
    expected = torch_module(*map(torch.tensor, (query, reference, x)), SHAPES,
                            torch.tensor(STARTS), torch.tensor(mask)).detach().numpy()
    module = MSDeformAttn(C, L, N, P)
    params = from_torch(module, state_dict(torch_module))
    out, state = module.apply(params, query, reference, x, F.SpatialShapes(SHAPES), STARTS,
                              mask, mutable=["intermediates"])  # upstream's positional order
    assert_close(out, expected, rtol=2e-5)
    np.testing.assert_array_equal(out, module.apply(params, query, reference, x, SHAPES,
                                                    input_padding_mask=mask))
    # The sown locations and weights are the ones read: through the op they give the output.
    sown = state["intermediates"]
    locations, weights = sown["attention"][0], sown["sampling_weights"][0]
    assert locations.shape == (B, Q, N * L * P, 2) and weights.shape == (B, Q, N * L * P)
    assert_close(weights.reshape(B, Q, N, L * P).sum(-1), np.ones((B, Q, N)))
    dense = params["params"]
    value = np.where(mask[..., None], 0, x @ dense["value_proj"]["kernel"]
                     + dense["value_proj"]["bias"]).reshape(B, S, N, C // N)
    read = F.ms_deform_attn(value, SHAPES, locations.reshape(B, Q, N, L, P, 2),
                            weights.reshape(B, Q, N, L, P))
    assert_close(read @ dense["output_proj"]["kernel"] + dense["output_proj"]["bias"], expected,
                 rtol=2e-5)


@pytest.mark.slow
def test_module_runs_jitted_in_bfloat16():
    module = MSDeformAttn(C, L, N, P, dtype=jnp.bfloat16)
    query, x = _sequences(12, Q, S)
    reference = np.random.default_rng(12).uniform(0, 1, (B, Q, L, 2)).astype(np.float32)
    variables = module.init(jax.random.key(0), query, reference, x, SHAPES)
    out = jax.jit(module.apply)(variables, query, reference, x, F.SpatialShapes(SHAPES))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def _encoder_inputs():
    src, pos = _sequences(13, S, S)
    ratios = np.random.default_rng(13).uniform(0.6, 1, (B, L, 2)).astype(np.float32)
    return src, pos, ratios, R.get_reference_points(SHAPES, torch.tensor(ratios))


def _torch_encoder_layer(seed: int = 0) -> torch.nn.Module:
    return randomize_(R.DeformableTransformerEncoderLayer(C, 40, 0.0, "relu", L, N, P),
                      seed=seed, scale=0.3)


def test_encoder_layer_matches_torch():
    torch_layer = _torch_encoder_layer()
    src, pos, _, reference = _encoder_inputs()
    expected = torch_layer(torch.tensor(src), torch.tensor(pos), reference, SHAPES,
                           torch.tensor(STARTS))
    layer = DeformableTransformerEncoderLayer(C, 40, 0.0, "relu", L, N, P)
    variables = from_torch(layer, state_dict(torch_layer))
    out = layer.apply(variables, src, pos, reference.numpy(), SHAPES, STARTS)
    assert_close(out, expected.detach().numpy(), rtol=2e-5)
    np.testing.assert_array_equal(out, layer.apply(variables, src, pos, reference.numpy(),
                                                   SHAPES))


@pytest.mark.slow
def test_encoder_stack_matches_torch():
    """Two layers (`layers.0`, `layers.1`) on the encoder's reference points."""
    layers = torch.nn.ModuleList([_torch_encoder_layer(0), _torch_encoder_layer(1)])
    src, pos, ratios, reference = _encoder_inputs()
    expected = torch.tensor(src)
    for layer in layers:
        expected = layer(expected, torch.tensor(pos), reference, SHAPES)
    stack = DeformableTransformerEncoder(C, 40, 0.0, "relu", L, N, P, num_layers=2)
    variables = from_torch(stack, {f"layers.{k}": v for k, v in state_dict(layers).items()})
    out = stack.apply(variables, src, SHAPES, STARTS, ratios, pos)  # upstream's order
    assert_close(out, expected.detach().numpy(), rtol=2e-5)


def test_decoder_layer_matches_torch():
    torch_layer = randomize_(R.DeformableTransformerDecoderLayer(C, 40, 0.0, "relu", L, N, P),
                             scale=0.3)
    tgt, query_pos, src = _sequences(14, Q, Q, S)
    reference = np.random.default_rng(14).uniform(0, 1, (B, Q, L, 4)).astype(np.float32)
    mask = np.random.default_rng(15).uniform(size=(B, S)) < 0.2
    expected = torch_layer(*map(torch.tensor, (tgt, query_pos, reference, src)), SHAPES,
                           torch.tensor(STARTS), torch.tensor(mask))
    layer = DeformableTransformerDecoderLayer(C, 40, 0.0, "relu", L, N, P)
    variables = from_torch(layer, state_dict(torch_layer))
    out = layer.apply(variables, tgt, query_pos, reference, src, SHAPES, list(STARTS), mask)
    assert_close(out, expected.detach().numpy(), rtol=2e-5)
    np.testing.assert_array_equal(out, layer.apply(variables, tgt, query_pos, reference, src,
                                                   SHAPES, src_padding_mask=mask))


def test_both_call_forms_agree_and_a_traced_level_start_index_is_checked_by_shape():
    """The encoder stack in upstream's positional order and by keywords, eagerly and jitted
    (where `level_start_index` is traced: its shape is checked, not its values)."""
    stack = DeformableTransformerEncoder(C, 40, 0.0, "relu", L, N, P, num_layers=1)
    src, pos, ratios, _ = _encoder_inputs()
    mask = np.random.default_rng(16).uniform(size=(B, S)) < 0.2
    spatial = F.SpatialShapes(SHAPES)
    variables = jax.jit(stack.init)(jax.random.key(0), src, spatial, valid_ratios=ratios)
    keywords = jax.jit(stack.apply)(variables, src, spatial, valid_ratios=ratios, pos=pos,
                                    padding_mask=mask)
    positional = stack.apply(variables, src, spatial, STARTS, ratios, pos, mask)
    jitted = jax.jit(stack.apply)(variables, src, spatial, jnp.asarray(STARTS), ratios, pos,
                                  mask)
    assert_close(positional, keywords, rtol=1e-6)  # eager against jitted: rounding only
    assert_close(jitted, keywords, rtol=1e-6)
    with pytest.raises(ValueError, match=r"level_start_index must have shape \[L\] = \(3,\)"):
        jax.jit(stack.apply)(variables, src, spatial, jnp.asarray(STARTS[:2]), ratios)
    with pytest.raises(ValueError, match=r"level_start_index must be \[0, 35, 41\]"):
        stack.apply(variables, src, spatial, STARTS[::-1], ratios)
    with pytest.raises(TypeError, match="needs valid_ratios"):
        stack.apply(variables, src, spatial)


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_layer_norms_are_two_pass_on_a_large_mean(decoder):
    """With the branches' output kernels zeroed, each branch adds its output bias b_i and a
    layer is x -> LN(... LN(x + b_1) + b_2 ...) (fresh LayerNorms: weight 1, bias 0). On x of
    mean 1e4 and unit spread that must hold to float32 accuracy: torch's two-pass variance;
    Flax's one-pass E[x^2] - E[x]^2 gets the first norm's scale wrong by orders of magnitude."""
    src, tgt = _sequences(17, S, Q)
    x = (tgt if decoder else src) + np.float32(1e4)
    reference = np.full((B, x.shape[1], L, 2), 0.5, np.float32)
    layer_cls = DeformableTransformerDecoderLayer if decoder else DeformableTransformerEncoderLayer
    layer = layer_cls(C, 40, 0.0, "relu", L, N, P)
    shapes = F.SpatialShapes(SHAPES)
    args = (x, None, reference, src, shapes) if decoder else (x, None, reference, shapes)
    params = jax.jit(layer.init)(jax.random.key(0), *args)["params"]
    branches = ["self_attn/out_proj", "cross_attn/output_proj", "linear2"] if decoder else [
        "self_attn/output_proj", "linear2"]  # in the order of their norms
    biases = np.random.default_rng(18).standard_normal((len(branches), C)).astype(np.float32)

    def branch_output(path, value):  # kernel 0, bias b_i
        owner = "/".join(path[:-1])
        if owner not in branches:
            return value
        return jnp.zeros_like(value) if path[-1] == "kernel" else biases[branches.index(owner)]

    params = traverse_util.path_aware_map(branch_output, params)
    out = jax.jit(layer.apply)({"params": params}, *args)
    expected = x.astype(np.float64)
    for bias in biases:
        expected = expected + bias
        expected = (expected - expected.mean(-1, keepdims=True)) / np.sqrt(
            expected.var(-1, keepdims=True) + 1e-5)
    assert_close(out, expected, rtol=2e-3)



@pytest.mark.parametrize(
    ("module", "args", "match"),
    [
        (MSDeformAttn(C, L, 5, P), {}, r"d_model \(24\) must be divisible by n_heads"),
        (MSDeformAttn(30, L, N, P), {}, r"query must have shape \(2, 6, 30\)"),
        (MSDeformAttn(C, L, N, P), {"reference": (B, Q, L, 3)}, "reference_points must have"),
        (MSDeformAttn(C, L, N, P), {"shapes": SHAPES[:2]}, "spatial_shapes must have n_levels"),
        (MSDeformAttn(C, L, N, P), {"mask": (B, S - 1)}, "input_padding_mask must be boolean"),
        (MSDeformAttn(C, L, N, 0), {}, "n_points must be an integer >= 1"),
        (MSDeformAttn(C, L, N, P), {"starts": [0, 35, 42]},
         r"input_level_start_index must be \[0, 35, 41\], the levels' starts for "
         r"spatial_shapes \(\(5, 7\), \(3, 2\), \(1, 4\)\), got \[0, 35, 42\]"),
        (MSDeformAttn(C, L, N, P), {"starts": np.zeros((B, S), bool)},
         r"input_level_start_index must have shape \[L\] = \(3,\) for spatial_shapes .* got "
         r"shape \(2, 45\)"),
    ],
)
def test_module_bad_input_raises(module, args, match):
    query, x = _sequences(15, Q, S)
    reference = np.zeros(args.get("reference", (B, Q, L, 2)), np.float32)
    mask = np.zeros(args["mask"], bool) if "mask" in args else None
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), query, reference, x, args.get("shapes", SHAPES),
                    args.get("starts"), mask)


def test_from_torch_reports_a_missing_key():
    module = MSDeformAttn(C, L, N, P)
    weights = state_dict(R.MSDeformAttn(C, L, N, P))
    del weights["output_proj.bias"]
    with pytest.raises(ValueError, match="output_proj.bias"):
        from_torch(module, weights)
