"""Deformable convolution: `deform_conv2d` against the pure-torch im2col reference (torchvision's
semantics), hand-checkable values, the `DeformConv2d` module against torchvision's and mmcv's
module forms after `from_torch`, transformations, dtypes and bad input."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.test_util import check_grads

from flax_attention.deform_conv import DeformConv2d
from flax_attention.functional import deform_conv as F
from flax_attention.interop.torch import from_torch
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, randomize_, state_dict
from tests.reference import deform_conv as ref


def _out_hw(hw, kernel, stride, padding, dilation):
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(hw, kernel, stride, padding, dilation, strict=True))


def _case(x_shape, kernel, features, groups=1, offset_groups=1, stride=(1, 1), padding=(0, 0),
          dilation=(1, 1), masked=False, spread=1.5, seed=0, whole=False):
    """Random float64 inputs of `deform_conv2d`: x, offset, weight, bias, mask (or None);
    `whole`: offsets of whole pixels, so that samples land exactly on -1, 0, H - 1 and H."""
    rng = np.random.default_rng(seed)
    b, *hw, channels = x_shape
    ho, wo = _out_hw(hw, kernel, stride, padding, dilation)
    taps = offset_groups * kernel[0] * kernel[1]
    return {"x": rng.standard_normal(x_shape),
            "offset": (np.round if whole else np.asarray)(
                spread * rng.standard_normal((b, ho, wo, 2 * taps))),
            "weight": rng.standard_normal((*kernel, channels // groups, features)),
            "bias": rng.standard_normal(features),
            "mask": rng.uniform(size=(b, ho, wo, taps)) if masked else None}


def _torch_layout(arrays: dict) -> dict:
    """The same arrays as torch float64 tensors in torchvision's layouts (NCHW, OIHW)."""
    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))

    return {"input": nchw(arrays["x"]), "offset": nchw(arrays["offset"]),
            "weight": torch.from_numpy(arrays["weight"].transpose(3, 2, 0, 1).copy()),
            "bias": torch.from_numpy(arrays["bias"]),
            "mask": None if arrays["mask"] is None else nchw(arrays["mask"])}


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().numpy(), 1, -1)


# --- hand-checkable values ------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_zero_offsets_equal_conv_general_dilated(masked):
    """Zero offsets (and a mask of ones) make it an ordinary (grouped, strided, padded,
    dilated, non-square) convolution."""
    settings = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}
    a = _case((2, 7, 9, 4), (3, 2), 6, groups=2, offset_groups=2, masked=masked, **settings)
    mask = None if a["mask"] is None else np.ones_like(a["mask"])
    x, weight = a["x"].astype(np.float32), a["weight"].astype(np.float32)
    out = jax.jit(functools.partial(F.deform_conv2d, **settings))(
        x, np.zeros(a["offset"].shape, np.float32), weight, mask=mask)
    expected = lax.conv_general_dilated(
        x, weight, (2, 1), [(1, 1), (2, 2)], rhs_dilation=(1, 2), feature_group_count=2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert out.shape == (2, 4, 11, 6)
    assert_close(out, expected)


def test_one_tap_reads_bilinear_values_and_zeros_outside():
    """A 1x1 kernel of weight 1 returns the sample at (oy + dy, ox + dx) itself."""
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)  # x[y, x] = 4 y + x
    offset = jnp.zeros((1, 3, 4, 2)).at[0, 0, 0].set([0.5, 0.25])  # (dy, dx) at output (0, 0)
    offset = offset.at[0, 2, 3].set([0.5, 0.0])  # (2.5, 3): only the row y = 2 is inside
    offset = offset.at[0, 1, 1].set([-2.0, 0.0])  # y = -1: outside
    offset = offset.at[0, 1, 2].set([0.0, -3.5])  # x = -1.5: both neighbours outside
    out = jax.jit(F.deform_conv2d)(x, offset, jnp.ones((1, 1, 1, 1)))[0, ..., 0]
    expected = np.arange(12.0).reshape(3, 4)
    expected[0, 0] = 4 * 0.5 + 0.25
    expected[2, 3] = 0.5 * 11
    expected[1, 1] = expected[1, 2] = 0
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_points_are_normalised_sampling_locations():
    offset = jnp.zeros((1, 2, 3, 2 * 2 * 4)).at[0, 1, 0, 2 * 4 + 1].set(1.0)  # group 1, tap 0
    points = jax.jit(functools.partial(F.deform_conv2d_points, input_hw=(4, 6), kernel_size=2,
                                       stride=2))(offset)
    assert points.shape == (1, 6, 8, 2)
    # query (1, 0) (index 3) samples from (y, x) = (2, 0) + the taps; tap (0, 1) is (2, 1)
    np.testing.assert_allclose(points[0, 3, 1], [1.5 / 6, 2.5 / 4])
    np.testing.assert_allclose(points[0, 3, 4], [1.5 / 6, 2.5 / 4])  # group 1, tap 0: dx = 1
    np.testing.assert_allclose(points[0, 3, 0], points[0, 3, 4] - np.array([1 / 6, 0]))


# --- against the torch reference ------------------------------------------------------------------

CONFIGS = [
    pytest.param({"x_shape": (2, 6, 5, 3), "kernel": (3, 3), "features": 4,
                  "padding": (1, 1)}, id="v1-3x3"),
    pytest.param({"x_shape": (2, 7, 9, 6), "kernel": (3, 2), "features": 4, "groups": 2,
                  "offset_groups": 3, "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1),
                  "masked": True}, id="v2-groups-og3-stride-dilation-nonsquare"),
    pytest.param({"x_shape": (1, 5, 5, 2), "kernel": (3, 3), "features": 3, "masked": True,
                  "spread": 4.0}, id="v2-far-outside"),
    # torchvision's offset gradient at a sample on -1 (value 0) is the slope towards row 0
    pytest.param({"x_shape": (1, 5, 4, 2), "kernel": (3, 3), "features": 2, "padding": (1, 1),
                  "masked": True, "whole": True}, id="v2-whole-pixel-offsets-on-the-border"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_values_and_gradients_match_torch_reference(config):
    """In float64 on both sides: values and gradients w.r.t. x, offset, mask, weight, bias."""
    arrays = _case(**config)
    names = [k for k, v in arrays.items() if v is not None]
    settings = {k: config.get(k, (1, 1) if k != "padding" else (0, 0))
                for k in ("stride", "padding", "dilation")}
    cotangent = np.random.default_rng(9).standard_normal(
        (config["x_shape"][0], *_out_hw(config["x_shape"][1:3], config["kernel"], *(
            settings[k] for k in ("stride", "padding", "dilation"))), config["features"]))
    with jax.enable_x64(True):
        def fn(*values):
            return F.deform_conv2d(**dict(zip(names, values, strict=True)), **settings)

        out, vjp = jax.vjp(jax.jit(fn), *(jnp.asarray(arrays[k]) for k in names))
        grads = vjp(jnp.asarray(cotangent))
    tensors = {k: v.requires_grad_(True) for k, v in _torch_layout(arrays).items()
               if v is not None}
    expected = ref.deform_conv2d(**tensors, **settings)
    expected.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(cotangent, -1, 1))))
    assert_close(out, _nhwc(expected), rtol=1e-10)
    torch_names = {"x": "input"}
    for name, grad in zip(names, grads, strict=True):
        t = tensors[torch_names.get(name, name)].grad
        want = t.numpy().transpose(2, 3, 1, 0) if name == "weight" else (
            t.numpy() if name == "bias" else _nhwc(t))
        assert_close(grad, want, rtol=1e-10)


@pytest.mark.slow  # the float64 comparisons with torch above check the same gradients
def test_custom_vjp_against_numerical_gradients():
    a = _case((1, 4, 5, 2), (2, 2), 2, offset_groups=2, padding=(1, 0), masked=True, seed=3)
    with jax.enable_x64(True):
        op = jax.jit(lambda x, o, m, w: F.deform_conv2d(x, o, w, padding=(1, 0), mask=m))
        check_grads(op, tuple(jnp.asarray(a[k]) for k in ("x", "offset", "mask", "weight")),
                    order=1, modes=["rev"])


@pytest.mark.parametrize("masked", [False, True])
def test_backward_in_chunks_of_one_image_equals_one_step(monkeypatch, masked):
    """Three images with two offset groups: six sampled images, each its own step of the
    backward's loop (its rows offset by the step), give the gradients of one step."""
    a = _case((3, 5, 6, 4), (3, 3), 4, offset_groups=2, padding=(1, 1), masked=masked, seed=7)
    names = ("x", "offset", "mask", "weight") if masked else ("x", "offset", "weight")
    values = [jnp.asarray(a[k], jnp.float32) for k in names]

    def grads():
        def loss(x, offset, *rest):
            mask, weight = rest if masked else (None, *rest)
            out = F.deform_conv2d(x, offset, weight, padding=1, mask=mask)
            return jnp.sum(out * jnp.cos(out))

        return jax.jit(jax.grad(loss, range(len(names))))(*values)

    one_step = grads()
    monkeypatch.setattr(F, "_CHUNK_ELEMENTS", 1)
    for name, chunked, expected in zip(names, grads(), one_step, strict=True):
        assert float(jnp.abs(expected).max()) > 0, name
        assert_close(chunked, expected, rtol=1e-6)


def test_float32_matches_float64_reference():
    a = _case((2, 6, 6, 4), (3, 3), 5, offset_groups=2, padding=(1, 1), masked=True, seed=4)
    f32 = {k: v.astype(np.float32) for k, v in a.items()}
    out = jax.jit(functools.partial(F.deform_conv2d, padding=1))(**f32)
    expected = ref.deform_conv2d(**_torch_layout(a), padding=1)
    assert out.dtype == jnp.float32
    assert_close(out, _nhwc(expected), rtol=1e-5)


# --- transformations and dtypes -------------------------------------------------------------------


def test_jit_vmap_and_grad():
    """One jitted function: `vmap` over images (each its own batch of 1) inside `grad`."""
    a = _case((3, 5, 6, 4), (3, 3), 4, padding=(1, 1), masked=True, seed=5)
    names = ("x", "offset", "mask", "weight", "bias")
    per_image = [jnp.asarray(a[k][:, None] if k in names[:3] else a[k], jnp.float32)
                 for k in names]
    batched = jax.vmap(lambda x, offset, mask, weight, bias: F.deform_conv2d(
        x, offset, weight, bias, padding=1, mask=mask), in_axes=(0, 0, 0, None, None))

    def loss(*values):
        out = batched(*values)
        return jnp.sum(out ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, range(5), has_aux=True))(*per_image)
    assert_close(out[:, 0], _nhwc(ref.deform_conv2d(**_torch_layout(a), padding=1)))
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in grads)


def test_bfloat16_accumulates_in_float32_and_stays_close():
    a = _case((2, 8, 8, 16), (3, 3), 8, padding=(1, 1), masked=True, seed=6)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in a.items()}
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in f32.items()}
    op = jax.jit(functools.partial(F.deform_conv2d, padding=1))
    out = op(**bf16)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), op(**f32), rtol=3e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x, w = jnp.zeros((2, 6, 6, 4)), jnp.zeros((3, 3, 4, 8))
    offset = jnp.zeros((2, 4, 4, 18))
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(6, 6, 4\)"):
        F.deform_conv2d(x[0], offset, w)
    with pytest.raises(ValueError, match=r"weight must have rank 4.*\(3, 4, 8\)"):
        F.deform_conv2d(x, offset, w[0])
    with pytest.raises(ValueError, match=r"weight's input channels \(3\) must divide.*x \(2, 6"):
        F.deform_conv2d(x, offset, jnp.zeros((3, 3, 3, 8)))
    with pytest.raises(ValueError, match=r"weight output channels O \(5\) must be divisible by "
                                         r"groups"):
        F.deform_conv2d(x, offset, jnp.zeros((3, 3, 2, 5)))
    with pytest.raises(ValueError, match=r"offset must have 2 \* G \* kh \* kw channels.*"
                                         r"\(2, 4, 4, 17\)"):
        F.deform_conv2d(x, offset[..., :17], w)
    with pytest.raises(ValueError, match=r"offset must have the output's spatial size \(4, 4\)"
                                         r".*\(2, 6, 6, 18\)"):
        F.deform_conv2d(x, jnp.zeros((2, 6, 6, 18)), w)
    with pytest.raises(ValueError, match=r"x and offset must agree in batch size"):
        F.deform_conv2d(x, offset[:1], w)
    with pytest.raises(ValueError, match=r"x channels \(4\) must be divisible by offset groups"):
        F.deform_conv2d(x, jnp.zeros((2, 4, 4, 54)), w)
    with pytest.raises(ValueError, match=r"mask must have shape .* \(2, 4, 4, 9\).*\(2, 4, 4, 18"):
        F.deform_conv2d(x, offset, w, mask=jnp.zeros((2, 4, 4, 18)))
    with pytest.raises(ValueError, match=r"bias must have shape \[O\] = \(8,\)"):
        F.deform_conv2d(x, offset, w, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"stride must be an integer >= 1, got 0"):
        F.deform_conv2d(x, offset, w, stride=(1, 0))
    with pytest.raises(ValueError, match=r"too small for a \(3, 3\) kernel"):
        F.deform_conv2d(x[:, :2], offset, w)


# --- the module -----------------------------------------------------------------------------------

SHAPE = (2, 7, 6, 4)


def _module_pair(torch_cls, seed=0, **kwargs):
    torch_module = randomize_(torch_cls(SHAPE[-1], 6, 3, **kwargs), seed, scale=0.3)
    renames = {"stride": "strides", "deform_groups": "offset_groups", "bias": "use_bias"}
    fields = {renames.get(k, k): v for k, v in kwargs.items()}
    if torch_cls is ref.DeformConv2dPack:
        fields.setdefault("use_bias", False)
    if torch_cls is ref.DeformConv2d:  # from_torch converts offset_conv=None as a Pack
        fields["offset_conv"] = False
    module = DeformConv2d(6, 3, modulated=torch_cls is ref.ModulatedDeformConv2dPack, **fields)
    return module, from_torch(module, state_dict(torch_module)), torch_module


@pytest.mark.parametrize(("torch_cls", "kwargs"), [
    (ref.DeformConv2dPack, {"padding": 1, "deform_groups": 2}),
    (ref.ModulatedDeformConv2dPack, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
])
def test_module_matches_mmcv_packs(torch_cls, kwargs):
    module, variables, torch_module = _module_pair(torch_cls, **kwargs)
    x, cotangent_seed = random_nhwc(SHAPE, 1), 2
    (out, state), vjp = jax.vjp(
        jax.jit(lambda x: module.apply(variables, x, mutable=["intermediates"])), jnp.asarray(x))
    x_t = nhwc_to_torch(x).requires_grad_(True)
    out_t = torch_module(x_t)
    cotangent = random_nhwc(out.shape, cotangent_seed)
    (grad,) = vjp((jnp.asarray(cotangent), jax.tree.map(jnp.zeros_like, state)))
    out_t.backward(nhwc_to_torch(cotangent))
    assert_close(out, _nhwc(out_t), rtol=1e-5)
    assert_close(grad, _nhwc(x_t.grad), rtol=1e-4)
    points = state["intermediates"]["attention"][0]
    groups = kwargs.get("deform_groups", 1)
    assert points.shape == (2, out.shape[1] * out.shape[2], groups * 9, 2)


def test_module_with_offsets_passed_in_matches_torchvision():
    module, variables, torch_module = _module_pair(ref.DeformConv2d, 3, padding=1, groups=2)
    assert set(variables["params"]) == {"kernel", "bias"}
    a = _case(SHAPE, (3, 3), 6, offset_groups=2, padding=(1, 1), masked=True, seed=4)
    x, offset, mask = (a[k].astype(np.float32) for k in ("x", "offset", "mask"))
    out = jax.jit(module.apply)(variables, x, offset, mask)
    expected = torch_module(nhwc_to_torch(x), nhwc_to_torch(offset), nhwc_to_torch(mask))
    assert_close(out, _nhwc(expected), rtol=1e-5)


def test_torchvision_call_form_with_the_default_fields():
    """`DeformConv2d(O, k)(x, offset, mask)` as torchvision's: no `conv_offset` is created, and
    torchvision's weights (loaded with offset_conv=False) give the same output through it."""
    _, variables, torch_module = _module_pair(ref.DeformConv2d, 3, padding=1, groups=2)
    a = _case(SHAPE, (3, 3), 6, offset_groups=2, padding=(1, 1), masked=True, seed=4)
    x, offset, mask = (jnp.asarray(a[k], jnp.float32) for k in ("x", "offset", "mask"))
    module = DeformConv2d(6, 3, padding=1, groups=2)
    fresh = jax.jit(module.init)(jax.random.key(0), x, offset)
    assert set(fresh["params"]) == {"kernel", "bias"}
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, variables)
    expected = {"mask": torch_module(*map(nhwc_to_torch, (x, offset, mask))),
                "no mask": torch_module(*map(nhwc_to_torch, (x, offset)))}
    assert_close(jax.jit(module.apply)(variables, x, offset, mask=mask), _nhwc(expected["mask"]),
                 rtol=1e-5)
    assert_close(jax.jit(module.apply)(variables, x, offset), _nhwc(expected["no mask"]),
                 rtol=1e-5)


def test_initialisation_is_torchvisions():
    """kaiming_uniform_(a=sqrt(5)) kernel and U(+-1/sqrt(fan_in)) bias, fan_in = C/groups*kh*kw
    (torchvision's `reset_parameters`); `conv_offset` zero (mmcv's)."""
    x = jnp.zeros((1, 5, 5, 32))
    variables = jax.jit(DeformConv2d(64, 3, groups=2, padding=1, modulated=True).init)(
        jax.random.key(0), x)
    params = variables["params"]
    bound = 1 / math.sqrt(32 // 2 * 3 * 3)  # 1/12
    torch_module = ref.DeformConv2d(32, 64, 3, groups=2)
    torch_bound = float(torch_module.weight.detach().abs().max())
    for name, value, samples in (("kernel", params["kernel"], 9216), ("bias", params["bias"], 64)):
        value = np.asarray(value)
        assert np.abs(value).max() <= bound, name
        # U(-b, b): std b / sqrt(3); an estimate from n samples within ~4 / sqrt(n) of it
        assert abs(value.std() * math.sqrt(3) / bound - 1) < 4 / math.sqrt(samples), name
        assert abs(value.mean()) < 4 * bound / math.sqrt(3 * samples), name
    assert params["kernel"].shape == (3, 3, 16, 64)
    assert 0.95 * bound < torch_bound <= bound  # the reference draws from the same range
    assert all(not np.any(v) for v in jax.tree.leaves(params["conv_offset"]))


def test_fresh_module_is_a_plain_convolution_and_trains_its_offsets():
    module = DeformConv2d(5, (3, 2), padding=(1, 0), modulated=True)
    x = jnp.asarray(random_nhwc(SHAPE, 7))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    plain = lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (0, 0)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(params):
        out = module.apply({"params": params}, x)
        return jnp.sum(out ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert_close(out, 0.5 * plain + variables["params"]["bias"])  # mask: sigmoid(0)
    assert float(jnp.abs(grads["conv_offset"]["kernel"]).max()) > 0


@pytest.mark.slow  # the functional bf16 test above is the default one
def test_module_bfloat16():
    module, variables, _ = _module_pair(ref.ModulatedDeformConv2dPack, 5, padding=1)
    x = random_nhwc(SHAPE, 6)
    expected = jax.jit(module.apply)(variables, x)
    out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), expected, rtol=5e-2)


def test_module_bad_calls_and_state_dicts():
    x = jnp.zeros(SHAPE)

    def init(module, *args):
        return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)

    offset = jnp.zeros((2, 5, 4, 18))
    with pytest.raises(ValueError, match="offset was passed but offset_conv=True"):
        init(DeformConv2d(4, offset_conv=True), x, offset)
    with pytest.raises(ValueError, match="offset was passed but modulated=True"):
        init(DeformConv2d(4, modulated=True), x, offset)
    with pytest.raises(ValueError, match="mask was passed without offset"):
        init(DeformConv2d(4), x, None, jnp.zeros((2, 5, 4, 9)))
    with pytest.raises(ValueError, match="offset is required with offset_conv=False"):
        init(DeformConv2d(4, offset_conv=False), x)
    with pytest.raises(ValueError, match="modulated=True needs conv_offset"):
        init(DeformConv2d(4, modulated=True, offset_conv=False), x, offset)
    with pytest.raises(ValueError, match=r"x channels \(4\) must be divisible by groups \(3\)"):
        init(DeformConv2d(6, groups=3), x)
    pack = state_dict(ref.ModulatedDeformConv2dPack(4, 6, 3))
    with pytest.raises(ValueError, match=r"misshaped keys.*conv_offset\.weight"):
        from_torch(DeformConv2d(6), pack)  # DCNv1 predicts 18 channels, DCNv2 27
    with pytest.raises(ValueError, match=r"unexpected keys \['conv_offset\.bias', "
                                         r"'conv_offset\.weight'\]"):
        from_torch(DeformConv2d(6, offset_conv=False), pack)
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        from_torch(DeformConv2d(6), state_dict(ref.DeformConv2dPack(4, 6, 3)))
