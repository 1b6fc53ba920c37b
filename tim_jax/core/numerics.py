"""Numerical conventions shared by the method and the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
