"""The released TiM models by name: weights, architecture, autoencoder and
text encoder in one word.

    python -m tim_jax.commands.sample --model=tim-c2i-256 --labels=207,360
    pipe = inference.load_preset("tim-t2i")   # downloads on first use

Each preset names the official checkpoint on the Hugging Face Hub (the
model zoo of github.com/WZDTHU/TiM's README), the config variant of its
architecture (the official ``configs/*.yaml`` it was trained with) and the
hub ids of its autoencoder and text encoder; everything is fetched through
``tim_jax.core.hub`` (the Hugging Face cache; ``HF_HUB_OFFLINE=1`` works
once it is there). Any part can be replaced: ``config=`` (e.g. the variant
with ``,smoke`` for a test), ``checkpoint=``, ``autoencoder_path=``,
``text_encoder_path=``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from tim_jax.config import config_base
from tim_jax.core import hub
from tim_jax.core.errors import UserError
from tim_jax.inference import pipeline

if TYPE_CHECKING:
  import ml_collections

# configs/ beside the package, in a checkout that is not installed.
_CHECKOUT_CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs"
)
SD_VAE = "hf://stabilityai/sd-vae-ft-ema"
DC_AE = "hf://mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
GEMMA = "hf://google/gemma-3-1b-it"  # Gated: needs a Hugging Face token.


@dataclasses.dataclass(frozen=True)
class Preset:
  """A released model: where its files are and which config builds it."""

  name: str
  description: str
  config: str  # "configs/FILE.py:VARIANT"
  checkpoint: str  # hf:// id of the official weights.
  autoencoder: str  # hf:// id of the diffusers autoencoder.
  text_encoder: str = ""  # hf:// id of the caption encoder (T2I).

  def load_config(self) -> ml_collections.ConfigDict:
    """The preset's config (its architecture and sampling defaults): the
    package's own config file, whatever the current folder holds."""
    path, _, variant = self.config.partition(":")
    name = os.path.basename(path)
    for folder in (config_base.packaged_configs(), _CHECKOUT_CONFIGS):
      if folder and os.path.isfile(os.path.join(folder, name)):
        return config_base.load_file(f"{os.path.join(folder, name)}:{variant}")
    return config_base.load_file(self.config)


PRESETS = {
  p.name: p
  for p in (
    Preset(
      "tim-c2i-256",
      "TiM-C2I-256: class-conditional ImageNet 256x256, XL/2 on SD-VAE "
      "latents (664M)",
      "configs/c2i.py:xl2_256",
      "hf://GoodEnough/TiM-C2I/c2i_model_256.safetensors",
      SD_VAE,
    ),
    Preset(
      "tim-c2i-512",
      "TiM-C2I-512: class-conditional ImageNet 512x512, XL/1 on DC-AE "
      "latents (664M)",
      "configs/c2i.py:xl1_512",
      "hf://GoodEnough/TiM-C2I/c2i_model_512.safetensors",
      DC_AE,
    ),
    Preset(
      "tim-t2i",
      "TiM-T2I: text-to-image up to 1024x1024 and other aspect ratios, on "
      "DC-AE latents with Gemma-3 1B captions (865M)",
      "configs/t2i.py:xl",
      "hf://GoodEnough/TiM-T2I/t2i_model.bin",
      DC_AE,
      GEMMA,
    ),
  )
}


def get(name: str) -> Preset:
  """The preset of that name; UserError listing them otherwise."""
  if name not in PRESETS:
    raise UserError(
      f"no model preset {name!r}; the presets are: {', '.join(PRESETS)}"
    )
  return PRESETS[name]


def load(
  name: str,
  *,
  config: ml_collections.ConfigDict | str | None = None,
  checkpoint: str | None = None,
  autoencoder_path: str | None = None,
  text_encoder_path: str | None = None,
) -> pipeline.Pipeline:
  """A pipeline of the preset ``name``, each part replaceable.

  The text encoder, autoencoder and weights are fetched first, in that
  order (smallest and gated first), so a missing token or file stops the
  call before the large downloads and before any compilation.
  """
  from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top
  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

  p = get(name)
  text_encoder = text_encoder_path or p.text_encoder or None
  if text_encoder:
    text_encoder = hub.resolve(text_encoder, allow_patterns=gemma.HUB_FILES)
  autoencoder = hub.resolve(
    autoencoder_path or p.autoencoder, allow_patterns=autoencoders.HUB_FILES
  )
  return pipeline.load(
    hub.resolve(checkpoint or p.checkpoint),
    config if config is not None else p.load_config(),
    autoencoder,
    text_encoder,
  )
