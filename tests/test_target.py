"""The TiM regression target and the network's time derivative.

``transition.time_derivative`` (DDE and JVP) and ``transition.target``: the
JVP equals the analytic total derivative along the noising path, the DDE
converges to it like eps^2, the derivative is one batched forward over only
the rows that need it (per partition block), rows with r == t get the plain
diffusion target, the target is fully stop-gradient, a diffusion-target
override replaces alpha_hat x + sigma_hat eps, and a bfloat16 network still
gives a float32 derivative.

The networks are small analytic functions ``F(x_t, t_in, r_in[, cond])``
whose derivatives are known in closed form; the expected values are computed
by hand in NumPy float64 from the closed-form paths, never through the helpers
of the module under test. One test uses the real (tiny, perturbed) TiM model.
"""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transition_utils import EDM, FAST, OT, SHAPE, col, normal, perturbed_state

from tim_jax.method import transition, transports


def _is_tracer(a):
  return isinstance(a, jax.core.Tracer)


# --- hand-written path quantities (the OT-FM and EDM paths) ------------------


def _ot_path(x, z, t):
  t = col(t)
  return (1 - t) * x + t * z, z - x  # x_t, v_t


def _edm_path(x, z, t, sd=0.5):
  t = col(t)
  s = np.sqrt(t * t + sd * sd)
  return x / s + t * z / s, -t / s**3 * x + sd**2 / s**3 * z


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
  return A_ * x_t * tb + B_ * tb**2 * rb + C_ * jnp.sin(x_t) * rb + cb * x_t


def _poly_partials(x_t, t_in, r_in, cond):
  tb, rb, cb = (col(a) for a in (t_in, r_in, cond))
  d_dx = A_ * tb + C_ * np.cos(x_t) * rb + cb
  d_dt = A_ * x_t + 2 * B_ * tb * rb
  return d_dx, d_dt


@pytest.mark.parametrize("name", ["ot_fm", "edm"])
def test_jvp_is_analytic_total_derivative(name, x64):
  transport, path, c_noise, dc_noise = PATHS[name]
  b = 6
  x, z = normal(0, (b,) + SHAPE), normal(1, (b,) + SHAPE)
  t, r = _times(name, b)
  cond = np.linspace(-1.0, 1.0, b)
  x_t, v_t = path(x, z, t)
  d_dx, d_dt = _poly_partials(x_t, c_noise(t), c_noise(r), cond)
  expected = d_dx * v_t + d_dt * col(dc_noise(t))

  got = transition.time_derivative(
    _poly_net,
    jnp.asarray(x),
    jnp.asarray(z),
    jnp.asarray(t),
    jnp.asarray(r),
    transport=transport,
    derivative="jvp",
    cond=jnp.asarray(cond),
  )
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-10)
  # Not vacuous: the c_noise' factor and the r-terms matter here.
  assert np.abs(d_dt * col(dc_noise(t))).max() > 0.1


# --- 2. DDE converges to the derivative like eps^2 ---------------------------


EPSILONS = (1e-1, 3e-2, 1e-2, 3e-3)


def _slopes(errors):
  return [
    math.log(errors[i] / errors[i + 1])
    / math.log(EPSILONS[i] / EPSILONS[i + 1])
    for i in range(len(errors) - 1)
  ]


def _smooth_net(x_t, t_in, r_in):
  tb, rb = t_in[:, None, None, None], r_in[:, None, None, None]
  return jnp.sin(x_t * tb) + jnp.exp(0.5 * tb) * rb * x_t**2 + jnp.cos(3.0 * tb)


def _smooth_partials(x_t, t_in, r_in):
  tb, rb = col(t_in), col(r_in)
  d_dx = tb * np.cos(x_t * tb) + 2 * np.exp(0.5 * tb) * rb * x_t
  d_dt = (
    x_t * np.cos(x_t * tb)
    + 0.5 * np.exp(0.5 * tb) * rb * x_t**2
    - 3.0 * np.sin(3.0 * tb)
  )
  return d_dx, d_dt


@pytest.mark.parametrize("name", ["ot_fm", "edm"])
def test_dde_converges_quadratically_analytic(name, x64):
  transport, path, c_noise, dc_noise = PATHS[name]
  b = 5
  x, z = normal(2, (b,) + SHAPE), normal(3, (b,) + SHAPE)
  t, r = _times(name, b, seed=1)
  x_t, v_t = path(x, z, t)
  d_dx, d_dt = _smooth_partials(x_t, c_noise(t), c_noise(r))
  truth = d_dx * v_t + d_dt * col(dc_noise(t))
  errors = []
  for eps in EPSILONS:
    got = transition.time_derivative(
      _smooth_net,
      jnp.asarray(x),
      jnp.asarray(z),
      jnp.asarray(t),
      jnp.asarray(r),
      transport=transport,
      derivative="dde",
      epsilon=eps,
    )
    errors.append(float(np.abs(np.asarray(got) - truth).max()))
  slopes = _slopes(errors)
  assert all(1.7 < s < 2.3 for s in slopes), (errors, slopes)
  assert errors[-1] < 1e-3 * np.abs(truth).max()


def test_dde_converges_quadratically_real_model(x64):
  graphdef, params, rest = perturbed_state(jnp.float64)
  b = 4
  x = jnp.asarray(normal(4, (b, 8, 8, 4)))
  z = jnp.asarray(normal(5, (b, 8, 8, 4)))
  t = jnp.asarray([0.3, 0.5, 0.7, 0.9])
  r = jnp.asarray([0.1, 0.2, 0.0, 0.5])
  y = jnp.asarray([1, 2, 3, 4])

  def net(a, tt, rr, cond):
    return nnx.merge(graphdef, params, rest)(a, tt, rr, cond)

  @functools.partial(
    jax.jit, static_argnames="derivative", compiler_options=FAST
  )
  def deriv(eps, derivative):
    return transition.time_derivative(
      net, x, z, t, r, transport=OT, derivative=derivative, epsilon=eps, cond=y
    )

  out = jax.jit(net, compiler_options=FAST)(
    transports.OTFM().x_t(x, z, t[:, None, None, None]), t, r, y
  )
  assert out.dtype == jnp.float64 and float(jnp.abs(out).max()) > 0.1
  truth = np.asarray(deriv(0.1, "jvp"))
  scale = np.abs(truth).max()
  assert scale > 0.1
  errors = [
    float(np.abs(np.asarray(deriv(eps, "dde")) - truth).max())
    for eps in EPSILONS
  ]
  slopes = _slopes(errors)
  assert all(1.7 < s < 2.3 for s in slopes), (errors, slopes)
  assert errors[-1] < 1e-3 * scale


# --- 3. One batched forward over only the derivative rows --------------------


def _recording_net(calls):
  def fn(x_t, t_in, r_in, cond):
    calls.append(
      dict(
        x=x_t.shape,
        t=t_in.shape,
        r=r_in.shape,
        cond=None if _is_tracer(cond) else np.asarray(cond),
      )
    )
    return x_t * t_in[:, None, None, None] + cond[:, None, None, None]

  return fn


def _setup_rows(b, diffusion_rows, seed=0):
  x, z = normal(seed, (b,) + SHAPE), normal(seed + 1, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed)
  r[diffusion_rows] = t[diffusion_rows]
  return x, z, t, r


def _expected_recording_target(x, z, t, r):
  # F = x_t t + c, dF/dt = v t + x_t (exact for a central difference: F is
  # quadratic in t); target = v - (t - r) dF/dt.
  x_t, v = _ot_path(x, z, t)
  return v - col(t - r) * (v * col(t) + x_t)


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_derivative_runs_only_on_derivative_rows(derivative):
  b = 8
  x, z, t, r = _setup_rows(b, [0, 1, 2, 3])
  cond = np.arange(b) * 0.25
  calls = []
  out = transition.target(
    _recording_net(calls),
    jnp.asarray(x, jnp.float32),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(t, jnp.float32),
    jnp.asarray(r, jnp.float32),
    OT,
    derivative,
    cond=jnp.asarray(cond, jnp.float32),
    num_diffusion=4,
  )
  # DDE: one call at t + eps and one at t - eps (each keeps its rows where
  # the batch's are on a mesh; XLA shares their t-independent work); JVP:
  # one forward-mode call.
  assert len(calls) == (2 if derivative == "dde" else 1), calls
  for call in calls:
    assert call["x"] == (4,) + SHAPE
    assert call["t"] == (4,) and call["r"] == (4,)
    # The network never sees the diffusion rows (conditioning is sliced too).
    np.testing.assert_array_equal(call["cond"], [1.0, 1.25, 1.5, 1.75])
  np.testing.assert_allclose(
    np.asarray(out),
    _expected_recording_target(x, z, t, r),
    atol=3e-4,
    rtol=1e-4,
  )

  # Same under jit (trace-time count).
  calls.clear()
  jitted = jax.jit(
    lambda *a: transition.target(
      _recording_net(calls), *a[:4], OT, derivative, cond=a[4], num_diffusion=4
    )
  )
  out_jit = jitted(*(jnp.asarray(a, jnp.float32) for a in (x, z, t, r, cond)))
  assert len(calls) == (2 if derivative == "dde" else 1)
  assert all(c["x"] == (4,) + SHAPE for c in calls)
  # (Fusion may reorder float32 roundoff, amplified by 1 / (2 eps).)
  np.testing.assert_allclose(np.asarray(out_jit), np.asarray(out), atol=3e-4)


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_groups_select_rows_of_each_block(derivative):
  b = 8
  x, z, t, r = _setup_rows(b, [0, 1, 4, 5], seed=3)
  cond = np.arange(b) * 0.25
  calls = []
  out = transition.target(
    _recording_net(calls),
    jnp.asarray(x, jnp.float32),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(t, jnp.float32),
    jnp.asarray(r, jnp.float32),
    OT,
    derivative,
    cond=jnp.asarray(cond, jnp.float32),
    num_diffusion=2,
    groups=2,
  )
  assert len(calls) == (2 if derivative == "dde" else 1)
  for call in calls:
    assert call["x"] == (4,) + SHAPE
    np.testing.assert_array_equal(call["cond"], [0.5, 0.75, 1.5, 1.75])
  expected = _expected_recording_target(x, z, t, r)
  np.testing.assert_allclose(np.asarray(out), expected, atol=3e-4, rtol=1e-4)
  # Diffusion rows are the plain diffusion target z - x.
  np.testing.assert_allclose(
    np.asarray(out)[[0, 1, 4, 5]], (z - x)[[0, 1, 4, 5]], atol=1e-6
  )


def test_target_rejects_bad_partition():
  x = jnp.zeros((6,) + SHAPE)
  t = jnp.full((6,), 0.5)
  with pytest.raises(ValueError, match="groups=4"):
    transition.target(lambda a, b, c: a, x, x, t, t, OT, groups=4)
  with pytest.raises(ValueError, match="num_diffusion=4"):
    transition.target(
      lambda a, b, c: a, x, x, t, t, OT, num_diffusion=4, groups=2
    )
  with pytest.raises(ValueError, match="'fd'"):
    transition.time_derivative(
      lambda a, b, c: a, x, x, t, t, transport=OT, derivative="fd"
    )


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
  x, z = normal(8, (b,) + SHAPE), normal(9, (b,) + SHAPE)
  t, r = _times(name, b, seed=2)
  r[[0, 3]] = t[[0, 3]]  # Row 0 is counted in num_diffusion, row 3 is not.
  args = [jnp.asarray(a, jnp.float32) for a in (x, z, t, r)]
  out = np.asarray(
    transition.target(
      _sqrt_interval_net, *args, transport, derivative, num_diffusion=1
    )
  )
  if name == "ot_fm":
    plain = z - x
  else:
    sd, tb = 0.5, col(t)
    s = np.sqrt(tb * tb + sd * sd)
    plain = tb / (sd * s) * x - sd / s * z
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[[0, 3]], plain[[0, 3]], rtol=1e-5, atol=1e-5)
  # The other rows do carry a derivative term.
  assert np.abs(out[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).min() > 0


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_target_is_stop_gradient(derivative):
  b = 6
  x, z, t, r = _setup_rows(b, [0, 1], seed=5)
  x, z, t, r = (jnp.asarray(a, jnp.float32) for a in (x, z, t, r))

  def total(p):
    def fn(x_t, t_in, r_in):
      return p * x_t * t_in[:, None, None, None] ** 2 + p**2 * x_t

    return jnp.sum(
      transition.target(fn, x, z, t, r, OT, derivative, num_diffusion=2) ** 2
    )

  # The target does depend on p ...
  assert abs(float(total(1.0)) - float(total(2.0))) > 1.0
  # ... but no gradient flows through it, exactly.
  assert float(jax.grad(total)(1.5)) == 0.0

  # Not through a diffusion_target override either (enhanced target).
  def with_override(p):
    fn = lambda x_t, t_in, r_in: x_t * t_in[:, None, None, None]
    return jnp.sum(
      transition.target(
        fn, x, z, t, r, OT, derivative, num_diffusion=2, diffusion_target=p * x
      )
      ** 2
    )

  assert float(jax.grad(with_override)(1.5)) == 0.0
  assert float(with_override(1.5)) != float(with_override(2.0))


# --- 5. A diffusion-target override (the enhanced target's hook) -------------


def test_target_with_diffusion_target_override(x64):
  b = 6
  x, z = normal(40, (b,) + SHAPE), normal(41, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed=6)
  r[0] = t[0]
  cond = np.linspace(0, 1, b)
  mixed = normal(42, (b,) + SHAPE)
  out = transition.target(
    _poly_net,
    *(jnp.asarray(a) for a in (x, z, t, r)),
    OT,
    "jvp",
    cond=jnp.asarray(cond),
    num_diffusion=1,
    diffusion_target=jnp.asarray(mixed),
  )
  x_t, v = _ot_path(x, z, t)
  d_dx, d_dt = _poly_partials(x_t, t, r, cond)
  expected = mixed - col(t - r) * (d_dx * v + d_dt)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-10)
  np.testing.assert_array_equal(np.asarray(out)[0], mixed[0])


# --- 6. float32 derivative from a bfloat16 network ----------------------------


def _bf16_net(x_t, t_in, r_in):
  del r_in
  xb = x_t.astype(jnp.bfloat16)
  tb = t_in.astype(jnp.bfloat16)[:, None, None, None]
  return 3.0 * xb * tb + tb * tb


def test_bf16_network_derivative_is_float32():
  b, eps = 6, 0.005
  x, z = normal(10, (b,) + SHAPE), normal(11, (b,) + SHAPE)
  t, r = _times("ot_fm", b, seed=4)
  args = [jnp.asarray(a, jnp.float32) for a in (x, z, t, r)]
  assert _bf16_net(args[0], args[2], args[3]).dtype == jnp.bfloat16
  got = transition.time_derivative(
    _bf16_net, *args, transport=OT, derivative="dde", epsilon=eps
  )
  assert got.dtype == jnp.float32
  got = np.asarray(got, np.float64)
  assert np.all(np.isfinite(got))
  # Accurate to the bf16 resolution of F over 2 eps.
  x_t, v = _ot_path(x, z, t)
  truth = 3.0 * (v * col(t) + x_t) + 2.0 * col(t)
  f_max = np.abs(3.0 * x_t * col(t) + col(t) ** 2).max() + 0.1
  assert np.abs(got - truth).max() <= 2.0**-6 * f_max / (2 * eps)
  # The difference and the division by 2 eps are float32 operations on the
  # bf16 outputs (a bf16 division would also use bf16(0.01) = 0.010009765625).
  outs = [
    _bf16_net(
      OT.x_t(args[0], args[1], (args[2] + s)[:, None, None, None]),
      args[2] + s,
      args[3],
    )
    for s in (eps, -eps)
  ]
  ref = (outs[0].astype(jnp.float32) - outs[1].astype(jnp.float32)) / (
    2.0 * eps
  )
  close = np.isclose(got, np.asarray(ref, np.float64), rtol=1e-6, atol=1e-6)
  assert close.mean() > 0.95
  in_bf16 = (outs[0] - outs[1]) / jnp.asarray(2.0 * eps, jnp.bfloat16)
  assert not np.allclose(
    np.asarray(in_bf16, np.float64), np.asarray(ref), rtol=1e-6, atol=1e-6
  )

  jvp = transition.time_derivative(
    _bf16_net, *args, transport=OT, derivative="jvp"
  )
  assert jvp.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jvp), truth, rtol=0.05, atol=0.05)

  tgt = transition.target(_bf16_net, *args, OT, "dde", num_diffusion=2)
  assert tgt.dtype == jnp.float32
