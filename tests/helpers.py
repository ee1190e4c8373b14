"""Shared test utilities: layout changes, random torch weights, scale-aware comparison."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch

from flax_attention.interop.torch import from_torch


def nhwc_to_torch(x) -> torch.Tensor:
    """`[B, *S, C]` (numpy or jax) -> torch `[B, C, *S]` float tensor."""
    a = np.asarray(x, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def torch_to_nhwc(t: torch.Tensor) -> np.ndarray:
    """torch `[B, C, *S]` -> numpy `[B, *S, C]`."""
    return np.moveaxis(t.detach().cpu().numpy(), 1, -1)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Fills every parameter and float buffer of `module` with random values, in place.

    Gammas and zero-initialised BatchNorms become non-zero, so a comparison cannot pass on an
    identity block; running variances stay positive.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen) * scale
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)
    return module.eval()


def random_nhwc(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_close(actual, expected, rtol: float = 1e-5) -> None:
    """All close within `rtol` times the largest magnitude of `expected` (fp32 tolerance)."""
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-6)
    chex.assert_trees_all_close(np.asarray(actual), expected, atol=rtol * scale, rtol=0)


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def tree_max_abs(tree) -> float:
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))


def train_step_losses(model, variables, x, labels, tx=None) -> tuple[float, float]:
    """The cross-entropy loss before and after one optimiser step (BatchNorm in train mode).

    Args:
      model: a Flax classifier with `__call__(x, train)` and batch statistics.
      variables: its `{"params", "batch_stats"}`.
      x: `[B, H, W, C]` inputs; labels: `[B]` integer labels.
      tx: an optax optimiser; SGD with learning rate 1e-3 by default.
    """
    import jax.numpy as jnp
    import optax

    tx = optax.sgd(1e-3) if tx is None else tx

    def loss_fn(params, stats):
        logits, state = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, state["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    params, stats, opt_state, before = step(params, stats, tx.init(params))
    after = step(params, stats, opt_state)[3]
    return float(jnp.asarray(before)), float(jnp.asarray(after))


def check_matches_torch(module, torch_module, x: np.ndarray, seed: int = 0, scale: float = 0.5,
                        **call_kwargs):
    """Loads the torch weights randomized at `scale`; compares outputs and input gradients
    (the same cotangent through `jax.vjp` and torch autograd) of a block whose output has its
    input's shape. Returns the "intermediates"."""
    variables = from_torch(module, state_dict(randomize_(torch_module, seed, scale)))

    @jax.jit
    def run(x, cotangent):
        def apply(x):
            return module.apply(variables, x, mutable=["intermediates"], **call_kwargs)

        out, vjp, state = jax.vjp(apply, x, has_aux=True)
        return out, vjp(cotangent)[0], state

    cotangent = random_nhwc(x.shape, seed + 1)
    out, grad, state = run(jnp.asarray(x), jnp.asarray(cotangent))
    x_torch = nhwc_to_torch(x).requires_grad_(True)
    out_torch = torch_module(x_torch)
    out_torch.backward(nhwc_to_torch(cotangent))
    assert_close(out, torch_to_nhwc(out_torch))
    assert_close(grad, torch_to_nhwc(x_torch.grad))
    return state["intermediates"]


def check_bfloat16_close(module, x, variables=None, rtol: float = 2e-2,
                         sown: bool = True) -> None:
    """Under bfloat16 the output of `module` on `x` (an array, or a shape to fill) is bfloat16,
    finite and within `rtol` of float32's; the sown "attention" (when `sown`) stays float32."""
    x = random_nhwc(x, seed=4) if isinstance(x, tuple) else np.asarray(x)
    if variables is None:
        variables = jax.jit(module.init)(jax.random.key(1), x)
    expected = jax.jit(module.apply)(variables, x)
    bf16 = functools.partial(module.clone(dtype=jnp.bfloat16).apply, mutable=["intermediates"])
    out, state = jax.jit(bf16)(variables, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    if sown:
        assert state["intermediates"]["attention"][0].dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(np.asarray(out, np.float32), expected, rtol=rtol)


def torch_gates(torch_module, x: np.ndarray) -> np.ndarray:
    """The `[B, C]` gates of a torch reference that has a `gates` method."""
    with torch.no_grad():
        return torch_module.gates(nhwc_to_torch(x)).numpy()
