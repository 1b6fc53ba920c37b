"""Frozen encoders whose features TiM learns to match or is conditioned on:
``radio`` (NVIDIA RADIO v2.5, the official REPA teacher) and ``gemma`` (the
Gemma-3 text decoder, the official T2I caption encoder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from flax import nnx
  import jax
  from jax.typing import DTypeLike


def layer_kwargs(
  dtype: DTypeLike,
  param_dtype: DTypeLike,
  precision: str | None,
  rngs: nnx.Rngs | None = None,
) -> dict:
  """Keyword arguments of an encoder's ``nnx.Linear`` layers (its weights
  are loaded afterwards, so the rngs only shape the initialisation).
  ``precision`` applies to float32 (and wider) compute only: a 16-bit
  matmul has nothing to keep."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return dict(
    dtype=dtype,
    param_dtype=param_dtype,
    precision=precision if jnp.dtype(dtype).itemsize >= 4 else None,
    rngs=rngs if rngs is not None else nnx.Rngs(0),
  )


def batch_rows(h: jax.Array) -> jax.Array:
  """``h`` with its rows split over the batch axes when traced inside a
  train step (``tim_jax.core.sharding.activation_sharding``; a no-op outside
  one). A frozen encoder's weights are split over ``fsdp`` on their
  largest axis; left to itself the partitioner then gathered the whole
  batch onto every device instead of the weights (twice the XL/2 step's
  HBM on a v5p-32 slice, measured with ``tim_jax.commands.compile``)."""
  from tim_jax.core import sharding  # pylint: disable=g-import-not-at-top

  return sharding.constrain(h, "batch", *([None] * (h.ndim - 1)))
