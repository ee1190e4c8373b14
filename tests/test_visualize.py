"""Tests of `flax_attention.visualize` and `flax-attention visualize`: the map functions by hand,
the records read from the sown intermediates, and the PNGs of tiny runs of every kind."""

from __future__ import annotations

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flax_attention import visualize as vis
from flax_attention.cli import main
from flax_attention.data import Dataset
from flax_attention.functional.criss_cross import criss_cross_weights
from flax_attention.models.classifiers import create_classifier
from flax_attention.train import Checkpoints, reinforce, supervised, write_json, write_run_config
from flax_attention.train.reinforce import RamConfig, train_ram
from flax_attention.train.supervised import SupervisedTrainer, TrainConfig, train

NUM_IMAGES = 2
KINDS = {"stn-cnn": "stn", "se-cnn": "se", "cca-cnn": "cca", "nl-cnn": "nl", "pam-cnn": "pam"}


def _size(width_in: float, height_in: float) -> tuple[int, int]:
    return round(width_in * vis.DPI), round(height_in * vis.DPI)


EXPECTED_SIZES = {  # PIL's (width, height) of each kind's PNG for NUM_IMAGES images
    "stn": _size(vis.PANEL * NUM_IMAGES, 2 * vis.PANEL + 0.4),
    "se": _size(10, 4),
    **dict.fromkeys(("cca", "nl", "pam"), _size(vis.PANEL * 3, vis.PANEL * NUM_IMAGES + 0.3)),
}


def _config(out: Path, model: str) -> TrainConfig:
    return TrainConfig(model=model, epochs=1, batch_size=8, limit=16, out=str(out),
                       progress=False)


def _init(model: nn.Module, shape: tuple[int, ...]) -> dict:
    """Fresh variables for images of `shape`; the RBG generator compiles much faster on the
    CPU than threefry."""
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros(shape))


def _initial_run(out: Path, model: str) -> Path:
    """A run directory holding freshly initialised variables as its checkpoint (step 0)."""
    config = _config(out, model)
    trainer = SupervisedTrainer(config)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), trainer.abstract_state())
    state = zeros.replace(**_init(trainer.model, (1, *trainer.input_shape)))
    with Checkpoints(out / "checkpoints") as checkpoints:
        checkpoints.save(0, state, config.to_dict())
    write_json(out / "config.json", config.to_dict())
    return out


# --- the map functions, by hand -------------------------------------------------------------


def test_criss_cross_maps_lie_on_the_row_and_column_and_sum_to_one():
    h, w = 4, 5
    q, k = jax.random.normal(jax.random.key(0), (2, 2, h, w, 3))
    weights = jax.jit(criss_cross_weights)(q, k)
    queries = jnp.array([[[1, 2], [3, 0]], [[0, 4], [2, 2]]])
    maps = np.asarray(vis.criss_cross_maps(weights, queries))
    chex.assert_shape(maps, (2, 2, h, w))
    for b in range(2):
        for n, (i, j) in enumerate(np.asarray(queries[b])):
            m = maps[b, n]
            off = np.ones((h, w), bool)
            off[i, :], off[:, j] = False, False
            assert np.all(m[off] == 0)
            np.testing.assert_allclose(m.sum(), 1.0, rtol=1e-5)
            # CUDA order: the row left to right, then the column without the query itself.
            np.testing.assert_allclose(m[i], weights[b, i, j, :w], rtol=1e-6)
            column = np.delete(m[:, j], i)
            np.testing.assert_allclose(column, weights[b, i, j, w:], rtol=1e-6)


def test_dense_maps_pick_the_query_row_as_an_image_of_the_keys():
    query_hw, key_hw = (2, 3), (1, 2)
    weights = jnp.arange(2 * 6 * 2, dtype=jnp.float32).reshape(2, 6, 2)
    queries = jnp.array([[[1, 2]], [[0, 1]]])  # flat rows 5 and 1
    maps = vis.dense_maps(weights, queries, query_hw, key_hw)
    np.testing.assert_array_equal(maps[0, 0], weights[0, 5].reshape(key_hw))
    np.testing.assert_array_equal(maps[1, 0], weights[1, 1].reshape(key_hw))
    with pytest.raises(ValueError, match=r"weights must be \[B, 2\*3, 2\*2\].*\(2, 6, 2\)"):
        vis.dense_maps(weights, queries, query_hw, (2, 2))


def test_choose_queries_finds_the_ink_the_centre_and_the_background():
    images = np.zeros((1, 12, 12, 1), np.float32)
    images[0, 8:12, 4:8] = 1.0  # a blob in cell (2, 1) of a 3 x 3 grid
    queries = np.asarray(vis.choose_queries(jnp.asarray(images), (3, 3)))
    np.testing.assert_array_equal(queries[0], [[2, 1], [1, 1], [0, 0]])


def test_upsample_keeps_a_constant_map_and_pixel_centres_map_back():
    maps = jnp.full((1, 2, 3, 3), 0.25)
    np.testing.assert_allclose(vis.upsample(maps, (12, 12)), 0.25, rtol=1e-6)
    # cell (row 0, col 2) of a 3 x 3 grid over 12 x 12 pixels: x = 2.5 * 4 - 0.5, y = 1.5
    np.testing.assert_allclose(vis._to_pixels(np.array([0, 2]), (3, 3), (12, 12)), [9.5, 1.5])


# --- records read from the sown intermediates -----------------------------------------------


def _fresh(model: str, side: int = 16):
    """A freshly initialised classifier, its variables and two random images."""
    net = create_classifier(model, 10, (side, side, 1))
    images = jax.random.uniform(jax.random.key(1), (2, side, side, 1))
    return net, _init(net, images.shape), images


@pytest.mark.parametrize("model", list(KINDS))
def test_read_attention_records_each_module_and_draws_it(model, tmp_path):
    net, variables, images = _fresh(model)
    logits, records = vis.read_attention(net, variables, images)
    chex.assert_shape(logits, (2, 10))
    (record,) = records
    assert record.kind == KINDS[model] and record.path == (KINDS[model],)
    hw = record.query_hw
    expected = {"stn": (2, 16, 16, 1), "se": (2, 32), "cca": (2, *hw, sum(hw) - 1),
                "nl": (2, hw[0] * hw[1], (hw[0] // 2) * (hw[1] // 2)),
                "pam": (2, hw[0] * hw[1], hw[0] * hw[1])}[record.kind]
    assert record.value.shape == expected
    if record.kind == "stn":  # a fresh transformer is the identity
        np.testing.assert_allclose(record.value, images, atol=1e-5)
    if record.kind in ("nl", "pam"):
        np.testing.assert_allclose(record.value.sum(-1), 1.0, rtol=1e-5)
    figure = vis.draw(record, np.asarray(images), np.array([3, 5]), ["a", "b"],
                      [str(k) for k in range(10)])
    figure.savefig(tmp_path / "picture.png", dpi=vis.DPI)
    with Image.open(tmp_path / "picture.png") as image:
        assert image.size == EXPECTED_SIZES[record.kind]


def test_a_model_without_attention_is_refused(tmp_path, monkeypatch):
    net, variables, images = _fresh("cnn")
    test_set = Dataset(np.asarray(images), np.array([0, 1]), 10)
    restored = supervised.RestoredRun(net, variables, test_set, 0)
    monkeypatch.setattr(supervised, "restore_run", lambda *args: restored)
    with pytest.raises(ValueError, match="has no spatial transformer or attention module"):
        vis.visualize_run(tmp_path)


def test_stn_figure_of_the_identity_shows_the_input_twice(tmp_path):
    images = np.zeros((2, 16, 16, 1), np.float32)
    images[:, 4:12, 6:10] = 1.0
    fig = vis.stn_figure(images, images, ["a", "b"])
    fig.savefig(tmp_path / "stn.png", dpi=vis.DPI)
    assert Image.open(tmp_path / "stn.png").size == EXPECTED_SIZES["stn"]
    top, bottom = (fig.axes[i].get_images()[0].get_array() for i in (0, NUM_IMAGES))
    np.testing.assert_array_equal(top, bottom)


# --- whole runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints written at initialisation: the STN-CNN and the CCA-CNN."""
    root = tmp_path_factory.mktemp("runs")
    return {m: _initial_run(root / m, m) for m in ("stn-cnn", "cca-cnn")}


@pytest.mark.parametrize("model", ["stn-cnn", "cca-cnn"])
def test_visualize_run_writes_a_png_of_the_expected_size(runs, model):
    kind = KINDS[model]
    paths = vis.visualize_run(runs[model], num_images=NUM_IMAGES, seed=1)
    assert paths == [runs[model] / "pictures" / f"{kind}.png"]
    with Image.open(paths[0]) as image:
        image.verify()
    with Image.open(paths[0]) as image:
        assert image.format == "PNG" and image.size == EXPECTED_SIZES[kind]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["se-cnn", "nl-cnn", "pam-cnn"])
def test_visualize_trained_runs(tmp_path, model):
    train(_config(tmp_path / model, model))
    (path,) = vis.visualize_run(tmp_path / model, num_images=NUM_IMAGES)
    with Image.open(path) as image:
        assert image.size == EXPECTED_SIZES[KINDS[model]]


def test_cli_visualize_writes_to_out_and_prints_the_paths(runs, tmp_path, capsys):
    assert main(["visualize", "--run", str(runs["stn-cnn"]), "--out", str(tmp_path / "pics"),
                 "--num-images", "3"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "pics" / "stn.png")]


def test_a_ram_run_goes_to_the_glimpse_paths(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reinforce, "visualize_run", lambda *args: calls.append(args) or args[1])
    write_run_config(tmp_path, RamConfig())
    paths = vis.visualize_run(tmp_path, num_images=3, seed=4)
    assert paths == [tmp_path / "pictures" / "glimpses.png"]
    assert calls == [(tmp_path, tmp_path / "pictures" / "glimpses.png", 3, 4, None)]


@pytest.mark.slow
def test_visualize_ram_run_draws_the_glimpse_path(tmp_path):
    train_ram(RamConfig(out=str(tmp_path / "ram"), steps=2, batch_size=4, train_examples=8,
                        test_examples=4, mc_samples=1, num_glimpses=2, hidden=16,
                        progress=False))
    (path,) = vis.visualize_run(tmp_path / "ram", tmp_path / "pics", num_images=2)
    assert path == tmp_path / "pics" / "glimpses.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50


@pytest.mark.parametrize("args, message", [
    (["--run", "{tmp}/missing"], "is not a run directory"),
    (["--run", "{tmp}/empty"], "no checkpoints"),
    (["--run", "{tmp}/empty", "--num-images", "0"], "must be >= 1"),
])
def test_cli_bad_arguments_give_one_line_and_a_nonzero_exit(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    write_json(tmp_path / "empty" / "config.json", _config(tmp_path / "empty", "se-cnn").to_dict())
    try:
        status = main(["visualize", *(a.format(tmp=tmp_path) for a in args)])
    except SystemExit as usage_error:  # argparse's
        status = usage_error.code
    err = capsys.readouterr().err
    assert status != 0 and message in err and len(err.strip().splitlines()) == 1
