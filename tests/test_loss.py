"""The full TiM training loss, ``transition.loss``, and its weightings.

Value and gradient by hand (MSE plus directional loss, time weighting with the
diffusion rows forced to 1, adaptive weighting 1 / (sg(L) + 1e-5)), the
directional loss as a cosine over channels per pixel, a finite gradient at a
zero prediction, and ``jit`` / gradients with analytic students and with the
real (tiny, perturbed) TiM model.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transition_utils import (
  FAST,
  OT,
  P0,
  S0,
  SHAPE,
  all_diffusion,
  col,
  first_call,
  hand_rows,
  jit_run,
  normal,
  perturbed_state,
  sqrt_weight,
  student,
  torch_cos,
  velocity_student,
)

from tim_jax.method import transition

# --- 1. Value and gradient by hand -------------------------------------------


@pytest.mark.parametrize(
  "groups, derivative, t_and_r", [(1, "dde", True), (2, "jvp", False)]
)
def test_loss_value_and_gradient_by_hand(groups, derivative, t_and_r, x64):
  b = 8
  # With weight_t_and_r (and sigma_d = 1) every weight is 1 at r = t anyway;
  # without it, forcing the diffusion rows to 1 matters.
  cfg = transition.LossConfig(
    groups=groups, derivative=derivative, weight_t_and_r=t_and_r
  )
  n_d, _ = cfg.counts(b)
  x = normal(20, (b,) + SHAPE)
  cond = np.linspace(-1, 1, b)

  def objective(p, xx, cc):
    rec = {}
    value, metrics = transition.loss(
      first_call(student(p), rec),
      xx,
      cc,
      jax.random.key(4),
      transport=OT,
      config=cfg,
    )
    return value, (metrics, rec)

  (value, (metrics, rec)), grad = jit_run(
    jax.value_and_grad(objective, has_aux=True),
    P0,
    jnp.asarray(x),
    jnp.asarray(cond),
  )
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  v = (x_t - (1 - col(t)) * x) / col(t) - x  # z - x, z recovered.
  pos = np.arange(b) % (b // groups)
  np.testing.assert_array_equal(r[pos < n_d], t[pos < n_d])
  assert np.all(r[pos >= n_d] < t[pos >= n_d])

  tgt = v - col(t - r) * (P0 * v + 2 * S0 * col(t))

  def rows(p):
    f = p * x_t + S0 * col(t) ** 2 + 0.1 * col(cond)
    mse, dirl = hand_rows(f, tgt)
    return mse, dirl, mse + dirl

  mse, dirl, big_l = rows(P0)
  w = np.where(pos < n_d, 1.0, sqrt_weight(t, r if t_and_r else 0 * r))
  expected = np.mean(w * big_l / (big_l + 1e-5))
  np.testing.assert_allclose(value, expected, rtol=1e-9)
  np.testing.assert_allclose(metrics["loss_main"], expected, rtol=1e-9)
  # (i) loss_main ~ mean(w_time), since w_ad L = L / (L + 1e-5).
  np.testing.assert_allclose(value, w.mean(), rtol=1e-4)
  assert abs(value - 1.0) > 1e-2  # The time weights do matter here.
  np.testing.assert_allclose(metrics["weight_time_mean"], w.mean(), rtol=1e-12)
  np.testing.assert_allclose(
    metrics["weight_adaptive_mean"], np.mean(1 / (big_l + 1e-5)), rtol=1e-9
  )
  np.testing.assert_allclose(metrics["mse_loss"], mse.mean(), rtol=1e-9)
  np.testing.assert_allclose(
    metrics["directional_loss"], dirl.mean(), rtol=1e-9
  )
  np.testing.assert_allclose(metrics["denoising_loss"], big_l.mean(), rtol=1e-9)
  assert metrics["proj_loss"] == 0.0 and metrics["nonfinite_rows"] == 0.0

  # (ii) d loss / dp = mean_b(w_b dL_b/dp / (L_b + 1e-5)) with the target and
  # the adaptive weight held fixed (finite difference of the hand L_b).
  h = 1e-5
  d_l = (rows(P0 + h)[2] - rows(P0 - h)[2]) / (2 * h)
  expected_grad = np.mean(w * d_l / (big_l + 1e-5))
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
  assert abs(expected_grad) > 1e-5


# --- 2. The directional loss -------------------------------------------------


def _rotate_channels(v):
  # (a, b, c, d) -> (-b, a, -d, c): orthogonal to v at every pixel.
  return jnp.stack([-v[..., 1], v[..., 0], -v[..., 3], v[..., 2]], axis=-1)


CHAN = np.array([0.2, 1.0, 3.0, 0.5])


def test_directional_loss_is_cosine_over_channels():
  b, shape = 4, (3, 5, 4)
  x_np = normal(30, (b,) + shape)
  pix = np.random.RandomState(1).uniform(0.1, 3.0, shape[:2])[None, :, :, None]
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
      fn = first_call(velocity_student(x, tr), rec)
      out[name] = transition.loss(
        fn,
        x,
        jnp.zeros((b,)),
        jax.random.key(6),
        transport=OT,
        config=all_diffusion(),
      )[1]
      out["rec"] = rec
    out["off"] = transition.loss(
      velocity_student(x, students["orthogonal"]),
      x,
      jnp.zeros((b,)),
      jax.random.key(6),
      transport=OT,
      config=all_diffusion(directional_loss=False),
    )[1]
    return out

  out = jit_run(body, jnp.asarray(x_np, jnp.float32))
  v = (out["rec"]["x_t"] - x_np) / col(out["rec"]["t"])
  # F = 2 v: cos = 1 everywhere, so directional 0 but mse = mean(v^2) > 0.
  m = out["double"]
  np.testing.assert_allclose(m["directional_loss"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["mse_loss"], np.mean(v**2), rtol=1e-4)
  assert m["mse_loss"] > 0.5
  np.testing.assert_allclose(m["loss_main"], 1.0, rtol=1e-4)
  # Orthogonal at every pixel: directional 1, mse = 2 mean(v^2).
  m = out["orthogonal"]
  np.testing.assert_allclose(m["directional_loss"], 1.0, atol=1e-5)
  np.testing.assert_allclose(m["mse_loss"], 2 * np.mean(v**2), rtol=1e-4)
  np.testing.assert_allclose(
    m["denoising_loss"], 1 + 2 * np.mean(v**2), rtol=1e-4
  )
  # A positive scale per pixel keeps every channel cosine at 1 (a cosine
  # over the flattened sample or over a spatial axis would not be 1).
  np.testing.assert_allclose(
    out["pixel_scale"]["directional_loss"], 0.0, atol=1e-6
  )
  # A positive scale per channel: the channel cosine, by hand.
  cos = (v * v * CHAN).sum(-1) / (
    np.linalg.norm(v * CHAN, axis=-1) * np.linalg.norm(v, axis=-1)
  )
  np.testing.assert_allclose(
    out["channel_scale"]["directional_loss"], np.mean(1 - cos), rtol=1e-4
  )
  assert np.mean(1 - cos) > 0.05
  tiny = out["tiny"]["directional_loss"]
  np.testing.assert_allclose(
    tiny, np.mean(1 - torch_cos(1e-9 * v, v)), rtol=1e-4
  )
  assert 0.2 < tiny < 0.95
  # Switched off: mse only.
  assert out["off"]["directional_loss"] == 0.0
  np.testing.assert_allclose(
    out["off"]["denoising_loss"], 2 * np.mean(v**2), rtol=1e-4
  )


def test_zero_prediction_has_finite_gradient():
  # A network at initialisation outputs exactly 0 (zero-init output layer):
  # the directional term must not turn the gradient into NaN.
  b = 4
  x = jnp.asarray(normal(36, (b,) + SHAPE), jnp.float32)

  def objective(p):
    fn = velocity_student(x, lambda v, *_: p * v)
    return transition.loss(
      fn,
      x,
      jnp.zeros((b,)),
      jax.random.key(3),
      transport=OT,
      config=all_diffusion(),
    )[0]

  value, grad = jit_run(jax.value_and_grad(objective), 0.0)
  assert np.isfinite(value) and np.isfinite(grad)
  np.testing.assert_allclose(value, 1.0, rtol=1e-4)  # 1 - cos = 1.


# --- 3. jit and gradients ----------------------------------------------------


def test_loss_jit_matches_eager():
  b = 8
  x = jnp.asarray(normal(50, (b,) + SHAPE), jnp.float32)
  cond = jnp.linspace(-1.0, 1.0, b)
  proj = jnp.asarray(normal(51, (b, 3, 5)), jnp.float32)
  repa = jnp.asarray(normal(52, (b, 3, 5)), jnp.float32)

  def fn(x_t, t_in, r_in, c):
    f, _ = student(P0)(x_t, t_in, r_in, c)
    return jnp.tanh(f) * (1 + r_in[:, None, None, None]), proj

  def loss_fn(derivative, key):
    cfg = transition.LossConfig(derivative=derivative)
    return functools.partial(
      transition.loss, fn, transport=OT, config=cfg, repa_target=repa
    )(x, cond, jax.random.key(key))

  jitted = jax.jit(
    lambda: [loss_fn(d, 13) for d in ("dde", "jvp")] + [loss_fn("dde", 14)],
    compiler_options=FAST,
  )()
  for i, derivative in enumerate(("dde", "jvp")):
    eager = loss_fn(derivative, 13)
    for k in eager[1]:
      np.testing.assert_allclose(
        float(jitted[i][1][k]),
        float(eager[1][k]),
        rtol=2e-5,
        atol=1e-6,
        err_msg=k,
      )
    np.testing.assert_allclose(float(jitted[i][0]), float(eager[0]), rtol=2e-5)
  # A different key gives a different draw.
  assert float(jitted[2][1]["mse_loss"]) != float(jitted[0][1]["mse_loss"])


@pytest.fixture(scope="module")
def tiny_model():
  return perturbed_state(jnp.float32)


def test_real_model_loss_jit_and_grad(tiny_model):
  graphdef, params, rest = tiny_model
  b = 8
  x = jnp.asarray(normal(60, (b, 8, 8, 4)), jnp.float32)
  y = jnp.arange(b) % 10
  repa = jnp.asarray(normal(61, (b, 16, 16)), jnp.float32)

  def objective(p, derivative):
    model = lambda a, tt, rr, c: nnx.merge(graphdef, p, rest)(
      a, tt, rr, c, return_projection=True
    )
    loss_fn = functools.partial(
      transition.loss,
      transport=OT,
      config=transition.LossConfig(derivative=derivative),
      repa_target=repa,
    )
    return loss_fn(model, x, y, jax.random.key(15))

  def body(p):
    out = nnx.merge(graphdef, p, rest)(
      x, jnp.full((b,), 0.5), jnp.full((b,), 0.2), y
    )
    return jnp.abs(out).max(), {
      d: jax.value_and_grad(objective, has_aux=True)(p, d)
      for d in ("dde", "jvp")
    }

  out_max, results = jax.jit(body, compiler_options=FAST)(params)
  assert float(out_max) > 1e-2  # Perturbed away from the zero-init output.
  for derivative, ((value, metrics), grads) in results.items():
    assert np.isfinite(float(value)), derivative
    assert float(metrics["nonfinite_rows"]) == 0.0
    assert float(metrics["proj_loss"]) > 0.0
    np.testing.assert_allclose(
      float(value),
      float(metrics["loss_main"] + metrics["proj_loss"]),
      rtol=1e-6,
    )
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), derivative
    # The projector gets a gradient from the REPA loss, the final layer from
    # the main loss.
    for part in ("projector", "final_layer"):
      assert any(
        float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[part])
      ), (derivative, part)
  # The same draw: DDE and JVP give nearly the same targets...
  (_, m_dde), g_dde = results["dde"]
  (_, m_jvp), g_jvp = results["jvp"]
  np.testing.assert_allclose(
    float(m_dde["mse_loss"]), float(m_jvp["mse_loss"]), rtol=1e-3
  )
  # ... but not the same ones: the gradients (more sensitive than the
  # float32 scalar loss, which may round to the same value) differ.
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(g_dde), jax.tree.leaves(g_jvp))
  )
