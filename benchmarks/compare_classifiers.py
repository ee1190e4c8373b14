"""`python -m benchmarks.compare_classifiers`: the attention mechanisms on the same small CNN.

Trains each model of `--models` with each seed of `--seeds` for `--epochs` epochs on
`--dataset` (the same batch size, learning rate and schedule for all) and prints the test error
(mean ± standard deviation over the seeds, then each seed's) and the parameter count. Each
run lives in `<out>/<model>-s<seed>` and is resumed, so an interrupted comparison picks up where
it stopped and a finished one just prints its table again.
"""

from __future__ import annotations

import argparse
import statistics

import jax

from flax_attention.models.classifiers import list_classifiers
from flax_attention.train import TrainConfig, train

MODELS = tuple(list_classifiers())


def _run(model: str, seed: int, args: argparse.Namespace) -> dict:
    config = TrainConfig(model=model, dataset=args.dataset, epochs=args.epochs, seed=seed,
                         batch_size=args.batch_size, out=f"{args.out}/{model}-s{seed}",
                         progress=False)
    result = train(config, resume=True)
    if result.status != "completed":
        raise SystemExit(f"{model} seed {seed}: {result.status}")
    print(f"  {model:<8} seed {seed}: test error {100 * (1 - result.metrics['test_accuracy']):.2f}%"
          f" ({result.metrics['wall_s']:.0f} s)", flush=True)
    return result.metrics


def _row(model: str, runs: list[dict], params: int) -> str:
    errors = [100 * (1 - m["test_accuracy"]) for m in runs]
    spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
    mean = f"{statistics.mean(errors):.2f} ± {spread:.2f}"
    return (f"| {model:<8} | {mean:>13} | {' '.join(f'{e:.2f}' for e in errors):<20} | "
            f"{params:>8,} |")


def _params(model: str, dataset: str) -> int:
    from flax_attention.data import load_dataset
    from flax_attention.models.classifiers import create_classifier

    images = load_dataset(dataset, "test").images[:1]
    net = create_classifier(model, 10, images.shape[1:])
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), images))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "stn-cnn", "se-cnn", "cca-cnn",
                                                         "nl-cnn"], choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--dataset", default="distorted-digits")
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args(argv)
    results = {m: [_run(m, s, args) for s in args.seeds] for m in args.models}
    print(f"\n{args.dataset}, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}")
    print("| model    | test error %  | per seed             |   params |")
    print("| -------- | ------------- | -------------------- | -------- |")
    for model, runs in results.items():
        print(_row(model, runs, _params(model, args.dataset)))


if __name__ == "__main__":
    main()
