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


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _f64():
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


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


def _first_call_recorder():
  rec = {}

  def record(x_t, t_in, r_in, cond):
    if not rec and not _is_tracer(x_t) and not _is_tracer(t_in):
      rec.update(x_t=np.asarray(x_t, np.float64),
                 t=np.asarray(t_in, np.float64),
                 r=np.asarray(r_in, np.float64),
                 cond=None if cond is None else np.asarray(cond))
  return rec, record


def _hand_rows(f, tgt):
  """Per-row MSE + directional (cosine over channels, eps 1e-8), NHWC."""
  b = f.shape[0]
  mse = ((f - tgt) ** 2).reshape(b, -1).mean(1)
  dot = (f * tgt).sum(-1)
  norms = np.linalg.norm(f, axis=-1) * np.linalg.norm(tgt, axis=-1)
  cos = dot / np.maximum(norms, 1e-8)
  return mse, (1.0 - cos).reshape(b, -1).mean(1)


P0, S0 = 0.8, 0.5


def _student(p, record=None):
  # F = p x_t + s t^2 + 0.1 cond: linear in x_t and quadratic in t, so the
  # central difference is exact and dF/dt = p v + 2 s t (OT-FM).
  def fn(x_t, t_in, r_in, cond):
    if record is not None:
      record(x_t, t_in, r_in, cond)
    tb = t_in[:, None, None, None]
    return p * x_t + S0 * tb ** 2 + 0.1 * cond[:, None, None, None], None
  return fn


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
@pytest.mark.parametrize("groups", [1, 2])
def test_loss_value_and_gradient_by_hand(groups, derivative, x64):
  b = 8
  cfg = transition.LossConfig(groups=groups, derivative=derivative)
  n_d, _ = cfg.counts(b)
  x = _normal(20, (b,) + SHAPE)
  cond = np.linspace(-1, 1, b)
  rng = jax.random.key(4)
  rec, record = _first_call_recorder()
  xj, cj = jnp.asarray(x), jnp.asarray(cond)
  value, metrics = transition.loss(_student(P0, record), xj, cj, rng,
                                   transport=OT, config=cfg)
  assert value.dtype == jnp.float64
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  np.testing.assert_array_equal(rec["cond"], cond)
  z = (x_t - (1 - _col(t)) * x) / _col(t)
  v = z - x
  pos = np.arange(b) % (b // groups)
  np.testing.assert_array_equal(r[pos < n_d], t[pos < n_d])
  assert np.all(r[pos >= n_d] < t[pos >= n_d])

  tgt = v - _col(t - r) * (P0 * v + 2 * S0 * _col(t))

  def rows(p):
    f = p * x_t + S0 * _col(t) ** 2 + 0.1 * _col(cond)
    mse, dirl = _hand_rows(f, tgt)
    return mse, dirl, mse + dirl

  mse, dirl, big_l = rows(P0)
  w = np.where(pos < n_d, 1.0, (1 + np.tan(t) - np.tan(r)) ** -0.5)
  expected = np.mean(w * big_l / (big_l + 1e-5))
  np.testing.assert_allclose(float(value), expected, rtol=1e-9)
  np.testing.assert_allclose(float(metrics["loss_main"]), expected,
                             rtol=1e-9)
  # (i) loss_main ~ mean(w_time).
  np.testing.assert_allclose(float(value), w.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["weight_time_mean"]), w.mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(float(metrics["weight_adaptive_mean"]),
                             np.mean(1 / (big_l + 1e-5)), rtol=1e-9)
  np.testing.assert_allclose(float(metrics["mse_loss"]), mse.mean(),
                             rtol=1e-9)
  np.testing.assert_allclose(float(metrics["directional_loss"]), dirl.mean(),
                             rtol=1e-9)
  np.testing.assert_allclose(float(metrics["denoising_loss"]), big_l.mean(),
                             rtol=1e-9)
  assert float(metrics["proj_loss"]) == 0.0
  assert float(metrics["nonfinite_rows"]) == 0.0

  # (ii) d loss / dp = mean_b(w_b dL_b/dp / (L_b + 1e-5)), the target and
  # the adaptive weight held fixed.
  h = 1e-5
  d_l = (rows(P0 + h)[2] - rows(P0 - h)[2]) / (2 * h)
  expected_grad = np.mean(w * d_l / (big_l + 1e-5))
  grad = jax.grad(lambda p: transition.loss(_student(p), xj, cj, rng,
                                            transport=OT, config=cfg)[0])(P0)
  np.testing.assert_allclose(float(grad), expected_grad, rtol=1e-6)
  assert abs(expected_grad) > 1e-5


def _all_diffusion(**kw):
  return transition.LossConfig(diffusion_ratio=1.0, consistency_ratio=0.0,
                               **kw)


def _velocity_student(x, transform, proj=None, record=None):
  """F = transform(v), v = (x_t - x) / t the exact OT-FM velocity."""
  def fn(x_t, t_in, r_in, cond):
    if record is not None:
      record(x_t, t_in, r_in, cond)
    v = (x_t - x) / t_in[:, None, None, None]
    return transform(v, cond), proj
  return fn


def _rotate_channels(v):
  # (a, b, c, d) -> (-b, a, -d, c): orthogonal to v at every pixel.
  return jnp.stack([-v[..., 1], v[..., 0], -v[..., 3], v[..., 2]], axis=-1)


def test_directional_loss_is_cosine_over_channels():
  b, shape = 4, (3, 5, 4)
  x = jnp.asarray(_normal(30, (b,) + shape), jnp.float32)
  cond = jnp.zeros((b,))
  rng = jax.random.key(6)
  cfg = _all_diffusion()
  rec, record = _first_call_recorder()
  run = lambda tr: transition.loss(_velocity_student(x, tr, record=record), x,
                                   cond, rng, transport=OT, config=cfg)[1]

  # F = 2 v: cos = 1 everywhere, directional 0 but mse = mean(v^2) > 0.
  m = run(lambda v, c: 2.0 * v)
  x_t, t = rec["x_t"], rec["t"]
  v = (x_t - np.asarray(x, np.float64)) / _col(t)
  np.testing.assert_allclose(float(m["directional_loss"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(m["mse_loss"]), np.mean(v ** 2),
                             rtol=1e-4)
  assert float(m["mse_loss"]) > 0.5
  np.testing.assert_allclose(float(m["loss_main"]), 1.0, rtol=1e-4)

  # Orthogonal at every pixel: directional 1, mse = 2 mean(v^2).
  m = run(lambda v, c: _rotate_channels(v))
  np.testing.assert_allclose(float(m["directional_loss"]), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(m["mse_loss"]), 2 * np.mean(v ** 2),
                             rtol=1e-4)

  # A positive scale per pixel keeps the channel cosine at 1 (a cosine over
  # the flattened tensor or a spatial axis would not be 1).
  pix = jnp.asarray(np.random.RandomState(1).uniform(0.1, 3.0, shape[:2]),
                    jnp.float32)[None, :, :, None]
  m = run(lambda v, c: v * pix)
  np.testing.assert_allclose(float(m["directional_loss"]), 0.0, atol=1e-6)

  # A positive scale per channel: the channel cosine, by hand.
  chan = np.array([0.2, 1.0, 3.0, 0.5])
  m = run(lambda v, c: v * jnp.asarray(chan, jnp.float32))
  cos = (v * v * chan).sum(-1) / (np.linalg.norm(v * chan, axis=-1)
                                  * np.linalg.norm(v, axis=-1))
  np.testing.assert_allclose(float(m["directional_loss"]),
                             np.mean(1 - cos), rtol=1e-4)

  # Switched off: mse only.
  m = transition.loss(_velocity_student(x, lambda v, c: _rotate_channels(v)),
                      x, cond, rng, transport=OT,
                      config=_all_diffusion(directional_loss=False))[1]
  assert float(m["directional_loss"]) == 0.0
  np.testing.assert_allclose(float(m["denoising_loss"]), 2 * np.mean(v ** 2),
                             rtol=1e-4)


def test_nonfinite_row_in_diffusion_batch():
  b = 6
  x = jnp.asarray(_normal(31, (b,) + SHAPE), jnp.float32)
  cond = jnp.arange(b, dtype=jnp.float32)
  poison = lambda v, c: jnp.where(c[:, None, None, None] == 2, jnp.nan,
                                  1.5 * v)
  loss_v, m = transition.loss(_velocity_student(x, poison), x, cond,
                              jax.random.key(7), transport=OT,
                              config=_all_diffusion())
  assert np.isfinite(float(loss_v))
  assert float(m["nonfinite_rows"]) == 1.0
  # The NaN row contributes 0; the others w_ad * L ~ 1.
  np.testing.assert_allclose(float(loss_v), (b - 1) / b, rtol=1e-4)
  assert all(np.isfinite(float(a)) for a in m.values())


def test_nonfinite_row_with_derivative_rows(x64):
  b = 8
  cfg = transition.LossConfig()
  x = _normal(32, (b,) + SHAPE)
  cond = np.arange(b, dtype=np.float64)
  rec, record = _first_call_recorder()

  def fn(x_t, t_in, r_in, c):
    f, _ = _student(P0, record)(x_t, t_in, r_in, c)
    return jnp.where(c[:, None, None, None] == b - 1, jnp.nan, f), None

  loss_v, m = transition.loss(fn, jnp.asarray(x), jnp.asarray(cond),
                              jax.random.key(8), transport=OT, config=cfg)
  assert np.isfinite(float(loss_v))
  assert float(m["nonfinite_rows"]) == 1.0
  t, r = rec["t"], rec["r"]
  w = (1 + np.tan(t) - np.tan(r)) ** -0.5
  w[:4] = 1.0
  np.testing.assert_allclose(float(loss_v), w[:-1].sum() / b, rtol=1e-4)


def test_projection_loss():
  b, n, d = 4, 6, 5
  x = jnp.asarray(_normal(33, (b,) + SHAPE), jnp.float32)
  cond = jnp.zeros((b,))
  proj_np = _normal(34, (b, n, d))
  proj = jnp.asarray(proj_np, jnp.float32)
  cfg = _all_diffusion(proj_coeff=0.5)

  def run(repa, p=proj):
    fn = _velocity_student(x, lambda v, c: 2.0 * v, proj=p)
    return transition.loss(fn, x, cond, jax.random.key(9), transport=OT,
                           config=cfg, repa_target=repa)

  total, m = run(proj)
  np.testing.assert_allclose(float(m["proj_loss"]), 0.0, atol=1e-6)
  total, m = run(-proj)
  np.testing.assert_allclose(float(m["proj_loss"]), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(total),
                             float(m["loss_main"]) + 0.5 * 2.0, rtol=1e-6)
  assert float(m["loss"]) == float(total)
  # Per-token positive scale: still 0 (the cosine is over features).
  scale = np.random.RandomState(2).uniform(0.1, 4.0, (b, n, 1))
  _, m = run(jnp.asarray(proj_np * scale, jnp.float32))
  np.testing.assert_allclose(float(m["proj_loss"]), 0.0, atol=1e-6)
  # Per-feature scale: by hand.
  feat = np.array([0.1, 2.0, 1.0, 5.0, 0.3])
  repa = proj_np * feat
  cos = (proj_np * repa).sum(-1) / (np.linalg.norm(proj_np, axis=-1)
                                    * np.linalg.norm(repa, axis=-1))
  _, m = run(jnp.asarray(repa, jnp.float32))
  np.testing.assert_allclose(float(m["proj_loss"]), np.mean(1 - cos),
                             rtol=1e-5)
  # A NaN projection row counts 0 (per-sample nan_to_num).
  bad = proj.at[1].set(jnp.nan)
  _, m = run(jnp.asarray(repa, jnp.float32), p=bad)
  per_row = (1 - cos).mean(1)
  np.testing.assert_allclose(float(m["proj_loss"]),
                             (per_row.sum() - per_row[1]) / b, rtol=1e-5)
  # No REPA target: no projection loss.
  total, m = run(None)
  assert float(m["proj_loss"]) == 0.0 and float(total) == float(
      m["loss_main"])


@pytest.mark.parametrize("b, groups, shares", [
    (64, 1, (32 / 64, 6 / 64, 26 / 64)),
    (64, 2, (16 / 32, 3 / 32, 13 / 32)),
])
def test_share_metrics(b, groups, shares):
  x = jnp.zeros((b, 2, 2, 3))
  cond = jnp.zeros((b,))
  _, m = transition.loss(_student(P0), x, cond, jax.random.key(0),
                         transport=OT,
                         config=transition.LossConfig(groups=groups))
  got = tuple(float(m[k]) for k in ("share_diffusion", "share_consistency",
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
  # F_teacher = 0.5 * label + 0.3 sin(x_t): F_cond - F_uncond = 0.5 label.
  def fn(x_t, t_in, r_in, c):
    calls.append(dict(cond=np.asarray(c), same_r=bool(np.all(
        np.asarray(t_in) == np.asarray(r_in)))))
    return 0.5 * c[:, None, None, None] + 0.3 * jnp.sin(x_t), None
  return fn


def _enhance_case(b=16):
  x = jnp.asarray(_normal(43, (b,) + SHAPE))
  labels = np.arange(1, b + 1, dtype=np.float64)
  dropped = labels.copy()
  dropped[::3] = 0.0  # The student's (CFG-dropped) conditioning.
  return x, labels, dropped


def test_enhanced_target_in_loss(x64):
  b = 16
  x, labels, dropped = _enhance_case(b)
  cfg = _all_diffusion(enhance_target=True, w_gt=1.0, w_cond=0.75,
                       w_start=W_START, w_end=W_END, directional_loss=False)
  rng = jax.random.key(11)
  lab = jnp.asarray(labels)

  def in_window(t_in):
    return ((t_in >= W_START) & (t_in <= W_END))[:, None, None, None]

  rec, record = _first_call_recorder()
  calls = []
  common = dict(transport=OT, config=cfg, teacher_fn=_teacher(calls),
                teacher_cond=lab, null_cond=jnp.zeros((b,)))
  _, m_plain = transition.loss(
      _velocity_student(x, lambda v, c: v, record=record), x,
      jnp.asarray(dropped), rng, **common)
  t = rec["t"]
  inside = (t >= W_START) & (t <= W_END)
  assert inside.any() and (~inside).any()
  # Teacher: two passes, with r = t, on the undropped and the null labels.
  assert len(calls) == 2 and all(c["same_r"] for c in calls)
  seen = sorted(tuple(c["cond"]) for c in calls)
  assert seen == sorted([tuple(labels), tuple(np.zeros(b))])
  # The plain-velocity student misses by 0.375 * label inside the window.
  np.testing.assert_allclose(float(m_plain["mse_loss"]),
                             np.mean(inside * (0.375 * labels) ** 2),
                             rtol=1e-9)

  # A student equal to the expected target, v + 0.75 (F_cond - F_uncond)
  # inside the window and v outside, has zero error.
  exact = lambda v, c: v + jnp.where(in_window(jnp.asarray(t)),
                                     0.375 * lab[:, None, None, None], 0.0)
  _, m = transition.loss(_velocity_student(x, exact), x, jnp.asarray(dropped),
                         rng, **common)
  assert float(m["mse_loss"]) < 1e-20

  # w_cond = 0: one teacher pass (null), target w_gt v + (1 - w_gt) F_unc.
  calls.clear()
  cfg_gt = _all_diffusion(enhance_target=True, w_gt=0.5, w_cond=0.0,
                          w_start=W_START, w_end=W_END,
                          directional_loss=False)
  half = lambda v, c: jnp.where(
      in_window(jnp.asarray(t)),
      0.5 * v + 0.5 * 0.3 * jnp.sin(jnp.asarray(rec["x_t"])), v)
  _, m = transition.loss(_velocity_student(x, half), x, jnp.asarray(dropped),
                         rng, **dict(common, config=cfg_gt))
  assert len(calls) == 1
  np.testing.assert_array_equal(calls[0]["cond"], np.zeros(b))
  assert float(m["mse_loss"]) < 1e-20


def test_enhanced_target_with_derivative_rows(x64):
  # With derivative rows, the mixture replaces v and (t - r) dF/dt is still
  # subtracted.
  b = 8
  x_np = _normal(44, (b,) + SHAPE)
  x = jnp.asarray(x_np)
  labels = np.arange(1, b + 1, dtype=np.float64)
  cfg = transition.LossConfig(enhance_target=True, w_gt=1.0, w_cond=0.75,
                              w_start=0.0, w_end=1.0)
  rec, record = _first_call_recorder()
  _, m = transition.loss(_student(P0, record), x, jnp.asarray(labels),
                         jax.random.key(12), transport=OT, config=cfg,
                         teacher_fn=_teacher([]),
                         null_cond=jnp.zeros((b,)))
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  v = (x_t - (1 - _col(t)) * x_np) / _col(t) - x_np
  tgt = (v + 0.375 * _col(labels)
         - _col(t - r) * (P0 * v + 2 * S0 * _col(t)))
  f = P0 * x_t + S0 * _col(t) ** 2 + 0.1 * _col(labels)
  mse, dirl = _hand_rows(f, tgt)
  np.testing.assert_allclose(float(m["mse_loss"]), mse.mean(), rtol=1e-9)
  np.testing.assert_allclose(float(m["directional_loss"]), dirl.mean(),
                             rtol=1e-9)


def test_enhanced_target_needs_teacher():
  b = 4
  x = jnp.zeros((b,) + SHAPE)
  cond = jnp.zeros((b,))
  cfg = transition.LossConfig(enhance_target=True, w_cond=0.75)
  teacher = _teacher([])
  with pytest.raises(ValueError, match="teacher_fn"):
    transition.loss(_student(P0), x, cond, jax.random.key(0), transport=OT,
                    config=cfg, null_cond=cond)
  with pytest.raises(ValueError, match="null_cond"):
    transition.loss(_student(P0), x, cond, jax.random.key(0), transport=OT,
                    config=cfg, teacher_fn=teacher)


# --- 11. jit and gradients ----------------------------------------------------


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_loss_jit_matches_eager(derivative):
  b = 8
  x = jnp.asarray(_normal(50, (b,) + SHAPE), jnp.float32)
  cond = jnp.linspace(-1.0, 1.0, b)
  cfg = transition.LossConfig(derivative=derivative)
  proj = jnp.asarray(_normal(51, (b, 3, 5)), jnp.float32)
  repa = jnp.asarray(_normal(52, (b, 3, 5)), jnp.float32)

  def fn(x_t, t_in, r_in, c):
    f, _ = _student(P0)(x_t, t_in, r_in, c)
    return jnp.tanh(f) * (1 + r_in[:, None, None, None]), proj
  loss_fn = functools.partial(transition.loss, fn, transport=OT, config=cfg,
                              repa_target=repa)
  rng = jax.random.key(13)
  eager = loss_fn(x, cond, rng)
  jitted = jax.jit(loss_fn)(x, cond, rng)
  for k in eager[1]:
    np.testing.assert_allclose(float(jitted[1][k]), float(eager[1][k]),
                               rtol=2e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=2e-5)
  # A different key gives a different draw.
  other = jax.jit(loss_fn)(x, cond, jax.random.key(14))
  assert float(other[1]["mse_loss"]) != float(eager[1]["mse_loss"])


@pytest.fixture(scope="module")
def tiny_model():
  return _perturbed_state(jnp.float32)


def test_real_model_loss_jit_and_grad(tiny_model):
  graphdef, params, rest = tiny_model
  b = 8
  x = jnp.asarray(_normal(60, (b, 8, 8, 4)), jnp.float32)
  y = jnp.arange(b) % 10
  repa = jnp.asarray(_normal(61, (b, 16, 16)), jnp.float32)
  rng = jax.random.key(15)

  out = nnx.merge(graphdef, params, rest)(
      x, jnp.full((b,), 0.5), jnp.full((b,), 0.2), y)
  assert float(jnp.abs(out).max()) > 1e-2  # Perturbed away from zero-init.

  results = {}
  for derivative in ("dde", "jvp"):
    cfg = transition.LossConfig(derivative=derivative)
    loss_fn = functools.partial(transition.loss, transport=OT, config=cfg,
                                repa_target=repa)

    def objective(p):
      fn = lambda a, tt, rr, c: nnx.merge(graphdef, p, rest)(
          a, tt, rr, c, return_projection=True)
      return loss_fn(fn, x, y, rng)

    (value, metrics), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True),
        compiler_options=FAST)(params)
    assert np.isfinite(float(value))
    assert float(metrics["nonfinite_rows"]) == 0.0
    assert float(metrics["proj_loss"]) > 0.0
    np.testing.assert_allclose(
        float(value), float(metrics["loss_main"] + metrics["proj_loss"]),
        rtol=1e-6)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(g * g)) for g in leaves) > 0
    # The projector gets a gradient from the REPA loss, the final layer from
    # the main loss.
    assert any(float(jnp.abs(g).max()) > 0
               for g in jax.tree.leaves(grads["projector"]))
    assert any(float(jnp.abs(g).max()) > 0
               for g in jax.tree.leaves(grads["final_layer"]))
    results[derivative] = metrics

  # The two derivative estimates give nearly the same targets.
  np.testing.assert_allclose(float(results["dde"]["mse_loss"]),
                             float(results["jvp"]["mse_loss"]), rtol=1e-3)
  np.testing.assert_allclose(float(results["dde"]["loss"]),
                             float(results["jvp"]["loss"]), rtol=1e-4)
