"""The KL autoencoder of Stable Diffusion (SD-VAE) in Flax NNX.

The architecture and parameter names of diffusers' ``AutoencoderKL``
(``diffusers/models/autoencoders/autoencoder_kl.py`` and ``vae.py``: ResNet
blocks with GroupNorm, a mid block with one single-head attention, stride-2
convolutions down, nearest-neighbour upsampling and a convolution up, the
quant and post-quant 1x1 convolutions). The official TiM code uses it for
``stabilityai/sd-vae-ft-ema`` (``tim/models/vae/sd_vae.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from tim_jax.autoencoders import layers as L
from tim_jax.core import numerics
from tim_jax.core.errors import UserError

GN_EPS = 1e-6  # diffusers' resnet_eps for these blocks.
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """``AutoencoderKL``'s ``config.json`` fields that shape the network."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (UP_BLOCK,)

  @classmethod
  def from_json(cls, cfg: Mapping) -> KLConfig:
    """The config from a diffusers ``config.json`` dict (unknown keys ignored, block types checked)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {
      k: (tuple(v) if isinstance(v, list) else v)
      for k, v in cfg.items()
      if k in fields
    }
    c = cls(**kw)
    n = len(c.block_out_channels)
    for name, blocks, want in (
      ("down_block_types", c.down_block_types, DOWN_BLOCK),
      ("up_block_types", c.up_block_types, UP_BLOCK),
    ):
      if len(blocks) != n or any(b != want for b in blocks):
        raise UserError(
          f"{name} must be {n} x {want!r} (the only block "
          f"AutoencoderKL's encoder/decoder build), got "
          f"{list(blocks)}"
        )
    if c.shift_factor:
      raise UserError("shift_factor is not supported (SD-VAE has none)")
    for ch in c.block_out_channels:
      if ch % c.norm_num_groups:
        raise UserError(
          f"block_out_channels {list(c.block_out_channels)} "
          f"must be divisible by norm_num_groups="
          f"{c.norm_num_groups}"
        )
    L.activation(c.act_fn)
    return c

  @property
  def downsample(self) -> int:
    """Pixels per latent position along each side."""
    return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock2D(nnx.Module):
  """diffusers' ``ResnetBlock2D`` without time embedding."""

  def __init__(self, cin: int, cout: int, c: KLConfig, o: L.Options):
    self.act = L.activation(c.act_fn)
    self.norm1 = L.group_norm(cin, c.norm_num_groups, GN_EPS, o)
    self.conv1 = L.conv(cin, cout, 3, o)
    self.norm2 = L.group_norm(cout, c.norm_num_groups, GN_EPS, o)
    self.conv2 = L.conv(cout, cout, 3, o)
    self.conv_shortcut = L.conv(cin, cout, 1, o) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    h = self.conv2(self.act(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """The mid block's single-head self-attention over all positions, with
  its input GroupNorm and residual (diffusers' ``Attention``)."""

  def __init__(self, ch: int, c: KLConfig, o: L.Options):
    self.group_norm = L.group_norm(ch, c.norm_num_groups, GN_EPS, o)
    self.to_q = L.linear(ch, ch, o)
    self.to_k = L.linear(ch, ch, o)
    self.to_v = L.linear(ch, ch, o)
    self.to_out = nnx.List([L.linear(ch, ch, o)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, ch = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, ch)
    # One head; the softmax runs in float32 or wider, as diffusers'
    # upcast_softmax does (float64 in a float64 run, as diffusers' SDPA).
    out = numerics.dot_product_attention(
      self.to_q(t), self.to_k(t), self.to_v(t)
    )
    return x + self.to_out[0](out.reshape(b, h, w, ch))


class MidBlock(nnx.Module):
  """``UNetMidBlock2D``: resnet, (attention), resnet."""

  def __init__(self, ch: int, c: KLConfig, o: L.Options):
    self.resnets = nnx.List(
      [ResnetBlock2D(ch, ch, c, o), ResnetBlock2D(ch, ch, c, o)]
    )
    self.attentions = (
      nnx.List([Attention(ch, c, o)]) if c.mid_block_add_attention else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """``Downsample2D``: pad right/bottom by one, 3x3 convolution, stride 2."""

  def __init__(self, ch: int, o: L.Options):
    self.conv = L.conv(ch, ch, 3, o, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """``Upsample2D``: nearest-neighbour x2, then a 3x3 convolution."""

  def __init__(self, ch: int, o: L.Options):
    self.conv = L.conv(ch, ch, 3, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(L.upsample_nearest(x))


class Stage(nnx.Module):
  """``DownEncoderBlock2D`` (resnets, then ``downsamplers``) or
  ``UpDecoderBlock2D`` (resnets, then ``upsamplers``); the last stage has
  no resampler."""

  def __init__(
    self,
    cin,
    cout,
    layers: int,
    up: bool,
    last: bool,
    c: KLConfig,
    o: L.Options,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock2D(cin if i == 0 else cout, cout, c, o)
        for i in range(layers)
      ]
    )
    resample = (
      None
      if last
      else nnx.List([Upsample(cout, o) if up else Downsample(cout, o)])
    )
    self.upsamplers = resample if up else None
    self.downsamplers = None if up else resample

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    resample = self.upsamplers or self.downsamplers
    return x if resample is None else resample[0](x)


class Encoder(nnx.Module):
  def __init__(self, c: KLConfig, o: L.Options):
    chs = c.block_out_channels
    self.act = L.activation(c.act_fn)
    self.conv_in = L.conv(c.in_channels, chs[0], 3, o)
    self.down_blocks = nnx.List(
      [
        L.apart(
          lambda p, i=i: Stage(
            chs[max(i - 1, 0)],
            chs[i],
            c.layers_per_block,
            False,
            i == len(chs) - 1,
            c,
            p,
          ),
          o,
        )
        for i in range(len(chs))
      ]
    )
    self.mid_block = L.apart(lambda p: MidBlock(chs[-1], c, p), o)
    self.conv_norm_out = L.group_norm(chs[-1], c.norm_num_groups, GN_EPS, o)
    self.conv_out = L.conv(chs[-1], 2 * c.latent_channels, 3, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, c: KLConfig, o: L.Options):
    chs = tuple(reversed(c.block_out_channels))
    self.act = L.activation(c.act_fn)
    self.conv_in = L.conv(c.latent_channels, chs[0], 3, o)
    self.mid_block = L.apart(lambda p: MidBlock(chs[0], c, p), o)
    self.up_blocks = nnx.List(
      [
        L.apart(
          lambda p, i=i: Stage(
            chs[max(i - 1, 0)],
            chs[i],
            c.layers_per_block + 1,
            True,
            i == len(chs) - 1,
            c,
            p,
          ),
          o,
        )
        for i in range(len(chs))
      ]
    )
    self.conv_norm_out = L.group_norm(chs[-1], c.norm_num_groups, GN_EPS, o)
    self.conv_out = L.conv(chs[-1], c.out_channels, 3, o)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """``moments(images)`` -> the posterior's (mean, std); ``decode(z)`` ->
  images. Latents here are unscaled (``tim_jax.autoencoders.Autoencoder``
  applies the scaling factor)."""

  def __init__(self, c: KLConfig, o: L.Options):
    self.encoder = L.apart(lambda p: Encoder(c, p), o)
    self.decoder = L.apart(lambda p: Decoder(c, p), o)
    n = 2 * c.latent_channels
    self.quant_conv = L.conv(n, n, 1, o) if c.use_quant_conv else None
    self.post_quant_conv = (
      L.conv(c.latent_channels, c.latent_channels, 1, o)
      if c.use_post_quant_conv
      else None
    )

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior's mean and std (log-variance clipped as diffusers does), unscaled."""
    h = self.encoder(images)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    # DiagonalGaussianDistribution (diffusers/models/autoencoders/vae.py).
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return mean, jnp.exp(0.5 * logvar)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents to images in [-1, 1]."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


def deprecated_names(state_dict: Mapping) -> dict:
  """Older diffusers files (sd-vae-ft-ema among them) name the mid-block
  attention ``query``/``key``/``value``/``proj_attn``; diffusers renames
  them on load to ``to_q``/``to_k``/``to_v``/``to_out.0``, and so do we.
  1x1-convolution-shaped attention weights are squeezed to Linear ones."""
  rename = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
  }
  out = {}
  for key, value in state_dict.items():
    new = key
    if ".attentions." in key:
      for old, repl in rename.items():
        new = new.replace(old, repl)
      if (
        new.endswith(".weight")
        and getattr(value, "ndim", 0) == 4
        and (".to_" in new)
      ):
        value = value[:, :, 0, 0]
    out[new] = value
  return out


__all__: Sequence[str] = ("KLConfig", "AutoencoderKL", "deprecated_names")
