"""The detection trainer: DETR on `digit-detection`, with its set criterion.

    result = DetectionTrainer(DetectionConfig(model="detr-small", steps=2000)).fit()
    result.metrics["test_map"], result.metrics["test_ap50"]

The loss is DETR's (`detr_criterion.set_criterion`): Hungarian matching of the queries to the
canvas's digits, then cross-entropy ("no object" weighted 0.1), L1 and generalised IoU losses
(weights 1, 5, 2), for the last decoder layer and, as DETR, every earlier one (the auxiliary
losses). The log holds the total and the last layer's matched losses (`loss_ce`, `loss_bbox`,
`loss_giou`). The test evaluation predicts, as DETR's `PostProcess`, every query's box with its
most likely class (no object aside) and that probability as its score, and reports COCO's box
mAP@[.5:.95], AP50 and AP75 (`metrics.average_precision`). See `train.dense` for the rest.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention import metrics
from flax_attention.detr_criterion import set_criterion
from flax_attention.train.dense import TASK_DATASETS, DenseConfig, DenseTrainer

__all__ = ["DetectionConfig", "DetectionTrainer", "detection_targets", "postprocess"]


@dataclasses.dataclass(frozen=True)
class DetectionConfig(DenseConfig):
    """A detection run: `DenseConfig` with DETR's defaults (lr 2e-4 rather than DETR's 1e-4
    for short runs from scratch; the gradient clipped to 0.1 as DETR)."""

    model: str = "detr-small"
    dataset: str = TASK_DATASETS["detection"][0]
    lr: float = 2e-4
    clip_norm: float | None = 0.1
    out: str = "runs/detr-small-digit-detection"

    KIND: ClassVar[str] = "detection"


def detection_targets(labels: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The data set's labels (`classes` `[B, T]`, `boxes` `[B, T, 4]`, `valid` `[B, T]`) as
    `set_criterion`'s targets."""
    return {"labels": labels["classes"], "boxes": labels["boxes"], "mask": labels["valid"]}


def postprocess(outputs: dict) -> dict[str, jax.Array]:
    """DETR's `PostProcess` without the rescaling: per query the most likely class (no object
    aside) and its probability.

    Args:
      outputs: `{"pred_logits": [B, Q, K + 1], "pred_boxes": [B, Q, 4]}`.

    Returns:
      `{"boxes": [B, Q, 4] (cx, cy, w, h) normalised, "scores": [B, Q], "classes": [B, Q]}`.
    """
    probs = jax.nn.softmax(outputs["pred_logits"].astype(jnp.float32), axis=-1)[..., :-1]
    return {"boxes": outputs["pred_boxes"].astype(jnp.float32), "scores": probs.max(-1),
            "classes": probs.argmax(-1).astype(jnp.int32)}


class DetectionTrainer(DenseTrainer):
    """DETR's set criterion on a detector; see the module docstring."""

    KIND = "detection"
    CONFIG = DetectionConfig
    METRICS = ("loss", "loss_ce", "loss_bbox", "loss_giou")

    def loss(self, params, state, images, labels, key):
        outputs, batch_stats = self.apply({"params": params, "batch_stats": state.batch_stats},
                                          images, True, key)
        total, losses = set_criterion(outputs, detection_targets(labels), self.num_classes)
        parts = {k: losses[k] for k in self.METRICS[1:]}
        return total, (batch_stats, {"loss": total, **parts})

    def eval_batch(self, variables, images, labels, mask, key):
        outputs, _ = self.apply(variables, images, False, None)
        return {**postprocess(outputs), "mask": mask}

    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        scores = metrics.average_precision(self.kept(outputs), self.test_set.labels)
        return {"test_map": float(scores["map"]), "test_ap50": float(scores["ap50"]),
                "test_ap75": float(scores["ap75"])}
