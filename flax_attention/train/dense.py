"""What the detection and segmentation trainers share: the config, the model's task, the
optimiser, the logs.

    result = DetectionTrainer(DetectionConfig(steps=2000, out="runs/detr")).fit()
    result.metrics["test_ap50"]

A dense trainer takes a detector or a segmenter of the registry (`models.registry`, e.g.
`detr-small`, `danet-small`) and a data set of its task (`TASK_DATASETS`), and refuses any other
pair before anything is written. AdamW under a linear warmup and a cosine decay to lr / 100, the
gradient clipped to `clip_norm` (DETR's 0.1) when set; dropout keys folded from the step. The
skeleton (`train.trainer`, `train.loop`) does the rest: data parallelism, the log (every
`log_every` steps: the loss, its parts, the learning rate, images/s), test evaluations (every
`eval_every` steps and at the end), checkpoints, interruption and resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention.models import detr, registry, segmentation
from flax_attention.train.supervised import call_kwargs
from flax_attention.train.trainer import RunConfig, Trainer, TrainState

__all__ = ["TASK_DATASETS", "DenseConfig", "DenseTrainer", "model_task"]

# The data sets of each task, the first the default.
TASK_DATASETS: dict[str, tuple[str, ...]] = {"detection": ("digit-detection",),
                                             "segmentation": ("digit-segmentation",)}
_TASK_WORDS = {"detection": "a detector", "segmentation": "a segmenter"}


def model_task(name: str) -> str | None:
    """"detection" for a registered detector, "segmentation" for a segmenter, else None."""
    if name not in registry.list_models():
        return None
    model = registry.create(name)
    if isinstance(model, detr.DETR):
        return "detection"
    if isinstance(model, segmentation.DANet | segmentation.CCNet | segmentation.FCN):
        return "segmentation"
    return None


@dataclasses.dataclass(frozen=True)
class DenseConfig(RunConfig):
    """A detection or segmentation run (`DetectionConfig`, `SegmentationConfig` set the
    defaults); saved with every checkpoint. A resume must give the same values, except for the
    fields in `RUNTIME`.

    Attributes:
      model: a detector or segmenter of `models.registry` (e.g. "detr-small").
      dataset: a data set of the model's task (`TASK_DATASETS`).
      epochs, steps, batch_size, seed, data_seed, out, checkpoint_every, keep_checkpoints,
        log_every, data_dir, limit, progress, skip_nonfinite: as `supervised.TrainConfig`'s.
      lr: peak learning rate of AdamW.
      weight_decay: AdamW's decoupled weight decay.
      warmup_steps: linear warmup from 0, then cosine decay to lr / 100 at the end.
      clip_norm: the global gradient norm is clipped to it (None: no clipping).
      eval_every: steps between test evaluations (0: only at the end).
    """

    model: str = ""
    dataset: str = ""
    epochs: int | None = None
    steps: int | None = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    clip_norm: float | None = None
    seed: int = 0
    data_seed: int = 0
    out: str = ""
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 25
    eval_every: int = 0
    data_dir: str | None = None
    limit: int | None = None
    progress: bool = True
    skip_nonfinite: bool = False

    RUNTIME: ClassVar[tuple[str, ...]] = ("out", "checkpoint_every", "keep_checkpoints",
                                          "log_every", "data_dir", "progress",
                                          "skip_nonfinite")
    BOUNDS: ClassVar[dict[str, float]] = {
        **RunConfig.BOUNDS, "warmup_steps": 0, "weight_decay": 0, "limit": 1, "eval_every": 0}

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        super().validate()
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")

    def examples(self, split: str) -> int | None:
        return self.limit


class DenseTrainer(Trainer):
    """A detector or a segmenter on a data set of its task; see the module docstring.

    A subclass sets `KIND` (its task), `CONFIG`, `METRICS`, `model_fields` and supplies `loss`,
    `eval_batch` (per-example outputs, concatenated over the test set by `combine_eval`) and
    `eval_metrics`.
    """

    def __init__(self, config: DenseConfig, mesh: jax.sharding.Mesh | None = None):
        task = model_task(config.model)
        if task != self.KIND:
            kind = f"is {_TASK_WORDS[task]}" if task else "is no detector or segmenter"
            raise ValueError(f"model {config.model!r} {kind}: the {self.KIND} trainer takes "
                             f"{_TASK_WORDS[self.KIND]} of models.registry")
        if config.dataset not in TASK_DATASETS[task]:
            raise ValueError(f"model {config.model!r} is {_TASK_WORDS[task]}: it trains on "
                             f"{' or '.join(TASK_DATASETS[task])}, not {config.dataset!r}")
        super().__init__(config, mesh)

    def model_fields(self) -> dict[str, Any]:
        """Fields of the model besides num_classes (e.g. the auxiliary outputs)."""
        return {}

    def create_model(self) -> nn.Module:
        return registry.create(self.config.model, self.num_classes, **self.model_fields())

    def create_optimizer(self) -> optax.GradientTransformation:
        config, total = self.config, self.total_steps
        warmup = min(config.warmup_steps, total - 1)
        self.schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total,
                                                           end_value=config.lr / 100)
        adamw = optax.adamw(self.schedule, weight_decay=config.weight_decay)
        if config.clip_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)

    def init_variables(self, key: jax.Array) -> tuple[dict, jax.Array]:
        init_key, dropout_key = jax.random.split(key)
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return self.model.init(init_key, dummy, **call_kwargs(self.model, False)), dropout_key

    def apply(self, variables: dict, images: jax.Array, train: bool, key: jax.Array | None
              ) -> tuple[Any, dict]:
        """The model's outputs on images `[B, H, W, C]` and the updated batch_stats (training:
        batch statistics and dropout from `key`)."""
        kwargs = call_kwargs(self.model, train)
        if not train:
            return self.model.apply(variables, images, **kwargs), variables["batch_stats"]
        outputs, updates = self.model.apply(variables, images, rngs={"dropout": key},
                                            mutable=["batch_stats"], **kwargs)
        return outputs, updates.get("batch_stats", {})

    def combine_eval(self, outputs: list[dict]) -> dict:
        """The test set's per-example outputs, concatenated (padding included)."""
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)

    @staticmethod
    def kept(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The combined outputs less the padding (`outputs["mask"]`)."""
        mask = outputs["mask"]
        return {k: v[mask] for k, v in outputs.items() if k != "mask"}

    def log_record(self, step: int, state: TrainState, metrics: dict) -> dict[str, Any]:
        return {**{k: float(metrics[k]) for k in self.METRICS},
                "lr": float(self.schedule(step - 1))}

    def evaluates_at(self, step: int) -> bool:
        every = self.config.eval_every
        return every > 0 and step % every == 0

    def train_record(self, step: int, state: TrainState) -> dict[str, Any]:
        return {f"train_{k}": v for k, v in self.sums_mean(step, state).items()}
