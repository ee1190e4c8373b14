"""Data on disk: MNIST (IDX files or keras's mnist.npz) and folders of images, as `Dataset`s.

`load_mnist(path, split)` reads the files `flax_attention.data`'s `*mnist` data sets are made
from; `load_image_folder(path)` reads one class per subfolder. Images are float32 in [0, 1],
NHWC; labels int32.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np

from flax_attention._checks import check_choice
from flax_attention.data import DIGIT_NAMES, SPLITS, Dataset, resize

__all__ = ["load_image_folder", "load_mnist"]

_IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".npy", ".png")
_GRAY_MODES = ("1", "L", "LA")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, gzipped if its name ends in .gz."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read the IDX file {path}: {error}") from error
    start = 4 + 4 * ndim
    if len(raw) < start or raw[:4] != bytes((0, 0, 8, ndim)):
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions "
                         f"(header {raw[:4].hex()!r}, {len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    data = np.frombuffer(raw, np.uint8, offset=start)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: the header gives shape {shape}, but the file holds "
                         f"{data.size} values")
    return data.reshape(shape)


def _find_idx(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The images and labels IDX files of `split` in `directory`, or None if neither is there."""
    prefix = "train" if split == "train" else "t10k"
    names = {kind: [f"{prefix}-{kind}{sep}idx{nd}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
             for kind, nd in (("images", 3), ("labels", 1))}
    found = {kind: next((directory / n for n in ns if (directory / n).is_file()), None)
             for kind, ns in names.items()}
    if found["images"] is None and found["labels"] is None:
        return None
    for kind, path in found.items():
        if path is None:
            raise FileNotFoundError(f"{directory} lacks the MNIST file {names[kind][0]}[.gz]")
    return found["images"], found["labels"]


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`x_<split>`, `y_<split>` of a keras-style mnist.npz."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path} as an .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not an .npz archive with x_{split}, y_{split}")
    with archive:
        missing = [k for k in (f"x_{split}", f"y_{split}") if k not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the keys {missing}; it holds {archive.files}")
        return archive[f"x_{split}"], archive[f"y_{split}"]


def _to_unit(images: np.ndarray) -> np.ndarray:
    """Integer pixels / 255, float pixels as they are, as float32."""
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def load_mnist(path: str | Path, split: str = "train") -> Dataset:
    """MNIST from disk: `[B, 28, 28, 1]` float32 in [0, 1] and int32 labels.

    Args:
      path: a directory holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
        `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (each optionally `.gz`; the
        `train-images.idx3-ubyte` spelling also works) or `mnist.npz`; or the path of an .npz
        file with keys x_train, y_train, x_test, y_test (as keras ships it).
      split: "train" or "test".

    Raises:
      FileNotFoundError: the path or one of its files is missing (named in the message).
      ValueError: a file is malformed (named in the message).
    """
    check_choice("split", split, SPLITS)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MNIST path {path} does not exist")
    idx = _find_idx(path, split) if path.is_dir() else None
    if idx is not None:
        images, labels = _read_idx(idx[0], 3), _read_idx(idx[1], 1)
    elif path.is_dir() and not (path / "mnist.npz").is_file():
        raise FileNotFoundError(f"{path} holds neither the MNIST IDX files "
                                "(train-images-idx3-ubyte[.gz], ...) nor mnist.npz")
    else:
        images, labels = _read_npz(path / "mnist.npz" if path.is_dir() else path, split)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"MNIST at {path}: images [B, H, W] and labels [B] must agree, got "
                         f"images {images.shape} and labels {labels.shape}")
    return Dataset(_to_unit(images)[..., None], labels.astype(np.int32), 10, DIGIT_NAMES)


def _read_image(file: Path) -> np.ndarray:
    """`[H, W, 1 or 3]` float32 in [0, 1] from a .npy array or any image Pillow reads."""
    if file.suffix.lower() == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"cannot read the image {file}: {error}") from error
    else:
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError(f"reading {file} needs Pillow (pip install pillow); "
                              ".npy images need nothing") from error
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("L" if image.mode in _GRAY_MODES else "RGB"))
        except OSError as error:
            raise ValueError(f"cannot read the image {file}: {error}") from error
    array = array[..., None] if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{file}: expected an image [H, W], [H, W, 1] or [H, W, 3], "
                         f"got shape {array.shape}")
    return _to_unit(array)


def _channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grey to RGB by repetition, RGB to grey by ITU-R 601 luma (as Pillow's "L")."""
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    return (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _image_files(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted sub-folders), image files and their labels."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir()
                       if f.suffix.lower() in _IMAGE_SUFFIXES and not f.name.startswith("."))
        if not found:
            raise ValueError(f"class folder {root / name} holds no images {_IMAGE_SUFFIXES}")
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def load_image_folder(path: str | Path, size: tuple[int, int] | None = None,
                      channels: int | None = None) -> Dataset:
    """Images in one sub-folder per class (labels by sorted folder name), as torchvision's.

    Args:
      path: the root folder; files ending in .png, .jpg, .jpeg, .bmp, .gif (read by Pillow)
        or .npy (`[H, W]` or `[H, W, 1 or 3]`; integers are divided by 255).
      size: (H, W) to resize every image to (bilinear); None requires one size throughout.
      channels: 1 or 3; None gives 1 if every image is grey, else 3.

    Returns:
      A `Dataset` `[B, H, W, C]` float32 in [0, 1] with `class_names` the folder names.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    classes, files, labels = _image_files(Path(path))
    images = [_read_image(f) for f in files]
    if size is not None:
        images = [resize(i[None], size, order=1, mode="nearest")[0] for i in images]
    channels = channels or max(i.shape[-1] for i in images)
    images = [_channels(i, channels) for i in images]
    for file, image in zip(files, images, strict=True):
        if image.shape != images[0].shape:
            raise ValueError(f"images differ in size: {files[0]} is {images[0].shape[:2]}, "
                             f"{file} is {image.shape[:2]}; pass size=(H, W) to resize them")
    return Dataset(np.stack(images), np.asarray(labels, np.int32), len(classes), tuple(classes))


# --- batching ----------------------------------------------------------------------------------
