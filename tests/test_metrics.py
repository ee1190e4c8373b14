"""Box IoU, COCO-style AP and segmentation scores against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from flax_attention import metrics

TRUE = np.array([[0.5, 0.5, 0.5, 0.5]])  # one box, (cx, cy, w, h); dyadic, so IoUs are exact
FAR = np.array([[0.1, 0.1, 0.1, 0.1]])  # IoU 0 with TRUE


def _ap(boxes, scores, classes, true_boxes=TRUE, true_classes=(3,)) -> dict[str, float]:
    prediction = (np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float),
                  np.asarray(classes))
    return metrics.average_precision([prediction], [(true_boxes, np.asarray(true_classes))])


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 4.0]])
    b = np.array([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.5, 1.5]])
    expected = np.array([[0.5, 1.0, 0.25 / 1.75], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(metrics.box_iou(a, b, "xyxy"), expected)
    centred = lambda x: np.concatenate([(x[:, :2] + x[:, 2:]) / 2, x[:, 2:] - x[:, :2]], 1)  # noqa: E731
    np.testing.assert_allclose(metrics.box_iou(centred(a), centred(b)), expected)
    np.testing.assert_allclose(metrics.to_xyxy(centred(b)), b)
    with pytest.raises(ValueError, match=r"b must be boxes \[N, 4\], got shape \(4,\)"):
        metrics.box_iou(a, b[0])
    with pytest.raises(ValueError, match="fmt"):
        metrics.box_iou(a, b, "xywh")


def test_one_perfect_box_scores_one():
    assert _ap(TRUE, [0.9], [3]) == {"map": 1.0, "ap50": 1.0, "ap75": 1.0}


def test_box_at_iou_one_half_counts_at_ap50_only():
    half = np.array([[0.375, 0.5, 0.25, 0.5]])  # the left half of TRUE: IoU exactly 0.5
    assert metrics.box_iou(half, TRUE)[0, 0] == 0.5
    scores = _ap(half, [0.9], [3])
    assert scores["ap50"] == 1.0 and scores["ap75"] == 0.0
    assert scores["map"] == pytest.approx(0.1)  # 1 of the 10 thresholds


def test_false_positive_ranked_first_halves_the_precision():
    # by score: FP then TP: precision [0, 1/2] -> non-increasing [1/2, 1/2]; recall reaches 1
    assert _ap(np.concatenate([FAR, TRUE]), [0.9, 0.8], [3, 3])["ap50"] == pytest.approx(0.5)
    # TP first: precision 1 at every recall up to 1; the later FP changes nothing
    assert _ap(np.concatenate([FAR, TRUE]), [0.7, 0.8], [3, 3])["ap50"] == 1.0
    # wrong class: a false positive of class 3 is missing, the prediction counts for class 5
    assert _ap(TRUE, [0.9], [5])["ap50"] == 0.0


def test_interpolation_over_101_recalls():
    # two true boxes; by score TP, FP, TP: recall [1/2, 1/2, 1], precision [1, 1/2, 2/3],
    # non-increasing [1, 2/3, 2/3]: recalls 0..0.5 (51 points) read 1, the 50 above read 2/3
    true = np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
    boxes = np.concatenate([true[:1], FAR, true[1:]])
    scores = _ap(boxes, [0.9, 0.8, 0.7], [1, 1, 1], true, [1, 1])
    assert scores["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_one_detection_matches_one_truth():
    # a duplicate of a found box is a false positive; the second true box stays missed
    true = np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
    scores = _ap(np.concatenate([true[:1], true[:1]]), [0.9, 0.8], [1, 1], true, [1, 1])
    assert scores["ap50"] == pytest.approx(51 / 101)  # precision 1 up to recall 1/2, then 0


def test_mean_over_classes_with_truth_and_empty_predictions():
    true = np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
    # class 1 found, class 2 missed, class 7 has no truth and is left out of the mean
    scores = _ap(np.concatenate([true[:1], FAR]), [0.9, 0.9], [1, 7], true, [1, 2])
    assert scores == {"map": 0.5, "ap50": 0.5, "ap75": 0.5}
    assert _ap(np.zeros((0, 4)), [], np.zeros(0, int)) == {"map": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_padded_dict_forms_equal_the_per_image_form():
    rng = np.random.default_rng(0)
    true = {"boxes": rng.uniform(0.2, 0.4, (3, 2, 4)), "classes": rng.integers(0, 3, (3, 2)),
            "valid": np.array([[True, True], [True, False], [True, True]])}
    boxes = true["boxes"][:, [0, 1, 0]] + rng.normal(0, 0.03, (3, 3, 4))
    predicted = {"boxes": boxes, "scores": rng.uniform(size=(3, 3)),
                 "classes": np.concatenate([true["classes"], rng.integers(0, 3, (3, 1))], 1)}
    listed_truth = [(true["boxes"][i][true["valid"][i]], true["classes"][i][true["valid"][i]])
                    for i in range(3)]
    listed = [(predicted["boxes"][i], predicted["scores"][i], predicted["classes"][i])
              for i in range(3)]
    assert (metrics.average_precision(predicted, true)
            == metrics.average_precision(listed, listed_truth))
    with pytest.raises(ValueError, match=r"predictions lacks \['scores'\]"):
        metrics.average_precision({"boxes": boxes, "classes": predicted["classes"]}, true)
    with pytest.raises(ValueError, match="same images"):
        metrics.average_precision(listed[:2], true)


def test_max_detections_keeps_the_best_scores():
    boxes = np.concatenate([FAR, TRUE])
    assert _ap(boxes, [0.9, 0.8], [3, 3])["ap50"] == pytest.approx(0.5)
    prediction = [(boxes, np.array([0.9, 0.8]), np.array([3, 3]))]
    scores = metrics.average_precision(prediction, [(TRUE, np.array([3]))], max_detections=1)
    assert scores["ap50"] == 0.0  # only the false positive is kept


# --- segmentation ------------------------------------------------------------------------------


def test_segmentation_scores_by_hand():
    truth = np.array([[[0, 1], [1, 1]]])
    predicted = np.array([[[0, 1], [0, 1]]])
    # class 0: 1 correct, union 2 -> 1/2; class 1: 2 correct, union 3 -> 2/3; class 2 absent
    scores = metrics.segmentation_scores(predicted, truth, 3)
    np.testing.assert_allclose(scores["iou_per_class"], [0.5, 2 / 3, np.nan])
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores["pixel_accuracy"] == 0.75
    np.testing.assert_array_equal(metrics.confusion_matrix(predicted, truth, 3),
                                  [[1, 0, 0], [1, 2, 0], [0, 0, 0]])


def test_confusion_matrix_streams_and_ignores():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, (2, 5, 3, 3))
    whole = metrics.confusion_matrix(predicted, truth, 4)
    parts = sum(metrics.confusion_matrix(predicted[i:i + 2], truth[i:i + 2], 4) for i in (0, 2, 4))
    np.testing.assert_array_equal(parts, whole)
    assert whole.sum() == truth.size
    ignored = np.where(truth == 3, 255, truth)  # pixels outside the classes do not count
    kept = metrics.confusion_matrix(np.minimum(predicted, 2), ignored, 3)
    assert kept.sum() == (truth != 3).sum()
    with pytest.raises(ValueError, match="predicted must lie in"):
        metrics.confusion_matrix(predicted, truth, 3)
    with pytest.raises(ValueError, match=r"\(5, 3, 3\) and \(5, 3\)"):
        metrics.confusion_matrix(predicted, truth[..., 0], 4)
