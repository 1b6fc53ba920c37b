"""The any-step TiM sampler, compiled as one ``lax.scan``.

Semantics follow the official ``TransitionSchedule.sample``
(``tim/schedulers/transition.py``, github.com/WZDTHU/TiM):

* time grid ``linspace(T_max, T_min, N + 1)`` (the transport's bounds unless
  given, as the official scripts' ``--T-max``/``--T-min``); step i goes from
  t_cur to
  t_next and the network receives r = t_next (``mode="transition"``) or
  r = t_cur (``mode="diffusion"``, a plain Euler step of the flow);
* classifier-free guidance only where ``cfg_scale > 1`` and
  ``low * T_max < t_cur < high * T_max`` (both strict); the conditional and
  unconditional halves run as one batched forward;
* stochasticity (OT-FM only) on the steps with ``t_cur < T_max`` and
  ``r > T_min``, the official rule: in transition mode these are the interior
  steps, in diffusion mode (r = t_cur) every step but the first, the last one
  (to T_min) included. ``last_step_noise=False`` keeps that last Euler step
  deterministic, as the transition mode's is (a deliberate option; the
  official rule reads the network's r where t_next seems meant).

Deliberate differences: the grid is float32 (float64 under x64) rather than
the official bfloat16 (there the grid takes the dtype of the bf16 noise),
and the state is kept in float32 or wider.
Which steps are guided or stochastic is decided on the host from the static
grid and fed to the scan as data, so nothing is retraced per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core import numerics
from tim_jax.core.errors import UserError
from tim_jax.method import transports as transports_lib

PyTree = Any
MODES = ("transition", "diffusion")


def check_settings(
  num_steps: int,
  guidance_interval: Sequence[float] = (0.0, 1.0),
  stochasticity: float = 0.0,
  mode: str = "transition",
) -> tuple[int, tuple[float, float]]:
  """Validates sampler settings (the one place that does); returns
  ``(num_steps, (low, high))`` normalised.

  ``guidance_interval`` is (low, high) as fractions of T_max with
  ``0 <= low <= high``; the bounds are strict, so ``high > 1`` also guides
  the first step at t = T_max.
  """
  if (
    isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1
  ):
    raise UserError(f"num_steps must be an integer >= 1, got {num_steps}")
  interval = tuple(float(v) for v in guidance_interval)
  if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1]:
    raise UserError(
      "guidance_interval must be (low, high) with 0 <= low <= "
      f"high, got {tuple(guidance_interval)}"
    )
  if stochasticity < 0:
    raise UserError(f"stochasticity must be >= 0, got {stochasticity}")
  if mode not in MODES:
    raise UserError(f"mode must be one of {MODES}, got {mode!r}")
  return int(num_steps), interval


def time_bounds(
  transport: transports_lib.Transport,
  T_max: float | None = None,
  T_min: float | None = None,
) -> tuple[float, float]:
  """The sampler's ``(T_max, T_min)``: the transport's unless given; checked
  to lie in its range with ``T_max > T_min``."""
  hi = float(transport.T_max if T_max is None else T_max)
  lo = float(transport.T_min if T_min is None else T_min)
  if not transport.T_min <= lo < hi <= transport.T_max:
    raise UserError(
      f"T_max={hi}, T_min={lo}: need {transport.name}'s "
      f"T_min {transport.T_min} <= T_min < T_max <= its T_max "
      f"{transport.T_max}"
    )
  return hi, lo


def step_schedule(
  transport: transports_lib.Transport,
  num_steps: int,
  cfg_scale: float = 1.0,
  guidance_interval: Sequence[float] = (0.0, 1.0),
  stochasticity: float = 0.0,
  mode: str = "transition",
  last_step_noise: bool = True,
  T_max: float | None = None,
  T_min: float | None = None,
) -> dict[str, np.ndarray]:
  """The static plan of a sampling run, as numpy arrays.

  ``T_max``/``T_min`` bound the time grid (default: the transport's; the
  guidance interval is a fraction of this ``T_max``).

  Returns a dict with ``t_cur``, ``t_next``, ``r`` (what the network gets as
  r), ``guided`` and ``stochastic`` (booleans per step). A step is stochastic
  where ``t_cur < T_max`` and ``r > T_min`` (official
  ``TransitionSchedule.sample``); ``last_step_noise=False`` also requires
  ``t_next > T_min``, which changes only the diffusion mode's last step.
  """
  num_steps, guidance_interval = check_settings(
    num_steps, guidance_interval, stochasticity, mode
  )
  T_max, T_min = time_bounds(transport, T_max, T_min)
  grid = np.linspace(T_max, T_min, num_steps + 1, dtype=np.float64)
  t_cur, t_next = grid[:-1], grid[1:]
  low, high = guidance_interval
  low, high = low * T_max, high * T_max
  guided = (cfg_scale > 1.0) & (t_cur > low) & (t_cur < high)
  r = t_next if mode == "transition" else t_cur
  stochastic = (stochasticity > 0.0) & (t_cur < T_max)
  stochastic &= r > T_min
  if not last_step_noise:
    stochastic &= t_next > T_min
  return dict(
    t_cur=t_cur, t_next=t_next, r=r, guided=guided, stochastic=stochastic
  )


def _concat(a, b):
  return jax.tree.map(
    lambda u, v: jnp.concatenate(
      [u, jnp.broadcast_to(v, u.shape).astype(u.dtype)], axis=0
    ),
    a,
    b,
  )


def sample(
  fn: Callable,
  noise: jax.Array,
  cond: PyTree,
  null_cond: PyTree,
  *,
  transport: transports_lib.Transport,
  num_steps: int,
  cfg_scale: float = 1.0,
  guidance_interval: Sequence[float] = (0.0, 1.0),
  stochasticity: float = 0.0,
  rng: jax.Array | None = None,
  return_trajectory: bool = False,
  mode: str = "transition",
  last_step_noise: bool = True,
  step_noise: jax.Array | None = None,
  progress: Callable[..., None] | None = None,
  progress_tag: jax.Array | None = None,
  T_max: float | None = None,
  T_min: float | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Samples from noise in ``num_steps`` network evaluations (x2 with CFG).

  Args:
    fn: the network, ``fn(x, c_noise(t), c_noise(r), cond)`` with t, r of
      shape (batch,).
    noise: the initial state at T_max, (B, H, W, C).
    cond, null_cond: conditioning and null conditioning (pytrees with a
      leading batch axis; ``null_cond`` may have batch 1 and is broadcast).
    transport: the transport the model was trained with.
    num_steps: number of steps (>= 1).
    cfg_scale, guidance_interval: classifier-free guidance and the window of
      t_cur, as fractions of T_max, where it applies (strict bounds).
    stochasticity: the OT-FM stochastic ratio s_r (0 = deterministic).
    rng: a key; needed only when ``stochasticity > 0`` and no
      ``step_noise`` is given.
    return_trajectory: also return all ``num_steps + 1`` states, noise first.
    mode: ``"transition"`` (r = t_next) or ``"diffusion"`` (r = t_cur).
    last_step_noise: in diffusion mode, whether the last step (to T_min) is
      stochastic too, as in the official sampler (default); False keeps it
      deterministic. No effect in transition mode, whose last step never is.
    step_noise: optional standard normal noise for the stochastic steps,
      (num_steps, B, H, W, C), row i for step i (rows of deterministic steps
      are unused); replaces the draws from ``rng``, e.g. to replay another
      implementation's run.
    progress: called on the host with the step index after each step
      (through ``jax.debug.callback``; for progress bars).
    progress_tag: if given, an array passed to ``progress`` as its second
      argument, so one compiled sampler can report to whichever caller runs
      it (the tag is data, not part of the compiled program).
    T_max, T_min: the time grid's bounds (default: the transport's); the
      official scripts' ``--T-max``/``--T-min``.

  Returns:
    The final state, or (final state, trajectory (N + 1, B, H, W, C)).
  """
  num_steps, guidance_interval = check_settings(
    num_steps, guidance_interval, stochasticity, mode
  )
  if stochasticity > 0 and not transport.supports_stochastic:
    raise UserError(
      "stochastic sampling (stochasticity > 0) is defined only for OT-FM, "
      f"not {transport.name}"
    )
  if stochasticity > 0 and rng is None and step_noise is None:
    raise ValueError("stochasticity > 0 needs rng or step_noise")
  if step_noise is not None and step_noise.shape != (num_steps, *noise.shape):
    raise UserError(
      f"step_noise must have shape {(num_steps, *noise.shape)} "
      f"(num_steps, *noise.shape), got {step_noise.shape}"
    )
  plan = step_schedule(
    transport,
    num_steps,
    cfg_scale,
    guidance_interval,
    stochasticity,
    mode,
    last_step_noise,
    T_max,
    T_min,
  )
  state_dtype = numerics.wide(noise.dtype)
  time_dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  batch = noise.shape[0]
  any_guided = bool(plan["guided"].any())
  any_stochastic = bool(plan["stochastic"].any())
  if any_guided:
    both_cond = _concat(cond, null_cond)

  def network(x, t, r, guided):
    t_in = jnp.full((batch,), transport.c_noise(t), time_dtype)
    r_in = jnp.full((batch,), transport.c_noise(r), time_dtype)
    plain = lambda: fn(x, t_in, r_in, cond).astype(state_dtype)
    if not any_guided:
      return plain()

    def with_cfg():
      x2 = jnp.concatenate([x, x], axis=0)
      out = fn(
        x2,
        jnp.concatenate([t_in, t_in]),
        jnp.concatenate([r_in, r_in]),
        both_cond,
      ).astype(state_dtype)
      f_cond, f_uncond = out[:batch], out[batch:]
      return f_uncond + cfg_scale * (f_cond - f_uncond)

    return jax.lax.cond(guided, with_cfg, plain)

  def step(x, xs):
    i, t_cur, t_next, r, guided, stochastic, xi = xs
    f = network(x.astype(noise.dtype), t_cur, r, guided)
    t_b, n_b = t_cur.astype(state_dtype), t_next.astype(state_dtype)
    if any_stochastic:
      key = None if xi is not None else jax.random.fold_in(rng, i)
      ratio = jnp.where(stochastic, stochasticity, 0.0).astype(state_dtype)
      x_next = jax.lax.cond(
        stochastic,
        lambda: transport.stochastic_transition(
          x, t_b, n_b, f, ratio, key, noise=xi
        ),
        lambda: transport.transition(x, t_b, n_b, f),
      )
    else:
      x_next = transport.transition(x, t_b, n_b, f)
    if progress is not None:
      # Passing one element of the new state makes the call wait for the
      # step, so the bar follows the computation.
      if progress_tag is None:
        jax.debug.callback(
          lambda i, _: progress(i), i, x_next[(0,) * x_next.ndim]
        )
      else:
        jax.debug.callback(
          lambda i, _, tag: progress(i, tag),
          i,
          x_next[(0,) * x_next.ndim],
          progress_tag,
        )
    return x_next, (x_next if return_trajectory else None)

  xs = (
    jnp.arange(num_steps),
    jnp.asarray(plan["t_cur"], time_dtype),
    jnp.asarray(plan["t_next"], time_dtype),
    jnp.asarray(plan["r"], time_dtype),
    jnp.asarray(plan["guided"]),
    jnp.asarray(plan["stochastic"]),
    None if step_noise is None else step_noise.astype(state_dtype),
  )
  x0 = noise.astype(state_dtype)
  final, traj = jax.lax.scan(step, x0, xs)
  if return_trajectory:
    return final, jnp.concatenate([x0[None], traj], axis=0)
  return final
