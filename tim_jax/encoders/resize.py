"""PyTorch's ``F.interpolate`` resizes, written as matrices.

``jax.image.resize`` differs from PyTorch where the official code depends on
it: its cubic kernel is Keys' a = -0.5 (PyTorch's bicubic is a = -0.75), it
antialiases when downsampling (PyTorch's default does not), and it has no
``align_corners=True``. Each resize here is separable: an (out, in) weight
matrix per axis, built in float64 on the host from PyTorch's index rules
(``aten/src/ATen/native/UpSample.h``) and applied as two matmuls.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  import jax

CUBIC_A = -0.75  # PyTorch's bicubic coefficient.


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """The four taps' weights at fractional offset t (PyTorch's
  ``get_cubic_upsample_coefficients``)."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``F.interpolate(mode="bicubic", align_corners=False)`` along one axis
  (no antialiasing): source = (i + 0.5) * in / out - 0.5, four taps with
  indices clamped to the edge."""
  # The source index and its fraction in float32, as PyTorch's float
  # kernel computes them (in float64 the taps would differ by ~1e-5 where
  # in / out is not a float32 number).
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  src = scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
  base = np.floor(src)
  weights = _cubic_weights((src - base).astype(np.float64))
  m = np.zeros((n_out, n_in))
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weights[:, k])
  return m


@functools.lru_cache(maxsize=64)
def bilinear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``F.interpolate(mode="bilinear", align_corners=True)`` along one axis:
  source = i * (in - 1) / (out - 1)."""
  f32 = np.float32
  scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
  src = (np.arange(n_out, dtype=f32) * scale).astype(np.float64)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = src - i0
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), i0), 1 - lam)
  np.add.at(m, (np.arange(n_out), i1), lam)
  return m


def _apply(x, mh: np.ndarray, mw: np.ndarray, precision):
  """x (..., H, W, C) -> (..., H', W', C). An axis whose matrix is the
  identity (same size in and out) is left alone: the trainers resize the
  REPA teacher's input to the size it often already has, and an identity
  matmul at full precision still costs compile time and HBM traffic.

  Each product puts its new axis last, the channels ahead of the image
  axes: in the NHWC form ("oh,...hwc->...owc") XLA:GPU's Triton GEMM could
  not tile the transposed image with its 3 channels innermost ("Couldn't
  find output tile sizes", sm_90, the T2I teacher's 1024 px input)."""
  same_h, same_w = _is_identity(mh), _is_identity(mw)
  if same_h and same_w:
    return x
  if same_h:
    x = jnp.einsum("...hwc->...cwh", x)
  else:
    x = jnp.einsum(
      "...hwc,oh->...cwo", x, jnp.asarray(mh, x.dtype), precision=precision
    )
  if same_w:
    return jnp.einsum("...cwo->...owc", x)
  return jnp.einsum(
    "...cwo,pw->...opc", x, jnp.asarray(mw, x.dtype), precision=precision
  )


def _is_identity(m: np.ndarray) -> bool:
  return m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0]))


def bicubic(
  x: jax.Array, size: tuple[int, int], precision: str | None = "highest"
) -> jax.Array:
  """NHWC images resized to ``size`` = (H', W') as PyTorch's bicubic."""
  h, w = x.shape[-3:-1]
  return _apply(
    x, bicubic_matrix(h, size[0]), bicubic_matrix(w, size[1]), precision
  )


def bilinear_align_corners(
  x: jax.Array, size: tuple[int, int], precision: str | None = "highest"
) -> jax.Array:
  """(..., H, W, C) resized to ``size`` as PyTorch's bilinear with
  ``align_corners=True``."""
  h, w = x.shape[-3:-1]
  return _apply(
    x,
    bilinear_align_corners_matrix(h, size[0]),
    bilinear_align_corners_matrix(w, size[1]),
    precision,
  )
