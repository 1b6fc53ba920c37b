"""The objects a config describes: model, compute dtype, transport, loss.

Training (``tim_jax.training``) and inference (``tim_jax.inference``) both build
their pieces here, so one config always means one model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flax import nnx
import jax.numpy as jnp

from tim_jax import models
from tim_jax.core.errors import UserError
from tim_jax.method import transition, transports
from tim_jax.models import TiMConfig

if TYPE_CHECKING:
  from jax.typing import DTypeLike
  import ml_collections

  from tim_jax.encoders import gemma, radio

DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float16": jnp.float16,
}


def model_config(config: ml_collections.ConfigDict) -> TiMConfig:
  """The backbone's configuration from ``config.model``."""
  m = config.model
  return TiMConfig.from_official(
    m.kind,
    dict(m.network),
    rope_positions=m.rope_positions,
    attention_impl=m.attention_impl or None,
    remat=m.remat,
    scan_blocks=m.scan_blocks,
    use_projector=m.use_projector,
  )


def compute_dtype(config: ml_collections.ConfigDict) -> DTypeLike:
  """``config.model.dtype`` as a jnp dtype."""
  if config.model.dtype not in DTYPES:
    raise UserError(
      f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}"
    )
  return DTYPES[config.model.dtype]


def new_model(
  config: ml_collections.ConfigDict, seed: int | None = None
) -> models.TiM:
  """A freshly initialised (unsharded) backbone; ``seed`` defaults to
  ``config.seed``. Under ``nnx.eval_shape`` it allocates nothing."""
  seed = config.seed if seed is None else seed
  return models.TiM(
    model_config(config), rngs=nnx.Rngs(seed), dtype=compute_dtype(config)
  )


def graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
  """The backbone's graph (its structure without parameter values)."""
  graph, _ = nnx.split(nnx.eval_shape(lambda: new_model(config)), nnx.Param)
  return graph


# The configs' training-time distribution (log-normal in the noise level):
# VP and VE draw their times otherwise and have no such fields.
TIME_DISTRIBUTION_PARAMS = ("P_mean", "P_std")


def transport(config: ml_collections.ConfigDict) -> transports.Transport:
  """``config.transport``. Switching ``transport.name`` to VP or VE keeps
  the config's log-normal ``P_mean``/``P_std``, which those transports do
  not have: they are dropped with a warning; any other unknown field is an
  error."""
  name, params = config.transport.name, dict(config.transport.params)
  fields = transports.field_names(name)
  unused = [
    k for k in TIME_DISTRIBUTION_PARAMS if k in params and k not in fields
  ]
  if unused:
    logging.warning(
      "transport %s does not draw log-normal times: ignoring "
      "transport.params %s",
      name,
      ", ".join(unused),
    )
    for k in unused:
      del params[k]
  return transports.get(name, **params)


def loss_config(
  config: ml_collections.ConfigDict, data_shards: int
) -> transition.LossConfig:
  """``config.loss``; ``groups=0`` means one group per data shard."""
  fields = dict(config.loss)
  groups = fields.pop("groups", 0) or data_shards
  return transition.LossConfig(groups=groups, **fields)


REPA_ENCODERS = ("none", "radio_v2_5_b")


def repa_encoder(
  config: ml_collections.ConfigDict, encoder: radio.RadioEncoder | None = None
) -> radio.RadioEncoder | None:
  """The frozen REPA teacher ``loss_extras.repa_encoder`` names (a
  ``tim_jax.encoders.radio.RadioEncoder`` in the compute dtype), or None.
  ``encoder`` stands in for the file (benchmarks, tests)."""
  le = config.loss_extras
  name = le.get("repa_encoder", "none")
  if name not in REPA_ENCODERS:
    raise UserError(
      f"loss_extras.repa_encoder must be one of {REPA_ENCODERS}, got {name!r}"
    )
  if name == "none":
    return None
  if le.repa_feature_key:
    raise UserError(
      "loss_extras.repa_encoder and repa_feature_key are two "
      "sources of REPA targets: set one (the other to "
      "'none' / '')"
    )
  path = le.get("repa_encoder_path", "")
  if not path and encoder is None:
    raise UserError(
      f"loss_extras.repa_encoder={name!r} needs "
      "--config.loss_extras.repa_encoder_path=FILE (RADIO's checkpoint: "
      "hf://nvidia/RADIO/radio-v2.5-b_half.pth.tar or a local copy), or "
      "--config.loss_extras.repa_encoder=none"
    )
  if not config.model.use_projector:
    raise UserError("REPA needs the projector: model.use_projector=True")
  from tim_jax.encoders import radio  # pylint: disable=g-import-not-at-top

  enc = encoder or radio.load(path, dtype=compute_dtype(config))
  z_dim = int(config.model.network.z_dim)
  if enc.dim != z_dim:
    raise UserError(
      f"the REPA teacher's features are {enc.dim} wide but "
      f"model.network.z_dim is {z_dim}: they must match"
    )
  return enc


TEXT_ENCODERS = ("none", "gemma3")


def text_encoder(config: ml_collections.ConfigDict) -> gemma.GemmaEncoder:
  """The frozen caption encoder ``text_encoder.name`` names (a
  ``tim_jax.encoders.gemma.GemmaEncoder`` in ``text_encoder.dtype``)."""
  te = config.text_encoder
  if te.name not in TEXT_ENCODERS:
    raise UserError(
      f"text_encoder.name must be one of {TEXT_ENCODERS}, got {te.name!r}"
    )
  if te.name == "none" or not te.path:
    raise UserError(
      "data.name='captions' encodes captions in the train step: set "
      "--config.text_encoder.name=gemma3 --config.text_encoder.path=DIR "
      "(its hub id hf://google/gemma-3-1b-it, or a local copy of it)"
    )
  if te.dtype not in DTYPES:
    raise UserError(
      f"text_encoder.dtype must be one of {sorted(DTYPES)}, got {te.dtype!r}"
    )
  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

  return gemma.load(
    te.path, dtype=DTYPES[te.dtype], max_length=int(te.max_length)
  )
