"""Pictures of a detection or segmentation run (`flax-attention visualize --run DIR`).

- detection: `boxes.png`, each test canvas with DETR's confident predictions (score >=
  `SCORE_THRESHOLD`) beside its true boxes; `decoder_attention.png`, the last decoder layer's
  cross-attention (mean over the heads, over the encoder's feature map, upsampled to the
  canvas) of the `QUERIES_SHOWN` most confident queries of each canvas, their boxes drawn over.
- segmentation: `label_maps.png`, each canvas, its predicted label map and the true one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from flax_attention.visualize import DPI, PANEL, show_image, upsample

__all__ = ["decoder_attention", "detection_figures", "draw_boxes", "draw_label_maps",
           "label_colours", "visualize_dense_run"]

SCORE_THRESHOLD = 0.5
QUERIES_SHOWN = 3


def _new_axes(ax, columns: int) -> tuple[Figure, Any]:
    """`ax` (one axes, or a sequence of `columns`) and its figure, or a new figure's row."""
    if ax is not None:
        first = ax if columns == 1 else ax[0]
        return first.get_figure(), ax
    fig = Figure(figsize=(2 * PANEL * columns, 2 * PANEL + 0.3), dpi=DPI, layout="compressed")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, axes[0] if columns == 1 else axes


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
               scores: np.ndarray | None, class_names: Sequence[str], ax=None) -> Figure:
    """Boxes over an image, one colour a class, named (with the score when given).

    Args:
      image: `[H, W, C]` in [0, 1].
      boxes: `[K, 4]` normalised (cx, cy, w, h), as DETR predicts and `digit-detection` holds.
      labels: `[K]` class of each box, an index into `class_names`.
      scores: `[K]` or None.
      class_names: the name of each class.
      ax: the matplotlib axes to draw on; None for a new figure.

    Returns:
      The figure drawn on.
    """
    from matplotlib.patches import Rectangle

    fig, ax = _new_axes(ax, 1)
    show_image(ax, np.clip(image, 0, 1))
    h, w = image.shape[:2]
    for k, (cx, cy, bw, bh) in enumerate(np.asarray(boxes, np.float64)):
        colour = f"C{int(labels[k]) % 10}"
        corner = ((cx - bw / 2) * w - 0.5, (cy - bh / 2) * h - 0.5)
        ax.add_patch(Rectangle(corner, bw * w, bh * h, fill=False, color=colour, linewidth=1.2))
        text = class_names[int(labels[k])] + ("" if scores is None else f" {scores[k]:.2f}")
        ax.text(*corner, text, color="white", fontsize=6, va="bottom",
                bbox={"facecolor": colour, "pad": 0.5, "linewidth": 0})
    return fig


def label_colours(num_classes: int) -> np.ndarray:
    """`[num_classes, 3]` RGB in [0, 1]: black for class 0 (background), then tab10 / tab20."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if num_classes <= 11 else "tab20"].colors
    return np.array([(0.0, 0.0, 0.0)] + [palette[k % len(palette)]
                                         for k in range(num_classes - 1)])


def draw_label_maps(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                    num_classes: int, path_or_ax=None,
                    class_names: Sequence[str] | None = None) -> Figure:
    """The image, the predicted label map and the true one side by side, one fixed colour a class
    (`label_colours`).

    Args:
      image: `[H, W, C]` in [0, 1].
      predicted: `[H, W]` int class per pixel.
      truth: `[H, W]` int class per pixel.
      num_classes: the number of classes (fixes the colours).
      path_or_ax: a file to save the figure to, three matplotlib axes to draw on, or None.
      class_names: names for the legend of the classes present; None for no legend.

    Returns:
      The figure drawn on.
    """
    to_file = isinstance(path_or_ax, str | Path)
    fig, axes = _new_axes(None if to_file else path_or_ax, 3)
    colours = label_colours(num_classes)
    show_image(axes[0], np.clip(image, 0, 1))
    for ax, labels, title in ((axes[1], predicted, "predicted"), (axes[2], truth, "truth")):
        show_image(ax, colours[np.clip(np.asarray(labels), 0, num_classes - 1)])
        ax.set_title(title, fontsize=8)
    if class_names is not None:
        from matplotlib.patches import Patch

        present = np.union1d(np.unique(predicted), np.unique(truth))
        axes[2].legend([Patch(color=colours[k]) for k in present],
                       [class_names[k] for k in present], fontsize=6, loc="center left",
                       bbox_to_anchor=(1.02, 0.5))
    if to_file:
        fig.savefig(path_or_ax, dpi=DPI)
    return fig


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
