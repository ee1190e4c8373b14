"""The REINFORCE trainer of RAM: the gradient estimator on a bandit with a closed-form answer,
the hybrid loss by hand, Monte Carlo evaluation, a short training run on cluttered digits,
checkpoints (interrupt, resume, refusals) and the glimpse-path plot."""

from __future__ import annotations

import dataclasses
import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.functional import gaussian_log_prob
from flax_attention.glimpse import plot_glimpse_path
from flax_attention.models.ram import RamOutput, RecurrentAttentionModel
from flax_attention.train import loop
from flax_attention.train.checkpoint import CheckpointError
from flax_attention.train.reinforce import (
    RamConfig,
    hybrid_loss,
    load_run,
    predict,
    reinforce_surrogate,
    train_ram,
    visualize_run,
)
from tests.helpers import random_nhwc

# --- the estimator ----------------------------------------------------------------------------

MU, TARGET, STD, OFFSET = 0.0, 0.5, 0.5, 5.0  # policy N(MU, STD^2), reward OFFSET - (a - TARGET)^2


def _bandit_gradients(baseline: float | None, n: int = 20000) -> np.ndarray:
    """Per-sample REINFORCE estimates of dJ/dmu, J(mu) = E[OFFSET - (a - TARGET)^2]."""
    actions = MU + STD * jax.random.normal(jax.random.key(0), (n, 1, 1))
    rewards = OFFSET - (actions[:, 0, 0] - TARGET) ** 2

    def surrogate(mu, action, reward):
        log_prob = gaussian_log_prob(action, mu, STD)[None]  # [B = 1, L = 1]
        b = None if baseline is None else jnp.full((1, 1), baseline)
        return reinforce_surrogate(log_prob, reward[None], b)

    grads = jax.vmap(jax.grad(surrogate), (None, 0, 0))(jnp.asarray([MU]), actions, rewards)
    return -np.asarray(grads[:, 0], np.float64)  # the surrogate is minimised: -grad is the ascent


def test_reinforce_matches_the_analytic_gradient_and_the_baseline_cuts_variance():
    """J(mu) = OFFSET - (mu - TARGET)^2 - STD^2, so dJ/dmu = -2 (mu - TARGET) = 1. With e = a - mu,
    d = mu - TARGET and b = J(mu), the estimates are g = (R - b) e / s^2 with the baseline and
    g + b e / s^2 without: both unbiased, with variances 10 s^2 + 8 d^2 (4.5) and that plus
    b^2 / s^2 - 4 b (67.5; the Gaussian moments of e give both in closed form)."""
    d, b = MU - TARGET, OFFSET - (MU - TARGET) ** 2 - STD**2
    plain, based = _bandit_gradients(None), _bandit_gradients(b)
    for g in (plain, based):
        standard_error = g.std() / math.sqrt(len(g))
        assert abs(g.mean() - (-2 * d)) < 4 * standard_error
    variance_based = 10 * STD**2 + 8 * d**2
    variance_plain = variance_based + b**2 / STD**2 - 4 * b
    np.testing.assert_allclose([based.var(), plain.var()], [variance_based, variance_plain],
                               rtol=0.1)
    assert based.var() / plain.var() < 0.1


def test_advantage_carries_no_gradient():
    log_probs, rewards, baselines = jnp.ones((2, 3)), jnp.ones(2), jnp.full((2, 3), 0.5)
    d_baselines = jax.grad(reinforce_surrogate, argnums=2)(log_probs, rewards, baselines)
    np.testing.assert_array_equal(d_baselines, 0.0)
    d_log_probs = jax.grad(reinforce_surrogate)(log_probs, rewards, baselines)
    np.testing.assert_allclose(d_log_probs, -0.5 / 2)  # -(R - b) / B


def test_surrogate_accumulates_in_float32_and_checks_shapes():
    log_probs, rewards = jnp.full((2, 3), -3e4, jnp.float16), jnp.full((2,), 3e4, jnp.float16)
    loss = reinforce_surrogate(log_probs, rewards)  # 2.7e9: beyond float16's range
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 3 * 9e8, rtol=1e-3)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\] \(2,\).*got \(3,\)"):
        reinforce_surrogate(jnp.zeros((2, 3)), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"log_probs and baselines must agree in shape"):
        reinforce_surrogate(jnp.zeros((2, 3)), jnp.zeros(2), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"log_probs must not be empty.*\(0, 3\)"):
        reinforce_surrogate(jnp.zeros((0, 3)), jnp.zeros(0))  # the mean over no sample
    with pytest.raises(ValueError, match=r"log_probs must have rank 2"):
        reinforce_surrogate(jnp.zeros(2), jnp.zeros(2))


def test_hybrid_loss_by_hand():
    """Example 0 is wrong (a tie goes to class 0), example 1 right: R = (0, 1)."""
    output = RamOutput(
        logits=jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]]),
        log_probs=jnp.asarray([[1.0, 2.0], [3.0, 5.0]]),
        baselines=jnp.asarray([[0.5, 0.5], [0.5, 0.25]]),
        locations=jnp.zeros((2, 2, 2)),
    )
    labels = jnp.asarray([1, 0])
    ce = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    mse = (0.25 + 0.25 + 0.25 + 0.5625) / 4
    reinforce_term = (-(1.0 * -0.5 + 2.0 * -0.5) - (3.0 * 0.5 + 5.0 * 0.75)) / 2  # -1.875
    loss, metrics = hybrid_loss(output, labels, reinforce_weight=0.5)
    np.testing.assert_allclose(loss, ce + mse + 0.5 * reinforce_term, rtol=1e-6)
    np.testing.assert_allclose([metrics["ce"], metrics["baseline_mse"], metrics["reinforce"],
                                metrics["accuracy"]], [ce, mse, reinforce_term, 0.5], rtol=1e-6)
    d_baselines = jax.grad(lambda b: hybrid_loss(output._replace(baselines=b), labels)[0])(
        output.baselines)
    np.testing.assert_allclose(d_baselines, [[0.25, 0.25], [-0.25, -0.375]], rtol=1e-6)


def test_hybrid_loss_with_step_rewards_by_hand():
    """Both examples predict (1, 0) after glimpses (1, 2); labels (1, 0) give the rewards
    r = (1, 0) and (0, 1), so the returns R_t = sum_{s >= t} r_s are (1, 0) and (1, 1)."""
    step = jnp.asarray([[0.0, 1.0], [math.log(3.0), 0.0]])
    output = RamOutput(logits=step[1][None].repeat(2, 0), log_probs=jnp.asarray([[1.0, 2.0],
                       [3.0, 5.0]]), baselines=jnp.asarray([[0.5, 0.5], [0.5, 0.25]]),
                       locations=jnp.zeros((2, 2, 2)), step_logits=step[None].repeat(2, 0))
    labels = jnp.asarray([1, 0])
    e = math.e
    ce = (math.log(1 + 1 / e) + math.log(4.0) + math.log(1 + e) + math.log(4.0 / 3.0)) / 4
    mse = (0.25 + 0.25 + 0.25 + 0.5625) / 4
    reinforce_term = -((1.0 * 0.5 + 2.0 * -0.5) + (3.0 * 0.5 + 5.0 * 0.75)) / 2  # -2.375
    _, metrics = hybrid_loss(output, labels, step_rewards=True)
    np.testing.assert_allclose([metrics["ce"], metrics["baseline_mse"], metrics["reinforce"],
                                metrics["accuracy"]], [ce, mse, reinforce_term, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="step_rewards needs output.step_logits"):
        hybrid_loss(output._replace(step_logits=None), labels, step_rewards=True)


def _ram_output(batch: int = 2, steps: int = 3, classes: int = 4) -> RamOutput:
    return RamOutput(jnp.zeros((batch, classes)), jnp.zeros((batch, steps)),
                     jnp.zeros((batch, steps)), jnp.zeros((batch, steps, 2)),
                     jnp.zeros((batch, steps, classes)))


@pytest.mark.parametrize(("output", "labels", "error", "match"), [
    (jnp.zeros((2, 4)), [0, 1], TypeError, r"output must have the fields"),
    (_ram_output(), jnp.zeros(2), TypeError, r"labels must be integer"),
    (_ram_output(), jnp.zeros((2, 1), int), ValueError, r"labels must have rank 1"),
    (_ram_output(), jnp.zeros(3, int), ValueError,
     r"output.logits and labels must agree in batch; got output.logits \(2, 4\), labels \(3,\)"),
    (_ram_output()._replace(baselines=jnp.zeros((2, 5))), [0, 1], ValueError,
     r"output.log_probs and output.baselines must agree in shape \[B, L\]"),
    (_ram_output()._replace(log_probs=jnp.zeros((1, 3)), baselines=jnp.zeros((1, 3))), [0, 1],
     ValueError, r"output.logits and output.log_probs must agree in batch"),
    (_ram_output()._replace(step_logits=jnp.zeros((2, 3, 5))), [0, 1], ValueError,
     r"output.step_logits and output.log_probs must agree in shape \[B, L, K\]"),
])
def test_hybrid_loss_names_bad_inputs(output, labels, error, match):
    with pytest.raises(error, match=match):
        hybrid_loss(output, labels, step_rewards=True)


def test_predict_averages_probabilities_over_samples():
    model = RecurrentAttentionModel(num_glimpses=2, glimpse_size=4, num_scales=2, hidden=8,
                                    what_features=8, where_features=8, num_classes=3, std=0.5)
    images = jnp.asarray(random_nhwc((2, 12, 12, 1)))
    params = jax.jit(model.init)({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                 images)["params"]
    key = jax.random.key(7)
    apply = jax.jit(lambda k: model.apply({"params": params}, images, rngs={"sample": k}))
    each = [jax.nn.softmax(apply(k).logits) for k in jax.random.split(key, 3)]
    averaged = predict(model, params, images, key, 3)
    np.testing.assert_allclose(averaged, np.mean(each, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(each[0], each[1])  # the samples differ, so the mean means something
    np.testing.assert_allclose(averaged.sum(-1), 1.0, rtol=1e-6)


# --- runs ------------------------------------------------------------------------------------

TINY = {"num_glimpses": 2, "glimpse_size": 6, "num_scales": 2, "hidden": 8, "steps": 12,
        "batch_size": 8, "train_examples": 64, "test_examples": 16, "mc_samples": 2,
        "checkpoint_every": 4, "log_every": 2, "progress": False}


@pytest.mark.slow  # the default suite trains RAM in the resume test below
def test_training_lowers_the_loss_and_beats_chance(tmp_path):
    """400 steps (about 20 s on 2 cores) take the test accuracy on 500 cluttered digits from
    chance (10 %, standard error 1.3 %) to 24..29 % (seeds 0 and 1, lr 1e-3 and 3e-3): the
    learned policy pays off only later (benchmarks/ram_results.py), hence the margin."""
    config = RamConfig(num_glimpses=4, hidden=128, lr=3e-3, steps=400, log_every=100,
                       test_examples=500, mc_samples=4, out=str(tmp_path), progress=False)
    metrics = train_ram(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in records if "ce" in r]
    assert metrics["status"] == "completed" and metrics["step"] == 400
    assert ce[-1] < ce[0] - 0.08, ce
    assert metrics["test_accuracy"] > 0.2, metrics


def _interrupt_at(step: int):
    """A progress bar that sends this process SIGTERM when it reaches `step`."""

    class Bar:
        def __init__(self, total, initial=0, enabled=True):
            self.n = initial

        def update(self, k):
            self.n += k
            if self.n == step:
                signal.raise_signal(signal.SIGTERM)

        def set_postfix(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

    return Bar


def test_interrupt_and_resume_equal_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = RamConfig(**TINY, out=str(tmp_path / "whole"))
    expected = train_ram(whole)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "progress_bar", _interrupt_at(5))
        cut = train_ram(dataclasses.replace(whole, out=str(tmp_path / "cut")))
    assert cut["status"] == "interrupted" and cut["step"] == 5
    assert "test_accuracy" not in cut
    resumed = train_ram(dataclasses.replace(whole, out=str(tmp_path / "cut"), resume=True))
    assert resumed["status"] == "completed"
    for key in ("step", "test_accuracy", "test_nll"):
        assert resumed[key] == expected[key]
    jax.tree.map(np.testing.assert_array_equal, load_run(tmp_path / "cut")[2],
                 load_run(tmp_path / "whole")[2])
    logs = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
             for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "cut")]
    assert logs[0] == logs[1]

    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_ram(whole)
    with pytest.raises(CheckpointError, match="another config: hidden=8 \\(now 16\\)"):
        train_ram(dataclasses.replace(whole, hidden=16, resume=True))

    png = visualize_run(tmp_path / "whole", tmp_path / "paths.png", num_images=2)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("steps", 0, "steps must be >= 1, got 0"),
    ("std", 0.0, "std must be > 0"),
    ("core", "gru", "core must be one of"),
    ("train_examples", 0, "train_examples must be >= 1"),
])
def test_bad_config(tmp_path, field, value, match):
    config = RamConfig(**{**TINY, field: value}, out=str(tmp_path))
    with pytest.raises(ValueError, match=match):
        train_ram(config)


def test_plot_glimpse_path(tmp_path):
    images = np.random.default_rng(0).uniform(size=(2, 20, 20, 1))
    locations = np.random.default_rng(1).uniform(-1, 1, (2, 3, 2))
    path = plot_glimpse_path(images, locations, tmp_path / "sub" / "g.png", patch_size=4,
                             titles=["a", "b"])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"locations \[B, L, 2\].*\(3, 3, 2\)"):
        plot_glimpse_path(images, np.zeros((3, 3, 2)), tmp_path / "bad.png")
