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

The run directory `out` gets `config.json`, `metrics.jsonl` (a record every `log_every` steps:
the window's mean loss, its parts, the reward and images/s; one every `eval_every` steps and at
the end: the test error) and orbax checkpoints (`train.checkpoint`) every `checkpoint_every`
steps, at the end and on SIGINT/SIGTERM (then the status is "interrupted"). The locations of
step s are drawn with the key `fold_in(key(seed), s)` and the data order depends only on
(seed, epoch), so a resumed run (`resume=True`) ends with the parameters of an uninterrupted one.

Axis legend: B batch, H height, W width, C channels, L the number of glimpses T, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention import data
from flax_attention._checks import check_choice
from flax_attention.glimpse import plot_glimpse_path
from flax_attention.models.ram import (
    CORES,
    RamOutput,
    RecurrentAttentionModel,
    hybrid_loss,
    reinforce_surrogate,
)
from flax_attention.train.checkpoint import (
    Checkpoints,
    Interrupt,
    MetricsLog,
    Throughput,
    prepare_run_dir,
    progress_bar,
    write_json,
)

__all__ = [
    "RamConfig", "create_model", "evaluate", "evaluate_ram_run", "hybrid_loss", "init_state",
    "is_ram_run", "load_run", "plot_glimpse_path", "predict", "reinforce_surrogate", "train_ram",
    "train_step", "visualize_run",
]

State = dict[str, Any]
_MODEL_FIELDS = ("num_glimpses", "glimpse_size", "num_scales", "std", "hidden", "core",
                 "random_locations", "implementation", "reinforce_core")
_LOWER_BOUNDS = {"num_glimpses": 1, "glimpse_size": 1, "num_scales": 1, "steps": 1,
                 "batch_size": 1, "mc_samples": 1, "checkpoint_every": 1, "log_every": 1,
                 "train_examples": 1, "test_examples": 1, "seed": 0, "eval_every": 0,
                 "reinforce_weight": 0}
_WINDOW = ("loss", "ce", "baseline_mse", "reinforce", "accuracy", "grad_norm")


@dataclasses.dataclass(frozen=True)
class RamConfig:
    """What a RAM run is; saved with its checkpoints. A resume must give the same values,
    except for the fields in `RUNTIME` (so `steps` may grow: a resume trains further).

    Attributes:
      dataset, data_dir: passed to `data.load_dataset` (`cluttered-mnist` needs `data_dir`).
      num_glimpses, glimpse_size, num_scales, std, hidden, core, random_locations,
        reinforce_core, implementation: the model's (see `RecurrentAttentionModel`);
        `random_locations` gives the random-glimpse baseline. The core is an LSTM by default:
        in short runs on cluttered digits it learned faster than the paper's RNN.
      steps: optimiser steps; batch_size: examples per step; lr: Adam's learning rate;
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
      progress: show a tqdm progress bar.

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
    implementation: str | None = None
    steps: int = 6000
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

    RUNTIME = ("data_dir", "out", "resume", "steps", "checkpoint_every", "eval_every",
               "progress", "implementation")

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        check_choice("core", self.core, CORES)
        for name, low in _LOWER_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name in ("std", "lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def create_model(config: RamConfig, num_classes: int) -> RecurrentAttentionModel:
    """The model of a config."""
    fields = {name: getattr(config, name) for name in _MODEL_FIELDS}
    return RecurrentAttentionModel(num_classes=num_classes, **fields)


# --- steps ----------------------------------------------------------------------------------


def _optimizer(config: RamConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(config.lr))


def _static(config: RamConfig) -> RamConfig:
    """The config with its runtime fields at their defaults: what a compiled step depends on
    (so runs that differ only in those share the compilation)."""
    return dataclasses.replace(config, **{k: getattr(RamConfig, k) for k in RamConfig.RUNTIME})


def init_state(model: RecurrentAttentionModel, config: RamConfig,
               input_shape: tuple[int, ...]) -> State:
    """The training state: "step", "params", "opt_state" and "window" (the sums of the
    metrics since the last loss record).

    Args:
      input_shape: `(H, W, C)` of one image.
    """
    key = jax.random.key(config.seed)
    rngs = {"params": jax.random.fold_in(key, 1), "sample": jax.random.fold_in(key, 2)}
    params = model.init(rngs, jnp.zeros((1, *input_shape), jnp.float32))["params"]
    window = {name: jnp.zeros((), jnp.float32) for name in _WINDOW}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": _optimizer(config).init(params), "window": window}


def _sample_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of the locations drawn at training step `step` (a function of the step only)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), step)


def train_step(model: RecurrentAttentionModel, config: RamConfig, state: State,
               images: jax.Array, labels: jax.Array) -> State:
    """One optimiser step on images `[B, H, W, C]` and labels `[B]`; the metrics of the step
    are added to the state's "window" (which restarts after every `log_every` steps)."""
    step = state["step"]

    def loss_fn(params):
        output = model.apply({"params": params}, images,
                             rngs={"sample": _sample_key(config.seed, step)})
        return hybrid_loss(output, labels, config.reinforce_weight, config.step_rewards)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = _optimizer(config).update(grads, state["opt_state"], state["params"])
    restart = step % config.log_every == 0
    window = {k: jnp.where(restart, 0.0, v) + metrics[k] for k, v in state["window"].items()}
    return {"step": step + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "window": window}


_jit_init = jax.jit(init_state, static_argnums=(0, 1, 2))
_jit_train_step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=2)


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


def evaluate(model: RecurrentAttentionModel, params: Any, dataset: data.Dataset,
             mc_samples: int = 10, seed: int = 0, batch_size: int = 200) -> dict[str, float]:
    """The M-sample prediction over all of `dataset` (in order, the last batch padded):
    "test_accuracy", "test_error" (%) and "test_nll" (the mean negative log of the averaged
    probability of the label)."""
    key = jax.random.fold_in(jax.random.key(seed), 4)
    n, correct, nll = len(dataset), 0, 0.0
    size = min(batch_size, n)  # every batch padded to `size`: one compilation
    for i, start in enumerate(range(0, n, size)):
        labels = dataset.labels[start:start + size]
        images = np.pad(dataset.images[start:start + size],
                        ((0, size - len(labels)), (0, 0), (0, 0), (0, 0)))
        p = np.asarray(predict(model, params, images, jax.random.fold_in(key, i), mc_samples))
        p = p[:len(labels)]
        correct += int((p.argmax(-1) == labels).sum())
        nll -= float(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).sum())
    return {"test_accuracy": correct / n, "test_error": 100.0 * (1 - correct / n),
            "test_nll": nll / n}


# --- the run --------------------------------------------------------------------------------


def _load(config: RamConfig, split: str) -> data.Dataset:
    dataset = data.load_dataset(config.dataset, split, data_dir=config.data_dir)
    n = config.train_examples if split == "train" else config.test_examples
    if n is None or n >= len(dataset):
        return dataset
    return data.Dataset(dataset.images[:n], dataset.labels[:n], dataset.num_classes,
                        dataset.class_names)


@dataclasses.dataclass
class _Run:
    """A run in progress: its config, model, data, jitted step, checkpoints and log."""

    config: RamConfig
    model: RecurrentAttentionModel
    train_set: data.Dataset
    test_set: data.Dataset
    checkpoints: Checkpoints
    log: MetricsLog
    interrupt: Interrupt
    speed: Throughput = dataclasses.field(default_factory=Throughput)

    def init(self) -> State:
        """A fresh state, committed to the default device as a restored one is (so both
        share the compiled steps)."""
        state = _jit_init(self.model, _static(self.config), self.train_set.images.shape[1:])
        return jax.device_put(state, jax.devices()[0])

    def save(self, step: int, state: State) -> None:
        extra = {"num_classes": self.train_set.num_classes,
                 "input_shape": list(self.train_set.images.shape[1:])}
        self.checkpoints.save(step, state, self.config.to_dict(), extra)

    def evaluate(self, state: State) -> dict[str, float]:
        return evaluate(self.model, state["params"], self.test_set, self.config.mc_samples,
                        self.config.seed)

    def after_step(self, step: int, state: State, bar) -> dict[str, Any] | None:
        """Logs, evaluates and saves as the config asks; returns the final record (with the
        test metrics) after the last step, else None."""
        config, final = self.config, None
        if step % config.log_every == 0:
            window = jax.device_get(state["window"])
            record = {"step": step, **{k: float(v) / config.log_every for k, v in window.items()},
                      "img_per_s": self.speed.mark()}
            bar.set_postfix(loss=f"{record['loss']:.3f}", reward=f"{record['accuracy']:.2f}",
                            img_s=f"{record['img_per_s'] or 0:.0f}")
            self.log.write(record)
        if step == config.steps or (config.eval_every and step % config.eval_every == 0):
            final = {"step": step, **self.evaluate(state)}
            self.log.write(final)
            self.speed.mark(report=False)
        if step % config.checkpoint_every == 0 or step == config.steps or self.interrupt.requested:
            self.save(step, state)
            self.speed.mark(report=False)
        return final if step == config.steps else None

    def loop(self, state: State) -> tuple[str, State, dict[str, Any] | None]:
        """Steps from the state's to `config.steps`; returns the status, the state and the
        final record (None when interrupted or already finished)."""
        config = self.config
        per_epoch = len(self.train_set) // config.batch_size
        step, final = int(jax.device_get(state["step"])), None
        with progress_bar(config.steps, step, config.progress) as bar:
            while step < config.steps and not self.interrupt.requested:
                epoch = step // per_epoch
                batches = data.batches(self.train_set, config.batch_size, config.seed, epoch)
                for images, labels in itertools.islice(batches, step % per_epoch, None):
                    state = _jit_train_step(self.model, _static(self.config), state, images,
                                            labels)
                    step += 1
                    bar.update(1)
                    self.speed.add(len(labels))
                    if not self.speed.started:  # the first window holds the compilation
                        jax.block_until_ready(state)
                        self.speed.mark(report=False)
                    final = self.after_step(step, state, bar)
                    if step == config.steps or self.interrupt.requested:
                        break
        status = "interrupted" if self.interrupt.requested and step < config.steps else "completed"
        return status, state, final


def train_ram(config: RamConfig) -> dict[str, Any]:
    """Trains RAM as `config` says; see the module docstring.

    Returns:
      "status" ("completed" or "interrupted"), "step", the final test metrics
      ("test_accuracy", "test_error" in %, "test_nll"; absent when interrupted), "wall_s" and
      the median "img_per_s" of this process.

    Raises:
      ValueError: a bad config, an unwritable out dir, an unknown data set, or (a
        `CheckpointError`) checkpoints in the way, incompatible or corrupt.
    """
    started = time.perf_counter()
    config.validate()
    out = prepare_run_dir(config.out)
    train_set, test_set = _load(config, "train"), _load(config, "test")
    if config.batch_size > len(train_set):
        raise ValueError(f"batch_size ({config.batch_size}) exceeds the training set "
                         f"({len(train_set)} examples)")
    model = create_model(config, train_set.num_classes)
    with Checkpoints(out / "checkpoints") as checkpoints:
        start = checkpoints.resume_or_start(config.to_dict(), config.resume, RamConfig.RUNTIME)
        log = MetricsLog(out / "metrics.jsonl")
        log.truncate(start or 0)  # before opening it: truncating replaces the file
        with log, Interrupt() as interrupt:
            run = _Run(config, model, train_set, test_set, checkpoints, log, interrupt)
            if start is None:
                state = run.init()
            else:
                state, _ = checkpoints.restore(jax.eval_shape(run.init), start)
            write_json(out / "config.json", config.to_dict())
            status, state, final = run.loop(state)
    if status == "completed" and final is None:  # resumed after the end
        final = run.evaluate(state)
    rate = float(np.median(run.speed.rates)) if run.speed.rates else None
    return {**(final or {}), "status": status, "step": int(jax.device_get(state["step"])),
            "wall_s": time.perf_counter() - started, "img_per_s": rate}


# --- a finished run ---------------------------------------------------------------------------


def is_ram_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a RAM run (a config.json with `num_glimpses`)."""
    try:
        return "num_glimpses" in json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_run(run_dir: str | Path, step: int | None = None
             ) -> tuple[RamConfig, RecurrentAttentionModel, Any, int]:
    """The config, the model, the parameters and the step of a run's checkpoint (default the
    latest)."""
    path = Path(run_dir) / "config.json"
    try:
        config = RamConfig(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a valid RamConfig: {error}") from None
    with Checkpoints(Path(run_dir) / "checkpoints", read_only=True) as checkpoints:
        meta = checkpoints.metadata(step)
        model = create_model(config, meta["num_classes"])
        init = functools.partial(init_state, model, config, tuple(meta["input_shape"]))
        state, _ = checkpoints.restore(jax.eval_shape(init), meta["step"])
    return config, model, state["params"], meta["step"]


def evaluate_ram_run(run_dir: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """The test metrics of a run's latest checkpoint (as `evaluate`), with its "step" and
    "mc_samples"."""
    config, model, params, step = load_run(run_dir)
    dataset = _load(dataclasses.replace(config, data_dir=data_dir or config.data_dir), "test")
    metrics = evaluate(model, params, dataset, config.mc_samples, config.seed)
    return {**metrics, "step": step, "mc_samples": config.mc_samples}


def visualize_run(run_dir: str | Path, path: str | Path, num_images: int = 4, seed: int = 0,
                  data_dir: str | None = None) -> Path:
    """Draws the glimpse paths of a run's latest checkpoint on the first `num_images` test
    images to a PNG (`plot_glimpse_path`), titled with label and prediction; returns `path`."""
    config, model, params, _ = load_run(run_dir)
    dataset = data.load_dataset(config.dataset, "test", data_dir=data_dir or config.data_dir)
    images, labels = dataset.images[:num_images], dataset.labels[:num_images]
    output = _apply(model, params, jnp.asarray(images), jax.random.key(seed))
    predicted = np.asarray(output.logits).argmax(-1)
    titles = [f"label {y}, predicted {p}" for y, p in zip(labels, predicted, strict=True)]
    return plot_glimpse_path(images, np.asarray(output.locations), path, config.glimpse_size,
                             config.num_scales, titles=titles)
