"""The deep-compression autoencoder (DC-AE, used by SANA) in Flax NNX.

The architecture and parameter names of diffusers' ``AutoencoderDC``
(``diffusers/models/autoencoders/autoencoder_dc.py``, with
``SanaMultiscaleLinearAttention`` from ``attention_processor.py`` and
``GLUMBConv`` from ``transformers/sana_transformer.py``): ResBlocks,
EfficientViT blocks (ReLU linear attention over multiscale 5x5-projected
q/k/v, its quadratic form on maps no larger than a head, a GLU MBConv),
RMSNorm, stride-2 or pixel-unshuffle convolutions down, interpolation or
pixel-shuffle up, and the channel-averaging in/out shortcuts. The official
TiM code uses it for ``dc-ae-f32c32-sana-1.1`` (``tim/models/vae/dc_ae.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from tim_jax.autoencoders import layers as L
from tim_jax.core.errors import UserError

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_EPS = 1e-5  # diffusers' get_normalization default.
ATTENTION_EPS = 1e-15  # SanaMultiscaleLinearAttention's eps.


def _per_stage(value, n: int, name: str) -> tuple:
  if isinstance(value, str):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise UserError(f"{name} has {len(value)} entries for {n} stages")
  return value


@dataclasses.dataclass(frozen=True)
class DCConfig:
  """``AutoencoderDC``'s ``config.json`` fields (per-stage tuples)."""

  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: tuple[str, ...] = ("ResBlock",)
  decoder_block_types: tuple[str, ...] = ("ResBlock",)
  encoder_block_out_channels: tuple[int, ...] = (128,)
  decoder_block_out_channels: tuple[int, ...] = (128,)
  encoder_layers_per_block: tuple[int, ...] = (2,)
  decoder_layers_per_block: tuple[int, ...] = (3,)
  encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),)
  decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),)
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: tuple[str, ...] = ("rms_norm",)
  decoder_act_fns: tuple[str, ...] = ("silu",)
  scaling_factor: float = 1.0

  @classmethod
  def from_json(cls, cfg: Mapping) -> DCConfig:
    """The config from a diffusers ``config.json`` dict, with ``AutoencoderDC``'s defaults."""
    defaults = dict(  # AutoencoderDC.__init__'s defaults.
      encoder_block_types="ResBlock",
      decoder_block_types="ResBlock",
      encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
      decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
      encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
      decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
      encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
      decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
      decoder_norm_types="rms_norm",
      decoder_act_fns="silu",
    )
    fields = {f.name for f in dataclasses.fields(cls)}
    raw = {**defaults, **{k: v for k, v in cfg.items() if k in fields}}
    ne = len(raw["encoder_block_out_channels"])
    nd = len(raw["decoder_block_out_channels"])
    kw = dict(raw)
    for name, n in (
      ("encoder_block_types", ne),
      ("decoder_block_types", nd),
      ("decoder_norm_types", nd),
      ("decoder_act_fns", nd),
    ):
      kw[name] = _per_stage(raw[name], n, name)
    for name in (
      "encoder_block_out_channels",
      "decoder_block_out_channels",
      "encoder_layers_per_block",
      "decoder_layers_per_block",
    ):
      kw[name] = tuple(int(v) for v in raw[name])
    for name, n in (
      ("encoder_qkv_multiscales", ne),
      ("decoder_qkv_multiscales", nd),
    ):
      kw[name] = tuple(
        tuple(int(k) for k in s) for s in _per_stage(raw[name], n, name)
      )
    c = cls(**kw)
    for t in c.encoder_block_types + c.decoder_block_types:
      if t not in BLOCK_TYPES:
        raise UserError(f"block type {t!r} is not one of {BLOCK_TYPES}")
    for t in c.decoder_norm_types:
      if t not in ("rms_norm", "batch_norm"):
        raise UserError(
          f"decoder norm type {t!r} is not rms_norm or batch_norm"
        )
    for a in c.decoder_act_fns:
      L.activation(a)
    if c.upsample_block_type not in ("pixel_shuffle", "interpolate"):
      raise UserError(
        f"upsample_block_type {c.upsample_block_type!r} is not "
        "pixel_shuffle or interpolate"
      )
    if ne != nd:
      raise UserError("encoder and decoder need the same number of stages")
    return c

  @property
  def downsample(self) -> int:
    """Pixels per latent position along each side."""
    return 2 ** (len(self.encoder_block_out_channels) - 1)


def _norm(kind: str, ch: int, o: L.Options):
  return (
    L.RMSNorm(ch, NORM_EPS, o)
    if kind == "rms_norm"
    else L.BatchNorm(ch, NORM_EPS, o)
  )


class ResBlock(nnx.Module):
  """conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input."""

  def __init__(self, ch: int, norm: str, act: str, o: L.Options):
    self.act = L.activation(act)
    self.conv1 = L.conv(ch, ch, 3, o)
    self.conv2 = L.conv(ch, ch, 3, o, bias=False)
    self.norm = _norm(norm, ch, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiscaleProjection(nnx.Module):
  """``SanaMultiscaleAttentionProjection``: a depthwise k x k convolution,
  then a grouped 1x1 convolution (one group per q/k/v head)."""

  def __init__(self, inner: int, heads: int, kernel: int, o: L.Options):
    ch = 3 * inner
    self.proj_in = L.conv(ch, ch, kernel, o, groups=ch, bias=False)
    self.proj_out = L.conv(ch, ch, 1, o, groups=3 * heads, bias=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(self.proj_in(x))


class LinearAttention(nnx.Module):
  """``SanaMultiscaleLinearAttention`` with its processor
  (``SanaMultiscaleAttnProcessor2_0``): ReLU linear attention in float32
  when the map has more positions than a head has channels, else the
  quadratic form; output projection, norm and residual."""

  def __init__(self, ch: int, head_dim: int, scales, norm: str, o: L.Options):
    heads = ch // head_dim
    inner = heads * head_dim
    self.head_dim, self.precision = head_dim, o.precision
    self.to_q = L.linear(ch, inner, o, bias=False)
    self.to_k = L.linear(ch, inner, o, bias=False)
    self.to_v = L.linear(ch, inner, o, bias=False)
    self.to_qkv_multiscale = nnx.List(
      [MultiscaleProjection(inner, heads, k, o) for k in scales]
    )
    self.to_out = L.linear(inner * (1 + len(scales)), ch, o, bias=False)
    self.norm_out = _norm(norm, ch, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    n, d = h * w, self.head_dim
    qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], -1)
    qkv = jnp.concatenate([qkv] + [p(qkv) for p in self.to_qkv_multiscale], -1)
    linear = n > d
    if linear:
      qkv = qkv.astype(jnp.promote_types(qkv.dtype, jnp.float32))
    # (B, N, heads*3d) -> (B, heads, 3d, N): consecutive channel groups of
    # 3d are one head's q, k and v, as PyTorch's NCHW reshape groups them.
    qkv = qkv.reshape(b, n, -1, 3 * d).transpose(0, 2, 3, 1)
    q, k, v = jnp.split(qkv, 3, axis=2)
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    mm = lambda eq, a, c: jnp.einsum(eq, a, c, precision=self.precision)
    if linear:
      v = jnp.pad(v, ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=1)
      # (v k^T) q: linear in the number of positions.
      out = mm("bhed,bhdn->bhen", mm("bhen,bhdn->bhed", v, k), q)
      out = out[:, :, :-1] / (out[:, :, -1:] + ATTENTION_EPS)
      out = out.astype(x.dtype)
    else:
      scores = mm("bhdn,bhdm->bhnm", k, q).astype(
        jnp.promote_types(q.dtype, jnp.float32)
      )
      scores = scores / (scores.sum(axis=2, keepdims=True) + ATTENTION_EPS)
      out = mm("bhdn,bhnm->bhdm", v, scores.astype(v.dtype))
    # (B, heads, d, N) -> NHWC with channel = head * d + i.
    out = out.reshape(b, -1, n).transpose(0, 2, 1).reshape(b, h, w, -1)
    return x + self.norm_out(self.to_out(out))


class GLUMBConv(nnx.Module):
  """1x1 expand (x2 for the gate) -> SiLU -> 3x3 depthwise -> value *
  SiLU(gate) -> 1x1 project -> RMSNorm, plus the input."""

  def __init__(self, ch: int, o: L.Options, expand: float = 4):
    hidden = int(expand * ch)
    self.conv_inverted = L.conv(ch, 2 * hidden, 1, o)
    self.conv_depth = L.conv(2 * hidden, 2 * hidden, 3, o, groups=2 * hidden)
    self.conv_point = L.conv(hidden, ch, 1, o, bias=False)
    self.norm = L.RMSNorm(ch, NORM_EPS, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
    h, gate = jnp.split(h, 2, axis=-1)
    return x + self.norm(self.conv_point(h * jax.nn.silu(gate)))


class EfficientViTBlock(nnx.Module):
  def __init__(self, ch: int, head_dim: int, scales, norm: str, o: L.Options):
    self.attn = LinearAttention(ch, head_dim, scales, norm, o)
    self.conv_out = GLUMBConv(ch, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv_out(self.attn(x))


def _block(
  kind: str, ch: int, c: DCConfig, norm: str, act: str, scales, o: L.Options
):
  if kind == "ResBlock":
    return L.apart(lambda p: ResBlock(ch, norm, act, p), o)
  return L.apart(
    lambda p: EfficientViTBlock(ch, c.attention_head_dim, scales, norm, p), o
  )


class DownBlock(nnx.Module):
  """``DCDownBlock2d``: a convolution to half the size (stride 2, or stride
  1 then pixel-unshuffle), plus the pixel-unshuffled input averaged over
  channel groups when ``shortcut``."""

  def __init__(
    self,
    cin: int,
    cout: int,
    pixel_unshuffle: bool,
    shortcut: bool,
    o: L.Options,
  ):
    self.unshuffle, self.shortcut = pixel_unshuffle, shortcut
    self.group_size = cin * 4 // cout
    self.conv = L.conv(
      cin,
      cout // 4 if pixel_unshuffle else cout,
      3,
      o,
      stride=1 if pixel_unshuffle else 2,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(x)
    if self.unshuffle:
      y = L.pixel_unshuffle(y)
    if self.shortcut:
      y = y + L.channel_group_mean(L.pixel_unshuffle(x), self.group_size)
    return y


class UpBlock(nnx.Module):
  """``DCUpBlock2d``: nearest x2 then a convolution, or a convolution then
  pixel-shuffle; plus the channel-repeated, pixel-shuffled input when
  ``shortcut``."""

  def __init__(
    self, cin: int, cout: int, interpolate: bool, shortcut: bool, o: L.Options
  ):
    self.interpolate, self.shortcut = interpolate, shortcut
    self.repeats = cout * 4 // cin
    self.conv = L.conv(cin, cout if interpolate else cout * 4, 3, o)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.interpolate:
      y = self.conv(L.upsample_nearest(x))
    else:
      y = L.pixel_shuffle(self.conv(x))
    if self.shortcut:
      y = y + L.pixel_shuffle(L.repeat_channels(x, self.repeats))
    return y


class Encoder(nnx.Module):
  def __init__(self, c: DCConfig, o: L.Options):
    chs, layers = c.encoder_block_out_channels, c.encoder_layers_per_block
    unshuffle = c.downsample_block_type == "pixel_unshuffle"
    first = chs[0] if layers[0] > 0 else chs[1]
    self.conv_in = (
      L.conv(c.in_channels, first, 3, o)
      if layers[0] > 0
      else DownBlock(c.in_channels, first, unshuffle, False, o)
    )
    stages = []
    for i, (ch, n) in enumerate(zip(chs, layers)):
      blocks = [
        _block(
          c.encoder_block_types[i],
          ch,
          c,
          "rms_norm",
          "silu",
          c.encoder_qkv_multiscales[i],
          o,
        )
        for _ in range(n)
      ]
      if i < len(chs) - 1 and n > 0:
        blocks.append(DownBlock(ch, chs[i + 1], unshuffle, True, o))
      stages.append(nnx.List(blocks))
    self.down_blocks = nnx.List(stages)
    self.conv_out = L.conv(chs[-1], c.latent_channels, 3, o)
    self.out_group = chs[-1] // c.latent_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for stage in self.down_blocks:
      for block in stage:
        x = block(x)
    return self.conv_out(x) + L.channel_group_mean(x, self.out_group)


class Decoder(nnx.Module):
  def __init__(self, c: DCConfig, o: L.Options):
    chs, layers = c.decoder_block_out_channels, c.decoder_layers_per_block
    interpolate = c.upsample_block_type == "interpolate"
    self.conv_in = L.conv(c.latent_channels, chs[-1], 3, o)
    self.in_repeats = chs[-1] // c.latent_channels
    stages = []
    for i, (ch, n) in enumerate(zip(chs, layers)):
      blocks = []
      if i < len(chs) - 1 and n > 0:
        blocks.append(UpBlock(chs[i + 1], ch, interpolate, True, o))
      blocks += [
        _block(
          c.decoder_block_types[i],
          ch,
          c,
          c.decoder_norm_types[i],
          c.decoder_act_fns[i],
          c.decoder_qkv_multiscales[i],
          o,
        )
        for _ in range(n)
      ]
      stages.append(nnx.List(blocks))
    self.up_blocks = nnx.List(stages)
    last = chs[0] if layers[0] > 0 else chs[1]
    self.norm_out = L.RMSNorm(last, NORM_EPS, o)
    self.conv_out = (
      L.conv(last, c.in_channels, 3, o)
      if layers[0] > 0
      else UpBlock(last, c.in_channels, interpolate, False, o)
    )

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z) + L.repeat_channels(z, self.in_repeats)
    for stage in reversed(self.up_blocks):
      for block in stage:
        x = block(x)
    return self.conv_out(jax.nn.relu(self.norm_out(x)))


class AutoencoderDC(nnx.Module):
  """``moments(images)`` -> (latent, 0): DC-AE is deterministic;
  ``decode(z)`` -> images. Latents here are unscaled."""

  def __init__(self, c: DCConfig, o: L.Options):
    self.encoder = L.apart(lambda p: Encoder(c, p), o)
    self.decoder = L.apart(lambda p: Decoder(c, p), o)

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The encoder's output and a zero std (DC-AE is deterministic), unscaled."""
    z = self.encoder(images)
    return z, jnp.zeros_like(z)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents to images in [-1, 1]."""
    return self.decoder(z)
