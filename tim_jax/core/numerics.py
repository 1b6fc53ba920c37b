"""Numerical conventions shared by the method and the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from jax.typing import DTypeLike
  import numpy as np


def wide(dtype: DTypeLike) -> np.dtype:
  """``dtype`` at least as wide as float32 (float64 stays float64).

  The finite-difference derivative, the sampler's state and the network's
  output layer are kept at this width whatever the compute dtype: in
  bfloat16 a difference of two nearby network outputs, or many small
  sampler steps, would lose most of their digits.
  """
  return jnp.promote_types(dtype, jnp.float32)


def dot_product_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  mask: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """``jax.nn.dot_product_attention`` ((B, T, N, H) layout), whose softmax
  runs in float32 or wider: float64 inputs get float64 logits and softmax.

  The library function always takes its softmax in float32, so a float64
  run would carry float32 rounding through every attention; the float64
  case is written out here (the library's XLA path in float64; a fused
  kernel has no float64 anyway), everything narrower goes to the library.
  """
  if jnp.dtype(query.dtype) != jnp.float64:
    return jax.nn.dot_product_attention(
      query,
      key,
      value,
      mask=mask,
      scale=scale,
      implementation=implementation,
    )
  if scale is None:
    scale = query.shape[-1] ** -0.5
  # Grouped keys and values (fewer heads than the query), as the library.
  groups = query.shape[-2] // key.shape[-2]
  key, value = (jnp.repeat(a, groups, axis=-2) for a in (key, value))
  logits = jnp.einsum("btnh,bsnh->bnts", query, key) * scale
  if mask is not None:
    # The library's fill for hidden keys (not -inf: a row with every key
    # hidden gets uniform weights there, not NaN).
    big = -0.7 * float(jnp.finfo(logits.dtype).max)
    logits = jnp.where(mask, logits, big)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bnts,bsnh->btnh", weights, value)
