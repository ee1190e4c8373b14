"""Canvases of digits for detection and segmentation (`digit-detection`, `digit-segmentation`).

Each `CANVAS` x `CANVAS` canvas (one size, so canvases batch) holds 1 to `MAX_DIGITS` digits of
scikit-learn's set (the split's digits, as `flax_attention.data` splits them) at uniform random
sides in `SIDES` px (the 20 px digit of `data` resized by cubic splines) and uniform random
places that keep the digit on the canvas. A digit's box is the tight box of its ink (pixels above
`data._INK`); a place is accepted only where the new box covers less than `MAX_COVER` of the
smaller of it and every box placed before (intersection over the smaller area, which bounds the
IoU too), so every digit stays visible; a digit that finds no such place in `_TRIES` draws is
left out (so a canvas may hold fewer digits than drawn, never none).

Digits are drawn in slot order; the image keeps the maximum of overlapping digits, and the
label map gives a pixel to the digit drawn last among those whose stroke covers it (a stroke:
the pixels above `STROKE`, thinner than the ink that bounds the box). Targets:

- `digit-detection`: `{"classes": [B, 5] int32, "boxes": [B, 5, 4] float32, "valid": [B, 5]
  bool}`, boxes as DETR's normalised (cx, cy, w, h) in [0, 1]; padding slots (after the valid
  ones) are 0 and not valid.
- `digit-segmentation`: `[B, 64, 64]` int32 label maps, 0 background and 1 + digit on the
  strokes (so a pixel is labelled exactly where the image exceeds `STROKE`).

Both come from `digit_canvases` (the same canvases for the same seed); `extras["source"]`
`[B, 5]` is each slot's index in sklearn's digits (-1 for padding).
"""

from __future__ import annotations

import numpy as np

from flax_attention import data

__all__ = ["CANVAS", "MAX_DIGITS", "SEGMENTATION_NAMES", "SIDES", "digit_canvases", "ink_boxes",
           "load_dense"]

CANVAS = 64
MAX_DIGITS = 5
SIDES = (12, 28)  # smallest and largest digit side in px, both included
MAX_COVER = 0.3
STROKE = 0.5  # pixels above this belong to a digit's stroke in the label maps
SIZES = {"train": 4000, "test": 1000}  # canvases per split
SEGMENTATION_NAMES = ("background", *data.DIGIT_NAMES)
TARGETS = ("detection", "segmentation")
_TRIES = 32


def ink_boxes(patches: np.ndarray) -> np.ndarray:
    """`[B, 4]` (row0, col0, row1, col1) pixel-edge boxes of the ink of `[B, h, w]` patches.

    An edge box: the ink covers rows row0 .. row1 - 1. Patches without ink give zeros.
    """
    edges = []
    for mask in (patches > data._INK).any(2), (patches > data._INK).any(1):
        n = mask.shape[1]
        first, stop = mask.argmax(1), n - mask[:, ::-1].argmax(1)
        edges.append(np.where(mask.any(1)[:, None], np.stack([first, stop], 1), 0))
    return np.stack([edges[0][:, 0], edges[1][:, 0], edges[0][:, 1], edges[1][:, 1]], 1)


def _cover(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of `box [..., 4]` and `others [..., 4]` (edge boxes)."""
    low = np.maximum(box[..., :2], others[..., :2])
    high = np.minimum(box[..., 2:], others[..., 2:])
    inter = np.prod(np.clip(high - low, 0, None), -1)
    smaller = np.minimum(np.prod(box[..., 2:] - box[..., :2], -1),
                         np.prod(others[..., 2:] - others[..., :2], -1))
    return inter / np.maximum(smaller, 1)


def _patches(digits: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Each of `digits [B, 8, 8]` resized to its `side [B]` at the top-left of `[B, S, S]`."""
    out = np.zeros((len(digits), SIDES[1], SIDES[1]), np.float32)
    for s in np.unique(side):
        chosen = side == s
        out[chosen, :s, :s] = data.resize(digits[chosen], (s, s))
    return out


def _place(boxes: np.ndarray, side: np.ndarray, valid: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners `[B, D, 2]` of the patches and which slots found a place `[B, D]`.

    `boxes [B, D, 4]` are the ink boxes within the patches, `side [B, D]` the patch sides;
    slots run in order, each taking its first draw that covers little of the slots before.
    """
    b, d = valid.shape
    valid = valid.copy()
    corner = np.zeros((b, d, 2), np.int64)
    placed = np.zeros((b, d, 4))
    for j in range(d):
        tries = rng.integers(0, CANVAS - side[:, j, None, None] + 1, (b, _TRIES, 2))
        candidate = boxes[:, j, None] + np.tile(tries, 2)  # [B, T, 4]
        cover = _cover(candidate[:, :, None], placed[:, None, :j])  # [B, T, j]
        free = ((cover < MAX_COVER) | ~valid[:, None, :j]).all(2)
        first = free.argmax(1)
        corner[:, j] = tries[np.arange(b), first]
        valid[:, j] &= free.any(1)
        placed[:, j] = candidate[np.arange(b), first]
    return corner, valid


def digit_canvases(digits: np.ndarray, classes: np.ndarray, count: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws `count` canvases of digits picked uniformly from `digits [N, h, w]`.

    Args:
      digits: source digits `[N, h, w]` in [0, 1].
      classes: their classes `[N]` int.
      count: canvases to draw, B.
      rng: the generator; the same state gives the same canvases.

    Returns:
      `images [B, 64, 64, 1]` float32, `label_map [B, 64, 64]` int32 (0 background, 1 + class
      on the strokes),
      `classes [B, 5]` int32, `boxes [B, 5, 4]` float32 (cx, cy, w, h) / 64, `valid [B, 5]`
      bool (valid slots first, in drawing order) and `source [B, 5]` (index in `digits`, -1
      for padding); see the module docstring.
    """
    shape = (count, MAX_DIGITS)
    wanted = np.arange(MAX_DIGITS) < rng.integers(1, MAX_DIGITS + 1, count)[:, None]
    source = rng.integers(0, len(digits), shape)
    side = rng.integers(SIDES[0], SIDES[1] + 1, shape)
    patches = np.zeros((*shape, SIDES[1], SIDES[1]), np.float32)
    patches[wanted] = _patches(digits[source[wanted]], side[wanted])
    boxes = ink_boxes(patches.reshape(-1, SIDES[1], SIDES[1])).reshape(*shape, 4)
    corner, valid = _place(boxes, side, wanted & (boxes[..., 2] > boxes[..., 0]), rng)
    images, label_map = _draw(patches, corner, valid, classes[source])
    order = np.argsort(~valid, 1, kind="stable")  # valid slots first, drawing order kept
    valid, source, boxes = (_take(a, order) for a in (valid, source, boxes + np.tile(corner, 2)))
    row0, col0, row1, col1 = np.moveaxis(boxes * valid[..., None], -1, 0)
    return {
        "images": images[..., None],
        "label_map": label_map,
        "classes": np.where(valid, classes[source], 0).astype(np.int32),
        "boxes": (np.stack([col0 + col1, row0 + row1, 2 * (col1 - col0), 2 * (row1 - row0)], -1)
                  / (2 * CANVAS)).astype(np.float32),
        "valid": valid,
        "source": np.where(valid, source, -1),
    }


def _take(array: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`array [B, D, ...]` with its slots reordered by `order [B, D]`."""
    return np.take_along_axis(array, order.reshape(order.shape + (1,) * (array.ndim - 2)), 1)


def _draw(patches: np.ndarray, corner: np.ndarray, valid: np.ndarray, classes: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Images `[B, 64, 64]` (maximum of the valid patches `[B, D, S, S]` at `corner [B, D, 2]`)
    and label maps (the last stroke wins), drawn slot by slot."""
    b, d, s = patches.shape[:3]
    padded = CANVAS + s  # room for a patch at any corner
    images = np.zeros(b * padded * padded, np.float32)  # flat: one gather index per pixel
    label_map = np.zeros(images.shape, np.int32)
    grid = np.arange(s)[:, None] * padded + np.arange(s)
    for j in range(d):
        drawn = np.nonzero(valid[:, j])[0]
        at = (drawn * padded + corner[drawn, j, 0]) * padded + corner[drawn, j, 1]
        window, patch = at[:, None, None] + grid, patches[drawn, j]
        images[window] = np.maximum(images[window], patch)
        label_map[window] = np.where(patch > STROKE, 1 + classes[drawn, j, None, None],
                                     label_map[window])
    crop = (slice(None), slice(CANVAS), slice(CANVAS))
    return (images.reshape(b, padded, padded)[crop], label_map.reshape(b, padded, padded)[crop])


def load_dense(target: str, split: str, rng: np.random.Generator) -> data.Dataset:
    """The data set of `target` ("detection" or "segmentation") drawn from the split's digits."""
    digits, classes, index = data._source("digits", split, None)
    drawn = digit_canvases(digits, classes, SIZES[split], rng)
    source = np.where(drawn["valid"], index[np.maximum(drawn["source"], 0)], -1)
    if target == "detection":
        labels = {key: drawn[key] for key in ("classes", "boxes", "valid")}
        return data.Dataset(drawn["images"], labels, 10, data.DIGIT_NAMES, {"source": source})
    return data.Dataset(drawn["images"], drawn["label_map"], 11, SEGMENTATION_NAMES,
                        {"source": source})
