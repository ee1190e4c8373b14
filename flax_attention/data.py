"""Data sets for the attention models: embedded digits, loaders for real data, batching.

Embedded data sets, generated deterministically from a seed out of the 1797 handwritten 8x8
digits that scikit-learn ships (`sklearn.datasets.load_digits`, no download). Each digit is
first upsampled to `DIGIT_SIZE` = 20 px (cubic splines; MNIST's digits fill a 20x20 box too).

- `distorted-digits`: the RTS set of the spatial transformer paper (Jaderberg et al. 2015): the
  digit rotated by U(-45, 45) degrees, scaled by U(0.7, 1.2) and translated to a uniform random
  position on a 42x42 canvas that keeps its ink inside (bilinear resampling). `[B, 42, 42, 1]`.
- `cluttered-digits`: the cluttered translated set of the recurrent attention paper (Mnih et al.
  2014): the digit at a uniform random position on a 60x60 canvas with 4 fragments of 8x8 px
  cropped from other digits of the same split. `[B, 60, 60, 1]`.
- `digit-detection`, `digit-segmentation` (`flax_attention.dense_data`): 64x64 canvases of 1 to
  5 digits at random sides and places; labels are DETR-style padded boxes (a dict with a
  validity mask) or per-pixel label maps `[B, 64, 64]` (background + 10 digits). 4000 train and
  1000 test canvases.

The source digits are split by index, so no test digit appears in train: train uses digits
0..1436 (7 augmented copies each: 10059 images), test digits 1437..1796 (6 copies: 2160).

Real MNIST, read from `data_dir` by `data_files.load_mnist` (IDX files or keras's mnist.npz), gives
`mnist` (28x28), `distorted-mnist` (42x42) and `cluttered-mnist` (60x60, RAM's benchmark), one
copy of each digit: 60000 train, 10000 test images (cluttered-mnist train takes 0.9 GB).

Every image set is float32 in [0, 1], NHWC; class labels and label maps are int32. `batches`
shuffles per (seed, epoch) and `prefetch_to_device` moves batches to the devices from a
background thread.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_attention._checks import check_choice

__all__ = [
    "DIGIT_SIZE", "Dataset", "batches", "clutter", "distort", "list_datasets", "load_dataset",
    "prefetch_to_device", "resize", "rotate_scale_translate",
]

DIGIT_SIZE = 20
_TRAIN_DIGITS = 1437  # sklearn digits [0, 1437) are train, the remaining 360 test
_COPIES = {"digits": {"train": 7, "test": 6}, "mnist": {"train": 1, "test": 1}}
SPLITS = ("train", "test")
DIGIT_NAMES = tuple(str(d) for d in range(10))
_INK = 0.1  # pixels above this count as ink when keeping a distorted digit on its canvas


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels in host memory.

    Attributes:
      images: `[B, H, W, C]` float32 in [0, 1].
      labels: `[B]` int32 class labels in [0, num_classes), `[B, H, W]` int32 label maps, or a
        dict of arrays each `[B, ...]` (detection: "classes" `[B, D]`, "boxes" `[B, D, 4]`,
        "valid" `[B, D]`). Integer labels, and a dict's "classes", lie in [0, num_classes).
      num_classes: the number of classes.
      class_names: the name of each class, by label.
      extras: generation records, each `[B, ...]`: `source` (index of the source digit in
        sklearn's digits or in the MNIST split), `angle` (degrees, counter-clockwise as
        displayed), `scale` and `center` (`[B, 2]` row, col of the digit's centre) for the
        distorted sets, `position` (`[B, 2]` row, col of the digit's top-left) for the cluttered.
    """

    images: np.ndarray
    labels: np.ndarray | Mapping[str, np.ndarray]
    num_classes: int
    class_names: tuple[str, ...] = ()
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = jax.tree.map(np.shape, self.labels)
        leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
        if self.images.ndim != 4 or any(shape[:1] != self.images.shape[:1] for shape in leaves):
            raise ValueError(
                "images [B, H, W, C] and labels [B, ...] must agree in B; got images "
                f"{self.images.shape} and labels {shapes}"
            )
        classes = self.labels.get("classes") if isinstance(self.labels, Mapping) else self.labels
        if (classes is not None and classes.size
                and not 0 <= classes.min() <= classes.max() < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{classes.min()}, {classes.max()}]")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray | slice) -> Dataset:
        """The examples at `index` (labels and extras indexed leaf-wise), e.g. `take(slice(n))`."""
        return Dataset(self.images[index], _index(self.labels, index), self.num_classes,
                       self.class_names, _index(dict(self.extras), index))


def _index(labels: Any, index: np.ndarray | slice) -> Any:
    """Every array of the pytree `labels` indexed along its first axis."""
    return jax.tree.map(lambda array: array[index], labels)


# --- generators ---------------------------------------------------------------------------------


def resize(images: np.ndarray, size: tuple[int, int], order: int = 3,
           mode: str = "grid-constant") -> np.ndarray:
    """Resizes `[B, h, w, ...]` images to `[B, *size, ...]` with splines of `order`.

    Pixels are squares (grid mode); `mode` extends the image as `scipy.ndimage` does
    ("grid-constant": zero outside, "nearest": the edge repeated). Clipped to [0, 1].
    """
    from scipy import ndimage

    def matrix(n: int, m: int) -> np.ndarray:  # [m, n]: the spline resize of each unit vector
        return ndimage.zoom(np.eye(n), (m / n, 1), order=order, mode=mode, grid_mode=True)

    h, w = images.shape[1:3]
    out = np.einsum("ih,bhw...,jw->bij...", matrix(h, size[0]), images, matrix(w, size[1]),
                    optimize=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def rotate_scale_translate(images: np.ndarray, angle: np.ndarray, scale: np.ndarray,
                           center: np.ndarray, canvas: int) -> np.ndarray:
    """Places each image on a canvas, rotated and scaled about its centre (bilinear).

    Args:
      images: `[B, h, w]`.
      angle: `[B]` degrees, counter-clockwise as displayed.
      scale: `[B]` output pixels per input pixel.
      center: `[B, 2]` (row, col) on the canvas where the image centre lands.
      canvas: the output side.

    Returns:
      `[B, canvas, canvas]` float32, zero where no image pixel lands.
    """
    from scipy import ndimage

    inverse = np.linalg.inv(_rotation(angle, scale))
    offset = (np.array(images.shape[1:]) - 1) / 2 - np.einsum("bij,bj->bi", inverse, center)
    out = np.empty((len(images), canvas, canvas), np.float32)
    for i, (matrix, shift) in enumerate(zip(inverse, offset, strict=True)):
        ndimage.affine_transform(images[i], matrix, shift, output=out[i], order=1,
                                 mode="grid-constant")
    return out


def _rotation(angle: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`[B, 2, 2]` maps of (row, col) offsets: rotation by `angle` degrees (counter-clockwise
    as displayed, rows pointing down) times `scale`."""
    cos, sin = np.cos(np.deg2rad(angle)) * scale, np.sin(np.deg2rad(angle)) * scale
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _ink_corners(images: np.ndarray) -> np.ndarray:
    """`[B, 4, 2]` corners (row, col) of the ink's box, relative to the image centre."""
    ink = images > _INK
    edges = []
    for mask in (ink.any(2), ink.any(1)):  # an empty mask gives the whole image
        n = mask.shape[1]
        first, last = mask.argmax(1), n - 1 - mask[:, ::-1].argmax(1)
        edges.append(np.stack([first - 0.5, last + 0.5], 1) - (n - 1) / 2)
    return np.stack([np.stack([edges[0][:, i], edges[1][:, j]], 1)
                     for i in (0, 1) for j in (0, 1)], 1)


def distort(images: np.ndarray, rng: np.random.Generator, canvas: int = 42,
            max_angle: float = 45.0, scales: tuple[float, float] = (0.7, 1.2)
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rotates, scales and translates `[B, h, w]` images at random onto `[B, canvas, canvas]`.

    Angles are U(-max_angle, max_angle) degrees, scales U(*scales); the centre is uniform over
    the positions that keep the ink (pixels above 0.1) on the canvas, or the canvas centre
    where none does. Returns the canvases and the records `angle`, `scale`, `center` (`[B, 2]`).
    """
    b = len(images)
    angle = rng.uniform(-max_angle, max_angle, b)
    scale = rng.uniform(*scales, b)
    corners = np.einsum("bij,bkj->bki", _rotation(angle, scale), _ink_corners(images))
    low, high = -0.5 - corners.min(1), canvas - 0.5 - corners.max(1)
    middle = (low + high) / 2
    low, high = np.minimum(low, middle), np.maximum(high, middle)
    center = low + (high - low) * rng.uniform(size=(b, 2))
    out = rotate_scale_translate(images, angle, scale, center, canvas)
    return out, {"angle": angle, "scale": scale, "center": center}


def _window(at: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fancy indices of the `h x w` windows with top-left `at` `[B, 2]`, one per image."""
    rows = at[:, 0, None, None] + np.arange(h)[:, None]
    cols = at[:, 1, None, None] + np.arange(w)
    return np.arange(len(at))[:, None, None], rows, cols


def clutter(images: np.ndarray, rng: np.random.Generator, canvas: int = 60,
            num_fragments: int = 4, fragment_size: int = 8
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Places `[B, h, w]` images at random on `[B, canvas, canvas]` among clutter fragments.

    Each canvas gets `num_fragments` crops of `fragment_size` px from other images of the batch
    (itself when B = 1) at uniform positions, then the image at a uniform position; overlaps
    keep the maximum. Returns the canvases and the record `position` (`[B, 2]` top-left).
    """
    b, h, w = images.shape
    f = fragment_size
    if not f <= min(h, w) <= max(h, w) <= canvas:
        raise ValueError(f"need fragment_size ({f}) <= image side <= canvas ({canvas}), "
                         f"got images {images.shape}")
    out = np.zeros((b, canvas, canvas), np.float32)
    for _ in range(num_fragments):
        other = (np.arange(b) + rng.integers(1, max(b, 2), b)) % b
        _, rows, cols = _window(rng.integers(0, (h - f + 1, w - f + 1), (b, 2)), f, f)
        fragment = images[other[:, None, None], rows, cols]
        window = _window(rng.integers(0, canvas - f + 1, (b, 2)), f, f)
        out[window] = np.maximum(out[window], fragment)
    position = rng.integers(0, (canvas - h + 1, canvas - w + 1), (b, 2))
    window = _window(position, h, w)
    out[window] = np.maximum(out[window], images)
    return out, {"position": position}


# --- registry ----------------------------------------------------------------------------------

_TRANSFORMS: dict[str, Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]] = {
    "none": lambda images, rng: (images, {}),
    "distort": distort,
    "clutter": clutter,
}
_DATASETS = {  # name -> (source, transform)
    "distorted-digits": ("digits", "distort"),
    "cluttered-digits": ("digits", "clutter"),
    "mnist": ("mnist", "none"),
    "distorted-mnist": ("mnist", "distort"),
    "cluttered-mnist": ("mnist", "clutter"),
}
_DENSE = {"digit-detection": "detection", "digit-segmentation": "segmentation"}  # name -> target


def list_datasets() -> tuple[str, ...]:
    """The names `load_dataset` takes; the `*mnist` ones need a `data_dir`."""
    return (*_DATASETS, *_DENSE)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits upsampled: `[1797, DIGIT_SIZE, DIGIT_SIZE]` float32, `[1797]` int32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = resize(digits.images / 16.0, (DIGIT_SIZE, DIGIT_SIZE))
    return images, digits.target.astype(np.int32)


def _source(kind: str, split: str, data_dir: str | Path | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split's digits `[B, h, w]`, labels `[B]` and their indices in the source."""
    if kind == "digits":
        images, labels = _sklearn_digits()
        index = np.arange(_TRAIN_DIGITS) if split == "train" else np.arange(_TRAIN_DIGITS,
                                                                            len(labels))
        return images[index], labels[index], index
    from flax_attention.data_files import load_mnist

    mnist = load_mnist(data_dir, split)
    return mnist.images[..., 0], mnist.labels, np.arange(len(mnist))


def _read_only(dataset: Dataset) -> Dataset:
    for array in (dataset.images, *jax.tree.leaves(dataset.labels), *dataset.extras.values()):
        array.flags.writeable = False
    return dataset


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, split: str = "train", seed: int = 0,
                 data_dir: str | Path | None = None) -> Dataset:
    """Generates (or returns from the in-memory cache) a data set; see the module docstring.

    Args:
      name: one of `list_datasets()`.
      split: "train" or "test"; the source digits of the two are disjoint.
      seed: non-negative; the same seed gives the same arrays (read-only) in every process.
      data_dir: where MNIST lies (see `load_mnist`); only for the `*mnist` sets.
    """
    check_choice("name", name, list_datasets())
    check_choice("split", split, SPLITS)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    kind, transform = _DATASETS.get(name, ("digits", None))
    if (kind == "mnist") != (data_dir is not None):
        need = "needs a data_dir holding MNIST" if kind == "mnist" else "takes no data_dir"
        raise ValueError(f"data set {name!r} {need}, got data_dir={data_dir!r}")
    rng = np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])
    if name in _DENSE:
        from flax_attention.dense_data import load_dense

        return _read_only(load_dense(_DENSE[name], split, rng))
    images, labels, index = _source(kind, split, data_dir)
    source = np.tile(np.arange(len(labels)), _COPIES[kind][split])
    images, extras = _TRANSFORMS[transform](images[source], rng)
    dataset = Dataset(images[..., None], labels[source], 10, DIGIT_NAMES,
                      {**extras, "source": index[source]})
    return _read_only(dataset)


# --- loaders of real data ----------------------------------------------------------------------


def batches(dataset: Dataset, batch_size: int, seed: int = 0, epoch: int = 0,
            drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled `(images [B, H, W, C], labels [B, ...])` batches, as numpy arrays.

    Labels come as the data set holds them (an array, or a dict of arrays indexed alike).

    The order depends only on (seed, epoch), so a resumed run sees the same batches; to resume
    mid-epoch skip the batches already seen with `itertools.islice`. Every example appears
    once, except the last `len(dataset) % batch_size` when `drop_remainder`.
    """
    n = len(dataset)
    if batch_size < 1 or (drop_remainder and batch_size > n):
        raise ValueError(f"batch_size must lie in [1, {n}] (the data set's size) with "
                         f"drop_remainder={drop_remainder}, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    parts = (order[start:start + batch_size] for start in range(0, stop, batch_size))
    return ((dataset.images[part], _index(dataset.labels, part)) for part in parts)


_END = object()


def _put(slots: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts `item` unless the consumer has gone; returns whether it was put."""
    while not stop.is_set():
        try:
            slots.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(iterator: Iterable, slots: queue.Queue, stop: threading.Event,
             sharding: jax.sharding.Sharding | None) -> None:
    try:
        for batch in iterator:
            if not _put(slots, (jax.device_put(batch, sharding), None), stop):
                return
        _put(slots, (_END, None), stop)
    except Exception as error:  # handed to the consumer, raised there
        _put(slots, (_END, error), stop)


def prefetch_to_device(iterator: Iterable, size: int = 2,
                       sharding: jax.sharding.Sharding | None = None) -> Iterator[Any]:
    """Yields the batches (any pytrees) of `iterator` as device arrays, `size` ahead of use.

    A background thread pulls from `iterator` and calls `jax.device_put(batch, sharding)`
    (the default device when `sharding` is None; e.g. a `NamedSharding` over the batch axis
    spreads a batch over a mesh), so reading and copying overlap the computation. An error in
    `iterator` is raised here; leaving the loop early (or the end of the batches) stops the
    thread and waits for it to finish the batch it is on, so that no thread is left running
    in JAX when the program exits (a daemon thread inside `device_put` at interpreter shutdown
    aborts the process: "terminate called after throwing an instance of ''").
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    return _prefetch(iterator, size, sharding)


def _prefetch(iterator: Iterable, size: int, sharding: jax.sharding.Sharding | None
              ) -> Iterator[Any]:
    slots: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(iterator, slots, stop, sharding),
                                daemon=True)
    producer.start()
    try:
        while True:
            batch, error = slots.get()
            if error is not None:
                raise error
            if batch is _END:
                return
            yield batch
    finally:
        stop.set()
        producer.join()
