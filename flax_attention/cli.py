"""The `flax-attention` command.

`flax-attention demo` builds every mechanism of the library, jit-compiles it on a small random
input and prints the output shape, the parameter count and the time of a compiled call.
`flax-attention list` prints the mechanisms.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _mechanisms() -> dict[str, tuple[Callable[[], nn.Module], tuple[tuple[int, ...], ...]]]:
    """name -> (module factory, input shapes)."""
    import flax_attention as fa

    feature_map = (2, 24, 32, 64)
    return {
        "SELayer": (lambda: fa.SELayer(reduction=16), (feature_map,)),
        "SEBottleneck": (lambda: fa.SEBottleneck(planes=16), (feature_map,)),
        "NonLocal2D (embedded)": (lambda: fa.NonLocal2D(mode="embedded"), (feature_map,)),
        "NonLocal2D (concatenate)": (lambda: fa.NonLocal2D(mode="concatenate"), (feature_map,)),
        "PositionAttention": (lambda: fa.PositionAttention(), (feature_map,)),
        "ChannelAttention": (lambda: fa.ChannelAttention(), (feature_map,)),
        "DANetHead": (lambda: fa.DANetHead(out_channels=19), (feature_map,)),
        "CrissCrossAttention": (lambda: fa.CrissCrossAttention(), (feature_map,)),
        "RCCAModule": (lambda: fa.RCCAModule(out_channels=64, num_classes=19), (feature_map,)),
        "SpatialTransformer": (
            lambda: fa.SpatialTransformer(fa.LocalizationNet(), out_hw=(28, 28)),
            ((2, 28, 28, 1),),
        ),
        "MultiHeadAttention": (
            lambda: fa.MultiHeadAttention(num_heads=8),
            ((2, 100, 256), (2, 300, 256), (2, 300, 256)),
        ),
    }


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def demo(args: argparse.Namespace) -> int:
    key = jax.random.key(args.seed)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'mechanism':<26} {'input':<22} {'output':<20} {'params':>9} {'ms/call':>9}")
    for name, (make, shapes) in _mechanisms().items():
        module = make()
        inputs = [jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]
        variables = module.init(key, *inputs)
        apply = jax.jit(module.apply)
        out = jax.block_until_ready(apply(variables, *inputs))  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(apply(variables, *inputs))
        ms = (time.perf_counter() - start) * 1e3
        first = jax.tree.leaves(out)[0]
        flag = "" if bool(jnp.all(jnp.isfinite(first))) else "  NOT FINITE"
        print(
            f"{name:<26} {str(shapes[0]):<22} {str(tuple(first.shape)):<20} "
            f"{_count(variables.get('params', {})):>9,} {ms:>9.2f}{flag}"
        )
    return 0


def list_mechanisms(args: argparse.Namespace) -> int:
    for name in _mechanisms():
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flax-attention", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="jit every mechanism on a small input")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    sub.add_parser("list", help="list the mechanisms").set_defaults(func=list_mechanisms)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
