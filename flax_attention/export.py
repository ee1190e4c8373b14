"""Models as StableHLO files: `jax.export` of the jitted inference function.

    flax-attention export --model se_resnet18 --input-shape 1,32,32,3 --out se18.jax
    flax-attention export --model stn-cnn --weights runs/stn --input-shape 8,42,42,1 --out stn.jax
    flax-attention export --model detr_resnet50 --weights weights/detr --input-shape 1,800,800,3 \
        --out detr.jax                      # weights/detr: `flax-attention convert --out`

and, in any process with only `jax` installed (no flax, no flax_attention):

    exported = jax.export.deserialize(bytearray(open("se18.jax", "rb").read()))
    logits = exported.call(images)  # images [B, H, W, C], any B when the batch is polymorphic

The parameters are baked in as constants: the file is the whole model, one function of the
images, so a consumer needs neither the parameter tree's structure nor flax to rebuild it (as
an ONNX file holds its initialisers). The price is a file as large as the weights and one file
per set of weights; `export_model(..., params_as_args=True)` keeps them out (the function is
then `f(variables, images)`, the variables as `flax.linen` holds them).

The batch is symbolic (`b`) where the model allows it, as every model does on its default
(XLA) paths; one whose trace needs a concrete batch (Pallas kernels: Triton has no dynamic grid
bounds) is exported at the batch of `--input-shape` (`Export.polymorphic`, `Export.note`).
Height, width and channels are fixed.

Kernels: the export uses what each module's `implementation` picks when traced. Every model's
default (None) is XLA, which lowers for every platform, so the file runs on CPU, CUDA and TPU.
A module built with `implementation="pallas"` exports its Triton kernels for `platforms=
("cuda",)` only, when traced where the kernels compile (a GPU: elsewhere the Pallas
interpreter is traced, which is plain XLA); Triton calls are outside `jax.export`'s
compatibility guarantees, so such a file runs only with the jaxlib that wrote it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import export

from flax_attention._checks import check_choice
from flax_attention.train.supervised import call_kwargs, load_config, restore_run

__all__ = ["DTYPES", "TRITON_CALL", "Export", "build_model", "export_model", "export_to_file",
           "load_model", "parse_shape"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call of a Pallas GPU kernel


@dataclasses.dataclass(frozen=True)
class Export:
    """An exported model.

    Attributes:
      exported: the `jax.export.Exported` (`.serialize()` is the file's bytes).
      polymorphic: whether the batch dimension is symbolic.
      note: why it is not, or "".
    """

    exported: export.Exported
    polymorphic: bool
    note: str = ""


def parse_shape(text: str) -> tuple[int, ...]:
    """"B,H,W,C" -> `(B, H, W, C)`, four positive integers.

    Raises:
      ValueError: naming `--input-shape` and the text.
    """
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--input-shape must be four positive integers B,H,W,C, got {text!r}")
    return shape


def build_model(name: str, input_shape: Sequence[int], num_classes: int | None = None,
                **overrides: Any) -> nn.Module:
    """The model `name`: a small classifier of `models.classifiers` (10 classes unless
    `num_classes`) or any model of `models.registry` (its default classes unless given), for
    images of `input_shape` `(H, W, C)`; `overrides` are other fields (`dtype=`)."""
    from flax_attention.models import registry
    from flax_attention.models.classifiers import create_classifier

    if name in registry.list_models():
        return registry.create(name, num_classes, **overrides)
    return create_classifier(name, num_classes or 10, input_shape, **overrides)


def export_model(model: nn.Module, variables: dict, input_shape: Sequence[int],
                 dtype: Any = jnp.float32, platforms: Sequence[str] | None = None,
                 params_as_args: bool = False) -> Export:
    """Exports `model`'s inference on images of `input_shape` `[B, H, W, C]` and `dtype`.

    Args:
      model: a Flax module whose `__call__` takes the images (and `train`/`deterministic`).
      variables: its variables (`{"params", "batch_stats"}`).
      input_shape: `(B, H, W, C)`; B is the example batch when the batch is symbolic.
      dtype: of the images.
      platforms: what the file runs on ("cpu", "cuda", "rocm", "tpu"); default the current
        backend. Triton calls are allowed only when "cuda" is the one platform.
      params_as_args: the function takes the variables first instead of holding them.

    Returns:
      The `Export`, with a symbolic batch unless the model's trace needs a concrete one.
    """
    apply = functools.partial(model.apply, **call_kwargs(model, False))  # inference mode
    fn = apply if params_as_args else functools.partial(apply, variables)
    platforms = tuple(platforms) if platforms else None
    checks = ([export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
              if platforms == ("cuda",) else [])
    exporter = export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)
    args = ([jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)]
            if params_as_args else [])
    batch, *rest = input_shape
    symbolic = jax.ShapeDtypeStruct((*export.symbolic_shape("b"), *rest), dtype)
    try:
        return Export(exporter(*args, symbolic), polymorphic=True)
    except (jax.errors.InconclusiveDimensionOperation, NotImplementedError, TypeError,
            ValueError) as error:
        note = f"batch fixed at {batch}: {' '.join(str(error).split())[:200]}"
        return Export(exporter(*args, jax.ShapeDtypeStruct(tuple(input_shape), dtype)),
                      polymorphic=False, note=note)


def load_model(name: str, weights: str | Path, input_shape: Sequence[int],
               num_classes: int | None = None, **overrides: Any) -> tuple[nn.Module, dict]:
    """The model `name` and its variables from `weights`: a weights directory (`flax-attention
    convert --out`) or a training run (`train --out`, its latest checkpoint).

    Raises:
      ValueError: the directory holds another model, or is neither kind.
    """
    from flax_attention.convert import is_weights_directory, load_weights

    if is_weights_directory(weights):
        _, classes, variables = load_weights(weights, name, num_classes)
        return build_model(name, input_shape, classes, **overrides), variables
    run_model = load_config(weights).model
    if run_model != name:
        raise ValueError(f"{weights} is a run of {run_model!r}, not of {name!r}")
    model, variables, _, _ = restore_run(weights)
    return model.clone(**overrides), variables


def export_to_file(name: str, input_shape: Sequence[int], out: str | Path,
                   weights: str | Path | None = None, dtype: str = "float32",
                   num_classes: int | None = None, seed: int = 0) -> Export:
    """`flax-attention export`: the model `name` with the weights in the directory `weights`
    (`load_model`) or freshly initialised ones (`seed`), exported with `export_model` and
    written to `out`.

    Raises:
      ValueError: a bad name, dtype or shape, weights of another model, a model that does not
        take such images.
    """
    check_choice("dtype", dtype, tuple(DTYPES))
    if weights is not None:
        model, variables = load_model(name, weights, input_shape[1:], num_classes,
                                      dtype=DTYPES[dtype])
    else:
        model = build_model(name, input_shape[1:], num_classes, dtype=DTYPES[dtype])
        example = jnp.zeros((1, *input_shape[1:]), DTYPES[dtype])
        init = functools.partial(model.init, **call_kwargs(model, False))
        variables = jax.jit(init)(jax.random.key(seed), example)
    result = export_model(model, variables, input_shape, DTYPES[dtype])
    Path(out).write_bytes(result.exported.serialize())
    return result
