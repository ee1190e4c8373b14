"""The PyTorch spatial transformer tutorial's whole network (`Net` in pytorch/tutorials,
intermediate_source/spatial_transformer_tutorial.py), for 1-channel 28 x 28 MNIST digits.

Jaderberg, Simonyan, Zisserman, Kavukcuoglu: "Spatial Transformer Networks", NeurIPS 2015. The
tutorial's state dict keys (`localization.{0,3}`, `fc_loc.{0,2}`, `conv1`, `conv2`, `fc1`,
`fc2`; `conv2_drop` has none) load whole: `from_torch(create("stn_tutorial_net"), sd)`.

Differences from the tutorial: NHWC; dropout is off unless `deterministic=False` (the tutorial
follows `model.train()`); initialisation is Flax's default, except the transform's, which
starts at the identity as the tutorial's does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    dense,
    image_input,
    nested,
    register,
    rules_for,
)
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer

__all__ = ["STNTutorialNet"]


class STNTutorialNet(nn.Module):
    """The tutorial's `Net`: the spatial transformer (`LocalizationNet`, `fc_loc`, the input's
    size, torch's `affine_grid`/`grid_sample` defaults), then conv1 (5x5, 10) - max-pool 2 -
    ReLU, conv2 (5x5, 20) - `conv2_drop` (Dropout2d) - max-pool 2 - ReLU, flatten (torch's NCHW
    order: 320 features for 28 x 28), fc1 (50) - ReLU - dropout, fc2, log-softmax.

    Returns log-probabilities `[B, num_classes]`, as the tutorial does (its loss is NLL); they
    are also valid logits for a softmax cross-entropy.

    Attributes:
      num_classes: outputs of `fc2` (10: MNIST).
      dropout: rate of `conv2_drop` (whole channels) and of the dropout after fc1 (torch's 0.5).
    """

    num_classes: int = 10
    dropout: float = 0.5
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """`[B, 28, 28, C]` images -> `[B, num_classes]` log-probabilities."""
        check_image("x", x)
        kw = layers.numerics(self)
        # parent=None: the transformer adopts it, as its "localization".
        x = SpatialTransformer(LocalizationNet(parent=None, **kw), name="stn", **kw)(x)
        x = nn.Conv(10, (5, 5), padding="VALID", name="conv1", **kw)(x)
        x = nn.relu(layers.max_pool(x, (2, 2)))
        x = nn.Conv(20, (5, 5), padding="VALID", name="conv2", **kw)(x)
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic)
        x = nn.relu(layers.max_pool(x, (2, 2)))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's view(-1, 320)
        x = nn.relu(nn.Dense(50, name="fc1", **kw)(x))
        x = nn.Dropout(self.dropout)(x, deterministic)
        x = nn.Dense(self.num_classes, name="fc2", **kw)(x)
        return jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(
            x.dtype)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------

def _rules(module: STNTutorialNet) -> Rules:
    stn = SpatialTransformer(LocalizationNet())
    rules = nested(rules_for(stn), ("stn",), "")
    rules |= conv(("conv1",), "conv1") | conv(("conv2",), "conv2")
    return rules | dense(("fc1",), "fc1") | dense(("fc2",), "fc2")


def _inputs(module: STNTutorialNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, "localization.0.weight", side=28)


register(STNTutorialNet)(Converter(_rules, _inputs))
