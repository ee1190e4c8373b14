"""The model registry: every whole network by name, as timm's `create_model`.

    >>> from flax_attention.models import registry
    >>> net = registry.create("se_resnet50", num_classes=10, dtype=jax.numpy.bfloat16)
    >>> registry.list_models()[:3]
    ['ccnet_resnet101', 'ccnet_resnet50', 'danet_resnet101']

Each name maps to a `functools.partial` of one generic module (`ResNet`,
`ResidualAttentionNetwork`, `DANet`, `CCNet`, `DETR`); `create` fills in the remaining fields.
Every model has `dtype` and `param_dtype` fields.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from types import MappingProxyType

import flax.linen as nn

from flax_attention._checks import check_positive
from flax_attention.models import (
    byobnet,
    cifar_resnet,
    detr,
    ram,
    residual_attention,
    resnet,
    segmentation,
    small,
    stn_tutorial,
    timm_resnet,
)

__all__ = ["create", "list_models"]

_MODELS: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType({
    # classifiers: num_classes defaults to 1000 (ImageNet), 10 for the CIFAR variants
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "se_resnet18": resnet.se_resnet18,
    "se_resnet34": resnet.se_resnet34,
    "se_resnet50": resnet.se_resnet50,
    "se_resnet101": resnet.se_resnet101,
    "se_resnet152": resnet.se_resnet152,
    "se_resnext50_32x4d": resnet.se_resnext50_32x4d,
    # moskomule/senet.pytorch's CIFAR networks (senet/se_resnet.py, CifarSEResNet)
    "se_resnet20": cifar_resnet.se_resnet20,
    "se_resnet32": cifar_resnet.se_resnet32,
    "se_resnet56": cifar_resnet.se_resnet56,
    "se_resnet110": cifar_resnet.se_resnet110,
    # timm's names and state dict layout (timm/models/resnet.py, sknet.py, byobnet.py)
    "gcresnet50t": byobnet.gcresnet50t,
    "resnet50d": timm_resnet.resnet50d,
    "seresnet18": timm_resnet.seresnet18,
    "seresnet34": timm_resnet.seresnet34,
    "seresnet50": timm_resnet.seresnet50,
    "seresnet50t": timm_resnet.seresnet50t,
    "ecaresnet26t": timm_resnet.ecaresnet26t,
    "ecaresnet50d": timm_resnet.ecaresnet50d,
    "ecaresnet50t": timm_resnet.ecaresnet50t,
    "cbam_resnet50": timm_resnet.cbam_resnet50,
    "skresnet18": timm_resnet.skresnet18,
    "skresnet34": timm_resnet.skresnet34,
    "residual_attention_56": residual_attention.residual_attention_56,
    "residual_attention_92": residual_attention.residual_attention_92,
    "residual_attention_56_cifar": residual_attention.residual_attention_56_cifar,
    "residual_attention_92_cifar": residual_attention.residual_attention_92_cifar,
    # tengshaofeng/ResidualAttentionNetwork-pytorch's own networks and keys (10 classes)
    "residual_attention_56_port": residual_attention.residual_attention_56_port,
    "residual_attention_92_port": residual_attention.residual_attention_92_port,
    "residual_attention_92_32input_update":
        residual_attention.residual_attention_92_32input_update,
    # the PyTorch spatial transformer tutorial's `Net` (MNIST, 28 x 28 x 1, 10 classes)
    "stn_tutorial_net": stn_tutorial.STNTutorialNet,
    # segmenters: num_classes defaults to 19 (Cityscapes)
    "danet_resnet50": segmentation.danet_resnet50,
    "danet_resnet101": segmentation.danet_resnet101,
    "ccnet_resnet50": segmentation.ccnet_resnet50,
    "ccnet_resnet101": segmentation.ccnet_resnet101,
    # the reference repositories' own segmenters (speedinghzl/CCNet, junfu1115/DANet)
    "ccnet_deep_resnet101": segmentation.ccnet_deep_resnet101,
    "danet_deep_resnet50": segmentation.danet_deep_resnet50,
    "danet_deep_resnet101": segmentation.danet_deep_resnet101,
    # kevinzakka/recurrent-visual-attention's RAM: its current code, its shipped checkpoint
    "ram_6_8x8_1": ram.ram_6_8x8_1,
    "ram_6_8x8_2": ram.ram_6_8x8_2,
    # detector: num_classes defaults to 91 (COCO's ids; the logits have one more, "no object")
    "detr_resnet50": detr.detr_resnet50,
    # small networks for the embedded 64 x 64 canvases (train --model; models.small)
    "detr-small": small.detr_small,
    "danet-small": small.danet_small,
    "ccnet-small": small.ccnet_small,
    "fcn-small": small.fcn_small,
})


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create(name: str, num_classes: int | None = None, weights: str | os.PathLike | None = None,
           **overrides) -> nn.Module:
    """Builds the model registered as `name`.

    Args:
      name: one of `list_models()`.
      num_classes: classes of the classifier, the segmenter or the detector; None keeps the
        model's default (with `weights`: the weights' count).
      weights: a weights directory of this model (`flax-attention convert --out`).
      **overrides: any other field of the model, e.g. `dtype=jnp.bfloat16`, `backbone=...`.

    Returns:
      The (unbound) Flax module; with `weights`, the module bound to them (`net(x)` runs it,
      `net.unbind()` gives the module and its variables).

    Raises:
      ValueError: if `name` is not registered (the message lists the known names),
        `num_classes` is not a positive integer, or `weights` are not this model's (another
        model, another `num_classes`) or unreadable.
      TypeError: if `name` is not a string, or an override is not a field of the model.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (a str, one of list_models()), got "
                        f"{name!r} of type {type(name).__name__}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint}; known names: "
                         f"{', '.join(list_models())}")
    if num_classes is not None:
        check_positive("num_classes", num_classes)
        overrides["num_classes"] = num_classes
    if weights is not None:
        from flax_attention.convert import load_weights

        _, overrides["num_classes"], variables = load_weights(weights, name, num_classes)
        return _MODELS[name](**overrides).bind(variables)
    return _MODELS[name](**overrides)
