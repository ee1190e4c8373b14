"""Pure functions of the Recurrent Attention Model (Mnih et al., "Recurrent Models of Visual
Attention", NeurIPS 2014): the log-density of the Gaussian location policy and the hybrid loss
(classification, baseline regression and the REINFORCE surrogate) that
`flax_attention.train.reinforce` minimises.

Axis legend: B batch, L the number of glimpses, K classes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from flax_attention._checks import as_float, check_nonempty, check_rank, check_same

__all__ = ["gaussian_log_prob", "hybrid_loss", "reinforce_surrogate"]


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: float | jax.Array) -> jax.Array:
    """Log-density of an isotropic Gaussian, summed over the last axis: `[..., D]` -> `[...]`.

    `sum_d -(x_d - mean_d)^2 / (2 std^2) - log(std) - log(2 pi) / 2`, in at least float32.

    Args:
      x: `[..., D]` the samples.
      mean: the means, broadcastable with x (e.g. `[..., D]` or `[D]`).
      std: the standard deviation, positive and finite: a number, or an array broadcastable
        with x.

    Returns:
      `[...]` (the broadcast shape of the three without its last axis), at least float32.

    Raises:
      ValueError: shapes that do not broadcast to a rank >= 1, or a std that is not positive
        and finite (checked unless std is traced, e.g. an argument of a jitted function).
    """
    x, mean = as_float(x), as_float(mean)
    shapes = {"x": x.shape, "mean": mean.shape, "std": np.shape(std)}
    try:
        shape = np.broadcast_shapes(*shapes.values())
    except ValueError:
        shape = None
    if not shape:
        listing = ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())
        raise ValueError(f"x, mean and std must broadcast to a shape [..., D] of rank >= 1; "
                         f"got {listing}")
    if not isinstance(std, jax.core.Tracer):
        values = np.asarray(std)
        if not np.all((values > 0) & np.isfinite(values)):
            raise ValueError(f"std must be positive and finite, got a minimum of {values.min()} "
                             f"(std of shape {values.shape})")
    dtype = jnp.promote_types(jnp.result_type(x, mean), jnp.float32)
    z = (x.astype(dtype) - mean.astype(dtype)) / std
    per_dim = -0.5 * z**2 - jnp.log(jnp.asarray(std, dtype)) - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(-1)


def reinforce_surrogate(log_probs: jax.Array, rewards: jax.Array,
                        baselines: jax.Array | None = None) -> jax.Array:
    """The REINFORCE surrogate loss, whose gradient estimates -grad E[R].

    `-mean_B sum_L log pi(l_t) * stop_grad(R - b_t)`; the advantage carries no gradient, so the
    baselines are trained only by their own loss.

    Args:
      log_probs: `[B, L]` log pi(l_t), differentiable w.r.t. the policy.
      rewards: `[B]`, `[B, 1]` (one return for every step) or `[B, L]` R.
      baselines: `[B, L]` b_t, or None for none.

    Returns:
      A scalar, accumulated in float32 (float64 for float64 inputs) whatever the inputs' dtype.

    Raises:
      ValueError: an empty or misshaped log_probs, or rewards or baselines that do not match it.
    """
    log_probs, rewards, baselines = map(as_float, (log_probs, rewards, baselines))
    check_rank("log_probs", log_probs, 2, "[B, L]")
    check_nonempty("log_probs", log_probs, "[B, L]")
    b, steps = log_probs.shape
    if rewards.shape not in ((b,), (b, 1), (b, steps)):
        raise ValueError(f"rewards must have shape [B] {(b,)}, [B, 1] {(b, 1)} or [B, L] "
                         f"{(b, steps)} for log_probs {tuple(log_probs.shape)}, got "
                         f"{tuple(rewards.shape)}")
    inputs = [log_probs, rewards]
    if baselines is not None:
        check_same(("log_probs", "baselines"), (log_probs.shape, baselines.shape),
                   "shape [B, L]", (log_probs.shape, baselines.shape))
        inputs.append(baselines)
    dtype = jnp.promote_types(jnp.result_type(*inputs), jnp.float32)
    rewards = rewards.astype(dtype)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    advantage = rewards if baselines is None else rewards - baselines.astype(dtype)
    return -jnp.mean(jnp.sum(log_probs.astype(dtype) * lax.stop_gradient(advantage), axis=1))


def _check_hybrid_inputs(output: Any, labels: jax.Array, step_rewards: bool) -> None:
    fields = ("logits", "log_probs", "baselines", "step_logits")
    if not all(hasattr(output, name) for name in fields):
        raise TypeError(f"output must have the fields {fields} (a models.ram.RamOutput), got "
                        f"{type(output).__name__}")
    check_rank("output.logits", output.logits, 2, "[B, K]")
    check_rank("labels", labels, 1, "[B]")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    batch, classes = output.logits.shape
    check_same(("output.logits", "labels"), (batch, labels.shape[0]), "batch",
               (output.logits.shape, labels.shape))
    check_rank("output.log_probs", output.log_probs, 2, "[B, L]")
    check_same(("output.logits", "output.log_probs"), (batch, output.log_probs.shape[0]),
               "batch", (output.logits.shape, output.log_probs.shape))
    check_same(("output.log_probs", "output.baselines"),
               (output.log_probs.shape, output.baselines.shape), "shape [B, L]",
               (output.log_probs.shape, output.baselines.shape))
    if step_rewards:
        if output.step_logits is None:
            raise ValueError("step_rewards needs output.step_logits [B, L, K], got None")
        check_same(("output.step_logits", "output.log_probs"),
                   (output.step_logits.shape, (*output.log_probs.shape, classes)),
                   "shape [B, L, K]", (output.step_logits.shape, output.log_probs.shape))


def hybrid_loss(output: Any, labels: jax.Array, reinforce_weight: float = 1.0,
                step_rewards: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The hybrid loss of RAM and its parts, averaged over the batch:

        CE + mean_t (b_t - R_t)^2 - w sum_t log pi(l_t) stop_grad(R_t - b_t)

    By default (the paper's) CE is that of the final logits and the return R_t = r, the reward
    r = 1 for a correct final classification, 0 otherwise, for every t. With `step_rewards`,
    the classification after every glimpse is rewarded, r_t = 1 when `step_logits[:, t]` is
    right, l_t earns the return R_t = sum_{s >= t} r_s (so a location is credited as soon as it
    helps), and CE is the mean over the steps.

    Args:
      output: the model's output for a batch (`models.ram.RamOutput`: `logits` `[B, K]`,
        `log_probs` and `baselines` `[B, L]`, `step_logits` `[B, L, K]` or None).
      labels: `[B]` int.
      reinforce_weight: w.
      step_rewards: reward every step (needs `output.step_logits`).

    Returns:
      The scalar loss and the metrics "loss", "ce", "baseline_mse", "reinforce", "accuracy"
      (the fraction of final classifications that are right).

    Raises:
      TypeError: an `output` without those fields, or labels that are not integers.
      ValueError: `step_rewards` without `output.step_logits`, or shapes that do not agree
        (the logits `[B, K]`, the labels `[B]`, the step logits `[B, L, K]`; `log_probs` and
        `baselines` as in `reinforce_surrogate`).
    """
    labels = jnp.asarray(labels)
    _check_hybrid_inputs(output, labels, step_rewards)
    logits = output.step_logits if step_rewards else output.logits[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, None]).mean()
    correct = (jnp.argmax(logits, -1) == labels[:, None]).astype(jnp.float32)
    reward = jnp.cumsum(correct[:, ::-1], axis=1)[:, ::-1] if step_rewards else correct
    baseline_mse = jnp.mean((output.baselines - reward) ** 2)
    reinforce = reinforce_surrogate(output.log_probs, reward, output.baselines)
    loss = ce + baseline_mse + reinforce_weight * reinforce
    metrics = {"loss": loss, "ce": ce, "baseline_mse": baseline_mse, "reinforce": reinforce,
               "accuracy": correct[:, -1].mean()}
    return loss, metrics
