"""squeeze_excitation: torch -> Flax converters (see torch.py).

Keys are moskomule/senet.pytorch's: `fc.0.weight`, `fc.2.weight` for `SELayer` (`se.fc.*` in
the blocks, whose converter is the residual blocks' one in `_resnet.py`).
"""

from __future__ import annotations

import jax

from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    dense_kernel,
    image_input,
    param,
    register,
)
from flax_attention.squeeze_excitation import SELayer


def se_layer_rules(module: SELayer) -> Rules:
    del module
    return param(("fc_0",), "fc.0.weight", dense_kernel) | param(
        ("fc_2",), "fc.2.weight", dense_kernel
    )


def _se_layer_inputs(module: SELayer, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "fc.0.weight")


register(SELayer)(Converter(se_layer_rules, _se_layer_inputs))
