"""`flax-attention export` and `flax_attention.export`: the exported file runs in a fresh
process that imports only jax (no flax, no flax_attention) and gives the model's outputs, at
any batch size; Pallas kernels export for CUDA, and the default paths are XLA on every platform.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import CrissCrossAttention
from flax_attention.cli import main
from flax_attention.convert import save_weights
from flax_attention.export import TRITON_CALL, build_model, export_model, parse_shape
from flax_attention.models import registry, resnet
from flax_attention.train.supervised import call_kwargs
from tests.helpers import assert_close

# Runs each exported file on each input in a process without flax_attention (nor flax).
_RUNNER = textwrap.dedent("""
    import sys, json
    import numpy as np
    import jax
    from jax import export
    for path, inputs, outputs in json.loads(sys.argv[1]):
        with open(path, "rb") as f:
            exported = export.deserialize(bytearray(f.read()))
        out = exported.call(np.load(inputs))
        np.savez(outputs, *jax.tree.leaves(out))
    assert not [m for m in sys.modules if m.split(".")[0] in ("flax", "flax_attention")]
""")

_TINY_RESNET = functools.partial(resnet.ResNet, block_cls=resnet.BasicBlock,
                                 stage_sizes=(1, 1, 1, 1))


def _run_fresh(jobs: list[tuple[str, np.ndarray]], tmp_path) -> list[list[np.ndarray]]:
    """Runs `(file, input)` jobs in one fresh process; the outputs' leaves of each."""
    spec = []
    for i, (path, x) in enumerate(jobs):
        np.save(tmp_path / f"in{i}.npy", x)
        spec.append((str(path), str(tmp_path / f"in{i}.npy"), str(tmp_path / f"out{i}.npz")))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(spec)], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    results = []
    for _, _, out in spec:
        with np.load(out) as npz:
            results.append([npz[f"arr_{i}"] for i in range(len(npz.files))])
    return results


def _random_variables(model, x: jax.Array, seed: int = 0) -> dict:
    """Random variables of `model`'s structure, without compiling its init (BatchNorm running
    variances positive)."""
    shapes = jax.eval_shape(functools.partial(model.init, **call_kwargs(model, False)),
                            jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        values = rng.standard_normal(s.shape).astype(s.dtype) * 0.1
        return np.abs(values) + 0.5 if "var" in jax.tree_util.keystr(path) else values

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x):
    return model.apply(variables, x, **call_kwargs(model, False))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "shape", "num_classes"), [
    ("se_resnet18", (2, 32, 32, 3), 5),  # a registry classifier
    ("danet_resnet50", (1, 24, 24, 3), 3),  # a segmenter: logits [B, H, W, classes]
])
def test_exported_model_runs_in_a_process_without_flax_attention(name, shape, num_classes,
                                                                  tmp_path):
    """Baked-in random weights; the batch is symbolic, so a batch of 3 runs too."""
    overrides = ({"stage_sizes": (1, 1, 1, 1)} if name.startswith("se_")
                 else {"backbone": _TINY_RESNET})
    model = registry.create(name, num_classes, **overrides)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    variables = _random_variables(model, x)
    result = export_model(model, variables, shape)
    assert result.polymorphic, result.note
    path = tmp_path / f"{name}.jax"
    path.write_bytes(result.exported.serialize())
    x3 = jnp.concatenate([x, -x, 2 * x])[:3]

    (out,), (out3,) = _run_fresh([(path, np.asarray(x)), (path, np.asarray(x3))], tmp_path)

    assert out.shape[-1] == num_classes and out3.shape[0] == 3
    assert_close(out, _apply(model, variables, x), rtol=1e-4)
    assert_close(out3, _apply(model, variables, x3), rtol=1e-4)


def test_cli_export_of_a_weights_directory_runs_alone(tmp_path, capsys):
    """`flax-attention export --weights` of a weights directory (`convert --out`; here random
    weights of a small classifier): a file of any batch, the model's outputs."""
    model = build_model("se-cnn", (16, 16, 1))
    x = np.random.default_rng(0).standard_normal((5, 16, 16, 1)).astype(np.float32)
    variables = _random_variables(model, x[:1])
    save_weights(tmp_path / "weights", "se-cnn", 10, variables)
    out = tmp_path / "se-cnn.jax"

    assert main(["export", "--model", "se-cnn", "--weights", str(tmp_path / "weights"),
                 "--input-shape", "2,16,16,1", "--out", str(out)]) == 0

    assert "batch: any" in capsys.readouterr().out
    (fresh,) = _run_fresh([(out, x)], tmp_path)[0]
    assert_close(fresh, _apply(model, variables, x), rtol=1e-4)


@pytest.mark.parametrize(("argv", "message"), [
    (["--input-shape", "2,16,16"], "--input-shape must be four positive integers"),
    (["--input-shape", "2,16,16,1", "--model", "nope"], "unknown model 'nope'"),
])
def test_cli_export_refuses_bad_arguments_in_one_line(argv, message, tmp_path, capsys):
    assert main(["export", "--model", "se-cnn", "--out", str(tmp_path / "f"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_parse_shape():
    assert parse_shape("2,32,32,3") == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="B,H,W,C, got '2,0,3,3'"):
        parse_shape("2,0,3,3")


def test_default_paths_are_xla_and_export_for_every_platform():
    """Note: the models' default `implementation=None` is XLA, so one file serves CPU and
    CUDA, with no Triton call in it."""
    module = CrissCrossAttention(reduction=8)
    x = jnp.ones((2, 6, 7, 16))
    variables = _random_variables(module, x)
    exported = export_model(module, variables, x.shape, platforms=("cpu", "cuda")).exported
    assert exported.platforms == ("cpu", "cuda")
    assert TRITON_CALL not in exported.mlir_module()


def test_pallas_path_exports_for_cuda(monkeypatch):
    """`implementation="pallas"` traced where the kernels compile (a GPU; pretended here, as
    tests/test_kernels_lowering.py lowers the kernels themselves) exports Triton calls for
    "cuda", at a fixed batch (Triton has no dynamic grid bounds)."""
    import flax_attention.functional.criss_cross as functional_criss_cross

    monkeypatch.setattr(functional_criss_cross, "on_gpu", lambda: True)
    module = CrissCrossAttention(reduction=8, implementation="pallas")
    x = jnp.ones((2, 6, 7, 16))
    variables = _random_variables(module, x)
    result = export_model(module, variables, x.shape, platforms=("cuda",))
    assert result.exported.platforms == ("cuda",)
    assert f"@{TRITON_CALL}" in result.exported.mlir_module()
    assert not result.polymorphic and "dynamic grid bounds" in result.note  # batch fixed at 2
