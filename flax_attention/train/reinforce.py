"""Training the Recurrent Attention Model: the hybrid supervised + REINFORCE loss.

Mnih et al. 2014 train the classifier, glimpse and core networks by backpropagation of the
classification loss, and the location policy by REINFORCE (Williams 1992) with reward R = 1 for
a correct final classification (given at every step), against a learned baseline b_t that
lowers the variance of the gradient estimate. The loss, per example and summed over steps t:

    loss = CE(logits, label) + sum_t (b_t - R)^2 / T - w * sum_t log pi(l_t) * stop_grad(R - b_t)

(w = `reinforce_weight`, 1 in the paper). Evaluation averages the class probabilities over M
location samples (`RamConfig.mc_samples`), the Monte Carlo estimate of the policy's
prediction. Training draws the locations from the "sample" stream with the key
`fold_in(key(seed), step)`, so a resumed run repeats the uninterrupted one exactly.

Axis legend: B batch, H height, W width, C channels, L the number of glimpses T, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from flax_attention import data
from flax_attention.glimpse import glimpse_extents
from flax_attention.models.ram import RamOutput, RecurrentAttentionModel

__all__ = [
    "RamConfig", "create_model", "evaluate", "hybrid_loss", "plot_glimpse_path", "predict",
    "reinforce_surrogate", "train_ram",
]


@dataclasses.dataclass(frozen=True)
class RamConfig:
    """Everything a RAM run depends on (saved with its checkpoints).

    Attributes:
      dataset, data_dir: passed to `data.load_dataset` (`cluttered-mnist` needs `data_dir`).
      num_glimpses, glimpse_size, num_scales, std, hidden, core, random_locations: the model's
        (see `RecurrentAttentionModel`).
      steps: optimiser steps; batch_size: examples per step; lr: Adam's learning rate;
      clip_norm: the global gradient norm is clipped to it.
      reinforce_weight: w, the weight of the REINFORCE term.
      mc_samples: M, location samples averaged at evaluation.
      seed: of the data order, the parameters and the locations.
      out: the run directory (metrics.jsonl, checkpoints); None writes nothing.
      resume: continue from the last checkpoint in `out`.
      checkpoint_every: steps between checkpoints (0: only at the end).
      eval_every: steps between test evaluations (0: only at the end).
      train_examples, test_examples: use only the first N examples (None: all).
      progress: show a tqdm progress bar.
    """

    dataset: str = "cluttered-digits"
    data_dir: str | None = None
    num_glimpses: int = 6
    glimpse_size: int = 12
    num_scales: int = 3
    std: float = 0.1
    hidden: int = 256
    core: str = "rnn"
    random_locations: bool = False
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 5.0
    reinforce_weight: float = 1.0
    mc_samples: int = 10
    seed: int = 0
    out: str | None = None
    resume: bool = False
    checkpoint_every: int = 500
    eval_every: int = 0
    train_examples: int | None = None
    test_examples: int | None = None
    progress: bool = True


def create_model(config: RamConfig, num_classes: int) -> RecurrentAttentionModel:
    return RecurrentAttentionModel(
        num_glimpses=config.num_glimpses, glimpse_size=config.glimpse_size,
        num_scales=config.num_scales, std=config.std, hidden=config.hidden, core=config.core,
        num_classes=num_classes, random_locations=config.random_locations,
    )


# --- the loss -------------------------------------------------------------------------------


def reinforce_surrogate(log_probs: jax.Array, rewards: jax.Array,
                        baselines: jax.Array | None = None) -> jax.Array:
    """The REINFORCE surrogate loss, whose gradient estimates -grad E[R].

    `-mean_B sum_L log pi(l_t) * stop_grad(R - b_t)`; the advantage carries no gradient, so the
    baselines are trained only by their own loss.

    Args:
      log_probs: `[B, L]` log pi(l_t), differentiable w.r.t. the policy.
      rewards: `[B]` or `[B, L]` R.
      baselines: `[B, L]` b_t, or None for none.

    Returns:
      A scalar.
    """
    rewards = jnp.broadcast_to(rewards[:, None] if rewards.ndim == 1 else rewards,
                               log_probs.shape)
    advantage = rewards if baselines is None else rewards - baselines
    return -jnp.mean(jnp.sum(log_probs * lax.stop_gradient(advantage), axis=1))


def hybrid_loss(output: RamOutput, labels: jax.Array,
                reinforce_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The hybrid loss of RAM (module docstring) and its parts.

    Args:
      output: the model's output for a batch.
      labels: `[B]` int.
      reinforce_weight: w.

    Returns:
      The scalar loss and the metrics "loss", "ce", "baseline_mse", "reinforce", "accuracy"
      (the fraction rewarded).
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels).mean()
    reward = (jnp.argmax(output.logits, -1) == labels).astype(jnp.float32)
    baseline_mse = jnp.mean((output.baselines - reward[:, None]) ** 2)
    reinforce = reinforce_surrogate(output.log_probs, reward, output.baselines)
    loss = ce + baseline_mse + reinforce_weight * reinforce
    metrics = {"loss": loss, "ce": ce, "baseline_mse": baseline_mse, "reinforce": reinforce,
               "accuracy": reward.mean()}
    return loss, metrics


# --- steps ----------------------------------------------------------------------------------


def _optimizer(config: RamConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(config.lr))


def _init_state(model: RecurrentAttentionModel, config: RamConfig,
                example: np.ndarray) -> train_state.TrainState:
    key = jax.random.key(config.seed)
    rngs = {"params": jax.random.fold_in(key, 1), "sample": jax.random.fold_in(key, 2)}
    params = jax.jit(model.init)(rngs, jnp.asarray(example))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=_optimizer(config))


def _sample_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of the locations drawn at training step `step` (a function of the step only)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), step)


@functools.partial(jax.jit, static_argnames=("seed", "reinforce_weight"), donate_argnums=0)
def _train_step(state: train_state.TrainState, images: jax.Array, labels: jax.Array, seed: int,
                reinforce_weight: float) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    def loss_fn(params):
        output = state.apply_fn({"params": params}, images,
                                rngs={"sample": _sample_key(seed, state.step)})
        return hybrid_loss(output, labels, reinforce_weight)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.apply_gradients(grads=grads), metrics


@functools.partial(jax.jit, static_argnames=("model", "mc_samples"))
def predict(model: RecurrentAttentionModel, params: Any, images: jax.Array, key: jax.Array,
            mc_samples: int = 10) -> jax.Array:
    """Class probabilities averaged over M location samples: `[B, H, W, C]` -> `[B, K]`."""

    def probs(k):
        return jax.nn.softmax(model.apply({"params": params}, images, rngs={"sample": k}).logits)

    return jax.vmap(probs)(jax.random.split(key, mc_samples)).mean(0)


def evaluate(model: RecurrentAttentionModel, params: Any, dataset: data.Dataset,
             batch_size: int = 250, mc_samples: int = 10, seed: int = 0) -> dict[str, float]:
    """Accuracy and error (%) of the M-sample prediction over all of `dataset`, and the mean
    negative log of the averaged probability of the label ("nll")."""
    correct, nll = 0, 0.0
    key = jax.random.fold_in(jax.random.key(seed), 4)
    batches = data.batches(dataset, min(batch_size, len(dataset)), drop_remainder=False)
    for i, (images, labels) in enumerate(batches):
        p = np.asarray(predict(model, params, images, jax.random.fold_in(key, i), mc_samples))
        correct += int((p.argmax(-1) == labels).sum())
        nll -= float(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).sum())
    n = len(dataset)
    return {"accuracy": correct / n, "error": 100.0 * (1 - correct / n), "nll": nll / n}
