"""The supervised trainer: a classifier on a data set of `flax_attention.data`, resumable.

    result = train(TrainConfig(model="stn-cnn", epochs=12, out="runs/stn"))
    result.status, result.metrics["test_accuracy"]

AdamW or Nesterov SGD under a warmup-cosine schedule; one jitted step (BatchNorm statistics,
dropout keys folded from the step), data-parallel over every device (`parallel`); a test
evaluation after each epoch. `config.out` gets `config.json`, `metrics.jsonl` (every
`log_every` steps: loss, learning rate, images/s; every epoch: train and test loss and accuracy)
and checkpoints every `checkpoint_every` steps, after each epoch and on SIGINT/SIGTERM (then
the status is "interrupted"). A resume restores the whole state (parameters, BatchNorm
statistics, optimiser state, step, the epoch's sums, the dropout key), skips the batches of the
epoch already seen (the order depends only on (seed, epoch)) and cuts the log back to the
checkpoint: a run killed and resumed ends as an uninterrupted one, log included (less timings).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flax_attention import data
from flax_attention._checks import check_choice
from flax_attention.models.classifiers import create_classifier
from flax_attention.train import parallel
from flax_attention.train.checkpoint import (
    Checkpoints,
    Interrupt,
    MetricsLog,
    Throughput,
    prepare_run_dir,
    progress_bar,
    write_json,
)

__all__ = ["TrainConfig", "TrainResult", "eval_step", "evaluate_run", "init_state",
           "load_config", "train", "train_step"]

OPTIMIZERS = ("adam", "sgd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a run is; saved with every checkpoint. A resume must give the same values, except
    for the fields in `RUNTIME`.

    Attributes:
      model: a name of `models.classifiers.create_classifier`.
      dataset: a name of `data.load_dataset` (the `*mnist` ones need `data_dir`).
      epochs: passes over the training set.
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
      progress: show a progress bar.
    """

    model: str = "stn-cnn"
    dataset: str = "distorted-digits"
    epochs: int = 12
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
    progress: bool = True

    RUNTIME = ("out", "checkpoint_every", "keep_checkpoints", "log_every", "data_dir",
               "progress")

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("dtype", self.dtype, DTYPES)
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "data_seed", "warmup_epochs", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of a `config.json`; raises ValueError on unknown fields."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"not a TrainConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """`status` "completed" or "interrupted"; `metrics` those of the last epoch record (test
    and train loss and accuracy), with "step", "wall_s" and "img_per_s" of this process."""

    status: str
    metrics: dict[str, Any]


def call_kwargs(model: nn.Module, train: bool) -> dict[str, bool]:
    """The `train` / `deterministic` flags the model's `__call__` takes."""
    params = inspect.signature(type(model).__call__).parameters
    flags = {"train": train, "deterministic": not train}
    return {k: v for k, v in flags.items() if k in params}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`[B, K]`, `[B]` -> `[B]` losses, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...], seed: int) -> State:
    """The training state: a dict of "step", "params", "batch_stats", "opt_state", "rng" (the
    dropout key's data) and "totals" (the epoch's sums of loss, correct predictions, count).

    Args:
      input_shape: `(H, W, C)` of one image.
    """
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init(init_key, dummy, **call_kwargs(model, False))
    params = variables["params"]

    def zero(dtype=jnp.int32):  # distinct buffers, so the state can be donated
        return jnp.zeros((), dtype)

    return {"step": zero(), "params": params, "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params), "rng": jax.random.key_data(dropout_key),
            "totals": {"loss": zero(jnp.float32), "correct": zero(), "count": zero()}}


def train_step(model: nn.Module, tx: optax.GradientTransformation, steps_per_epoch: int,
               state: State, images: jax.Array, labels: jax.Array) -> tuple[State, jax.Array]:
    """One optimiser step on images `[B, H, W, C]` and labels `[B]`; returns the new state and
    the mean loss. The dropout key is the state's folded with the step; the epoch's "totals"
    restart at the first step of each epoch.
    """
    step = state["step"]
    first = step % steps_per_epoch == 0
    totals = jax.tree.map(lambda t: jnp.where(first, jnp.zeros_like(t), t), state["totals"])
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]}, images,
            rngs={"dropout": key}, mutable=["batch_stats"], **call_kwargs(model, True))
        return _cross_entropy(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    deltas, opt_state = tx.update(grads, state["opt_state"], state["params"])
    correct = (jnp.argmax(logits, -1) == labels).sum()
    totals = {"loss": totals["loss"] + loss * labels.shape[0],
              "correct": totals["correct"] + correct, "count": totals["count"] + labels.size}
    return {**state, "step": step + 1, "params": optax.apply_updates(state["params"], deltas),
            "batch_stats": updates.get("batch_stats", {}), "opt_state": opt_state,
            "totals": totals}, loss


def eval_step(model: nn.Module, variables: dict, images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> dict[str, jax.Array]:
    """Sums of the loss, the correct predictions and the count over the examples of `[B]`
    `mask` (images `[B, H, W, C]`, labels `[B]`)."""
    logits = model.apply(variables, images, **call_kwargs(model, False))
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return {"loss": jnp.where(mask, _cross_entropy(logits, labels), 0.0).sum(),
            "correct": correct.sum(), "count": mask.sum()}


def _padded_batches(dataset: data.Dataset, batch_size: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The data set in order, `(images, labels, mask)`, the last batch padded to `batch_size`."""
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start:start + batch_size]
        labels = dataset.labels[start:start + batch_size]
        pad = batch_size - len(labels)
        yield (np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))), np.pad(labels, (0, pad)),
               np.arange(batch_size) < len(labels))


def _load(config: TrainConfig, split: str) -> data.Dataset:
    dataset = data.load_dataset(config.dataset, split, config.data_seed, config.data_dir)
    if config.limit is None or config.limit >= len(dataset):
        return dataset
    n = config.limit
    return data.Dataset(dataset.images[:n], dataset.labels[:n], dataset.num_classes,
                        dataset.class_names)


def _optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int
               ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total_steps,
                                                  end_value=config.lr / 100)
    if config.optimizer == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay), schedule
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, config.momentum, nesterov=True)), schedule


class _Session:
    """A model, its optimiser, the data and the jitted steps on a mesh, for one config."""

    def __init__(self, config: TrainConfig, mesh: jax.sharding.Mesh):
        config.validate()
        parallel.check_batch_size(config.batch_size, mesh)
        self.config, self.mesh = config, mesh
        self.train_set, self.test_set = _load(config, "train"), _load(config, "test")
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size ({config.batch_size}) exceeds the training set "
                             f"({len(self.train_set)} examples)")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.input_shape = self.train_set.images.shape[1:]
        self.model = create_classifier(config.model, self.train_set.num_classes,
                                       self.input_shape, dtype=DTYPES[config.dtype])
        self.tx, self.schedule = _optimizer(config, self.total_steps, self.steps_per_epoch)
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.train_step = parallel.data_parallel(
            functools.partial(train_step, self.model, self.tx, self.steps_per_epoch), mesh,
            num_batch_args=2, donate_state=True)
        self.eval_step = parallel.data_parallel(functools.partial(eval_step, self.model), mesh,
                                                num_batch_args=3)
        self.init = functools.partial(init_state, self.model, self.tx, self.input_shape,
                                      config.seed)
        shapes = jax.eval_shape(self.init)
        self._check_logits(shapes)
        rep = parallel.replicated(mesh)
        # The state's shapes, dtypes and shardings, for `Checkpoints.restore`.
        self.abstract_state = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)

    def _check_logits(self, state: State) -> None:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        dummy = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        logits = jax.eval_shape(functools.partial(self.model.apply, **call_kwargs(
            self.model, False)), variables, dummy)
        classes = self.train_set.num_classes
        if logits.shape != (1, classes):
            raise ValueError(f"model {self.config.model!r} does not output class logits "
                             f"[B, {classes}]: got shape {logits.shape}")

    def evaluate(self, state: State) -> dict[str, float]:
        """Test loss and accuracy of `state`."""
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        size = 4 * self.config.batch_size
        sums = [self.eval_step(variables, *batch) for batch in data.prefetch_to_device(
            _padded_batches(self.test_set, size), sharding=self.batch_sharding)]
        total = parallel.to_host(jax.tree.map(lambda *xs: sum(xs), *sums))
        count = max(int(total["count"]), 1)
        return {"test_loss": float(total["loss"]) / count,
                "test_accuracy": float(total["correct"]) / count}

    def epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The epoch's training batches on the devices, the first `skip` left out."""
        batches = data.batches(self.train_set, self.config.batch_size, self.config.seed, epoch)
        return data.prefetch_to_device(itertools.islice(batches, skip, None),
                                       sharding=self.batch_sharding)


def _epoch_record(session: _Session, state: State, step: int) -> dict[str, Any]:
    totals = parallel.to_host(state["totals"])
    count = max(int(totals["count"]), 1)
    return {"step": step, "epoch": step // session.steps_per_epoch,
            "train_loss": float(totals["loss"]) / count,
            "train_accuracy": float(totals["correct"]) / count, **session.evaluate(state)}


def _save(checkpoints: Checkpoints, session: _Session, step: int, state: State) -> None:
    spe = session.steps_per_epoch
    checkpoints.save(step, state, session.config.to_dict(),
                     {"epoch": step // spe, "batch_in_epoch": step % spe, "steps_per_epoch": spe})


def _run_epoch(session: _Session, state: State, step: int, checkpoints: Checkpoints,
               log: MetricsLog, interrupt: Interrupt, bar: tqdm, speed: Throughput,
               step_delay: float) -> tuple[State, int]:
    """Trains from `step` to the end of its epoch, or until an interrupt (after a save)."""
    config, spe = session.config, session.steps_per_epoch
    epoch = step // spe
    for images, labels in session.epoch_batches(epoch, step - epoch * spe):
        state, loss = session.train_step(state, images, labels)
        step += 1
        bar.update(1)
        speed.add(labels.shape[0])
        if not speed.started:  # the first window would count the compilation
            jax.block_until_ready(loss)
            speed.mark(report=False)
        if step % config.log_every == 0:
            record = {"step": step, "loss": float(loss), "lr": float(session.schedule(step - 1)),
                      "img_per_s": speed.mark()}
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s'] or 0:.0f}")
            log.write(record)
        if step % spe and (step % config.checkpoint_every == 0 or interrupt.requested):
            _save(checkpoints, session, step, state)
        if step % spe and interrupt.requested:
            break
        if step_delay:
            time.sleep(step_delay)
    return state, step


def _loop(session: _Session, state: State, checkpoints: Checkpoints, log: MetricsLog,
          interrupt: Interrupt, speed: Throughput, step_delay: float
          ) -> tuple[str, State, dict[str, Any]]:
    """Epochs from the state's step to the end; an epoch ends with its evaluation, its log
    record and a checkpoint, in that order. Returns the status, the state and the last epoch
    record ({"step"} only when interrupted mid-epoch)."""
    step = int(parallel.to_host(state["step"]))
    record = {"step": step}
    with progress_bar(session.total_steps, step, session.config.progress) as bar:
        while step < session.total_steps:
            state, step = _run_epoch(session, state, step, checkpoints, log, interrupt, bar,
                                     speed, step_delay)
            record = {"step": step}
            if step % session.steps_per_epoch == 0:
                record = _epoch_record(session, state, step)
                log.write(record)
                _save(checkpoints, session, step, state)
                speed.mark(report=False)
            if interrupt.requested:
                return "interrupted", state, record
    if "test_accuracy" not in record:  # a resumed run that had already finished
        record = _epoch_record(session, state, step)
    return "completed", state, record


def train(config: TrainConfig, resume: bool = False, *, step_delay: float = 0.0) -> TrainResult:
    """Trains `config.model` on `config.dataset`; see the module docstring.

    Args:
      config: the run.
      resume: continue from the latest checkpoint in `config.out` (a fresh start if there is
        none); without it, an out dir holding checkpoints is refused.
      step_delay: seconds to sleep after each step (slows a run down, for tests of
        interruption).

    Returns:
      The status ("completed" or "interrupted") and the metrics of the last epoch (only the
      step when interrupted mid-epoch), with the wall time and the median images/s.

    Raises:
      ValueError: a bad config, an unwritable out dir, unknown model or data set.
      CheckpointError: (a ValueError) checkpoints in the way, incompatible or corrupt.
    """
    started = time.perf_counter()
    parallel.initialize_distributed()
    config.validate()
    out = prepare_run_dir(config.out)
    with Checkpoints(out / "checkpoints", config.keep_checkpoints) as checkpoints:
        start = checkpoints.resume_or_start(config.to_dict(), resume, TrainConfig.RUNTIME)
        session = _Session(config, parallel.data_mesh())
        if start is None:
            state = parallel.replicated_init(session.init, session.mesh)
        else:
            state, _ = checkpoints.restore(session.abstract_state, start)
        write_json(out / "config.json", config.to_dict())
        log = MetricsLog(out / "metrics.jsonl")
        log.truncate(start or 0)
        speed = Throughput()
        with log, Interrupt() as interrupt:
            status, state, metrics = _loop(session, state, checkpoints, log, interrupt, speed,
                                           step_delay)
    rate = float(np.median(speed.rates)) if speed.rates else None
    return TrainResult(status, {**metrics, "wall_s": time.perf_counter() - started,
                                "img_per_s": rate})


def load_config(run_dir: str | Path) -> TrainConfig:
    """The `TrainConfig` of a run directory (its `config.json`)."""
    path = Path(run_dir) / "config.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json") from None
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid TrainConfig: {error}") from None


def _restore(run_dir: str | Path, data_dir: str | None) -> tuple[_Session, State, dict]:
    config = load_config(run_dir)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    session = _Session(config, parallel.data_mesh())
    with Checkpoints(Path(run_dir) / "checkpoints", read_only=True) as checkpoints:
        state, meta = checkpoints.restore(session.abstract_state)
    return session, state, meta


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
    session, state, meta = _restore(run_dir, data_dir)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return RestoredRun(session.model, variables, session.test_set, meta["step"])


def evaluate_run(run_dir: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """Test loss and accuracy of the latest checkpoint of a run, with its step and epoch."""
    session, state, meta = _restore(run_dir, data_dir)
    return {"step": meta["step"], "epoch": meta["step"] / session.steps_per_epoch,
            **session.evaluate(state)}
