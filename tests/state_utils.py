"""Descriptions of nnx states shared by the tests of built modules."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


def described(model):
  """Path -> (variable type, shape, dtype, metadata) of every variable."""
  return {
    path: (
      type(v),
      tuple(v.get_value().shape),
      v.get_value().dtype,
      v.get_metadata(),
    )
    for path, v in nnx.to_flat_state(nnx.state(model))
  }


def host(tree):
  """numpy arrays of a state's leaves (keys as their raw data)."""
  return jax.tree.map(
    lambda a: np.asarray(
      jax.random.key_data(a)
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
      else a
    ),
    tree,
  )
