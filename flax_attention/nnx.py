"""The library's modules for Flax NNX: each Linen module behind one generic bridge.

    from flax import nnx
    from flax_attention import nnx as fa_nnx

    cbam = fa_nnx.create_mechanism("CbamModule", in_features=64, rngs=nnx.Rngs(0))
    y = cbam(x)                                  # x [B, H, W, 64]; BatchNorm in eval mode
    y = cbam(x, train=True)                      # updates its nnx.BatchStat state
    y, maps = nnx.capture(cbam, nnx.Intermediate)(x)   # maps["attention"]: the sown map
    net = fa_nnx.create_model("se_resnet18", (224, 224, 3), num_classes=10, rngs=nnx.Rngs(0))
    fa_nnx.from_torch(cbam, torch_state_dict)    # the Linen converters fill the NNX state

`Bridged(linen_module, *example_inputs, rngs=...)` makes any module of the library an
`nnx.Module` (the transformer layers, `SpatialTransformer`, `RecurrentAttentionModel`, ...):
an `nnx.bridge.ToNNX` whose variables are created at construction by the jitted Linen `init`
(explicit input features, as NNX modules have them) and held as NNX variables, `nnx.Param` and
`nnx.BatchStat`; `nnx.eval_shape(lambda: ...)` builds it without arrays, to fill with
`from_torch`. It works with `nnx.jit`, `nnx.grad`, `nnx.vmap`, `nnx.Optimizer`.

Why a bridge and not native `nnx.Module` classes: the math exists once either way (the pure
functions of `flax_attention.functional`), but native classes would restate the structure of
every module (its layers, their names, the paths the torch converters fill) a second time, for
every block and network of the library. Measured (a shared 2-core CPU, so only the ratios
mean something), the bridge costs what the Linen module costs: an `nnx.jit` call runs the
Linen module's XLA program, plus NNX's per-call graph handling (about a millisecond, as for a
native module); construction is the Linen `init`, jitted: one compilation instead of one a
parameter shape (eager random initialisers), several times faster than `ToNNX.lazy_init`.

Differences from a native NNX module: the call takes the Linen module's arguments (`train=`,
`deterministic=`); dropout and sampling keys come from the `rngs` given at construction (one
key of each stream per call); sown maps reach NNX through `nnx.capture(..., nnx.Intermediate)`
under the Linen name, joined with "/" for a submodule's ("spatial/attention").
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from flax_attention import mechanisms
from flax_attention.interop import torch as interop_torch

__all__ = ["Bridged", "create_mechanism", "create_model", "from_torch", "linen_variables"]

ArrayLike = jax.Array | jax.ShapeDtypeStruct


class Bridged(nnx.bridge.ToNNX):
    """A Linen module as an NNX module, its variables created at construction.

    Args:
      module: the (unbound) Linen module.
      *example_inputs: the arrays (or `jax.ShapeDtypeStruct`s) of one call, fixing the input
        features; the values are not used.
      rngs: `nnx.Rngs`; its "params" (or default) stream initialises, and every other stream
        gives one key per call (name them as the module does: "dropout", "sample").
      **call_kwargs: keyword arguments of the initialising call (e.g. `train=False`).
    """

    def __init__(self, module: nn.Module, *example_inputs: ArrayLike, rngs: nnx.Rngs,
                 **call_kwargs: Any):
        super().__init__(module, rngs)
        zeros = [jnp.zeros(x.shape, x.dtype) for x in example_inputs]
        init = jax.jit(functools.partial(module.init, **call_kwargs))
        self._set_variables(init({"params": rngs.params()}, *zeros))

    def _set_variables(self, variables: Mapping[str, Any]) -> None:
        """Sets the NNX state from Linen `variables` (`{"params", "batch_stats"}`)."""
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(variables).items():
            setattr(self, name, nnx.data(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The Linen module's `__call__` on the NNX state: BatchNorm statistics update when
        `train=True`; sown values go to an enclosing `nnx.capture(..., nnx.Intermediate)`."""
        mutable = (["batch_stats"] * bool(kwargs.get("train"))
                   + ["intermediates"] * hasattr(self, "__captures__"))
        rngs = {name: stream() for name, stream in self.to_nnx__rngs.items()
                if name not in ("params", "default")}
        out = self.to_nnx__module.apply(linen_variables(self), *args, rngs=rngs,
                                        mutable=mutable or False, **kwargs)
        if not mutable:
            return out
        out, updates = out
        stats = bridge_variables.linen_vars_to_nnx_attrs(
            {"batch_stats": updates.get("batch_stats", {})})
        nnx.update(self, nnx.State(stats))
        flat = jax.tree_util.tree_flatten_with_path(updates.get("intermediates", {}))[0]
        for path, value in flat:  # path: the module names, the sown name, the tuple index
            self.sow(nnx.Intermediate, "/".join(key.key for key in path[:-1]), value)
        return out


def linen_variables(model: Bridged) -> dict:
    """The Linen variables (`{"params", "batch_stats"}`) of a bridged module's state."""
    attrs = {k: v for k, v in vars(model).items()
             if not k.startswith(("to_nnx__", "_pytree__", "__"))}  # __captures__
    return bridge_variables.nnx_attrs_to_linen_vars(attrs)


def from_torch(model: Bridged, state_dict: Mapping[str, Any]) -> Bridged:
    """Fills `model`'s state from a PyTorch `state_dict` with the Linen module's converter
    (`interop.torch.from_torch`: the same names, checks and error messages); returns `model`.

    Raises:
      TypeError: `model` is not a `Bridged` module.
      ValueError: unknown, missing or misshaped keys, as `interop.torch.from_torch`.
    """
    if not isinstance(model, Bridged):
        raise TypeError(f"model must be a flax_attention.nnx.Bridged module, got "
                        f"{type(model).__name__}")
    model._set_variables(interop_torch.from_torch(model.to_nnx__module, state_dict))
    return model


def create_mechanism(name: str, in_features: int, *, rngs: nnx.Rngs,
                     input_shapes: Sequence[Sequence[int]] | None = None,
                     **fields: Any) -> Bridged:
    """The mechanism `name` of `flax_attention.mechanisms` as an NNX module.

    Args:
      name: a class or short name of the mechanism table ("CbamModule", "cbam").
      in_features: channels of the inputs (C of `[B, H, W, C]`, or of `[B, L, C]`): the last
        size of the row's demo inputs that have the demo's channels.
      rngs: see `Bridged`.
      input_shapes: the shapes of one call's inputs without the batch, instead of the row's
        demo shapes; only modules whose parameters depend on more than the channels need
        them (the STN's localisation network on other than 28 x 28 images).
      **fields: fields of the module, replacing the table's demo fields.
    """
    row = mechanisms.get(name)
    channels = row.demo_shapes[0][-1]
    if input_shapes is None:
        input_shapes = [(*s[1:-1], in_features if s[-1] == channels else s[-1])
                        for s in row.demo_shapes]
    inputs = [jax.ShapeDtypeStruct((1, *s), jnp.float32) for s in input_shapes]
    return Bridged(row.build(**fields), *inputs, rngs=rngs, **row.call_kwargs)


def create_model(name: str, input_shape: Sequence[int], *, rngs: nnx.Rngs,
                 num_classes: int | None = None, **overrides: Any) -> Bridged:
    """A model of `models.registry` or `models.classifiers` as an NNX module, for images of
    `input_shape` `(H, W, C)` (the equivalent of `registry.create(...)` for NNX)."""
    from flax_attention.export import build_model
    from flax_attention.train.supervised import call_kwargs

    model = build_model(name, input_shape, num_classes, **overrides)
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return Bridged(model, example, rngs=rngs, **call_kwargs(model, False))
