"""Tests for tim_jax.method.sampling (the official ``TransitionSchedule.sample``).

The main check is training-free: with Gaussian data N(MU, S^2) the marginals
of every transport are Gaussian, the probability-flow map between two times is
known in closed form, and so is the ideal transition-model output. Feeding
that oracle to the sampler must land exactly on the data distribution.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.core.errors import UserError
from tim_jax.method import sampling, transports

MU, S = 0.7, 0.3
NOISE_SHAPE = (4096, 2, 2, 1)


def _col(v):
  return v.reshape((-1, 1, 1, 1))


def _noise(seed=0, shape=NOISE_SHAPE):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _assert_gaussian(x, mean, std, what=""):
  """Sample mean/std within ~6 standard errors of (mean, std)."""
  x = np.asarray(x, np.float64)
  n = x.size
  assert abs(x.mean() - mean) < 6 * std / math.sqrt(n), (what, x.mean(), mean)
  assert abs(x.std() - std) < 6 * std / math.sqrt(2 * n), (what, x.std(), std)


# --------------------------------------------------------------------------
# OT-FM oracle
# --------------------------------------------------------------------------


def _ot_m(t):
  return (1 - t) * MU


def _ot_sd(t):
  return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def ot_oracle(x, t_in, r_in, cond):
  """Ideal OT-FM transition output for N(MU, S^2) data (c_noise(t) = t)."""
  del cond
  assert t_in.ndim == 1 and r_in.shape == t_in.shape == x.shape[:1]
  t, r = _col(t_in), _col(r_in)
  x_r = _ot_m(r) + _ot_sd(r) / _ot_sd(t) * (x - _ot_m(t))
  d_sd = (t - (1 - t) * S**2) / _ot_sd(t)
  velocity = -MU + d_sd / _ot_sd(t) * (x - _ot_m(t))
  same = t == r
  return jnp.where(same, velocity, (x - x_r) / jnp.where(same, 1.0, t - r))


def _sample(fn, noise, transport, num_steps, **kw):
  cond = kw.pop("cond", jnp.zeros((noise.shape[0],), jnp.int32))
  null = kw.pop("null_cond", jnp.zeros((1,), jnp.int32))
  return sampling.sample(
    fn, noise, cond, null, transport=transport, num_steps=num_steps, **kw
  )


@pytest.mark.parametrize("num_steps", [1, 8, 64])
def test_ot_fm_oracle_transition_is_exact(num_steps):
  tr = transports.get("ot_fm")
  noise = _noise(num_steps)
  out, traj = _sample(ot_oracle, noise, tr, num_steps, return_trajectory=True)
  assert out.shape == noise.shape and out.dtype == jnp.float32
  _assert_gaussian(out, MU, S, f"{num_steps} steps")
  # Deterministic map: every state lies on the exact flow from the noise.
  grid = np.linspace(1.0, 0.0, num_steps + 1)
  noise64 = np.asarray(noise, np.float64)
  for i, t in enumerate(grid):
    want = (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * noise64
    np.testing.assert_allclose(
      np.asarray(traj[i]), want, atol=2e-5, err_msg=f"state {i} (t = {t})"
    )


def test_ot_fm_oracle_diffusion_mode_converges():
  """Euler steps (r = t_cur) are inexact with few steps, then converge."""
  tr = transports.get("ot_fm")
  noise = _noise(3)
  exact = MU + S * np.asarray(noise, np.float64)
  errs, stats = {}, {}
  for n in (1, 2, 8, 64):
    out = np.asarray(
      _sample(ot_oracle, noise, tr, n, mode="diffusion"), np.float64
    )
    errs[n] = np.max(np.abs(out - exact))
    stats[n] = (abs(out.mean() - MU), abs(out.std() - S))
  # One Euler step from t = 1 collapses everything onto the mean.
  assert stats[1][1] > 0.25, stats[1]
  assert errs[1] > 0.5
  assert errs[1] > errs[2] > errs[8] > errs[64]
  assert errs[64] < errs[2] / 10, errs
  assert stats[64][0] + stats[64][1] < (stats[2][0] + stats[2][1]) / 10, stats
  assert stats[64][1] < 0.01  # close to the right std after 64 steps
  # The transition mode is exact where the diffusion mode is not.
  out1 = _sample(ot_oracle, noise, tr, 2)
  np.testing.assert_allclose(np.asarray(out1), exact, atol=2e-5)


# --------------------------------------------------------------------------
# Other transports: oracle from each transport's alpha, sigma, A, B and c_noise.
# --------------------------------------------------------------------------


def _vp_beta(t):
  return jnp.sqrt(jnp.expm1(0.5 * 19.9 * t * t + 0.1 * t))


def _edm_s(t):
  return jnp.sqrt(t * t + 0.25)


SPEC = {
  "trigflow": dict(
    alpha=jnp.cos,
    sigma=jnp.sin,
    A=lambda t, r: jnp.cos(t - r),
    B=lambda t, r: -jnp.sin(t - r),
    t_of_c=lambda c: c,
  ),
  "ve": dict(
    alpha=jnp.ones_like,
    sigma=lambda t: t,
    A=lambda t, r: jnp.ones_like(t * r),
    B=lambda t, r: t - r,
    t_of_c=lambda c: 2.0 * jnp.exp(c),
  ),
  "edm": dict(  # sigma_d = 0.5
    alpha=lambda t: 1 / _edm_s(t),
    sigma=lambda t: t / _edm_s(t),
    A=lambda t, r: (0.25 + t * r) / (_edm_s(t) * _edm_s(r)),
    B=lambda t, r: 0.5 * (t - r) / (_edm_s(t) * _edm_s(r)),
    t_of_c=lambda c: jnp.exp(4.0 * c),
  ),
  "vp": dict(
    alpha=lambda t: 1 / jnp.sqrt(1 + _vp_beta(t) ** 2),
    sigma=lambda t: _vp_beta(t) / jnp.sqrt(1 + _vp_beta(t) ** 2),
    A=lambda t, r: (
      jnp.sqrt(1 + _vp_beta(t) ** 2) / jnp.sqrt(1 + _vp_beta(r) ** 2)
    ),
    B=lambda t, r: (_vp_beta(r) - _vp_beta(t)) / jnp.sqrt(1 + _vp_beta(r) ** 2),
    t_of_c=lambda c: c / 999.0,
  ),
}


def _gauss(spec, t):
  """(mean, std) of alpha_t x + sigma_t eps with x ~ N(MU, S^2)."""
  a, s = spec["alpha"](t), spec["sigma"](t)
  return a * MU, jnp.sqrt(a * a * S * S + s * s)


def make_oracle(spec):
  def fn(x, t_in, r_in, cond):
    del cond
    t, r = _col(spec["t_of_c"](t_in)), _col(spec["t_of_c"](r_in))
    m_t, sd_t = _gauss(spec, t)
    m_r, sd_r = _gauss(spec, r)
    x_r = m_r + sd_r / sd_t * (x - m_t)
    return (x_r - spec["A"](t, r) * x) / spec["B"](t, r)

  return fn


@pytest.mark.parametrize("name", ["trigflow", "ve", "edm", "vp"])
@pytest.mark.parametrize("num_steps", [1, 8])
def test_other_transport_oracle_is_exact(name, num_steps):
  tr = transports.get(name)
  spec = SPEC[name]
  z = np.asarray(_noise(10 + num_steps), np.float64)
  m_hi, sd_hi = (float(v) for v in _gauss(spec, np.float64(tr.T_max)))
  m_lo, sd_lo = (float(v) for v in _gauss(spec, np.float64(tr.T_min)))
  # Start from the exact marginal at T_max; must end on the one at T_min.
  noise = jnp.asarray(m_hi + sd_hi * z, jnp.float32)
  out = np.asarray(_sample(make_oracle(spec), noise, tr, num_steps), np.float64)
  assert np.all(np.isfinite(out))
  _assert_gaussian(out, m_lo, sd_lo, f"{name} {num_steps} steps")
  want = m_lo + sd_lo * z
  np.testing.assert_allclose(out, want, atol=2e-4 * max(1.0, abs(m_lo) + sd_lo))


def test_trigflow_oracle_from_unit_noise():
  """With plain N(0, 1) noise at T_max = 1.57 (~ pi/2) TrigFlow lands on the data."""
  tr = transports.get("trigflow")
  out = _sample(make_oracle(SPEC["trigflow"]), _noise(21), tr, 8)
  _assert_gaussian(out, MU, S, "trigflow from unit noise")


# --------------------------------------------------------------------------
# Guidance (official ``TransitionSchedule.sample`` / ``forward_with_cfg``)
# --------------------------------------------------------------------------

B = 3
COND = {"y": jnp.array([1.0, 2.0, -1.0], jnp.float32)}
NULL = {"y": jnp.array([0.5], jnp.float32)}  # batch 1, broadcast


def fake_fn(log=None, traced=None):
  """F = cond + 0.1 x + t_in - 0.5 r_in: tells guided from unguided steps."""

  def fn(x, t_in, r_in, cond):
    if traced is not None:
      traced.append(
        (x.shape[0], t_in.shape[0], r_in.shape[0], cond["y"].shape[0])
      )
    if log is not None:
      jax.debug.callback(
        lambda t, r: log.append((t.shape[0], np.asarray(t), np.asarray(r))),
        t_in,
        r_in,
        ordered=True,
      )
    return _col(cond["y"]) + 0.1 * x + _col(t_in) - 0.5 * _col(r_in)

  return fn


def hand_rollout(
  noise, grid, guided, cfg_scale, mode="transition", cond=COND, null=NULL
):
  """The OT-FM sampler by hand, in float64 numpy."""
  x = np.asarray(noise, np.float64)
  c = np.asarray(cond["y"], np.float64).reshape(-1, 1, 1, 1)
  u = np.asarray(null["y"], np.float64).reshape(-1, 1, 1, 1)
  for i in range(len(grid) - 1):
    t, n = grid[i], grid[i + 1]
    r = n if mode == "transition" else t
    f_c = c + 0.1 * x + t - 0.5 * r
    f_u = u + 0.1 * x + t - 0.5 * r
    f = f_u + cfg_scale * (f_c - f_u) if guided[i] else f_c
    x = x - (t - n) * f
  return x


@pytest.mark.parametrize(
  "interval,cfg,expected",
  [
    ((0.0, 0.7), 2.0, [False, False, True, True]),  # 0.75 > 0.7: unguided
    ((0.0, 1.0), 2.0, [False, True, True, True]),  # t_cur = 1: never guided
    ((0.25, 1.0), 2.0, [False, True, True, False]),  # strict lower bound
    ((0.3, 0.6), 2.0, [False, False, True, False]),
    ((0.0, 1.0), 1.0, [False, False, False, False]),  # scale 1: no CFG
    ((0.0, 0.2), 3.0, [False, False, False, False]),  # empty window
  ],
)
@pytest.mark.parametrize("mode", ["transition", "diffusion"])
def test_guidance_schedule_and_rollout(interval, cfg, expected, mode):
  tr = transports.get("ot_fm")
  plan = sampling.step_schedule(
    tr, 4, cfg_scale=cfg, guidance_interval=interval, mode=mode
  )
  grid = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
  np.testing.assert_allclose(plan["t_cur"], grid[:-1], atol=1e-12)
  np.testing.assert_allclose(plan["t_next"], grid[1:], atol=1e-12)
  np.testing.assert_allclose(
    plan["r"], grid[1:] if mode == "transition" else grid[:-1], atol=1e-12
  )
  assert plan["guided"].tolist() == expected
  assert not plan["stochastic"].any()

  noise = _noise(5, (B, 2, 2, 1))
  log, traced = [], []
  out = sampling.sample(
    fake_fn(log, traced),
    noise,
    COND,
    NULL,
    transport=tr,
    num_steps=4,
    cfg_scale=cfg,
    guidance_interval=interval,
    mode=mode,
  )
  want = hand_rollout(noise, grid, expected, cfg, mode)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  # Guided steps differ from unguided ones, so the check above has teeth
  # (unless nothing is guided, where the two rollouts coincide).
  unguided = hand_rollout(noise, grid, [False] * 4, cfg, mode)
  if any(expected):
    assert np.max(np.abs(want - unguided)) > 0.1

  # Runtime: one call per step; guided steps are ONE call on 2B rows.
  sizes = [n for n, _, _ in log]
  assert sizes == [2 * B if g else B for g in expected]
  for (_, t_in, r_in), t, r in zip(log, plan["t_cur"], plan["r"]):
    np.testing.assert_allclose(t_in, t, rtol=1e-7)
    np.testing.assert_allclose(r_in, r, rtol=1e-7, atol=1e-7)
  # Trace time: the batched 2B call exists iff some step is guided, and the
  # conditioning is always batched along with x, t and r.
  assert all(len(set(shapes)) == 1 for shapes in traced)
  assert {s[0] for s in traced} == ({B, 2 * B} if any(expected) else {B})


def test_guidance_interval_is_a_fraction_of_t_max():
  """TrigFlow (T_max = 1.57): the window is (low, high) * T_max."""
  tr = transports.get("trigflow")
  plan = sampling.step_schedule(
    tr, 4, cfg_scale=2.0, guidance_interval=(0.0, 0.7)
  )
  # t_cur = 1.57, 1.1775, 0.785, 0.3925; 0.7 * 1.57 = 1.099.
  assert plan["guided"].tolist() == [False, False, True, True]
  plan = sampling.step_schedule(
    tr, 4, cfg_scale=2.0, guidance_interval=(0.3, 1.0)
  )
  # 0.3 * 1.57 = 0.471 excludes t_cur = 0.3925.
  assert plan["guided"].tolist() == [False, True, True, False]


def test_guidance_with_array_cond_and_batch_null():
  """Plain-array conditioning and a full-batch null_cond work too."""
  tr = transports.get("ot_fm")
  noise = _noise(6, (B, 2, 2, 1))

  def fn(x, t_in, r_in, c):
    return _col(c) + 0.1 * x + _col(t_in) - 0.5 * _col(r_in)

  null = jnp.full((B,), 0.5, jnp.float32)
  out = sampling.sample(
    fn,
    noise,
    COND["y"],
    null,
    transport=tr,
    num_steps=4,
    cfg_scale=2.5,
    guidance_interval=(0.0, 0.7),
  )
  want = hand_rollout(
    noise, np.linspace(1, 0, 5), [False, False, True, True], 2.5
  )
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Stochasticity (OT-FM only, interior steps only)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "num_steps,expected",
  [
    (1, [False]),
    (2, [False, False]),
    (3, [False, True, False]),
    (4, [False, True, True, False]),
  ],
)
def test_stochastic_schedule_interior_only(num_steps, expected):
  tr = transports.get("ot_fm")
  plan = sampling.step_schedule(tr, num_steps, stochasticity=0.2)
  assert plan["stochastic"].tolist() == expected
  plan = sampling.step_schedule(tr, num_steps, stochasticity=0.0)
  assert not plan["stochastic"].any()


@pytest.mark.parametrize(
  "num_steps,expected",
  [
    (1, [False]),
    (2, [False, True]),
    (4, [False, True, True, True]),
  ],
)
def test_stochastic_schedule_diffusion_mode(num_steps, expected):
  # Official rule: t_cur < T_max and r > T_min, with r = t_cur in Euler
  # mode, so the last step (to T_min) is stochastic too.
  tr = transports.get("ot_fm")
  plan = sampling.step_schedule(
    tr, num_steps, stochasticity=0.2, mode="diffusion"
  )
  assert plan["stochastic"].tolist() == expected
  # The option keeps that last step deterministic, as in transition mode.
  plan = sampling.step_schedule(
    tr, num_steps, stochasticity=0.2, mode="diffusion", last_step_noise=False
  )
  assert plan["stochastic"].tolist() == expected[:-1] + [False]
  plan = sampling.step_schedule(
    tr, num_steps, stochasticity=0.2, last_step_noise=False
  )
  assert not plan["stochastic"][-1]


def test_step_noise_replaces_the_draws():
  tr = transports.get("ot_fm")
  noise = _noise(7, (8, 2, 2, 1))
  xi = jnp.asarray(np.random.default_rng(3).standard_normal((4, *noise.shape)))
  run = lambda **kw: np.asarray(
    _sample(ot_oracle, noise, tr, 4, stochasticity=0.5, **kw)
  )
  a = run(step_noise=xi)
  np.testing.assert_array_equal(a, run(step_noise=xi, rng=jax.random.key(9)))
  # Rows of deterministic steps (the first and last here) are unused.
  np.testing.assert_array_equal(
    a, run(step_noise=xi.at[jnp.array([0, 3])].set(5.0))
  )
  assert np.max(np.abs(a - run(step_noise=xi.at[1].set(0.0)))) > 1e-2
  with pytest.raises(UserError, match="step_noise"):
    run(step_noise=xi[:3])


def test_stochastic_sampling_rng_semantics():
  tr = transports.get("ot_fm")
  noise = _noise(7, (64, 2, 2, 1))
  # One compilation per setting; the key is a traced argument.
  run4 = jax.jit(
    lambda k: _sample(ot_oracle, noise, tr, 4, stochasticity=0.5, rng=k)
  )
  a, b, a2 = (np.asarray(run4(jax.random.key(i))) for i in (1, 2, 1))
  det = np.asarray(_sample(ot_oracle, noise, tr, 4))
  np.testing.assert_array_equal(a, a2)
  assert np.max(np.abs(a - b)) > 1e-2
  assert np.max(np.abs(a - det)) > 1e-2
  # With 2 steps there is no interior step: the rng does not matter.
  run2 = jax.jit(
    lambda k: _sample(ot_oracle, noise, tr, 2, stochasticity=0.5, rng=k)
  )
  e = np.asarray(_sample(ot_oracle, noise, tr, 2))
  for i in (1, 2):
    np.testing.assert_allclose(
      np.asarray(run2(jax.random.key(i))), e, atol=1e-6
    )


def test_stochastic_steps_follow_spec():
  """4 steps: first and last deterministic, the two interior ones EM steps
  (official ``OT_FM.from_x_t_to_x_r`` with ``s_ratio > 0``) with fresh,
  independent noise each."""
  tr = transports.get("ot_fm")
  s_r = 0.5
  noise = _noise(8)
  _, traj = _sample(
    ot_oracle,
    noise,
    tr,
    4,
    stochasticity=s_r,
    rng=jax.random.key(4),
    return_trajectory=True,
  )
  _, det = _sample(ot_oracle, noise, tr, 4, return_trajectory=True)
  traj = np.asarray(traj, np.float64)
  grid = np.linspace(1.0, 0.0, 5)
  bt = lambda v: jnp.full((noise.shape[0],), v, jnp.float32)

  def oracle(x, t, n):
    return np.asarray(
      ot_oracle(jnp.asarray(x, jnp.float32), bt(t), bt(n), None), np.float64
    )

  # First step: deterministic.
  np.testing.assert_allclose(traj[1], np.asarray(det[1]), atol=1e-6)
  # Interior steps: x - h F - s eps_hat h + sqrt(2 s t h) xi.
  xis = []
  for i in (1, 2):
    t, n = grid[i], grid[i + 1]
    h = t - n
    x = traj[i]
    f = oracle(x, t, n)
    eps_hat = x + (1 - t) * f
    xi = (traj[i + 1] - (x - h * f - s_r * eps_hat * h)) / math.sqrt(
      2 * s_r * t * h
    )
    _assert_gaussian(xi, 0.0, 1.0, f"noise of step {i}")
    assert abs(np.corrcoef(xi.ravel(), x.ravel())[0, 1]) < 0.05
    xis.append(xi.ravel())
  # Each step draws its own noise.
  assert abs(np.corrcoef(xis[0], xis[1])[0, 1]) < 0.05
  # Last step: deterministic from wherever the interior steps went.
  t, n = grid[3], grid[4]
  np.testing.assert_allclose(
    traj[4], traj[3] - (t - n) * oracle(traj[3], t, n), atol=2e-5
  )


@pytest.mark.parametrize("name", ["trigflow", "edm", "vp", "ve"])
def test_stochasticity_rejected_for_non_ot_fm(name):
  with pytest.raises(ValueError, match="OT-FM"):
    _sample(
      ot_oracle,
      _noise(0, (2, 2, 2, 1)),
      transports.get(name),
      4,
      stochasticity=0.2,
      rng=jax.random.key(0),
    )


def test_stochasticity_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    _sample(
      ot_oracle,
      _noise(0, (2, 2, 2, 1)),
      transports.get("ot_fm"),
      4,
      stochasticity=0.2,
    )
  with pytest.raises(ValueError, match="stochasticity"):
    _sample(
      ot_oracle,
      _noise(0, (2, 2, 2, 1)),
      transports.get("ot_fm"),
      4,
      stochasticity=-0.1,
      rng=jax.random.key(0),
    )


# --------------------------------------------------------------------------
# Trajectory and jit
# --------------------------------------------------------------------------


def test_return_trajectory():
  tr = transports.get("ot_fm")
  noise = _noise(9, (B, 2, 2, 1))
  final = sampling.sample(
    fake_fn(), noise, COND, NULL, transport=tr, num_steps=5, cfg_scale=2.0
  )
  out, traj = sampling.sample(
    fake_fn(),
    noise,
    COND,
    NULL,
    transport=tr,
    num_steps=5,
    cfg_scale=2.0,
    return_trajectory=True,
  )
  assert traj.shape == (6,) + noise.shape
  np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(noise))
  np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(out))
  np.testing.assert_allclose(np.asarray(out), np.asarray(final), rtol=1e-6)
  # Every state differs from the previous one (one state per step).
  steps = np.abs(np.diff(np.asarray(traj), axis=0)).reshape(5, -1).max(1)
  assert np.all(steps > 1e-3)
  plan = sampling.step_schedule(tr, 5, cfg_scale=2.0)
  want = hand_rollout(noise, np.linspace(1, 0, 6), plan["guided"], 2.0)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_sample_is_jittable():
  tr = transports.get("ot_fm")
  noise = _noise(10, (B, 2, 2, 1))
  run = functools.partial(
    sampling.sample,
    fake_fn(),
    transport=tr,
    num_steps=4,
    cfg_scale=2.0,
    guidance_interval=(0.0, 0.7),
    stochasticity=0.3,
    return_trajectory=True,
  )
  jitted = jax.jit(lambda n, c, u, k: run(n, c, u, rng=k))
  key = jax.random.key(3)
  out_j, traj_j = jitted(noise, COND, NULL, key)
  out_e, traj_e = run(noise, COND, NULL, rng=key)
  np.testing.assert_allclose(
    np.asarray(out_j), np.asarray(out_e), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(traj_j), np.asarray(traj_e), rtol=1e-6, atol=1e-6
  )
  # A second call with new noise reuses the compiled function.
  out2 = jitted(noise + 1.0, COND, NULL, key)
  assert not np.allclose(np.asarray(out2[0]), np.asarray(out_j))


def test_jitted_oracle_sample_matches_eager():
  tr = transports.get("ot_fm")
  noise = _noise(11, (256, 2, 2, 1))
  f = jax.jit(functools.partial(_sample, ot_oracle, transport=tr, num_steps=8))
  np.testing.assert_allclose(
    np.asarray(f(noise)),
    np.asarray(_sample(ot_oracle, noise, tr, 8)),
    rtol=1e-6,
    atol=1e-6,
  )


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [0, -1, -8, 2.5])
def test_bad_num_steps(num_steps):
  with pytest.raises(ValueError, match="num_steps"):
    _sample(
      ot_oracle, _noise(0, (2, 2, 2, 1)), transports.get("ot_fm"), num_steps
    )


@pytest.mark.parametrize("num_steps", [0, -3])
def test_bad_num_steps_schedule_and_grid(num_steps):
  tr = transports.get("ot_fm")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.step_schedule(tr, num_steps)
  with pytest.raises(ValueError, match="num_steps"):
    transports.time_grid(tr, num_steps)


def test_bad_mode_and_interval():
  tr = transports.get("ot_fm")
  with pytest.raises(ValueError, match="mode"):
    _sample(ot_oracle, _noise(0, (2, 2, 2, 1)), tr, 2, mode="ddiffusion")
  with pytest.raises(ValueError, match="guidance_interval"):
    _sample(
      ot_oracle,
      _noise(0, (2, 2, 2, 1)),
      tr,
      2,
      guidance_interval=(0.0, 0.5, 1.0),
    )


# --------------------------------------------------------------------------
# Time grid dtype and uniformity
# --------------------------------------------------------------------------


def _uniform_within(grid, n, tol):
  steps = -np.diff(np.asarray(grid, np.float64))
  return np.max(np.abs(steps - 1.0 / n)) <= tol


@pytest.mark.parametrize("n", [250, 7, 1])
def test_time_grid_float32_uniform(n):
  tr = transports.get("ot_fm")
  grid = transports.time_grid(tr, n)
  assert grid.dtype == np.float32
  assert grid.shape == (n + 1,)
  assert grid[0] == 1.0 and grid[-1] == 0.0
  eps32 = float(np.finfo(np.float32).eps)
  assert _uniform_within(grid, n, eps32)
  plan = sampling.step_schedule(tr, n)
  assert _uniform_within(
    np.concatenate([plan["t_cur"], plan["t_next"][-1:]]), n, 1e-12
  )
  if n == 250:
    # The check has teeth: the official bf16 grid fails it.
    bf16 = np.linspace(1.0, 0.0, n + 1).astype(jnp.bfloat16)
    assert not _uniform_within(bf16, n, eps32)


def test_official_bfloat16_grid_is_ours_at_powers_of_two():
  # The official sampler's grid takes the bf16 noise's dtype; for the step
  # counts of the NFE studies (powers of two) it is exactly our float32
  # grid, so the two samplers see the same times there.
  tr = transports.get("ot_fm")
  for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
    bf16 = np.linspace(1.0, 0.0, n + 1).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
      bf16.astype(np.float32), transports.time_grid(tr, n), err_msg=n
    )
  # Not so elsewhere (the test above: 250 steps).
  assert not np.array_equal(
    np.linspace(1.0, 0.0, 251).astype(jnp.bfloat16).astype(np.float32),
    transports.time_grid(tr, 250),
  )


def test_time_grid_float64_under_x64(x64):
  tr = transports.get("ot_fm")
  grid = transports.time_grid(tr, 250)
  assert grid.dtype == np.float64
  assert _uniform_within(grid, 250, 1e-15)
  grid = transports.time_grid(transports.get("ve"), 9)
  np.testing.assert_allclose(grid, np.linspace(100.0, 0.02, 10), rtol=1e-15)


def _seen_time_dtypes(transport, n):
  seen = []

  def fn(x, t_in, r_in, cond):
    del cond
    seen.append((np.dtype(t_in.dtype), np.dtype(r_in.dtype)))
    return jnp.zeros_like(x)

  _sample(fn, _noise(0, (2, 2, 2, 1)), transport, n)
  return seen


def test_sampler_feeds_float32_times_by_default():
  assert set(_seen_time_dtypes(transports.get("ot_fm"), 250)) == {
    (np.dtype(np.float32), np.dtype(np.float32))
  }


def test_sampler_feeds_float64_times_under_x64(x64):
  assert set(_seen_time_dtypes(transports.get("ot_fm"), 250)) == {
    (np.dtype(np.float64), np.dtype(np.float64))
  }


@pytest.mark.parametrize("name", ["ot_fm", "edm", "vp", "ve"])
def test_sampler_feeds_c_noise_of_the_grid(name):
  """fn receives c_noise(t_cur), c_noise(r), as (batch,) arrays, per step."""
  tr = transports.get(name)
  log = []

  def fn(x, t_in, r_in, cond):
    del cond
    jax.debug.callback(
      lambda t, r: log.append((np.asarray(t), np.asarray(r))),
      t_in,
      r_in,
      ordered=True,
    )
    return jnp.zeros_like(x)

  n = 250
  _sample(fn, _noise(0, (2, 2, 2, 1)), tr, n)
  grid = np.linspace(tr.T_max, tr.T_min, n + 1)
  c = lambda t: np.asarray(tr.c_noise(jnp.asarray(t, jnp.float32)), np.float64)
  assert len(log) == n
  t_in = np.stack([t for t, _ in log])
  r_in = np.stack([r for _, r in log])
  assert t_in.shape == r_in.shape == (n, 2)
  np.testing.assert_allclose(
    t_in, np.broadcast_to(c(grid[:-1])[:, None], (n, 2)), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    r_in, np.broadcast_to(c(grid[1:])[:, None], (n, 2)), rtol=1e-6, atol=1e-6
  )
