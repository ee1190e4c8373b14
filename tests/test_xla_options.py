"""The library's XLA compiler options: accepted by the installed XLA on the CPU, none elsewhere
or where XLA refuses them, and the same values with them as without."""

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention import xla_options
from flax_attention.selective_kernel import SelectiveKernel


def test_cpu_options_are_accepted_and_fresh_each_call():
    options = xla_options.compiler_options("cpu")
    assert options == xla_options.CPU_OPTIONS
    options["changed"] = "x"
    assert "changed" not in xla_options.compiler_options()


def test_no_options_off_the_cpu_or_where_xla_refuses_them(monkeypatch):
    assert xla_options.compiler_options("gpu") == {}
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
    xla_options._accepted.cache_clear()
    try:
        assert xla_options.compiler_options("cpu") == {}
    finally:
        xla_options._accepted.cache_clear()


def test_values_and_gradients_equal_those_of_xla_defaults():
    """Selective Kernel (convolutions, products, reductions) forward and gradients."""
    module = SelectiveKernel()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 8)), jnp.float32)
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        out = module.apply({**variables, "params": params}, x)
        return jnp.sum(out * jnp.cos(out))

    step = jax.value_and_grad(loss, argnums=(0, 1))
    ours = jax.jit(step, compiler_options=xla_options.compiler_options())(variables["params"], x)
    default = jax.jit(step)(variables["params"], x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(default), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
