"""Training the Recurrent Attention Model: the hybrid supervised + REINFORCE loss.

    from flax_attention.train.reinforce import RamConfig, train_ram
    metrics = train_ram(RamConfig(num_glimpses=6, steps=3000, out="runs/ram"))
    metrics["test_error"]

Mnih et al. 2014 train the classifier, glimpse and core networks by backpropagation of the
classification loss, and the location policy by REINFORCE (Williams 1992) with reward 1 for
a correct final classification, against a learned baseline b_t that lowers the variance of the
gradient estimate. The loss, averaged over the batch (`models.ram.hybrid_loss`):

    CE + mean_t (b_t - R_t)^2 - w sum_t log pi(l_t) stop_grad(R_t - b_t)

with w = `reinforce_weight` and, by default here, a reward for the classification after every
glimpse (R_t the sum of those from step t on, CE the mean over the steps; `step_rewards`) and
the REINFORCE gradient reaching the core and glimpse networks too (`reinforce_core`); see
`RamConfig` for why. Adam with the global gradient norm clipped.
Evaluation averages the class probabilities over M location samples (`mc_samples`), the Monte
Carlo estimate of the policy's prediction.

The skeleton (`train.trainer`, `train.loop`) does the rest, as for the supervised trainer: the
batch split over every device, `steps` or `epochs` (one counting rule), the log (a record every
`log_every` steps: the window's mean loss, its parts, the reward and images/s; one every
`eval_every` steps and at the end: the test error), checkpoints every `checkpoint_every` steps,
after each evaluation and on SIGINT/SIGTERM (then the status is "interrupted"). The locations of
step s are drawn with the key `fold_in(key(seed), s)` and the data order depends only on
(seed, epoch), so a resumed run (`resume=True`) ends with the parameters of an uninterrupted one.

Axis legend: B batch, H height, W width, C channels, L the number of glimpses T, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention import data
from flax_attention._checks import check_choice
from flax_attention.functional.ram import hybrid_loss, reinforce_surrogate
from flax_attention.glimpse import plot_glimpse_path
from flax_attention.models.ram import CORES, RamOutput, RecurrentAttentionModel
from flax_attention.train.loop import evaluate_run, open_run
from flax_attention.train.trainer import RunConfig, Trainer, TrainState, padded_batches

__all__ = [
    "RamConfig", "RamTrainer", "create_model", "evaluate", "evaluate_ram_run", "hybrid_loss",
    "load_run", "plot_glimpse_path", "predict", "reinforce_surrogate", "train_ram",
    "visualize_run",
]

_MODEL_FIELDS = ("num_glimpses", "glimpse_size", "num_scales", "std", "hidden", "core",
                 "random_locations", "method", "reinforce_core")


@dataclasses.dataclass(frozen=True)
class RamConfig(RunConfig):
    """What a RAM run is; saved with its checkpoints. A resume must give the same values,
    except for the fields in `RUNTIME` (so `steps` may grow: a resume trains further).

    Attributes:
      dataset, data_dir: passed to `data.load_dataset` (`cluttered-mnist` needs `data_dir`).
      num_glimpses, glimpse_size, num_scales, std, hidden, core, random_locations,
        reinforce_core, method: the model's (see `RecurrentAttentionModel`);
        `random_locations` gives the random-glimpse baseline. The core is an LSTM by default:
        in short runs on cluttered digits it learned faster than the paper's RNN.
      steps: optimiser steps; epochs: passes over the training set, when `steps` is None;
      batch_size: examples per step (divisible by the device count); lr: Adam's learning rate;
      clip_norm: the global gradient norm is clipped to it.
      reinforce_weight: w, the weight of the REINFORCE term.
      step_rewards: reward the classification after every glimpse (`hybrid_loss`).
      mc_samples: M, location samples averaged at evaluation.
      seed: of the parameters, the data order and the locations.
      out: the run directory.
      resume: continue from the latest checkpoint in `out`; without it, an `out` holding
        checkpoints is refused.
      checkpoint_every, log_every, eval_every: steps between checkpoints, loss records and test
        evaluations (`eval_every` 0: only at the end).
      train_examples, test_examples: use only the first N examples (None: all).
      data_seed: the generation seed of the embedded data sets.
      keep_checkpoints: the newest checkpoints kept.
      progress: show a tqdm progress bar.
      skip_nonfinite: skip the steps whose loss or gradient is NaN or Inf (else they stop
        the run, its last checkpoint finite).

    The defaults (std 0.2, `step_rewards`, `reinforce_core` with w = 0.05, 6000 steps) are
    the outcome of the pilots listed in `benchmarks/ram_results.py`: with the paper's setting
    (std 0.1, the final reward only, h detached, w = 1) the policy did not beat random glimpses
    within this budget; w = 1 with `reinforce_core` never left chance.
    """

    dataset: str = "cluttered-digits"
    data_dir: str | None = None
    num_glimpses: int = 6
    glimpse_size: int = 12
    num_scales: int = 3
    std: float = 0.2
    hidden: int = 256
    core: str = "lstm"
    random_locations: bool = False
    reinforce_core: bool = True
    method: str | None = None
    steps: int | None = 6000
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 5.0
    reinforce_weight: float = 0.05
    step_rewards: bool = True
    mc_samples: int = 10
    seed: int = 0
    out: str = "runs/ram-cluttered-digits"
    resume: bool = False
    checkpoint_every: int = 500
    log_every: int = 50
    eval_every: int = 0
    train_examples: int | None = None
    test_examples: int | None = None
    progress: bool = True
    data_seed: int = 0
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False

    KIND: ClassVar[str] = "reinforce"
    RUNTIME: ClassVar[tuple[str, ...]] = (
        "data_dir", "out", "resume", "steps", "epochs", "checkpoint_every", "eval_every",
        "progress", "method", "keep_checkpoints", "skip_nonfinite")
    BOUNDS: ClassVar[dict[str, float]] = {
        **RunConfig.BOUNDS, "num_glimpses": 1, "glimpse_size": 1, "num_scales": 1,
        "mc_samples": 1, "train_examples": 1, "test_examples": 1, "eval_every": 0,
        "reinforce_weight": 0}

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        check_choice("core", self.core, CORES)
        super().validate()
        for name in ("std", "lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def examples(self, split: str) -> int | None:
        return self.train_examples if split == "train" else self.test_examples


def create_model(config: RamConfig, num_classes: int) -> RecurrentAttentionModel:
    """The model of a config."""
    fields = {name: getattr(config, name) for name in _MODEL_FIELDS}
    return RecurrentAttentionModel(num_classes=num_classes, **fields)


# --- prediction and evaluation ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: RecurrentAttentionModel, params: Any, images: jax.Array,
           key: jax.Array) -> RamOutput:
    return model.apply({"params": params}, images, rngs={"sample": key})


@functools.partial(jax.jit, static_argnames=("model", "mc_samples"))
def predict(model: RecurrentAttentionModel, params: Any, images: jax.Array, key: jax.Array,
            mc_samples: int = 10) -> jax.Array:
    """Class probabilities averaged over M location samples: `[B, H, W, C]` -> `[B, K]`."""

    def probs(k):
        return jax.nn.softmax(_apply(model, params, images, k).logits)

    return jax.vmap(probs)(jax.random.split(key, mc_samples)).mean(0)


def _eval_sums(model: RecurrentAttentionModel, mc_samples: int, params: Any, images: jax.Array,
               labels: jax.Array, mask: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Correct M-sample predictions, the negative log of the averaged probability of the label
    and the count, summed over the examples of `[B]` `mask`."""
    p = predict(model, params, images, key, mc_samples)
    picked = jnp.take_along_axis(p, labels[:, None], -1)[:, 0]
    nll = jnp.where(mask, -jnp.log(jnp.maximum(picked, 1e-12)), 0.0)
    return {"correct": ((p.argmax(-1) == labels) & mask).sum(), "nll": nll.sum(),
            "count": mask.sum()}


def _eval_metrics(sums: dict[str, Any]) -> dict[str, float]:
    n = max(int(sums["count"]), 1)
    accuracy = float(sums["correct"]) / n
    return {"test_accuracy": accuracy, "test_error": 100.0 * (1 - accuracy),
            "test_nll": float(sums["nll"]) / n}


def evaluate(model: RecurrentAttentionModel, params: Any, dataset: data.Dataset,
             mc_samples: int = 10, seed: int = 0, batch_size: int = 200) -> dict[str, float]:
    """The M-sample prediction over all of `dataset` (in order, the last batch padded), on the
    default device: "test_accuracy", "test_error" (%) and "test_nll" (the mean negative log of
    the averaged probability of the label). Batch i draws with `fold_in(key(seed, 4), i)`, as
    a trainer's evaluation does."""
    key = jax.random.fold_in(jax.random.key(seed), 4)
    step = jax.jit(functools.partial(_eval_sums, model, mc_samples))
    sums = [step(params, *batch, jax.random.fold_in(key, i)) for i, batch in
            enumerate(padded_batches(dataset, min(batch_size, len(dataset))))]
    return _eval_metrics(jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums)))


# --- the trainer -----------------------------------------------------------------------------


class RamTrainer(Trainer):
    """The hybrid loss on RAM; sums its parts over each `log_every` window."""

    KIND = "reinforce"
    CONFIG = RamConfig
    METRICS = ("loss", "ce", "baseline_mse", "reinforce", "accuracy", "grad_norm")
    PARTITIONABLE_INIT = True

    def create_model(self) -> RecurrentAttentionModel:
        return create_model(self.config, self.num_classes)

    def create_optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.config.clip_norm),
                           optax.adam(self.config.lr))

    def init_variables(self, key: jax.Array) -> tuple[dict, jax.Array]:
        rngs = {"params": jax.random.fold_in(key, 1), "sample": jax.random.fold_in(key, 2)}
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return self.model.init(rngs, dummy), jax.random.fold_in(key, 3)

    def loss(self, params, state, images, labels, key):
        output = self.model.apply({"params": params}, images, rngs={"sample": key})
        loss, metrics = hybrid_loss(output, labels, self.config.reinforce_weight,
                                    self.config.step_rewards)
        return loss, (state.batch_stats, metrics)

    def eval_batch(self, variables, images, labels, mask, key):
        return _eval_sums(self.model, self.config.mc_samples, variables["params"], images,
                          labels, mask, key)

    def eval_metrics(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        return _eval_metrics(sums)

    def eval_details(self) -> dict[str, Any]:
        return {"mc_samples": self.config.mc_samples}

    def log_record(self, step: int, state: TrainState, metrics: dict) -> dict[str, Any]:
        return self.sums_mean(step, state)

    @property
    def sums_period(self) -> int:
        return self.config.log_every

    def evaluates_at(self, step: int) -> bool:
        return bool(self.config.eval_every) and step % self.config.eval_every == 0


def train_ram(config: RamConfig) -> dict[str, Any]:
    """Trains RAM as `config` says (`loop.fit`); see the module docstring.

    Returns:
      "status" ("completed" or "interrupted"), "step", the final test metrics
      ("test_accuracy", "test_error" in %, "test_nll"; absent when interrupted), "wall_s" and
      the median "img_per_s" of this process.

    Raises:
      ValueError: a bad config, an unwritable out dir, an unknown data set, or (a
        `CheckpointError`) checkpoints in the way, incompatible or corrupt.
    """
    result = RamTrainer(config).fit(config.resume)
    return {**result.metrics, "status": result.status}


# --- a finished run ---------------------------------------------------------------------------


def load_run(run_dir: str | Path, step: int | None = None
             ) -> tuple[RamConfig, RecurrentAttentionModel, Any, int]:
    """The config, the model, the parameters and the step of a run's checkpoint (default the
    latest)."""
    trainer, state, meta = open_run(run_dir, step=step)
    if not isinstance(trainer, RamTrainer):
        raise ValueError(f"{run_dir} is a {trainer.KIND} run, not a RAM one")
    return trainer.config, trainer.model, state.params, meta["step"]


def evaluate_ram_run(run_dir: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """The test metrics of a run's latest checkpoint (`loop.evaluate_run`), with its "step"
    and "mc_samples"."""
    return evaluate_run(run_dir, data_dir)


def visualize_run(run_dir: str | Path, path: str | Path, num_images: int = 4, seed: int = 0,
                  data_dir: str | None = None) -> Path:
    """Draws the glimpse paths of a run's latest checkpoint on the first `num_images` test
    images to a PNG (`plot_glimpse_path`), titled with label and prediction; returns `path`."""
    config, model, params, _ = load_run(run_dir)
    dataset = data.load_dataset(config.dataset, "test", config.data_seed,
                                data_dir or config.data_dir)
    images, labels = dataset.images[:num_images], dataset.labels[:num_images]
    output = _apply(model, params, jnp.asarray(images), jax.random.key(seed))
    predicted = np.asarray(output.logits).argmax(-1)
    titles = [f"label {y}, predicted {p}" for y, p in zip(labels, predicted, strict=True)]
    return plot_glimpse_path(images, np.asarray(output.locations), path, config.glimpse_size,
                             config.num_scales, titles=titles)
