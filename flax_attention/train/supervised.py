"""The supervised trainer: a classifier on a data set of `flax_attention.data`, resumable.

    result = train(TrainConfig(model="stn-cnn", epochs=12, out="runs/stn"))
    result.status, result.metrics["test_accuracy"]

AdamW or Nesterov SGD under a warmup-cosine schedule; cross-entropy; dropout keys folded from
the step; a test evaluation after each epoch and at the end. The skeleton (`train.trainer`,
`train.loop`) does the rest: data parallelism over every device, the log (every `log_every`
steps: loss, learning rate, images/s; every epoch: train and test loss and accuracy),
checkpoints, interruption and a resume that ends as an uninterrupted run.

Only classifiers train here: the small CNNs of `models.classifiers` and the registry's
ResNets and residual attention networks when the images fit them; the registry's segmenters
and detectors (`train.segmentation`, `train.detection`) and the detection and segmentation data
sets are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from flax_attention import data
from flax_attention._checks import check_choice
from flax_attention.models.classifiers import create_classifier, list_classifiers
from flax_attention.train import parallel
from flax_attention.train.loop import TrainResult, evaluate_run, open_run
from flax_attention.train.trainer import RunConfig, Trainer, TrainState

__all__ = ["SupervisedTrainer", "TrainConfig", "TrainResult", "eval_step", "evaluate_run",
           "list_trainable", "load_config", "restore_run", "train"]

OPTIMIZERS = ("adam", "sgd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What a run is; saved with every checkpoint. A resume must give the same values, except
    for the fields in `RUNTIME`.

    Attributes:
      model: a name of `models.classifiers.create_classifier`.
      dataset: a name of `data.load_dataset` (the `*mnist` ones need `data_dir`).
      epochs: passes over the training set (unless `steps` is set).
      steps: optimiser steps; when set, they fix the run length instead of `epochs`.
      batch_size: global batch (divisible by the device count); the last partial batch of an
        epoch is dropped.
      lr: peak learning rate.
      optimizer: "adam" (AdamW when `weight_decay` > 0) or "sgd" (Nesterov momentum).
      momentum: of "sgd".
      weight_decay: decoupled for "adam", added to the gradient for "sgd".
      warmup_epochs: linear warmup from 0, then cosine decay to lr / 100 at the end.
      seed: initialisation, data order and dropout.
      data_seed: the generation seed of the embedded data sets.
      dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
      out: the run directory.
      checkpoint_every: steps between checkpoints (one is also saved after each epoch).
      keep_checkpoints: the newest checkpoints kept.
      log_every: steps between loss records.
      data_dir: where MNIST lies, for the `*mnist` data sets.
      limit: use only the first `limit` training and test examples (for quick tests).
      init_from: a weights directory of `model` (`flax-attention convert --out`) to start
        from, fine-tuning, instead of a random initialisation; its classes must be the data
        set's (convert with `--num-classes`).
      progress: show a progress bar.
      skip_nonfinite: skip the steps whose loss or gradient is NaN or Inf, as
        `optax.apply_if_finite` does (else such a step stops the run, its last checkpoint
        finite).
    """

    model: str = "stn-cnn"
    dataset: str = "distorted-digits"
    epochs: int | None = 12
    steps: int | None = None
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    data_seed: int = 0
    dtype: str = "float32"
    out: str = "runs/stn-cnn-distorted-digits"
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 50
    data_dir: str | None = None
    limit: int | None = None
    init_from: str | None = None
    progress: bool = True
    skip_nonfinite: bool = False

    KIND: ClassVar[str] = "supervised"
    RUNTIME: ClassVar[tuple[str, ...]] = ("out", "checkpoint_every", "keep_checkpoints",
                                          "log_every", "data_dir", "progress",
                                          "skip_nonfinite")
    BOUNDS: ClassVar[dict[str, float]] = {
        **RunConfig.BOUNDS, "warmup_epochs": 0, "weight_decay": 0, "momentum": 0, "limit": 1}

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("dtype", self.dtype, DTYPES)
        super().validate()
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def examples(self, split: str) -> int | None:
        return self.limit


def call_kwargs(model: nn.Module, train: bool) -> dict[str, bool]:
    """The `train` / `deterministic` flags the model's `__call__` takes."""
    params = inspect.signature(type(model).__call__).parameters
    flags = {"train": train, "deterministic": not train}
    return {k: v for k, v in flags.items() if k in params}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`[B, K]`, `[B]` -> `[B]` losses, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def eval_step(model: nn.Module, variables: dict, images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> dict[str, jax.Array]:
    """Sums of the loss, the correct predictions and the count over the examples of `[B]`
    `mask` (images `[B, H, W, C]`, labels `[B]`)."""
    logits = model.apply(variables, images, **call_kwargs(model, False))
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return {"loss": jnp.where(mask, _cross_entropy(logits, labels), 0.0).sum(),
            "correct": correct.sum(), "count": mask.sum()}


def _not_a_classifier(name: str) -> str | None:
    """Why the registry's model `name` is no classifier, or None."""
    from flax_attention.models import detr, ram, registry, segmentation

    if name not in registry.list_models():
        return None
    model = registry.create(name)
    if isinstance(model, segmentation.DANet | segmentation.CCNet | segmentation.FCN):
        return "a segmenter"
    if isinstance(model, detr.DETR):
        return "a detector"
    if isinstance(model, ram.RecurrentAttentionModel):
        return "a recurrent attention model (--model ram trains one with REINFORCE)"
    return None


def list_trainable() -> tuple[list[str], list[str]]:
    """The models this trainer takes (the small classifiers, then the registry's classifiers,
    which need images that fit them) and the registry's other networks (segmenters, detector,
    recurrent attention models)."""
    from flax_attention.models import registry

    networks = registry.list_models()
    return ([*list_classifiers(), *(n for n in networks if _not_a_classifier(n) is None)],
            [n for n in networks if _not_a_classifier(n) is not None])


class SupervisedTrainer(Trainer):
    """Cross-entropy on a classifier; sums the loss and accuracy over each epoch."""

    KIND = "supervised"
    CONFIG = TrainConfig
    METRICS = ("loss", "accuracy")

    def __init__(self, config: TrainConfig, mesh: jax.sharding.Mesh | None = None):
        from flax_attention.train.dense import TASK_DATASETS

        kind = _not_a_classifier(config.model)
        if kind is not None:
            raise ValueError(f"{config.model} is {kind}; the supervised trainer takes "
                             "classifiers (train.detection and train.segmentation the others)")
        task = next((t for t, names in TASK_DATASETS.items() if config.dataset in names), None)
        if task is not None:
            example = "detr-small" if task == "detection" else "danet-small"
            raise ValueError(f"{config.dataset} is a {task} data set: train a model of that "
                             f"task on it (e.g. --model {example}), not the classifier "
                             f"{config.model!r}")
        super().__init__(config, mesh)
        self.initial = None if config.init_from is None else self._initial_variables()

    def _initial_variables(self) -> dict:
        """The variables of `config.init_from` (host arrays), checked against the model's."""
        from flax_attention.convert import load_weights

        config = self.config
        _, num_classes, variables = load_weights(config.init_from, config.model)
        if num_classes != self.num_classes:
            raise ValueError(f"init_from {config.init_from} holds weights for {num_classes} "
                             f"classes, {config.dataset} has {self.num_classes}: convert with "
                             f"--num-classes {self.num_classes}")
        state = self.abstract_state()
        want = traverse_util.flatten_dict({"params": state.params,
                                           "batch_stats": state.batch_stats})
        got = traverse_util.flatten_dict(variables)
        bad = [f"{'/'.join(k)}: expected {want[k].shape if k in want else None}, got "
               f"{np.shape(got[k]) if k in got else None}" for k in sorted(want.keys() | got)
               if k not in want or k not in got or want[k].shape != np.shape(got[k])]
        if bad:
            raise ValueError(f"init_from {config.init_from} does not fit {config.model} on "
                             f"{config.dataset} images {self.input_shape}: {bad[:20]}")
        return traverse_util.unflatten_dict({k: np.asarray(got[k], w.dtype)
                                             for k, w in want.items()})

    def init_state(self) -> TrainState:
        """A fresh state; with `init_from`, its params and batch_stats are those weights."""
        state = super().init_state()
        if self.initial is None:
            return state
        initial = jax.device_put(self.initial, parallel.replicated(self.mesh))
        return state.replace(params=initial["params"],
                             batch_stats=initial.get("batch_stats", {}))

    def create_model(self) -> nn.Module:
        config = self.config
        model = create_classifier(config.model, self.num_classes, self.input_shape,
                                  dtype=DTYPES[config.dtype])
        dummy = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        try:
            logits, _ = jax.eval_shape(lambda x: model.init_with_output(
                jax.random.key(0), x, **call_kwargs(model, False)), dummy)
        except (ValueError, TypeError) as error:
            raise ValueError(f"model {config.model!r} does not fit the {config.dataset} images "
                             f"{self.input_shape}: {error}") from None
        if getattr(logits, "shape", None) != (1, self.num_classes):
            raise ValueError(f"model {config.model!r} does not output class logits "
                             f"[B, {self.num_classes}]: got {jax.tree.map(jnp.shape, logits)}")
        return model

    def create_optimizer(self) -> optax.GradientTransformation:
        config, total = self.config, self.total_steps
        warmup = min(round(config.warmup_epochs * self.steps_per_epoch), total - 1)
        self.schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total,
                                                           end_value=config.lr / 100)
        if config.optimizer == "adam":
            return optax.adamw(self.schedule, weight_decay=config.weight_decay)
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(self.schedule, config.momentum, nesterov=True))

    def init_variables(self, key: jax.Array) -> tuple[dict, jax.Array]:
        init_key, dropout_key = jax.random.split(key)
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return self.model.init(init_key, dummy, **call_kwargs(self.model, False)), dropout_key

    def loss(self, params, state, images, labels, key):
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images,
            rngs={"dropout": key}, mutable=["batch_stats"], **call_kwargs(self.model, True))
        loss = _cross_entropy(logits, labels).mean()
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return loss, (updates.get("batch_stats", {}), {"loss": loss, "accuracy": accuracy})

    def eval_batch(self, variables, images, labels, mask, key):
        return eval_step(self.model, variables, images, labels, mask)

    def eval_metrics(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        count = max(int(sums["count"]), 1)
        return {"test_loss": float(sums["loss"]) / count,
                "test_accuracy": float(sums["correct"]) / count}

    def log_record(self, step: int, state: TrainState, metrics: dict) -> dict[str, Any]:
        return {"loss": float(metrics["loss"]), "lr": float(self.schedule(step - 1))}

    def evaluates_at(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def train_record(self, step: int, state: TrainState) -> dict[str, Any]:
        spe = self.steps_per_epoch
        mean = self.sums_mean(step, state)
        return {"epoch": step // spe if step % spe == 0 else step / spe,
                "train_loss": mean["loss"], "train_accuracy": mean["accuracy"]}


def train(config: TrainConfig, resume: bool = False, *, step_delay: float = 0.0) -> TrainResult:
    """Trains `config.model` on `config.dataset` (`loop.fit`).

    Args:
      config: the run.
      resume: continue from the latest checkpoint in `config.out` (a fresh start if there is
        none); without it, an out dir holding checkpoints is refused.
      step_delay: seconds to sleep after each step (for tests of interruption).

    Returns:
      The status ("completed" or "interrupted") and the metrics of the last evaluation (only
      the step when interrupted mid-epoch), with the wall time and the median images/s.

    Raises:
      ValueError: a bad config, an unwritable out dir, an unknown model or data set, a model
        that is no classifier or does not fit the images (then nothing is written).
      CheckpointError: (a ValueError) checkpoints in the way, incompatible or corrupt.
    """
    return SupervisedTrainer(config).fit(resume, step_delay=step_delay)


def load_config(run_dir: str | Path) -> TrainConfig:
    """The `TrainConfig` of a run directory (its `config.json`)."""
    return TrainConfig.load(run_dir)


class RestoredRun(NamedTuple):
    """A run's latest checkpoint: the model, its `{"params", "batch_stats"}` variables, the
    run's test set and the checkpoint's step."""

    model: nn.Module
    variables: dict
    test_set: data.Dataset
    step: int


def restore_run(run_dir: str | Path, data_dir: str | None = None) -> RestoredRun:
    """The model and variables of a run's latest checkpoint, with its test set (from `data_dir`
    when given, else the run's)."""
    trainer, state, meta = open_run(run_dir, data_dir)
    if not isinstance(trainer, SupervisedTrainer):
        raise ValueError(f"{run_dir} is a {trainer.KIND} run, not a supervised one")
    return RestoredRun(trainer.model, trainer.variables(state), trainer.test_set, meta["step"])
