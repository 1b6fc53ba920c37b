"""Encoders and autoencoders built apart under a trace (tim_jax.core.tracing)
are the modules built in one trace: same structure, metadata and values."""

import dataclasses

from autoencoder_utils import CONFIGS
from flax import nnx
import jax
import numpy as np
import pytest
import state_utils

from tim_jax import autoencoders
from tim_jax.core import tracing
from tim_jax.encoders import gemma, radio

GEMMA_SMALL = dataclasses.replace(
  gemma.ONE_B,
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=7,
  layer_types=gemma.ONE_B.layer_types[:7],  # Both kinds of layer.
  head_dim=16,
)
BUILDERS = {
  "gemma": lambda r: gemma.Gemma3TextModel(GEMMA_SMALL, rngs=r),
  "radio": lambda r: radio.VisionTransformer(
    dataclasses.replace(
      radio.V2_5_B,
      embed_dim=32,
      depth=3,
      num_heads=2,
      mlp_hidden=48,
      table=(8, 8),
      final_norm=True,
    ),
    rngs=r,
  ),
  **{
    name: lambda r, cfg=cfg: autoencoders.build(cfg, rngs=r)
    for name, cfg in CONFIGS.items()
  },
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_built_apart_equals_built_in_one_trace(name, monkeypatch):
  make = BUILDERS[name]
  abstract = state_utils.described(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  assert abstract == state_utils.described(make(nnx.Rngs(0)))

  def init():
    rngs = nnx.Rngs(3)
    return nnx.state(make(rngs)), nnx.state(rngs)

  apart = state_utils.host(jax.jit(init)())
  monkeypatch.setattr(tracing, "apart", lambda make: make)  # One trace.
  whole = state_utils.host(jax.jit(init)())
  assert jax.tree.structure(apart) == jax.tree.structure(whole)
  jax.tree.map(np.testing.assert_array_equal, apart, whole)
