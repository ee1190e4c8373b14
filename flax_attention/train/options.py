"""The run config of `flax-attention train`'s options: which trainer, and its config.

    kind = trainer_kind(args)           # "supervised", "reinforce", "detection", "segmentation"
    config = run_config(args, kind)     # the options given, then (with --resume) the run's
                                        # saved config, then the defaults

Options that no field of the trainer's config takes are refused with a one-line ValueError.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["DENSE", "RAM", "dense_config", "ram_config", "run_config", "train_config",
           "trainer_kind"]

RAM = "ram"  # the Recurrent Attention Model, trained by `train.reinforce`
# The train options that name a RamConfig field differently (--limit also sets test_examples).
_RAM_FIELDS = {"glimpses": "num_glimpses", "random_glimpses": "random_locations",
               "limit": "train_examples"}
_RAM_ONLY = ("glimpses", "random_glimpses")
_SUPERVISED_ONLY = ("optimizer", "dtype")
DENSE = ("detection", "segmentation")  # the trainers of detectors and segmenters
# The train arguments that are no config field.
_COMMAND_ARGS = ("command", "func", "args", "resume", "step_delay")


def _run_length(args: argparse.Namespace, given: dict) -> None:
    """--steps or --epochs: the one given fixes the run length, the other field is dropped."""
    if "steps" in vars(args) and "epochs" in vars(args):
        raise ValueError("give --steps or --epochs, not both")
    if "steps" in vars(args):
        given["epochs"] = None
    if "epochs" in vars(args):
        given["steps"] = None


def train_config(args: argparse.Namespace):
    """The run's TrainConfig: the options given, then (with --resume) the run's saved config,
    then the defaults."""
    from flax_attention.train.supervised import TrainConfig

    if any(option in vars(args) for option in _RAM_ONLY):
        raise ValueError("--glimpses and --random-glimpses are options of --model ram")
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    _run_length(args, given)
    _default_out(given, TrainConfig)
    return TrainConfig.from_options(given, args.resume)


def _default_out(given: dict, cls) -> None:
    """Sets `given["out"]` to runs/<model>-<dataset> unless given."""
    if "out" not in given:
        model, dataset = given.get("model", cls.model), given.get("dataset", cls.dataset)
        given["out"] = os.path.join("runs", f"{model}-{dataset}")


def dense_config(args: argparse.Namespace, kind: str):
    """The config of a detection or segmentation run: the options given, then (with --resume)
    the run's saved config, then the defaults (of the task: detr-small on digit-detection,
    danet-small on digit-segmentation)."""
    from flax_attention.train.loop import trainer_class

    cls = trainer_class(kind).CONFIG
    fields = cls.__dataclass_fields__
    other = [k for k in vars(args) if k not in fields and k not in _COMMAND_ARGS]
    if other:
        raise ValueError(f"--{other[0].replace('_', '-')} is not an option of the {kind} "
                         f"models")
    given = {k: v for k, v in vars(args).items() if k in fields}
    _run_length(args, given)
    _default_out(given, cls)
    return cls.from_options(given, args.resume)


def ram_config(args: argparse.Namespace):
    """The RamConfig of `train --model ram`: the options given, then (with --resume) the run's
    saved config, then the defaults."""
    from flax_attention.train.reinforce import RamConfig

    for option in _SUPERVISED_ONLY:
        if option in vars(args):
            raise ValueError(f"--{option} is not an option of --model ram")
    fields = RamConfig.__dataclass_fields__
    given = {_RAM_FIELDS.get(k, k): v for k, v in vars(args).items()
             if _RAM_FIELDS.get(k, k) in fields}
    if "limit" in vars(args):
        given["test_examples"] = args.limit
    _run_length(args, given)
    return RamConfig.from_options(given, args.resume)


def trainer_kind(args: argparse.Namespace) -> str:
    """The trainer of `train`: by --model (a detector or segmenter: its task's); without it,
    with --resume, the one named in the run's config.json; else by --dataset (a detection or
    segmentation set: its task's), else the supervised one."""
    from flax_attention.train.dense import TASK_DATASETS, model_task
    from flax_attention.train.run_dir import run_kind

    model = getattr(args, "model", None)
    if model is not None:
        return "reinforce" if model == RAM else model_task(model) or "supervised"
    out = getattr(args, "out", None)
    if args.resume and out is not None and (Path(out) / "config.json").is_file():
        return run_kind(out)
    dataset = getattr(args, "dataset", None)
    return next((task for task, names in TASK_DATASETS.items() if dataset in names),
                "supervised")


def run_config(args: argparse.Namespace, kind: str):
    """The config of the trainer `kind` (`trainer_kind`) from the options `args`."""
    if kind in DENSE:
        return dense_config(args, kind)
    return ram_config(args) if kind == "reinforce" else train_config(args)
