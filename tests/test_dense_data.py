"""The detection and segmentation canvases: shapes, determinism, boxes tight on the ink and
inside the canvas, label maps agreeing with the boxes, dict labels through `Dataset`/`batches`."""

from __future__ import annotations

import numpy as np
import pytest

from flax_attention import data, dense_data, visualize_dense

INK = data._INK


@pytest.fixture(scope="module")
def drawn() -> dict[str, np.ndarray]:
    digits, classes, _ = data._source("digits", "test", None)
    return dense_data.digit_canvases(digits, classes, 200, np.random.default_rng(7))


def _edges(boxes: np.ndarray) -> np.ndarray:
    """Normalised (cx, cy, w, h) `[..., 4]` -> pixel edges (row0, col0, row1, col1), rounded."""
    cx, cy, w, h = np.moveaxis(boxes * dense_data.CANVAS, -1, 0)
    return np.rint(np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)).astype(int)


def test_detection_set():
    ds = data.load_dataset("digit-detection", "test", seed=0)
    assert {"digit-detection", "digit-segmentation"} <= set(data.list_datasets())
    n = dense_data.SIZES["test"]
    assert len(ds) == n and ds.images.shape == (n, 64, 64, 1) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.num_classes == 10 and ds.class_names == data.DIGIT_NAMES
    labels = ds.labels
    assert labels["classes"].shape == (n, 5) and labels["classes"].dtype == np.int32
    assert labels["boxes"].shape == (n, 5, 4) and labels["boxes"].dtype == np.float32
    assert labels["valid"].shape == (n, 5) and labels["valid"].dtype == bool
    count = labels["valid"].sum(1)
    assert count.min() == 1 and count.max() == 5 and len(np.unique(count)) == 5
    np.testing.assert_array_equal(labels["valid"], np.arange(5) < count[:, None])  # valid first
    assert not labels["classes"][~labels["valid"]].any()
    assert not labels["boxes"][~labels["valid"]].any()
    assert (ds.extras["source"][~labels["valid"]] == -1).all()
    assert ds.extras["source"][labels["valid"]].min() >= data._TRAIN_DIGITS  # test digits
    assert not labels["boxes"].flags.writeable


def test_segmentation_set():
    ds = data.load_dataset("digit-segmentation", "test", seed=0)
    n = dense_data.SIZES["test"]
    assert ds.images.shape == (n, 64, 64, 1) and ds.labels.shape == (n, 64, 64)
    assert ds.labels.dtype == np.int32 and ds.num_classes == 11
    assert ds.class_names == ("background", *"0123456789")
    assert set(np.unique(ds.labels)) == set(range(11))
    np.testing.assert_array_equal(ds.labels > 0, ds.images[..., 0] > dense_data.STROKE)


def test_deterministic_by_seed():
    digits, classes, _ = data._source("digits", "test", None)
    first = dense_data.digit_canvases(digits, classes, 30, np.random.default_rng(3))
    again = dense_data.digit_canvases(digits, classes, 30, np.random.default_rng(3))
    other = dense_data.digit_canvases(digits, classes, 30, np.random.default_rng(4))
    for key in first:
        np.testing.assert_array_equal(again[key], first[key])
    assert np.abs(other["images"] - first["images"]).mean() > 0.01
    ds = data.load_dataset("digit-detection", "test", seed=0)
    data.load_dataset.cache_clear()
    reloaded = data.load_dataset("digit-detection", "test", seed=0)
    np.testing.assert_array_equal(reloaded.images, ds.images)
    for key in ds.labels:
        np.testing.assert_array_equal(reloaded.labels[key], ds.labels[key])


def test_boxes_inside_the_canvas_and_tight_on_the_ink(drawn):
    boxes, valid = drawn["boxes"], drawn["valid"]
    cx, cy, w, h = np.moveaxis(boxes[valid], -1, 0)
    assert (w > 0).all() and (h > 0).all()
    assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all()
    assert (cy - h / 2 >= 0).all() and (cy + h / 2 <= 1).all()
    ink = drawn["images"][..., 0] > INK
    covered = np.zeros_like(ink)
    for b, slot in zip(*np.nonzero(valid), strict=True):
        row0, col0, row1, col1 = _edges(boxes[b, slot])
        box = ink[b, row0:row1, col0:col1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # tight
        covered[b, row0:row1, col0:col1] = True
    assert not (ink & ~covered).any()  # no ink outside every box


def test_boxes_overlap_little(drawn):
    edges = _edges(drawn["boxes"])
    for b in range(len(edges)):
        kept = edges[b, drawn["valid"][b]]
        for i in range(len(kept)):
            for j in range(i):
                low = np.maximum(kept[i, :2], kept[j, :2])
                inter = np.prod(np.clip(np.minimum(kept[i, 2:], kept[j, 2:]) - low, 0, None))
                areas = np.prod(kept[[i, j], 2:] - kept[[i, j], :2], 1)
                assert inter < dense_data.MAX_COVER * areas.min()


def test_label_maps_agree_with_the_boxes(drawn):
    label_map, edges = drawn["label_map"], _edges(drawn["boxes"])
    np.testing.assert_array_equal(label_map > 0, drawn["images"][..., 0] > dense_data.STROKE)
    inside = np.zeros(label_map.shape + (11,), bool)  # [B, H, W, class]: in a box of that class
    for b, slot in zip(*np.nonzero(drawn["valid"]), strict=True):
        row0, col0, row1, col1 = edges[b, slot]
        inside[b, row0:row1, col0:col1, 1 + drawn["classes"][b, slot]] = True
        assert (label_map[b, row0:row1, col0:col1] == 1 + drawn["classes"][b, slot]).any()
    assert np.take_along_axis(inside, label_map[..., None], -1)[label_map > 0].all()


def test_last_drawn_digit_wins_the_label():
    digits = np.zeros((2, 20, 20), np.float32)
    digits[:, 4:16, 4:16] = 1.0
    canvases = dense_data.digit_canvases(digits, np.array([3, 8]), 300, np.random.default_rng(0))
    valid, classes, edges = canvases["valid"], canvases["classes"], _edges(canvases["boxes"])
    overlap = (np.minimum(edges[:, 0, 2:], edges[:, 1, 2:])
               > np.maximum(edges[:, 0, :2], edges[:, 1, :2])).all(1)
    b = np.nonzero(valid[:, 1] & (classes[:, 0] != classes[:, 1]) & overlap)[0][0]
    row0, col0, row1, col1 = edges[b, 1]  # the square of the second digit fills its box
    box = canvases["label_map"][b, row0:row1, col0:col1]
    assert (box[box > 0] == 1 + classes[b, 1]).all() and (box > 0).mean() > 0.5
    assert (canvases["label_map"][b] == 1 + classes[b, 0]).any()


def _dict_set(n: int = 10) -> data.Dataset:
    """Example i: an image filled with i, labels {"a": i, "b": [2i, 2i, 2i]}."""
    index = np.arange(n)
    images = index[:, None, None, None] * np.ones((n, 2, 2, 1), np.float32)
    labels = {"a": index.astype(np.int32), "b": np.repeat(2 * index[:, None], 3, 1)}
    return data.Dataset(images, labels, n)


def test_batches_and_take_index_dict_labels():
    ds = _dict_set()
    seen = []
    for images, labels in data.batches(ds, 3, seed=1):
        assert set(labels) == {"a", "b"} and labels["b"].shape == (3, 3)
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels["a"])
        np.testing.assert_array_equal(labels["b"], 2 * labels["a"][:, None].repeat(3, 1))
        seen += labels["a"].tolist()
    assert len(set(seen)) == 9
    part = ds.take(slice(4))
    assert len(part) == 4 and part.labels["b"].shape == (4, 3) and part.num_classes == 10


def test_dataset_checks_dict_labels():
    images = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"images \(3, 2, 2, 1\).*'b': \(2, 4\)"):
        data.Dataset(images, {"a": np.zeros(3), "b": np.zeros((2, 4))}, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        data.Dataset(images, {"classes": np.array([0, 1, 2]), "boxes": np.zeros((3, 4))}, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        data.Dataset(images, np.full((3, 2, 2), 5), 2)  # a label map


@pytest.mark.slow
def test_train_split_and_disjoint_sources():
    train = data.load_dataset("digit-detection", "train")
    test = data.load_dataset("digit-detection", "test")
    assert len(train) == dense_data.SIZES["train"]
    used = train.extras["source"][train.labels["valid"]]
    assert used.max() < data._TRAIN_DIGITS <= test.extras["source"][test.labels["valid"]].min()


# --- drawing -------------------------------------------------------------------------------------


def test_draw_boxes_places_each_box_on_its_pixels():
    image = np.zeros((64, 32, 1), np.float32)
    boxes = np.array([[0.5, 0.25, 0.25, 0.5], [0.25, 0.75, 0.5, 0.5]])
    fig = visualize_dense.draw_boxes(image, boxes, np.array([3, 7]), np.array([0.9, 0.5]),
                               data.DIGIT_NAMES)
    rectangles = fig.axes[0].patches
    # (cx - w / 2) * W - 0.5: pixel edges of imshow's grid lie at half integers
    assert [r.get_xy() for r in rectangles] == [(11.5, -0.5), (-0.5, 31.5)]
    assert [(r.get_width(), r.get_height()) for r in rectangles] == [(8, 32), (16, 32)]
    assert [t.get_text() for t in fig.axes[0].texts] == ["3 0.90", "7 0.50"]


def test_draw_label_maps_colours_each_class(tmp_path):
    truth = np.array([[0, 1], [2, 10]])
    predicted = np.array([[0, 1], [1, 1]])
    fig = visualize_dense.draw_label_maps(np.zeros((2, 2, 1)), predicted, truth, 11,
                                    tmp_path / "maps.png", dense_data.SEGMENTATION_NAMES)
    colours = visualize_dense.label_colours(11)
    assert len(np.unique(colours, axis=0)) == 11 and (colours[0] == 0).all()
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), colours[predicted])
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), colours[truth])
    assert (tmp_path / "maps.png").stat().st_size > 0
