"""Inference: a checkpoint to samples, knowing nothing of training.

    from tim_jax import inference
    pipe = inference.load("workdir/t2i_tiny")     # EMA weights + the config
    pictures = pipe(prompts=["a red circle at the top left"], num_steps=4)

``pipeline`` holds ``load`` and ``Pipeline``; ``generate`` writes many
samples as an ADM ``.npz``; ``prompt_sets`` fills benchmark folders.
"""

from tim_jax.inference.pipeline import (
  FORMATS,
  OFFICIAL_SUFFIXES,
  CheckpointRef,
  NonFiniteSamplesError,
  Pipeline,
  SamplerSettings,
  config_from_checkpoint,
  load,
  resolve,
  saved_config,
)

__all__ = [
  "FORMATS",
  "OFFICIAL_SUFFIXES",
  "CheckpointRef",
  "NonFiniteSamplesError",
  "Pipeline",
  "SamplerSettings",
  "config_from_checkpoint",
  "load",
  "resolve",
  "saved_config",
]
