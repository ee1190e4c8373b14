"""Benchmarks of ECA and CECA against their PyTorch references (timm's `EcaModule`,
`CecaModule`).

Both with timm's defaults (adaptive kernel: K = 5 at C = 256) on x `[32, 56, 56, 256]`, forward
and forward+backward (gradients w.r.t. x and every parameter). `module_steps` is shared by the
other channel attentions' benchmarks (`effective_se`, `gather_excite`).
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

SHAPE = (32, 56, 56, 256)


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def jax_module_steps(family: str, name: str, **fields):
    """The steps of `flax_attention.<family>.<name>(**fields)` on x, BatchNorm (if any) in
    inference mode."""
    import jax
    import jax.numpy as jnp

    module = getattr(importlib.import_module(f"flax_attention.{family}"), name)(**fields)
    x = jnp.asarray(_x())
    variables = dict(module.init(jax.random.key(0), x))
    params = variables.pop("params")
    return jax_steps(lambda p, x: module.apply({"params": p, **variables}, x), params, x)


def torch_module_steps(family: str, name: str, **kwargs):
    """The steps of `tests.reference.<family>.<name>(C, **kwargs)` in eval mode on x."""
    import torch

    reference = getattr(importlib.import_module(f"tests.reference.{family}"), name)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(reference(SHAPE[-1], **kwargs).eval(), x)


def module_case(label: str, family: str, name: str, fields: dict | None = None,
                kwargs: dict | None = None) -> Case:
    """A case timing the module `name` of `family` against its torch reference."""
    return Case(f"{label} 32x56x56x256",
                functools.partial(jax_module_steps, family, name, **(fields or {})),
                functools.partial(torch_module_steps, family, name, **(kwargs or {})), goal=1.0)


CASES = [module_case("eca", "eca", "EcaModule"), module_case("ceca", "eca", "CecaModule")]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.eca", __doc__)
