"""The objects a config describes: model, compute dtype, transport, loss.

Training (``tim_jax.train``) and inference (``tim_jax.inference``) both build
their pieces here, so one config always means one model.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from tim_jax import models, transition, transports
from tim_jax.models import TiMConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def model_config(config) -> TiMConfig:
  """The backbone's configuration from ``config.model``."""
  m = config.model
  return TiMConfig.from_official(
      m.kind, dict(m.network), rope_positions=m.rope_positions,
      attention_impl=m.attention_impl or None, remat=m.remat,
      use_projector=m.use_projector)


def compute_dtype(config):
  """``config.model.dtype`` as a jnp dtype."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got "
                     f"{config.model.dtype!r}")
  return DTYPES[config.model.dtype]


def new_model(config, seed=None) -> models.TiM:
  """A freshly initialised (unsharded) backbone; ``seed`` defaults to
  ``config.seed``. Under ``nnx.eval_shape`` it allocates nothing."""
  seed = config.seed if seed is None else seed
  return models.TiM(model_config(config), rngs=nnx.Rngs(seed),
                    dtype=compute_dtype(config))


def graphdef(config):
  """The backbone's graph (its structure without parameter values)."""
  graph, _ = nnx.split(nnx.eval_shape(lambda: new_model(config)), nnx.Param)
  return graph


def transport(config) -> transports.Transport:
  return transports.get(config.transport.name, **dict(config.transport.params))


def loss_config(config, data_shards: int) -> transition.LossConfig:
  """``config.loss``; ``groups=0`` means one group per data shard."""
  fields = dict(config.loss)
  groups = fields.pop("groups", 0) or data_shards
  return transition.LossConfig(groups=groups, **fields)
