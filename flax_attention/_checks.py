"""Input validation shared by the functional ops and the modules.

Every check raises before any computation, with a message that names the argument, what was
expected and what was given (STYLE.md, item 5).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

# The dtype rule of the whole library: integer and boolean inputs of the functional ops are
# promoted to this dtype on entry, as `jax.nn` does; floating inputs keep their dtype.
DEFAULT_FLOAT = jnp.float32


def as_float(x):
    """`x` as an array of a floating dtype: integer/bool -> float32; floating `x` (and None) as is.

    Called first by every public functional op on its array inputs (not on boolean masks), so
    `position_attention(q, q, q)` with an integer `q` equals the same with `q * 1.0` instead of
    truncating the attention weights to zero.
    """
    if x is None:
        return None
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
        return x
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(DEFAULT_FLOAT)


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    """Raises ValueError unless `x` has `rank` dimensions; `layout` is e.g. "[B, H, W, C]"."""
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)} (rank {x.ndim})"
        )


def check_same(names: Sequence[str], dims: Sequence[int], what: str, shapes: Sequence) -> None:
    """Raises ValueError unless every entry of `dims` is equal.

    Args:
      names: argument names, one per dim.
      dims: the sizes that must agree.
      what: what they measure, e.g. "batch and spatial dimensions".
      shapes: the full shapes, printed in the message.
    """
    if len(set(dims)) > 1:
        listing = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"{' and '.join(names)} must agree in {what}; got {listing}")


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    """Raises ValueError unless `divisor` divides `value` (e.g. channels by the reduction)."""
    if divisor < 1 or value % divisor:
        raise ValueError(
            f"{name} ({value}) must be divisible by {divisor_name} ({divisor})"
        )


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raises ValueError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_nonempty(name: str, x: jax.Array, layout: str) -> None:
    """Raises ValueError if a dimension of `x` is zero; `layout` names them ("[B, H, W, C]")."""
    if 0 in x.shape:
        raise ValueError(
            f"{name} must not be empty: every dimension of {layout} must be at least 1, "
            f"got shape {tuple(x.shape)}"
        )


def check_image(name: str, x: jax.Array) -> None:
    """Raises ValueError unless `x` is an image batch `[B, H, W, C]` with no zero dimension."""
    check_rank(name, x, 4, "[B, H, W, C]")
    check_nonempty(name, x, "[B, H, W, C]")


def check_reducible(name: str, channels: int, reduction: int, what: str = "reduction") -> None:
    """Raises ValueError unless `channels // reduction` (floored, as the torch references'
    `C // reduction`) is at least 1."""
    if channels < reduction:
        raise ValueError(f"{name} ({channels}) must be at least {what} ({reduction}): the "
                         f"projection has {name} // {what} channels")


def check_declared_channels(name: str, declared: int | None, x: jax.Array) -> None:
    """Raises ValueError when a module's optional channel count `declared` (timm's leading
    `channels` argument) is given and differs from the last axis of its input `x`."""
    if declared is not None and declared != x.shape[-1]:
        raise ValueError(
            f"{name}={declared!r}, but the input has {x.shape[-1]} channels (shape "
            f"{tuple(x.shape)}); the module takes its channels from the input, so {name} "
            f"may be left out"
        )


def check_positive(name: str, value, minimum: int = 1) -> None:
    """Raises ValueError unless the integer setting `value` is at least `minimum`."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_probability(name: str, value) -> None:
    """Raises ValueError unless `value` is a rate in [0, 1] (e.g. a dropout rate)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
