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
def test_row_applies_with_its_torch_references_weights(name):
    row = ROWS[name]
    module, inputs = row.build(), _inputs(row)
    variables = _imported(row)
    init_shapes = jax.tree.map(jnp.shape, module.init(jax.random.key(0), *inputs,
                                                      **row.call_kwargs))
    assert jax.tree.map(jnp.shape, variables) == init_shapes
    out = module.apply(variables, *inputs, **row.call_kwargs)
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(jnp.isfinite(leaf))), name


@pytest.mark.parametrize("name", ROWS)
def test_row_runs_in_demo(name):
    first, count, ms = demo_row(ROWS[name], jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(first))) and count > 0 and ms >= 0


@pytest.mark.parametrize("name", ROWS)
def test_row_is_drawn_by_visualize(name):
    row = ROWS[name]
    inputs = _inputs(row)
    _, records = read_attention(row.build(), _imported(row), *inputs, **row.call_kwargs)
    assert records, f"{name} sows no attention map to draw"
    images = (np.asarray(inputs[0]).mean(-1, keepdims=True) if inputs[0].ndim == 4
              else np.zeros((2, 8, 8, 1)))  # grey images of the input's size
    labels = np.arange(len(images)) % 2
    for record in records:
        figure = draw(record, images, labels, ["a", "b"], ["zero", "one"])
        assert figure.axes


@pytest.mark.parametrize("name", ROWS)
def test_row_names_benchmarks_and_kernels_that_exist(name):
    row = ROWS[name]
    for module in row.benchmarks:
        assert importlib.import_module(module).CASES
    for kernel in row.kernels:
        importlib.import_module(f"flax_attention.kernels.{kernel}")


@pytest.mark.parametrize("name", [m.name for m in mechanisms.MECHANISMS if m.classifier])
def test_row_placed_in_a_classifier_trains_from_its_name(name):
    row = ROWS[name]
    classifier = f"{row.short}-cnn"
    assert classifier in list_classifiers()
    model = create_classifier(classifier, 10, (16, 16, 1))
    x = jnp.ones((2, 16, 16, 1))
    variables = model.init(jax.random.key(0), x)
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10)


def test_get_names_the_known_mechanisms_on_a_typo():
    assert mechanisms.get("cca").name == "CrissCrossAttention"
    with pytest.raises(ValueError, match="unknown mechanism 'CrissCros'.*CrissCrossAttention"):
        mechanisms.get("CrissCros")


def test_every_row_is_exported_from_the_package():
    import flax_attention

    for row in mechanisms.MECHANISMS:
        assert getattr(flax_attention, row.name) is row.module_type, row.name
