"""TiM backbones and their layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tim_jax.models.tim import KINDS, NEW_CONDITIONS, TiM, TiMConfig

if TYPE_CHECKING:
  from jax.typing import DTypeLike

__all__ = ["TiM", "TiMConfig", "KINDS", "NEW_CONDITIONS", "build"]


def build(
  kind: str,
  network: dict,
  *,
  seed: int = 0,
  dtype: DTypeLike | None = None,
  param_dtype: DTypeLike | None = None,
  **overrides,
) -> TiM:
  """Builds a freshly initialised TiM from official ``network.params``."""
  from flax import nnx
  import jax.numpy as jnp

  config = TiMConfig.from_official(kind, network, **overrides)
  return TiM(
    config,
    rngs=nnx.Rngs(seed),
    dtype=dtype or jnp.float32,
    param_dtype=param_dtype or jnp.float32,
  )
