"""The mechanism table: one row names everything about an attention mechanism.

In the spirit of timm's `layers/create_attn.py`: every attention mechanism of the library is one
`Mechanism` in `MECHANISMS`, and everything that enumerates mechanisms reads this table:

- `flax-attention list` and `demo` (the module factory and its demo input shapes);
- the small classifiers `<short>-cnn` of `models.classifiers` (where the block goes);
- `flax-attention visualize` (which picture the sown "attention" intermediate makes);
- `python -m benchmarks.run --only NAME` (the benchmark modules of a mechanism);
- the tests: one walks the table and, for every row, builds the module, applies it, loads the
  state_dict of its torch reference with `from_torch`, runs `demo` and draws its picture; the
  kernel tests lower every kernel a row names.

Converters are not listed here: each family file registers its module's converter with
`interop.torch.register` where the module is defined, so importing a module registers it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from flax_attention.cbam import CbamModule, LightCbamModule
from flax_attention.coord_attention import CoordAttention
from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
from flax_attention.deform_conv import DeformConv2d
from flax_attention.deformable_attention import MSDeformAttn
from flax_attention.eca import CecaModule, EcaModule
from flax_attention.effective_se import EffectiveSEModule
from flax_attention.functional.deformable_attention import SpatialShapes
from flax_attention.gather_excite import GatherExcite
from flax_attention.global_context import GlobalContext
from flax_attention.multi_head_attention import MultiHeadAttention
from flax_attention.non_local import NonLocal2D
from flax_attention.residual_attention import ResidualAttentionModule
from flax_attention.selective_kernel import SelectiveKernel
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer
from flax_attention.squeeze_excitation import SEBottleneck, SELayer

__all__ = ["MECHANISMS", "Mechanism", "PICTURES", "get", "names"]

# What `visualize` draws of a module's sown ("intermediates", "attention"):
PICTURES = (
    "stn",          # the transformed images [B, h, w, C] (sown by visualize itself)
    "gates",        # channel gates [B, C]
    "spatial",      # one spatial map [B, H, W] over the image
    "criss_cross",  # criss-cross weights [B, H, W, H+W-1]
    "dense",        # full query-key maps [B, H*W, L]
    "matrix",       # a weight matrix [B, ..., T, S] (channels x channels, heads' tokens)
    "points",       # sampling points [B, Q, N, 2], normalised (x, y) in [0, 1] of the image
)


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One row of the table.

    Attributes:
      name: the module's class name as `flax-attention list` prints it (unique).
      short: the short name (timm's `create_attn` name where it has one): the classifier
        `<short>-cnn`, the visualize picture's file name, `bench --only`.
      build: the module factory, a `functools.partial` of the module class with the demo
        fields; `build(dtype=..., param_dtype=..., precision=..., name=...)` must work.
      demo_shapes: the shapes of the inputs of `demo` and of the table test.
      torch_reference: `("<file>.<Class>", kwargs)`: the torch reference class in
        `tests/reference/<file>.py` (upstream parameter names) and its constructor arguments,
        fitting `demo_shapes`; `from_torch(build(), reference.state_dict())` loads it.
      paper: authors and year.
      picture: one of `PICTURES`, what `visualize` draws of it.
      classifier: where `AttentionCNN` puts it for the `<short>-cnn` classifier: "block" (after
        a conv block), "front" (on the input), or None (no classifier).
      takes_train: its `__call__` takes `train` (it has BatchNorm).
      call_kwargs: extra keyword arguments of `demo`'s call.
      benchmarks: the modules of `benchmarks/` whose `CASES` time it.
      kernels: the modules of `flax_attention.kernels` it can run on.
    """

    name: str
    short: str
    build: Callable[..., nn.Module]
    demo_shapes: tuple[tuple[int, ...], ...]
    torch_reference: tuple[str, Mapping[str, Any]]
    paper: str
    picture: str
    classifier: str | None = None
    takes_train: bool = False
    call_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    benchmarks: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()

    @property
    def module_type(self) -> type[nn.Module]:
        build = self.build
        while isinstance(build, functools.partial):
            build = build.func
        return build


def _resolve(entries: tuple[Mechanism, ...]) -> tuple[Mechanism, ...]:
    """The table, checked: names and short names unique, pictures and placements known."""
    for field in ("name", "short"):
        values = [getattr(m, field) for m in entries]
        if len(set(values)) != len(values):
            raise ValueError(f"mechanism table: duplicate {field}s in {values}")
    for m in entries:
        if m.picture not in PICTURES:
            raise ValueError(f"mechanism {m.name}: picture must be one of {PICTURES}, "
                             f"got {m.picture!r}")
        if m.classifier not in (None, "block", "front"):
            raise ValueError(f"mechanism {m.name}: classifier must be None, 'block' or 'front', "
                             f"got {m.classifier!r}")
    return entries


_IMAGE = ((2, 16, 16, 64),)  # the demo input of the image mechanisms, [B, H, W, C]
_C = _IMAGE[0][-1]
_p = functools.partial

MECHANISMS: tuple[Mechanism, ...] = _resolve((
    Mechanism("SELayer", "se", _p(SELayer, reduction=8), _IMAGE,
              ("squeeze_excitation.SELayer", {"channels": _C, "reduction": 8}),
              "Hu et al. 2018", "gates", classifier="block",
              benchmarks=("benchmarks.squeeze_excitation", "benchmarks.resnet")),
    Mechanism("SEBottleneck", "se-bottleneck",
              _p(SEBottleneck, planes=_C // 4, use_downsample=False), _IMAGE,
              ("squeeze_excitation.SEBottleneck", {"inplanes": _C, "planes": _C // 4}),
              "Hu et al. 2018", "gates", takes_train=True),
    Mechanism("NonLocal2D", "nl", _p(NonLocal2D, mode="embedded"), _IMAGE,
              ("non_local.NonLocalBlock", {"in_channels": _C, "dimension": 2}),
              "Wang et al. 2018", "dense", classifier="block", takes_train=True,
              benchmarks=("benchmarks.non_local", "benchmarks.blockwise"),
              kernels=("flash",)),
    Mechanism("PositionAttention", "pam", _p(PositionAttention, reduction=8), _IMAGE,
              ("danet.PositionAttention", {"channels": _C}), "Fu et al. 2019", "dense",
              classifier="block", benchmarks=("benchmarks.danet", "benchmarks.blockwise"),
              kernels=("flash",)),
    Mechanism("ChannelAttention", "cam", _p(ChannelAttention), _IMAGE,
              ("danet.ChannelAttention", {}), "Fu et al. 2019", "matrix",
              classifier="block", benchmarks=("benchmarks.danet",)),
    Mechanism("DANetHead", "danet-head", _p(DANetHead, out_channels=19), _IMAGE,
              ("danet.DANetHead", {"channels": _C, "out_channels": 19}), "Fu et al. 2019",
              "dense", takes_train=True),
    Mechanism("CrissCrossAttention", "cca", _p(CrissCrossAttention, reduction=8), _IMAGE,
              ("criss_cross.CrissCrossAttention", {"in_dim": _C}), "Huang et al. 2019",
              "criss_cross", classifier="block",
              benchmarks=("benchmarks.criss_cross", "benchmarks.kernels_criss_cross"),
              kernels=("criss_cross",)),
    Mechanism("RCCAModule", "rcca", _p(RCCAModule, out_channels=32, num_classes=19), _IMAGE,
              ("criss_cross.RCCAModule",
               {"in_channels": _C, "out_channels": 32, "num_classes": 19}),
              "Huang et al. 2019", "criss_cross", takes_train=True, kernels=("criss_cross",)),
    Mechanism("SpatialTransformer", "stn",
              _p(SpatialTransformer, LocalizationNet(), out_hw=(28, 28)), ((2, 28, 28, 1),),
              ("spatial_transformer.TutorialSTN", {"out_hw": (28, 28)}),
              "Jaderberg et al. 2015", "stn", classifier="front",
              benchmarks=("benchmarks.spatial_transformer", "benchmarks.kernels_bilinear"),
              kernels=("bilinear",)),
    Mechanism("MultiHeadAttention", "mha", _p(MultiHeadAttention, num_heads=8),
              ((2, 10, _C), (2, 12, _C), (2, 12, _C)),
              ("torch.nn.MultiheadAttention", {"embed_dim": _C, "num_heads": 8}),
              "Vaswani et al. 2017; Carion et al. 2020", "matrix",
              benchmarks=("benchmarks.transformer",)),
    Mechanism("ResidualAttentionModule", "residual-attention",
              _p(ResidualAttentionModule, stage=2), _IMAGE,
              ("residual_attention.AttentionModule", {"channels": _C, "levels": 2}),
              "Wang et al. 2017", "spatial", takes_train=True,
              benchmarks=("benchmarks.residual_attention",)),
    # The timm family (timm's class names and `create_attn` short names).
    Mechanism("EcaModule", "eca", _p(EcaModule), _IMAGE, ("eca.EcaModule", {"channels": _C}),
              "Wang et al. 2020", "gates", classifier="block", benchmarks=("benchmarks.eca",)),
    Mechanism("CecaModule", "ceca", _p(CecaModule), _IMAGE, ("eca.CecaModule", {"channels": _C}),
              "Wang et al. 2020", "gates", classifier="block", benchmarks=("benchmarks.eca",)),
    Mechanism("EffectiveSEModule", "ese", _p(EffectiveSEModule), _IMAGE,
              ("effective_se.EffectiveSEModule", {"channels": _C}), "Lee & Park 2020", "gates",
              classifier="block", benchmarks=("benchmarks.effective_se",)),
    Mechanism("GatherExcite", "ge", _p(GatherExcite), _IMAGE,
              ("gather_excite.GatherExcite", {"channels": _C}), "Hu et al. 2018", "gates",
              classifier="block", takes_train=True, benchmarks=("benchmarks.gather_excite",)),
    Mechanism("GlobalContext", "gc", _p(GlobalContext), _IMAGE,
              ("global_context.GlobalContext", {"channels": _C}), "Cao et al. 2019",
              "spatial", classifier="block", benchmarks=("benchmarks.global_context",)),
    Mechanism("CbamModule", "cbam", _p(CbamModule), _IMAGE, ("cbam.CbamModule", {"channels": _C}),
              "Woo et al. 2018", "spatial", classifier="block", takes_train=True,
              benchmarks=("benchmarks.cbam",)),
    Mechanism("LightCbamModule", "lcbam", _p(LightCbamModule), _IMAGE,
              ("cbam.LightCbamModule", {"channels": _C}), "Woo et al. 2018", "spatial",
              classifier="block", takes_train=True, benchmarks=("benchmarks.cbam",)),
    Mechanism("SelectiveKernel", "sk", _p(SelectiveKernel), _IMAGE,
              ("selective_kernel.SelectiveKernel", {"in_channels": _C}), "Li et al. 2019",
              "gates", classifier="block", takes_train=True,
              benchmarks=("benchmarks.selective_kernel",)),
    Mechanism("CoordAttention", "ca", _p(CoordAttention), _IMAGE,
              ("coord_attention.CoordAttn", {"channels": _C}), "Hou et al. 2021",
              "spatial", classifier="block", takes_train=True,
              benchmarks=("benchmarks.coord_attention",)),
    # Deformable DETR: 10 queries over two levels of 8 x 8 and 4 x 4 pixels (S = 80).
    Mechanism("MSDeformAttn", "msda", _p(MSDeformAttn, d_model=_C, n_levels=2, n_points=3),
              ((2, 10, _C), (2, 10, 2, 2), (2, 80, _C)),
              ("deformable_attention.MSDeformAttn", {"d_model": _C, "n_levels": 2,
                                                     "n_points": 3}),
              "Zhu et al. 2021", "points",
              call_kwargs={"spatial_shapes": SpatialShapes(((8, 8), (4, 4)))},
              benchmarks=("benchmarks.deformable_attention",),
              kernels=("deformable_attention",)),
    # DCNv2 (mmcv's ModulatedDeformConv2dPack): a 3x3 deformable convolution C -> C.
    Mechanism("DeformConv2d", "deform", _p(DeformConv2d, features=_C, padding=1, modulated=True),
              _IMAGE, ("deform_conv.ModulatedDeformConv2dPack",
                       {"in_channels": _C, "out_channels": _C, "kernel_size": 3, "padding": 1}),
              "Dai et al. 2017; Zhu et al. 2019", "points", classifier="block",
              benchmarks=("benchmarks.deform_conv",)),
))
_BY_NAME = {**{m.name: m for m in MECHANISMS}, **{m.short: m for m in MECHANISMS}}


def names() -> list[str]:
    """The mechanisms' names, in table order."""
    return [m.name for m in MECHANISMS]


def get(name: str) -> Mechanism:
    """The row of `name` (a class name such as "CrissCrossAttention" or a short name, "cca").

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]
