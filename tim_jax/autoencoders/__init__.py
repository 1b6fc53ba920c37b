"""Autoencoders between images and the latents TiM trains on.

``from_diffusers(directory)`` reads a diffusers ``save_pretrained``
directory (``config.json`` whose ``_class_name`` is ``AutoencoderKL`` or
``AutoencoderDC``, and ``diffusion_pytorch_model.safetensors``) into an
``Autoencoder``; ``identity()`` is the pixel-space one. The official TiM
code (``tim/models/vae/__init__.py``) encodes SD-VAE latents as the
posterior's *sample* times the scaling factor and DC-AE latents as the
encoder output times it, decodes with ``_decode(latent / scaling_factor)``
(post-quant convolution included), in float32, without a shift factor.

    ae = autoencoders.from_diffusers("sd-vae-ft-ema")
    z = ae.encode(images, rng=jax.random.key(0))  # NHWC in [-1, 1] -> scaled
    x = ae.decode(z)                              # -> NHWC in [-1, 1]
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp

from tim_jax.autoencoders import dc, kl
from tim_jax.autoencoders import layers as L
from tim_jax.core import hub, paths, sharding
from tim_jax.core.errors import UserError
from tim_jax.weights import torch_weights

if TYPE_CHECKING:
  from jax.sharding import Mesh
  from jax.typing import ArrayLike
  import ml_collections

# config.autoencoder.name -> the diffusers class its directory must hold.
NAMES = {
  "identity": None,
  "sd_vae_ft_ema": "AutoencoderKL",
  "dc_ae_f32c32_sana_1.1": "AutoencoderDC",
}
# Their spatial downsampling (known without reading the directory).
DOWNSAMPLE = {"identity": 1, "sd_vae_ft_ema": 8, "dc_ae_f32c32_sana_1.1": 32}
CLASSES = ("AutoencoderKL", "AutoencoderDC")
WEIGHT_FILES = (
  "diffusion_pytorch_model.safetensors",
  "diffusion_pytorch_model.bin",
)
# Where each autoencoder is on the Hugging Face Hub (tim_jax.core.hub ids).
HUB_IDS = {
  "sd_vae_ft_ema": "hf://stabilityai/sd-vae-ft-ema",
  "dc_ae_f32c32_sana_1.1": "hf://mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
}
# What a hub id's download fetches: the repositories (sd-vae-ft-ema) that
# hold the weights twice keep their .bin copy on the hub.
HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float64": jnp.float64,
}


class Autoencoder:
  """Jitted ``encode``/``decode`` of one autoencoder's weights.

  Images are NHWC in [-1, 1]; latents NHWC and scaled (times
  ``scaling_factor``), as TiM trains on them. With a ``mesh`` the batch is
  sharded over its data axes (when they divide it) and the weights
  replicated.
  """

  def __init__(
    self,
    name: str,
    module: nnx.Module | None,
    scaling_factor: float,
    downsample: int,
    latent_channels: int,
    mesh=None,
  ):
    self.name, self.scaling_factor = name, float(scaling_factor)
    self.downsample, self.latent_channels = downsample, latent_channels
    self.mesh = mesh
    if module is None:
      self._graph, self._state = None, None
      return
    self._graph, self._state = nnx.split(module)
    if mesh is not None:
      self._state = jax.device_put(self._state, sharding.replicated(mesh))
    sf = self.scaling_factor

    def moments(state, images):
      return nnx.merge(self._graph, state).moments(images)

    def encode(state, images, noise):
      mean, std = moments(state, images)
      return (mean + std * noise) * sf

    def decode(state, latents):
      model = nnx.merge(self._graph, state)
      return model.decode(latents / sf)

    self._moments = jax.jit(moments)
    self._encode = jax.jit(encode)
    self._decode = jax.jit(decode)

  def __repr__(self):
    return (
      f"Autoencoder({self.name!r}, downsample={self.downsample}, "
      f"latent_channels={self.latent_channels}, "
      f"scaling_factor={self.scaling_factor})"
    )

  def fingerprint(self) -> str:
    """A fingerprint of the weights (``tim_jax.core.fingerprint``)."""
    if self._graph is None:
      return "identity"
    if getattr(self, "_fingerprint", None) is None:
      from tim_jax.core import fingerprint  # pylint: disable=g-import-not-at-top

      self._fingerprint = fingerprint.of_arrays(self._state)
    return self._fingerprint

  @property
  def is_identity(self) -> bool:
    """Whether this is the pixel-space identity (no network)."""
    return self._graph is None

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """The latent (H, W, C) of an image of this size; ValueError when the
    autoencoder's downsampling does not divide it."""
    f = self.downsample
    if height % f or width % f or height < f or width < f:
      raise UserError(
        f"{self.name} downsamples by {f}: image size "
        f"{height}x{width} must be a positive multiple of {f}"
      )
    return height // f, width // f, self.latent_channels

  def _put(self, x):
    x = jnp.asarray(x)
    if (
      self.mesh is not None
      and x.shape[0] % sharding.data_shards(self.mesh) == 0
    ):
      return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))
    return x

  def _check(self, x, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(
        f"{self.name}.{what} takes NHWC arrays with "
        f"{channels} channels, got shape {tuple(x.shape)}"
      )

  def moments(self, images: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """The unscaled posterior (mean, std); std is zero for DC-AE."""
    images = self._put(images)
    self._check(images, 3, "moments")
    self.latent_shape(*images.shape[1:3])
    return self._moments(self._state, images)

  def encode(
    self, images: ArrayLike, rng: jax.Array | None = None
  ) -> jax.Array:
    """Scaled latents: the posterior mean (``rng=None``) or a sample."""
    if self.is_identity:
      return jnp.asarray(images)
    images = self._put(images)
    self._check(images, 3, "encode")
    h, w, c = self.latent_shape(*images.shape[1:3])
    shape = (images.shape[0], h, w, c)
    noise = (
      jnp.zeros(shape, images.dtype)
      if rng is None
      else jax.random.normal(rng, shape, images.dtype)
    )
    return self._encode(self._state, images, self._put(noise))

  def decode(self, latents: ArrayLike) -> jax.Array:
    """Images in [-1, 1] (not clipped) from scaled latents."""
    if self.is_identity:
      return jnp.asarray(latents)
    latents = self._put(latents)
    self._check(latents, self.latent_channels, "decode")
    return self._decode(self._state, latents)


def identity(channels: int = 3) -> Autoencoder:
  """Pixel space: encode and decode return their input."""
  return Autoencoder("identity", None, 1.0, 1, channels)


def read_config(directory: str) -> dict:
  """The ``config.json`` of a diffusers directory, with errors that name the file."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no config.json in {directory!r}: expected a diffusers "
      "save_pretrained directory (config.json and "
      "diffusion_pytorch_model.safetensors)"
    )
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from e
  name = cfg.get("_class_name")
  if name not in CLASSES:
    raise UserError(
      f"{path}: _class_name is {name!r}; tim_jax reads {' and '.join(CLASSES)}"
    )
  return cfg


def architecture(cfg: dict) -> kl.KLConfig | dc.DCConfig:
  """The ``KLConfig`` or ``DCConfig`` of a diffusers ``config.json``."""
  if cfg.get("_class_name") == "AutoencoderKL":
    return kl.KLConfig.from_json(cfg)
  if cfg.get("_class_name") == "AutoencoderDC":
    return dc.DCConfig.from_json(cfg)
  raise ValueError(
    f"_class_name {cfg.get('_class_name')!r} is not one of {CLASSES}"
  )


def build(
  cfg: dict, dtype: str = "float32", rngs: nnx.Rngs | None = None
) -> nnx.Module:
  """The NNX module of a diffusers ``config.json`` (random weights)."""
  if dtype not in DTYPES:
    raise UserError(
      f"autoencoder.dtype {dtype!r} is not one of {sorted(DTYPES)}"
    )
  o = L.Options(
    dtype=DTYPES[dtype],
    param_dtype=jnp.float64 if dtype == "float64" else jnp.float32,
    rngs=rngs,
  )
  c = architecture(cfg)
  if isinstance(c, kl.KLConfig):
    return kl.AutoencoderKL(c, o)
  return dc.AutoencoderDC(c, o)


def from_diffusers(
  directory: str,
  *,
  dtype: str = "float32",
  mesh: Mesh | None = None,
  name: str | None = None,
) -> Autoencoder:
  """An ``Autoencoder`` from a diffusers ``save_pretrained`` directory.

  Strict: a key the file lacks or has beyond the architecture, or a shape
  that differs, is a ValueError naming it. ``dtype`` is the compute dtype
  (weights stay float32, or float64 with ``dtype="float64"`` under x64).
  A ``name`` of ``NAMES`` must match the directory's class (checked before
  the weights are read). ``directory`` may be a hub id
  (``hf://stabilityai/sd-vae-ft-ema``; ``tim_jax.core.hub``).
  """
  directory = hub.resolve(directory, allow_patterns=HUB_FILES)
  directory = paths.local_copy(os.fspath(directory))  # gs:// copied once.
  cfg = read_config(directory)
  want = NAMES.get(name)
  if want and cfg["_class_name"] != want:  # Before reading any weight.
    raise UserError(
      f"autoencoder {name!r} expects an {want} directory; "
      f"{directory} holds an {cfg['_class_name']}"
    )
  try:  # Before reading any weight, too.
    c = architecture(cfg)
  except UserError as e:
    raise UserError(f"{os.path.join(directory, 'config.json')}: {e}") from None
  files = [
    os.path.join(directory, f)
    for f in WEIGHT_FILES
    if os.path.isfile(os.path.join(directory, f))
  ]
  if not files:
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {directory!r}")
  try:
    state_dict = torch_weights.read(files[0])
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f"cannot read the autoencoder weights {files[0]}: {e}"
    ) from e
  if cfg["_class_name"] == "AutoencoderKL":
    state_dict = kl.deprecated_names(state_dict)
  module = nnx.eval_shape(lambda: build(cfg, dtype, nnx.Rngs(0)))
  torch_weights.load_module(
    module, state_dict, f"{cfg['_class_name']} of {directory}"
  )
  channels = c.latent_channels
  return Autoencoder(
    name or os.path.basename(os.path.normpath(directory)),
    module,
    c.scaling_factor,
    c.downsample,
    channels,
    mesh=mesh,
  )


def from_config(
  config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> Autoencoder:
  """The autoencoder ``config.autoencoder`` names (``name``, ``path``,
  ``dtype``); pixel-space configs get ``identity()``."""
  a = config.autoencoder
  if a.name not in NAMES:
    raise UserError(
      f"autoencoder.name {a.name!r} is not one of {sorted(NAMES)}"
    )
  if a.name == "identity":
    return identity(config.model.network.in_channels)
  path = a.get("path")
  if not path:
    raise UserError(
      f"autoencoder {a.name!r} needs --config.autoencoder.path: its hub "
      f"id {HUB_IDS.get(a.name, 'hf://owner/repo')} or a diffusers "
      "save_pretrained directory"
    )
  return from_diffusers(
    path, dtype=a.get("dtype", "float32"), mesh=mesh, name=a.name
  )


__all__ = [
  "Autoencoder",
  "from_diffusers",
  "from_config",
  "identity",
  "build",
  "architecture",
  "read_config",
  "NAMES",
  "DOWNSAMPLE",
  "HUB_IDS",
  "HUB_FILES",
]
