"""Whole checkpoints as saved: `from_torch`'s wrapper and prefix handling and its whole refusals,
DETR's and mmcv's layouts, and `flax-attention convert` round trips (torch pickles and
safetensors without torch) into `models.create(weights=)`, `eval --weights`, `train --init-from`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flax_attention import CrissCrossAttention, cli
from flax_attention.convert import convert, evaluate_weights, load_weights, read_checkpoint
from flax_attention.interop.torch import from_torch
from flax_attention.models import create, detr_resnet50, resnet18, resnet50
from flax_attention.train.supervised import SupervisedTrainer, TrainConfig
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, randomize_, state_dict
from tests.reference import criss_cross as ref_cca
from tests.reference import detr as ref_detr
from tests.reference.resnet import BasicBlock, Bottleneck, ResNet

ROOT = Path(__file__).resolve().parents[1]
# A small DETR of upstream's options: `--backbone resnet18 --hidden_dim 32 --nheads 4
# --enc_layers 1 --dec_layers 2 --dim_feedforward 64 --num_queries 6`, 4 classes.
SMALL_DETR = dict(num_classes=4, num_queries=6, hidden_dim=32, nheads=4)
SMALL_LAYERS = dict(dim_feedforward=64)


def _se_resnet18(num_classes: int = 7, in_chans: int = 3) -> ResNet:
    """senet.pytorch's `se_resnet18` layout (`se.fc.0`, `se.fc.2`), random weights and BN
    statistics; `in_chans` 1 for the grey digit data sets."""
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes, reduction=16)
    net.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    return randomize_(net)


@pytest.fixture(scope="module")
def se_checkpoint(tmp_path_factory) -> tuple[Path, ResNet]:
    """A DataParallel training checkpoint of an SE-ResNet-18: `{"state_dict": {"module.*"}}`."""
    net = _se_resnet18()
    path = tmp_path_factory.mktemp("se") / "se_resnet18.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           net.state_dict().items()}}, path)
    return path, net


def _apply(net, x: np.ndarray):
    """A bound model (`create(weights=)`) applied jitted."""
    model, variables = net.unbind()
    return jax.jit(model.apply)(variables, x)


# --- from_torch: checkpoints as saved, refusals -----------------------------------------------


def _cca_state(seed: int = 0) -> tuple[dict, ref_cca.CrissCrossAttention]:
    module = randomize_(ref_cca.CrissCrossAttention(16), seed)
    return state_dict(module), module


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "optimizer": {}, "epoch": 1},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_pred": 0.5},
    lambda sd: {"model_state": sd, "optim_state": {}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
])
def test_from_torch_takes_checkpoints_as_saved(wrap):
    sd, _ = _cca_state()
    expected = from_torch(CrissCrossAttention(), sd)
    got = from_torch(CrissCrossAttention(), wrap(sd))
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_from_torch_lists_every_offending_key_in_one_error():
    sd, _ = _cca_state()
    sd.pop("gamma")
    sd["extra"] = np.zeros(1)
    sd["key_conv.weight"] = np.zeros((3, 16, 1, 1))
    with pytest.raises(ValueError, match=r"does not fit CrissCrossAttention: missing keys "
                       r"\['gamma'\], unexpected keys \['extra'\], misshaped keys .*"
                       r"key_conv.weight: expected \(1, 1, 16, 2\), got \(3, 16, 1, 1\)"):
        from_torch(CrissCrossAttention(), sd)


def test_a_wrong_architecture_is_named_and_its_keys_counted(se_checkpoint):
    path, _ = se_checkpoint
    with pytest.raises(ValueError) as info:
        from_torch(detr_resnet50(), read_checkpoint(path))
    message = str(info.value)
    assert "it looks like another architecture's: only 0 of the " in message
    assert "its keys begin with bn1, conv1, fc, layer1, layer2, layer3, layer4; a DETR's with " \
           "backbone, bbox_embed, class_embed, input_proj, query_embed, transformer" in message
    missing = message.split("missing keys ")[1].split(", unexpected")[0]
    assert missing.count("'") == 2 * 20 and missing.endswith(" more")  # 20 listed, then a count


def test_mmcv_criss_cross_loads_its_0d_gamma_scale():
    """mmcv/mmseg `CrissCrossAttention` stores `self.gamma = Scale(0.)`: a 0-d `gamma.scale`."""
    sd, module = _cca_state(1)
    mmcv = {k: v for k, v in sd.items() if k != "gamma"} | {"gamma.scale": sd["gamma"][0]}
    assert mmcv["gamma.scale"].shape == ()
    x = random_nhwc((2, 5, 6, 16))
    got = CrissCrossAttention().apply(from_torch(CrissCrossAttention(), mmcv), x)
    with torch.no_grad():
        expected = module(nhwc_to_torch(x))
    assert_close(got, np.moveaxis(expected.numpy(), 1, -1))
    with pytest.raises(ValueError, match=r"gamma.scale: expected \(1,\), got \(2,\)"):
        from_torch(CrissCrossAttention(), mmcv | {"gamma.scale": np.zeros(2)})


# --- DETR -------------------------------------------------------------------------------------


def _detr_pair(resnet: ResNet, backbone, **sizes):
    torch_net = randomize_(ref_detr.build_detr(resnet, **sizes))
    fields = {"num_encoder_layers": sizes.pop("enc_layers", 6),
              "num_decoder_layers": sizes.pop("dec_layers", 6), **sizes}
    return torch_net, detr_resnet50(backbone=backbone, **fields)


def _compare_detr(model, variables, torch_net) -> None:
    x = random_nhwc((2, 64, 64, 3))
    mask = np.zeros((2, 64, 64), bool)
    mask[1, :, 44:] = True  # the second image padded on the right
    out = jax.jit(model.apply)(variables, x, mask)
    with torch.no_grad():
        expected = torch_net(nhwc_to_torch(x), torch.from_numpy(mask))
    for key in ("pred_logits", "pred_boxes"):
        assert_close(out[key], expected[key].numpy())


def test_detr_checkpoint_as_saved_equals_upstream(tmp_path):
    """DETR's `checkpoint.pth` layout: `{"model": ..., "args": Namespace}`, DataParallel keys."""
    torch_net, model = _detr_pair(ResNet(BasicBlock, [2, 2, 2, 2]), resnet18, enc_layers=1,
                                  dec_layers=2, **SMALL_DETR, **SMALL_LAYERS)
    sd = torch_net.state_dict()
    assert {k.split(".")[0] for k in sd} == {"backbone", "transformer", "input_proj",
                                             "query_embed", "class_embed", "bbox_embed"}
    assert "backbone.0.body.bn1.running_var" in sd and "backbone.0.body.fc.weight" not in sd
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()},
                "args": argparse.Namespace(backbone="resnet18", lr=1e-4), "epoch": 2}, path)
    _compare_detr(model, from_torch(model, read_checkpoint(path)), torch_net)


@pytest.mark.slow
def test_detr_resnet50_cli_round_trip(tmp_path, capsys):
    """DETR-R50 at upstream's defaults, converted by the CLI, loaded by `create(weights=)`."""
    torch_net, _ = _detr_pair(ResNet(Bottleneck, [3, 4, 6, 3]), resnet50)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": torch_net.state_dict()}, path)
    out = tmp_path / "weights"
    assert cli.main(["convert", str(path), "--model", "detr_resnet50", "--out", str(out)]) == 0
    assert "(detr_resnet50, 91 classes)" in capsys.readouterr().out
    model, variables = create("detr_resnet50", weights=out).unbind()
    _compare_detr(model, variables, torch_net)


# --- flax-attention convert -------------------------------------------------------------------


def test_cli_convert_round_trip_and_new_head(se_checkpoint, tmp_path, capsys):
    path, net = se_checkpoint
    out = tmp_path / "w"
    assert cli.main(["convert", str(path), "--model", "se_resnet18", "--out", str(out)]) == 0
    assert "(se_resnet18, 7 classes)" in capsys.readouterr().out
    x = random_nhwc((2, 32, 32, 3))
    with torch.no_grad():
        expected = net(nhwc_to_torch(x)).numpy()
    assert_close(_apply(create("se_resnet18", weights=out), x), expected)

    new = tmp_path / "w10"
    assert cli.main(["convert", str(path), "--model", "se_resnet18", "--num-classes", "10",
                     "--out", str(new)]) == 0
    assert ("dropped the classifier head (fc.bias, fc.weight: 7 classes) and re-initialised it "
            "for 10 classes") in capsys.readouterr().out
    _, kept, _ = load_weights(out)
    _, classes, variables = load_weights(new)
    assert (kept, classes) == (7, 10)
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["bias"]), np.zeros(10))
    assert_close(variables["params"]["layer4_1"]["conv2"]["kernel"],
                 np.transpose(net.layer4[1].conv2.weight.detach().numpy(), (2, 3, 1, 0)))
    with pytest.raises(ValueError, match="holds se_resnet18 weights for 10 classes, not "
                       "num_classes=7"):
        create("se_resnet18", num_classes=7, weights=new)
    with pytest.raises(ValueError, match="holds se_resnet18 weights, not resnet18"):
        create("resnet18", weights=new)


@pytest.mark.parametrize(("edit", "args", "message"), [
    (None, ["--model", "se_resnet34"], r"missing keys \['layer1.2.bn1.bias', .* and 76 more"),
    (None, ["--model", "nope"], "unknown model name 'nope'"),
    (lambda sd: sd | {"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.extra": 0},
     ["--model", "se_resnet18"], r"unexpected keys \['fc.extra'\], misshaped keys .*layer1.0."
     r"conv1.weight: expected \(3, 3, 64, 64\), got \(64, 64, 1, 1\)"),
    (lambda sd: [1, 2], ["--model", "se_resnet18"], "holds a list, not a state dict"),
])
def test_cli_convert_refusals_write_nothing(se_checkpoint, tmp_path, capsys, edit, args,
                                            message):
    path, net = se_checkpoint
    if edit is not None:
        path = tmp_path / "edited.pt"
        torch.save(edit(net.state_dict()), path)
    out = tmp_path / "out"
    assert cli.main(["convert", str(path), *args, "--out", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_convert_refuses_bad_files_and_a_used_out(se_checkpoint, tmp_path, capsys):
    path, _ = se_checkpoint
    (tmp_path / "ckpt.h5").write_text("")
    (tmp_path / "bad.pth").write_text("not a pickle")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    for checkpoint, out, message in [
        (tmp_path / "ckpt.h5", "o1", "must end with one of .pth, .pth.tar, .pt, .pkl, "
         ".safetensors"),
        (tmp_path / "nothing.pth", "o2", "is not a file"),
        (tmp_path / "bad.pth", "o3", "cannot read"),
        (path, "used", "exists and is not an empty directory"),
    ]:
        assert cli.main(["convert", str(checkpoint), "--model", "se_resnet18",
                         "--out", str(tmp_path / out)]) == cli.EXIT_ERROR
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "ckpt.h5", "used"]


def test_safetensors_convert_without_torch(se_checkpoint, tmp_path):
    """A subprocess in which `import torch` fails converts a .safetensors checkpoint."""
    _, net = se_checkpoint
    path = tmp_path / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict(net).items()}, str(path))
    out = tmp_path / "w"
    script = ("import sys; sys.modules['torch'] = None\n"
              "from flax_attention import cli\n"
              f"code = cli.main(['convert', {str(path)!r}, '--model', 'se_resnet18', "
              f"'--out', {str(out)!r}])\n"
              "assert sys.modules['torch'] is None\n"
              "sys.exit(code)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    _, _, loaded = load_weights(out, "se_resnet18", 7)
    jax.tree.map(np.testing.assert_array_equal, loaded,
                 from_torch(create("se_resnet18", num_classes=7), state_dict(net)))


# --- eval --weights, train --init-from --------------------------------------------------------


@pytest.fixture(scope="module")
def grey_weights(tmp_path_factory) -> tuple[Path, ResNet]:
    """An SE-ResNet-18 for 1-channel images, 7 classes, converted for the 10 digit classes."""
    net = _se_resnet18(7, in_chans=1)
    tmp = tmp_path_factory.mktemp("grey")
    torch.save(net.state_dict(), tmp / "grey.pt")
    convert(tmp / "grey.pt", "se_resnet18", tmp / "w", num_classes=10, log=lambda _: None)
    return tmp / "w", net


def _grey_config(weights: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig(model="se_resnet18", dataset="distorted-digits", steps=2, batch_size=8,
                       limit=16, init_from=str(weights), out=str(tmp_path / "run"),
                       progress=False)


def test_init_from_reads_and_checks_the_weights(grey_weights, tmp_path):
    out, net = grey_weights
    initial = SupervisedTrainer(_grey_config(out, tmp_path)).initial
    assert_close(initial["params"]["conv1"]["kernel"],
                 np.transpose(net.conv1.weight.detach().numpy(), (2, 3, 1, 0)))
    assert_close(initial["batch_stats"]["bn1"]["var"], net.bn1.running_var.numpy())
    seven = tmp_path / "w7"
    convert(out.parent / "grey.pt", "se_resnet18", seven, log=lambda _: None)
    with pytest.raises(ValueError, match="holds weights for 7 classes, distorted-digits has 10: "
                       "convert with --num-classes 10"):
        SupervisedTrainer(_grey_config(seven, tmp_path))


def test_cli_eval_weights_needs_a_dataset(grey_weights, capsys):
    out, _ = grey_weights
    assert cli.main(["eval", "--weights", str(out)]) == cli.EXIT_ERROR
    assert "--weights needs --dataset: the data set to evaluate on" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_init_from_and_eval_weights(grey_weights, tmp_path, capsys):
    out, net = grey_weights
    config = _grey_config(out, tmp_path)
    state = SupervisedTrainer(config).init_state()
    assert_close(state.params["layer1_0"]["conv1"]["kernel"],
                 np.transpose(net.layer1[0].conv1.weight.detach().numpy(), (2, 3, 1, 0)))
    with pytest.raises(ValueError, match="holds se_resnet18 weights, not se_resnet34"):
        SupervisedTrainer(dataclasses.replace(config, model="se_resnet34"))
    metrics = evaluate_weights(out, "distorted-digits", limit=16)
    assert 0 <= metrics["test_accuracy"] <= 1 and np.isfinite(metrics["test_loss"])
    assert cli.main(["train", "--model", "se_resnet18", "--dataset", "distorted-digits",
                     "--init-from", str(out), "--steps", "2", "--batch-size", "8",
                     "--limit", "16", "--out", config.out, "--no-progress"]) == 0
    assert "completed at step 2" in capsys.readouterr().out
