"""Numerical conventions shared by the method and the model."""

import jax.numpy as jnp


def wide(dtype):
  """``dtype`` at least as wide as float32 (float64 stays float64).

  The finite-difference derivative, the sampler's state and the network's
  output layer are kept at this width whatever the compute dtype: in
  bfloat16 a difference of two nearby network outputs, or many small
  sampler steps, would lose most of their digits.
  """
  return jnp.promote_types(dtype, jnp.float32)
