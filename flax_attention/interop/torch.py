"""PyTorch `state_dict` -> Flax variables, by the reference repositories' parameter names.

A converter for a module type is a pair of functions (see `Converter`):

* `rules(module)` maps every Flax variable path, e.g. `("params", "query_conv", "kernel")`, to the
  torch key it comes from and the layout change it needs (`Rule`);
* `example_inputs(module, shapes)` builds inputs of the right channel count from the shapes of the
  state dict, so that `jax.eval_shape(module.init, ...)` tells the shape every variable must have.

`from_torch` takes a checkpoint as saved (`state_dict_of`: a `{"model": sd}` or
`{"state_dict": sd}` wrapper, DataParallel's `module.` prefix), checks the state dict against
both, and raises one `ValueError` that lists every missing, unexpected and misshaped key (and
says when the keys are another architecture's); nothing is silently dropped or half-loaded.
Converters live beside the modules they convert, in each family's file, and register themselves
with `register` when that file is imported: a module type that exists has its converter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Shapes = Mapping[str, tuple[int, ...]]

_IGNORED_SUFFIXES = ("num_batches_tracked",)
# Keys of the dicts that checkpoints wrap their state_dict in (DETR's "model", the ImageNet
# example's and DANet's "state_dict", kevinzakka/recurrent-visual-attention's "model_state").
WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."
_LISTED = 20  # offending keys listed in an error, then a count
# From this many keys on, a state dict that has fewer than half of them is called another
# architecture's (a block of a few keys is only told its missing and unexpected ones).
_WHOLE_NETWORK = 8


def identity(a: np.ndarray) -> np.ndarray:
    return a


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """torch `[O, I, *K]` -> Flax `[*K, I, O]`."""
    return np.transpose(a, (*range(2, a.ndim), 1, 0))


def dense_kernel(a: np.ndarray) -> np.ndarray:
    """torch `[O, I]` -> Flax `[I, O]`."""
    return a.T


def _torch_layout(transform: Callable, flax_shape: tuple[int, ...]) -> str:
    """How a variable of `flax_shape` must look in the torch state_dict, for error messages:
    empty where the layouts agree."""
    if transform is conv_kernel and len(flax_shape) >= 3:
        kernel = ", ".join(f"k{i}" for i in range(len(flax_shape) - 2))
        torch_shape = (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
        return f" (Flax layout; the state_dict needs torch's [O, I, {kernel}] = {torch_shape})"
    if transform is dense_kernel and len(flax_shape) == 2:
        return f" (Flax layout; the state_dict needs torch's [O, I] = {flax_shape[::-1]})"
    if transform is identity:
        return ""
    layout = (transform.__doc__ or "").split("\n")[0].strip()
    return f" (Flax layout, after {transform.__name__}: {layout})"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one Flax variable comes from: a torch key and the layout change to apply.

    `aliases` are the variable's keys in other reference layouts (mmcv's `gamma.scale` for
    CCNet's `gamma`), used when `key` is not in the state dict."""

    key: str
    transform: Callable[[np.ndarray], np.ndarray] = identity
    aliases: tuple[str, ...] = ()


Rules = dict[Path, Rule]


@dataclasses.dataclass(frozen=True)
class Converter:
    rules: Callable[[nn.Module], Rules]
    example_inputs: Callable[[nn.Module, Shapes], tuple[Any, ...]]


_CONVERTERS: dict[type, Converter] = {}


def register(*module_types: type) -> Callable[[Converter], Converter]:
    """Registers a `Converter` for the given Flax module types (subclasses included)."""

    def decorator(converter: Converter) -> Converter:
        for t in module_types:
            _CONVERTERS[t] = converter
        return converter

    return decorator


def in_channels(shapes: Shapes, key: str) -> int:
    """The input channels of the torch conv or linear weight `key` (`[O, I, *K]`)."""
    shape = shapes[key]
    if len(shape) < 2:
        raise ValueError(f"state_dict has misshaped keys: {key}: expected [O, I, ...], got {shape}")
    return shape[1]


def image_input(shapes: Shapes, key: str, side: int = 1, spatial_dims: int = 2
                ) -> tuple[jax.ShapeDtypeStruct]:
    """An example input `[1, side, ..., side, C]` for `example_inputs`, C being the input
    channels of the torch weight `key`."""
    shape = (1, *(side,) * spatial_dims, in_channels(shapes, key))
    return (jax.ShapeDtypeStruct(shape, jnp.float32),)


# --- Rule builders: a torch prefix and the Flax submodule path it goes to. -----------------------


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def param(path: Path, key: str, transform=identity, aliases: tuple[str, ...] = ()) -> Rules:
    """One parameter: `path` is the Flax path below "params", `key` the full torch key (and
    `aliases` its keys in other layouts, see `Rule`)."""
    return {("params", *path): Rule(key, transform, aliases)}


def conv(path: Path, prefix: str, bias: bool = True) -> Rules:
    """A torch `ConvNd` at `prefix` -> an `nn.Conv` at `path`."""
    rules = param((*path, "kernel"), _key(prefix, "weight"), conv_kernel)
    if bias:
        rules |= param((*path, "bias"), _key(prefix, "bias"))
    return rules


def dense(path: Path, prefix: str, bias: bool = True) -> Rules:
    """A torch `Linear` at `prefix` -> an `nn.Dense` at `path`."""
    rules = param((*path, "kernel"), _key(prefix, "weight"), dense_kernel)
    if bias:
        rules |= param((*path, "bias"), _key(prefix, "bias"))
    return rules


def layer_norm(path: Path, prefix: str) -> Rules:
    """A torch `LayerNorm` -> an `nn.LayerNorm`."""
    return param((*path, "scale"), _key(prefix, "weight")) | param(
        (*path, "bias"), _key(prefix, "bias")
    )


def batch_norm(path: Path, prefix: str) -> Rules:
    """A torch `BatchNormNd` -> an `nn.BatchNorm` (params and batch_stats)."""
    return layer_norm(path, prefix) | {
        ("batch_stats", *path, "mean"): Rule(_key(prefix, "running_mean")),
        ("batch_stats", *path, "var"): Rule(_key(prefix, "running_var")),
    }


def conv_bn(path: Path, prefix: str) -> Rules:
    """A torch `Sequential(Conv (no bias), BatchNorm, ...)` at `prefix` -> a `layers.ConvBN`."""
    return conv((*path, "conv"), _key(prefix, "0"), bias=False) | batch_norm(
        (*path, "bn"), _key(prefix, "1")
    )


# mapillary/inplace_abn's `InPlaceABN(Sync)`, CCNet's BatchNorm, normalises with the scale
# `|weight| + eps` (its default eps, 1e-5, also the variance's), not `weight`.
INPLACE_ABN_EPS = 1e-5


def inplace_abn_scale(a: np.ndarray) -> np.ndarray:
    """InPlaceABN's weight -> the BatchNorm scale it applies, |weight| + 1e-5."""
    return np.abs(a) + np.asarray(INPLACE_ABN_EPS, a.dtype)


def inplace_abn(rules: Rules) -> Rules:
    """`rules` with the scale of every BatchNorm in them (a "scale" beside batch statistics)
    read from an InPlaceABN weight (`inplace_abn_scale`)."""
    norms = {path[1:-1] for path in rules if path[0] == "batch_stats"}
    return {path: dataclasses.replace(rule, transform=inplace_abn_scale)
            if path[0] == "params" and path[-1] == "scale" and path[1:-1] in norms else rule
            for path, rule in rules.items()}


_MIRROR_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


def _mirror_rule(path: Path, ndim: int) -> Rule:
    *modules, leaf = path[1:]
    transform = identity
    if leaf == "kernel":
        transform = conv_kernel if ndim == 4 else dense_kernel
    return Rule(".".join([*modules, _MIRROR_LEAVES[leaf]]), transform)


def mirror_rules(module: nn.Module, *example_inputs: Any) -> Rules:
    """One rule per variable of `module` (as initialised on `example_inputs`) for a torch twin
    that names its submodules as the Flax module does: path components joined by ".",
    `kernel`/`scale` -> `weight`, `mean`/`var` -> `running_mean`/`running_var`."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
    flat = traverse_util.flatten_dict(shapes)
    return {path: _mirror_rule(path, len(s.shape)) for path, s in flat.items()}


def nested(rules: Rules, path: Path, prefix: str) -> Rules:
    """Moves the rules of a submodule under Flax `path` and torch `prefix`."""
    return {
        (p[0], *path, *p[1:]): Rule(_key(prefix, r.key), r.transform,
                                    tuple(_key(prefix, a) for a in r.aliases))
        for p, r in rules.items()
    }


def rules_for(module: nn.Module) -> Rules:
    """The rules of a registered module type (to nest inside a bigger module's rules)."""
    return _converter_for(module).rules(module)


# --- from_torch ----------------------------------------------------------------------------------


def _converter_for(module: nn.Module) -> Converter:
    for t in type(module).__mro__:
        if t in _CONVERTERS:
            return _CONVERTERS[t]
    known = sorted(t.__name__ for t in _CONVERTERS)
    raise TypeError(f"from_torch has no converter for {type(module).__name__}; known: {known}")


def _to_numpy(value: Any) -> np.ndarray:
    """A copy, so later in-place changes of the torch tensor do not reach the Flax variables."""
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: exact in float32
            value = value.float()
        value = value.numpy()
    return np.array(value, copy=True)


def _listing(items: list[str]) -> str:
    """At most `_LISTED` items, then how many more."""
    shown = repr(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def _prefixes(keys: set[str]) -> str:
    """The distinct first components of `keys`, for a wrong-architecture message."""
    return ", ".join(sorted({k.split(".")[0] for k in keys})[:_LISTED])


def _resolve_aliases(rules: Rules, arrays: Mapping[str, np.ndarray]) -> Rules:
    """The rules with each key absent from `arrays` replaced by its first alias present."""
    resolved = {}
    for path, rule in rules.items():
        present = [a for a in rule.aliases if a in arrays]
        if rule.key not in arrays and present:
            rule = dataclasses.replace(rule, key=present[0])
        resolved[path] = rule
    return resolved


def _key_problems(name: str, rules: Rules, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """What `from_torch`'s ValueError says about missing and unexpected keys (empty: none)."""
    wanted = {r.key for r in rules.values()}
    given = {k for k in arrays if not k.endswith(_IGNORED_SUFFIXES)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    problems = []
    if len(wanted) >= _WHOLE_NETWORK and len(wanted & given) < len(wanted) / 2:
        problems.append(f"it looks like another architecture's: only {len(wanted & given)} of "
                        f"the {len(wanted)} keys a {name} needs are there (its keys begin with "
                        f"{_prefixes(given) or 'nothing'}; a {name}'s with {_prefixes(wanted)})")
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    return problems


def _convert(rules: Rules, arrays: Mapping[str, np.ndarray], expected: Mapping
             ) -> tuple[dict, list[str]]:
    """The converted variables of the rules whose key is in `arrays`, and the misshaped keys."""
    converted, misshaped = {}, []
    for path, rule in sorted(rules.items()):
        if rule.key not in arrays:
            continue
        want = tuple(expected[path].shape)
        try:
            value = rule.transform(arrays[rule.key])
        except (ValueError, IndexError):  # the transform did not fit (a 2-D kernel for a conv)
            value = None
        if value is None or tuple(value.shape) != want:
            got = tuple(arrays[rule.key].shape)
            misshaped.append(f"{rule.key}: expected {want}, got {got}"
                             f"{_torch_layout(rule.transform, want)}")
        else:
            converted[path] = jnp.asarray(value, dtype=expected[path].dtype)
    return converted, misshaped


def _example_inputs(converter: Converter, module: nn.Module,
                    arrays: Mapping[str, np.ndarray]) -> tuple:
    """The converter's example inputs; a ValueError naming the keys too short to read sizes
    from (a scalar bias, a 1-D weight) instead of an IndexError."""
    shapes = {k: np.shape(a) for k, a in arrays.items()}
    try:
        return converter.example_inputs(module, shapes)
    except IndexError:
        short = [f"{k}: shape {s}" for k, s in shapes.items()
                 if len(s) == 0 or (len(s) == 1 and k.endswith("weight"))]
        raise ValueError(f"state_dict has misshaped keys (too few dimensions to read the "
                         f"module's sizes from): {short}") from None


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The `state_dict` in a checkpoint as saved: taken out of its wrapper dicts (`WRAPPER_KEYS`,
    e.g. `{"model": sd, "optimizer": ...}`), without DataParallel's `module.` key prefix."""
    while wrapped := [k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)]:
        checkpoint = checkpoint[wrapped[0]]
    prefix = _DATA_PARALLEL_PREFIX
    if checkpoint and all(isinstance(k, str) and k.startswith(prefix) for k in checkpoint):
        return {k.removeprefix(prefix): v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _expected_shapes(converter: Converter, module: nn.Module, rules: Rules,
                     arrays: Mapping[str, np.ndarray]) -> dict[Path, jax.ShapeDtypeStruct]:
    """Every variable's shape and dtype, for the sizes the state dict implies."""
    inputs = _example_inputs(converter, module, arrays)
    expected = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), *inputs))
    if set(expected) != set(rules):  # a converter bug, not a user error
        raise RuntimeError(
            f"converter for {type(module).__name__} does not match the module: variables without "
            f"a rule {sorted(set(expected) - set(rules))}, rules without a variable "
            f"{sorted(set(rules) - set(expected))}"
        )
    return expected


def variable_shapes(module: nn.Module, state_dict: Mapping[str, Any]
                    ) -> dict[Path, jax.ShapeDtypeStruct]:
    """The shape and dtype of each variable of `module` (by flat path, e.g. `("params", "fc",
    "kernel")`) for the sizes the state dict implies (input channels), whether or not the rest
    of the state dict fits; a KeyError or ValueError when those sizes cannot be read."""
    converter = _converter_for(module)
    arrays = state_dict_of(state_dict)
    return _expected_shapes(converter, module, converter.rules(module), arrays)


def from_torch(module: nn.Module, state_dict: Mapping[str, Any]) -> dict:
    """Builds the Flax variables of `module` from a PyTorch `state_dict`.

    Args:
      module: an (unbound) Flax module of this library, e.g. `CrissCrossAttention()`.
      state_dict: the reference implementation's `state_dict()` (torch tensors or numpy arrays),
        keyed by the reference repository's parameter names (DESIGN.md); or a checkpoint as
        saved, the state dict wrapped in a dict (`{"model": sd, ...}`, `WRAPPER_KEYS`) and/or
        with DataParallel's `module.` prefix (`state_dict_of`).

    Returns:
      `{"params": ..., "batch_stats": ...}` (the collections the module has), in `param_dtype`,
      ready for `module.apply`.

    Raises:
      ValueError: one error that lists every missing, unexpected and misshaped key (the first
        20 of each kind, then a count), and says when the state dict looks like another
        architecture's.
      TypeError: if the module type has no converter, or `state_dict` is not a mapping.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError("state_dict must be a mapping of parameter names to tensors (a torch "
                        f"state_dict()), got {type(state_dict).__name__}")
    converter = _converter_for(module)
    arrays = {k: _to_numpy(v) for k, v in state_dict_of(state_dict).items()}
    rules = _resolve_aliases(converter.rules(module), arrays)
    name = type(module).__name__
    problems = _key_problems(name, rules, arrays)
    try:
        expected = _expected_shapes(converter, module, rules, arrays)
    except (KeyError, ValueError) as error:  # sizes unreadable from an incomplete state dict
        if not problems:
            raise
        if isinstance(error, ValueError):
            problems.append(str(error).removeprefix("state_dict has "))
        raise ValueError(f"state_dict does not fit {name}: {', '.join(problems)}") from None
    converted, misshaped = _convert(rules, arrays, expected)
    if misshaped:
        problems.append(f"misshaped keys (shape after layout change): {_listing(misshaped)}")
    if problems:
        raise ValueError(f"state_dict does not fit {name}: {', '.join(problems)}")
    return traverse_util.unflatten_dict(converted)
