"""The segmentation trainer: DANet, CCNet or the FCN baseline on `digit-segmentation`.

    result = SegmentationTrainer(SegmentationConfig(model="danet-small", steps=600)).fit()
    result.metrics["test_miou"], result.metrics["test_pixel_accuracy"]

The loss is the per-pixel cross-entropy (mean over the pixels) of every output, weighted as the
references train them (`AUX_WEIGHTS`): DANet's fused, position and channel attention outputs
summed (junfu1115/DANet `SegmentationMultiLosses`: loss1 + loss2 + loss3); CCNet's output plus
0.4 times its deep-supervision (`dsn`) output (speedinghzl/CCNet `CriterionDSN`); the FCN's one
output. Predictions use the first output only. The test evaluation reports the mean IoU over the
classes present in the truth or the prediction and the pixel accuracy
(`metrics.segmentation_scores`), with the test loss of the first output. See `train.dense`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention import metrics
from flax_attention.models import registry, segmentation
from flax_attention.train.dense import TASK_DATASETS, DenseConfig, DenseTrainer

__all__ = ["AUX_WEIGHTS", "SegmentationConfig", "SegmentationTrainer", "pixel_losses"]

# The loss weight of each output of the segmenters trained with their auxiliary outputs.
AUX_WEIGHTS: dict[type, tuple[float, ...]] = {segmentation.DANet: (1.0, 1.0, 1.0),
                                             segmentation.CCNet: (1.0, 0.4)}


@dataclasses.dataclass(frozen=True)
class SegmentationConfig(DenseConfig):
    """A segmentation run: `DenseConfig` with the segmenters' defaults."""

    model: str = "danet-small"
    dataset: str = TASK_DATASETS["segmentation"][0]
    out: str = "runs/danet-small-digit-segmentation"

    KIND: ClassVar[str] = "segmentation"


def pixel_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-pixel cross-entropy in float32, averaged per example: logits `[B, H, W, K]`,
    labels `[B, H, W]` int -> `[B]`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses.mean((1, 2))


class SegmentationTrainer(DenseTrainer):
    """Per-pixel cross-entropy on a segmenter and its auxiliary outputs; see the module
    docstring."""

    KIND = "segmentation"
    CONFIG = SegmentationConfig
    METRICS = ("loss", "pixel_accuracy")

    def model_fields(self) -> dict[str, bool]:
        """`aux=True` for the models trained on their auxiliary outputs too."""
        return {"aux": True} if type(registry.create(self.config.model)) in AUX_WEIGHTS else {}

    def outputs(self, variables: dict, images: jax.Array, train: bool, key: jax.Array | None
                ) -> tuple[tuple[jax.Array, ...], dict]:
        """The model's outputs as a tuple (the prediction first) and the new batch_stats."""
        outputs, batch_stats = self.apply(variables, images, train, key)
        return (outputs if isinstance(outputs, tuple) else (outputs,)), batch_stats

    def loss(self, params, state, images, labels, key):
        outputs, batch_stats = self.outputs(
            {"params": params, "batch_stats": state.batch_stats}, images, True, key)
        weights = AUX_WEIGHTS.get(type(self.model), (1.0,))
        loss = sum(w * pixel_losses(o, labels).mean() for w, o in zip(weights, outputs,
                                                                       strict=True))
        accuracy = (outputs[0].argmax(-1) == labels).mean()
        return loss, (batch_stats, {"loss": loss, "pixel_accuracy": accuracy})

    def eval_batch(self, variables, images, labels, mask, key):
        outputs, _ = self.outputs(variables, images, False, None)
        return {"prediction": outputs[0].argmax(-1).astype(jnp.uint8),
                "loss": pixel_losses(outputs[0], labels), "mask": mask}

    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        kept = self.kept(outputs)
        scores = metrics.segmentation_scores(kept["prediction"].astype(np.int32),
                                             self.test_set.labels, self.num_classes)
        return {"test_miou": float(scores["miou"]),
                "test_pixel_accuracy": float(scores["pixel_accuracy"]),
                "test_loss": float(kept["loss"].mean())}
