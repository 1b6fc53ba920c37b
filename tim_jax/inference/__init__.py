"""Inference: a checkpoint to samples, knowing nothing of training.

    from tim_jax import inference
    pipe = inference.load("workdir/t2i_tiny")     # EMA weights + the config
    pipe = inference.load_preset("tim-c2i-256")   # a released model (Hub)
    pictures = pipe(prompts=["a red circle at the top left"], num_steps=4)

``pipeline`` holds ``load`` and ``Pipeline``; ``presets`` the released
models by name; ``generate`` writes many samples as an ADM ``.npz``;
``prompt_sets`` fills benchmark folders. Paths may be Hugging Face Hub ids
(``hf://owner/repo/file``; ``tim_jax.core.hub``).
"""

from tim_jax.inference.pipeline import (
  FORMATS,
  OFFICIAL_SUFFIXES,
  CheckpointRef,
  NonFiniteSamplesError,
  Pipeline,
  SamplerSettings,
  config_from_checkpoint,
  decode_batch,
  load,
  resolve,
  saved_config,
)
from tim_jax.inference.presets import PRESETS, Preset, device_dtype
from tim_jax.inference.presets import load as load_preset

__all__ = [
  "FORMATS",
  "OFFICIAL_SUFFIXES",
  "CheckpointRef",
  "NonFiniteSamplesError",
  "PRESETS",
  "Pipeline",
  "Preset",
  "SamplerSettings",
  "config_from_checkpoint",
  "decode_batch",
  "device_dtype",
  "load",
  "load_preset",
  "resolve",
  "saved_config",
]
