"""Times `linear_assignment` against `optax.assignment.hungarian_algorithm`, in one process.

Both run under `jit(vmap(...))` on a batch of DETR-like costs (`match_cost` of random boxes and
logits) with targets padded to T and a validity mask, as `detr_matcher` calls them. optax takes
no mask: padded targets get a cost above every real one, so they are matched only to queries
left over. Prints the compile time and the median run time of each, and whether their total
costs agree.

    python -m benchmarks.matcher [--batch 8] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from optax.assignment import hungarian_algorithm

from flax_attention.detr_criterion import linear_assignment, match_cost

# (queries, padded targets, valid targets per image: None for all)
CASES = ((100, 10, None), (100, 50, None), (100, 50, 10), (40, 15, None))


def optax_assignment(cost: jax.Array, col_mask: jax.Array) -> jax.Array:
    """`linear_assignment(cost, col_mask=col_mask)` by optax: `[Q]` target per query, -1 none."""
    top = jnp.max(cost, where=col_mask[None], initial=0)  # >= 0: 2 * top + 1 exceeds all
    rows, cols = hungarian_algorithm(jnp.where(col_mask[None], cost, 2 * top + 1))
    cols = jnp.where(col_mask[cols], cols, -1).astype(jnp.int32)
    return jnp.full(cost.shape[:1], -1, jnp.int32).at[rows].set(cols)


def _costs(batch: int, queries: int, targets: int, seed: int = 0) -> jax.Array:
    """`[batch, queries, targets]` `match_cost` of random predictions and targets."""
    rng = np.random.default_rng(seed)

    def boxes(*shape):
        centre = rng.uniform(0.25, 0.75, (*shape, 2))
        return np.concatenate([centre, rng.uniform(0.05, 0.45, (*shape, 2))], -1)

    logits = rng.standard_normal((batch, queries, 92)).astype(np.float32)
    labels = rng.integers(0, 91, (batch, targets))
    return jax.vmap(match_cost)(logits, boxes(batch, queries).astype(np.float32), labels,
                                boxes(batch, targets).astype(np.float32))


def _time(solve, costs, mask, reps: int) -> tuple[float, float, np.ndarray]:
    """Compile seconds, median run milliseconds and the result of `jit(vmap(solve))`."""
    fn = jax.jit(jax.vmap(lambda c, k: solve(c, col_mask=k)))
    start = time.perf_counter()
    compiled = fn.lower(costs, mask).compile()
    compile_s = time.perf_counter() - start
    out = compiled(costs, mask).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        compiled(costs, mask).block_until_ready()
        times.append(time.perf_counter() - start)
    return compile_s, 1e3 * statistics.median(times), np.asarray(out)


def _total(costs: np.ndarray, col_of_row: np.ndarray) -> np.ndarray:
    rows = col_of_row >= 0
    picked = np.take_along_axis(costs, np.maximum(col_of_row, 0)[..., None], -1)[..., 0]
    return np.where(rows, picked, 0).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    solvers = {"ours": linear_assignment, "optax": optax_assignment}
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}; compile s / median run ms")
    print(f"{'Q x T (valid)':>16} | {'ours':>15} | {'optax':>15} | same total")
    for queries, targets, valid in CASES:
        costs = _costs(args.batch, queries, targets)
        mask = jnp.arange(targets)[None] < (targets if valid is None else valid)
        mask = jnp.broadcast_to(mask, (args.batch, targets))
        results = {name: _time(solve, costs, mask, args.reps) for name, solve in solvers.items()}
        totals = [_total(np.asarray(costs), out) for *_, out in results.values()]
        cells = [f"{c:6.2f} / {r:6.2f}" for c, r, _ in results.values()]
        label = f"{queries} x {targets} ({valid or targets})"
        print(f"{label:>16} | {cells[0]:>15} | {cells[1]:>15} | "
              f"{np.allclose(*totals, rtol=1e-5, atol=1e-4)}")


if __name__ == "__main__":
    main()
