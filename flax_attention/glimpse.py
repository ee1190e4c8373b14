"""The glimpse sensor of the Recurrent Attention Model (Mnih, Heess, Graves, Kavukcuoglu:
"Recurrent Models of Visual Attention", NeurIPS 2014) as a module, and plots of glimpse paths.

The math, `retina` (with `check_retina_args`, `glimpse_extents` and its `METHODS`), is
in `flax_attention.functional.glimpse`, whose docstring describes the patches and locations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.functional.glimpse import glimpse_extents, retina

__all__ = ["GlimpseSensor", "plot_glimpse_path", "to_pixels"]


class GlimpseSensor(nn.Module):
    """The retina of RAM (Mnih et al. 2014) as a parameter-free module; see `retina`.

    Differences from the reference (`Retina.foveate`): locations are not rounded to whole
    pixels (bilinear sampling makes the glimpse differentiable and shift-continuous); the output
    keeps the patches apart, `[B, k, g, g, C]`, instead of flattening them (the glimpse network
    flattens). It has no parameters, hence no `param_dtype`; `dtype` casts the output.

    Attributes:
      patch_size: g, the side of every output patch (12 for 60x60 in the paper).
      num_scales: k, the number of patches (3 in the paper).
      scale: the ratio of the sides of successive patches (2 in the paper).
      method: "gather", "separable" or None (see `retina`).
    """

    patch_size: int = 12
    num_scales: int = 3
    scale: int = 2
    method: str | None = None
    dtype: jnp.dtype | None = None

    def __call__(self, images: jax.Array, locations: jax.Array) -> jax.Array:
        """`[B, H, W, C]`, `[B, 2]` (x, y) -> `[B, k, g, g, C]`."""
        if self.dtype is not None:
            images = images.astype(self.dtype)
        return retina(images, locations, self.patch_size, self.num_scales, self.scale,
                      self.method)


# --- plotting -----------------------------------------------------------------------------------


def to_pixels(locations: np.ndarray, height: int, width: int) -> np.ndarray:
    """Locations (x, y) in [-1, 1] -> (column, row) in the pixel coordinates of `imshow` (pixel
    centres at integers, the image from -0.5 to W - 0.5): `[..., 2]` -> `[..., 2]`."""
    locations = np.asarray(locations, np.float64)
    return (locations + 1) * np.array([width, height]) / 2 - 0.5


def plot_glimpse_path(images: np.ndarray, locations: np.ndarray, path: str | Path,
                      patch_size: int = 12, num_scales: int = 3, scale: int = 2,
                      titles: Sequence[str] | None = None) -> Path:
    """Draws where RAM looked: one row per image, one panel per glimpse, to a PNG.

    Panel t shows the image, the path of the glimpse centres up to t (dots joined by a line)
    and the k squares of glimpse t (matplotlib, Agg backend).

    Args:
      images: `[B, H, W, C]` (C = 1 or 3) in [0, 1].
      locations: `[B, L, 2]` glimpse centres (x, y) in [-1, 1], as `RamOutput.locations`.
      path: the PNG to write (its directory is created).
      patch_size, num_scales, scale: the retina's, for the squares.
      titles: a title for each row (e.g. "label 3, predicted 3"), or None.

    Returns:
      `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images, locations = np.asarray(images), np.asarray(locations)
    if images.ndim != 4 or locations.ndim != 3 or locations.shape[::2] != (len(images), 2):
        raise ValueError(f"need images [B, H, W, C] and locations [B, L, 2]; got images "
                         f"{images.shape} and locations {locations.shape}")
    (b, h, w, c), steps = images.shape, locations.shape[1]
    centres = to_pixels(locations, h, w)
    extents = glimpse_extents(patch_size, num_scales, scale)
    fig, axes = plt.subplots(b, steps, figsize=(1.8 * steps, 1.9 * b), squeeze=False)
    for i, row in enumerate(axes):
        for t, ax in enumerate(row):
            ax.imshow(images[i, ..., 0] if c == 1 else images[i], cmap="gray", vmin=0, vmax=1)
            ax.plot(centres[i, :t + 1, 0], centres[i, :t + 1, 1], "-o", color="tab:orange",
                    markersize=2, linewidth=1)
            for side in extents:
                corner = centres[i, t] - side / 2
                ax.add_patch(Rectangle(tuple(corner), side, side, fill=False, linewidth=1,
                                       edgecolor="tab:red"))
            ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5), xticks=[], yticks=[])
            ax.set_title(f"glimpse {t + 1}", fontsize=7)
        if titles is not None:
            row[0].set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
