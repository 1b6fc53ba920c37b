"""Hand-written helpers shared by the tests of ``tim_jax.method.transition``.

Transports, a tiny network and its perturbed state, NumPy helpers, and the
analytic "students" (networks whose output and time derivative are known in
closed form) with the hand-computed per-row losses they are checked against.
None of them goes through the helpers of the module under test.
"""

from flax import nnx
import jax
import numpy as np

from tim_jax import models
from tim_jax.method import transition, transports

OT = transports.OTFM()
EDM = transports.EDM()  # sigma_d = 0.5, c_noise = ln(t) / 4.

NET = dict(
  input_size=8,
  patch_size=2,
  in_channels=4,
  hidden_size=32,
  depth=2,
  num_heads=2,
  encoder_depth=1,
  z_dim=16,
  projector_dim=32,
  num_classes=10,
  lora_hidden_size=8,
)
# The tests only need correct numerics, not fast kernels: cheap compiles.
FAST = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}

SHAPE = (4, 4, 3)  # H, W, C of the analytic tests.


def normal(seed, shape):
  return np.random.RandomState(seed).standard_normal(shape)


def col(a):
  """(B,) -> (B, 1, 1, 1) in NumPy."""
  return np.asarray(a, np.float64).reshape(-1, 1, 1, 1)


def perturbed_state(kind_dtype):
  """Params and other state of the tiny model, params perturbed (NumPy)."""

  def init():
    m = models.build("c2i", NET, dtype=kind_dtype, param_dtype=kind_dtype)
    return nnx.state(m, nnx.Param, ...)

  params, rest = jax.jit(init, compiler_options=FAST)()
  rs = np.random.RandomState(7)
  params = jax.tree.map(
    lambda v: v + 0.05 * rs.standard_normal(v.shape).astype(v.dtype), params
  )
  graphdef = nnx.split(
    nnx.eval_shape(
      lambda: models.build("c2i", NET, dtype=kind_dtype, param_dtype=kind_dtype)
    ),
    nnx.Param,
    ...,
  )[0]
  return graphdef, params, rest


# --- loss helpers ------------------------------------------------------------
#
# The loss tests run every loss evaluation under ``jax.jit`` (``jit_run``:
# cheap compiles, several evaluations per program): eager dispatch on a fresh
# shape is far slower. A student wrapped by ``first_call`` records the
# arguments of its first call, which ``loss`` makes for the prediction
# (t_in = c_noise(t), r_in = c_noise(r), x_t).


def first_call(fn, rec):
  def wrapped(x_t, t_in, r_in, cond):
    if not rec:
      rec.update(x_t=x_t, t=t_in, r=r_in)
    return fn(x_t, t_in, r_in, cond)

  return wrapped


def jit_run(body, *args):
  """``body(*args)`` as one cheaply compiled program, results on the host."""
  out = jax.jit(body, compiler_options=FAST)(*args)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def torch_cos(a, b, eps=1e-8):
  """torch.nn.functional.cosine_similarity over the last axis: each norm is
  clamped at eps separately."""
  return (a * b).sum(-1) / (
    np.maximum(np.linalg.norm(a, axis=-1), eps)
    * np.maximum(np.linalg.norm(b, axis=-1), eps)
  )


def hand_rows(f, tgt):
  """Per-row MSE and directional loss (cosine over channels, eps 1e-8)."""
  b = f.shape[0]
  mse = ((f - tgt) ** 2).reshape(b, -1).mean(1)
  return mse, (1.0 - torch_cos(f, tgt)).reshape(b, -1).mean(1)


P0, S0 = 0.8, 0.5


def student(p):
  # F = p x_t + s t^2 + 0.1 cond: linear in x_t and quadratic in t, so the
  # central difference is exact and dF/dt = p v + 2 s t under OT-FM.
  def fn(x_t, t_in, r_in, cond):
    del r_in
    tb = t_in[:, None, None, None]
    return p * x_t + S0 * tb**2 + 0.1 * cond[:, None, None, None], None

  return fn


def sqrt_weight(t, r):
  return (1 + np.tan(t) - np.tan(r)) ** -0.5


def all_diffusion(**kw):
  return transition.LossConfig(diffusion_ratio=1.0, consistency_ratio=0.0, **kw)


def velocity_student(x, transform, proj=None):
  """F = transform(v, t_in, x_t, cond), v = (x_t - x) / t the OT-FM velocity
  (the all-diffusion target)."""

  def fn(x_t, t_in, r_in, cond):
    del r_in
    v = (x_t - x) / t_in[:, None, None, None]
    return transform(v, t_in, x_t, cond), proj

  return fn
