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
``text_encoder_path=``; ``dtype=`` sets the compute dtype of the model and
the text encoder (``device_dtype()`` picks one for the accelerator).
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
  import jax
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


def device_dtype(device: jax.Device | None = None) -> str:
  """The compute dtype for sampling on ``device`` (default: JAX's first):
  bfloat16, what the released models were trained in, where the device
  computes in it (TPUs; NVIDIA GPUs of compute capability 8.0 and later:
  A100, L4, H100); float32 elsewhere: a T4 or V100 has no bfloat16
  arithmetic, float16's range (max 65504) overflows in Gemma-3
  (huggingface/transformers#36822) and is untested for TiM, and a CPU only
  emulates bfloat16."""
  import jax  # pylint: disable=g-import-not-at-top

  device = device or jax.devices()[0]
  if device.platform == "tpu":
    return "bfloat16"
  if device.platform == "gpu":
    capability = str(getattr(device, "compute_capability", None) or "0")
    major = capability.split(".")[0]
    if major.isdigit() and int(major) >= 8:  # NVIDIA Ampere and later.
      return "bfloat16"
  return "float32"


def with_dtype(
  config: ml_collections.ConfigDict, dtype: str
) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose model and text encoder compute in
  ``dtype`` (the autoencoder keeps its own: the official code decodes in
  float32)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from tim_jax.config import builders  # pylint: disable=g-import-not-at-top

  if dtype not in builders.DTYPES:
    raise UserError(f"dtype {dtype!r} is not one of {sorted(builders.DTYPES)}")
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.dtype = dtype
  c.text_encoder.dtype = dtype
  return config_base.lock(c)


def load(
  name: str,
  *,
  config: ml_collections.ConfigDict | str | None = None,
  checkpoint: str | None = None,
  autoencoder_path: str | None = None,
  text_encoder_path: str | None = None,
  dtype: str | None = None,
) -> pipeline.Pipeline:
  """A pipeline of the preset ``name``, each part replaceable; ``dtype``
  (e.g. ``device_dtype()``) replaces the config's compute dtype of the
  model and text encoder.

  The text encoder, autoencoder and weights are fetched first, in that
  order (smallest and gated first), so a missing token or file stops the
  call before the large downloads and before any compilation.
  """
  from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top
  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

  p = get(name)
  if config is None:
    config = p.load_config()
  if dtype is not None:
    if isinstance(config, (str, os.PathLike)):
      config = pipeline.read_config(os.fspath(config))
    config = with_dtype(config, dtype)
  text_encoder = text_encoder_path or p.text_encoder or None
  if text_encoder:
    text_encoder = hub.resolve(text_encoder, allow_patterns=gemma.HUB_FILES)
  autoencoder = hub.resolve(
    autoencoder_path or p.autoencoder, allow_patterns=autoencoders.HUB_FILES
  )
  pipe = pipeline.load(
    hub.resolve(checkpoint or p.checkpoint),
    config,
    autoencoder,
    text_encoder,
  )
  if pipe.kind == "c2i":  # The released C2I models draw ImageNet classes.
    from tim_jax.data import imagenet_classes  # pylint: disable=g-import-not-at-top

    pipe.describe_label = imagenet_classes.describe
  return pipe
