"""Pictures of what a trained run attends to (`flax-attention visualize --run DIR`).

    paths = visualize_run("runs/stn", num_images=6)

The maps are read, not recomputed: the model is applied once with the "intermediates"
collection mutable, so every attention module sows its map as "attention" (`SELayer` its gates
`[B, C]`, `CrissCrossAttention` its weights `[B, H, W, H+W-1]`, `NonLocal2D` and
`PositionAttention` their `[B, HW, L]` maps, ...), and `flax.linen.intercept_methods` tells
which module of the mechanism table (`flax_attention.mechanisms`) sowed what (its row, the size
of its input) and sows the `SpatialTransformer`'s output as its "attention". The row's
`picture` names the drawing, a pure function from arrays to a `matplotlib.figure.Figure`
(`draw` picks it):

- "stn": `stn_figure`, the input images above their transformed outputs;
- "gates": `gates_figure`, the channel gates as a heat map (images, sorted by class, x
  channels) beside the deviation of each class's mean gate from the mean over all;
- "criss_cross", "dense": `attention_figure`, the map of chosen query pixels
  (`choose_queries`: one on the digit, the centre, one on the background; marked) over the
  input image, upsampled from the feature grid to the image size (the grid is taken to cover
  the image; the pixels the convolutions' flooring drops are ignored);
- "spatial": `spatial_figure`, one map per image over it; "matrix": `matrix_figure`, the
  weight matrix of each example;
- "points": `points_figure`, the sampling points of a few queries (deformable attention) over
  each image, one colour a query.

RAM runs (their `config.json` has `num_glimpses`) are drawn by
`flax_attention.train.reinforce.visualize_run` (the glimpse path of each step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from flax_attention.functional.criss_cross import criss_cross_aggregate
from flax_attention.mechanisms import MECHANISMS, Mechanism
from flax_attention.non_local import NonLocal2D

__all__ = ["Record", "attention_figure", "choose_queries", "criss_cross_maps", "dense_maps",
           "draw", "gates_figure", "matrix_figure", "points_figure", "read_attention",
           "show_image", "spatial_figure", "stn_figure", "upsample", "visualize_run"]

DPI = 100
PANEL = 1.6  # inches per image panel
GATE_SAMPLE = 512  # test images whose SE gates are drawn
QUERY_NAMES = ("on the digit", "centre", "background")
_ROWS: dict[type, Mechanism] = {m.module_type: m for m in MECHANISMS}
_PICTURES = {m.short: m.picture for m in MECHANISMS}


@dataclasses.dataclass(frozen=True)
class Record:
    """What one call of a visualised module gave.

    Attributes:
      kind: the short name of the module's row in the mechanism table ("stn", "se", "cca",
        "nl", "pam", ...); its `picture` tells how it is drawn.
      path: the module's path in the model, e.g. ("cca",).
      value: what the module sowed as "attention", by its row's picture: "stn": the
        transformed images `[B, h, w, C]`; "gates": `[B, C]` (or `[B, P, C]`); "spatial":
        `[B, H, W]` (or `[B, H, W, C]`); "criss_cross": `[B, H, W, H+W-1]`; "dense":
        `[B, H*W, L]`; "matrix": `[B, ..., T, S]`; "points": `[B, Q, N, 2]` normalised (x, y)
        in [0, 1].
      query_hw: (H, W) of the module's input (the query grid).
      key_hw: the grid of the L keys: (H // 2, W // 2) for a sub-sampled non-local block,
        (H, W) otherwise.
    """

    kind: str
    path: tuple[str, ...]
    value: np.ndarray
    query_hw: tuple[int, int]
    key_hw: tuple[int, int]


def _key_hw(module: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    if isinstance(module, NonLocal2D) and module.sub_sample:
        return hw[0] // 2, hw[1] // 2
    return hw


def read_attention(model: nn.Module, variables: dict, *inputs: jax.Array,
                   **call_kwargs: Any) -> tuple[jax.Array, list[Record]]:
    """Applies `model` (jitted) to `inputs` (images `[B, H, W, C]` for a classifier) and returns
    its output and a `Record` for each call of a mechanism table module that sowed an
    "attention" map, in call order."""
    calls: list[tuple[str, tuple[str, ...], tuple[int, int], tuple[int, int]]] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and type(module) in _ROWS:
            hw = tuple(args[0].shape[1:3])
            row = _ROWS[type(module)]
            calls.append((row.short, tuple(module.path), hw, _key_hw(module, hw)))
            if row.picture == "stn":
                module.sow("intermediates", "attention", out)
        return out

    def apply(variables, *inputs):
        with nn.intercept_methods(interceptor):
            out, state = model.apply(variables, *inputs, mutable=["intermediates"],
                                     **call_kwargs)
        return out, state.get("intermediates", {})

    out, intermediates = jax.jit(apply)(variables, *inputs)  # `calls` is filled by the trace
    sown = traverse_util.flatten_dict(intermediates)
    seen: dict[tuple[str, ...], int] = {}
    records = []
    for kind, path, query_hw, key_hw in calls:
        if (*path, "attention") not in sown:  # a composite row (e.g. a block around SE)
            continue
        index, seen[path] = seen.get(path, 0), seen.get(path, 0) + 1
        value = np.asarray(sown[(*path, "attention")][index], np.float32)
        records.append(Record(kind, path, value, query_hw, key_hw))
    return out, records


def _pick(maps: jax.Array, queries: jax.Array, width: int) -> jax.Array:
    """`[B, H*W, ...]` rows of the `[B, Q, 2]` (row, col) queries -> `[B, Q, ...]`."""
    index = queries[..., 0] * width + queries[..., 1]
    return jax.vmap(lambda m, i: m[i])(maps, index)


@jax.jit
def criss_cross_maps(weights: jax.Array, queries: jax.Array) -> jax.Array:
    """The criss-cross weights of query pixels spread over the grid.

    Args:
      weights: `[B, H, W, H+W-1]` as `functional.criss_cross_weights` gives them.
      queries: `[B, Q, 2]` int (row, col) of the query pixels.

    Returns:
      `[B, Q, H, W]`: each query's weights on its row and column, zero elsewhere (summing to
      1), by `criss_cross_aggregate` of one-hot values.
    """
    b, h, w, _ = weights.shape
    one_hot = jnp.broadcast_to(jnp.eye(h * w, dtype=weights.dtype).reshape(1, h, w, h * w),
                               (b, h, w, h * w))
    dense = criss_cross_aggregate(weights, one_hot).reshape(b, h * w, h, w)
    return _pick(dense, queries, w)


@functools.partial(jax.jit, static_argnames=("query_hw", "key_hw"))
def dense_maps(weights: jax.Array, queries: jax.Array, query_hw: tuple[int, int],
               key_hw: tuple[int, int]) -> jax.Array:
    """The rows of a full attention map `[B, H*W, L]` (non-local, PAM) for `[B, Q, 2]` (row,
    col) queries on the `query_hw` grid, as `[B, Q, *key_hw]` images of the L keys."""
    if weights.shape[1:] != (query_hw[0] * query_hw[1], key_hw[0] * key_hw[1]):
        raise ValueError(f"weights must be [B, {query_hw[0]}*{query_hw[1]}, "
                         f"{key_hw[0]}*{key_hw[1]}], got shape {tuple(weights.shape)}")
    picked = _pick(weights, queries, query_hw[1])
    return picked.reshape(*picked.shape[:2], *key_hw)


@functools.partial(jax.jit, static_argnames="hw")
def upsample(maps: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """`[B, Q, h, w]` -> `[B, Q, *hw]`, bilinear."""
    return jax.image.resize(maps, (*maps.shape[:2], *hw), "linear")


@functools.partial(jax.jit, static_argnames="grid_hw")
def choose_queries(images: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Query pixels on a `grid_hw` grid for images `[B, H, W, C]`: `[B, 3, 2]` (row, col) of
    the cell with the most ink (on the digit), the centre, the cell with the least ink (the
    first such, in row-major order: the background)."""
    ink = jax.image.resize(images.mean(-1), (images.shape[0], *grid_hw), "linear")
    flat = ink.reshape(len(ink), -1)
    width = grid_hw[1]
    cells = jnp.stack([flat.argmax(-1), jnp.full(len(flat), grid_hw[0] // 2 * width + width // 2),
                       flat.argmin(-1)], axis=1)
    return jnp.stack([cells // width, cells % width], axis=-1)


def _to_pixels(queries: np.ndarray, grid_hw: tuple[int, int], image_hw: tuple[int, int]
               ) -> np.ndarray:
    """`[..., 2]` (row, col) grid cells -> `[..., 2]` (x, y) pixel centres of the image."""
    scale = np.asarray(image_hw) / np.asarray(grid_hw)
    row_col = (np.asarray(queries) + 0.5) * scale - 0.5
    return row_col[..., ::-1]


def show_image(ax, image: np.ndarray) -> None:
    """Draws an image `[H, W, C]` in [0, 1] on `ax` (grey when C = 1), without ticks."""
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def stn_figure(images: np.ndarray, transformed: np.ndarray,
               titles: Sequence[str] | None = None) -> Figure:
    """The inputs `[B, H, W, C]` (top row) above the spatial transformer's outputs
    `[B, h, w, C]` (bottom row), in [0, 1]; `titles` one per column."""
    b = len(images)
    fig = Figure(figsize=(PANEL * b, 2 * PANEL + 0.4), dpi=DPI, layout="compressed")
    axes = fig.subplots(2, b, squeeze=False)
    for i in range(b):
        show_image(axes[0, i], np.clip(images[i], 0, 1))
        show_image(axes[1, i], np.clip(transformed[i], 0, 1))
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=7)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("transformed")
    return fig


def gates_figure(gates: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 title: str = "") -> Figure:
    """SE gates `[B, C]` of images labelled `[B]`: a heat map of images (sorted by label) x
    channels, and how the mean gate of each of the `class_names` differs from the mean over
    all images (a class-specific channel stands out in red or blue)."""
    order = np.argsort(labels, kind="stable")
    means = np.stack([gates[labels == k].mean(0) if np.any(labels == k)
                      else np.full(gates.shape[1], np.nan) for k in range(len(class_names))])
    deviation = means - gates.mean(0)
    bound = max(float(np.nanmax(np.abs(deviation))), 1e-6)
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    shown = left.imshow(gates[order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                        interpolation="nearest")
    fig.colorbar(shown, ax=left)
    shown = right.imshow(deviation, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                         interpolation="nearest")
    fig.colorbar(shown, ax=right)
    for ax in (left, right):
        ax.set_xlabel("channel")
    left.set_ylabel("image (sorted by class)")
    right.set_ylabel("class")
    right.set_yticks(range(len(class_names)), class_names)
    left.set_title(f"{title} gates of {len(gates)} test images", fontsize=9)
    right.set_title("mean gate of each class minus the mean over all", fontsize=9)
    return fig


def _colour_bar(fig: Figure, shown, axes, label: str) -> None:
    """One colour bar beside `axes` for the image `shown` (whose range they all share)."""
    bar = fig.colorbar(shown, ax=axes, shrink=0.8, pad=0.02)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def attention_figure(images: np.ndarray, maps: np.ndarray, points: np.ndarray,
                     titles: Sequence[str] | None = None,
                     columns: Sequence[str] = QUERY_NAMES) -> Figure:
    """Attention maps over images: one row per image, one column per query, a colour bar per
    row (the maps of a row share its range, from 0).

    Args:
      images: `[B, H, W, C]` in [0, 1].
      maps: `[B, Q, H, W]` each query's map at the image size.
      points: `[B, Q, 2]` (x, y) pixel of each query, marked with a cross.
      titles: one per row (e.g. "label 3, predicted 3").
      columns: one title per column.
    """
    b, q = maps.shape[:2]
    fig = Figure(figsize=(PANEL * q, PANEL * b + 0.3), dpi=DPI, layout="compressed")
    axes = fig.subplots(b, q, squeeze=False)
    for i in range(b):
        for j in range(q):
            ax = axes[i, j]
            show_image(ax, np.clip(images[i], 0, 1))
            shown = ax.imshow(maps[i, j], cmap="inferno", alpha=0.6, vmin=0, vmax=maps[i].max())
            ax.plot(*points[i, j], "x", color="cyan", markersize=7, markeredgewidth=2)
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
        _colour_bar(fig, shown, axes[i], "weight")
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
    return fig


def spatial_figure(images: np.ndarray, maps: np.ndarray,
                   titles: Sequence[str] | None = None) -> Figure:
    """Spatial attention `[B, h, w]` (CBAM's spatial gate, GC's context weights, a residual
    attention mask averaged over channels) over the images `[B, H, W, C]` in [0, 1], one
    column each, the maps upsampled to the image size, one colour bar for their shared range."""
    b = len(images)
    maps = np.asarray(upsample(jnp.asarray(maps, jnp.float32)[:, None], images.shape[1:3]))[:, 0]
    fig = Figure(figsize=(PANEL * b, PANEL + 0.4), dpi=DPI, layout="compressed")
    axes = fig.subplots(1, b, squeeze=False)[0]
    for i, ax in enumerate(axes):
        show_image(ax, np.clip(images[i], 0, 1))
        shown = ax.imshow(maps[i], cmap="inferno", alpha=0.6, vmin=maps.min(), vmax=maps.max())
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    _colour_bar(fig, shown, axes, "attention")
    return fig


def matrix_figure(weights: np.ndarray, titles: Sequence[str] | None = None) -> Figure:
    """Attention matrices `[B, ..., T, S]` (DANet's channel x channel map, multi-head token
    weights averaged over the heads): one heat map per example, queries down, keys across, one
    colour bar for their shared range."""
    weights = weights.reshape(len(weights), -1, *weights.shape[-2:]).mean(1)
    b = len(weights)
    fig = Figure(figsize=(PANEL * b, PANEL + 0.4), dpi=DPI, layout="compressed")
    axes = fig.subplots(1, b, squeeze=False)[0]
    for i, ax in enumerate(axes):
        shown = ax.imshow(weights[i], cmap="viridis", aspect="auto", interpolation="nearest",
                          vmin=weights.min(), vmax=weights.max())
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    _colour_bar(fig, shown, axes, "weight")
    return fig


def points_figure(images: np.ndarray, points: np.ndarray, titles: Sequence[str] | None = None,
                  queries: int = 3) -> Figure:
    """Sampling points over the images `[B, H, W, C]` in [0, 1], one panel each: the N points
    `[B, Q, N, 2]` (normalised (x, y) in [0, 1], as `grid_sample` without aligned corners) of
    `queries` queries spread over the Q (first, ..., last), one colour a query."""
    b, q = points.shape[:2]
    chosen = np.unique(np.linspace(0, q - 1, min(queries, q)).round().astype(int))
    size = np.asarray(images.shape[2:0:-1], np.float32)  # (W, H)
    fig = Figure(figsize=(PANEL * b, PANEL + 0.4), dpi=DPI, layout="compressed")
    axes = fig.subplots(1, b, squeeze=False)[0]
    for i, ax in enumerate(axes):
        show_image(ax, np.clip(images[i], 0, 1))
        for colour, j in enumerate(chosen):
            x, y = (points[i, j] * size - 0.5).T
            ax.scatter(x, y, s=8, color=f"C{colour}", label=f"query {j}")
        ax.set_xlim(-0.5, size[0] - 0.5)
        ax.set_ylim(size[1] - 0.5, -0.5)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    axes[0].legend(fontsize=6, loc="upper right")
    return fig


def draw(record: Record, images: np.ndarray, labels: np.ndarray, titles: Sequence[str],
         class_names: Sequence[str]) -> Figure:
    """The picture of a record of `read_attention` on `images` `[B, H, W, C]` labelled `[B]`:
    the first `len(titles)` images (all `B` for the SE gates), titled; what is drawn is the
    `picture` of the record's row in the mechanism table."""
    n, name = len(titles), "/".join(record.path)
    picture = _PICTURES[record.kind]
    if picture == "stn":
        return stn_figure(images[:n], record.value[:n], titles)
    if picture == "gates":
        return gates_figure(record.value.reshape(len(record.value), -1), labels, class_names,
                            name)
    if picture == "spatial":
        value = record.value if record.value.ndim == 3 else record.value.mean(-1)
        return spatial_figure(images[:n], value[:n], titles)
    if picture == "matrix":
        return matrix_figure(record.value[:n], titles)
    if picture == "points":
        return points_figure(images[:n], record.value[:n], titles)
    queries = choose_queries(jnp.asarray(images[:n]), record.query_hw)
    weights = jnp.asarray(record.value[:n])
    maps = (criss_cross_maps(weights, queries) if picture == "criss_cross"
            else dense_maps(weights, queries, record.query_hw, record.key_hw))
    pixels = _to_pixels(np.asarray(queries), record.query_hw, images.shape[1:3])
    return attention_figure(images[:n], np.asarray(upsample(maps, images.shape[1:3])), pixels,
                            titles)


def _file_names(records: list[Record]) -> list[str]:
    kinds = [r.kind for r in records]
    return [f"{r.kind}.png" if kinds.count(r.kind) == 1
            else f"{r.kind}_{'_'.join(r.path)}.png" for r in records]


def visualize_run(run_dir: str | Path, out_dir: str | Path | None = None, num_images: int = 6,
                  seed: int = 0, data_dir: str | None = None) -> list[Path]:
    """Draws the pictures of a run's latest checkpoint (see the module docstring) as PNGs.

    Args:
      run_dir: a run directory of `flax-attention train` (supervised or RAM).
      out_dir: where the PNGs go (created); default `<run_dir>/pictures`.
      num_images: test images per picture (chosen at random with `seed`; the SE gates are
        drawn for up to `GATE_SAMPLE` of them).
      seed: the choice of images (and RAM's glimpse sampling).
      data_dir: where MNIST lies, for the `*mnist` data sets.

    Returns:
      The PNGs written.

    Raises:
      ValueError: not a run directory, no checkpoint, or a model with nothing to draw.
    """
    from flax_attention.train.run_dir import run_kind
    from flax_attention.train.supervised import call_kwargs, restore_run

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "pictures"
    if (run_dir / "config.json").is_file() and run_kind(run_dir) == "reinforce":
        from flax_attention.train.reinforce import visualize_run as draw_glimpses

        return [draw_glimpses(run_dir, out / "glimpses.png", num_images, seed, data_dir)]
    model, variables, test_set, _ = restore_run(run_dir, data_dir)
    order = np.random.default_rng(seed).permutation(len(test_set))
    chosen = order[:max(num_images, GATE_SAMPLE)]
    images, labels = test_set.images[chosen], test_set.labels[chosen]
    logits, records = read_attention(model, variables, jnp.asarray(images),
                                     **call_kwargs(model, False))
    if not records:
        raise ValueError(f"the model of {run_dir} has no spatial transformer or attention "
                         "module to draw")
    predicted = np.asarray(logits).argmax(-1)
    titles = [f"label {y}, predicted {p}" for y, p in zip(labels[:num_images],
                                                           predicted[:num_images], strict=True)]
    names = test_set.class_names or tuple(str(k) for k in range(test_set.num_classes))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for record, name in zip(records, _file_names(records), strict=True):
        figure = draw(record, images, labels, titles, names)
        figure.savefig(out / name, dpi=DPI)
        paths.append(out / name)
    return paths
