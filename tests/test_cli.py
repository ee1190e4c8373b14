"""The `flax-attention` command: bad arguments give one line and a non-zero status, `list`,
`bench`, `eval`, and the resume defaults (the training itself is in test_train.py)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import matmul_floor
from flax_attention import cli
from flax_attention.data import list_datasets
from flax_attention.models.classifiers import list_classifiers
from flax_attention.train import Checkpoints, TrainConfig, Trainer, TrainResult, options, write_json
from flax_attention.train.run_dir import pick_run_dir, read_run_config

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
    """stderr, which must be exactly one line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--epochs", "-3"], "argument --epochs: must be >= 1, got -3"),
    (["train", "--epochs", "two"], "argument --epochs: 'two' is not a int"),
    (["train", "--lr", "0"], "argument --lr: must be > 0.0, got 0"),
    (["train", "--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["eval"], "the following arguments are required: --run"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert message in _error_line(capsys)


def test_bad_values_exit_1_with_one_line(capsys, tmp_path):
    assert cli.main(["train", "--model", "nope", "--out", str(tmp_path)]) == cli.EXIT_ERROR
    assert "error: unknown model 'nope'; known: cnn, stn-cnn" in _error_line(capsys)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert cli.main(["train", "--model", "cnn", "--out", str(out)]) == cli.EXIT_ERROR
    assert f"error: cannot write to the out dir {out}" in _error_line(capsys)
    assert cli.main(["eval", "--run", str(tmp_path)]) == cli.EXIT_ERROR
    assert "is not a run directory: it has no config.json" in _error_line(capsys)
    assert not out.exists()


def test_a_real_process_prints_no_traceback():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "flax_attention.cli", "train", "--model",
                           "nope"], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == cli.EXIT_ERROR
    assert done.stderr.startswith("flax-attention train: error: unknown model 'nope'")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def _list_sections(capsys) -> dict[str, list[str]]:
    """`flax-attention list`: the names under each section's title."""
    assert cli.main(["list"]) == 0
    sections: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            sections[next(reversed(sections))].append(line.strip())
        else:
            sections[line] = []
    return sections


def test_list_separates_what_train_takes_from_the_other_networks(capsys):
    sections = _list_sections(capsys)
    titles = list(sections)
    assert titles[0] == "mechanisms:" and {"SELayer", "CrissCrossAttention"} <= {
        *sections[titles[0]]}
    assert titles[1].startswith("models that train takes")
    assert {*list_classifiers(), "ram", "resnet18", "detr_resnet50", "danet_resnet50",
            "ccnet_resnet50", "detr-small", "fcn-small"} <= {*sections[titles[1]]}
    assert titles[2].startswith("other networks")
    assert {"ram_6_8x8_1"} <= {*sections[titles[2]]}
    assert not {*sections[titles[1]]} & {*sections[titles[2]]}
    assert sections[titles[3]] == list(list_datasets())


def test_bench_without_the_benchmarks_folder(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_benchmarks_root", lambda: None)
    assert cli.main(["bench", "--only", "SELayer"]) == cli.EXIT_ERROR
    assert "the benchmarks are not installed with the package" in _error_line(capsys)


def test_bench_passes_its_options_on(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "run",
                        lambda command, cwd, check: calls.append((command, cwd))
                        or subprocess.CompletedProcess(command, 0))
    assert cli.main(["bench", "--only", "SELayer"]) == 0
    assert calls == [([sys.executable, "-m", "benchmarks.run", "--only", "SELayer"], ROOT)]


def _tiny_cases():
    from benchmarks.harness import Case

    def steps():
        return {"fwd": lambda: sum(range(100)), "fwd+bwd": lambda: sum(range(200))}

    return [Case("tiny sum 100", steps, steps, goal=2.0), Case("other", steps, steps)]


def test_bench_progress_table_list_and_json(capsys, tmp_path, monkeypatch):
    """The harness on tiny cases, the workers run in this process: --list names the cases;
    a run prints a progress line a case on stderr, the legend and one row a mode, and writes
    every record as JSON (merged with the file's other cases)."""
    from benchmarks import harness

    cases = _tiny_cases()
    monkeypatch.setattr(harness, "measure",
                        lambda i, side, module: harness.run_worker(cases[i], side))
    monkeypatch.setattr(harness, "matmul_peak_gflops", lambda: 100.0)
    harness.main(cases, "m", None, argv=["--list"])
    assert capsys.readouterr().out == "tiny sum 100\nother\n"
    path = tmp_path / "results" / "machine.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"records": [{"case": "old", "mode": "fwd"},
                                            {"case": "tiny sum 100", "mode": "stale"}]}))
    harness.main(cases, "m", None, argv=["--only", "tiny", "--json", str(path)])
    captured = capsys.readouterr()
    assert captured.err == "[1/1] tiny sum 100 ...\n"
    lines = captured.out.splitlines()
    assert lines[1].startswith("# speedup: torch ms / jax ms") and "goal" in lines[1]
    assert lines[2] == "# JAX programs compiled with flax_attention.xla_options.compiler_options()"
    assert lines[3].split()[:3] == ["case", "mode", "jax"]
    assert [line.split()[3] for line in lines[4:6]] == ["fwd", "fwd+bwd"]
    assert [line.split()[8] for line in lines[4:6]] == ["-", "-"]  # no products: no bound
    assert lines[6] == f"# full results: {path}"
    saved = json.loads(path.read_text())
    assert saved["machine"] == harness.machine_name()
    records = saved["records"]
    assert [(r["case"], r.get("mode")) for r in records] == [
        ("old", "fwd"), ("tiny sum 100", "fwd"), ("tiny sum 100", "fwd+bwd")]
    assert records[1]["goal"] == 2.0
    assert records[1]["speedup"] == records[1]["torch_ms"] / records[1]["jax_ms"]
    assert records[1]["jax_compiler_options"] == "flax_attention.xla_options.compiler_options()"
    monkeypatch.delenv(harness.XLA_DEFAULTS_ENV, raising=False)  # restored after the test
    harness.main(cases, "m", None, argv=["--only", "other", "--xla-defaults", "--json", str(path)])
    assert "# JAX programs compiled with XLA defaults" in capsys.readouterr().out.splitlines()
    assert harness.jax_compiler_options() == {}
    records = json.loads(path.read_text())["records"]
    assert [r["jax_compiler_options"] for r in records if r["case"] == "other"] == [
        "XLA defaults"] * 2
    with pytest.raises(SystemExit):
        harness.main(cases, "m", None, argv=["--only", "NoSuch"])
    assert "--only 'NoSuch' matches no benchmark case" in capsys.readouterr().err


def test_bench_processes_alternate_sides_and_take_the_median(capsys, tmp_path, monkeypatch):
    """--processes 3: three workers a side, JAX and torch alternating; each mode's time is the
    median of the three (the slow middle call is not the result), all three kept in the JSON."""
    from benchmarks import harness

    calls, times = [], iter([1.0, 4.0, 9.0, 3.0, 2.0, 5.0])

    def fake_measure(i, side, module):
        calls.append(side)
        ms = next(times)
        return {mode: {"ms": ms * (1 + k), "peak_mib": ms} for k, mode in enumerate(harness.MODES)}

    monkeypatch.setattr(harness, "measure", fake_measure)
    path = tmp_path / "r.json"
    harness.main(_tiny_cases(), "m", None,
                 argv=["--only", "tiny", "--processes", "3", "--json", str(path)])
    assert calls == ["jax", "torch"] * 3
    fwd, fwd_bwd = json.loads(path.read_text())["records"]
    assert (fwd["jax_ms"], fwd["torch_ms"]) == (2.0, 4.0)  # medians of 1, 9, 2 and 4, 3, 5
    assert fwd["jax_ms_runs"] == [1.0, 9.0, 2.0] and fwd["torch_ms_runs"] == [4.0, 3.0, 5.0]
    assert fwd_bwd["jax_ms"] == 4.0 and fwd["speedup"] == 2.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        harness.main(_tiny_cases(), "m", None, argv=["--processes", "0"])
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err


def test_bench_bound_counts_torch_products(monkeypatch):
    """The torch side counts its products' FLOPs, forward and backward (an [8, 16] x [16, 4]
    product: 2 * 8 * 16 * 4 = 1024 forward, its backward's two products as many each), and
    `bound` is torch's time over those FLOPs' time at the process's product rate."""
    import torch

    from benchmarks import harness

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    steps = harness.torch_steps(torch.matmul, a, b)
    assert harness.torch_gflop(steps["fwd"]) * 1e9 == 1024
    assert harness.torch_gflop(steps["fwd+bwd"]) * 1e9 == 3 * 1024
    assert harness.matmul_peak_gflops(size=64, reps=1) > 0
    monkeypatch.setattr(harness, "matmul_peak_gflops", lambda: 2.0)
    result = harness.run_worker(harness.Case("mm", dict, lambda: steps), "torch")
    fwd = result["fwd"]
    assert (fwd["gflop"], fwd["peak_gflops"]) == (1024e-9, 2.0)
    assert harness.bound(fwd) == pytest.approx(fwd["ms"] / (1e3 * 1024e-9 / 2.0))
    assert harness.bound({"ms": 1.0, "gflop": 0.0, "peak_gflops": 2.0}) is None
    assert harness.bound({"ms": 1.0}) is None  # a JAX side, or an old result


def test_bench_only_takes_the_names_list_prints(capsys):
    """`--only` with a mechanism's name or short name of `flax-attention list` picks that
    mechanism's cases, not every case whose name contains the text."""
    from benchmarks import run

    run.main(["--list", "--only", "SELayer"])
    by_name = capsys.readouterr().out.split("\n")
    run.main(["--list", "--only", "se"])
    assert capsys.readouterr().out.split("\n") == by_name
    assert "se_layer 32x56x56x256" in by_name and not any("criss" in n for n in by_name)


@pytest.mark.parametrize("product", matmul_floor.PRODUCTS, ids=lambda p: p[0])
def test_matmul_floor_sides_compute_the_same_product(product):
    """Each floor case's JAX and torch steps give the same product (at small sizes: every
    dimension d as d % 11 + 2, so shared ones stay equal and the others differ), and the run
    lists the cases."""
    from benchmarks import run

    name, equation, a_shape, b_shape = product
    a_shape, b_shape = ([d % 11 + 2 for d in shape] for shape in (a_shape, b_shape))
    jax_out = matmul_floor._jax(equation, a_shape, b_shape)["fwd"]()
    torch_out = matmul_floor._torch(equation, a_shape, b_shape)["fwd"]()
    np.testing.assert_allclose(jax_out, torch_out.numpy(), rtol=1e-5, atol=1e-6)
    assert f"matmul floor: {name}" in [case.name for case in run.all_cases()]


def _namespace(**given) -> argparse.Namespace:
    return argparse.Namespace(resume=given.pop("resume", False), step_delay=0.0, **given)


def test_resume_takes_the_options_left_out_from_the_run(tmp_path):
    out = str(tmp_path / "run")
    saved = TrainConfig(model="se-cnn", epochs=3, lr=0.01, out=out, limit=100)
    (tmp_path / "run").mkdir()
    write_json(tmp_path / "run" / "config.json", saved.to_dict())
    resumed = options.train_config(_namespace(out=out, resume=True, checkpoint_every=7))
    assert resumed == TrainConfig(**{**saved.to_dict(), "checkpoint_every": 7})
    fresh = options.train_config(_namespace(model="cnn"))
    assert fresh == TrainConfig(model="cnn", out=os.path.join("runs", "cnn-distorted-digits"))


def test_the_main_command_twice_resumes_or_starts_a_new_run_dir(capsys, tmp_path, monkeypatch):
    """Without --out, a second run of the same command resumes the finished run (and reports
    its result); another config goes to a new numbered directory."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "cnn", "--epochs", "1", "--limit", "16", "--batch-size", "8",
            "--no-progress"]
    out = os.path.join("runs", "cnn-distorted-digits")
    assert cli.main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[0] == f"starting a new run in {out}"
    assert cli.main(argv) == 0
    second = capsys.readouterr().out.splitlines()
    assert second[0] == f"{out} holds a run of this config: resuming it (--out DIR to start anew)"
    assert second[-1].split(" (")[0] == first[-1].split(" (")[0] == "completed at step 2"
    assert second[-1].split(": ")[1] == first[-1].split(": ")[1]  # the same test metrics
    other = TrainConfig(model="cnn", epochs=1, limit=16, batch_size=8, seed=1, out=out)
    config, resume, action = pick_run_dir(other)
    assert (config.out, resume) == (f"{out}-2", False)
    assert action == f"starting a new run in {out}-2 ({out} holds another one)"


def test_eval_of_a_checkpoint_that_does_not_fit_is_one_line(capsys, tmp_path):
    config = TrainConfig(model="cnn", limit=64, batch_size=32, out=str(tmp_path))
    write_json(tmp_path / "config.json", config.to_dict())
    with Checkpoints(tmp_path / "checkpoints") as checkpoints:
        checkpoints.save(1, {"params": {"w": np.zeros(3)}}, config.to_dict())
    assert cli.main(["eval", "--run", str(tmp_path)]) == cli.EXIT_ERROR
    assert "is corrupt or does not fit this model" in _error_line(capsys)


@pytest.mark.parametrize(("config", "argv", "message"), [
    ("null", [], "config.json is not a run config: not a JSON object"),
    ('{"epochs": "3"}', [], "is not a valid TrainConfig: epochs must be int or None, got '3'"),
    ('{"trainer": "reinforce", "num_glimpses": 2, "zoom": 3}', [],
     "is not a valid RamConfig: not a RamConfig: unknown fields ['zoom']"),
    ('{"trainer": "supervised", "model": "cnn"}', ["--model", "ram"],
     "is a supervised run, not a reinforce one"),
    ('{"trainer": "reinforce", "lr": true}', [], "lr must be float, got True"),
])
def test_a_broken_run_config_is_one_line(capsys, tmp_path, config, argv, message):
    """A hand-edited config.json, and --model ram --resume on a CNN run: train --resume and
    eval refuse them in one line."""
    (tmp_path / "config.json").write_text(config)
    assert cli.main(["train", "--out", str(tmp_path), "--resume", *argv]) == cli.EXIT_ERROR
    assert message in _error_line(capsys)
    if not argv:
        assert cli.main(["eval", "--run", str(tmp_path)]) == cli.EXIT_ERROR
        assert message in _error_line(capsys)


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--epochs", "12"), ("--batch-size", "64"), ("--lr", "0.003"),
                            ("--seed", "0"), ("--optimizer", "adam"), ("--dtype", "float32")]:
        assert re.search(rf"{option} \S+ .*?\(default {default}", text), option


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "ram", "--steps", "3", "--epochs", "2"],
     "give --steps or --epochs, not both"),
    (["train", "--model", "ram", "--optimizer", "sgd"], "--optimizer is not an option of"),
    (["train", "--model", "cnn", "--glimpses", "4"], "are options of --model ram"),
    (["train", "--model", "ram", "--steps", "5", "--batch-size", "100000"],
     "batch_size (100000) exceeds the training set"),
])
def test_bad_ram_options_are_one_line(capsys, tmp_path, argv, message):
    assert cli.main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == cli.EXIT_ERROR
    assert message in _error_line(capsys)


@pytest.mark.slow  # RAM runs stop and resume in tests/test_reinforce.py
def test_train_eval_and_resume_ram(capsys, tmp_path):
    out = str(tmp_path / "ram")
    common = ["--out", out, "--no-progress", "--log-every", "2"]
    argv = ["train", "--model", "ram", "--steps", "4", "--glimpses", "2", "--limit", "32",
            "--batch-size", "16", *common]
    assert cli.main(argv) == 0
    assert "training RAM (2 learned glimpses) on cluttered-digits for 4 steps" in \
        capsys.readouterr().out
    assert cli.main(["eval", "--run", out]) == 0
    assert f"{out}: step 4: test accuracy" in capsys.readouterr().out
    # A resume finds the RAM run by its directory and keeps its saved options.
    assert cli.main(["train", "--resume", "--steps", "6", *common]) == 0
    assert "RAM (2 learned glimpses)" in capsys.readouterr().out
    saved = options.ram_config(_namespace(out=out, resume=True))
    assert (saved.num_glimpses, saved.steps, saved.train_examples) == (2, 6, 32)


# --- every model `list` offers --------------------------------------------------------------


def _listed_models(capsys) -> list[str]:
    """The names `flax-attention list` prints under its model and network sections."""
    sections = list(_list_sections(capsys).values())
    return [*sections[1], *sections[2]]


def _expected_refusal(name: str) -> str | None:
    """What `train --model name` must say when it refuses (None: it must train)."""
    if name.startswith("ram_"):
        return f"{name} is a recurrent attention model (--model ram trains one with REINFORCE)"
    if name.startswith("residual_attention_"):  # a total stride of 32 or 4: not 42 x 42
        return f"model {name!r} does not fit the distorted-digits images (42, 42, 1)"
    return None


# Trained for a real epoch in the walk; the other classifiers take the cheaper path (below).
REAL_EPOCH = ("cnn", "ram")


def _train_tiny(name: str, out: Path) -> int:
    """`train --model name --epochs 1` on 16 examples in batches of 8 (2 steps)."""
    glimpses = ["--glimpses", "1"] if name == "ram" else []
    return cli.main(["train", "--model", name, "--epochs", "1", "--limit", "16", "--batch-size",
                     "8", *glimpses, "--out", str(out), "--no-progress"])


def _assert_trained(capsys, name: str, out: Path, status: int) -> None:
    assert status == 0, (name, capsys.readouterr().err)
    assert "completed at step 2 (" in capsys.readouterr().out, name
    assert read_run_config(out)[0] == ("reinforce" if name == "ram" else "supervised")
    assert (out / "checkpoints" / "2").is_dir(), name


# One name of each kind `list` prints: a small classifier, RAM, a registry classifier, a
# segmenter, a detector and a registry RAM (refused by the supervised trainer).
_WALK_DEFAULT = ("cnn", "se-cnn", "ram", "resnet18", "danet_resnet50", "detr_resnet50",
                 "ram_6_8x8_1")


@pytest.mark.parametrize("every", [pytest.param(False, id="one-of-each-kind"),
                                   pytest.param(True, id="all", marks=pytest.mark.slow)])
def test_every_listed_model_trains_or_is_refused_before_writing(capsys, tmp_path, monkeypatch,
                                                                 every):
    """`train --model M --epochs 1` for every name `list` prints (by default one name of each
    kind; all of them under `-m slow`). A refusal is one line, exit 1 and no run directory.
    `REAL_EPOCH` train one epoch of tiny data; for the other classifiers (small CNNs and the
    registry's networks, whose compilation is slow) the run is built as `train` builds it (data
    loaded, model checked against the images) and its epoch skipped;
    `test_every_small_classifier_trains_an_epoch` (slow) trains the small ones for real."""
    names = _listed_models(capsys)
    assert {*list_classifiers(), *_WALK_DEFAULT} <= set(names)
    names = names if every else list(_WALK_DEFAULT)
    real_fit = Trainer.fit

    def fit(trainer, resume=False, *, step_delay=0.0):
        if getattr(trainer.config, "model", "ram") in REAL_EPOCH:
            return real_fit(trainer, resume, step_delay=step_delay)
        return TrainResult("completed", {"step": 0, "wall_s": 0.0})

    monkeypatch.setattr(Trainer, "fit", fit)
    for name in names:
        out = tmp_path / name
        status = _train_tiny(name, out)
        refusal = _expected_refusal(name)
        if refusal is not None:
            assert status == cli.EXIT_ERROR, name
            assert refusal in _error_line(capsys), name
            assert not out.exists(), name
        elif name in REAL_EPOCH:
            _assert_trained(capsys, name, out, status)
        else:
            assert status == 0, (name, capsys.readouterr().err)
            assert "completed at step 0" in capsys.readouterr().out, name


@pytest.mark.slow
@pytest.mark.parametrize("name", list_classifiers())
def test_every_small_classifier_trains_an_epoch(capsys, tmp_path, name):
    _assert_trained(capsys, name, tmp_path / name, _train_tiny(name, tmp_path / name))
