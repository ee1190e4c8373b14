"""Training step of the small dense models against the same models in PyTorch.

`python -m benchmarks.dense_training [--only detr-small] [--list] [--json PATH]`
`python -m benchmarks.dense_training --paired ROUNDS [--only detr-small]`

The models: `detr-small`, `danet-small`, `ccnet-small` and `fcn-small` (`models/small.py`), on
batches of 16 digit canvases of 64 x 64 x 1 (the first batch of epoch 0 of the `digit-detection`
or `digit-segmentation` training set, the same on both sides).

- JAX: the trainer's own jitted step (`train.detection.DetectionTrainer`,
  `train.segmentation.SegmentationTrainer` at their configs' defaults): forward in train mode,
  the loss, its gradient, the metrics, AdamW (with DETR's gradient clipping to 0.1), the state
  donated from step to step.
- PyTorch: the twins of `tests/reference/small.py` (tests/test_small_models.py checks that they
  equal the Flax models and have their parameter counts) in train mode, the same loss (DETR's
  set criterion `tests/reference/detr_criterion.py`, auxiliary decoder layer included, matched
  with `scipy.optimize.linear_sum_assignment` as DETR does; the segmenters' per-pixel
  cross-entropy weighted by `train.segmentation.AUX_WEIGHTS`), `torch.optim.AdamW` with the
  same learning rate and weight decay (and `clip_grad_norm_` 0.1 for DETR): `zero_grad`, the
  loss, `backward`, the clipping, `step`.

Modes: "fwd+bwd" is a whole training step; "fwd" the same forward pass and loss without
gradients (train mode: batch statistics; torch under `no_grad`, JAX the jitted loss alone).

The default run is `benchmarks.harness`'s (each side in its own process, one after the other;
the table and `--json`). On a loaded machine, whose speed drifts from minute to minute,
`--paired ROUNDS` is steadier: both sides stay alive in their own processes and take turns,
one call of JAX then one of torch, ROUNDS times per mode, and the speedup is the median of
the rounds' ratios (no memory column, no JSON).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case

MODULE = "benchmarks.dense_training"
MODELS = ("detr-small", "danet-small", "ccnet-small", "fcn-small")
BATCH = 16
LIMIT = 4 * BATCH  # training canvases kept (the whole set is generated, then cut)
GOAL = 1.0


def _config(name: str):
    """The run config of model `name` (the detection or segmentation trainer's)."""
    from flax_attention.train.detection import DetectionConfig
    from flax_attention.train.segmentation import SegmentationConfig

    config = DetectionConfig if name.startswith("detr") else SegmentationConfig
    return config(model=name, batch_size=BATCH, limit=LIMIT, progress=False)


def jax_setup(name: str) -> dict[str, harness.Thunk]:
    import jax

    from flax_attention.train.detection import DetectionTrainer
    from flax_attention.train.segmentation import SegmentationTrainer

    config = _config(name)
    trainer = (DetectionTrainer if config.KIND == "detection" else SegmentationTrainer)(config)
    images, labels = next(iter(trainer.epoch_batches(0, 0)))
    held = {"state": trainer.init_state()}  # donated by every step: replaced by its result
    key = jax.random.key(0)
    loss = jax.jit(lambda state, x, y: trainer.loss(state.params, state, x, y, key)[0])

    def step():
        held["state"], metrics = trainer.train_step(held["state"], images, labels)
        jax.block_until_ready((held["state"], metrics))

    return {"fwd": lambda: jax.block_until_ready(loss(held["state"], images, labels)),
            "fwd+bwd": step}


def _numpy_batch(config) -> tuple[np.ndarray, object]:
    """The trainer's first batch (`Trainer.epoch_batches(0, 0)`), as numpy arrays."""
    from flax_attention import data

    dataset = data.load_dataset(config.dataset, "train", config.data_seed).take(
        slice(config.limit))
    return next(data.batches(dataset, config.batch_size, config.seed, 0))


def _detr_loss(labels: dict[str, np.ndarray]):
    """DETR's set criterion against the batch's digits, matched by scipy as DETR does."""
    import torch
    from scipy.optimize import linear_sum_assignment

    from tests.reference.detr_criterion import set_criterion

    targets = [{"labels": torch.from_numpy(c[v]).long(), "boxes": torch.from_numpy(b[v])}
               for c, b, v in zip(labels["classes"], labels["boxes"], labels["valid"],
                                  strict=True)]
    return lambda outputs: set_criterion(outputs, targets, num_classes=10,
                                         assignment=linear_sum_assignment)[0]


def _pixel_loss(name: str, labels: np.ndarray):
    """The per-pixel cross-entropy of every output, weighted as `SegmentationTrainer`'s."""
    import torch
    import torch.nn.functional as F

    from flax_attention.models import registry
    from flax_attention.train.segmentation import AUX_WEIGHTS

    weights = AUX_WEIGHTS.get(type(registry.create(name)), (1.0,))
    target = torch.from_numpy(labels).long()

    def loss(outputs):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return sum(w * F.cross_entropy(o, target) for w, o in zip(weights, outputs, strict=True))

    return loss


def torch_setup(name: str) -> dict[str, harness.Thunk]:
    import torch

    from tests.reference import small

    config = _config(name)
    images, labels = _numpy_batch(config)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)))
    net = small.TWINS[name]().train()
    loss_fn = _detr_loss(labels) if config.KIND == "detection" else _pixel_loss(name, labels)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def fwd():
        with torch.no_grad():
            return loss_fn(net(x))

    def step():
        optimizer.zero_grad()
        loss_fn(net(x)).backward()
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()

    return {"fwd": fwd, "fwd+bwd": step}


CASES = [Case(f"{name} train step b{BATCH} 64x64", functools.partial(jax_setup, name),
              functools.partial(torch_setup, name), goal=GOAL) for name in MODELS]


def _serve(index: int, side: str) -> None:
    """Sets up one side of case `index`, warms both modes up, then times one call of the mode
    named on each line of stdin, answering "ms <milliseconds>" on stdout."""
    thunks = getattr(CASES[index], side)()
    for thunk in thunks.values():
        thunk()
        thunk()
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        thunks[line.strip()]()
        print(f"ms {(time.perf_counter() - start) * 1e3}", flush=True)


def _answer(process: subprocess.Popen) -> str:
    """The next protocol line of a `_serve` process (other output skipped)."""
    for line in process.stdout:
        if line.startswith(("ms ", "ready")):
            return line.strip()
    raise RuntimeError(f"a worker ended early (exit status {process.wait()})")


def paired(index: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Times case `index` with both sides alive in their own processes, one call of JAX then
    one of torch, `rounds` times per mode (the other side idle meanwhile); returns per mode the
    JAX and torch times in ms."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    sides = {side: subprocess.Popen([sys.executable, "-m", MODULE, "--serve", str(index), side],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env) for side in ("jax", "torch")}
    for process in sides.values():
        _answer(process)  # "ready"
    times = {}
    for mode in harness.MODES:
        times[mode] = ([], [])
        for _ in range(rounds):
            for process, out in zip(sides.values(), times[mode], strict=True):
                process.stdin.write(mode + "\n")
                process.stdin.flush()
                out.append(float(_answer(process).split()[1]))
    for process in sides.values():
        process.stdin.close()
        process.wait()
    return times


def paired_main(rounds: int, only: str) -> None:
    """Prints, per case and mode, the median JAX and torch ms of `paired` and the median, min
    and max of the per-round speedups (torch ms / JAX ms)."""
    print(f"# {rounds} alternating rounds per mode; speedup: torch ms / JAX ms, median of the "
          "rounds' (min - max)")
    print(f"{'case':<34} {'mode':<8} {'jax ms':>9} {'torch ms':>9} {'speedup':>8} {'range':>13}")
    for index in [i for i, case in enumerate(CASES) if only in case.name]:
        for mode, (jax_ms, torch_ms) in paired(index, rounds).items():
            ratios = [t / j for j, t in zip(jax_ms, torch_ms, strict=True)]
            print(f"{CASES[index].name:<34} {mode:<8} {statistics.median(jax_ms):>9.1f} "
                  f"{statistics.median(torch_ms):>9.1f} {statistics.median(ratios):>7.2f}x "
                  f"{min(ratios):>5.2f} - {max(ratios):<5.2f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--paired", type=int, metavar="ROUNDS")
    parser.add_argument("--serve", nargs=2)
    parser.add_argument("--only", default="")
    args, rest = parser.parse_known_args(argv)
    if args.serve:
        _serve(int(args.serve[0]), args.serve[1])
    elif args.paired:
        paired_main(args.paired, args.only)
    else:
        harness.main(CASES, MODULE, __doc__, argv=[*rest, "--only", args.only])


if __name__ == "__main__":
    main()
