"""The detection and segmentation trainers (`train.detection`, `train.segmentation`), their
small models (`models.small`) and their commands.

Default tests check the pieces against hand-computed values or torch and the refusals; the
slow ones train: a few steps lower the loss of each small model, `train` -> `eval` ->
`visualize` through the command line, a killed run resumes to the uninterrupted result, and
two devices give the losses of one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention import cli, data
from flax_attention.models import registry
from flax_attention.models.small import tiny_resnet
from flax_attention.train import options
from flax_attention.train.checkpoint import Checkpoints
from flax_attention.train.detection import DetectionConfig, DetectionTrainer, postprocess
from flax_attention.train.segmentation import (
    AUX_WEIGHTS,
    SegmentationConfig,
    SegmentationTrainer,
    pixel_losses,
)
from flax_attention.train.supervised import SupervisedTrainer, TrainConfig
from flax_attention.train.trainer import padded_batches
from tests.test_train import _finish, _log, _wait_for_step

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("detr-small", "danet-small", "ccnet-small", "fcn-small")


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip()


# --- pieces -------------------------------------------------------------------------------------


def test_tiny_resnet_has_output_stride_8_and_128_channels():
    for dilation in ((False, True, True), (False, False, False)):
        net = tiny_resnet(features_only=True, replace_stride_with_dilation=dilation)
        out, _ = jax.eval_shape(lambda x, n=net: n.init_with_output(jax.random.key(0), x),
                                jax.ShapeDtypeStruct((2, 64, 48, 1), jnp.float32))
        assert out.shape == (2, 8, 6, 128)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_fit_the_canvases(name):
    model = registry.create(name)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                    jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32))
    if name == "detr-small":
        assert out["pred_logits"].shape == (2, 10, 11) and out["pred_boxes"].shape == (2, 10, 4)
    else:
        assert out.shape == (2, 64, 64, 11)
    count = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert count < 1_500_000, count  # a ResNet-10's first two stages and a small head


def test_padded_batches_pad_every_label_leaf():
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    labels = {"classes": np.arange(10, dtype=np.int32).reshape(5, 2),
              "valid": np.ones((5, 2), bool)}
    batches = list(padded_batches(data.Dataset(images, labels, 10), 3))
    assert len(batches) == 2
    last_images, last_labels, mask = batches[1]
    np.testing.assert_array_equal(last_images[:, 0, 0, 0], [3, 4, 0])
    np.testing.assert_array_equal(last_labels["classes"], [[6, 7], [8, 9], [0, 0]])
    np.testing.assert_array_equal(last_labels["valid"], [[1, 1], [1, 1], [0, 0]])
    np.testing.assert_array_equal(mask, [True, True, False])


def test_pixel_losses_match_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long(),
        reduction="none").mean((1, 2)).numpy()
    np.testing.assert_allclose(pixel_losses(jnp.asarray(logits), jnp.asarray(labels)),
                               expected, rtol=1e-5)


def test_postprocess_takes_the_best_object_class():
    # query 0: "no object" dominates but class 1 is the best object class (p = e / (2e + 1 + e^3))
    logits = jnp.log(jnp.asarray([[[1.0, np.e, np.e ** 3], [np.e ** 2, 1.0, 1.0]]]))
    boxes = jnp.full((1, 2, 4), 0.5)
    out = postprocess({"pred_logits": logits, "pred_boxes": boxes})
    np.testing.assert_array_equal(out["classes"], [[1, 0]])
    np.testing.assert_allclose(out["scores"], [[np.e / (1 + np.e + np.e ** 3),
                                                np.e ** 2 / (np.e ** 2 + 2)]], rtol=1e-6)


def test_auxiliary_weights_are_the_references():
    from flax_attention.models.segmentation import CCNet, DANet

    assert {DANet: (1.0, 1.0, 1.0), CCNet: (1.0, 0.4)} == AUX_WEIGHTS


# --- refusals -----------------------------------------------------------------------------------


def test_mismatched_model_and_dataset_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="'detr-small' is a detector: it trains on "
                       "digit-detection, not 'digit-segmentation'"):
        DetectionTrainer(DetectionConfig(dataset="digit-segmentation", out=str(tmp_path)))
    with pytest.raises(ValueError, match="'danet-small' is a segmenter: the detection trainer"):
        DetectionTrainer(DetectionConfig(model="danet-small", out=str(tmp_path)))
    with pytest.raises(ValueError, match="digit-detection is a detection data set"):
        SupervisedTrainer(TrainConfig(model="cnn", dataset="digit-detection"))
    out = tmp_path / "run"
    status = cli.main(["train", "--model", "ccnet-small", "--dataset", "distorted-digits",
                       "--out", str(out)])
    assert status == cli.EXIT_ERROR
    assert "'ccnet-small' is a segmenter: it trains on digit-segmentation, not " \
           "'distorted-digits'" in _error_line(capsys)
    assert cli.main(["train", "--model", "detr-small", "--optimizer", "sgd", "--out",
                     str(out)]) == cli.EXIT_ERROR
    assert "--optimizer is not an option of the detection models" in _error_line(capsys)
    assert not out.exists()


def test_the_task_picks_the_trainer_and_the_default_dataset():
    args = cli._parser().parse_args(["train", "--model", "fcn-small", "--steps", "3"])
    assert options.trainer_kind(args) == "segmentation"
    config = options.dense_config(args, "segmentation")
    assert (config.dataset, config.steps, config.epochs) == ("digit-segmentation", 3, None)
    assert config.out == os.path.join("runs", "fcn-small-digit-segmentation")
    args = cli._parser().parse_args(["train", "--dataset", "digit-detection"])
    assert options.trainer_kind(args) == "detection"
    assert options.dense_config(args, "detection").model == "detr-small"


# --- training (slow) ----------------------------------------------------------------------------


def _trainer(name: str, **fields):
    if name == "detr-small":
        return DetectionTrainer(DetectionConfig(model=name, **fields))
    return SegmentationTrainer(SegmentationConfig(model=name, **fields))


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_a_few_steps_lower_the_loss(tmp_path, name):
    """Six steps on one batch of 8 canvases (warmup 1, lr 1e-3): the loss falls."""
    trainer = _trainer(name, steps=6, batch_size=8, limit=8, lr=1e-3, warmup_steps=1,
                       out=str(tmp_path))
    state = trainer.init_state()
    images, labels = next(iter(trainer.epoch_batches(0, 0)))
    losses = []
    for _ in range(6):
        state, metrics = trainer.train_step(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detr-small", "ccnet-small"])
def test_train_eval_visualize_round_trip(tmp_path, capsys, name):
    out = tmp_path / name
    assert cli.main(["train", "--model", name, "--steps", "3", "--limit", "16", "--batch-size",
                     "8", "--out", str(out), "--no-progress"]) == 0
    trained = capsys.readouterr().out.splitlines()[-1]
    assert trained.startswith("completed at step 3 (")
    assert cli.main(["eval", "--run", str(out)]) == 0
    evaluated = capsys.readouterr().out.strip()
    assert evaluated.split(": ", 2)[2] == trained.split(": ", 1)[1]  # the same scores
    assert ("test mAP" if name == "detr-small" else "test mIoU") in evaluated
    assert cli.main(["visualize", "--run", str(out), "--num-images", "2"]) == 0
    pictures = capsys.readouterr().out.split()
    expected = (["boxes.png", "decoder_attention.png"] if name == "detr-small"
                else ["label_maps.png"])
    assert [Path(p).name for p in pictures] == expected
    assert all(Path(p).stat().st_size > 0 for p in pictures)


def _cli(cache: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "JAX_COMPILATION_CACHE_DIR": str(cache)}
    command = ["train", "--model", "danet-small", "--limit", "32", "--batch-size", "8",
               "--steps", "6", "--checkpoint-every", "2", "--log-every", "1", "--no-progress",
               "--out", str(out), *args]
    return subprocess.Popen([sys.executable, "-m", "flax_attention.cli", *command], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_stopped_segmentation_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM after the checkpoint of step 2, then --resume: the digest of the final state
    (parameters, BatchNorm statistics, optimiser state, sums, key), the log and the test scores
    of an uninterrupted run."""
    reference, stopped, cache = tmp_path / "reference", tmp_path / "stopped", tmp_path / "cache"
    expected = _finish(_cli(cache, reference), 0).splitlines()[-1]
    run = _cli(cache, stopped, "--step-delay", "0.5")
    _wait_for_step(run, stopped, 2)
    run.send_signal(signal.SIGTERM)
    _finish(run, cli.EXIT_INTERRUPTED)
    resumed = _finish(_cli(cache, stopped, "--resume"), 0).splitlines()[-1]
    assert resumed.split(":", 1)[1] == expected.split(":", 1)[1]
    digests = []
    for out in (reference, stopped):
        with Checkpoints(out / "checkpoints", read_only=True) as checkpoints:
            digests.append(checkpoints.metadata(6)["digest"])
    assert digests[0] == digests[1]
    assert _log(stopped) == _log(reference)


PARALLEL_SCRIPT = """
import json
import jax
import numpy as np
from flax_attention.train import parallel
from tests.test_train_dense import _trainer

results = {}
for name in ("detr-small", "fcn-small"):
    losses = {}
    for devices in (1, 2):
        mesh = parallel.data_mesh(jax.devices()[:devices])
        trainer = _trainer(name, steps=3, batch_size=8, limit=24, out="/tmp/unused", lr=1e-3)
        trainer = type(trainer)(trainer.config, mesh)
        state = trainer.init_state()
        losses[devices] = []
        for images, labels in trainer.epoch_batches(0, 0):
            state, metrics = trainer.train_step(state, images, labels)
            losses[devices].append(float(metrics["loss"]))
    results[name] = losses
print(json.dumps(results))
"""


@pytest.mark.slow
def test_two_devices_match_one():
    """Three steps with the batch (images and dict labels) split over 2 host devices give the
    losses of one device: the matching and the losses see the whole batch."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", PARALLEL_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    for name, losses in json.loads(done.stdout.splitlines()[-1]).items():
        assert len(losses["1"]) == 3, name
        np.testing.assert_allclose(losses["2"], losses["1"], rtol=1e-4, err_msg=name)
