"""Tests of ``tim_jax.transition``: the TiM target and loss (spec §1–§2, §8).

Most tests use small analytic "networks" ``F(x_t, t_in, r_in[, cond])`` whose
derivatives are known in closed form; the expected values are computed by hand
in NumPy float64 from the formulas of the spec, never through the helpers of
the module under test. A few tests use the real (tiny, perturbed) TiM model.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax import models, transition, transports

OT = transports.OTFM()
EDM = transports.EDM()  # sigma_d = 0.5, c_noise = ln(t) / 4.
TRIG = transports.TrigFlow()  # sigma_d = 0.5.

NET = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
           depth=2, num_heads=2, encoder_depth=1, z_dim=16, projector_dim=32,
           num_classes=10, lora_hidden_size=8)
# The tests only need correct numerics, not fast kernels: cheap compiles.
FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}

SHAPE = (4, 4, 3)  # H, W, C of the analytic tests.


def _normal(seed, shape):
  return np.random.RandomState(seed).standard_normal(shape)


def _col(a):
  """(B,) -> (B, 1, 1, 1) in NumPy."""
  return np.asarray(a, np.float64).reshape(-1, 1, 1, 1)


def _is_tracer(a):
  return isinstance(a, jax.core.Tracer)


# --- hand-written path quantities (spec §1.2) --------------------------------


def _ot_path(x, z, t):
  t = _col(t)
  return (1 - t) * x + t * z, z - x  # x_t, v_t


def _edm_path(x, z, t, sd=0.5):
  t = _col(t)
  s = np.sqrt(t * t + sd * sd)
  return x / s + t * z / s, -t / s ** 3 * x + sd ** 2 / s ** 3 * z


PATHS = {
    "ot_fm": (OT, _ot_path, lambda t: t, lambda t: np.ones_like(t)),
    "edm": (EDM, _edm_path, lambda t: np.log(t) / 4.0, lambda t: 0.25 / t),
}


def _times(name, b, seed=0):
  rs = np.random.RandomState(seed)
  if name == "edm":
    t = rs.uniform(0.5, 4.0, b)
    r = t * rs.uniform(0.05, 0.7, b)
  else:
    t = rs.uniform(0.3, 0.95, b)
    r = t * rs.uniform(0.0, 0.7, b)
  return t, r


# --- 1. JVP equals the analytic total derivative -----------------------------


A_, B_, C_ = 0.7, -0.4, 0.3


def _poly_net(x_t, t_in, r_in, cond):
  tb, rb, cb = (a[:, None, None, None] for a in (t_in, r_in, cond))
  return (A_ * x_t * tb + B_ * tb ** 2 * rb + C_ * jnp.sin(x_t) * rb
          + cb * x_t)


def _poly_partials(x_t, t_in, r_in, cond):
  tb, rb, cb = (_col(a) for a in (t_in, r_in, cond))
  d_dx = A_ * tb + C_ * np.cos(x_t) * rb + cb
  d_dt = A_ * x_t + 2 * B_ * tb * rb
  return d_dx, d_dt


@pytest.mark.parametrize("name", ["ot_fm", "edm"])
def test_jvp_is_analytic_total_derivative(name, x64):
  transport, path, c_noise, dc_noise = PATHS[name]
  b = 6
  x, z = _normal(0, (b,) + SHAPE), _normal(1, (b,) + SHAPE)
  t, r = _times(name, b)
  cond = np.linspace(-1.0, 1.0, b)
  x_t, v_t = path(x, z, t)
  d_dx, d_dt = _poly_partials(x_t, c_noise(t), c_noise(r), cond)
  expected = d_dx * v_t + d_dt * _col(dc_noise(t))

  got = transition.time_derivative(
      _poly_net, jnp.asarray(x), jnp.asarray(z), jnp.asarray(t),
      jnp.asarray(r), transport=transport, derivative="jvp",
      cond=jnp.asarray(cond))
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10,
                             atol=1e-10)
  # Not vacuous: the c_noise' factor and the r-terms matter here.
  assert np.abs(d_dt * _col(dc_noise(t))).max() > 0.1


# --- 2. DDE converges to the derivative like eps^2 ---------------------------


EPSILONS = (1e-1, 3e-2, 1e-2, 3e-3)


def _slopes(errors):
  return [math.log(errors[i] / errors[i + 1])
          / math.log(EPSILONS[i] / EPSILONS[i + 1])
          for i in range(len(errors) - 1)]


def _smooth_net(x_t, t_in, r_in):
  tb, rb = t_in[:, None, None, None], r_in[:, None, None, None]
  return (jnp.sin(x_t * tb) + jnp.exp(0.5 * tb) * rb * x_t ** 2
          + jnp.cos(3.0 * tb))


def _smooth_partials(x_t, t_in, r_in):
  tb, rb = _col(t_in), _col(r_in)
  d_dx = tb * np.cos(x_t * tb) + 2 * np.exp(0.5 * tb) * rb * x_t
  d_dt = (x_t * np.cos(x_t * tb) + 0.5 * np.exp(0.5 * tb) * rb * x_t ** 2
          - 3.0 * np.sin(3.0 * tb))
  return d_dx, d_dt


@pytest.mark.parametrize("name", ["ot_fm", "edm"])
def test_dde_converges_quadratically_analytic(name, x64):
  transport, path, c_noise, dc_noise = PATHS[name]
  b = 5
  x, z = _normal(2, (b,) + SHAPE), _normal(3, (b,) + SHAPE)
  t, r = _times(name, b, seed=1)
  x_t, v_t = path(x, z, t)
  d_dx, d_dt = _smooth_partials(x_t, c_noise(t), c_noise(r))
  truth = d_dx * v_t + d_dt * _col(dc_noise(t))
  errors = []
  for eps in EPSILONS:
    got = transition.time_derivative(
        _smooth_net, jnp.asarray(x), jnp.asarray(z), jnp.asarray(t),
        jnp.asarray(r), transport=transport, derivative="dde", epsilon=eps)
    errors.append(float(np.abs(np.asarray(got) - truth).max()))
  slopes = _slopes(errors)
  assert all(1.7 < s < 2.3 for s in slopes), (errors, slopes)
  assert errors[-1] < 1e-3 * np.abs(truth).max()


def _perturbed_state(kind_dtype):
  """Params and other state of the tiny model, params perturbed (NumPy)."""
  def init():
    m = models.build("c2i", NET, dtype=kind_dtype, param_dtype=kind_dtype)
    return nnx.state(m, nnx.Param, ...)
  params, rest = jax.jit(init, compiler_options=FAST)()
  rs = np.random.RandomState(7)
  params = jax.tree.map(
      lambda v: v + 0.05 * rs.standard_normal(v.shape).astype(v.dtype),
      params)
  graphdef = nnx.split(nnx.eval_shape(lambda: models.build(
      "c2i", NET, dtype=kind_dtype, param_dtype=kind_dtype)),
                       nnx.Param, ...)[0]
  return graphdef, params, rest


def test_dde_converges_quadratically_real_model(x64):
  graphdef, params, rest = _perturbed_state(jnp.float64)
  b = 4
  x = jnp.asarray(_normal(4, (b, 8, 8, 4)))
  z = jnp.asarray(_normal(5, (b, 8, 8, 4)))
  t = jnp.asarray([0.3, 0.5, 0.7, 0.9])
  r = jnp.asarray([0.1, 0.2, 0.0, 0.5])
  y = jnp.asarray([1, 2, 3, 4])

  def net(a, tt, rr, cond):
    return nnx.merge(graphdef, params, rest)(a, tt, rr, cond)

  @functools.partial(jax.jit, static_argnames="derivative",
                     compiler_options=FAST)
  def deriv(eps, derivative):
    return transition.time_derivative(net, x, z, t, r, transport=OT,
                                      derivative=derivative, epsilon=eps,
                                      cond=y)

  out = jax.jit(net, compiler_options=FAST)(transports.OTFM().x_t(
      x, z, t[:, None, None, None]), t, r, y)
  assert out.dtype == jnp.float64 and float(jnp.abs(out).max()) > 0.1
  truth = np.asarray(deriv(0.1, "jvp"))
  scale = np.abs(truth).max()
  assert scale > 0.1
  errors = [float(np.abs(np.asarray(deriv(eps, "dde")) - truth).max())
            for eps in EPSILONS]
  slopes = _slopes(errors)
  assert all(1.7 < s < 2.3 for s in slopes), (errors, slopes)
  assert errors[-1] < 1e-3 * scale


# --- 3. One batched forward over only the derivative rows --------------------


def _recording_net(calls):
  def fn(x_t, t_in, r_in, cond):
    calls.append(dict(x=x_t.shape, t=t_in.shape, r=r_in.shape,
                      cond=None if _is_tracer(cond) else np.asarray(cond)))
    return x_t * t_in[:, None, None, None] + cond[:, None, None, None]
  return fn


def _setup_rows(b, diffusion_rows, seed=0):
  x, z = _normal(seed, (b,) + SHAPE), _normal(seed + 1, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed)
  r[diffusion_rows] = t[diffusion_rows]
  return x, z, t, r


def _expected_recording_target(x, z, t, r):
  # F = x_t t + c, dF/dt = v t + x_t (exact for a central difference: F is
  # quadratic in t); target = v - (t - r) dF/dt.
  x_t, v = _ot_path(x, z, t)
  return v - _col(t - r) * (v * _col(t) + x_t)


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_derivative_is_one_forward_over_derivative_rows(derivative):
  b = 8
  x, z, t, r = _setup_rows(b, [0, 1, 2, 3])
  cond = np.arange(b) * 0.25
  calls = []
  out = transition.target(
      _recording_net(calls), jnp.asarray(x, jnp.float32),
      jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32),
      jnp.asarray(r, jnp.float32), OT, derivative,
      cond=jnp.asarray(cond, jnp.float32), num_diffusion=4)
  assert len(calls) == 1, calls  # Not one call per +-epsilon.
  assert calls[0]["x"] == (4,) + SHAPE
  assert calls[0]["t"] == (4,) and calls[0]["r"] == (4,)
  # The network never sees the diffusion rows (conditioning is sliced too).
  np.testing.assert_array_equal(calls[0]["cond"], [1.0, 1.25, 1.5, 1.75])
  np.testing.assert_allclose(np.asarray(out),
                             _expected_recording_target(x, z, t, r),
                             atol=3e-4, rtol=1e-4)

  # Same under jit (trace-time count).
  calls.clear()
  jitted = jax.jit(lambda *a: transition.target(
      _recording_net(calls), *a[:4], OT, derivative, cond=a[4],
      num_diffusion=4))
  out_jit = jitted(*(jnp.asarray(a, jnp.float32) for a in (x, z, t, r, cond)))
  assert len(calls) == 1 and calls[0]["x"] == (4,) + SHAPE
  # (Fusion may reorder float32 roundoff, amplified by 1 / (2 eps).)
  np.testing.assert_allclose(np.asarray(out_jit), np.asarray(out), atol=3e-4)


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_groups_select_rows_of_each_block(derivative):
  b = 8
  x, z, t, r = _setup_rows(b, [0, 1, 4, 5], seed=3)
  cond = np.arange(b) * 0.25
  calls = []
  out = transition.target(
      _recording_net(calls), jnp.asarray(x, jnp.float32),
      jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32),
      jnp.asarray(r, jnp.float32), OT, derivative,
      cond=jnp.asarray(cond, jnp.float32), num_diffusion=2, groups=2)
  assert len(calls) == 1 and calls[0]["x"] == (4,) + SHAPE
  np.testing.assert_array_equal(calls[0]["cond"], [0.5, 0.75, 1.5, 1.75])
  expected = _expected_recording_target(x, z, t, r)
  np.testing.assert_allclose(np.asarray(out), expected, atol=3e-4, rtol=1e-4)
  # Diffusion rows are the plain diffusion target z - x.
  np.testing.assert_allclose(np.asarray(out)[[0, 1, 4, 5]],
                             (z - x)[[0, 1, 4, 5]], atol=1e-6)


def test_target_rejects_bad_partition():
  x = jnp.zeros((6,) + SHAPE)
  t = jnp.full((6,), 0.5)
  with pytest.raises(ValueError, match="groups=4"):
    transition.target(lambda a, b, c: a, x, x, t, t, OT, groups=4)
  with pytest.raises(ValueError, match="num_diffusion=4"):
    transition.target(lambda a, b, c: a, x, x, t, t, OT, num_diffusion=4,
                      groups=2)
  with pytest.raises(ValueError, match="'fd'"):
    transition.time_derivative(lambda a, b, c: a, x, x, t, t, transport=OT,
                               derivative="fd")


# --- 4. r == t rows and stop-gradient ----------------------------------------


def _sqrt_interval_net(x_t, t_in, r_in):
  # sqrt(t_in - r_in) is NaN below r and has an infinite slope at r: a row
  # with r == t is finite only if its derivative is forced to 0.
  tb, rb = t_in[:, None, None, None], r_in[:, None, None, None]
  return jnp.sin(x_t) * tb + jnp.sqrt(tb - rb)


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
@pytest.mark.parametrize("name", ["ot_fm", "edm"])
def test_rows_with_r_equal_t_get_the_diffusion_target(name, derivative):
  transport = PATHS[name][0]
  b = 6
  x, z = _normal(8, (b,) + SHAPE), _normal(9, (b,) + SHAPE)
  t, r = _times(name, b, seed=2)
  r[[0, 3]] = t[[0, 3]]  # Row 0 is counted in num_diffusion, row 3 is not.
  args = [jnp.asarray(a, jnp.float32) for a in (x, z, t, r)]
  out = np.asarray(transition.target(_sqrt_interval_net, *args, transport,
                                     derivative, num_diffusion=1))
  if name == "ot_fm":
    plain = z - x
  else:
    sd, tb = 0.5, _col(t)
    s = np.sqrt(tb * tb + sd * sd)
    plain = tb / (sd * s) * x - sd / s * z
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[[0, 3]], plain[[0, 3]], rtol=1e-5,
                             atol=1e-5)
  # The other rows do carry a derivative term.
  assert np.abs(out[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).min() > 0


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_target_is_stop_gradient(derivative):
  b = 6
  x, z, t, r = _setup_rows(b, [0, 1], seed=5)
  x, z, t, r = (jnp.asarray(a, jnp.float32) for a in (x, z, t, r))

  def total(p):
    def fn(x_t, t_in, r_in):
      return p * x_t * t_in[:, None, None, None] ** 2 + p ** 2 * x_t
    return jnp.sum(transition.target(fn, x, z, t, r, OT, derivative,
                                     num_diffusion=2) ** 2)

  # The target does depend on p ...
  assert abs(float(total(1.0)) - float(total(2.0))) > 1.0
  # ... but no gradient flows through it, exactly.
  assert float(jax.grad(total)(1.5)) == 0.0

  # Not through a diffusion_target override either (enhanced target).
  def with_override(p):
    fn = lambda x_t, t_in, r_in: x_t * t_in[:, None, None, None]
    return jnp.sum(transition.target(fn, x, z, t, r, OT, derivative,
                                     num_diffusion=2,
                                     diffusion_target=p * x) ** 2)
  assert float(jax.grad(with_override)(1.5)) == 0.0
  assert float(with_override(1.5)) != float(with_override(2.0))


# --- 5. float32 derivative from a bfloat16 network ----------------------------


def _bf16_net(x_t, t_in, r_in):
  del r_in
  xb = x_t.astype(jnp.bfloat16)
  tb = t_in.astype(jnp.bfloat16)[:, None, None, None]
  return 3.0 * xb * tb + tb * tb


def test_bf16_network_derivative_is_float32():
  b, eps = 6, 0.005
  x, z = _normal(10, (b,) + SHAPE), _normal(11, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed=4)
  args = [jnp.asarray(a, jnp.float32) for a in (x, z, t, r)]
  assert _bf16_net(args[0], args[2], args[3]).dtype == jnp.bfloat16
  got = transition.time_derivative(_bf16_net, *args, transport=OT,
                                   derivative="dde", epsilon=eps)
  assert got.dtype == jnp.float32
  got = np.asarray(got, np.float64)
  assert np.all(np.isfinite(got))
  # Accurate to the bf16 resolution of F over 2 eps.
  x_t, v = _ot_path(x, z, t)
  truth = 3.0 * (v * _col(t) + x_t) + 2.0 * _col(t)
  f_max = np.abs(3.0 * x_t * _col(t) + _col(t) ** 2).max() + 0.1
  assert np.abs(got - truth).max() <= 2.0 ** -6 * f_max / (2 * eps)
  # The difference and the division by 2 eps are float32 operations on the
  # bf16 outputs (a bf16 division would also use bf16(0.01) = 0.010009765625).
  outs = [_bf16_net(OT.x_t(args[0], args[1], (args[2] + s)[:, None, None,
                                                             None]),
                    args[2] + s, args[3]) for s in (eps, -eps)]
  ref = (outs[0].astype(jnp.float32) - outs[1].astype(jnp.float32)) / (
      2.0 * eps)
  close = np.isclose(got, np.asarray(ref, np.float64), rtol=1e-6, atol=1e-6)
  assert close.mean() > 0.95
  in_bf16 = ((outs[0] - outs[1]) / jnp.asarray(2.0 * eps, jnp.bfloat16))
  assert not np.allclose(np.asarray(in_bf16, np.float64), np.asarray(ref),
                         rtol=1e-6, atol=1e-6)

  jvp = transition.time_derivative(_bf16_net, *args, transport=OT,
                                   derivative="jvp")
  assert jvp.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jvp), truth, rtol=0.05, atol=0.05)

  tgt = transition.target(_bf16_net, *args, OT, "dde", num_diffusion=2)
  assert tgt.dtype == jnp.float32


# --- 6. LossConfig ------------------------------------------------------------


def test_counts_round_half_even_and_groups():
  cfg = transition.LossConfig()
  assert cfg.counts(64) == (32, 6)  # 6.4 -> 6.
  assert cfg.counts(256) == (128, 26)  # 25.6 -> 26.
  assert cfg.counts(5) == (2, 0)  # 2.5 -> 2, 0.5 -> 0.
  assert cfg.counts(15) == (8, 2)  # 7.5 -> 8, 1.5 -> 2.
  quarter = transition.LossConfig(diffusion_ratio=0.25, consistency_ratio=0.25)
  assert quarter.counts(2) == (0, 0)  # round(0.5) == 0.
  assert quarter.counts(6) == (2, 2)  # round(1.5) == 2.
  assert quarter.counts(10) == (2, 2)  # round(2.5) == 2.
  # Per block.
  assert transition.LossConfig(groups=4).counts(256) == (32, 6)
  assert transition.LossConfig(groups=2).counts(64) == (16, 3)
  assert transition.LossConfig(groups=2).counts(8) == (2, 0)
  with pytest.raises(ValueError, match="groups=3"):
    transition.LossConfig(groups=3).counts(64)
  with pytest.raises(ValueError, match="overlap"):
    transition.LossConfig(diffusion_ratio=0.6,
                          consistency_ratio=0.5).counts(10)
  # Touching is fine.
  assert transition.LossConfig(diffusion_ratio=0.5,
                               consistency_ratio=0.5).counts(10) == (5, 5)


@pytest.mark.parametrize("kwargs, word", [
    (dict(derivative="fd"), "'fd'"),
    (dict(weight_time_type="linear"), "'linear'"),
    (dict(diffusion_ratio=1.5), "1.5"),
    (dict(consistency_ratio=-0.1), "-0.1"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(groups=0), "groups"),
])
def test_config_rejects_bad_values(kwargs, word):
  with pytest.raises(ValueError, match=word):
    transition.LossConfig(**kwargs)


# --- 7. sample_t_and_r ----------------------------------------------------------


def _phi(u):
  return 0.5 * (1.0 + math.erf(u / math.sqrt(2.0)))


@pytest.mark.parametrize("groups", [1, 4])
def test_sample_t_and_r(groups):
  b = 8192
  cfg = transition.LossConfig(groups=groups)
  n_d, n_c = cfg.counts(b)
  per = b // groups
  t, r = transition.sample_t_and_r(jax.random.key(3), b, OT, cfg)
  assert t.shape == r.shape == (b,) and t.dtype == jnp.float32
  t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
  assert np.all(t >= r)
  pos = np.arange(b) % per
  diff, cons = pos < n_d, pos >= per - n_c
  mid = ~diff & ~cons
  assert diff.sum() == groups * n_d and cons.sum() == groups * n_c > 0
  np.testing.assert_array_equal(r[diff], t[diff])
  np.testing.assert_array_equal(r[cons], OT.T_min)
  assert np.all(r[mid] < t[mid]) and np.all(r[mid] > OT.T_min)
  # t is the max of two logit-normal draws: CDF Phi(logit(s))^2; the r of
  # the interval rows is the min: 1 - (1 - Phi)^2.
  tol = 4.0 / math.sqrt(mid.sum())
  for s in (0.2, 0.4, 0.5, 0.6, 0.8):
    phi = _phi(math.log(s / (1 - s)))
    assert abs(np.mean(t <= s) - phi ** 2) < 4.0 / math.sqrt(b)
    assert abs(np.mean(r[mid] <= s) - (1 - (1 - phi) ** 2)) < tol


def test_sample_t_and_r_edm_dtype(x64):
  cfg = transition.LossConfig(diffusion_ratio=0.25, consistency_ratio=0.25)
  t, r = transition.sample_t_and_r(jax.random.key(0), 16, EDM, cfg,
                                   jnp.float64)
  assert t.dtype == r.dtype == jnp.float64
  t, r = np.asarray(t), np.asarray(r)
  np.testing.assert_array_equal(r[:4], t[:4])
  np.testing.assert_array_equal(r[-4:], 0.01)
  assert np.all(r[4:12] < t[4:12]) and np.all(t > 0)


# --- 8. time_weight -------------------------------------------------------------


def _hand_weight(t, r, sd, kind, tangent, sigmoid, t_and_r):
  if tangent:
    t, r = np.tan(t), np.tan(r)
  elif sigmoid:
    t, r = t / (1 - t), r / (1 - r)
  d = t - r if t_and_r else t
  return {
      "constant": np.ones_like(d),
      "reciprocal": 1 / (d + sd),
      "sqrt": 1 / np.sqrt(d + sd),
      "square": 1 / (d + sd) ** 2,
      "Soft-Min-SNR": 1 / (d * d + sd * sd),
  }[kind]


@pytest.mark.parametrize("transport", [OT, TRIG], ids=["sd1", "sd0.5"])
@pytest.mark.parametrize("t_and_r", [True, False])
@pytest.mark.parametrize("warp", ["tangent", "sigmoid", "none", "both"])
@pytest.mark.parametrize("kind", transition.WEIGHT_TIME_TYPES)
def test_time_weight(kind, warp, t_and_r, transport):
  rs = np.random.RandomState(0)
  t = rs.uniform(0.05, 0.9, 32)
  r = t * rs.uniform(0.0, 1.0, 32)
  r[:4] = t[:4]
  r[-4:] = 0.0
  tangent = warp in ("tangent", "both")
  sigmoid = warp in ("sigmoid", "both")
  cfg = transition.LossConfig(weight_time_type=kind,
                              weight_time_tangent=tangent,
                              weight_time_sigmoid=sigmoid,
                              weight_t_and_r=t_and_r)
  got = transition.time_weight(jnp.asarray(t, jnp.float32),
                               jnp.asarray(r, jnp.float32), transport, cfg)
  # Tangent wins when both warps are set (spec §2 step 11).
  expected = _hand_weight(t, r, transport.sigma_d, kind, tangent,
                          sigmoid and not tangent, t_and_r)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5)


def test_time_weight_default_is_paper_weight():
  t = np.array([0.2, 0.5, 0.9, 1.0])
  r = np.array([0.2, 0.1, 0.0, 0.5])
  got = transition.time_weight(jnp.asarray(t, jnp.float32),
                               jnp.asarray(r, jnp.float32), OT,
                               transition.LossConfig())
  np.testing.assert_allclose(np.asarray(got),
                             (1 + np.tan(t) - np.tan(r)) ** -0.5, rtol=1e-5)
  assert float(got[0]) == 1.0


# --- 9. The loss ------------------------------------------------------------------
#
# Every loss evaluation below runs under ``jax.jit`` (cheap compiles, several
# evaluations per program): eager dispatch on a fresh shape is far slower.
# The student records the arguments of its first call, which ``loss`` makes
# for the prediction (t_in = c_noise(t), r_in = c_noise(r), x_t).


def _first_call(fn, rec):
  def wrapped(x_t, t_in, r_in, cond):
    if not rec:
      rec.update(x_t=x_t, t=t_in, r=r_in)
    return fn(x_t, t_in, r_in, cond)
  return wrapped


def _jit_run(body, *args):
  """``body(*args)`` as one cheaply compiled program, results on the host."""
  out = jax.jit(body, compiler_options=FAST)(*args)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def _torch_cos(a, b, eps=1e-8):
  """torch.nn.functional.cosine_similarity over the last axis: each norm is
  clamped at eps separately."""
  return (a * b).sum(-1) / (np.maximum(np.linalg.norm(a, axis=-1), eps)
                            * np.maximum(np.linalg.norm(b, axis=-1), eps))


def _hand_rows(f, tgt):
  """Per-row MSE and directional loss (cosine over channels, eps 1e-8)."""
  b = f.shape[0]
  mse = ((f - tgt) ** 2).reshape(b, -1).mean(1)
  return mse, (1.0 - _torch_cos(f, tgt)).reshape(b, -1).mean(1)


P0, S0 = 0.8, 0.5


def _student(p):
  # F = p x_t + s t^2 + 0.1 cond: linear in x_t and quadratic in t, so the
  # central difference is exact and dF/dt = p v + 2 s t under OT-FM.
  def fn(x_t, t_in, r_in, cond):
    del r_in
    tb = t_in[:, None, None, None]
    return p * x_t + S0 * tb ** 2 + 0.1 * cond[:, None, None, None], None
  return fn


def _sqrt_weight(t, r):
  return (1 + np.tan(t) - np.tan(r)) ** -0.5


@pytest.mark.parametrize("groups, derivative, t_and_r",
                         [(1, "dde", True), (2, "jvp", False)])
def test_loss_value_and_gradient_by_hand(groups, derivative, t_and_r, x64):
  b = 8
  # With weight_t_and_r (and sigma_d = 1) every weight is 1 at r = t anyway;
  # without it, forcing the diffusion rows to 1 matters.
  cfg = transition.LossConfig(groups=groups, derivative=derivative,
                              weight_t_and_r=t_and_r)
  n_d, _ = cfg.counts(b)
  x = _normal(20, (b,) + SHAPE)
  cond = np.linspace(-1, 1, b)

  def objective(p, xx, cc):
    rec = {}
    value, metrics = transition.loss(_first_call(_student(p), rec), xx, cc,
                                     jax.random.key(4), transport=OT,
                                     config=cfg)
    return value, (metrics, rec)

  (value, (metrics, rec)), grad = _jit_run(
      jax.value_and_grad(objective, has_aux=True), P0, jnp.asarray(x),
      jnp.asarray(cond))
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  v = (x_t - (1 - _col(t)) * x) / _col(t) - x  # z - x, z recovered.
  pos = np.arange(b) % (b // groups)
  np.testing.assert_array_equal(r[pos < n_d], t[pos < n_d])
  assert np.all(r[pos >= n_d] < t[pos >= n_d])

  tgt = v - _col(t - r) * (P0 * v + 2 * S0 * _col(t))

  def rows(p):
    f = p * x_t + S0 * _col(t) ** 2 + 0.1 * _col(cond)
    mse, dirl = _hand_rows(f, tgt)
    return mse, dirl, mse + dirl

  mse, dirl, big_l = rows(P0)
  w = np.where(pos < n_d, 1.0, _sqrt_weight(t, r if t_and_r else 0 * r))
  expected = np.mean(w * big_l / (big_l + 1e-5))
  np.testing.assert_allclose(value, expected, rtol=1e-9)
  np.testing.assert_allclose(metrics["loss_main"], expected, rtol=1e-9)
  # (i) loss_main ~ mean(w_time), since w_ad L = L / (L + 1e-5).
  np.testing.assert_allclose(value, w.mean(), rtol=1e-4)
  assert abs(value - 1.0) > 1e-2  # The time weights do matter here.
  np.testing.assert_allclose(metrics["weight_time_mean"], w.mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(metrics["weight_adaptive_mean"],
                             np.mean(1 / (big_l + 1e-5)), rtol=1e-9)
  np.testing.assert_allclose(metrics["mse_loss"], mse.mean(), rtol=1e-9)
  np.testing.assert_allclose(metrics["directional_loss"], dirl.mean(),
                             rtol=1e-9)
  np.testing.assert_allclose(metrics["denoising_loss"], big_l.mean(),
                             rtol=1e-9)
  assert metrics["proj_loss"] == 0.0 and metrics["nonfinite_rows"] == 0.0

  # (ii) d loss / dp = mean_b(w_b dL_b/dp / (L_b + 1e-5)) with the target and
  # the adaptive weight held fixed (finite difference of the hand L_b).
  h = 1e-5
  d_l = (rows(P0 + h)[2] - rows(P0 - h)[2]) / (2 * h)
  expected_grad = np.mean(w * d_l / (big_l + 1e-5))
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
  assert abs(expected_grad) > 1e-5


def _all_diffusion(**kw):
  return transition.LossConfig(diffusion_ratio=1.0, consistency_ratio=0.0,
                               **kw)


def _velocity_student(x, transform, proj=None):
  """F = transform(v, t_in, x_t, cond), v = (x_t - x) / t the OT-FM velocity
  (the all-diffusion target)."""
  def fn(x_t, t_in, r_in, cond):
    del r_in
    v = (x_t - x) / t_in[:, None, None, None]
    return transform(v, t_in, x_t, cond), proj
  return fn


def _rotate_channels(v):
  # (a, b, c, d) -> (-b, a, -d, c): orthogonal to v at every pixel.
  return jnp.stack([-v[..., 1], v[..., 0], -v[..., 3], v[..., 2]], axis=-1)


CHAN = np.array([0.2, 1.0, 3.0, 0.5])


def test_directional_loss_is_cosine_over_channels():
  b, shape = 4, (3, 5, 4)
  x_np = _normal(30, (b,) + shape)
  pix = np.random.RandomState(1).uniform(0.1, 3.0, shape[:2])[None, :, :,
                                                               None]
  students = {
      "double": lambda v, *_: 2.0 * v,
      "orthogonal": lambda v, *_: _rotate_channels(v),
      "pixel_scale": lambda v, *_: v * jnp.asarray(pix, jnp.float32),
      "channel_scale": lambda v, *_: v * jnp.asarray(CHAN, jnp.float32),
      # |F| < eps at every pixel: F / eps, as torch (not dot / max(|F||T|,
      # eps)).
      "tiny": lambda v, *_: 1e-9 * v,
  }

  def body(x):
    out = {}
    for name, tr in students.items():
      rec = {}
      fn = _first_call(_velocity_student(x, tr), rec)
      out[name] = transition.loss(fn, x, jnp.zeros((b,)), jax.random.key(6),
                                  transport=OT, config=_all_diffusion())[1]
      out["rec"] = rec
    out["off"] = transition.loss(
        _velocity_student(x, students["orthogonal"]), x, jnp.zeros((b,)),
        jax.random.key(6), transport=OT,
        config=_all_diffusion(directional_loss=False))[1]
    return out

  out = _jit_run(body, jnp.asarray(x_np, jnp.float32))
  v = (out["rec"]["x_t"] - x_np) / _col(out["rec"]["t"])
  # F = 2 v: cos = 1 everywhere, so directional 0 but mse = mean(v^2) > 0.
  m = out["double"]
  np.testing.assert_allclose(m["directional_loss"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["mse_loss"], np.mean(v ** 2), rtol=1e-4)
  assert m["mse_loss"] > 0.5
  np.testing.assert_allclose(m["loss_main"], 1.0, rtol=1e-4)
  # Orthogonal at every pixel: directional 1, mse = 2 mean(v^2).
  m = out["orthogonal"]
  np.testing.assert_allclose(m["directional_loss"], 1.0, atol=1e-5)
  np.testing.assert_allclose(m["mse_loss"], 2 * np.mean(v ** 2), rtol=1e-4)
  np.testing.assert_allclose(m["denoising_loss"], 1 + 2 * np.mean(v ** 2),
                             rtol=1e-4)
  # A positive scale per pixel keeps every channel cosine at 1 (a cosine
  # over the flattened sample or over a spatial axis would not be 1).
  np.testing.assert_allclose(out["pixel_scale"]["directional_loss"], 0.0,
                             atol=1e-6)
  # A positive scale per channel: the channel cosine, by hand.
  cos = (v * v * CHAN).sum(-1) / (np.linalg.norm(v * CHAN, axis=-1)
                                  * np.linalg.norm(v, axis=-1))
  np.testing.assert_allclose(out["channel_scale"]["directional_loss"],
                             np.mean(1 - cos), rtol=1e-4)
  assert np.mean(1 - cos) > 0.05
  tiny = out["tiny"]["directional_loss"]
  np.testing.assert_allclose(tiny, np.mean(1 - _torch_cos(1e-9 * v, v)),
                             rtol=1e-4)
  assert 0.2 < tiny < 0.95
  # Switched off: mse only.
  assert out["off"]["directional_loss"] == 0.0
  np.testing.assert_allclose(out["off"]["denoising_loss"],
                             2 * np.mean(v ** 2), rtol=1e-4)


def test_zero_prediction_has_finite_gradient():
  # A network at initialisation outputs exactly 0 (zero-init output layer):
  # the directional term must not turn the gradient into NaN.
  b = 4
  x = jnp.asarray(_normal(36, (b,) + SHAPE), jnp.float32)

  def objective(p):
    fn = _velocity_student(x, lambda v, *_: p * v)
    return transition.loss(fn, x, jnp.zeros((b,)), jax.random.key(3),
                           transport=OT, config=_all_diffusion())[0]

  value, grad = _jit_run(jax.value_and_grad(objective), 0.0)
  assert np.isfinite(value) and np.isfinite(grad)
  np.testing.assert_allclose(value, 1.0, rtol=1e-4)  # 1 - cos = 1.


def test_nonfinite_rows_are_zeroed(x64):
  b = 8
  x_np = _normal(31, (b,) + SHAPE)
  cond = jnp.arange(b, dtype=jnp.float64)

  def poisoned(fn, row):
    def wrapped(x_t, t_in, r_in, c):
      f, proj = fn(x_t, t_in, r_in, c)
      return jnp.where(c[:, None, None, None] == row, jnp.nan, f), proj
    return wrapped

  def body(x):
    # All rows diffusion, NaN in row 2.
    diffusion = transition.loss(
        poisoned(_velocity_student(x, lambda v, *_: 1.5 * v), 2), x, cond,
        jax.random.key(7), transport=OT, config=_all_diffusion())
    # Default partition, NaN in the last (consistency) row, whose target is
    # then NaN too (its derivative goes through the same network).
    rec = {}
    default = transition.loss(
        _first_call(poisoned(_student(P0), b - 1), rec), x, cond,
        jax.random.key(8), transport=OT, config=transition.LossConfig())
    return diffusion, default, rec

  (v1, m1), (v2, m2), rec = _jit_run(body, jnp.asarray(x_np))
  for value, m in ((v1, m1), (v2, m2)):
    assert np.isfinite(value)
    assert all(np.isfinite(a) for a in m.values())
    assert m["nonfinite_rows"] == 1.0
  # The NaN row contributes 0; every other row w_time * w_ad * L ~ w_time.
  np.testing.assert_allclose(v1, (b - 1) / b, rtol=1e-4)
  w = _sqrt_weight(rec["t"], rec["r"])
  w[:4] = 1.0
  np.testing.assert_allclose(v2, w[:-1].sum() / b, rtol=1e-4)


def test_projection_loss():
  b, n, d = 4, 6, 5
  x = jnp.asarray(_normal(33, (b,) + SHAPE), jnp.float32)
  proj_np = _normal(34, (b, n, d))
  scale = np.random.RandomState(2).uniform(0.1, 4.0, (b, n, 1))
  feat = np.array([0.1, 2.0, 1.0, 5.0, 0.3])
  cases = {  # name: (projection, REPA target)
      "same": (proj_np, proj_np),
      "negated": (proj_np, -proj_np),
      "token_scale": (proj_np, proj_np * scale),
      "feature_scale": (proj_np, proj_np * feat),
      "nan_row": (np.where(np.arange(b)[:, None, None] == 1, np.nan,
                           proj_np), proj_np * feat),
      "none": (proj_np, None),
  }

  def body(x):
    out = {}
    for name, (p, repa) in cases.items():
      fn = _velocity_student(x, lambda v, *_: 2.0 * v,
                             proj=jnp.asarray(p, jnp.float32))
      out[name] = transition.loss(
          fn, x, jnp.zeros((b,)), jax.random.key(9), transport=OT,
          config=_all_diffusion(proj_coeff=0.5),
          repa_target=None if repa is None else jnp.asarray(repa,
                                                            jnp.float32))
    return out

  out = _jit_run(body, x)
  proj_loss = {k: m["proj_loss"] for k, (_, m) in out.items()}
  np.testing.assert_allclose(proj_loss["same"], 0.0, atol=1e-6)
  np.testing.assert_allclose(proj_loss["negated"], 2.0, rtol=1e-6)
  # The cosine is over the feature (last) axis.
  np.testing.assert_allclose(proj_loss["token_scale"], 0.0, atol=1e-6)
  repa = proj_np * feat
  cos = (proj_np * repa).sum(-1) / (np.linalg.norm(proj_np, axis=-1)
                                    * np.linalg.norm(repa, axis=-1))
  np.testing.assert_allclose(proj_loss["feature_scale"], np.mean(1 - cos),
                             rtol=1e-5)
  # A NaN projection row counts 0 (per-sample nan_to_num).
  per_row = (1 - cos).mean(1)
  np.testing.assert_allclose(proj_loss["nan_row"],
                             (per_row.sum() - per_row[1]) / b, rtol=1e-5)
  assert proj_loss["none"] == 0.0
  # total = loss_main + proj_coeff * proj_loss.
  for name, (total, m) in out.items():
    np.testing.assert_allclose(total, m["loss_main"] + 0.5 * m["proj_loss"],
                               rtol=1e-6, err_msg=name)
    assert m["loss"] == total
  np.testing.assert_allclose(out["negated"][0], 1.0 + 0.5 * 2.0, rtol=1e-4)


def test_share_metrics():
  def body(x64_rows, x_grouped):
    cond = jnp.zeros((64,))
    return [transition.loss(_student(P0), x, cond, jax.random.key(0),
                            transport=OT,
                            config=transition.LossConfig(groups=g))[1]
            for x, g in ((x64_rows, 1), (x_grouped, 2))]

  x = jnp.asarray(_normal(35, (64, 2, 2, 3)), jnp.float32)
  plain, grouped = _jit_run(body, x, x)
  for m, shares in ((plain, (32 / 64, 6 / 64, 26 / 64)),
                    (grouped, (16 / 32, 3 / 32, 13 / 32))):
    got = tuple(m[k] for k in ("share_diffusion", "share_consistency",
                               "share_interval"))
    np.testing.assert_allclose(got, shares, rtol=1e-6)


# --- 10. Enhanced target --------------------------------------------------------


def test_target_with_diffusion_target_override(x64):
  b = 6
  x, z = _normal(40, (b,) + SHAPE), _normal(41, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed=6)
  r[0] = t[0]
  cond = np.linspace(0, 1, b)
  mixed = _normal(42, (b,) + SHAPE)
  out = transition.target(_poly_net, *(jnp.asarray(a) for a in (x, z, t, r)),
                          OT, "jvp", cond=jnp.asarray(cond), num_diffusion=1,
                          diffusion_target=jnp.asarray(mixed))
  x_t, v = _ot_path(x, z, t)
  d_dx, d_dt = _poly_partials(x_t, t, r, cond)
  expected = mixed - _col(t - r) * (d_dx * v + d_dt)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10,
                             atol=1e-10)
  np.testing.assert_array_equal(np.asarray(out)[0], mixed[0])


W_START, W_END = 0.3, 0.8


def _teacher(calls):
  # F_teacher = 0.5 label + 0.3 sin(x_t), so F_cond - F_uncond = 0.5 label.
  def fn(x_t, t_in, r_in, c):
    calls.append(dict(cond=c, r_minus_t=r_in - t_in))
    return 0.5 * c[:, None, None, None] + 0.3 * jnp.sin(x_t), None
  return fn


def _in_window(t_in):
  return ((t_in >= W_START) & (t_in <= W_END))[:, None, None, None]


def test_enhanced_target_in_loss(x64):
  b = 16
  x_np = _normal(43, (b,) + SHAPE)
  labels = np.arange(1, b + 1, dtype=np.float64)
  dropped = np.where(np.arange(b) % 3 == 0, 0.0, labels)  # CFG-dropped.
  mg = _all_diffusion(enhance_target=True, w_gt=1.0, w_cond=0.75,
                      w_start=W_START, w_end=W_END, directional_loss=False)
  gt_only = _all_diffusion(enhance_target=True, w_gt=0.5, w_cond=0.0,
                           w_start=W_START, w_end=W_END,
                           directional_loss=False)
  lab = jnp.asarray(labels)
  students = {
      # The plain velocity: misses by 0.75 * 0.5 label inside the window.
      "plain": (mg, lambda v, t_in, x_t, c: v),
      # Equal to the expected target: v + 0.75 (F_cond - F_uncond) inside
      # the window, v outside.
      "exact": (mg, lambda v, t_in, x_t, c: v + jnp.where(
          _in_window(t_in), 0.375 * lab[:, None, None, None], 0.0)),
      # w_cond = 0: w_gt v + (1 - w_gt) F_uncond inside the window.
      "gt_only": (gt_only, lambda v, t_in, x_t, c: jnp.where(
          _in_window(t_in), 0.5 * v + 0.5 * 0.3 * jnp.sin(x_t), v)),
  }

  def body(x, student_cond):
    out = {}
    for name, (cfg, tr) in students.items():
      rec, calls = {}, []
      m = transition.loss(
          _first_call(_velocity_student(x, tr), rec), x, student_cond,
          jax.random.key(11), transport=OT, config=cfg,
          teacher_fn=_teacher(calls), teacher_cond=lab,
          null_cond=jnp.zeros((b,)))[1]
      out[name] = dict(metrics=m, rec=rec, calls=calls)
    return out

  out = _jit_run(body, jnp.asarray(x_np), jnp.asarray(dropped))
  t = out["plain"]["rec"]["t"]
  inside = (t >= W_START) & (t <= W_END)
  assert inside.any() and (~inside).any()
  # Teacher: r = t, on the undropped labels and on the null labels.
  calls = out["plain"]["calls"]
  assert len(calls) == 2
  assert all(np.all(c["r_minus_t"] == 0) for c in calls)
  seen = sorted(tuple(c["cond"]) for c in calls)
  assert seen == sorted([tuple(labels), tuple(np.zeros(b))])
  np.testing.assert_allclose(out["plain"]["metrics"]["mse_loss"],
                             np.mean(inside * (0.375 * labels) ** 2),
                             rtol=1e-9)
  assert out["exact"]["metrics"]["mse_loss"] < 1e-20
  calls = out["gt_only"]["calls"]
  assert len(calls) == 1
  np.testing.assert_array_equal(calls[0]["cond"], np.zeros(b))
  assert out["gt_only"]["metrics"]["mse_loss"] < 1e-20


def test_enhanced_target_with_derivative_rows(x64):
  # The mixture replaces v and (t - r) dF/dt is still subtracted; without
  # teacher_cond the teacher's conditional pass uses cond.
  b = 8
  x_np = _normal(44, (b,) + SHAPE)
  labels = np.arange(1, b + 1, dtype=np.float64)
  cfg = transition.LossConfig(enhance_target=True, w_gt=1.0, w_cond=0.75,
                              w_start=0.0, w_end=1.0)

  def body(x, cond):
    rec = {}
    m = transition.loss(_first_call(_student(P0), rec), x, cond,
                        jax.random.key(12), transport=OT, config=cfg,
                        teacher_fn=_teacher([]), null_cond=jnp.zeros((b,)))[1]
    return m, rec

  m, rec = _jit_run(body, jnp.asarray(x_np), jnp.asarray(labels))
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  v = (x_t - (1 - _col(t)) * x_np) / _col(t) - x_np
  tgt = (v + 0.375 * _col(labels)
         - _col(t - r) * (P0 * v + 2 * S0 * _col(t)))
  f = P0 * x_t + S0 * _col(t) ** 2 + 0.1 * _col(labels)
  mse, dirl = _hand_rows(f, tgt)
  np.testing.assert_allclose(m["mse_loss"], mse.mean(), rtol=1e-9)
  np.testing.assert_allclose(m["directional_loss"], dirl.mean(), rtol=1e-9)


def test_enhanced_target_needs_teacher():
  b = 4
  x = jnp.zeros((b,) + SHAPE)
  cond = jnp.zeros((b,))
  cfg = transition.LossConfig(enhance_target=True, w_cond=0.75)
  loss_fn = lambda **kw: jax.eval_shape(lambda: transition.loss(
      _student(P0), x, cond, jax.random.key(0), transport=OT, config=cfg,
      **kw))
  with pytest.raises(ValueError, match="teacher_fn"):
    loss_fn(null_cond=cond)
  with pytest.raises(ValueError, match="null_cond"):
    loss_fn(teacher_fn=_teacher([]))
  loss_fn(teacher_fn=_teacher([]), null_cond=cond)  # Complete: no error.


# --- 11. jit and gradients ----------------------------------------------------


def test_loss_jit_matches_eager():
  b = 8
  x = jnp.asarray(_normal(50, (b,) + SHAPE), jnp.float32)
  cond = jnp.linspace(-1.0, 1.0, b)
  proj = jnp.asarray(_normal(51, (b, 3, 5)), jnp.float32)
  repa = jnp.asarray(_normal(52, (b, 3, 5)), jnp.float32)

  def fn(x_t, t_in, r_in, c):
    f, _ = _student(P0)(x_t, t_in, r_in, c)
    return jnp.tanh(f) * (1 + r_in[:, None, None, None]), proj

  def loss_fn(derivative, key):
    cfg = transition.LossConfig(derivative=derivative)
    return functools.partial(transition.loss, fn, transport=OT, config=cfg,
                             repa_target=repa)(x, cond, jax.random.key(key))

  jitted = jax.jit(lambda: [loss_fn(d, 13) for d in ("dde", "jvp")]
                   + [loss_fn("dde", 14)], compiler_options=FAST)()
  for i, derivative in enumerate(("dde", "jvp")):
    eager = loss_fn(derivative, 13)
    for k in eager[1]:
      np.testing.assert_allclose(float(jitted[i][1][k]), float(eager[1][k]),
                                 rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(jitted[i][0]), float(eager[0]),
                               rtol=2e-5)
  # A different key gives a different draw.
  assert float(jitted[2][1]["mse_loss"]) != float(jitted[0][1]["mse_loss"])


@pytest.fixture(scope="module")
def tiny_model():
  return _perturbed_state(jnp.float32)


def test_real_model_loss_jit_and_grad(tiny_model):
  graphdef, params, rest = tiny_model
  b = 8
  x = jnp.asarray(_normal(60, (b, 8, 8, 4)), jnp.float32)
  y = jnp.arange(b) % 10
  repa = jnp.asarray(_normal(61, (b, 16, 16)), jnp.float32)

  def objective(p, derivative):
    model = lambda a, tt, rr, c: nnx.merge(graphdef, p, rest)(
        a, tt, rr, c, return_projection=True)
    loss_fn = functools.partial(
        transition.loss, transport=OT,
        config=transition.LossConfig(derivative=derivative),
        repa_target=repa)
    return loss_fn(model, x, y, jax.random.key(15))

  def body(p):
    out = nnx.merge(graphdef, p, rest)(x, jnp.full((b,), 0.5),
                                       jnp.full((b,), 0.2), y)
    return jnp.abs(out).max(), {
        d: jax.value_and_grad(objective, has_aux=True)(p, d)
        for d in ("dde", "jvp")}

  out_max, results = jax.jit(body, compiler_options=FAST)(params)
  assert float(out_max) > 1e-2  # Perturbed away from the zero-init output.
  for derivative, ((value, metrics), grads) in results.items():
    assert np.isfinite(float(value)), derivative
    assert float(metrics["nonfinite_rows"]) == 0.0
    assert float(metrics["proj_loss"]) > 0.0
    np.testing.assert_allclose(
        float(value), float(metrics["loss_main"] + metrics["proj_loss"]),
        rtol=1e-6)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), derivative
    # The projector gets a gradient from the REPA loss, the final layer from
    # the main loss.
    for part in ("projector", "final_layer"):
      assert any(float(jnp.abs(g).max()) > 0
                 for g in jax.tree.leaves(grads[part])), (derivative, part)
  # The same draw: DDE and JVP give nearly the same targets.
  (_, m_dde), _ = results["dde"]
  (_, m_jvp), _ = results["jvp"]
  np.testing.assert_allclose(float(m_dde["mse_loss"]),
                             float(m_jvp["mse_loss"]), rtol=1e-3)
  assert float(m_dde["mse_loss"]) != float(m_jvp["mse_loss"])
