"""non_local: torch -> Flax converters (see torch.py).

Keys are AlexHex7/Non-local_pytorch's: `g`, `theta`, `phi` (`g.0`, `phi.0` when sub-sampling
wraps them with the pool; mode "gaussian" has no `theta` and a parameter-free `phi`), `W.0`
(conv) and `W.1` (BatchNorm), or `W` (conv) without `bn_layer`, and `concat_project.0` (the
`Conv2d(2 inter, 1, 1, bias=False)` of mode "concatenate").
"""

from __future__ import annotations

import jax
import numpy as np

from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    param,
    register,
)
from flax_attention.non_local import NonLocal1D, NonLocal2D, NonLocal3D

NonLocal = NonLocal1D | NonLocal2D | NonLocal3D


def _concat_vector(a: np.ndarray) -> np.ndarray:
    """torch `[1, 2 inter, 1, 1]` -> `[2 inter]` (ValueError for any other layout)."""
    return a.reshape(a.shape[1])


def _g_key(module: NonLocal) -> str:
    return "g.0" if module.sub_sample else "g"


def _rules(module: NonLocal) -> Rules:
    rules = conv(("g",), _g_key(module))
    if module.mode != "gaussian":
        rules |= conv(("theta",), "theta")
        rules |= conv(("phi",), "phi.0" if module.sub_sample else "phi")
    if module.mode == "concatenate":
        rules |= param(("concat_project",), "concat_project.0.weight", _concat_vector)
    if module.bn_layer:
        return rules | conv(("W_0",), "W.0") | batch_norm(("W_1",), "W.1")
    return rules | conv(("W",), "W")


def _inputs(module: NonLocal, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, f"{_g_key(module)}.weight", side=4,
                       spatial_dims=module.spatial_dims)


register(NonLocal1D, NonLocal2D, NonLocal3D)(Converter(_rules, _inputs))
