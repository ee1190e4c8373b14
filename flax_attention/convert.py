"""`flax-attention convert`: a reference repository's checkpoint -> an orbax weights directory.

    flax-attention convert detr-r50-e632da11.pth --model detr_resnet50 --out weights/detr
    net = models.create("detr_resnet50", weights="weights/detr")   # bound: net(images)

The checkpoint is read as saved (`.pth`, `.pth.tar`, `.pt`, `.pkl` through
`torch.load(weights_only=True)`; `.safetensors` through the `safetensors` package, without
torch), its state dict taken out of a `{"model": ...}` / `{"state_dict": ...}` wrapper and
DataParallel's `module.` prefix, and converted by `interop.torch.from_torch` for the registry
model `name`, which refuses (and nothing is written) a state dict that does not fit.

The weights directory is one orbax step (`train.checkpoint.Checkpoints`, step 0) holding the
variables `{"params", "batch_stats"}` and, as its config, the model name and class count:
`models.create(name, weights=DIR)`, `flax-attention eval --weights DIR` and `flax-attention train
--init-from DIR` read it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flax_attention.interop.torch import from_torch, rules_for, state_dict_of, variable_shapes
from flax_attention.models import registry

__all__ = ["TORCH_SUFFIXES", "checkpoint_classes", "convert", "evaluate_weights",
           "is_weights_directory", "load_weights", "read_checkpoint", "save_weights"]

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".pkl")
_SAFETENSORS = ".safetensors"
_WEIGHTS_KIND = "weights"  # the "kind" in a weights directory's metadata


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The object saved in a checkpoint file: a torch pickle (`TORCH_SUFFIXES`, read with
    `weights_only=True`; DETR's saved `argparse.Namespace` of arguments is allowed) or a
    `.safetensors` file (numpy arrays; torch is not imported).

    Raises:
      ValueError: an unknown suffix, a missing file, torch missing for a torch file, or a file
        that is no checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    if path.name.endswith(_SAFETENSORS):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a safetensors file: {error}") from None
    if not path.name.endswith(TORCH_SUFFIXES):
        raise ValueError(f"checkpoint {path} must end with one of "
                         f"{', '.join((*TORCH_SUFFIXES, _SAFETENSORS))}")
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path.name} needs torch (pip install torch); a .safetensors "
                         "checkpoint needs none") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"cannot read {path} as a torch checkpoint (weights_only): "
                         f"{type(error).__name__}: {reason}") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict (a "
                         "whole pickled model cannot be read with weights_only; save its "
                         "state_dict())")
    return checkpoint


def _class_dependent(name: str, state_dict: Mapping[str, Any]) -> dict[tuple[str, ...], tuple]:
    """The variables whose shape depends on `num_classes` (the head), with their shapes for
    one class and the axis that grows with the classes."""
    one, two = (variable_shapes(registry.create(name, num_classes=n), state_dict)
                for n in (1, 2))
    head = {}
    for path, shape in one.items():
        if shape.shape != two[path].shape:
            axis = next(i for i, (a, b) in enumerate(zip(shape.shape, two[path].shape,
                                                         strict=True)) if a != b)
            head[path] = (shape.shape, axis)
    return head


def checkpoint_classes(name: str, state_dict: Mapping[str, Any]) -> int | None:
    """The number of classes of the registry model `name` that `state_dict` holds (read from
    its head's shape), or None when it cannot tell (then `from_torch` says what is wrong)."""
    state_dict = state_dict_of(state_dict)
    try:
        head = _class_dependent(name, state_dict)
    except (KeyError, ValueError):
        return None
    rules = rules_for(registry.create(name, num_classes=1))
    for path, (shape, axis) in sorted(head.items()):
        rule = rules[path]
        if rule.key in state_dict:
            try:
                got = rule.transform(np.asarray(state_dict[rule.key])).shape
            except (ValueError, IndexError):
                return None
            count = 1 + got[axis] - shape[axis] if len(got) == len(shape) else 0
            return count if count >= 1 else None
    return None


def _new_head(name: str, state_dict: Mapping[str, Any], variables: dict, num_classes: int,
              seed: int) -> tuple[dict, list[str]]:
    """`variables` with the head re-initialised for `num_classes` (kernels LeCun normal, the
    rest zero: Flax's default for Dense and Conv), and the torch keys dropped."""
    model = registry.create(name, num_classes=num_classes)
    shapes, rules = variable_shapes(model, state_dict), rules_for(model)
    flat = traverse_util.flatten_dict(variables)
    key, dropped = jax.random.key(seed), []
    for i, path in enumerate(sorted(shapes)):
        want = shapes[path]
        if flat[path].shape == want.shape:
            continue
        dropped.append(rules[path].key)
        flat[path] = (jax.nn.initializers.lecun_normal()(jax.random.fold_in(key, i), want.shape,
                                                         want.dtype)
                      if path[-1] == "kernel" else jnp.zeros(want.shape, want.dtype))
    return traverse_util.unflatten_dict(flat), dropped


def save_weights(out: str | Path, name: str, num_classes: int, variables: dict,
                 source: str = "") -> Path:
    """Writes `variables` of the registry model `name` as a weights directory `out`."""
    from flax_attention.train.checkpoint import Checkpoints

    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with Checkpoints(out, max_to_keep=1) as checkpoints:
        checkpoints.save(0, variables, {"model": name, "num_classes": num_classes},
                         {"kind": _WEIGHTS_KIND, "source": source})
    return Path(out)


def _weights_config(directory: str | Path) -> dict[str, Any]:
    """The model name and class count saved in a weights directory."""
    from flax_attention.train.checkpoint import Checkpoints

    with Checkpoints(directory, read_only=True) as checkpoints:
        meta = checkpoints.metadata()
    if meta.get("kind") != _WEIGHTS_KIND:
        raise ValueError(f"{directory} is not a weights directory (made by `flax-attention "
                         "convert`)")
    return meta["config"]


def is_weights_directory(directory: str | Path) -> bool:
    """Whether `directory` is a weights directory (not a run's, which has a config.json)."""
    if (Path(directory) / "config.json").exists():
        return False
    try:
        _weights_config(directory)
    except ValueError:
        return False
    return True


def load_weights(directory: str | Path, name: str | None = None,
                 num_classes: int | None = None) -> tuple[str, int, dict]:
    """The model name, class count and variables `{"params", "batch_stats"}` of a weights
    directory (`convert`'s `--out`).

    Raises:
      ValueError: not a weights directory, corrupt, or holding another model than `name` or
        another class count than `num_classes` (when given).
    """
    from flax_attention.train.checkpoint import Checkpoints

    config = _weights_config(directory)
    saved, classes = config["model"], config["num_classes"]
    if name is not None and name != saved:
        raise ValueError(f"{directory} holds {saved} weights, not {name}")
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"{directory} holds {saved} weights for {classes} classes, not "
                         f"num_classes={num_classes} (convert again with --num-classes)")
    with Checkpoints(directory, read_only=True) as checkpoints:
        variables, _ = checkpoints.restore(None)
    return saved, classes, {"params": variables["params"],
                            "batch_stats": variables.get("batch_stats", {})}


def evaluate_weights(directory: str | Path, dataset: str | None, data_dir: str | None = None,
                     limit: int | None = None) -> dict[str, float]:
    """The test loss and accuracy of a classifier's weights directory on `dataset` (a name of
    `data.list_datasets()` with as many classes as the weights), on its first `limit` test
    images (None: all)."""
    from flax_attention.train.supervised import SupervisedTrainer, TrainConfig

    if dataset is None:
        raise ValueError("--weights needs --dataset: the data set to evaluate on")
    name = _weights_config(directory)["model"]
    batch_size = min(TrainConfig.batch_size, limit or TrainConfig.batch_size)
    config = TrainConfig(model=name, dataset=dataset, init_from=str(directory),
                         data_dir=data_dir, limit=limit, batch_size=batch_size, progress=False)
    trainer = SupervisedTrainer(config)
    return trainer.evaluate(trainer.init_state())


def convert(checkpoint: str | Path, name: str, out: str | Path, num_classes: int | None = None,
            seed: int = 0, log: Callable[[str], Any] = print) -> Path:
    """Converts a reference checkpoint for the registry model `name` into the weights directory
    `out`.

    Args:
      checkpoint: the file (see `read_checkpoint`).
      name: a name of `models.list_models()`.
      out: the weights directory to create (absent or empty).
      num_classes: the classes wanted; when they differ from the checkpoint's, its head is
        dropped and re-initialised (drawn from `seed`), and `log` says so.

    Returns:
      `out`. Nothing is written when the checkpoint is refused.

    Raises:
      ValueError: an unreadable checkpoint, an unknown model, a non-empty `out`, or a state
        dict that does not fit (every offending key listed, see `from_torch`).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    registry.create(name)  # an unknown name: the registry's message
    state_dict = state_dict_of(read_checkpoint(checkpoint))
    model = registry.create(name, num_classes=checkpoint_classes(name, state_dict))
    variables, saved = from_torch(model, state_dict), model.num_classes
    wanted = saved if num_classes is None else num_classes
    if wanted != saved:
        variables, dropped = _new_head(name, state_dict, variables, wanted, seed)
        log(f"dropped the classifier head ({', '.join(dropped)}: {saved} classes) and "
            f"re-initialised it for {wanted} classes")
    save_weights(out, name, wanted, variables, source=str(checkpoint))
    log(f"converted {checkpoint} -> {out} ({name}, {wanted} classes)")
    return out


def command(args: argparse.Namespace) -> int:
    """`flax-attention convert CHECKPOINT --model NAME [--num-classes N] --out DIR`."""
    convert(args.checkpoint, args.model, args.out, args.num_classes, args.seed)
    return 0
