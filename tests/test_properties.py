"""Property tests (hypothesis) of the public functions of `flax_attention.functional`: over
shapes and dtypes, a call returns finite output for finite input, or raises a ValueError or
TypeError whose message names one of the function's arguments; never an internal error
(an IndexError, ZeroDivisionError, XLA's errors, ...).

Every function is called with arguments drawn from its signature: an array of a small shape
(often one shared shape, so that calls get past the checks) and dtype for each array argument,
small integers and pairs for the sizes. Few examples a function by default; `-m slow` runs many.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flax_attention import functional as F

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32)
# Arguments that take something other than arrays and sizes: the function is left out.
_OTHER = ("Any", "SpatialShapes", "spatial_shapes", "Callable")


def _kind(parameter: inspect.Parameter) -> str | None:
    """How to draw a required argument: "array", "int", "pair", "fn"; None: leave it out."""
    annotation = str(parameter.annotation)
    if parameter.name in _OTHER or any(t in annotation for t in _OTHER):
        return None
    if "Array" in annotation:
        return "array"
    if "ArrayFn" in annotation:
        return "fn"
    if "tuple[int, int]" in annotation or annotation == "Pair":
        return "pair"
    if annotation in ("int", "float"):
        return "int"
    return None


def _functions() -> list[str]:
    """The public functions whose required arguments can all be drawn."""
    names = []
    for name in F.__all__:
        fn = getattr(F, name)
        if not inspect.isfunction(fn) and not hasattr(fn, "__wrapped__"):
            continue
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if required and all(_kind(p) is not None for p in required):
            names.append(name)
    return names


FUNCTIONS = _functions()
_DIM = st.integers(1, 3) | st.just(0)


@st.composite
def _arguments(draw, name: str) -> list:
    fn = getattr(F, name)
    required = [p for p in inspect.signature(fn).parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    shared = tuple(draw(st.lists(_DIM, min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    arguments = []
    for i, parameter in enumerate(required):
        kind = _kind(parameter)
        if kind == "array":
            shape = shared if draw(st.booleans()) or i == 0 else tuple(
                draw(st.lists(_DIM, min_size=1, max_size=4)))
            values = np.random.default_rng(i).normal(size=shape) * 2
            arguments.append(jnp.asarray(values).astype(dtype))
        elif kind == "int":
            arguments.append(draw(st.integers(-1, 4)))
        elif kind == "pair":
            arguments.append((draw(st.integers(0, 4)), draw(st.integers(0, 4))))
        else:
            arguments.append(lambda x: x)
    return arguments


def _check_call(name: str, arguments: list) -> None:
    fn = getattr(F, name)
    try:
        out = fn(*arguments)
    except (ValueError, TypeError) as error:
        names = inspect.signature(fn).parameters
        message = str(error)
        assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in names), (
            f"{name}: {type(error).__name__} names no argument: {message}")
        return
    for leaf in jax.tree.leaves(out):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: not finite for finite input"


def _property(name: str, examples: int):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        _check_call(name, data.draw(_arguments(name)))

    return check


# The functions fuzzed by default (a few examples each); every one with -m slow.
_DEFAULT = ("position_attention", "channel_attention", "criss_cross_attention",
            "squeeze_excitation", "sine_position_embedding", "dot_product_attention")


def test_the_fuzzed_functions_cover_the_core():
    assert set(_DEFAULT) <= set(FUNCTIONS)
    assert len(FUNCTIONS) >= 30


@pytest.mark.parametrize("name", _DEFAULT)
def test_finite_or_a_named_error(name):
    _property(name, examples=4)()


# What the fuzzing found, for the owners of these functions to fix (then drop the entry).
KNOWN_FAILURES: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True))
    if n in KNOWN_FAILURES else n for n in FUNCTIONS])
def test_finite_or_a_named_error_many(name):
    _property(name, examples=25)()
