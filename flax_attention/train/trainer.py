"""The skeleton every trainer of the package plugs into: config, data, state, step, evaluation.

A trainer subclasses `Trainer` and supplies only what differs (`supervised.SupervisedTrainer`,
`reinforce.RamTrainer`, `detection.DetectionTrainer`, `segmentation.SegmentationTrainer`):

    class MyTrainer(Trainer):
        KIND = "mine"                          # written into the run's config.json
        CONFIG = MyConfig                      # a frozen dataclass subclassing RunConfig
        METRICS = ("loss", "accuracy")         # the step metrics summed into `state.sums`
        def create_model(self): ...            # from self.config, self.num_classes, ...
        def create_optimizer(self): ...
        def init_variables(self, key): ...     # -> (variables, the key of the step keys)
        def loss(self, params, state, images, labels, key): ...
                                               # -> (loss, (batch_stats, metrics))
        def eval_batch(self, variables, images, labels, mask, key): ...  # -> sums
        def eval_metrics(self, sums): ...      # -> {"test_...": float}
        def combine_eval(self, outputs): ...   # optional: the batches' eval_batch outputs
                                               # -> what eval_metrics takes (default: sum)
        def log_record(self, step, state, metrics): ...  # -> the loss record's fields

and gets the rest: the data (`config.dataset`, the first `config.examples(split)` examples),
the state (`TrainState`: flax's, plus BatchNorm statistics, the key and the metric sums), one
jitted step data-parallel over every device (`parallel`), the padded, data-parallel test
evaluation, and (`train.loop.fit`) the loop, its log, checkpoints, interruption and resume.

One counting rule for every trainer: a run lasts `config.steps` optimiser steps when set, else
`config.epochs` passes over the training set; an epoch is `len(train set) // batch_size` steps
(the last partial batch is dropped) and its batch order depends only on (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from flax_attention import data
from flax_attention.train import parallel

__all__ = ["RunConfig", "TrainState", "Trainer", "padded_batches"]


class TrainState(train_state.TrainState):
    """flax's `TrainState` (step, params, optimiser state) plus what every trainer here keeps.

    Attributes:
      batch_stats: BatchNorm's running statistics ({} for a model without).
      rng: key data; step s draws its randomness (dropout, glimpse locations) from
        `fold_in(key, s)`, so a resumed run draws what an uninterrupted one would.
      sums: the trainer's `METRICS` summed over the steps since the last restart (every
        `Trainer.sums_period` steps).
    """

    batch_stats: Any
    rng: jax.Array
    sums: dict[str, jax.Array]


# Config fields that only the loop reads (the run length enters as `Trainer.total_steps`).
_UNCOMPILED = ("out", "resume", "progress", "checkpoint_every", "keep_checkpoints", "data_dir",
               "eval_every", "steps", "epochs", "skip_nonfinite")


# The field types of the configs, by their annotation's names.
_JSON_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _is(value: Any, kind: type) -> bool:
    """Whether a JSON value is of a config field's type: bools are no numbers, ints are
    floats."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


class RunConfig:
    """What the config dataclass of every trainer shares: validation, the counting rule, JSON.

    A subclass is a frozen dataclass with (at least) the fields dataset, data_seed, data_dir,
    steps, epochs, batch_size, seed, out, checkpoint_every, keep_checkpoints, log_every,
    progress and skip_nonfinite, the `examples(split)` method (how many examples to use, None:
    all) and the class attributes `KIND` (its trainer's) and `RUNTIME` (the fields a resume may
    change).
    """

    KIND: ClassVar[str] = ""
    RUNTIME: ClassVar[tuple[str, ...]] = ()
    # Lower bounds checked by `validate` (None values pass).
    BOUNDS: ClassVar[dict[str, float]] = {
        "steps": 1, "epochs": 1, "batch_size": 1, "checkpoint_every": 1,
        "keep_checkpoints": 1, "log_every": 1, "seed": 0, "data_seed": 0}

    def validate(self) -> None:
        """Raises ValueError naming the first field below its bound, or no run length."""
        for name, low in self.BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs: the run length")

    def total_steps(self, steps_per_epoch: int) -> int:
        """`steps` when set, else `epochs` epochs of `steps_per_epoch`."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def length(self) -> str:
        """The run length in words: "12 epochs" or "6000 steps"."""
        return f"{self.steps} steps" if self.steps is not None else f"{self.epochs} epochs"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """The config of a `config.json`'s fields; raises ValueError on unknown fields and on
        values of another type than their field's (`"3"` for an int; an int for a float
        passes)."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"not a {cls.__name__}: unknown fields {sorted(unknown)}")
        for name, value in values.items():
            allowed = [_JSON_TYPES[t.strip()] for t in str(fields[name]).split("|")]
            if not any(_is(value, kind) for kind in allowed):
                kinds = " or ".join(t.strip() for t in str(fields[name]).split("|"))
                raise ValueError(f"{name} must be {kinds}, got {value!r}")
        return cls(**values)

    @classmethod
    def load(cls, run_dir):
        """The config of a run directory made by this config's trainer."""
        from flax_attention.train.run_dir import read_run_config

        kind, values = read_run_config(run_dir)
        if kind != cls.KIND:
            raise ValueError(f"{run_dir} is a {kind} run, not a {cls.KIND} one")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{run_dir}/config.json is not a valid {cls.__name__}: "
                             f"{error}") from None

    @classmethod
    def from_options(cls, given: dict[str, Any], resume: bool):
        """The config of the fields `given` (e.g. command-line options), then, with `resume`,
        those saved in the run directory (`given["out"]`, else the default out) if it holds
        a config, then the defaults."""
        base = cls()
        out = Path(given.get("out", base.out))
        if resume and (out / "config.json").is_file():
            base = cls.load(out)
        return cls.from_dict({**base.to_dict(), **given})

    def static(self):
        """The config with the fields no compiled function reads at their defaults (runs
        that differ only in those share the compilation)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: defaults[k] for k in _UNCOMPILED if k in defaults})


def _pad(array: np.ndarray, pad: int) -> np.ndarray:
    """`array` `[B, ...]` with `pad` zero rows appended."""
    return np.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))


def padded_batches(dataset: data.Dataset, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, Any, np.ndarray]]:
    """The data set in order, `(images, labels, mask)`, the last batch padded (with zeros) to
    `batch_size`; the labels are any pytree of `[B, ...]` arrays (class labels, label maps, a
    dict of boxes)."""
    for start in range(0, len(dataset), batch_size):
        part = dataset.take(slice(start, start + batch_size))
        pad = batch_size - len(part)
        labels = jax.tree.map(functools.partial(_pad, pad=pad), part.labels)
        yield _pad(part.images, pad), labels, np.arange(batch_size) < len(part)


def _step(trainer: Trainer, state: TrainState, images: jax.Array, labels: jax.Array
          ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on images `[B, H, W, C]` and labels (a pytree of `[B, ...]` arrays):
    the new state and the step's metrics (the trainer's, with "grad_norm" and "finite": whether
    the loss and the gradient are). A step that is not finite only counts: it leaves the
    parameters, optimiser state and statistics as they were and adds nothing to the sums (the
    loop then stops or, with the config's `skip_nonfinite`, goes on)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        return trainer.loss(params, state, images, labels, key)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite}
    restart = state.step % trainer.sums_period == 0
    sums = {k: jnp.where(restart, 0.0, v) + jnp.where(finite, metrics[k], 0.0)
            for k, v in state.sums.items()}
    new = state.apply_gradients(grads=grads, batch_stats=batch_stats, sums=sums)
    kept = {"params": state.params, "opt_state": state.opt_state,
            "batch_stats": state.batch_stats}  # as optax.apply_if_finite: no trace of the step
    return new.replace(**jax.tree.map(lambda a, b: jnp.where(finite, a, b),
                                      {k: getattr(new, k) for k in kept}, kept)), metrics


def _eval_step(trainer: Trainer, replicated: tuple[Any, jax.Array], images: jax.Array,
               labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    variables, key = replicated
    return trainer.eval_batch(variables, images, labels, mask, key)


# The models, optimisers and jitted functions of recent trainers, by what they depend on, so
# that runs differing only in runtime fields (out, resume, ...) share one compilation.
_COMPILED: dict[tuple, Trainer] = {}
_COMPILED_KEPT = 8


class Trainer:
    """A config's data, model, optimiser and jitted steps on a mesh; see the module docstring.

    Args:
      config: the run (validated here).
      mesh: the devices the batch is split over (default every device).

    Raises:
      ValueError: a bad config, a batch size that does not fit the devices or the data, a
        model that does not fit the data. Nothing is written.
    """

    KIND: ClassVar[str]
    CONFIG: ClassVar[type[RunConfig]]
    METRICS: ClassVar[tuple[str, ...]]
    # The threefry variant of `init_state`: the one that is not partitionable compiles several
    # times faster, and a replicated state has nothing to partition; a trainer may keep the
    # default variant (RAM: its tuned runs were drawn with it).
    PARTITIONABLE_INIT: ClassVar[bool] = False

    def __init__(self, config: RunConfig, mesh: jax.sharding.Mesh | None = None):
        parallel.initialize_distributed()
        config.validate()
        self.config = config
        self.mesh = parallel.data_mesh() if mesh is None else mesh
        parallel.check_batch_size(config.batch_size, self.mesh)
        self.train_set, self.test_set = self._load("train"), self._load("test")
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size ({config.batch_size}) exceeds the training set "
                             f"({len(self.train_set)} examples)")
        self.total_steps = config.total_steps(self.steps_per_epoch)
        self.input_shape = tuple(self.train_set.images.shape[1:])
        self.num_classes = self.train_set.num_classes
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        key = (type(self), config.static(), self.mesh, self.input_shape, self.num_classes,
               self.steps_per_epoch, self.total_steps)
        compiled = _COMPILED.get(key)
        if compiled is None:
            self._compile()
            _COMPILED[key] = self
            while len(_COMPILED) > _COMPILED_KEPT:
                del _COMPILED[next(iter(_COMPILED))]
        else:  # what `_compile` set: the model, the optimiser, the jitted functions
            for name, value in vars(compiled).items():
                self.__dict__.setdefault(name, value)

    def _compile(self) -> None:
        self.model = self.create_model()
        self.tx = self.create_optimizer()
        self.train_step = parallel.data_parallel(
            functools.partial(_step, self), self.mesh, num_batch_args=2, donate_state=True)
        self._eval_step = parallel.data_parallel(
            functools.partial(_eval_step, self), self.mesh, num_batch_args=3)
        self._init = jax.jit(self._init_state, out_shardings=parallel.replicated(self.mesh))

    # --- what a trainer supplies ---------------------------------------------------------

    def create_model(self) -> nn.Module:
        raise NotImplementedError

    def create_optimizer(self) -> optax.GradientTransformation:
        raise NotImplementedError

    def init_variables(self, key: jax.Array) -> tuple[dict, jax.Array]:
        """The model's variables and the key whose fold with the step is each step's."""
        raise NotImplementedError

    def loss(self, params: Any, state: TrainState, images: jax.Array, labels: jax.Array,
             key: jax.Array) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        """The loss to minimise and (the new batch_stats, the step's METRICS)."""
        raise NotImplementedError

    def eval_batch(self, variables: dict, images: jax.Array, labels: jax.Array,
                   mask: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """Sums over the examples of `[B]` `mask` (the rest is padding), or what
        `combine_eval` takes."""
        raise NotImplementedError

    def combine_eval(self, outputs: list[Any]) -> Any:
        """The `eval_batch` outputs of every test batch, in order, as `eval_metrics` takes them
        (default: their sum)."""
        return jax.tree.map(lambda *xs: sum(xs), *outputs)

    def eval_metrics(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError

    def log_record(self, step: int, state: TrainState, metrics: dict[str, Any]
                   ) -> dict[str, Any]:
        """The fields of the record logged every `log_every` steps (after "step")."""
        raise NotImplementedError

    @property
    def sums_period(self) -> int:
        """Steps between restarts of `state.sums` (default: an epoch)."""
        return self.steps_per_epoch

    def evaluates_at(self, step: int) -> bool:
        """Whether the loop evaluates (and checkpoints) after `step`, besides the last one."""
        return False

    def train_record(self, step: int, state: TrainState) -> dict[str, Any]:
        """Training fields of an evaluation record (e.g. the epoch's mean loss)."""
        return {}

    def eval_details(self) -> dict[str, Any]:
        """How `evaluate` measures, for `loop.evaluate_run` (e.g. RAM's sample count)."""
        return {}

    # --- what they share --------------------------------------------------------------------

    def _load(self, split: str) -> data.Dataset:
        config = self.config
        dataset = data.load_dataset(config.dataset, split, config.data_seed, config.data_dir)
        n = config.examples(split)
        if n is None or n >= len(dataset):
            return dataset
        return dataset.take(slice(n))

    def _init_state(self) -> TrainState:
        variables, key = self.init_variables(jax.random.key(self.config.seed))
        params = variables["params"]
        sums = {name: jnp.zeros((), jnp.float32) for name in self.METRICS}
        return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=self.model.apply,
                          params=params, tx=self.tx, opt_state=self.tx.init(params),
                          batch_stats=variables.get("batch_stats", {}),
                          rng=jax.random.key_data(key), sums=sums)

    def init_state(self) -> TrainState:
        """A fresh state, replicated over the mesh (drawn as `PARTITIONABLE_INIT` says)."""
        with jax.threefry_partitionable(self.PARTITIONABLE_INIT):
            return self._init()

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, for `Checkpoints.restore`."""
        rep = parallel.replicated(self.mesh)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                            jax.eval_shape(self._init_state))

    @staticmethod
    def variables(state: TrainState) -> dict:
        """The model's variables in `state`."""
        return {"params": state.params, "batch_stats": state.batch_stats}

    def epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The epoch's training batches on the devices, the first `skip` left out."""
        batches = data.batches(self.train_set, self.config.batch_size, self.config.seed, epoch)
        return data.prefetch_to_device(itertools.islice(batches, skip, None),
                                       sharding=self.batch_sharding)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """The test metrics of `state`, over the whole test set in order, in batches of 4
        `batch_size` (the last one padded); batch i draws with `fold_in(key(seed, 4), i)`."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), 4)
        variables = self.variables(state)
        batches = data.prefetch_to_device(padded_batches(self.test_set,
                                                         4 * self.config.batch_size),
                                          sharding=self.batch_sharding)
        outputs = [self._eval_step((variables, jax.random.fold_in(key, i)), *batch)
                   for i, batch in enumerate(batches)]
        return self.eval_metrics(parallel.to_host(self.combine_eval(outputs)))

    def sums_mean(self, step: int, state: TrainState) -> dict[str, float]:
        """`state.sums` over the steps they hold, `step` being the state's."""
        count = (step - 1) % self.sums_period + 1
        return {k: float(v) / count for k, v in parallel.to_host(state.sums).items()}

    def eval_record(self, step: int, state: TrainState) -> dict[str, Any]:
        """The record of an evaluation: the step, `train_record` and the test metrics."""
        return {"step": step, **self.train_record(step, state), **self.evaluate(state)}

    def checkpoint_extra(self, step: int) -> dict[str, Any]:
        """What a checkpoint's metadata holds besides the config, digest and step."""
        spe = self.steps_per_epoch
        return {"trainer": self.KIND, "epoch": step // spe, "batch_in_epoch": step % spe,
                "steps_per_epoch": spe}

    def fit(self, resume: bool = False, *, step_delay: float = 0.0):
        """Trains as the config says (`train.loop.fit`); returns a `TrainResult`."""
        from flax_attention.train.loop import fit

        return fit(self, resume, step_delay=step_delay)
