"""Bad and unusual input (issue 16): integer inputs give the float result, and every refused
input raises a ValueError/TypeError whose message names the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_attention as fa
from flax_attention import cli, layers, models
from flax_attention import functional as F
from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
from flax_attention.functional import cbam, eca, effective_se, gather_excite, global_context
from flax_attention.functional.non_local import MODES
from flax_attention.interop.torch import from_torch
from flax_attention.models.classifiers import AttentionCNN
from flax_attention.multi_head_attention import MultiHeadAttention
from flax_attention.non_local import NonLocal1D, NonLocal2D, NonLocal3D
from flax_attention.spatial_transformer import LocalizationNet
from flax_attention.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderLayer,
)

KEY = jax.random.key(0)
Q = jnp.arange(120).reshape(2, 3, 4, 5) % 5  # integer [B, H, W, C]
SEQ = Q.reshape(2, 12, 1, 5)  # integer [B, L, N, D]
FLAT = Q.reshape(2, 12, 5)  # integer [B, L, C]
W16 = jnp.arange(16).reshape(4, 4) % 3 - 1  # integer [C, C]


def _channel_attention_module(x):
    variables = {"params": {"gamma": jnp.ones((1,))}}
    return ChannelAttention().apply(variables, x)


# (name, op): op(x) on the integer input must equal op(x * 1.0), in a floating dtype.
INTEGER_OPS = [
    ("position_attention", lambda x: F.position_attention(x, x, x)),
    ("channel_attention", F.channel_attention),
    ("ChannelAttention", _channel_attention_module),
    ("criss_cross_attention", lambda x: F.criss_cross_attention(x, x, x)),
    ("criss_cross_aggregate",
     lambda x: F.criss_cross_aggregate(F.criss_cross_weights(x * 1.0, x * 1.0), x)),
    ("dot_product_attention", lambda x: F.dot_product_attention(*(x.reshape(SEQ.shape),) * 3)),
    ("blockwise_attention", lambda x: F.blockwise_attention(*(x.reshape(FLAT.shape),) * 3)),
    *[(f"non_local {mode}",
       lambda x, mode=mode: F.non_local(*(x.reshape(FLAT.shape),) * 3, mode=mode,
                                        concat_weights=(jnp.arange(10) % 3 - 1
                                                        if mode == "concatenate" else None)))
      for mode in MODES],
    ("affine_grid", lambda x: F.affine_grid(x[:2, 0, :3, :2].reshape(2, 2, 3) % 2, (3, 4))),
    ("bilinear_sample",
     lambda x: F.bilinear_sample(x, F.affine_grid(jnp.tile(jnp.eye(2, 3), (2, 1, 1)) * 0.7,
                                                  (3, 4)))),
    ("squeeze_excitation", lambda x: F.squeeze_excitation(x, jnp.ones((5, 2)), jnp.ones((2, 5)))),
    ("attention_residual", lambda x: F.attention_residual(x, x % 2)),
    ("interpolate_bilinear", lambda x: F.interpolate_bilinear(x, (5, 7))),
    ("eca", lambda x: eca.eca(x, jnp.array([1, 0, -1]))),
    ("effective_se", lambda x: effective_se.effective_se(x, jnp.eye(5), jnp.zeros(5))),
    ("gather_excite", lambda x: gather_excite.gather_excite(x)),
    ("global_context", lambda x: global_context.global_context(x, x[..., 0])[0]),
    ("cbam_spatial_pool", cbam.cbam_spatial_pool),
    ("coordinate_pool", F.coordinate_pool),
    ("selective_kernel_fuse", lambda x: F.selective_kernel_fuse(x[:, None])),
]


@pytest.mark.parametrize(("name", "op"), INTEGER_OPS, ids=[n for n, _ in INTEGER_OPS])
def test_integer_inputs_give_the_float_result(name, op):
    out, expected = op(Q), op(Q * 1.0)
    assert jnp.issubdtype(out.dtype, jnp.floating), name
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_integer_position_attention_is_not_truncated():
    assert float(F.position_attention(Q, Q, Q).max()) == pytest.approx(4.0, abs=1e-3)


def test_affine_grid_of_an_integer_identity_is_the_base_grid():
    grid = F.affine_grid(jnp.tile(jnp.eye(2, 3, dtype=jnp.int32), (1, 1, 1)), (1, 2))
    np.testing.assert_allclose(grid[0, 0], [[-0.5, 0.0], [0.5, 0.0]])


def test_float16_non_local_dot_does_not_overflow():
    x = jnp.full((1, 1, 64), 40.0, jnp.float16)  # the weight theta . phi = 102400 > 65504
    g = jnp.full((1, 1, 2), 1 / 1024, jnp.float16)
    out = F.non_local(x, x, g, mode="dot")
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(out.astype(jnp.float32), 100.0, rtol=1e-3)


def _init(module, *args, **kwargs):
    return lambda: jax.eval_shape(module.init, KEY, *args, **kwargs)


def _state_dict():
    d = {f"{n}.{p}": torch.randn(8 if p == "bias" else (8, 16, 1, 1)) for n in ("g", "theta", "phi")
         for p in ("weight", "bias")}
    d["W.0.weight"], d["W.0.bias"] = torch.randn(16, 8, 1, 1), torch.randn(16)
    d |= {f"W.1.{p}": torch.rand(16) for p in ("weight", "bias", "running_mean", "running_var")}
    return d


_NL = NonLocal2D(sub_sample=False)
EMPTY = jnp.zeros((2, 0, 4, 8))

# (name, thunk, exception, text the message must contain)
REFUSED = [
    ("combine_masks rank-1", lambda: F.combine_masks(jnp.zeros(3, bool)), ValueError,
     "key_padding_mask"),
    ("combine_masks rank-3", lambda: F.combine_masks(None, jnp.zeros((1, 2, 3), bool)),
     ValueError, "attn_mask"),
    ("combine_masks int", lambda: F.combine_masks(None, jnp.zeros((2, 3), int)), TypeError,
     "attn_mask"),
    ("combine_masks int padding", lambda: F.combine_masks(jnp.zeros((2, 3), int)), TypeError,
     "key_padding_mask"),
    *[(f"sine temperature {t}",
       lambda t=t: F.sine_position_embedding(jnp.zeros((1, 2, 2), bool), 4, temperature=t),
       ValueError, "temperature") for t in (0.0, -1.0)],
    ("SE zero channels",
     lambda: F.squeeze_excitation_gates(jnp.zeros((1, 2, 2, 0)), jnp.zeros((0, 1)),
                                        jnp.zeros((1, 0))), ValueError, "x must not be empty"),
    ("TransformerEncoder num_layers=-1",
     _init(TransformerEncoder(num_layers=-1), jnp.ones((1, 2, 8))), ValueError, "num_layers"),
    ("TransformerDecoder num_layers=0",
     _init(TransformerDecoder(num_layers=0), jnp.ones((1, 2, 8)), jnp.ones((1, 3, 8))),
     ValueError, "num_layers"),
    ("dim_feedforward=0", _init(TransformerEncoderLayer(nhead=2, dim_feedforward=0),
                                jnp.ones((1, 2, 8))), ValueError, "dim_feedforward"),
    ("RCCAModule recurrence=-1", _init(RCCAModule(8, recurrence=-1, reduction=1),
                                       jnp.ones((1, 4, 4, 8))), ValueError, "recurrence"),
    ("RCCAModule dropout=1.5", _init(RCCAModule(8, dropout=1.5, reduction=1),
                                     jnp.ones((1, 4, 4, 8))), ValueError, "dropout"),
    ("RCCAModule out_channels=0", _init(RCCAModule(0, reduction=1), jnp.ones((1, 4, 4, 8))),
     ValueError, "out_channels"),
    ("DANetHead out_channels=0", _init(DANetHead(0), jnp.ones((1, 4, 4, 64))), ValueError,
     "out_channels"),
    # Zero-size batch, channels, H, W or keys.
    ("position_attention H=0", lambda: F.position_attention(EMPTY, EMPTY, EMPTY), ValueError,
     "q must not be empty"),
    ("channel_attention C=0", lambda: F.channel_attention(jnp.zeros((1, 2, 2, 0))), ValueError,
     "x must not be empty"),
    ("PositionAttention B=0", _init(PositionAttention(), jnp.zeros((0, 4, 4, 8))), ValueError,
     "x must not be empty"),
    ("ChannelAttention W=0", _init(ChannelAttention(), jnp.zeros((1, 4, 0, 8))), ValueError,
     "x must not be empty"),
    ("DANetHead C=0", _init(DANetHead(3), jnp.zeros((1, 4, 4, 0))), ValueError,
     "x must not be empty"),
    ("NonLocal1D L=0", _init(NonLocal1D(sub_sample=False), jnp.zeros((1, 0, 4))), ValueError,
     "x must not be empty"),
    ("NonLocal2D C=0", _init(NonLocal2D(), jnp.zeros((1, 4, 4, 0))), ValueError,
     "x must not be empty"),
    ("NonLocal3D B=0", _init(NonLocal3D(), jnp.zeros((0, 2, 4, 4, 4))), ValueError,
     "x must not be empty"),
    ("MultiHeadAttention S=0",
     _init(MultiHeadAttention(2), jnp.ones((1, 2, 8)), jnp.zeros((1, 0, 8)), jnp.zeros((1, 0, 8))),
     ValueError, "key must not be empty"),
    ("LocalizationNet B=0", _init(LocalizationNet(), jnp.zeros((0, 28, 28, 1))), ValueError,
     "x must not be empty"),
    ("LocalizationNet 10x10", _init(LocalizationNet(), jnp.zeros((1, 10, 10, 1))), ValueError,
     "too small"),
    ("criss_cross_attention H=0", lambda: F.criss_cross_attention(EMPTY, EMPTY, EMPTY),
     ValueError, "q must not be empty"),
    ("CrissCrossAttention H=0", _init(CrissCrossAttention(), EMPTY), ValueError,
     "x must not be empty"),
    ("blockwise_attention 0 keys",
     lambda: F.blockwise_attention(jnp.ones((1, 3, 4)), jnp.ones((1, 0, 4)), jnp.ones((1, 0, 4))),
     ValueError, "v must not be empty"),
    ("dot_product_attention 0 keys",
     lambda: F.dot_product_attention(jnp.ones((1, 3, 1, 4)), *(jnp.ones((1, 0, 1, 4)),) * 2),
     ValueError, "k must not be empty"),
    *[(f"{cls.__name__} {axis}=0", _init(cls(), jnp.zeros(shape)), ValueError,
       "x must not be empty")
      for cls in (fa.EcaModule, fa.CecaModule, fa.EffectiveSEModule, fa.GatherExcite,
                  fa.GlobalContext, fa.CbamModule, fa.CoordAttention, fa.SelectiveKernel)
      for axis, shape in (("B", (0, 4, 4, 16)), ("H", (1, 0, 4, 16)), ("C", (1, 4, 4, 0)))],
    *[(f"{name} {axis}=0", _init(models.create(name, num_classes=3), jnp.zeros(shape)),
       ValueError, f"{arg} must not be empty")
      for name, arg in (("resnet18", "x"), ("ram_6_8x8_1", "images"), ("detr-small", "images"))
      for axis, shape in (("B", (0, 32, 32, 3)), ("H", (1, 0, 32, 3)))],
    ("effective_se_gates H=0",
     lambda: effective_se.effective_se_gates(jnp.ones((2, 0, 4, 8)), jnp.ones((8, 8)),
                                             jnp.ones(8)), ValueError, "x must not be empty"),
    ("DeformConv2d C=0", _init(fa.DeformConv2d(4), jnp.zeros((1, 4, 4, 0))), ValueError,
     "x must not be empty"),
    ("bilinear_sample H=0", lambda: F.bilinear_sample(EMPTY, jnp.zeros((2, 3, 3, 2))), ValueError,
     "image must not be empty"),
    # Settings.
    ("create num_classes=-1", lambda: models.create(models.list_models()[0], num_classes=-1),
     ValueError, "num_classes"),
    ("create(18)", lambda: models.create(18), TypeError, "name"),
    ("learned_position_embedding height=-1",
     lambda: F.learned_position_embedding(jnp.ones((4, 2)), jnp.ones((4, 2)), 1, -1, 2),
     ValueError, "height"),
    ("generalized_box_iou_loss mismatched",
     lambda: F.generalized_box_iou_loss(jnp.ones((3, 4)), jnp.ones((5, 4))), ValueError,
     "boxes1 and boxes2"),
    # from_torch.
    ("from_torch list", lambda: from_torch(_NL, list(_state_dict().items())), TypeError,
     "state_dict"),
    ("from_torch rank-1 weight",
     lambda: from_torch(_NL, _state_dict() | {"g.weight": torch.ones(8)}), ValueError,
     "misshaped keys"),
    ("from_torch Flax layout",
     lambda: from_torch(_NL, _state_dict() | {"W.0.weight": torch.ones(1, 1, 8, 16)}), ValueError,
     "W.0.weight: expected (1, 1, 8, 16), got (1, 1, 8, 16) (Flax layout; the state_dict needs "
     "torch's [O, I, k0, k1] = (16, 8, 1, 1))"),
    ("from_torch scalar bias",
     lambda: from_torch(MultiHeadAttention(2), {"in_proj_weight": torch.ones(48, 16),
                                                "in_proj_bias": torch.ones(48),
                                                "out_proj.weight": torch.ones(16, 16),
                                                "out_proj.bias": torch.tensor(1.0)}),
     ValueError, "out_proj.bias"),
    # Zero widths, strides and queries in the networks' settings.
    ("ConvBN features=0", _init(layers.ConvBN(0), jnp.ones((1, 8, 8, 3))), ValueError,
     "features must be an integer >= 1, got 0"),
    ("ConvBN strides=0", _init(layers.ConvBN(4, strides=0), jnp.ones((1, 8, 8, 3))),
     ValueError, "strides must be an integer >= 1, got 0"),
    ("PointwiseConv strides=0",
     _init(layers.PointwiseConv(4, strides=0), jnp.ones((1, 8, 8, 3))), ValueError,
     "strides must be an integer >= 1, got 0"),
    ("AttentionCNN features=(16, 0, 8, 8)",
     _init(AttentionCNN(features=(16, 0, 8, 8)), jnp.ones((1, 16, 16, 1))), ValueError,
     "features[1] must be an integer >= 1, got 0"),
    ("LocalizationNet features=(0, 10)",
     _init(LocalizationNet(features=(0, 10)), jnp.ones((1, 28, 28, 1))), ValueError,
     "features[0] must be an integer >= 1, got 0"),
    ("Transformer with zero queries",
     _init(Transformer(d_model=8, nhead=2, dim_feedforward=8), jnp.ones((1, 2, 2, 8)),
                   None, jnp.ones((0, 8)), jnp.ones((1, 2, 2, 8))), ValueError,
     "query_embed must not be empty"),
]


@pytest.mark.parametrize(("name", "thunk", "error", "text"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_a_message_naming_the_argument(name, thunk, error, text):
    with pytest.raises(error) as info:
        thunk()
    assert text in str(info.value), name


def test_from_torch_loads_a_bfloat16_state_dict():
    state = _state_dict()
    loaded = from_torch(_NL, {k: v.bfloat16() for k, v in state.items()})
    reference = from_torch(_NL, {k: v.bfloat16().float() for k, v in state.items()})
    assert loaded["params"]["g"]["kernel"].dtype == jnp.float32  # the module's param_dtype
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["train", "--out", ""], "argument --out: must be a directory path"),
    (["visualize", "--run", "r", "--out", " "], "argument --out: must be a directory path"),
])
def test_cli_refuses_non_finite_numbers_and_empty_paths(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


# timm's attentions take `channels` as their first argument; the modules accept it (checked
# against the input) and take every other field by keyword, so that a call ported from timm,
# `EffectiveSEModule(32)`, can neither set another field (it set `add_maxpool` before) nor
# build another module than timm's.
TIMM_FIRST_ARGUMENT = [
    ("EffectiveSEModule", "channels"), ("GatherExcite", "channels"),
    ("GlobalContext", "channels"), ("CbamModule", "channels"), ("LightCbamModule", "channels"),
    ("SelectiveKernel", "in_channels"), ("CoordAttention", "channels"),
    ("SEModule", "channels"), ("EcaModule", "channels"), ("CecaModule", "channels"),
]


@pytest.mark.parametrize(("name", "field"), TIMM_FIRST_ARGUMENT,
                         ids=[n for n, _ in TIMM_FIRST_ARGUMENT])
def test_timm_first_argument_is_the_channels(name, field):
    import flax_attention

    cls = getattr(flax_attention, name)
    x = jax.random.normal(KEY, (2, 6, 5, 32))
    variables = cls().init(KEY, x)
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(KEY, a.shape), variables)
    np.testing.assert_array_equal(cls(32).apply(variables, x), cls().apply(variables, x))
    assert getattr(cls(32), field) == 32
    if name in ("EcaModule", "CecaModule"):  # timm: the kernel size follows `channels`
        return
    with pytest.raises(ValueError, match=rf"{field}=16, but the input has 32 channels"):
        cls(16).init(KEY, x)
    with pytest.raises(TypeError, match="positional"):
        cls(32, 2)


def test_selective_kernel_attention_first_argument_is_the_channels():
    from flax_attention import SelectiveKernelAttn

    paths = jnp.ones((1, 2, 3, 3, 16))
    SelectiveKernelAttn(16).init(KEY, paths)
    with pytest.raises(ValueError, match=r"channels=8, but the input has 16 channels"):
        SelectiveKernelAttn(8).init(KEY, paths)
