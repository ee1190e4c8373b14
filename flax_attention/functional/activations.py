"""Pure functions: the activations and gates of timm's `create_act_layer`, by name.

timm's attention layers take `act_layer` and `gate_layer` as names ("relu", "sigmoid",
"hard_sigmoid", ...) or as layer classes; the modules of this library take the same names, or
any function `jax.Array -> jax.Array`. Names are looked up as timm looks them up: lower-cased.
Only timm's parameter-free activations are here (`prelu` owns a weight).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flax_attention._checks import check_choice

__all__ = ["ACTIVATIONS", "Activation", "activation_function"]

Activation = str | Callable[[jax.Array], jax.Array]


def _hard_mish(x: jax.Array) -> jax.Array:
    return 0.5 * x * jnp.clip(x + 2, 0, 2)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# timm's `_ACT_LAYER_DEFAULT` names (`timm/layers/create_act.py`), torch's definitions: `gelu` is
# the exact (erf) one, `hard_sigmoid` is `relu6(x + 3) / 6`, `leaky_relu` has slope 0.01.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": jax.nn.mish,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "hardsigmoid": jax.nn.hard_sigmoid,
    "hard_swish": jax.nn.hard_swish,
    "hardswish": jax.nn.hard_swish,
    "hard_mish": _hard_mish,
    "identity": lambda x: x,
}


def activation_function(activation: Activation,
                        argument: str = "act_layer") -> Callable[[jax.Array], jax.Array]:
    """`activation` as a function: a name of `ACTIVATIONS` (any case, as timm's) or a callable.

    Args:
      activation: the name or the function.
      argument: the name of the argument it came in, for the error.

    Raises:
      ValueError: an unknown name, or neither a name nor a callable.
    """
    if callable(activation):
        return activation
    if not isinstance(activation, str):
        raise ValueError(f"{argument} must be a name of {tuple(ACTIVATIONS)} or a function, "
                         f"got {activation!r}")
    check_choice(argument, activation.lower(), ACTIVATIONS)
    return ACTIVATIONS[activation.lower()]
