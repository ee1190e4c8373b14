"""The Recurrent Attention Model (RAM): hard visual attention trained with REINFORCE.

Mnih, Heess, Graves, Kavukcuoglu: "Recurrent Models of Visual Attention", NeurIPS 2014; the
reference is kevinzakka/recurrent-visual-attention (`modules.py`, `model.py`). At each of T
steps the agent looks at the image through the retina (`flax_attention.glimpse`) at a location
drawn from a Gaussian policy, updates its recurrent state, and after the last glimpse
classifies. Trained by `flax_attention.train.reinforce`.

Sub-networks, as the reference (names of their Dense layers follow its torch modules):
- glimpse network: `g = relu(fc3(relu(fc1(retina))) + fc4(relu(fc2(l))))` (what and where);
- core network: an RNN `h' = relu(i2h(g) + h2h(h))` or an LSTM (`core="lstm"`);
- location network: mean `tanh(fc(h))`, a sample `l ~ N(mean, std^2)` from the "sample" PRNG
  stream, detached, its log-probability (at the unclipped sample, as the reference), then
  clipped to [-1, 1]; h is detached as in the reference unless `reinforce_core`;
- baseline network: `fc(stop_gradient(h))`, one value per step;
- action network: `fc(h_t)`, the class logits; those of h_T are the prediction, those of every
  step (`RamOutput.step_logits`) serve the per-step rewards of `hybrid_loss`.

Differences from the reference: the first location is chosen by the policy from h_0 = 0 (a
learned starting point plus noise) instead of uniformly at random, so every one of the T glimpses
has a log-probability and a baseline (b_t estimates the return before l_t is drawn); the retina
samples bilinearly instead of rounding locations to pixels; the location network is one Dense
layer (the paper's), not two; `reinforce_core=True` lets the REINFORCE gradient train the core
and glimpse networks too (the paper's gradient w.r.t. all of theta; the reference detaches h);
`hybrid_loss(step_rewards=True)` rewards the classification after every glimpse (an option; the
paper rewards only the last).

The reference's own networks load whole from its checkpoints (`model_state` of its
`*_ckpt.pth.tar`; keys `sensor.fc1..fc4`, `rnn.i2h`, `rnn.h2h`, `locator.fc` (and
`locator.fc_lt`), `classifier.fc`, `baseliner.fc`), with its loop (`glimpse_first`: l_0 uniform
at random, the policy and the baseline read from the state after each glimpse) and its retina's
rounding of locations to whole pixels (`snap_locations`), for MNIST 28 x 28 (its classifier
returns log-softmax, ours logits):
- `ram_6_8x8_1`: the current code with `config.py`'s defaults: 6 glimpses of one 8 x 8 patch,
  std 0.05, 256 hidden units, h_g = h_l = 128, the two-layer location network (`fc` to 128,
  ReLU, `fc_lt`; `location_hidden`).
- `ram_6_8x8_2`: the checkpoint the repository ships (`models/ram_6_8x8_2_ckpt.pth.tar`, saved
  by its code of April 2018, `ram_6_8x8_2_params.json`: std 0.17): a one-layer `locator.fc`,
  the sample squashed by tanh instead of clipped (`squash_locations`), a ReLU on the baseline
  (`baseline_relu`). Its log-probabilities are those of the sample before the tanh (the
  2018 code evaluates the density at the squashed one).

Axis legend: B batch, H height, W width, C channels, L the number of glimpses T.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_choice, check_image
from flax_attention.functional.glimpse import METHODS, check_retina_args
from flax_attention.functional.ram import gaussian_log_prob
from flax_attention.glimpse import GlimpseSensor
from flax_attention.interop.torch import Converter, Rules, Shapes, dense, register

__all__ = [
    "CORES", "ActionNetwork", "BaselineNetwork", "CoreNetwork", "GlimpseNetwork",
    "LocationNetwork", "RamOutput", "RecurrentAttentionModel", "ram_6_8x8_1", "ram_6_8x8_2",
    "snap_to_pixels",
]

CORES = ("rnn", "lstm")


class RamOutput(NamedTuple):
    """What `RecurrentAttentionModel` returns (a pytree).

    Attributes:
      logits: `[B, num_classes]` float32, from the final hidden state.
      log_probs: `[B, L]` float32 log-probability of each location under the policy (zeros
        with random locations).
      baselines: `[B, L]` float32 baseline of each step (the reward expected before l_t).
      locations: `[B, L, 2]` the glimpse centres (x, y) in [-1, 1], in order.
      step_logits: `[B, L, num_classes]` float32, the logits after each glimpse (the last
        equals `logits`); None in outputs built without them.
    """

    logits: jax.Array
    log_probs: jax.Array
    baselines: jax.Array
    locations: jax.Array
    step_logits: jax.Array | None = None


class _Dense(nn.Module):
    """Makes Dense layers with the model's dtype, param_dtype and precision (construct the
    subclasses with keywords: these fields come first)."""

    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, name=name, **layers.numerics(self))


def snap_to_pixels(locations: jax.Array, height: int, width: int, patch_size: int
                   ) -> jax.Array:
    """The location the reference's retina really looks at (`Retina.extract_patch`): it
    truncates `0.5 * ((l + 1) * H)` to a whole pixel for both axes (H even for x) and crops
    the `patch_size` pixels from there minus `patch_size // 2`.

    Args:
      locations: `[B, 2]` (x, y) in [-1, 1].
      height, width: of the images.
      patch_size: side of the finest patch.

    Returns:
      `[B, 2]` the centres of those crops in [-1, 1] (so a pixel-aligned retina gives the
      reference's crops), without gradient.
    """
    start = jnp.trunc(0.5 * ((lax.stop_gradient(locations) + 1.0) * height))
    centre = start - patch_size // 2 + patch_size / 2
    return 2 * centre / jnp.array([width, height], locations.dtype) - 1


class GlimpseNetwork(_Dense):
    """What and where: `[B, H, W, C]`, `[B, 2]` -> `[B, features]`, features = the width of
    the combined representation (the reference's h_g + h_l).

    Attributes:
      features: the output width (256 in the paper).
      what_features: width of fc1 on the retina (h_g, 128).
      where_features: width of fc2 on the location (h_l, 128).
      patch_size, num_scales, scale, method: the retina's (see `GlimpseSensor`).
      snap_locations: the retina looks where the reference's does (`snap_to_pixels`; the
        "where" branch still sees the location itself); exact for even patch sides.
    """

    features: int = 256
    what_features: int = 128
    where_features: int = 128
    patch_size: int = 12
    num_scales: int = 3
    scale: int = 2
    method: str | None = None
    snap_locations: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, locations: jax.Array) -> jax.Array:
        sensor = GlimpseSensor(self.patch_size, self.num_scales, self.scale, self.method,
                               self.dtype)
        seen = locations
        if self.snap_locations:
            seen = snap_to_pixels(locations, *images.shape[1:3], self.patch_size)
        # [B, k, g, g, C] flattened in the reference's order, (k, C, g, g) (its `cat` of the
        # NCHW patches), so that `sensor.fc1` loads as it is saved for any C.
        phi = jnp.moveaxis(sensor(images, seen), -1, 2)
        what = nn.relu(self.dense(self.what_features, "fc1")(phi.reshape(phi.shape[0], -1)))
        where = nn.relu(self.dense(self.where_features, "fc2")(locations))
        return nn.relu(self.dense(self.features, "fc3")(what)
                       + self.dense(self.features, "fc4")(where))


class CoreNetwork(_Dense):
    """The recurrent core: `(carry, [B, F])` -> `(carry', [B, features])`.

    The carry is h `[B, features]` for the RNN, (c, h) for the LSTM (flax's `LSTMCell`, named
    "lstm"); `initial_carry` gives zeros.

    Attributes:
      features: the hidden width (256 in the paper).
      core: "rnn" (`h' = relu(i2h(g) + h2h(h))`) or "lstm".
    """

    features: int = 256
    core: str = "rnn"

    def initial_carry(self, batch: int):
        h = jnp.zeros((batch, self.features), self.dtype or jnp.float32)
        return h if self.core == "rnn" else (h, h)

    @staticmethod
    def hidden(carry) -> jax.Array:
        """The hidden state h of a carry."""
        return carry[1] if isinstance(carry, tuple) else carry

    @nn.compact
    def __call__(self, carry, g: jax.Array):
        if self.core == "lstm":
            return nn.LSTMCell(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="lstm")(carry, g)
        h = nn.relu(self.dense(self.features, "i2h")(g) + self.dense(self.features, "h2h")(carry))
        return h, h


class LocationNetwork(_Dense):
    """The Gaussian location policy: h `[B, F]` -> (l `[B, 2]` in [-1, 1], log pi(l) `[B]`).

    Draws from the "sample" PRNG stream; no gradient reaches l, the log-probability is
    differentiable w.r.t. this network's parameters (through the mean) and, unless `detach`,
    w.r.t. h.

    Attributes:
      std: the fixed standard deviation of the policy (0.05..0.2 in the reference).
      features: 2, the location's (x, y).
      detach: stop the gradient at h (the reference's choice).
      hidden: None for one Dense layer `fc` (the paper's); else the reference's two, `fc` to
        `hidden` units, ReLU, `fc_lt`.
      squash: `l = tanh(sample)` instead of clipping it (the reference's code of 2018).
    """

    std: float = 0.1
    features: int = 2
    detach: bool = True
    hidden: int | None = None
    squash: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = lax.stop_gradient(h) if self.detach else h
        if self.hidden is None:
            mean = jnp.tanh(self.dense(self.features, "fc")(h))
        else:
            mean = jnp.tanh(self.dense(self.features, "fc_lt")(
                nn.relu(self.dense(self.hidden, "fc")(h))))
        mean = mean.astype(jnp.float32)
        noise = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
        sample = lax.stop_gradient(mean + self.std * noise)
        location = jnp.tanh(sample) if self.squash else jnp.clip(sample, -1.0, 1.0)
        return location, gaussian_log_prob(sample, mean, self.std)


class BaselineNetwork(_Dense):
    """The reward baseline: h `[B, F]` -> `[B]` float32 (no gradient reaches h); `relu` rectifies
    it (the reference's code of 2018)."""

    features: int = 1
    relu: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        b = self.dense(self.features, "fc")(lax.stop_gradient(h))[:, 0].astype(jnp.float32)
        return nn.relu(b) if self.relu else b


class ActionNetwork(_Dense):
    """The classifier on hidden states: `[..., F]` -> `[..., features]` float32 logits."""

    features: int = 10

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return self.dense(self.features, "fc")(h).astype(jnp.float32)


class _GlimpseStep(nn.Module):
    """One step of the glimpse loop (scanned): choose l_t from h_t, glimpse, update the core;
    with `glimpse_first` (the carry is then (core carry, l_t)), glimpse at l_t, update the
    core, choose l_{t+1} and read the baseline from h_{t+1}.

    `location` None draws the locations uniformly from [-1, 1]^2 (random glimpses)."""

    glimpse: GlimpseNetwork
    core: CoreNetwork
    baseline: BaselineNetwork
    location: LocationNetwork | None
    glimpse_first: bool = False

    def _choose(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.location is None:
            return _uniform_locations(self.make_rng("sample"), h.shape[0]), jnp.zeros(
                (h.shape[0],), jnp.float32)
        return self.location(h)

    def __call__(self, carry, images: jax.Array):
        if self.glimpse_first:
            carry, location = carry
            carry, h_next = self.core(carry, self.glimpse(images, location))
            next_location, log_prob = self._choose(h_next)
            return (carry, next_location), (location, log_prob, self.baseline(h_next), h_next)
        h = CoreNetwork.hidden(carry)
        location, log_prob = self._choose(h)
        carry, h_next = self.core(carry, self.glimpse(images, location))
        return carry, (location, log_prob, self.baseline(h), h_next)


def _uniform_locations(key: jax.Array, batch: int) -> jax.Array:
    return jax.random.uniform(key, (batch, 2), jnp.float32, -1.0, 1.0)


class RecurrentAttentionModel(nn.Module):
    """RAM (Mnih et al. 2014): `[B, H, W, C]` -> `RamOutput` (see the module docstring).

    Needs a "sample" PRNG stream at init and apply (`rngs={"sample": key}`): the same key gives
    the same locations. The loop over glimpses is an `nn.scan`, so compile time does not grow
    with `num_glimpses`; the locations are also sown as ("intermediates", "attention").

    Attributes:
      num_glimpses: T, the number of glimpses (4, 6 or 8 in the paper's 60x60 results).
      glimpse_size: g, the retina's patch side; num_scales: k; scale: the ratio of patch sides;
      method: the retina's, "gather", "separable" or None (see `functional.retina`).
      std: the policy's fixed standard deviation, in units of the half image side.
      hidden: the width of the glimpse representation and of the core state (256).
      what_features, where_features: the glimpse network's inner widths (128, 128).
      core: "rnn" or "lstm".
      num_classes: the classifier's outputs.
      random_locations: draw every location uniformly from [-1, 1]^2 instead of from the
        policy (the baseline of the paper's comparison; log-probabilities are then zero).
      reinforce_core: the log-probabilities are differentiable w.r.t. the core and glimpse
        networks too (h not detached in the location network).
      location_hidden: None for the paper's one-layer location network, else the reference's
        two layers with this many hidden units (see `LocationNetwork`).
      glimpse_first: the reference's loop: l_0 uniform at random; after glimpse t the policy
        draws l_{t+1} from h_{t+1} and the baseline reads h_{t+1}, so `log_probs[:, t]` is that
        of l_{t+1} (the last location drawn is never looked at) and `baselines[:, t]` is
        b(h_{t+1}).
      snap_locations: the retina looks where the reference's does (see `GlimpseNetwork`).
      squash_locations, baseline_relu: the reference's code of 2018 (see `LocationNetwork`,
        `BaselineNetwork`).
    """

    num_glimpses: int = 6
    glimpse_size: int = 12
    num_scales: int = 3
    scale: int = 2
    method: str | None = None
    std: float = 0.1
    hidden: int = 256
    what_features: int = 128
    where_features: int = 128
    core: str = "rnn"
    num_classes: int = 10
    random_locations: bool = False
    reinforce_core: bool = False
    location_hidden: int | None = None
    glimpse_first: bool = False
    snap_locations: bool = False
    squash_locations: bool = False
    baseline_relu: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _check(self, images: jax.Array) -> None:
        check_image("images", images)
        check_choice("core", self.core, CORES)
        check_retina_args(images.shape, (images.shape[0], 2), self.glimpse_size,
                          self.num_scales, self.scale)
        check_choice("method", self.method or "separable", METHODS)
        if self.num_glimpses < 1 or not self.std > 0:
            raise ValueError(f"need num_glimpses >= 1 and std > 0, got num_glimpses "
                             f"{self.num_glimpses} and std {self.std}")

    @nn.compact
    def __call__(self, images: jax.Array) -> RamOutput:
        self._check(images)
        layer = {"dtype": self.dtype, "param_dtype": self.param_dtype, "precision": self.precision}
        core = CoreNetwork(features=self.hidden, core=self.core, **layer, name="core")
        location = LocationNetwork(std=self.std, detach=not self.reinforce_core,
                                   hidden=self.location_hidden, squash=self.squash_locations,
                                   **layer, name="location")
        scan = nn.scan(_GlimpseStep, variable_broadcast="params", in_axes=nn.broadcast,
                       split_rngs={"params": False, "sample": True}, length=self.num_glimpses)
        step = scan(
            GlimpseNetwork(features=self.hidden, what_features=self.what_features,
                           where_features=self.where_features, patch_size=self.glimpse_size,
                           num_scales=self.num_scales, scale=self.scale,
                           method=self.method, snap_locations=self.snap_locations, **layer,
                           name="glimpse"),
            core,
            BaselineNetwork(relu=self.baseline_relu, **layer, name="baseline"),
            None if self.random_locations else location,
            self.glimpse_first,
            name="step",
        )
        carry = core.initial_carry(images.shape[0])
        if self.glimpse_first:
            carry = (carry, _uniform_locations(self.make_rng("sample"), images.shape[0]))
        _, (locations, log_probs, baselines, hs) = step(carry, images)
        step_logits = jnp.swapaxes(
            ActionNetwork(features=self.num_classes, **layer, name="action")(hs), 0, 1)
        locations = jnp.swapaxes(locations, 0, 1)
        self.sow("intermediates", "attention", locations)
        return RamOutput(step_logits[:, -1], log_probs.T, baselines.T, locations, step_logits)


# kevinzakka/recurrent-visual-attention's networks (see the module docstring).
_KEVINZAKKA = functools.partial(
    RecurrentAttentionModel, num_glimpses=6, glimpse_size=8, num_scales=1, hidden=256,
    what_features=128, where_features=128, glimpse_first=True, snap_locations=True)
ram_6_8x8_1 = functools.partial(_KEVINZAKKA, scale=1, std=0.05, location_hidden=128)
ram_6_8x8_2 = functools.partial(_KEVINZAKKA, scale=2, std=0.17, squash_locations=True,
                                baseline_relu=True)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# kevinzakka's `RecurrentAttention`: `sensor.fc1..fc4` (GlimpseNetwork), `rnn.i2h`, `rnn.h2h`,
# `locator.fc` (and `locator.fc_lt`), `baseliner.fc`, `classifier.fc`.

_TORCH_NAMES = {"glimpse": "sensor", "core": "rnn", "location": "locator",
                "baseline": "baseliner", "action": "classifier"}


def _rules(module: RecurrentAttentionModel) -> Rules:
    if module.core != "rnn":
        raise ValueError(f"the reference's RecurrentAttention has an RNN core; got core "
                         f"{module.core!r}")
    layers_of = {"glimpse": ("fc1", "fc2", "fc3", "fc4"), "core": ("i2h", "h2h"),
                 "location": ("fc",) if module.location_hidden is None else ("fc", "fc_lt"),
                 "baseline": ("fc",), "action": ("fc",)}
    rules: Rules = {}
    for name, fcs in layers_of.items():
        for fc in fcs:
            rules |= dense((name, fc), f"{_TORCH_NAMES[name]}.{fc}")
    return rules


def _inputs(module: RecurrentAttentionModel, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    """Images whose channels give `sensor.fc1`'s k g^2 C inputs."""
    retina = module.num_scales * module.glimpse_size**2
    channels = max(shapes["sensor.fc1.weight"][1] // retina, 1)
    side = module.glimpse_size
    return (jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32),)


register(RecurrentAttentionModel)(Converter(_rules, _inputs))
