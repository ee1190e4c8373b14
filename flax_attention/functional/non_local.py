"""Pure functions: non-local operations (Wang, Girshick, Gupta, He, CVPR 2018).

`y_i = sum_j f(theta_i, phi_j) g_j / C(x)` over flattened positions, for the paper's four
pairwise functions. Axis legend: B batch, C channels, Lq query positions, Lk key positions
(`Lk < Lq` when the keys are sub-sampled); Ck the channels of theta and phi, Cg those of g.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_choice, check_nonempty, check_rank, check_same
from flax_attention.functional.blockwise import (
    IMPLEMENTATIONS,
    accumulated_einsum,
    attention_logits,
    attention_weights,
    blockwise_attention,
)
from flax_attention.kernels._common import pick_implementation

__all__ = ["MODES", "SOFTMAX_MODES", "non_local", "non_local_weights"]

# The pairwise functions: softmax(x_i . x_j) on the input itself, softmax(theta_i . phi_j),
# theta_i . phi_j / Lk, and relu(w . [theta_i, phi_j]) / Lk.
MODES = ("gaussian", "embedded", "dot", "concatenate")
# The modes whose weights are a softmax: these go through `blockwise_attention`.
SOFTMAX_MODES = ("gaussian", "embedded")


def _check_weights_inputs(theta: jax.Array, phi: jax.Array, mode: str,
                          concat_weights: jax.Array | None, use_scale: bool) -> None:
    check_choice("mode", mode, MODES)
    check_rank("theta", theta, 3, "[B, Lq, Ck]")
    check_rank("phi", phi, 3, "[B, Lk, Ck]")
    check_same(("theta", "phi"), ((theta.shape[0], theta.shape[2]), (phi.shape[0], phi.shape[2])),
               "batch and channels", (theta.shape, phi.shape))
    check_nonempty("theta", theta, "[B, Lq, Ck]")
    check_nonempty("phi", phi, "[B, Lk, Ck]")
    if use_scale and mode != "embedded":
        raise ValueError(f"use_scale applies to mode 'embedded' only, got mode {mode!r}")
    if mode != "concatenate":
        if concat_weights is not None:
            raise ValueError(f"concat_weights is for mode 'concatenate' only, got mode {mode!r}")
        return
    if concat_weights is None:
        raise ValueError("mode 'concatenate' needs concat_weights [2 Ck]")
    check_rank("concat_weights", concat_weights, 1, "[2 Ck]")
    check_same(("theta", "concat_weights"), (2 * theta.shape[2], concat_weights.shape[0]),
               "channels (2 Ck)", (theta.shape, concat_weights.shape))


def _float32_or_wider(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def _scale(theta: jax.Array, use_scale: bool) -> float | None:
    """The logits' factor: 1 / sqrt(Ck) with `use_scale`, else None (no scaling)."""
    return 1 / math.sqrt(theta.shape[-1]) if use_scale else None


def _concatenation(theta: jax.Array, phi: jax.Array, concat_weights: jax.Array,
                   precision: lax.PrecisionLike) -> jax.Array:
    """`relu(w_theta . theta_i + w_phi . phi_j)`, never building `[B, 2 Ck, Lq, Lk]`."""
    dtype = _float32_or_wider(theta)
    w_theta, w_phi = jnp.split(concat_weights.astype(dtype), 2)
    a = jnp.einsum("bqc,c->bq", theta.astype(dtype), w_theta, precision=precision)
    b = jnp.einsum("bkc,c->bk", phi.astype(dtype), w_phi, precision=precision)
    return jax.nn.relu(a[:, :, None] + b[:, None, :])


def _weights(theta: jax.Array, phi: jax.Array, mode: str, concat_weights: jax.Array | None,
             use_scale: bool, precision: lax.PrecisionLike) -> jax.Array:
    """`non_local_weights` without the checks."""
    num_keys = phi.shape[1]
    if mode == "concatenate":
        return _concatenation(theta, phi, concat_weights, precision) / num_keys
    if mode == "dot":
        return attention_logits(theta, phi, precision=precision) / num_keys
    return attention_weights(theta, phi, scale=_scale(theta, use_scale), precision=precision)


def non_local_weights(
    theta: jax.Array,
    phi: jax.Array,
    mode: str = "embedded",
    concat_weights: jax.Array | None = None,
    use_scale: bool = False,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The normalised pairwise weights `f(theta_i, phi_j) / C(x)` (the reference's `nl_map`).

    Args:
      theta: `[B, Lq, Ck]` (the input itself in mode "gaussian").
      phi: `[B, Lk, Ck]` (the, possibly sub-sampled, input itself in mode "gaussian").
      mode: "gaussian" or "embedded": softmax over keys of `theta_i . phi_j` (the two differ only
        in what the caller passes as theta and phi); "dot": `theta_i . phi_j / Lk`;
        "concatenate": `relu(concat_weights . [theta_i, phi_j]) / Lk`.
      concat_weights: `[2 Ck]`, mode "concatenate" only: the weight of the reference's
        `concat_project` conv, theta's half first.
      use_scale: mode "embedded" only: divide the logits by `sqrt(Ck)` (mmcv's option; the
        reference does not).
      precision: of the matrix products.

    Returns:
      `[B, Lq, Lk]` weights, float32 (float64 for float64 inputs).
    """
    theta, phi, concat_weights = map(as_float, (theta, phi, concat_weights))
    _check_weights_inputs(theta, phi, mode, concat_weights, use_scale)
    return _weights(theta, phi, mode, concat_weights, use_scale, precision)


def non_local(
    theta: jax.Array,
    phi: jax.Array,
    g: jax.Array,
    mode: str = "embedded",
    concat_weights: jax.Array | None = None,
    use_scale: bool = False,
    precision: lax.PrecisionLike = None,
    *,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """The non-local operation `y_i = sum_j w(theta_i, phi_j) g_j`.

    The softmax modes ("gaussian", "embedded") go through `blockwise.blockwise_attention`: the
    whole `[B, Lq, Lk]` map up to `chunk_size` queries, blocks of `chunk_size` queries above
    (memory O(Lq); reverse-mode differentiation only), or cuDNN or the Pallas flash kernel when
    asked for. The modes "dot" and "concatenate" build the whole map in XLA.

    Args:
      theta: `[B, Lq, Ck]`.
      phi: `[B, Lk, Ck]`.
      g: `[B, Lk, Cg]`.
      mode, concat_weights, use_scale: as in `non_local_weights`.
      precision: of the matrix products.
      chunk_size: softmax modes: queries per block; None for `blockwise.DEFAULT_CHUNK_SIZE`.
      implementation: "xla", "pallas", "cudnn" or None as in `blockwise_attention`; "pallas"
        and "cudnn" are for the softmax modes only.

    Returns:
      `[B, Lq, Cg]` in g's dtype (the weights and their product with g are computed in
      float32; integer and boolean inputs are promoted to float32 first).

    Raises:
      ValueError: bad shapes, mode or arguments (see `non_local_weights`), or "pallas" for a
        mode without a kernel.
    """
    theta, phi, g, concat_weights = map(as_float, (theta, phi, g, concat_weights))
    _check_weights_inputs(theta, phi, mode, concat_weights, use_scale)
    check_rank("g", g, 3, "[B, Lk, Cg]")
    check_nonempty("g", g, "[B, Lk, Cg]")
    check_same(("phi", "g"), (phi.shape[:2], g.shape[:2]), "batch and key positions",
               (phi.shape, g.shape))
    if mode in SOFTMAX_MODES:
        out = blockwise_attention(theta, phi, g, scale=_scale(theta, use_scale),
                                  chunk_size=chunk_size, implementation=implementation,
                                  precision=precision)
        return out.astype(g.dtype)
    pick_implementation("non_local", implementation, IMPLEMENTATIONS,
                        {"pallas": f"mode {mode!r} has no Pallas kernel",
                         "cudnn": f"mode {mode!r} has no cuDNN kernel"})
    # The weights stay float32: cast to float16 first, `theta . phi / Lk` can overflow.
    weights = _weights(theta, phi, mode, concat_weights, use_scale, precision)
    return accumulated_einsum("bqk,bkc->bqc", weights, g, precision).astype(g.dtype)
