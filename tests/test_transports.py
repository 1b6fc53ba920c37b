"""Tests for tim_jax.method.transports: the state-transition identity of Wang et al.
(arXiv 2509.04394) and the per-transport closed forms (official
``tim/schedulers/transports.py``, with EDM corrected).

Everything that claims machine precision runs in float64 through the ``x64``
fixture, which enables x64 only for the duration of one test.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.method import transports

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


# name -> factory. EDM is checked with its default sigma_d = 0.5 (where the
# official formulas were wrong) and with sigma_d = 1.
CASES = {
  "ot_fm": lambda: transports.get("ot_fm"),
  "trigflow": lambda: transports.get("trigflow"),
  "edm": lambda: transports.get("edm"),
  "edm_sd1": lambda: transports.get("edm", sigma_d=1.0),
  "vp": lambda: transports.get("vp"),
  "ve": lambda: transports.get("ve"),
}
ALL = list(CASES)


def make(case):
  return CASES[case]()


def assert_close(got, want, rel=1e-12, what=""):
  """max |got - want| <= rel * max(1, max |want|)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= rel * scale, (
    f"{what}: max abs error {err:.3e} (scale {scale:.3e})"
  )


def time_pairs(tr, include_equal=True, seed=0):
  """(t, r) pairs with T_min <= r <= t <= T_max, as (P,) float64 arrays."""
  lo, hi = float(tr.T_min), float(tr.T_max)
  lin = lambda u: lo + u * (hi - lo)
  pairs = [
    (hi, lo),
    (hi, lin(0.5)),
    (lin(0.7), lin(0.3)),
    (lin(0.3), lo),
    (lin(0.05), lin(0.01)),
    (lin(0.9), lin(0.89)),
    (hi, lin(0.999)),
  ]
  if lo > 0:  # Wide ranges (EDM, VE): also sample the small-t end densely.
    geo = lambda u: lo * (hi / lo) ** u
    pairs += [
      (geo(0.5), geo(0.2)),
      (geo(0.2), lo),
      (geo(0.9), geo(0.1)),
      (geo(0.1), geo(0.05)),
    ]
  else:  # Same count for every transport (shares eager-op compilations).
    pairs += [
      (lin(0.02), lo),
      (lin(0.01), lin(0.005)),
      (lin(0.6), lin(0.59)),
      (lin(0.99), lin(0.5)),
    ]
  rng = np.random.default_rng(seed)
  for _ in range(4):
    u = np.sort(rng.uniform(size=2))
    pairs.append((lin(u[1]), lin(u[0])))
  if include_equal:
    pairs += [(hi, hi), (lo, lo), (lin(0.5), lin(0.5)), (lin(0.3), lin(0.3))]
  t, r = (np.array(v, np.float64) for v in zip(*pairs))
  assert np.all(r <= t) and np.all(r >= lo) and np.all(t <= hi)
  return t, r


def batch(tr, include_equal=True, seed=0, shape=(3, 3, 2)):
  """x, eps of shape (P, *shape) and t, r of shape (P, 1, 1, 1), float64."""
  t, r = time_pairs(tr, include_equal, seed)
  p = t.shape[0]
  kx, ke = jax.random.split(jax.random.key(seed))
  x = 0.5 + 0.8 * jax.random.normal(kx, (p,) + shape, jnp.float64)
  eps = jax.random.normal(ke, (p,) + shape, jnp.float64)
  bshape = (p,) + (1,) * len(shape)
  t = jnp.asarray(t, jnp.float64).reshape(bshape)
  r = jnp.asarray(r, jnp.float64).reshape(bshape)
  return x, eps, t, r


def dF_dt_ideal(tr, x, eps, t):
  """Total time derivative of F*(t) = alpha_hat x + sigma_hat eps (x, eps fixed)."""
  _, tangent = jax.jvp(
    lambda tt: tr.diffusion_target(x, eps, tt), (t,), (jnp.ones_like(t),)
  )
  return tangent


def generic_ratio(tr, t, r):
  """B / dB/dt with B from the *generic* base-class formula (no closed forms)."""

  def b_of_t(tt):
    return transports.Transport.transition_coefficients(tr, tt, r)[1]

  b, db = jax.jvp(b_of_t, (t,), (jnp.ones_like(t),))
  return b / db


# Independent numpy transcriptions of each transport's schedule and prediction
# (the classes of the official ``tim/schedulers/transports.py``). Each returns
# (alpha, sigma, alpha_hat, sigma_hat) as float64 arrays.
def _vp_beta(t, beta_min=0.1, beta_d=19.9):
  return np.sqrt(np.expm1(0.5 * beta_d * t * t + beta_min * t))


def spec_schedules(case, t):
  t = np.asarray(t, np.float64)
  if case == "ot_fm":
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)
  if case == "trigflow":
    return np.cos(t), np.sin(t), -np.sin(t), np.cos(t)
  if case in ("edm", "edm_sd1"):
    sd = 0.5 if case == "edm" else 1.0
    s = np.sqrt(t * t + sd * sd)
    return 1 / s, t / s, t / (sd * s), -sd / s
  if case == "vp":
    b = _vp_beta(t)
    n = np.sqrt(1 + b * b)
    return 1 / n, b / n, np.zeros_like(t), np.ones_like(t)
  if case == "ve":
    return np.ones_like(t), t, np.zeros_like(t), -np.ones_like(t)
  raise KeyError(case)


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_schedules_match_spec(case, x64):
  tr = make(case)
  t = np.linspace(tr.T_min, tr.T_max, 37)
  alpha, sigma, _, _ = tr.interpolant(jnp.asarray(t))
  a_hat, s_hat, _, _ = tr.prediction(jnp.asarray(t))
  want = spec_schedules(case, t)
  for got, w, name in zip(
    (alpha, sigma, a_hat, s_hat),
    want,
    ("alpha", "sigma", "alpha_hat", "sigma_hat"),
  ):
    assert jnp.asarray(got).dtype == jnp.float64, name
    assert_close(jnp.broadcast_to(got, t.shape), w, 1e-13, f"{case} {name}")


def test_defaults_match_spec():
  assert (transports.get("ot_fm").T_max, transports.get("ot_fm").T_min) == (
    1.0,
    0.0,
  )
  assert (
    transports.get("trigflow").T_max,
    transports.get("trigflow").T_min,
  ) == (1.57, 0.0)
  edm = transports.get("edm")
  assert (edm.T_max, edm.T_min, edm.sigma_d) == (80.0, 0.01, 0.5)
  assert (edm.P_mean, edm.P_std) == (-1.2, 1.2)
  vp = transports.get("vp")
  assert (vp.T_max, vp.T_min, vp.beta_min, vp.beta_d) == (1.0, 1e-5, 0.1, 19.9)
  ve = transports.get("ve")
  assert (ve.T_max, ve.T_min) == (100.0, 0.02)
  tf = transports.get("trigflow")
  assert (tf.P_mean, tf.P_std) == (-1.0, 1.6)
  ot = transports.get("ot_fm")
  assert (ot.P_mean, ot.P_std) == (0.0, 1.0)


# --------------------------------------------------------------------------
# 1. transition exactness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_transition_exact_with_ideal_output(case, x64):
  tr = make(case)
  x, eps, t, r = batch(tr, include_equal=True)
  x_t = tr.x_t(x, eps, t)
  # x_t through the interpolant, by hand.
  a_t, s_t, _, _ = tr.interpolant(t)
  assert_close(x_t, a_t * x + s_t * eps, 1e-14, "x_t")
  f_star = tr.diffusion_target(x, eps, t)
  got = tr.transition(x_t, t, r, f_star)
  a_r, s_r, _, _ = tr.interpolant(r)
  want = a_r * x + s_r * eps
  assert got.dtype == jnp.float64
  assert_close(got, want, 1e-12, f"{case} transition")
  # The generic (base class) map is exact too.
  got_generic = transports.Transport.transition(tr, x_t, t, r, f_star)
  assert_close(got_generic, want, 1e-12, f"{case} generic transition")


@pytest.mark.parametrize("case", ALL)
def test_transition_exact_with_scalar_times(case, x64):
  """Scalar t, r broadcast against the batch."""
  tr = make(case)
  x, eps, _, _ = batch(tr)
  t, r = 0.8 * tr.T_max + 0.2 * tr.T_min, tr.T_min
  x_t = tr.x_t(x, eps, jnp.float64(t))
  f_star = tr.diffusion_target(x, eps, jnp.float64(t))
  got = tr.transition(x_t, jnp.float64(t), jnp.float64(r), f_star)
  a_r, s_r, _, _ = spec_schedules(case, np.float64(r))
  assert_close(got, a_r * np.asarray(x) + s_r * np.asarray(eps), 1e-12)


def test_edm_transition_depends_on_sigma_d_correctly(x64):
  """The sigma_d = 0.5 map is not the sigma_d = 1 map (guards a hard-coded 1)."""
  x, eps, t, r = batch(transports.get("edm"), include_equal=False)
  outs = []
  for sd in (0.5, 1.0):
    tr = transports.get("edm", sigma_d=sd)
    f_star = tr.diffusion_target(x, eps, t)
    outs.append(tr.transition(tr.x_t(x, eps, t), t, r, f_star))
  assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3


# --------------------------------------------------------------------------
# 2. closed forms == generic
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_closed_forms_match_generic(case, x64):
  tr = make(case)
  _, _, t, r = batch(tr, include_equal=False)
  a, b = tr.transition_coefficients(t, r)
  a_gen, b_gen = transports.Transport.transition_coefficients(tr, t, r)
  assert_close(jnp.broadcast_to(a, t.shape), a_gen, 1e-12, "A")
  assert_close(jnp.broadcast_to(b, t.shape), b_gen, 1e-12, "B")
  ratio = jnp.broadcast_to(tr.target_ratio(t, r), t.shape)
  assert_close(
    ratio,
    transports.Transport.target_ratio(tr, t, r),
    1e-11,
    "target_ratio vs base class",
  )
  assert_close(
    ratio, generic_ratio(tr, t, r), 1e-11, "target_ratio vs fully generic"
  )


@pytest.mark.parametrize("case", ALL)
def test_closed_forms_at_r_equals_t(case, x64):
  """At r == t: A = 1, B = 0, ratio = 0 (closed forms stay finite)."""
  tr = make(case)
  t = jnp.linspace(tr.T_min, tr.T_max, 11)
  a, b = tr.transition_coefficients(t, t)
  assert_close(jnp.broadcast_to(a, t.shape), np.ones(11), 1e-13, "A(t,t)")
  assert_close(jnp.broadcast_to(b, t.shape), np.zeros(11), 1e-13, "B(t,t)")
  assert_close(
    jnp.broadcast_to(tr.target_ratio(t, t), t.shape),
    np.zeros(11),
    1e-13,
    "ratio(t,t)",
  )


@pytest.mark.parametrize("case", ALL)
def test_target_closed_form_matches_generic(case, x64):
  tr = make(case)
  x, eps, t, r = batch(tr, include_equal=False)
  dfdt = jax.random.normal(jax.random.key(7), x.shape, jnp.float64)
  got = tr.target(x, eps, t, r, dfdt)
  want = transports.Transport.target(tr, x, eps, t, r, dfdt)
  assert_close(got, want, 1e-11, "target")
  d = jax.random.normal(jax.random.key(8), x.shape, jnp.float64)
  got = tr.target(x, eps, t, r, dfdt, diffusion_target=d)
  want = transports.Transport.target(tr, x, eps, t, r, dfdt, diffusion_target=d)
  assert_close(got, want, 1e-11, "target with diffusion_target override")


# --------------------------------------------------------------------------
# 3. derivatives
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_derivatives_match_autodiff(case, x64):
  tr = make(case)
  t = jnp.linspace(tr.T_min, tr.T_max, 23)
  for fn_name in ("interpolant", "prediction"):
    fn = getattr(tr, fn_name)
    values = fn(t)
    for k in (0, 1):
      grad = jax.vmap(jax.grad(lambda s, k=k: fn(s)[k]))(t)
      assert_close(
        jnp.broadcast_to(values[k + 2], t.shape),
        grad,
        1e-10,
        f"{case} {fn_name}[{k}]'",
      )


@pytest.mark.parametrize("case", ALL)
def test_velocity_is_time_derivative_of_x_t(case, x64):
  tr = make(case)
  x, eps, t, _ = batch(tr, include_equal=False)
  _, tangent = jax.jvp(lambda tt: tr.x_t(x, eps, tt), (t,), (jnp.ones_like(t),))
  assert_close(tr.velocity(x, eps, t), tangent, 1e-11, "velocity")


# --------------------------------------------------------------------------
# 4. self-consistency of the TiM target
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_target_fixed_point_is_diffusion_target(case, x64):
  tr = make(case)
  x, eps, t, r = batch(tr, include_equal=True)
  f_star = tr.diffusion_target(x, eps, t)
  dfdt = dF_dt_ideal(tr, x, eps, t)
  _, _, da, ds = tr.prediction(t)
  assert_close(dfdt, da * x + ds * eps, 1e-12, "jvp of F*")
  got = tr.target(x, eps, t, r, dfdt)
  assert_close(got, f_star, 1e-11, f"{case} target(F*)")

  # A perturbation of dF/dt moves the target by exactly -ratio * perturbation.
  delta = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
  moved = tr.target(x, eps, t, r, dfdt + delta)
  ratio = jnp.broadcast_to(tr.target_ratio(t, r), t.shape)
  assert_close(moved - got, -ratio * delta, 1e-11, "perturbation")
  # r == t rows: no derivative term at all.
  eq = np.asarray(t == r).reshape(-1)
  assert eq.any()
  assert_close(moved[eq], f_star[eq], 1e-12, "diffusion rows")


@pytest.mark.parametrize("case", ALL)
def test_target_satisfies_state_transition_identity(case, x64):
  """Any F with B(t,r) (F* - F) = const in t is reproduced by the target.

  This is the defining state-transition identity d/dt [B (F* - F)] = 0 of the
  paper (Wang et al., arXiv 2509.04394), checked with B from the generic
  formula, independently of ``target_ratio``.
  """
  tr = make(case)
  x, eps, t, r = batch(tr, include_equal=False)
  c = jax.random.normal(jax.random.key(11), x.shape, jnp.float64)
  c = c * 1e-2

  def f_path(tt):
    b = transports.Transport.transition_coefficients(tr, tt, r)[1]
    return tr.diffusion_target(x, eps, tt) - c / b

  f_val, dfdt = jax.jvp(f_path, (t,), (jnp.ones_like(t),))
  got = tr.target(x, eps, t, r, dfdt)
  assert_close(got, f_val, 1e-9, f"{case} identity")


# --------------------------------------------------------------------------
# 5. closed forms of the target (the ``target`` methods of the official
#    ``tim/schedulers/transports.py``)
# --------------------------------------------------------------------------


def _target_setup(case):
  tr = make(case)
  x, eps, t, r = batch(tr, include_equal=True)
  dfdt = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
  got = tr.target(x, eps, t, r, dfdt)
  x, eps, t, r, dfdt = (np.asarray(v) for v in (x, eps, t, r, dfdt))
  return got, x, eps, t, r, dfdt


def test_ot_fm_target_closed_form(x64):
  got, x, eps, t, r, dfdt = _target_setup("ot_fm")
  assert_close(got, (eps - x) - (t - r) * dfdt, 1e-13)
  tr = transports.get("ot_fm")
  assert_close(
    tr.transition(
      jnp.asarray(x), jnp.asarray(t), jnp.asarray(r), jnp.asarray(eps)
    ),
    x - (t - r) * eps,
    1e-14,
  )


def test_trigflow_target_closed_form(x64):
  got, x, eps, t, r, dfdt = _target_setup("trigflow")
  v = -np.sin(t) * x + np.cos(t) * eps
  x_t = np.cos(t) * x + np.sin(t) * eps
  assert_close(got, v - np.tan(t - r) * (x_t + dfdt), 1e-12)


def test_ve_target_closed_form(x64):
  got, x, eps, t, r, dfdt = _target_setup("ve")
  assert_close(got, (r - t) * dfdt - eps, 1e-13)


def test_vp_target_closed_form(x64):
  got, x, eps, t, r, dfdt = _target_setup("vp")
  bt, br = _vp_beta(t), _vp_beta(r)
  d_bt = (19.9 * t + 0.1) * (1 + bt * bt) / (2 * bt)
  assert_close(got, eps - dfdt * (bt - br) / d_bt, 1e-12)


@pytest.mark.parametrize("case", ["edm", "edm_sd1"])
def test_edm_target_closed_form(case, x64):
  got, x, eps, t, r, dfdt = _target_setup(case)
  sd = 0.5 if case == "edm" else 1.0
  s = np.sqrt(t * t + sd * sd)
  f_star = t / (sd * s) * x - sd / s * eps
  d_f_star = sd / s**3 * x + sd * t / s**3 * eps
  ratio = (t - r) * s * s / (sd * sd + t * r)
  assert_close(got, f_star + ratio * (d_f_star - dfdt), 1e-12)


# --------------------------------------------------------------------------
# 6. sample_t
# --------------------------------------------------------------------------

N_DRAWS = 20000


def _draws(tr, seed=0, dtype=jnp.float32):
  t = tr.sample_t(jax.random.key(seed), (N_DRAWS,), dtype)
  assert t.shape == (N_DRAWS,)
  assert t.dtype == dtype
  return np.asarray(t, np.float64)


@pytest.mark.parametrize("case", ALL)
def test_sample_t_in_range(case):
  tr = make(case)
  t = _draws(tr)
  assert np.all(np.isfinite(t))
  if case in ("edm", "edm_sd1"):
    # Unclipped lognormal, as in the official code: t in (0, inf).
    assert np.all(t > 0)
  elif case == "trigflow":
    # arctan of a lognormal: (0, pi/2); 1.57 < pi/2 is exceeded with p ~ 2e-7.
    assert np.all(t > 0) and np.all(t < math.pi / 2)
    assert np.all(t <= tr.T_max)
  else:
    assert np.all(t >= tr.T_min) and np.all(t <= tr.T_max)
  assert np.unique(t).size > 0.99 * N_DRAWS  # genuinely random


def _mean_std_ok(z, mean, std, n=N_DRAWS):
  # ~5 standard errors.
  assert abs(z.mean() - mean) < 5 * std / math.sqrt(n), (z.mean(), mean)
  assert abs(z.std() - std) < 5 * std / math.sqrt(2 * n), (z.std(), std)


@pytest.mark.parametrize(
  "params,mean,std",
  [
    ({}, 0.0, 1.0),
    ({"P_mean": -0.4, "P_std": 1.0}, -0.4, 1.0),
    ({"P_mean": 0.0, "P_std": 1.6}, 0.0, 1.6),
  ],
)
def test_ot_fm_sample_t_is_logit_normal(params, mean, std, x64):
  tr = transports.get("ot_fm", **params)
  t = _draws(tr, seed=1, dtype=jnp.float64)
  assert np.all((t > 0) & (t < 1))
  _mean_std_ok(np.log(t) - np.log1p(-t), mean, std)


def test_ot_fm_sample_t_float32_logit_normal():
  tr = transports.get("ot_fm", P_mean=-0.4, P_std=1.0)
  t = _draws(tr, seed=2)
  _mean_std_ok(np.log(t) - np.log1p(-t), -0.4, 1.0)


def test_other_sample_t_distributions():
  # TrigFlow: tan(t) = s lognormal(-1, 1.6).
  t = _draws(transports.get("trigflow"), seed=3)
  _mean_std_ok(np.log(np.tan(t)), -1.0, 1.6)
  # EDM: lognormal(-1.2, 1.2).
  t = _draws(transports.get("edm"), seed=4)
  _mean_std_ok(np.log(t), -1.2, 1.2)
  # VP: uniform on [T_min, 1].
  vp = transports.get("vp")
  t = _draws(vp, seed=5)
  u = (t - vp.T_min) / (1 - vp.T_min)
  _mean_std_ok(u, 0.5, math.sqrt(1 / 12))
  # VE: log-uniform on [T_min, T_max].
  ve = transports.get("ve")
  t = _draws(ve, seed=6)
  u = np.log(t / ve.T_min) / np.log(ve.T_max / ve.T_min)
  _mean_std_ok(u, 0.5, math.sqrt(1 / 12))


def test_sample_t_depends_on_key():
  tr = transports.get("ot_fm")
  a = tr.sample_t(jax.random.key(0), (64,))
  b = tr.sample_t(jax.random.key(1), (64,))
  c = tr.sample_t(jax.random.key(0), (64,))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)


# --------------------------------------------------------------------------
# 7. c_noise
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "case,formula",
  [
    ("ot_fm", lambda t: t),
    ("trigflow", lambda t: t),
    ("edm", lambda t: np.log(t) / 4),
    ("edm_sd1", lambda t: np.log(t) / 4),
    ("vp", lambda t: 999 * t),
    ("ve", lambda t: np.log(t / 2)),
  ],
)
def test_c_noise(case, formula, x64):
  tr = make(case)
  t = np.linspace(max(tr.T_min, 1e-3), tr.T_max, 17)
  got = np.asarray(tr.c_noise(jnp.asarray(t)))
  np.testing.assert_allclose(got, formula(t), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------
# 8. transports.get
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,cls",
  [
    ("ot_fm", transports.OTFM),
    ("OT_FM", transports.OTFM),
    ("trigflow", transports.TrigFlow),
    ("TrigFlow", transports.TrigFlow),
    ("edm", transports.EDM),
    ("EDM", transports.EDM),
    ("vp", transports.VP),
    ("VP_SDE", transports.VP),
    ("ve", transports.VE),
    ("VE_SDE", transports.VE),
  ],
)
def test_get_names(name, cls):
  tr = transports.get(name)
  assert type(tr) is cls  # pylint: disable=unidiomatic-typecheck
  assert tr == cls()


def test_names_lists_the_five_transports():
  assert {"ot_fm", "trigflow", "edm", "vp", "ve"} <= set(transports.names())
  assert all(n == n.lower() for n in transports.names())


def test_get_official_parameter_spellings():
  vp = transports.get("VP_SDE", epsilon_t=1e-3)
  assert vp.T_min == 1e-3
  ve = transports.get("VE_SDE", sigma_min=0.01, sigma_max=50.0)
  assert (ve.T_min, ve.T_max) == (0.01, 50.0)
  edm = transports.get("EDM", sigma_d=1.0, P_mean=-1.0)
  assert (edm.sigma_d, edm.P_mean) == (1.0, -1.0)
  tf = transports.get("TrigFlow", T_max=1.5)
  assert tf.T_max == 1.5
  ot = transports.get("OT_FM", P_mean=-0.4, P_std=1.0)
  assert (ot.P_mean, ot.P_std) == (-0.4, 1.0)


def test_get_rejects_unknown_name():
  with pytest.raises(ValueError, match="no_such_transport"):
    transports.get("no_such_transport")


def test_get_rejects_unknown_parameter():
  with pytest.raises(ValueError, match="bogus_param"):
    transports.get("ot_fm", bogus_param=1.0)
  # An alias of one transport is not a parameter of another.
  with pytest.raises(ValueError, match="epsilon_t"):
    transports.get("ve", epsilon_t=1e-3)


@pytest.mark.parametrize(
  "param", ["w_gt", "w_cond", "w_start", "w_end", "enhance_target"]
)
def test_get_rejects_loss_params_with_hint(param):
  with pytest.raises(ValueError, match=param) as info:
    transports.get("ot_fm", **{param: 0.5})
  assert "loss" in str(info.value)


def test_transports_are_hashable_static_args():
  a, b = transports.get("ot_fm"), transports.get("OT_FM")
  assert a is not b and a == b and hash(a) == hash(b)
  assert (
    len({transports.get(n) for n in ("ot_fm", "trigflow", "edm", "vp", "ve")})
    == 5
  )
  assert transports.get("edm") != transports.get("edm", sigma_d=1.0)
  traces = []

  def f(tr, x):
    traces.append(tr)
    return tr.transition(x, jnp.float32(0.75), jnp.float32(0.25), x)

  jf = jax.jit(f, static_argnums=0)
  x = jnp.arange(4.0)
  out_a = jf(a, x)
  out_b = jf(b, x)  # equal transport: no retrace
  assert len(traces) == 1
  np.testing.assert_allclose(out_a, x - 0.5 * x, rtol=1e-6)
  np.testing.assert_array_equal(out_a, out_b)
  out_tf = jf(transports.get("trigflow"), x)  # different transport: retrace
  assert len(traces) == 2
  np.testing.assert_allclose(
    out_tf, np.cos(0.5) * x - np.sin(0.5) * x, rtol=1e-6
  )


def test_transports_are_frozen():
  tr = transports.get("ot_fm")
  with pytest.raises(dataclasses.FrozenInstanceError):
    tr.T_max = 2.0  # pytype: disable=not-writable


# --------------------------------------------------------------------------
# 9. OT-FM stochastic transition
# --------------------------------------------------------------------------


def test_stochastic_transition_ratio_zero_is_deterministic(x64):
  tr = transports.get("ot_fm")
  x, eps, t, r = batch(tr, include_equal=True)
  x_t = tr.x_t(x, eps, t)
  f = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
  xi = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
  got = tr.stochastic_transition(x_t, t, r, f, 0.0, xi)
  assert_close(got, tr.transition(x_t, t, r, f), 1e-15)


@pytest.mark.parametrize(
  "t,r,ratio", [(0.8, 0.6, 0.3), (0.5, 0.45, 1.0), (0.3, 0.05, 0.2)]
)
def test_stochastic_transition_moments(t, r, ratio, x64):
  """Per element mean and variance over many xi match the EM step of the
  official ``OT_FM.from_x_t_to_x_r`` with ``s_ratio > 0``."""
  tr = transports.get("ot_fm")
  m, k = 8000, 16  # m draws of xi for each of k fixed (x, eps) elements.
  kx, ke, kxi = jax.random.split(jax.random.key(0), 3)
  x = 0.7 + 0.3 * np.asarray(jax.random.normal(kx, (k,), jnp.float64))
  eps = np.asarray(jax.random.normal(ke, (k,), jnp.float64))
  x_t = (1 - t) * x + t * eps
  f = eps - x  # the ideal velocity
  big = lambda v: jnp.broadcast_to(jnp.asarray(v), (m, k))
  out = np.asarray(
    tr.stochastic_transition(
      big(x_t),
      jnp.float64(t),
      jnp.float64(r),
      big(f),
      ratio,
      jax.random.normal(kxi, (m, k), jnp.float64),
    )
  )
  assert out.shape == (m, k) and out.dtype == np.float64
  h = t - r
  eps_hat = x_t + (1 - t) * f
  np.testing.assert_allclose(
    eps_hat, eps, atol=1e-14
  )  # ideal F => eps_hat = eps
  mean = x_t - h * f - ratio * eps_hat * h
  var = 2 * ratio * t * h
  se = math.sqrt(var / m)
  assert np.max(np.abs(out.mean(0) - mean)) < 5 * se
  # Variance per element (k = 16 tests at ~5 sigma) and pooled.
  var_se = var * math.sqrt(2 / m)
  assert np.max(np.abs(out.var(0) - var)) < 5 * var_se
  assert abs(out.var(0).mean() - var) < 5 * var_se / math.sqrt(k)
  # The noise is not shared across elements.
  z = (out - mean) / math.sqrt(var)
  corr = np.corrcoef(z.T)
  assert np.max(np.abs(corr - np.eye(k))) < 0.06


def test_stochastic_transition_is_linear_in_the_draws(x64):
  """The step adds sqrt(2 ratio t h) xi to the deterministic drift."""
  tr = transports.get("ot_fm")
  x = jnp.linspace(-1, 1, 8)
  xi = jax.random.normal(jax.random.key(0), x.shape, jnp.float64)
  a = tr.stochastic_transition(x, 0.6, 0.4, x, 0.5, xi)
  b = tr.stochastic_transition(x, 0.6, 0.4, x, 0.5, 2 * xi)
  zero = tr.stochastic_transition(x, 0.6, 0.4, x, 0.5, 0 * xi)
  np.testing.assert_allclose(a - zero, math.sqrt(2 * 0.5 * 0.6 * 0.2) * xi)
  np.testing.assert_allclose(b - zero, 2 * (a - zero))


@pytest.mark.parametrize("case", ["trigflow", "edm", "vp", "ve"])
def test_stochastic_transition_rejected_for_non_ot_fm(case):
  tr = make(case)
  assert not tr.supports_stochastic
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="OT-FM"):
    tr.stochastic_transition(x, 0.5, 0.25, x, 0.1, x)
  assert transports.get("ot_fm").supports_stochastic
