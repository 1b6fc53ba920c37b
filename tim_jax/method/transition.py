"""The TiM training target and loss, as pure functions.

Nothing here knows about parameters, optimisers or models: the network is a
callable. ``target`` forms the regression target from a stop-gradient network;
``loss`` draws (t, r) pairs and noise, runs the prediction, forms the target
and applies every weighting of the official trainer.

Batch partition. As in the official code, the first ``n_d`` rows of a batch are
pure diffusion rows (r = t, no derivative needed) and the last ``n_c`` rows are
consistency rows (r = T_min); the counts are static (round-half-even of
ratio × rows). The official code partitions each device's batch on its own;
``groups`` reproduces that under ``jit``: the batch is read as ``groups``
consecutive blocks and each block is partitioned. Set it to the number of
data shards so that the derivative rows are spread evenly over the devices
and no resharding is needed to slice them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from tim_jax.core import numerics
from tim_jax.core.errors import UserError
from tim_jax.method import transports as transports_lib

if TYPE_CHECKING:
  from jax.typing import DTypeLike

Array = jax.Array
PyTree = Any

DERIVATIVES = ("dde", "jvp")
WEIGHT_TIME_TYPES = ("constant", "reciprocal", "sqrt", "square", "Soft-Min-SNR")


def _bcast(t, x):
  """(B,) -> (B, 1, ..., 1) broadcastable against x."""
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def _rows(tree, groups, start, stop):
  """Rows [start, stop) of each of ``groups`` consecutive blocks."""

  def take(a):
    g = a.reshape((groups, a.shape[0] // groups) + a.shape[1:])
    g = g[:, start:stop]
    return g.reshape((-1,) + a.shape[1:])

  return jax.tree.map(take, tree)


def _place_rows(values, batch, groups, start, fill=0.0):
  """Inverse of ``_rows(.., start, None)``: rows before ``start`` of each block
  get ``fill``."""
  per = batch // groups
  g = values.reshape((groups, per - start) + values.shape[1:])
  pad = jnp.full((groups, start) + values.shape[1:], fill, values.dtype)
  return jnp.concatenate([pad, g], axis=1).reshape((batch,) + values.shape[1:])


def time_derivative(
  fn: Callable,
  x: Array,
  z: Array,
  t: Array,
  r: Array,
  *,
  transport: transports_lib.Transport,
  derivative: str = "dde",
  epsilon: float = 0.005,
  cond: PyTree = None,
) -> Array:
  """dF/dt of ``fn`` along the noising path (x, z fixed, r fixed), every row.

  ``fn(x_t, c_noise(t), c_noise(r))`` (or ``fn(.., cond)`` when ``cond`` is
  given) is the network. The result is float32 (or float64 under x64) whatever
  the network's compute dtype: a difference of bfloat16 outputs over 0.01 is
  noise.

  * ``dde``: central difference ``[F(t+e) - F(t-e)] / 2e`` with
    ``x_{t±e}`` recomputed from the same (x, z): two calls, not one
    ``jax.vmap`` over the ± axis, because on a mesh the SPMD partitioner
    may split that new axis and then all-gathers the rows (measured with
    ``tim_jax.commands.compile``); XLA still computes the work that does not depend
    on t (caption keys and values) once, and on CPU the two cost the same.
  * ``jvp``: forward mode, tangents (v_t, 1) for (x_t, t), r held fixed.
  """
  call = fn if cond is None else (lambda a, b, c: fn(a, b, c, cond))
  r_in = transport.c_noise(r)
  if derivative == "dde":

    def at(tt):
      x_tt = transport.x_t(x, z, _bcast(tt, x))
      return call(x_tt, transport.c_noise(tt), r_in)

    plus, minus = at(t + epsilon), at(t - epsilon)
    wide = numerics.wide(plus.dtype)
    return (plus.astype(wide) - minus.astype(wide)) / (2.0 * epsilon)
  if derivative == "jvp":
    t_b = _bcast(t, x)
    x_t = transport.x_t(x, z, t_b)
    v_t = transport.velocity(x, z, t_b)

    def f(x_in, t_in):
      return call(x_in, transport.c_noise(t_in), r_in)

    _, d_f = jax.jvp(f, (x_t, t), (v_t, jnp.ones_like(t)))
    return d_f.astype(numerics.wide(d_f.dtype))
  raise ValueError(
    f"derivative must be one of {DERIVATIVES}, got {derivative!r}"
  )


def target(
  fn: Callable,
  x: Array,
  z: Array,
  t: Array,
  r: Array,
  transport: transports_lib.Transport,
  derivative: str = "dde",
  epsilon: float = 0.005,
  *,
  cond: PyTree = None,
  num_diffusion: int = 0,
  groups: int = 1,
  diffusion_target: Array | None = None,
) -> Array:
  """The TiM regression target ``F_hat``, fully stop-gradient (the official
  ``Transport.target`` fed by ``TransitionSchedule.dde_derivative`` or
  ``jvp_derivative``).

  Args:
    fn: the network, ``fn(x_t, c_noise(t), c_noise(r))``; with ``cond`` given
      it is called as ``fn(x_t, c_noise(t), c_noise(r), cond)`` and ``cond``
      (a pytree of arrays with a leading batch axis) is sliced with the rows.
    x, z: clean data and noise, (B, H, W, C).
    t, r: times, (B,).
    transport: a ``transports.Transport``.
    derivative: ``"dde"`` (central finite difference) or ``"jvp"``.
    epsilon: the finite-difference step.
    num_diffusion: the first ``num_diffusion`` rows of each of ``groups``
      blocks are known to have r == t; the network is not evaluated on them
      (a static count, so shapes stay static).
    groups: see the module docstring.
    diffusion_target: overrides ``alpha_hat x + sigma_hat z`` (enhanced
      target).

  Rows with r == t get dF/dt = 0, whether or not they are counted in
  ``num_diffusion``.
  """
  batch = x.shape[0]
  if batch % groups:
    raise ValueError(f"batch {batch} is not divisible by groups={groups}")
  per_group = batch // groups
  if not 0 <= num_diffusion <= per_group:
    raise ValueError(
      f"num_diffusion={num_diffusion} must lie in [0, {per_group}]"
    )
  if num_diffusion == per_group:
    d_f = jnp.zeros(x.shape, numerics.wide(x.dtype))
  else:
    sel = lambda tree: _rows(tree, groups, num_diffusion, None)
    sub_t, sub_r = sel(t), sel(r)
    d_f = time_derivative(
      fn,
      sel(x),
      sel(z),
      sub_t,
      sub_r,
      transport=transport,
      derivative=derivative,
      epsilon=epsilon,
      cond=None if cond is None else sel(cond),
    )
    d_f = jnp.where(_bcast(sub_t == sub_r, d_f), 0.0, d_f)
    if num_diffusion:
      d_f = _place_rows(d_f, batch, groups, num_diffusion)
  d_f = jax.lax.stop_gradient(d_f)
  out = transport.target(
    x, z, _bcast(t, x), _bcast(r, x), d_f, diffusion_target=diffusion_target
  )
  return jax.lax.stop_gradient(out)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Every knob of the official ``TransitionSchedule``
  (``tim/schedulers/transition.py``, github.com/WZDTHU/TiM).

  The defaults are the settings of every shipped official config.
  """

  diffusion_ratio: float = 0.5
  consistency_ratio: float = 0.1
  derivative: str = "dde"
  epsilon: float = 0.005
  weight_time_type: str = "sqrt"
  weight_time_tangent: bool = True
  weight_time_sigmoid: bool = False
  weight_t_and_r: bool = True
  adaptive_eps: float = 1e-5  # The official literal 10e-6.
  directional_loss: bool = True
  proj_coeff: float = 1.0
  # Enhanced target (model guidance) with an EMA teacher, as the official
  # ``TransitionSchedule.get_enhanced_target`` and ``Transport.target``.
  enhance_target: bool = False
  w_gt: float = 1.0
  w_cond: float = 0.0
  w_start: float = 0.0
  w_end: float = 1.0
  # Partition blocks; see the module docstring.
  groups: int = 1

  def __post_init__(self):
    if self.derivative not in DERIVATIVES:
      raise UserError(
        f"loss.derivative must be one of {DERIVATIVES}, got {self.derivative!r}"
      )
    if self.weight_time_type not in WEIGHT_TIME_TYPES:
      raise UserError(
        f"loss.weight_time_type must be one of "
        f"{WEIGHT_TIME_TYPES}, got {self.weight_time_type!r}"
      )
    for name in ("diffusion_ratio", "consistency_ratio"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise UserError(f"loss.{name} must lie in [0, 1], got {value}")
    if self.epsilon <= 0:
      raise UserError(f"loss.epsilon must be > 0, got {self.epsilon}")
    if self.groups < 1:
      raise UserError(f"loss.groups must be >= 1, got {self.groups}")

  def counts(self, batch: int) -> tuple[int, int]:
    """(n_d, n_c) per group, with Python's round-half-even as the official
    code."""
    if batch % self.groups:
      raise UserError(
        f"batch {batch} is not divisible by groups={self.groups} "
        "(loss.groups; 0 means one group per data shard)"
      )
    per = batch // self.groups
    n_d = round(self.diffusion_ratio * per)
    n_c = round(self.consistency_ratio * per)
    if n_d + n_c > per:
      raise UserError(
        f"diffusion rows ({n_d}) and consistency rows ({n_c}) overlap in a "
        f"group of {per} rows; lower loss.diffusion_ratio or "
        "loss.consistency_ratio"
      )
    return n_d, n_c


def _per_row(key, row_ids, draw):
  """``draw(key_i)`` for each row, key_i = fold_in(key, row id): a row's
  draw does not depend on which other rows share its batch."""
  return jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(row_ids)


def sample_t_and_r(
  key: Array,
  batch: int,
  transport: transports_lib.Transport,
  config: LossConfig,
  dtype: DTypeLike = jnp.float32,
  row_ids: Array | None = None,
) -> tuple[Array, Array]:
  """Training times (official ``TransitionSchedule.sample_t_and_r``): t = max,
  r = min of two draws, then the positional diffusion (r = t) and consistency
  (r = T_min) rows. With ``row_ids`` (B,) each row's draws come from its id
  (gradient accumulation: a microbatch draws what the full batch would)."""
  n_d, n_c = config.counts(batch)
  k1, k2 = jax.random.split(key)
  if row_ids is None:
    t1 = transport.sample_t(k1, (batch,), dtype)
    t2 = transport.sample_t(k2, (batch,), dtype)
  else:
    one = lambda k: transport.sample_t(k, (1,), dtype)[0]
    t1, t2 = _per_row(k1, row_ids, one), _per_row(k2, row_ids, one)
  t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
  pos = jnp.arange(batch) % (batch // config.groups)
  per = batch // config.groups
  r = jnp.where(pos < n_d, t, r)
  if n_c:
    r = jnp.where(pos >= per - n_c, jnp.asarray(transport.T_min, dtype), r)
  return t, r


def draw_inputs(
  rng: Array,
  shape: Sequence[int],
  transport: transports_lib.Transport,
  config: LossConfig,
  dtype: DTypeLike = jnp.float32,
  row_ids: Array | None = None,
) -> tuple[Array, Array, Array]:
  """The random inputs ``loss`` draws from its key: times t, r (B,)
  (``sample_t_and_r``) and noise z of ``shape`` (B, H, W, C)."""
  k_time, k_noise = jax.random.split(rng)
  t, r = sample_t_and_r(k_time, shape[0], transport, config, dtype, row_ids)
  if row_ids is None:
    z = jax.random.normal(k_noise, tuple(shape), dtype)
  else:
    z = _per_row(
      k_noise, row_ids, lambda k: jax.random.normal(k, tuple(shape[1:]), dtype)
    )
  return t, r, z


def time_weight(
  t: Array,
  r: Array,
  transport: transports_lib.Transport,
  config: LossConfig,
) -> Array:
  """w_time(t, r) of the official ``TransitionSchedule.time_weighting``, before
  forcing diffusion rows to 1."""
  if config.weight_time_tangent:
    t, r = transport.tangent_time(t), transport.tangent_time(r)
  elif config.weight_time_sigmoid:
    t, r = t / (1 - t), r / (1 - r)
  d = t - r if config.weight_t_and_r else t
  sd = transport.sigma_d
  kind = config.weight_time_type
  if kind == "constant":
    return jnp.ones_like(d)
  if kind == "reciprocal":
    return 1.0 / (d + sd)
  if kind == "sqrt":
    return 1.0 / jnp.sqrt(d + sd)
  if kind == "square":
    return 1.0 / (d + sd) ** 2
  return 1.0 / (d * d + sd * sd)  # Soft-Min-SNR


def _nan_to_num(a):
  return jnp.nan_to_num(a, nan=0.0, posinf=1e5, neginf=-1e5)


def _safe_norm(a, axis):
  """L2 norm whose gradient at 0 is 0 rather than NaN."""
  sq = jnp.sum(a * a, axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _cosine(a, b, axis, eps=1e-8):
  """torch.nn.functional.cosine_similarity: each input divided by its norm
  clamped at eps. (At a zero prediction — the network at initialisation —
  the gradient is large but finite, as in PyTorch; clipping tames it.)"""
  a = a / jnp.maximum(_safe_norm(a, axis), eps)
  b = b / jnp.maximum(_safe_norm(b, axis), eps)
  return jnp.sum(a * b, axis=axis)


def _mean_rows(a):
  return jnp.mean(a.reshape(a.shape[0], -1), axis=1)


def loss(
  fn: Callable,
  x: Array,
  cond: PyTree,
  rng: Array,
  *,
  transport: transports_lib.Transport,
  config: LossConfig = LossConfig(),
  teacher_fn: Callable | None = None,
  teacher_cond: PyTree = None,
  null_cond: PyTree = None,
  repa_target: Array | None = None,
  row_ids: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The full TiM training loss of the official ``TransitionSchedule.__call__``.

  Args:
    fn: the network being trained, ``fn(x_t, t_in, r_in, cond) -> (F, proj)``
      with ``t_in = c_noise(t)``; ``proj`` is the REPA projection (or None).
      The derivative passes use ``stop_gradient`` of the same function
      (theta^- = sg(theta)).
    x: clean data (B, H, W, C).
    cond: conditioning for ``fn`` (labels, caption features...), possibly
      already dropped for classifier-free guidance.
    rng: one key; split here for t, r and noise.
    transport, config: the transport and the loss settings.
    teacher_fn, teacher_cond, null_cond: the EMA model, the undropped
      conditioning and the null conditioning, for ``config.enhance_target``.
    repa_target: (B, N, z_dim) features of a frozen encoder, for the REPA
      projection loss (skipped when None).
    row_ids: (B,) ids from which each row's times and noise are drawn (see
      ``sample_t_and_r``); None draws for the batch as a whole.

  Returns:
    (scalar loss, dict of scalar metrics).
  """
  batch = x.shape[0]
  n_d, n_c = config.counts(batch)
  per = batch // config.groups
  dtype = numerics.wide(x.dtype)
  t, r, z = draw_inputs(rng, x.shape, transport, config, dtype, row_ids)
  t_b = _bcast(t, x)
  x_t = transport.x_t(x, z, t_b)

  f_pred, h_proj = fn(x_t, transport.c_noise(t), transport.c_noise(r), cond)
  f_pred = f_pred.astype(dtype)

  diffusion_target = None
  if config.enhance_target:
    if teacher_fn is None or null_cond is None:
      raise ValueError("enhance_target needs teacher_fn and null_cond")
    t_in = transport.c_noise(t)
    f_unc = teacher_fn(x_t, t_in, t_in, null_cond)[0].astype(dtype)
    if config.w_cond > 0:
      t_cond = cond if teacher_cond is None else teacher_cond
      f_cond = teacher_fn(x_t, t_in, t_in, t_cond)[0].astype(dtype)
    else:
      f_cond = 0.0
    window = (t_b >= config.w_start) & (t_b <= config.w_end)
    w_gt = jnp.where(window, config.w_gt, 1.0)
    w_cond = jnp.where(window, config.w_cond, 0.0)
    diffusion_target = jax.lax.stop_gradient(
      w_gt * transport.diffusion_target(x, z, t_b)
      + w_cond * f_cond
      + (1.0 - w_gt - w_cond) * f_unc
    )

  network = lambda a, b, c, d: fn(a, b, c, d)[0]
  f_target = target(
    network,
    x,
    z,
    t,
    r,
    transport,
    config.derivative,
    config.epsilon,
    cond=cond,
    num_diffusion=n_d,
    groups=config.groups,
    diffusion_target=diffusion_target,
  )

  mse = _nan_to_num(_mean_rows((f_pred - f_target) ** 2))
  per_row = mse
  if config.directional_loss:
    # Cosine over channels at every pixel (NHWC: the last axis).
    cos = _cosine(f_pred, f_target, axis=-1)
    directional = _nan_to_num(_mean_rows(1.0 - cos))
    per_row = mse + directional
  else:
    directional = jnp.zeros_like(mse)

  pos = jnp.arange(batch) % per
  w_time = jnp.where(pos < n_d, 1.0, time_weight(t, r, transport, config))
  w_adapt = 1.0 / (jax.lax.stop_gradient(per_row) + config.adaptive_eps)
  loss_main = jnp.mean(w_time * w_adapt * per_row)

  if repa_target is not None and h_proj is not None:
    cos = _cosine(h_proj.astype(dtype), repa_target.astype(dtype), axis=-1)
    proj_loss = jnp.mean(_nan_to_num(_mean_rows(1.0 - cos)))
  else:
    proj_loss = jnp.zeros((), dtype)
  total = loss_main + config.proj_coeff * proj_loss

  finite = jnp.all(jnp.isfinite((f_pred - f_target).reshape(batch, -1)), axis=1)
  metrics = {
    "loss": total,
    "loss_main": loss_main,
    "denoising_loss": jnp.mean(per_row),
    "mse_loss": jnp.mean(mse),
    "directional_loss": jnp.mean(directional),
    "proj_loss": proj_loss,
    "weight_time_mean": jnp.mean(w_time),
    "weight_adaptive_mean": jnp.mean(w_adapt),
    "share_diffusion": jnp.asarray(n_d / per, dtype),
    "share_consistency": jnp.asarray(n_c / per, dtype),
    "share_interval": jnp.asarray((per - n_d - n_c) / per, dtype),
    "nonfinite_rows": jnp.sum(~finite).astype(dtype),
  }
  return total, metrics
