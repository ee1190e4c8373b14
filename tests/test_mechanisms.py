"""The mechanism table, walked: every row builds, applies, loads its torch reference's weights,
runs in `demo`, is drawn by `visualize`, and names kernels and benchmarks that exist. A row
missing any of them fails here, not in a user's hands."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention import mechanisms
from flax_attention.cli import demo_row
from flax_attention.interop.torch import from_torch
from flax_attention.models.classifiers import create_classifier, list_classifiers
from flax_attention.visualize import draw, read_attention
from tests.helpers import randomize_, state_dict

ROWS = {m.name: m for m in mechanisms.MECHANISMS}


def torch_reference(row: mechanisms.Mechanism) -> torch.nn.Module:
    """The row's torch reference: `tests/reference/<file>.py`'s class, or a `torch.nn` class."""
    path, kwargs = row.torch_reference
    file, cls = path.rsplit(".", 1)
    module = torch.nn if file == "torch.nn" else importlib.import_module(f"tests.reference.{file}")
    return getattr(module, cls)(**kwargs)


def _inputs(row: mechanisms.Mechanism) -> list[jax.Array]:
    key = jax.random.key(1)
    return [jax.random.uniform(jax.random.fold_in(key, i), s) for i, s in
            enumerate(row.demo_shapes)]


def _imported(row: mechanisms.Mechanism) -> dict:
    return from_torch(row.build(), state_dict(randomize_(torch_reference(row), scale=0.2)))


@pytest.mark.parametrize("name", ROWS)
def test_row_loads_its_torch_references_weights_applies_is_drawn_and_demoed(name):
    """`from_torch` fills every variable of the row's module; the module applied (jitted, as
    `visualize` applies it) gives finite outputs and sows a map that `visualize` draws; `demo`
    runs it with those weights."""
    row = ROWS[name]
    module, inputs = row.build(), _inputs(row)
    variables = _imported(row)
    init = jax.eval_shape(module.init, jax.random.key(0), *inputs, **row.call_kwargs)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, init)
    out, records = read_attention(module, variables, *inputs, **row.call_kwargs)
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(jnp.isfinite(leaf))), name
    assert records, f"{name} sows no attention map to draw"
    images = (np.asarray(inputs[0]).mean(-1, keepdims=True) if inputs[0].ndim == 4
              else np.zeros((2, 8, 8, 1)))  # grey images of the input's size
    labels = np.arange(len(images)) % 2
    for record in records:
        assert draw(record, images, labels, ["a", "b"], ["zero", "one"]).axes
    first, count, ms = demo_row(row, jax.random.key(0), variables)
    assert bool(jnp.all(jnp.isfinite(first))) and count > 0 and ms >= 0


@pytest.mark.parametrize("name", ROWS)
def test_row_names_benchmarks_and_kernels_that_exist(name):
    row = ROWS[name]
    for module in row.benchmarks:
        assert importlib.import_module(module).CASES
    for kernel in row.kernels:
        importlib.import_module(f"flax_attention.kernels.{kernel}")


@pytest.mark.parametrize("name", [m.name for m in mechanisms.MECHANISMS if m.classifier])
def test_row_placed_in_a_classifier_is_one_by_its_short_name(name):
    """`<short>-cnn` exists and holds the row's module (traced, not computed: test_train
    trains the classifiers)."""
    row = ROWS[name]
    model = create_classifier(f"{row.short}-cnn", 10, (16, 16, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 16, 16, 1)))
    assert row.short in variables["params"]
    assert f"{row.short}-cnn" in list_classifiers()


def test_get_names_the_known_mechanisms_on_a_typo():
    assert mechanisms.get("cca").name == "CrissCrossAttention"
    with pytest.raises(ValueError, match="unknown mechanism 'CrissCros'.*CrissCrossAttention"):
        mechanisms.get("CrissCros")


def test_every_row_is_exported_from_the_package():
    import flax_attention

    for row in mechanisms.MECHANISMS:
        assert getattr(flax_attention, row.name) is row.module_type, row.name


def test_every_kernel_belongs_to_a_row():
    from pathlib import Path

    import flax_attention.kernels

    files = {p.stem for p in Path(flax_attention.kernels.__file__).parent.glob("*.py")
             if not p.stem.startswith("_")}
    assert files == {kernel for row in mechanisms.MECHANISMS for kernel in row.kernels}
