"""Transports: the noising paths TiM is trained on, and what follows from them.

A transport fixes the forward state ``x_t = alpha_t x + sigma_t eps`` and the
quantity the network predicts, ``F* = alpha_hat_t x + sigma_hat_t eps``. From
those two pairs everything else follows (the state-transition identity of
Wang et al., arXiv 2509.04394):

* the exact map from ``x_t`` to ``x_r`` given the ideal ``F``:
  ``x_r = A(t, r) x_t + B(t, r) F``;
* the TiM regression target
  ``F_hat = alpha_hat x + sigma_hat eps + (B / dB/dt) (alpha_hat' x + sigma_hat' eps - dF/dt)``.

The base class implements these generically from the schedules; each transport
overrides them with closed forms that are exact at ``r == t`` (where ``B`` and
``dB/dt`` would otherwise be divided) and cheaper. Tests check the closed forms
against the generic ones.

Time runs as in the official code (``tim/schedulers/transports.py`` of
github.com/WZDTHU/TiM): ``t = T_max`` is noise, ``t = T_min`` is data, and
``r <= t``. Every function is pure and broadcasts: pass ``t`` shaped like
``x`` (e.g. ``(B, 1, 1, 1)``) or as a scalar.

Every transport is a frozen dataclass, hence hashable: it can be a static
argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from jax.typing import DTypeLike
  import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Transport:
  """Base class. Subclasses define the schedules; the rest is generic."""

  T_max: float = 1.0
  T_min: float = 0.0
  sigma_d: float = 1.0  # Used only by the time weighting of the loss.

  name = "transport"
  supports_stochastic = False

  # --- what a transport must define ---------------------------------------

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    """Returns (alpha_t, sigma_t, alpha_t', sigma_t')."""
    raise NotImplementedError

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    """Returns (alpha_hat_t, sigma_hat_t, alpha_hat_t', sigma_hat_t')."""
    raise NotImplementedError

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    """One draw of training time per element of ``shape``."""
    raise NotImplementedError

  def c_noise(self, t: Array) -> Array:
    """What the network receives instead of raw time."""
    raise NotImplementedError

  def tangent_time(self, t: Array) -> Array:
    """The loss's tangent time warp (``weight_time_tangent``): ``tan t`` of
    an angle-like time (OT-FM, TrigFlow and VP times lie in [0, pi/2)).
    Noise-level transports override it."""
    return jnp.tan(t)

  # --- generic consequences ----------------------------------------------

  def x_t(self, x: Array, eps: Array, t: Array) -> Array:
    """The noisy state alpha_t x + sigma_t eps."""
    alpha, sigma, _, _ = self.interpolant(t)
    return alpha * x + sigma * eps

  def velocity(self, x: Array, eps: Array, t: Array) -> Array:
    """dx_t/dt along the path with (x, eps) fixed."""
    _, _, d_alpha, d_sigma = self.interpolant(t)
    return d_alpha * x + d_sigma * eps

  def diffusion_target(self, x: Array, eps: Array, t: Array) -> Array:
    """The ideal network output ``alpha_hat x + sigma_hat eps``."""
    a_hat, s_hat, _, _ = self.prediction(t)
    return a_hat * x + s_hat * eps

  def _delta(self, t):
    alpha, sigma, _, _ = self.interpolant(t)
    a_hat, s_hat, _, _ = self.prediction(t)
    return s_hat * alpha - a_hat * sigma

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    """(A, B) with ``x_r = A x_t + B F`` for the ideal F (``F = F*``)."""
    alpha_t, sigma_t, _, _ = self.interpolant(t)
    alpha_r, sigma_r, _, _ = self.interpolant(r)
    a_hat, s_hat, _, _ = self.prediction(t)
    delta = self._delta(t)
    a = (alpha_r * s_hat - sigma_r * a_hat) / delta
    b = (sigma_r * alpha_t - alpha_r * sigma_t) / delta
    return a, b

  def target_ratio(self, t: Array, r: Array) -> Array:
    """B(t, r) / dB(t, r)/dt, the factor in front of the derivative term.

    Generic version through ``jax.jvp``; undefined (0/0) where ``r == t`` for
    transports whose ``dB/dt`` vanishes there, so subclasses give closed forms.
    """

    def b_of_t(tt):
      return self.transition_coefficients(tt, r)[1]

    b, db_dt = jax.jvp(b_of_t, (t,), (jnp.ones_like(t),))
    return b / db_dt

  def target(
    self,
    x: Array,
    eps: Array,
    t: Array,
    r: Array,
    dF_dt: Array,
    diffusion_target: Array | None = None,
  ) -> Array:
    """The TiM regression target (official ``Transport.target``).

    Args:
      x, eps: clean data and noise.
      t, r: times, broadcastable to ``x``.
      dF_dt: the total time derivative of the (stop-gradient) network along
        the noising path with r fixed; 0 for pure diffusion rows.
      diffusion_target: overrides ``alpha_hat x + sigma_hat eps`` (the
        enhanced, model-guidance target mixes model predictions into it).
    """
    if diffusion_target is None:
      diffusion_target = self.diffusion_target(x, eps, t)
    _, _, d_a_hat, d_s_hat = self.prediction(t)
    return diffusion_target + self.target_ratio(t, r) * (
      d_a_hat * x + d_s_hat * eps - dF_dt
    )

  def transition(self, x_t: Array, t: Array, r: Array, F: Array) -> Array:
    """Deterministic x_t -> x_r with the network output F."""
    a, b = self.transition_coefficients(t, r)
    return a * x_t + b * F

  def stochastic_transition(
    self,
    x_t: Array,
    t: Array,
    r: Array,
    F: Array,
    ratio: Array,
    xi: Array,
  ) -> Array:
    """The sampler's stochastic step with standard-normal draws ``xi`` (the
    shape of ``x_t``); defined for OT-FM only (others raise)."""
    del x_t, t, r, F, ratio, xi
    raise ValueError(
      f"stochastic sampling is defined only for OT-FM, not for {self.name}"
    )


def _lognormal(key, shape, dtype, mean, std):
  return jnp.exp(mean + std * jax.random.normal(key, shape, dtype))


@dataclasses.dataclass(frozen=True)
class OTFM(Transport):
  """Linear flow matching; the network predicts the velocity eps - x."""

  T_max: float = 1.0
  T_min: float = 0.0
  sigma_d: float = 1.0
  P_mean: float = 0.0
  P_std: float = 1.0

  name = "ot_fm"
  supports_stochastic = True

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    one = jnp.ones_like(t)
    return 1.0 - t, t, -one, one

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    return -one, one, zero, zero

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    s = _lognormal(key, shape, dtype, self.P_mean, self.P_std)
    return s / (1.0 + s)  # logit-normal in t

  def c_noise(self, t: Array) -> Array:
    return t

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    return jnp.ones_like(t * r), r - t

  def target_ratio(self, t: Array, r: Array) -> Array:
    return t - r

  def target(
    self,
    x: Array,
    eps: Array,
    t: Array,
    r: Array,
    dF_dt: Array,
    diffusion_target: Array | None = None,
  ) -> Array:
    if diffusion_target is None:
      diffusion_target = eps - x
    return diffusion_target - (t - r) * dF_dt

  def transition(self, x_t: Array, t: Array, r: Array, F: Array) -> Array:
    return x_t - (t - r) * F

  def stochastic_transition(
    self,
    x_t: Array,
    t: Array,
    r: Array,
    F: Array,
    ratio: Array,
    xi: Array,
  ) -> Array:
    """Euler–Maruyama step of the reverse SDE with g^2 = 2 ratio t (official
    ``OT_FM.from_x_t_to_x_r`` with ``s_ratio > 0``), ``xi`` its
    standard-normal draws.

    The noise estimate is ``eps_hat = x_t + (1 - t) F`` and the score is taken
    as ``-eps_hat / t``.
    """
    h = t - r
    eps_hat = x_t + (1.0 - t) * F
    drift = x_t - h * F - ratio * eps_hat * h
    return drift + jnp.sqrt(2.0 * ratio * t * h) * xi


@dataclasses.dataclass(frozen=True)
class TrigFlow(Transport):
  """alpha = cos t, sigma = sin t; predicts v = -sin t x + cos t eps.

  As in the official code, time is ``arctan(s)`` with unit-variance noise and
  no sigma_d scaling of the data (not sCM's parameterisation).
  """

  T_max: float = 1.57
  T_min: float = 0.0
  sigma_d: float = 0.5
  P_mean: float = -1.0
  P_std: float = 1.6

  name = "trigflow"

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    return jnp.cos(t), jnp.sin(t), -jnp.sin(t), jnp.cos(t)

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    return -jnp.sin(t), jnp.cos(t), -jnp.cos(t), -jnp.sin(t)

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    return jnp.arctan(_lognormal(key, shape, dtype, self.P_mean, self.P_std))

  def c_noise(self, t: Array) -> Array:
    return t

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    return jnp.cos(t - r), -jnp.sin(t - r)

  def target_ratio(self, t: Array, r: Array) -> Array:
    return jnp.tan(t - r)


@dataclasses.dataclass(frozen=True)
class EDM(Transport):
  """EDM with the c_in-scaled input and EDM's F-prediction.

  The closed forms are the mathematically correct ones, derived from the
  schedules as in the base class; the official ``EDM.target`` and
  ``EDM.from_x_t_to_x_r`` have sigma_d^3 where sigma_d^2 belongs, which is exact
  only for sigma_d = 1.
  """

  # Noise levels sigma = t, from T_max down to T_min.
  T_max: float = 80.0
  T_min: float = 0.01
  sigma_d: float = 0.5  # The data's standard deviation.
  # Training times: log t ~ N(P_mean, P_std^2).
  P_mean: float = -1.2
  P_std: float = 1.2

  name = "edm"

  def _s(self, t):
    return jnp.sqrt(t * t + self.sigma_d**2)

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    s = self._s(t)
    return 1.0 / s, t / s, -t / s**3, self.sigma_d**2 / s**3

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    s, sd = self._s(t), self.sigma_d
    return t / (sd * s), -sd / s, sd / s**3, sd * t / s**3

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    return _lognormal(key, shape, dtype, self.P_mean, self.P_std)

  def c_noise(self, t: Array) -> Array:
    return jnp.log(t) / 4.0

  def tangent_time(self, t: Array) -> Array:
    # The time is the noise level sigma, which already is the tangent of the
    # trigonometric angle (TrigFlow's t = arctan sigma). tan(sigma), which
    # the official weighting would take, changes sign along (0, 80] and
    # makes the sqrt weight NaN.
    return t

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    sd2 = self.sigma_d**2
    denom = self._s(r) * self._s(t)
    return (sd2 + t * r) / denom, self.sigma_d * (t - r) / denom

  def target_ratio(self, t: Array, r: Array) -> Array:
    return (t - r) * self._s(t) ** 2 / (self.sigma_d**2 + t * r)


@dataclasses.dataclass(frozen=True)
class VP(Transport):
  """Variance-preserving SDE; predicts eps."""

  T_max: float = 1.0
  T_min: float = 1e-5
  sigma_d: float = 1.0
  beta_min: float = 0.1
  beta_d: float = 19.9
  T: int = 1000  # c_noise = (T - 1) t

  name = "vp"

  def beta(self, t: Array) -> Array:
    """The VP noise level sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return jnp.sqrt(jnp.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))

  def d_beta(self, t: Array) -> Array:
    """The derivative of ``beta`` in t."""
    b = self.beta(t)
    return (self.beta_d * t + self.beta_min) * (b * b + 1.0) / (2.0 * b)

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    b = self.beta(t)
    norm = jnp.sqrt(b * b + 1.0)
    g = 0.5 * (self.beta_d * t + self.beta_min)
    return 1.0 / norm, b / norm, -g / norm, g / (b * norm)

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    return zero, one, zero, zero

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    u = jax.random.uniform(key, shape, dtype)
    return 1.0 + u * (self.T_min - 1.0)  # U[T_min, 1]

  def c_noise(self, t: Array) -> Array:
    return (self.T - 1) * t

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    bt, br = self.beta(t), self.beta(r)
    nr = jnp.sqrt(br * br + 1.0)
    return jnp.sqrt(bt * bt + 1.0) / nr, (br - bt) / nr

  def target_ratio(self, t: Array, r: Array) -> Array:
    return (self.beta(t) - self.beta(r)) / self.d_beta(t)


@dataclasses.dataclass(frozen=True)
class VE(Transport):
  """Variance-exploding SDE; predicts -eps."""

  T_max: float = 100.0
  T_min: float = 0.02
  sigma_d: float = 1.0

  name = "ve"

  def interpolant(self, t: Array) -> tuple[Array, Array, Array, Array]:
    one = jnp.ones_like(t)
    return one, t, jnp.zeros_like(t), one

  def prediction(self, t: Array) -> tuple[Array, Array, Array, Array]:
    zero = jnp.zeros_like(t)
    return zero, -jnp.ones_like(t), zero, zero

  def sample_t(
    self, key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
  ) -> Array:
    u = jax.random.uniform(key, shape, dtype)
    return self.T_min * (self.T_max / self.T_min) ** u

  def c_noise(self, t: Array) -> Array:
    return jnp.log(0.5 * t)

  def tangent_time(self, t: Array) -> Array:
    # The noise level sigma, as EDM's (see EDM.tangent_time).
    return t

  def transition_coefficients(self, t: Array, r: Array) -> tuple[Array, Array]:
    return jnp.ones_like(t * r), t - r

  def target_ratio(self, t: Array, r: Array) -> Array:
    return t - r


# Lower-case keys only: ``get`` lower-cases the name, so the official class
# names (OT_FM, TrigFlow, EDM, VP_SDE, VE_SDE) find their entries here.
_REGISTRY = {
  "ot_fm": OTFM,
  "otfm": OTFM,
  "ot-fm": OTFM,
  "trigflow": TrigFlow,
  "edm": EDM,
  "vp": VP,
  "vp_sde": VP,
  "ve": VE,
  "ve_sde": VE,
}

# Official constructor arguments that name a field differently here.
_ALIASES = {
  VP: {"epsilon_t": "T_min"},
  VE: {"sigma_min": "T_min", "sigma_max": "T_max"},
}

# Official constructor arguments that belong to the loss, not the transport.
LOSS_ONLY_PARAMS = ("enhance_target", "w_gt", "w_cond", "w_start", "w_end")


def names() -> list[str]:
  """The transports' names, sorted."""
  return sorted(_REGISTRY)


def _class(name: str):
  cls = _REGISTRY.get(name.lower())
  if cls is None:
    raise UserError(
      f"unknown transport {name!r}; choose one of {names()} (or the official"
      " class names OT_FM, TrigFlow, EDM, VP_SDE, VE_SDE)"
    )
  return cls


def field_names(name: str) -> set:
  """The fields (parameters) of the transport called ``name``, with the
  official spellings it accepts."""
  cls = _class(name)
  return {f.name for f in dataclasses.fields(cls)} | set(_ALIASES.get(cls, {}))


def get(name: str, **params: Any) -> Transport:
  """Builds a transport by name.

  Accepts the lower-case names ``ot_fm``, ``trigflow``, ``edm``, ``vp``,
  ``ve`` and the official class names (``OT_FM``, ``TrigFlow``, ``EDM``,
  ``VP_SDE``, ``VE_SDE``). ``params`` are the transport's fields; the official
  spellings (``epsilon_t``, ``sigma_min``, ``sigma_max``) are accepted too.
  """
  cls = _class(name)
  aliases = _ALIASES.get(cls, {})
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in params.items():
    key = aliases.get(key, key)
    if key not in fields:
      hint = (
        " (it belongs to the loss config)" if key in LOSS_ONLY_PARAMS else ""
      )
      raise UserError(
        f"transport {cls.name!r} has no parameter {key!r}{hint}; its "
        f"parameters are {sorted(fields)}"
      )
    kwargs[key] = value
  return cls(**kwargs)


def time_grid(
  transport: Transport, num_steps: int, dtype: DTypeLike | None = None
) -> np.ndarray:
  """``linspace(T_max, T_min, num_steps + 1)`` built in float64 on the host.

  Returned in ``dtype`` (float64 if x64 is enabled, else float32 by default):
  the official scripts cast the grid to bf16, which makes long grids
  non-uniform; this port keeps it in float32 or better.
  """
  import numpy as np

  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if dtype is None:
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  grid = np.linspace(
    transport.T_max, transport.T_min, num_steps + 1, dtype=np.float64
  )
  return grid.astype(dtype)


__all__ = [
  "Transport",
  "OTFM",
  "TrigFlow",
  "EDM",
  "VP",
  "VE",
  "get",
  "names",
  "time_grid",
]
