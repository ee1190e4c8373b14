"""Pictures of a detection or segmentation run (`flax-attention visualize --run DIR`).

- detection: `boxes.png`, each test canvas with DETR's confident predictions (score >=
  `SCORE_THRESHOLD`) beside its true boxes; `decoder_attention.png`, the last decoder layer's
  cross-attention (mean over the heads, over the encoder's feature map, upsampled to the
  canvas) of the `QUERIES_SHOWN` most confident queries of each canvas, their boxes drawn over.
- segmentation: `label_maps.png`, each canvas, its predicted label map and the true one.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from flax_attention.visualize import DPI, PANEL, draw_boxes, draw_label_maps, upsample

__all__ = ["decoder_attention", "detection_figures", "visualize_dense_run"]

SCORE_THRESHOLD = 0.5
QUERIES_SHOWN = 3


def decoder_attention(model: nn.Module, variables: dict, images: jnp.ndarray
                      ) -> tuple[dict, np.ndarray]:
    """DETR's outputs and its last decoder layer's cross-attention.

    Args:
      model: a `models.detr.DETR`.
      variables: its variables.
      images: `[B, H, W, C]`.

    Returns:
      The outputs (`pred_logits`, `pred_boxes`, ...) and the weights `[B, Q, h, w]` (mean over
      the heads) of each query over the encoder's feature map `[h, w]`.
    """
    outputs, state = model.apply(variables, images, mutable=["intermediates"])
    sown = traverse_util.flatten_dict(state["intermediates"])
    cross = sorted(k for k in sown if "multihead_attn" in k and k[-1] == "attention")
    if not cross:
        raise ValueError("the detector sowed no decoder cross-attention")
    weights = np.asarray(sown[cross[-1]][0], np.float32).mean(1)  # [B, Q, S]
    features = sown[max(k for k in sown if k[0] == "backbone")][0]  # the last stage's output
    return outputs, weights.reshape(*weights.shape[:2], *features.shape[1:3])


def detection_figures(images: np.ndarray, truth: dict[str, np.ndarray], outputs: dict,
                      attention: np.ndarray, class_names: tuple[str, ...]
                      ) -> tuple[Figure, Figure]:
    """The boxes figure and the decoder attention figure (see the module docstring) of
    images `[B, H, W, C]`, their true labels (the data set's dict) and DETR's outputs."""
    from flax_attention.train.detection import postprocess

    pred = {k: np.asarray(v) for k, v in postprocess(outputs).items()}
    b = len(images)
    boxes_fig = Figure(figsize=(2 * PANEL * 2, 2 * PANEL * b), dpi=DPI, layout="compressed")
    axes = boxes_fig.subplots(b, 2, squeeze=False)
    maps = np.asarray(upsample(jnp.asarray(attention), images.shape[1:3]))
    attn_fig = Figure(figsize=(PANEL * QUERIES_SHOWN, PANEL * b), dpi=DPI, layout="compressed")
    attn_axes = attn_fig.subplots(b, QUERIES_SHOWN, squeeze=False)
    for i in range(b):
        keep = pred["scores"][i] >= SCORE_THRESHOLD
        draw_boxes(images[i], pred["boxes"][i][keep], pred["classes"][i][keep],
                   pred["scores"][i][keep], class_names, axes[i, 0])
        valid = truth["valid"][i]
        draw_boxes(images[i], truth["boxes"][i][valid], truth["classes"][i][valid], None,
                   class_names, axes[i, 1])
        top = np.argsort(-pred["scores"][i])[:QUERIES_SHOWN]
        for j, q in enumerate(top):
            ax = attn_axes[i, j]
            draw_boxes(images[i], pred["boxes"][i][q:q + 1], pred["classes"][i][q:q + 1],
                       pred["scores"][i][q:q + 1], class_names, ax)
            ax.imshow(maps[i, q], cmap="inferno", alpha=0.55, vmin=0)
            ax.set_title(f"query {q}", fontsize=7)
    axes[0, 0].set_title(f"predicted (score >= {SCORE_THRESHOLD})", fontsize=8)
    axes[0, 1].set_title("truth", fontsize=8)
    return boxes_fig, attn_fig


def visualize_dense_run(run_dir: str | Path, out_dir: str | Path | None = None,
                        num_images: int = 6, seed: int = 0, data_dir: str | None = None
                        ) -> list[Path]:
    """Draws the pictures of a detection or segmentation run's latest checkpoint as PNGs.

    Args:
      run_dir: a run directory of `flax-attention train` with a detector or segmenter.
      out_dir: where the PNGs go (created); default `<run_dir>/pictures`.
      num_images: test canvases drawn (chosen at random with `seed`).
      seed: the choice of canvases.
      data_dir: unused by the embedded data sets (as `visualize_run`'s).

    Returns:
      The PNGs written.
    """
    from flax_attention.train.loop import open_run

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    trainer, state, _ = open_run(run_dir, data_dir)
    if trainer.KIND not in ("detection", "segmentation"):
        raise ValueError(f"{run_dir} is a {trainer.KIND} run, not a detection or segmentation one")
    test = trainer.test_set.take(np.random.default_rng(seed).permutation(
        len(trainer.test_set))[:num_images])
    variables = trainer.variables(state)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "pictures"
    out.mkdir(parents=True, exist_ok=True)
    names = test.class_names or tuple(str(k) for k in range(test.num_classes))
    if trainer.KIND == "detection":
        outputs, attention = decoder_attention(trainer.model, variables, jnp.asarray(test.images))
        figures = detection_figures(test.images, test.labels, outputs, attention, names)
        paths = [out / "boxes.png", out / "decoder_attention.png"]
    else:
        outputs, _ = trainer.outputs(variables, jnp.asarray(test.images), False, None)
        predicted = np.asarray(outputs[0].argmax(-1))
        figure = Figure(figsize=(2 * PANEL * 3, 2 * PANEL * num_images), dpi=DPI,
                        layout="compressed")
        axes = figure.subplots(len(test), 3, squeeze=False)
        for i in range(len(test)):
            draw_label_maps(test.images[i], predicted[i], test.labels[i], test.num_classes,
                            axes[i], names if i == 0 else None)
        figures, paths = [figure], [out / "label_maps.png"]
    for figure, path in zip(figures, paths, strict=True):
        figure.savefig(path, dpi=DPI)
    return paths
