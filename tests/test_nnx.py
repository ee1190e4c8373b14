"""`flax_attention.nnx`: every mechanism of the table as an NNX module gives the Linen module's
outputs for the same imported torch weights; the NNX transforms (`nnx.jit`, `nnx.grad`,
`nnx.vmap`, `nnx.Optimizer`, `nnx.capture`) work on them (tests/test_readme.py runs the
README's NNX training lines)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_attention import SELayer, TransformerEncoderLayer, mechanisms
from flax_attention import nnx as fa_nnx
from flax_attention.interop.torch import from_torch
from tests.helpers import assert_close, randomize_, state_dict
from tests.test_mechanisms import torch_reference

ROWS = {m.name: m for m in mechanisms.MECHANISMS}
# The default suite checks these rows (gates, BatchNorm, three inputs, a kernel); -m slow all.
DEFAULT_ROWS = ("SELayer", "CbamModule", "MultiHeadAttention", "CrissCrossAttention")


def _inputs(row: mechanisms.Mechanism) -> list[jax.Array]:
    key = jax.random.key(1)
    return [jax.random.uniform(jax.random.fold_in(key, i), s) for i, s in
            enumerate(row.demo_shapes)]


def _abstract(name: str) -> fa_nnx.Bridged:
    """The row's NNX module without arrays (the NNX way to load weights; its random streams
    are abstract too, so no NNX transform takes it)."""
    row = ROWS[name]
    return nnx.eval_shape(lambda: fa_nnx.create_mechanism(
        name, row.demo_shapes[0][-1], rngs=nnx.Rngs(0)))


def _loaded(name: str, abstract: bool = True) -> tuple[fa_nnx.Bridged, dict]:
    """The row's NNX module holding random torch weights, and the Linen variables of them
    (abstract: no initialiser runs; they cost a compilation a parameter shape)."""
    row = ROWS[name]
    weights = state_dict(randomize_(torch_reference(row), scale=0.2))
    model = _abstract(name) if abstract else fa_nnx.create_mechanism(
        name, row.demo_shapes[0][-1], rngs=nnx.Rngs(0))
    return fa_nnx.from_torch(model, weights), from_torch(row.build(), weights)


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_ROWS else pytest.param(name, marks=pytest.mark.slow)
    for name in ROWS])
def test_nnx_module_equals_linen_module_on_imported_torch_weights(name):
    row = ROWS[name]
    model, variables = _loaded(name)
    inputs = _inputs(row)

    out = model(*inputs, **row.call_kwargs)

    expected = row.build().apply(variables, *inputs, **row.call_kwargs)
    jax.tree.map(np.testing.assert_array_equal, out, expected)
    assert jax.tree.map(jnp.shape, fa_nnx.linen_variables(model)) == jax.tree.map(
        jnp.shape, variables)
    assert len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == len(
        jax.tree.leaves(variables.get("batch_stats", {})))


def test_sown_maps_are_captured_the_nnx_way():
    """`nnx.capture(model, nnx.Intermediate)` returns what Linen sows, under its names."""
    row = ROWS["CbamModule"]
    model, _ = _loaded("CbamModule")
    (x,) = _inputs(row)

    out, maps = nnx.capture(model, nnx.Intermediate)(x)

    _, linen = row.build().apply(fa_nnx.linen_variables(model), x, mutable=["intermediates"])
    flat = {"/".join(k.key for k in path[:-1]): v for path, v in
            jax.tree_util.tree_flatten_with_path(linen["intermediates"])[0]}
    assert set(flat) == set(maps) and "attention" in flat
    for name, value in flat.items():
        assert_close(maps[name].get_value()[0], value)
    assert not list(nnx.state(model, nnx.Intermediate))  # nothing is left on the module


def test_jit_grad_and_optimizer_step_equal_linen():
    """A training step of CBAM (BatchNorm in train mode): `nnx.value_and_grad` gives Linen's
    gradients, the batch statistics update, and `nnx.Optimizer` applies the SGD update."""
    row = ROWS["CbamModule"]
    model, variables = _loaded("CbamModule", abstract=False)
    (x,) = _inputs(row)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: (m(x, train=True) ** 2).mean())(model)
        optimizer.update(model, grads)
        return loss, grads

    loss, grads = step(model, optimizer, x)

    def linen_loss(params):
        y, state = row.build().apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
        return (y ** 2).mean(), state

    (expected, state), expected_grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(
        variables["params"])
    assert_close(loss, expected)
    # The spatial gate's conv kernel gradient passes a train-mode BatchNorm, whose backward
    # subtracts near-equal means: float32 summation order alone moves it by ~1e-5 of its largest
    # entry between the NNX step and the Linen one (two programs).
    jax.tree.map(functools.partial(assert_close, rtol=1e-4), nnx.to_pure_dict(grads),
                 expected_grads)
    after = fa_nnx.linen_variables(model)
    jax.tree.map(assert_close, after["batch_stats"], state["batch_stats"])
    jax.tree.map(lambda new, old, g: assert_close(new, old - 0.1 * g), after["params"],
                 variables["params"], expected_grads)


def test_vmap_over_a_stack_of_batches():
    model, _ = _loaded("SELayer")
    (x,) = _inputs(ROWS["SELayer"])

    out = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(model, jnp.stack([x, -2 * x]))

    assert_close(out, jnp.stack([model(x), model(-2 * x)]))


def test_any_module_of_the_library_bridges():
    """A DETR encoder layer (no table row) as an NNX module, filled with random parameters."""
    layer = TransformerEncoderLayer(nhead=2, dim_feedforward=32)
    src = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = nnx.eval_shape(lambda: fa_nnx.Bridged(layer, src, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.3,
                                   nnx.state(model, nnx.Param)))

    assert_close(model(src), layer.apply(fa_nnx.linen_variables(model), src))


@pytest.mark.slow
def test_dropout_keys_come_from_the_rngs_streams():
    """Stochastic calls draw a new "dropout" key each call from the streams given."""
    layer = TransformerEncoderLayer(nhead=2, dim_feedforward=32, dropout=0.5)
    src = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = fa_nnx.Bridged(layer, src, rngs=nnx.Rngs(0, dropout=1))

    first, second = model(src, deterministic=False), model(src, deterministic=False)

    assert not np.allclose(first, second)
    assert_close(model(src), layer.apply(fa_nnx.linen_variables(model), src))


def test_from_torch_keeps_the_linen_error_messages():
    model = _abstract("SELayer")
    weights = state_dict(randomize_(torch_reference(ROWS["SELayer"])))
    del weights["fc.2.weight"]
    with pytest.raises(ValueError, match="missing.*fc.2.weight"):
        fa_nnx.from_torch(model, weights)
    with pytest.raises(TypeError, match="Bridged module, got SELayer"):
        fa_nnx.from_torch(SELayer(), weights)
