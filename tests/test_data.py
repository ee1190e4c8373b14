"""Data sets and loaders: determinism, sizes, split disjointness, the geometry of the distorted
and cluttered digits, MNIST / image-folder loaders on files written here, batching, prefetch."""

from __future__ import annotations

import functools
import gzip
import itertools
import re
import struct
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from flax_attention import data, data_files

EMBEDDED = ("distorted-digits", "cluttered-digits")
SIDES = {"distorted-digits": 42, "cluttered-digits": 60}


@functools.cache
def _sklearn_images() -> np.ndarray:
    return load_digits().images


def _digits(index: list[int]) -> np.ndarray:
    """The source digits upsampled, computed here independently of the cached copy."""
    return data.resize(_sklearn_images()[index] / 16.0, (data.DIGIT_SIZE, data.DIGIT_SIZE))


def _named(path) -> str:
    return re.escape(str(path))


# --- embedded data sets ------------------------------------------------------------------------


def test_list_and_unknown_name():
    assert set(EMBEDDED) <= set(data.list_datasets())
    with pytest.raises(ValueError, match="distorted-digits.*cluttered-digits.*'nope'"):
        data.load_dataset("nope")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("distorted-digits", "val")
    with pytest.raises(ValueError, match="seed"):
        data.load_dataset("distorted-digits", "test", seed=-1)
    with pytest.raises(ValueError, match="needs a data_dir"):
        data.load_dataset("cluttered-mnist", "test")
    with pytest.raises(ValueError, match="takes no data_dir"):
        data.load_dataset("cluttered-digits", "test", data_dir="/tmp")


@pytest.mark.parametrize("name", EMBEDDED)
def test_deterministic_by_seed(name):
    first = data.load_dataset(name, "test", seed=0)
    assert data.load_dataset(name, "test", seed=0) is first  # cached
    data.load_dataset.cache_clear()
    again = data.load_dataset(name, "test", seed=0)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    other = data.load_dataset(name, "test", seed=1)
    np.testing.assert_array_equal(other.labels, first.labels)  # the same digits...
    assert np.abs(other.images - first.images).mean() > 0.01  # ...placed elsewhere
    assert not first.images.flags.writeable


@pytest.mark.parametrize("name", EMBEDDED)
@pytest.mark.parametrize(("split", "size"), [("train", 10059), ("test", 2160)])
def test_sizes_ranges_balance(name, split, size):
    ds = data.load_dataset(name, split)
    side = SIDES[name]
    assert ds.images.shape == (size, side, side, 1) and ds.images.dtype == np.float32
    assert ds.labels.shape == (size,) and ds.labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.class_names == tuple("0123456789")
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert (ds.images.reshape(size, -1).max(1) > 0.5).all()  # no blank canvas
    counts = np.bincount(ds.labels, minlength=10)
    assert counts.min() > 0.08 * size and counts.max() < 0.12 * size


@pytest.mark.parametrize("name", EMBEDDED)
def test_train_test_source_digits_disjoint(name):
    train = data.load_dataset(name, "train").extras["source"]
    test = data.load_dataset(name, "test").extras["source"]
    assert train.max() < test.min() and len(np.unique(train)) + len(np.unique(test)) == 1797
    images = _sklearn_images()
    seen = {images[i].tobytes() for i in np.unique(train)}
    assert not any(images[i].tobytes() in seen for i in np.unique(test))


def _moments(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (row, col) and 2x2 covariance of the pixel mass."""
    grid = np.stack(np.meshgrid(*map(np.arange, image.shape), indexing="ij"), -1).reshape(-1, 2)
    mass = image.reshape(-1) / image.sum()
    mean = mass @ grid
    centred = grid - mean
    return mean, (centred * mass[:, None]).T @ centred


def test_rotate_scale_translate_by_hand():
    image = np.zeros((1, 5, 5), np.float32)
    image[0, 2, 4] = 1.0  # two pixels right of the centre
    def place(angle, scale):
        out = data.rotate_scale_translate(image, np.array([angle]), np.array([scale]),
                                          np.array([[4.0, 4.0]]), canvas=9)[0]
        return np.unravel_index(out.argmax(), out.shape), out.max()
    assert place(0.0, 1.0) == ((4, 6), pytest.approx(1.0))
    assert place(90.0, 1.0) == ((2, 4), pytest.approx(1.0))  # counter-clockwise: now above
    assert place(-90.0, 2.0) == ((8, 4), pytest.approx(1.0))  # clockwise, twice as far


def test_distorted_digit_is_rotated_and_scaled():
    ds = data.load_dataset("distorted-digits", "test")
    x = ds.extras
    for i in np.argsort(-np.abs(x["angle"]))[:5]:  # the most rotated
        base_mean, base_cov = _moments(_digits([x["source"][i]])[0])
        mean, cov = _moments(ds.images[i, ..., 0])
        a, s = np.deg2rad(x["angle"][i]), x["scale"][i]
        m = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        np.testing.assert_allclose(mean, x["center"][i] + m @ (base_mean - 9.5), atol=0.3)
        np.testing.assert_allclose(cov, m @ base_cov @ m.T, atol=0.06 * np.abs(base_cov).max())
        assert np.abs(cov - base_cov).max() > 0.2 * np.abs(base_cov).max()


def test_distort_keeps_ink_on_canvas():
    ds = data.load_dataset("distorted-digits", "test")
    edges = np.concatenate([ds.images[:, 0], ds.images[:, -1], ds.images[:, :, 0],
                            ds.images[:, :, -1]], 1)
    assert (edges.max((1, 2)) > 0.2).mean() < 0.01
    center = ds.extras["center"]
    assert (center.min(0) < 12).all() and (center.max(0) > 29).all()  # translated all over
    assert (np.abs(ds.extras["angle"]) <= 45).all()
    assert ((ds.extras["scale"] >= 0.7) & (ds.extras["scale"] <= 1.2)).all()


def test_cluttered_canvas_contains_the_digit():
    ds = data.load_dataset("cluttered-digits", "test")
    size = data.DIGIT_SIZE
    for i in range(0, len(ds), 97):
        r, c = ds.extras["position"][i]
        window = ds.images[i, r:r + size, c:c + size, 0]
        digit = _digits([ds.extras["source"][i]])[0]
        assert (window >= digit - 1e-6).all()
        assert np.isclose(window, digit, atol=1e-6).mean() > 0.7  # the rest is clutter on top
    outside = ds.images[..., 0].copy()
    for i, (r, c) in enumerate(ds.extras["position"]):
        outside[i, r:r + size, c:c + size] = 0
    assert (outside.max((1, 2)) > 0.5).mean() > 0.9  # fragments lie around most digits


def test_clutter_by_hand():
    images = np.arange(1, 5, dtype=np.float32)[:, None, None] / 10 * np.ones((4, 10, 10))
    out, rec = data.clutter(images, np.random.default_rng(0), canvas=30, num_fragments=0)
    for i, (r, c) in enumerate(rec["position"]):
        expected = np.zeros((30, 30), np.float32)
        expected[r:r + 10, c:c + 10] = images[i]
        np.testing.assert_array_equal(out[i], expected)
    out, rec = data.clutter(images, np.random.default_rng(0), canvas=30, num_fragments=3,
                            fragment_size=4)
    for i, (r, c) in enumerate(rec["position"]):
        out[i, r:r + 10, c:c + 10] = 0
        values = np.unique(out[i][out[i] > 0])
        assert values.size and not np.isclose(values, images[i, 0, 0]).any()  # other images
    with pytest.raises(ValueError, match="fragment_size"):
        data.clutter(images, np.random.default_rng(0), canvas=8)


def test_resize_to_same_size_is_identity():
    x = np.random.default_rng(0).uniform(size=(2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(data.resize(x, (8, 8)), x, atol=1e-5)
    np.testing.assert_allclose(data.resize(x, (8, 8), order=1), x, atol=1e-6)


# --- MNIST on disk ---------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.tobytes()


def _mnist(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, np.uint8)


def _write_idx(directory, gz: bool) -> dict:
    arrays = {"train": _mnist(0, 5), "t10k": _mnist(1, 3)}
    for prefix, (images, labels) in arrays.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = directory / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(_idx(array)) if gz else _idx(array))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    arrays = _write_idx(tmp_path, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = data_files.load_mnist(tmp_path, split)
        images, labels = arrays[prefix]
        assert ds.images.shape == (len(labels), 28, 28, 1) and ds.images.dtype == np.float32
        np.testing.assert_array_equal(ds.images[..., 0], images / np.float32(255))
        np.testing.assert_array_equal(ds.labels, labels)


def test_mnist_npz(tmp_path):
    (x_train, y_train), (x_test, y_test) = _mnist(0, 5), _mnist(1, 3)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    for path in (tmp_path, tmp_path / "mnist.npz"):
        ds = data_files.load_mnist(path, "test")
        np.testing.assert_array_equal(ds.images[..., 0], x_test / np.float32(255))
        np.testing.assert_array_equal(ds.labels, y_test)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=_named(tmp_path / "absent")):
        data_files.load_mnist(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=_named(tmp_path) + ".*neither"):
        data_files.load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(_mnist(0, 2)[0]))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data_files.load_mnist(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "magic", "gzip", "count"])
def test_mnist_malformed_idx(tmp_path, damage):
    images, labels = _mnist(0, 4)
    image_bytes = {"truncated": _idx(images)[:-10], "magic": b"\x00\x00\x0d\x03" + bytes(40),
                   "gzip": b"not gzip", "count": _idx(images)}[damage]
    name = "train-images-idx3-ubyte" + (".gz" if damage == "gzip" else "")
    (tmp_path / name).write_bytes(image_bytes)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(labels[:3 if damage == "count"
                                                                  else 4]))
    named = tmp_path if damage == "count" else tmp_path / name
    with pytest.raises(ValueError, match=_named(named)):
        data_files.load_mnist(tmp_path)


def test_mnist_malformed_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=_named(bad)):
        data_files.load_mnist(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_test=_mnist(0, 2)[0])
    with pytest.raises(ValueError, match=_named(partial) + ".*y_test"):
        data_files.load_mnist(partial, "test")


def test_cluttered_and_distorted_mnist(tmp_path):
    arrays = _write_idx(tmp_path, gz=True)
    ds = data.load_dataset("cluttered-mnist", "train", data_dir=tmp_path)
    assert ds.images.shape == (5, 60, 60, 1)
    images = arrays["train"][0] / np.float32(255)
    for i, (r, c) in enumerate(ds.extras["position"]):
        assert (ds.images[i, r:r + 28, c:c + 28, 0] >= images[i]).all()
    ds = data.load_dataset("distorted-mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (3, 42, 42, 1) and ds.images.max() <= 1.0
    assert data.load_dataset("mnist", "test", data_dir=tmp_path).images.shape == (3, 28, 28, 1)


# --- image folders -----------------------------------------------------------------------------


def _folder(root) -> dict:
    rng = np.random.default_rng(0)
    pixels = {"gray": rng.integers(0, 256, (6, 5), np.uint8),
              "array": rng.integers(0, 256, (6, 5), np.uint8),
              "rgb": rng.integers(0, 256, (6, 5, 3), np.uint8)}
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(pixels["gray"]).save(root / "cat" / "a.png")
    np.save(root / "cat" / "b.npy", pixels["array"])
    Image.fromarray(pixels["rgb"]).save(root / "dog" / "c.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return pixels


def test_image_folder(tmp_path):
    pixels = _folder(tmp_path)
    ds = data_files.load_image_folder(tmp_path)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    np.testing.assert_array_equal(ds.labels, [0, 0, 1])
    assert ds.images.shape == (3, 6, 5, 3)  # grey images repeated into RGB
    gray = np.repeat(pixels["gray"][..., None], 3, -1)
    np.testing.assert_array_equal(ds.images[0], gray / np.float32(255))
    np.testing.assert_array_equal(ds.images[1, ..., 1], pixels["array"] / np.float32(255))
    np.testing.assert_array_equal(ds.images[2], pixels["rgb"] / np.float32(255))
    grey = data_files.load_image_folder(tmp_path, channels=1)
    luma = np.asarray(Image.fromarray(pixels["rgb"]).convert("L")) / 255
    np.testing.assert_allclose(grey.images[2, ..., 0], luma, atol=1 / 255)


def test_image_folder_sizes(tmp_path):
    _folder(tmp_path)
    Image.fromarray(np.full((12, 10), 255, np.uint8)).save(tmp_path / "dog" / "d.png")
    with pytest.raises(ValueError, match="differ in size.*d.png"):
        data_files.load_image_folder(tmp_path)
    ds = data_files.load_image_folder(tmp_path, size=(6, 5))
    assert ds.images.shape == (4, 6, 5, 3)
    np.testing.assert_allclose(ds.images[3], 1.0, atol=1e-6)  # edges repeated, not darkened
    (tmp_path / "dog" / "d.png").unlink()
    unresized = data_files.load_image_folder(tmp_path).images
    np.testing.assert_allclose(ds.images[:3], unresized, atol=1e-6)  # already (6, 5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=_named(tmp_path / "absent")):
        data_files.load_image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no class sub-folders"):
        data_files.load_image_folder(tmp_path)
    _folder(tmp_path)
    (tmp_path / "emu").mkdir()
    with pytest.raises(ValueError, match=_named(tmp_path / "emu") + ".*no images"):
        data_files.load_image_folder(tmp_path)
    (tmp_path / "emu" / "e.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=_named(tmp_path / "emu" / "e.png")):
        data_files.load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        data_files.load_image_folder(tmp_path, channels=2)


# --- batching ----------------------------------------------------------------------------------


def _numbered(n: int = 10) -> data.Dataset:
    """Example i is an image filled with i and label i."""
    return data.Dataset(np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 2, 2, 1),
                        np.float32), np.arange(n, dtype=np.int32), n)


def _order(batches) -> list[int]:
    return [int(label) for _, labels in batches for label in labels]


def test_batches_cover_the_epoch_once():
    ds = _numbered()
    full = list(data.batches(ds, 3, seed=0, epoch=0, drop_remainder=False))
    assert [len(labels) for _, labels in full] == [3, 3, 3, 1]
    assert sorted(_order(full)) == list(range(10))
    for images, labels in full:
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    dropped = _order(data.batches(ds, 3, seed=0, epoch=0))
    assert dropped == _order(full)[:9] and len(set(dropped)) == 9


def test_batches_reshuffle_per_epoch_and_repeat_per_seed():
    ds = _numbered(50)
    epoch0 = _order(data.batches(ds, 10, seed=3, epoch=0))
    assert _order(data.batches(ds, 10, seed=3, epoch=0)) == epoch0
    assert _order(data.batches(ds, 10, seed=3, epoch=1)) != epoch0
    assert _order(data.batches(ds, 10, seed=4, epoch=0)) != epoch0
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(ds, 0)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(ds, 51)


def test_dataset_checks_shapes():
    with pytest.raises(ValueError, match=r"images \(3, 2, 2\).*labels \(3,\)"):
        data.Dataset(np.zeros((3, 2, 2)), np.zeros(3, np.int32), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        data.Dataset(np.zeros((3, 2, 2, 1)), np.array([0, 1, 2]), 2)


# --- prefetch ----------------------------------------------------------------------------------


def test_prefetch_yields_the_same_batches():
    ds = _numbered(20)
    plain = list(data.batches(ds, 4, seed=1))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    fetched = list(data.prefetch_to_device(data.batches(ds, 4, seed=1), size=2,
                                           sharding=sharding))
    assert len(fetched) == len(plain)
    for (images, labels), (expected_images, expected_labels) in zip(fetched, plain, strict=True):
        assert isinstance(images, jax.Array) and images.sharding == sharding
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


def test_prefetch_raises_the_iterator_error():
    def failing():
        yield np.zeros(2)
        raise RuntimeError("broken reader")
    fetched = data.prefetch_to_device(failing())
    np.testing.assert_array_equal(next(fetched), np.zeros(2))
    with pytest.raises(RuntimeError, match="broken reader"):
        next(fetched)
    with pytest.raises(ValueError, match="size"):
        data.prefetch_to_device(iter([]), size=0)


def _slowly(items):
    """Yields each item after a pause, so the producer is mid-batch when the consumer stops."""
    for item in items:
        time.sleep(0.05)
        yield item


def test_prefetch_stops_and_joins_its_thread_when_left_early_or_at_the_end():
    """No producer thread outlives the loop (one inside `device_put` at interpreter exit
    aborts the process): leaving early waits for the batch it is on; so does the end."""
    before = threading.active_count()
    fetched = data.prefetch_to_device(_slowly(np.full(3, i) for i in itertools.count()))
    assert int(next(fetched)[0]) == 0 and int(next(fetched)[0]) == 1
    fetched.close()
    assert threading.active_count() == before
    assert [int(b[0]) for b in data.prefetch_to_device(_slowly(np.full(3, i) for i in range(3)))
            ] == [0, 1, 2]
    assert threading.active_count() == before
