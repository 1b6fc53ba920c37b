"""The optional parts and safeguards of the TiM loss.

Non-finite rows are zeroed (and counted); the REPA projection loss is a
cosine over the feature axis with per-sample nan_to_num, added with
``proj_coeff``; and the enhanced (model-guidance) target mixes the EMA
teacher's conditional (undropped labels) and unconditional predictions, at
r = t, into the target inside the [w_start, w_end] window of t.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transition_utils import (
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
  sqrt_weight,
  student,
  velocity_student,
)

from tim_jax.method import transition

# --- 1. Non-finite rows ------------------------------------------------------


def test_nonfinite_rows_are_zeroed(x64):
  b = 8
  x_np = normal(31, (b,) + SHAPE)
  cond = jnp.arange(b, dtype=jnp.float64)

  def poisoned(fn, row):
    def wrapped(x_t, t_in, r_in, c):
      f, proj = fn(x_t, t_in, r_in, c)
      return jnp.where(c[:, None, None, None] == row, jnp.nan, f), proj

    return wrapped

  def body(x):
    # All rows diffusion, NaN in row 2.
    diffusion = transition.loss(
      poisoned(velocity_student(x, lambda v, *_: 1.5 * v), 2),
      x,
      cond,
      jax.random.key(7),
      transport=OT,
      config=all_diffusion(),
    )
    # Default partition, NaN in the last (consistency) row, whose target is
    # then NaN too (its derivative goes through the same network).
    rec = {}
    default = transition.loss(
      first_call(poisoned(student(P0), b - 1), rec),
      x,
      cond,
      jax.random.key(8),
      transport=OT,
      config=transition.LossConfig(),
    )
    return diffusion, default, rec

  (v1, m1), (v2, m2), rec = jit_run(body, jnp.asarray(x_np))
  for value, m in ((v1, m1), (v2, m2)):
    assert np.isfinite(value)
    assert all(np.isfinite(a) for a in m.values())
    assert m["nonfinite_rows"] == 1.0
  # The NaN row contributes 0; every other row w_time * w_ad * L ~ w_time.
  np.testing.assert_allclose(v1, (b - 1) / b, rtol=1e-4)
  w = sqrt_weight(rec["t"], rec["r"])
  w[:4] = 1.0
  np.testing.assert_allclose(v2, w[:-1].sum() / b, rtol=1e-4)


# --- 2. REPA projection loss -------------------------------------------------


def test_projection_loss():
  b, n, d = 4, 6, 5
  x = jnp.asarray(normal(33, (b,) + SHAPE), jnp.float32)
  proj_np = normal(34, (b, n, d))
  scale = np.random.RandomState(2).uniform(0.1, 4.0, (b, n, 1))
  feat = np.array([0.1, 2.0, 1.0, 5.0, 0.3])
  cases = {  # name: (projection, REPA target)
    "same": (proj_np, proj_np),
    "negated": (proj_np, -proj_np),
    "token_scale": (proj_np, proj_np * scale),
    "feature_scale": (proj_np, proj_np * feat),
    "nan_row": (
      np.where(np.arange(b)[:, None, None] == 1, np.nan, proj_np),
      proj_np * feat,
    ),
    "none": (proj_np, None),
  }

  def body(x):
    out = {}
    for name, (p, repa) in cases.items():
      fn = velocity_student(
        x, lambda v, *_: 2.0 * v, proj=jnp.asarray(p, jnp.float32)
      )
      out[name] = transition.loss(
        fn,
        x,
        jnp.zeros((b,)),
        jax.random.key(9),
        transport=OT,
        config=all_diffusion(proj_coeff=0.5),
        repa_target=None if repa is None else jnp.asarray(repa, jnp.float32),
      )
    return out

  out = jit_run(body, x)
  proj_loss = {k: m["proj_loss"] for k, (_, m) in out.items()}
  np.testing.assert_allclose(proj_loss["same"], 0.0, atol=1e-6)
  np.testing.assert_allclose(proj_loss["negated"], 2.0, rtol=1e-6)
  # The cosine is over the feature (last) axis.
  np.testing.assert_allclose(proj_loss["token_scale"], 0.0, atol=1e-6)
  repa = proj_np * feat
  cos = (proj_np * repa).sum(-1) / (
    np.linalg.norm(proj_np, axis=-1) * np.linalg.norm(repa, axis=-1)
  )
  np.testing.assert_allclose(
    proj_loss["feature_scale"], np.mean(1 - cos), rtol=1e-5
  )
  # A NaN projection row counts 0 (per-sample nan_to_num).
  per_row = (1 - cos).mean(1)
  np.testing.assert_allclose(
    proj_loss["nan_row"], (per_row.sum() - per_row[1]) / b, rtol=1e-5
  )
  assert proj_loss["none"] == 0.0
  # total = loss_main + proj_coeff * proj_loss.
  for name, (total, m) in out.items():
    np.testing.assert_allclose(
      total, m["loss_main"] + 0.5 * m["proj_loss"], rtol=1e-6, err_msg=name
    )
    assert m["loss"] == total
  np.testing.assert_allclose(out["negated"][0], 1.0 + 0.5 * 2.0, rtol=1e-4)


# --- 3. Enhanced target ------------------------------------------------------


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
  x_np = normal(43, (b,) + SHAPE)
  labels = np.arange(1, b + 1, dtype=np.float64)
  dropped = np.where(np.arange(b) % 3 == 0, 0.0, labels)  # CFG-dropped.
  mg = all_diffusion(
    enhance_target=True,
    w_gt=1.0,
    w_cond=0.75,
    w_start=W_START,
    w_end=W_END,
    directional_loss=False,
  )
  gt_only = all_diffusion(
    enhance_target=True,
    w_gt=0.5,
    w_cond=0.0,
    w_start=W_START,
    w_end=W_END,
    directional_loss=False,
  )
  lab = jnp.asarray(labels)
  students = {
    # The plain velocity: misses by 0.75 * 0.5 label inside the window.
    "plain": (mg, lambda v, t_in, x_t, c: v),
    # Equal to the expected target: v + 0.75 (F_cond - F_uncond) inside
    # the window, v outside.
    "exact": (
      mg,
      lambda v, t_in, x_t, c: (
        v + jnp.where(_in_window(t_in), 0.375 * lab[:, None, None, None], 0.0)
      ),
    ),
    # w_cond = 0: w_gt v + (1 - w_gt) F_uncond inside the window.
    "gt_only": (
      gt_only,
      lambda v, t_in, x_t, c: jnp.where(
        _in_window(t_in), 0.5 * v + 0.5 * 0.3 * jnp.sin(x_t), v
      ),
    ),
  }

  def body(x, student_cond):
    out = {}
    for name, (cfg, tr) in students.items():
      rec, calls = {}, []
      m = transition.loss(
        first_call(velocity_student(x, tr), rec),
        x,
        student_cond,
        jax.random.key(11),
        transport=OT,
        config=cfg,
        teacher_fn=_teacher(calls),
        teacher_cond=lab,
        null_cond=jnp.zeros((b,)),
      )[1]
      out[name] = dict(metrics=m, rec=rec, calls=calls)
    return out

  out = jit_run(body, jnp.asarray(x_np), jnp.asarray(dropped))
  t = out["plain"]["rec"]["t"]
  inside = (t >= W_START) & (t <= W_END)
  assert inside.any() and (~inside).any()
  # Teacher: r = t, on the undropped labels and on the null labels.
  calls = out["plain"]["calls"]
  assert len(calls) == 2
  assert all(np.all(c["r_minus_t"] == 0) for c in calls)
  seen = sorted(tuple(c["cond"]) for c in calls)
  assert seen == sorted([tuple(labels), tuple(np.zeros(b))])
  np.testing.assert_allclose(
    out["plain"]["metrics"]["mse_loss"],
    np.mean(inside * (0.375 * labels) ** 2),
    rtol=1e-9,
  )
  assert out["exact"]["metrics"]["mse_loss"] < 1e-20
  calls = out["gt_only"]["calls"]
  assert len(calls) == 1
  np.testing.assert_array_equal(calls[0]["cond"], np.zeros(b))
  assert out["gt_only"]["metrics"]["mse_loss"] < 1e-20


def test_enhanced_target_with_derivative_rows(x64):
  # The mixture replaces v and (t - r) dF/dt is still subtracted; without
  # teacher_cond the teacher's conditional pass uses cond.
  b = 8
  x_np = normal(44, (b,) + SHAPE)
  labels = np.arange(1, b + 1, dtype=np.float64)
  cfg = transition.LossConfig(
    enhance_target=True, w_gt=1.0, w_cond=0.75, w_start=0.0, w_end=1.0
  )

  def body(x, cond):
    rec = {}
    m = transition.loss(
      first_call(student(P0), rec),
      x,
      cond,
      jax.random.key(12),
      transport=OT,
      config=cfg,
      teacher_fn=_teacher([]),
      null_cond=jnp.zeros((b,)),
    )[1]
    return m, rec

  m, rec = jit_run(body, jnp.asarray(x_np), jnp.asarray(labels))
  t, r, x_t = rec["t"], rec["r"], rec["x_t"]
  v = (x_t - (1 - col(t)) * x_np) / col(t) - x_np
  tgt = v + 0.375 * col(labels) - col(t - r) * (P0 * v + 2 * S0 * col(t))
  f = P0 * x_t + S0 * col(t) ** 2 + 0.1 * col(labels)
  mse, dirl = hand_rows(f, tgt)
  np.testing.assert_allclose(m["mse_loss"], mse.mean(), rtol=1e-9)
  np.testing.assert_allclose(m["directional_loss"], dirl.mean(), rtol=1e-9)


def test_enhanced_target_needs_teacher():
  b = 4
  x = jnp.zeros((b,) + SHAPE)
  cond = jnp.zeros((b,))
  cfg = transition.LossConfig(enhance_target=True, w_cond=0.75)
  loss_fn = lambda **kw: jax.eval_shape(
    lambda: transition.loss(
      student(P0), x, cond, jax.random.key(0), transport=OT, config=cfg, **kw
    )
  )
  with pytest.raises(ValueError, match="teacher_fn"):
    loss_fn(null_cond=cond)
  with pytest.raises(ValueError, match="null_cond"):
    loss_fn(teacher_fn=_teacher([]))
  loss_fn(teacher_fn=_teacher([]), null_cond=cond)  # Complete: no error.
