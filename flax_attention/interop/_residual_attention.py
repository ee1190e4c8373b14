"""Residual Attention Network: torch -> Flax converters (see torch.py).

The PyTorch twin (tests/reference/residual_attention.py) names every submodule as the Flax
module does (`first_0`, `down_1_0`, `mask_conv2`, `attention_module2_1.trunk_0.conv2`, ...), so
the rules mirror the Flax variable tree: path components joined by ".", `kernel`/`scale` ->
`weight`, `mean`/`var` -> `running_mean`/`running_var`. No published checkpoint uses these
names: the common port (tengshaofeng) names its submodules per stage (`softmax1_blocks`, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from flax_attention.interop.torch import (
    Converter,
    Rule,
    Rules,
    Shapes,
    conv_kernel,
    dense_kernel,
    identity,
    register,
)
from flax_attention.models.residual_attention import ResidualAttentionNetwork
from flax_attention.residual_attention import ResidualAttentionModule

_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def _example(module, channels: int) -> tuple[jax.Array]:
    side = module.total_stride if isinstance(module, ResidualAttentionNetwork) else 8
    return (jnp.zeros((1, side, side, channels), jnp.float32),)


def _rule(path: tuple[str, ...], ndim: int) -> Rule:
    *modules, leaf = path[1:]
    transform = identity
    if leaf == "kernel":
        transform = conv_kernel if ndim == 4 else dense_kernel
    return Rule(".".join([*modules, _LEAF_NAMES[leaf]]), transform)


def _mirror_rules(module) -> Rules:
    """One rule per variable of `module`, the torch key mirroring the Flax path."""
    channels = 3 if isinstance(module, ResidualAttentionNetwork) else 4
    shapes = jax.eval_shape(module.init, jax.random.key(0), *_example(module, channels))
    flat = traverse_util.flatten_dict(shapes)
    return {path: _rule(path, len(s.shape)) for path, s in flat.items()}


def _module_inputs(module: ResidualAttentionModule, shapes: Shapes) -> tuple[jax.Array]:
    return _example(module, shapes["trunk_0.bn1.weight"][0])


def _network_inputs(module: ResidualAttentionNetwork, shapes: Shapes) -> tuple[jax.Array]:
    return _example(module, shapes["conv1.conv.weight"][1])


register(ResidualAttentionModule)(Converter(_mirror_rules, _module_inputs))
register(ResidualAttentionNetwork)(Converter(_mirror_rules, _network_inputs))
