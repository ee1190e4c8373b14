"""The trivial detection baseline of DETR-small (benchmarks/results/dense_training.md).

Every test canvas gets one box per class: the mean training box of that class (normalised
(cx, cy, w, h)), scored with the class's frequency among the training boxes. Its mAP and AP50 on
the digit-detection test split (`flax_attention.metrics.average_precision`), and with `--run`
those of a detection run's latest checkpoint, each also class-agnostic (every class set to 0:
how well the boxes alone are found):

    python -m benchmarks.dense_baseline [--data-seed 0] [--run DIR]
"""

from __future__ import annotations

import argparse

import numpy as np

from flax_attention import data, metrics


def mean_box_predictions(train: data.Dataset, n: int) -> dict[str, np.ndarray]:
    """The baseline's predictions (see the module docstring) for `n` canvases, fitted on
    `train`: boxes `[n, K, 4]`, scores `[n, K]`, classes `[n, K]`."""
    valid, classes, boxes = (train.labels[k] for k in ("valid", "classes", "boxes"))
    classes, boxes = classes[valid], boxes[valid]
    k = train.num_classes
    counts = np.bincount(classes, minlength=k)
    mean = np.stack([boxes[classes == c].mean(0) if counts[c] else np.full(4, 0.5)
                     for c in range(k)])
    return {"boxes": np.broadcast_to(mean, (n, k, 4)),
            "scores": np.broadcast_to(counts / counts.sum(), (n, k)),
            "classes": np.broadcast_to(np.arange(k), (n, k))}


def run_predictions(run_dir: str, batch_size: int = 100) -> tuple[dict, data.Dataset]:
    """The postprocessed predictions (`train.detection.postprocess`) of a detection run's
    latest checkpoint on its test set, and that test set."""
    import jax
    import jax.numpy as jnp

    from flax_attention.train.detection import postprocess
    from flax_attention.train.loop import open_run

    trainer, state, _ = open_run(run_dir)
    variables, test = trainer.variables(state), trainer.test_set
    predict = jax.jit(lambda x: postprocess(trainer.model.apply(variables, x)))
    parts = [predict(jnp.asarray(test.images[i:i + batch_size]))
             for i in range(0, len(test), batch_size)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts), test


def _print(name: str, predictions: dict, targets: dict) -> None:
    agnostic = ({**predictions, "classes": np.zeros_like(predictions["classes"])},
                {**targets, "classes": np.zeros_like(targets["classes"])})
    for kind, (p, t) in (("", (predictions, targets)), (", class-agnostic", agnostic)):
        scores = metrics.average_precision(p, t)
        print(f"{name}{kind}: test mAP {scores['map']:.4f}, AP50 {scores['ap50']:.4f}, "
              f"AP75 {scores['ap75']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--run", default=None, help="a detection run directory")
    args = parser.parse_args()
    train, test = (data.load_dataset("digit-detection", split, args.data_seed)
                   for split in ("train", "test"))
    _print("mean box per class", mean_box_predictions(train, len(test)), dict(test.labels))
    if args.run is not None:
        predictions, run_test = run_predictions(args.run)
        _print(args.run, predictions, dict(run_test.labels))


if __name__ == "__main__":
    main()
