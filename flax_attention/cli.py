"""The `flax-attention` command.

    flax-attention train [--model stn-cnn] [--dataset distorted-digits] [--epochs N]
                         [--out DIR] [--resume] [--batch-size B] [--lr LR] [--seed S] ...
    flax-attention train --model ram [--dataset cluttered-digits] [--steps N | --epochs N]
                         [--glimpses G] [--random-glimpses] ...
    flax-attention train --model detr-small | danet-small | ccnet-small | fcn-small
                         [--dataset digit-detection | digit-segmentation] [--steps N] ...
    flax-attention eval --run DIR | --weights DIR --dataset NAME
    flax-attention visualize --run DIR [--out DIR] [--num-images N] [--seed S]
    flax-attention list
    flax-attention bench [--only NAME]
    flax-attention demo
    flax-attention convert CHECKPOINT --model NAME [--num-classes N] --out DIR
    flax-attention export --model NAME [--weights DIR] --input-shape B,H,W,C --out FILE

A bare `flax-attention train` is the main job: an STN-CNN on the embedded distorted digits,
a few minutes on a 2-core CPU, ending with its test accuracy. SIGINT/SIGTERM save a checkpoint
and exit with status 75 (`EXIT_INTERRUPTED`); `--resume` continues, and options left out are
taken from the run's config. Bad arguments exit non-zero with a one-line message.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_STOPPED = 1, 2, 75, 130


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def demo_row(row, key: jax.Array, variables: dict | None = None
             ) -> tuple[jax.Array, int, float]:
    """Builds the mechanism table `row`'s module, applies it jitted to random inputs of its demo
    shapes (with `variables`, or freshly initialised ones), and returns the first output, the
    parameter count and the milliseconds of a call."""
    module = row.build()
    inputs = [jax.random.normal(jax.random.fold_in(key, i), s) for i, s in
              enumerate(row.demo_shapes)]
    if variables is None:
        variables = jax.jit(functools.partial(module.init, **row.call_kwargs))(key, *inputs)
    apply = jax.jit(functools.partial(module.apply, **row.call_kwargs))
    jax.block_until_ready(apply(variables, *inputs))  # compile
    start = time.perf_counter()
    out = jax.block_until_ready(apply(variables, *inputs))
    ms = (time.perf_counter() - start) * 1e3
    return jax.tree.leaves(out)[0], _count(variables.get("params", {})), ms


def demo(args: argparse.Namespace) -> int:
    from flax_attention import mechanisms

    rows = ([mechanisms.get(name) for name in args.only] if args.only
            else mechanisms.MECHANISMS)
    key = jax.random.key(args.seed)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'mechanism':<26} {'input':<22} {'output':<20} {'params':>9} {'ms/call':>9}")
    for row in rows:
        first, count, ms = demo_row(row, key)
        finite = bool(jnp.all(jnp.isfinite(first)))
        print(f"{row.name:<26} {str(row.demo_shapes[0]):<22} {str(tuple(first.shape)):<20} "
              f"{count:>9,} {ms:>9.2f}" + ("" if finite else "  NOT FINITE"))
    return 0


def _model_names() -> list[str]:
    from flax_attention.models import registry
    from flax_attention.models.classifiers import list_classifiers
    from flax_attention.train.options import RAM

    return [*list_classifiers(), RAM, *registry.list_models()]


def list_all(args: argparse.Namespace) -> int:
    from flax_attention import mechanisms
    from flax_attention.data import list_datasets
    from flax_attention.train.dense import model_task
    from flax_attention.train.options import RAM
    from flax_attention.train.supervised import list_trainable

    trainable, others = list_trainable()
    dense = [name for name in others if model_task(name)]
    sections = {
        "mechanisms": mechanisms.names(),
        "models that train takes (train --model; the registry's classifiers need images "
        "that fit them; detectors train on digit-detection, segmenters on "
        "digit-segmentation)": [*trainable, RAM, *dense],
        "other networks (models.create, from_torch; not trained by train)":
            [name for name in others if name not in dense],
        "data sets (train --dataset; the *mnist ones need --data-dir)": list(list_datasets()),
    }
    for title, names in sections.items():
        print(f"{title}:")
        for name in names:
            print(f"  {name}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())



def _title(config) -> str:
    if config.KIND != "reinforce":
        return config.model
    kind = "random glimpses" if config.random_locations else "learned glimpses"
    return f"RAM ({config.num_glimpses} {kind})"


def _scores(m: dict) -> str:
    if "test_map" in m:
        return (f": test mAP {m['test_map']:.4f}, AP50 {m['test_ap50']:.4f}, "
                f"AP75 {m['test_ap75']:.4f}")
    if "test_miou" in m:
        return (f": test mIoU {m['test_miou']:.4f}, pixel accuracy "
                f"{m['test_pixel_accuracy']:.2%}, test loss {m['test_loss']:.4f}")
    if "test_accuracy" not in m:
        return ""
    parts = [f"test accuracy {m['test_accuracy']:.2%}"]
    if "test_loss" in m:
        parts.append(f"test loss {m['test_loss']:.4f}")
    if "test_error" in m:
        parts.append(f"test error {m['test_error']:.2f}%")
    return ": " + ", ".join(parts)


def train(args: argparse.Namespace) -> int:
    from flax_attention.train.loop import trainer_class
    from flax_attention.train.options import run_config, trainer_kind
    from flax_attention.train.parallel import describe_devices
    from flax_attention.train.run_dir import pick_run_dir, prepare_run_dir

    kind = trainer_kind(args)
    config = run_config(args, kind)
    if kind == "supervised" and config.model not in _model_names():
        raise ValueError(f"unknown model {config.model!r}; known: {', '.join(_model_names())}")
    resume, action = args.resume, None
    if not resume and "out" not in vars(args):  # the default out dir: resume or a new one
        config, resume, action = pick_run_dir(config)
    trainer = trainer_class(kind)(config)  # refuses a bad config or model: nothing written
    prepare_run_dir(config.out)
    say = print if jax.process_index() == 0 else _silent  # one log for a multi-host run
    if action:
        say(action, flush=True)
    say(f"training {_title(config)} on {config.dataset} for {config.length()} -> "
        f"{config.out}\n{describe_devices(trainer.mesh)}", flush=True)
    result = trainer.fit(resume, step_delay=args.step_delay)
    m = result.metrics
    say(f"{result.status} at step {m['step']} ({m['wall_s']:.0f} s){_scores(m)}", flush=True)
    if result.status == "interrupted":
        say(f"resume with: flax-attention train --out {config.out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _silent(*args, **kwargs) -> None:
    """`print` on the processes other than 0."""


def evaluate(args: argparse.Namespace) -> int:
    from flax_attention.convert import evaluate_weights, is_weights_directory
    from flax_attention.train.loop import evaluate_run
    from flax_attention.train.options import DENSE

    if is_weights_directory(args.run):
        m = evaluate_weights(args.run, args.dataset, args.data_dir)
        print(f"{args.run}: {args.dataset} test accuracy {100 * m['test_accuracy']:.2f}%, "
              f"test loss {m['test_loss']:.4f}")
        return 0
    m = evaluate_run(args.run, data_dir=args.data_dir)
    if m["trainer"] in DENSE:
        print(f"{args.run}: step {m['step']}{_scores(m)}")
    elif m["trainer"] == "reinforce":
        print(f"{args.run}: step {m['step']}: test accuracy {m['test_accuracy']:.2%} "
              f"(mean over {m['mc_samples']} glimpse paths), test error {m['test_error']:.2f}%")
    else:
        print(f"{args.run}: step {m['step']} (epoch {m['epoch']:.2f}): test accuracy "
              f"{100 * m['test_accuracy']:.2f}%, test loss {m['test_loss']:.4f}")
    return 0


def visualize(args: argparse.Namespace) -> int:
    from flax_attention.train.options import DENSE
    from flax_attention.train.run_dir import run_kind
    from flax_attention.visualize import visualize_run

    dense = (Path(args.run) / "config.json").is_file() and run_kind(args.run) in DENSE
    if dense:
        from flax_attention.visualize_dense import visualize_dense_run as visualize_run
    paths = visualize_run(args.run, args.out, args.num_images, args.seed, args.data_dir)
    for path in paths:
        print(path)
    return 0


def _benchmarks_root() -> Path | None:
    """The source checkout holding `benchmarks/run.py`: the working directory or the one above
    the package (an editable install); None for neither."""
    return next((p for p in (Path.cwd(), Path(__file__).resolve().parents[1])
                 if (p / "benchmarks" / "run.py").is_file()), None)


def bench(args: argparse.Namespace) -> int:
    """Runs `python -m benchmarks.run` (with the options given) in the source checkout."""
    root = _benchmarks_root()
    if root is None:
        raise ValueError("the benchmarks are not installed with the package: run `flax-attention "
                         "bench` in a source checkout (the folder holding benchmarks/)")
    command = [sys.executable, "-m", "benchmarks.run", *args.args]
    return subprocess.run(command, cwd=root, check=False).returncode


def export(args: argparse.Namespace) -> int:
    from flax_attention.export import export_to_file, parse_shape

    result = export_to_file(args.model, parse_shape(args.input_shape), args.out, args.weights,
                            args.dtype, args.num_classes, args.seed)
    batch = "any" if result.polymorphic else result.note
    print(f"{args.out}: {args.model} on {args.input_shape} {args.dtype}, batch: {batch}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from flax_attention.convert import command

    return command(args)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: `flax-attention train: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, low: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            bound = f"> {low}" if strict else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def directory(text: str) -> str:
    """A run or output directory: any path but the empty string (which would mean the cwd)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a directory path, got {text!r}")
    return text


positive_int, natural, positive_float = (_number(int, 1, False), _number(int, 0, False),
                                         _number(float, 0.0, True))


def _add_train(sub) -> None:
    from flax_attention.data import list_datasets
    from flax_attention.train.reinforce import RamConfig
    from flax_attention.train.supervised import DTYPES, OPTIMIZERS, TrainConfig

    c, r = TrainConfig, RamConfig
    p = sub.add_parser("train", help="train a classifier (default: the STN-CNN main job), "
                       "RAM (--model ram), a detector or a segmenter (--model detr-small, ...)",
                       argument_default=argparse.SUPPRESS,
                       description="Train a classifier (default: the STN-CNN main job), RAM "
                       "(--model ram), a detector (--model detr-small, on digit-detection) or a "
                       "segmenter (--model danet-small, ccnet-small, fcn-small, on "
                       "digit-segmentation). Options left out take the defaults shown (with "
                       "--resume: the run's saved values). Without --out, a run of the same "
                       "config in the default directory is resumed, else a new one is made.")
    p.add_argument("--model", help=f"a name of `flax-attention list` (default {c.model})")
    p.add_argument("--dataset", choices=list_datasets(),
                   help=f"default {c.dataset}; {r.dataset} for ram; digit-detection or "
                   "digit-segmentation for detectors and segmenters")
    p.add_argument("--epochs", type=positive_int,
                   help=f"passes over the training set (default {c.epochs}; ram: --steps)")
    p.add_argument("--out", type=directory, help="run directory (default runs/<model>-<dataset>)")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue from the run's last checkpoint")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int,
                   help=f"global batch, a multiple of the device count (default {c.batch_size})")
    p.add_argument("--lr", type=positive_float,
                   help=f"peak learning rate (default {c.lr}; ram {r.lr})")
    p.add_argument("--seed", type=natural,
                   help=f"initialisation, data order and dropout (default {c.seed})")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"AdamW or Nesterov SGD, warmup and cosine decay (default {c.optimizer})")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help=f"computation dtype; parameters stay float32 (default {c.dtype})")
    p.add_argument("--skip-nonfinite", dest="skip_nonfinite", action="store_true",
                   help="skip steps whose loss or gradient is NaN/Inf (default: such a step "
                   "stops the run, the last checkpoint finite)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int,
                   help="steps between checkpoints")
    p.add_argument("--init-from", dest="init_from", type=directory,
                   help="fine-tune: start from a weights directory (`convert --out`)")
    p.add_argument("--data-dir", dest="data_dir", help="where MNIST lies (*mnist data sets)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--steps", type=positive_int,
                   help=f"optimiser steps, instead of --epochs (ram: default {r.steps})")
    p.add_argument("--glimpses", type=positive_int, help="glimpses per image (--model ram)")
    p.add_argument("--random-glimpses", dest="random_glimpses", action="store_true",
                   help="glimpse at random places instead of the learned policy (--model ram)")
    p.add_argument("--limit", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--log-every", dest="log_every", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--step-delay", dest="step_delay", type=_number(float, 0.0, False),
                   default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=train)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flax-attention", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="jit every mechanism on a small input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=(), metavar="NAME",
                   help="these mechanisms only (names or short names of `list`)")
    p.set_defaults(func=demo)
    sub.add_parser("list", help="list the mechanisms, models and data sets").set_defaults(
        func=list_all)
    _add_train(sub)
    p = sub.add_parser("eval", help="test accuracy (detection: mAP, AP50; segmentation: mIoU, "
                       "pixel accuracy) of a run's last checkpoint or of weights")
    p.add_argument("--run", "--weights", dest="run", required=True,
                   help="a run directory (train --out) or a weights directory (convert --out, "
                   "with --dataset)")
    p.add_argument("--dataset", default=None, help="the data set of a weights directory")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.set_defaults(func=evaluate)
    p = sub.add_parser("visualize", help="PNGs of what a run's last checkpoint attends to")
    p.add_argument("--run", required=True, help="the run directory (train --out)")
    p.add_argument("--out", type=directory, default=None,
                   help="where the PNGs go (default <run>/pictures)")
    p.add_argument("--num-images", dest="num_images", type=positive_int, default=6)
    p.add_argument("--seed", type=natural, default=0, help="which test images")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.set_defaults(func=visualize)
    p = sub.add_parser("bench", help="python -m benchmarks.run (in a source checkout)")
    p.set_defaults(func=bench, args=[])  # the unknown options, e.g. --only SELayer
    p = sub.add_parser("convert", help="a reference repository's checkpoint -> weights for "
                       "models.create(name, weights=DIR), eval --weights, train --init-from")
    p.add_argument("checkpoint", help=".pth, .pth.tar, .pt, .pkl (torch) or .safetensors")
    p.add_argument("--model", required=True, help="a model of `flax-attention list`")
    p.add_argument("--num-classes", dest="num_classes", type=positive_int, default=None,
                   help="re-initialise the classifier head for N classes (default: the "
                   "checkpoint's)")
    p.add_argument("--seed", type=natural, default=0, help="of a re-initialised head")
    p.add_argument("--out", type=directory, required=True, help="the weights directory made")
    p.set_defaults(func=convert)
    p = sub.add_parser("export", help="the model's inference as a jax.export (StableHLO) file")
    p.add_argument("--model", required=True, help="a model of `flax-attention list`")
    p.add_argument("--weights", type=directory, default=None,
                   help="a weights directory (convert --out) or a run directory (train "
                   "--out); default: freshly initialised weights")
    p.add_argument("--input-shape", dest="input_shape", required=True, metavar="B,H,W,C")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--num-classes", dest="num_classes", type=positive_int, default=None)
    p.add_argument("--seed", type=natural, default=0, help="of the fresh weights")
    p.add_argument("--out", type=directory, required=True, help="the file written")
    p.set_defaults(func=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.args = extra
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"flax-attention {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C while a checkpoint was being saved
        print(f"flax-attention {args.command}: stopped", file=sys.stderr)
        return EXIT_STOPPED


def entry_point() -> NoReturn:
    """The `flax-attention` command: `main`, then exit with its status. It leaves with
    `os._exit` once `main` has returned (its checkpoints saved) and the output is flushed: a
    normal interpreter shutdown with a thread still inside XLA can abort (SIGABRT, "terminate
    called after throwing...") instead of exiting with the documented status
    (`data.prefetch_to_device` joins its thread; this guards against any other). Only a run
    that finished runs the `atexit` hooks (`jax.distributed`'s shutdown) first."""
    code = main()
    if code not in (EXIT_INTERRUPTED, EXIT_STOPPED):
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
