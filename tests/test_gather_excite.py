"""Gather-excite: functional ops and module against the PyTorch reference (timm's names)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.functional import gather_excite as F
from flax_attention.gather_excite import GatherExcite
from flax_attention.interop.torch import from_torch
from flax_attention.resnet_blocks import BasicBlock
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    check_matches_torch,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import gather_excite as ref

# --- hand-checkable values ------------------------------------------------------------------------


def test_nearest_indices_are_torchs():
    for n_in in range(1, 17):
        source = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1)
        for n_out in range(n_in, 61):
            expected = torch.nn.functional.interpolate(source, size=(n_out, 1)).flatten()
            np.testing.assert_array_equal(F.nearest_indices(n_in, n_out), expected.numpy(),
                                          err_msg=f"{n_in} -> {n_out}")


def test_uniform_image_gives_uniform_gates():
    # Windows cut by the border average only real pixels (count_include_pad=False), so a
    # constant image gathers to the constant everywhere, and every gate is sigmoid(2).
    x = jnp.full((1, 7, 5, 3), 2.0)
    for extent in (0, 2, 4, 8):
        gates = F.gather_excite_gates(x, extent=extent)
        np.testing.assert_allclose(gates, np.full(gates.shape, jax.nn.sigmoid(2.0)), rtol=1e-6)
        np.testing.assert_allclose(F.gather_excite(x, extent=extent), 2 * jax.nn.sigmoid(2.0),
                                   rtol=1e-6)
    assert F.gather(x, 4).shape == (1, 2, 2, 3)  # ceil(7 / 4), ceil(5 / 4)


def test_zero_mlp_gives_gates_of_one_half_and_pooling_by_hand():
    x = jnp.asarray(random_nhwc((2, 6, 6, 4)))
    zeros = (jnp.zeros((4, 2)), jnp.zeros(2), jnp.zeros((2, 4)), jnp.zeros(4))
    np.testing.assert_array_equal(F.gather_excite(x, *zeros, extent=2), 0.5 * np.asarray(x))
    # extent 2: 3x3 windows every 2 pixels, padding 1; the top-left window covers x[:2, :2].
    gathered = F.gather(x, 2, add_maxpool=True)
    corner = np.asarray(x)[:, :2, :2]
    np.testing.assert_allclose(gathered[:, 0, 0], 0.5 * corner.mean((1, 2))
                               + 0.5 * corner.max((1, 2)), rtol=1e-6)


# --- equivalence with the reference ---------------------------------------------------------------

CASES = [
    pytest.param({}, (2, 5, 4, 32), id="global"),
    pytest.param({"add_maxpool": True, "rd_channels": 3}, (2, 5, 4, 16), id="global-maxpool"),
    pytest.param({"extent": 2}, (2, 7, 9, 16), id="extent2"),
    pytest.param({"extent": 4, "add_maxpool": True}, (2, 9, 6, 16), id="extent4-maxpool"),
    pytest.param({"extent": 8, "use_mlp": False, "gate_layer": "hard_sigmoid"}, (1, 11, 17, 8),
                 id="extent8-nomlp"),
    pytest.param({"extra_params": True, "extent": 2}, (2, 7, 6, 16), id="params-extent2"),
    pytest.param({"extra_params": True, "extent": 8}, (2, 9, 8, 16), id="params-extent8"),
    pytest.param({"extra_params": True, "feat_size": 5}, (2, 5, 5, 16), id="params-global"),
    pytest.param({"extra_params": True, "feat_size": (4, 3), "norm_layer": False},
                 (2, 4, 3, 16), id="params-global-even-nonorm"),
]


def _torch_kwargs(fields: dict) -> dict:
    kwargs = dict(fields)
    if kwargs.get("norm_layer") is False:
        kwargs["norm_layer"] = None
    return kwargs


@pytest.mark.parametrize(("fields", "shape"), CASES)
def test_matches_torch(fields, shape):
    torch_module = ref.GatherExcite(shape[-1], **_torch_kwargs(fields))
    x = random_nhwc(shape, seed=2)
    intermediates = check_matches_torch(GatherExcite(**fields), torch_module, x, seed=3)
    with torch.no_grad():
        torch_gates = torch_to_nhwc(torch_module.gates(nhwc_to_torch(x)))
    (attention,) = intermediates["attention"]
    if torch_gates.shape[1:3] == (1, 1):
        assert attention.shape == shape[:1] + shape[-1:]
        assert_close(attention, torch_gates[:, 0, 0])
        return
    (gates,) = intermediates["gates"]
    assert_close(gates, torch_gates)
    full = torch.nn.functional.interpolate(torch.from_numpy(np.moveaxis(torch_gates, -1, 1)),
                                           size=shape[1:3])
    assert attention.shape == shape[:3] and attention.dtype == jnp.float32
    assert_close(attention, full.mean(1).numpy())


def test_in_a_resnet_block_attention_slot():
    block = BasicBlock(16, attention=functools.partial(GatherExcite, extra_params=True, extent=2))
    shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((2, 6, 6, 16)))
    assert shapes["params"]["se"]["mlp"]["fc1"]["kernel"].shape == (1, 1, 16, 1)
    assert shapes["batch_stats"]["se"]["gather"]["norm1"]["mean"].shape == (16,)


def test_training_mode_matches_torch_and_updates_statistics():
    torch_module = ref.GatherExcite(8, extra_params=True, extent=4)
    module = GatherExcite(extra_params=True, extent=4)
    variables = from_torch(module, state_dict(randomize_(torch_module, 4)))
    x = random_nhwc((3, 8, 8, 8), seed=5)
    out, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(out, torch_to_nhwc(torch_module.train()(nhwc_to_torch(x))))
    for i in (1, 2):
        assert_close(state["batch_stats"]["gather"][f"norm{i}"]["mean"],
                     getattr(torch_module.gather, f"norm{i}").running_mean.numpy())


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_jit_vmap_equal_loop():
    # Gradients are checked against torch's in test_matches_torch.
    x = jnp.asarray(random_nhwc((2, 5, 6, 4)))
    mlp = [jnp.asarray(random_nhwc(s, i)) for i, s in enumerate(((4, 2), (2,), (2, 4), (4,)))]
    fn = functools.partial(F.gather_excite, extent=4, add_maxpool=True)
    batched = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None, None)))(x[:, None], *mlp)
    np.testing.assert_allclose(batched[:, 0], jax.jit(fn)(x, *mlp), rtol=1e-6)


def test_bfloat16_is_finite_and_close():
    check_bfloat16_close(GatherExcite(extra_params=True, extent=2), (2, 6, 6, 32))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros((2, 4, 4, 8))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"extent must be 0 \(global\) or even.*got 3"):
        GatherExcite(extent=3).init(key, x)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(4, 4, 8\)"):
        GatherExcite().init(key, x[0])
    with pytest.raises(ValueError, match=r"feat_size must be given"):
        GatherExcite(extra_params=True).init(key, x)
    with pytest.raises(ValueError, match=r"y and w1 must agree in channels"):
        F.gather_excite(x, jnp.zeros((6, 2)), jnp.zeros(2), jnp.zeros((2, 8)), jnp.zeros(8))
    with pytest.raises(ValueError, match=r"x and gates must agree in batch and channels"):
        F.excite_spatial(x, jnp.zeros((2, 2, 2, 4)))
    for extent in (0, 2):  # the means over an empty image
        with pytest.raises(ValueError, match=r"x must not be empty.*\(2, 0, 4, 8\)"):
            F.gather_excite_gates(x[:, :0], extent=extent)


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.GatherExcite(16, extra_params=True, extent=2))
    with pytest.raises(ValueError, match=r"unexpected keys \['gather.conv1.weight'"):
        from_torch(GatherExcite(), sd)
    with pytest.raises(ValueError, match=r"missing keys \['gather.conv2.weight'"):
        from_torch(GatherExcite(extra_params=True, extent=4), sd)
    with pytest.raises(ValueError, match=r"misshaped keys.*mlp.fc1.weight: expected"):
        from_torch(GatherExcite(extra_params=True, extent=2, rd_channels=2), sd)
