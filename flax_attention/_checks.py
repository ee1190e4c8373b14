"""Input validation shared by the functional ops and the modules.

Every check raises before any computation, with a message that names the argument, what was
expected and what was given (STYLE.md, item 5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax


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
