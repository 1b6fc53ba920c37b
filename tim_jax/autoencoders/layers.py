"""Layers shared by the autoencoders, in NHWC with PyTorch's numerics.

Every module here is named and shaped like its diffusers counterpart so a
diffusers state dict maps onto it key for key (``tim_jax.weights.torch_weights``).
The channel orderings of ``pixel_shuffle``/``pixel_unshuffle`` and
``repeat_interleave`` are PyTorch's, written for NHWC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flax import nnx
import jax
import jax.numpy as jnp

from tim_jax.core import tracing
from tim_jax.core.errors import UserError

M = TypeVar("M")

# diffusers' get_activation names (diffusers/models/activations.py).
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function of a diffusers name (``silu``, ``relu``, ...)."""
  if name not in ACTIVATIONS:
    raise UserError(
      f"activation {name!r} is not one diffusers' autoencoders "
      f"accept; expected one of {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


class Options:
  """Numerics of one autoencoder: parameter and compute dtype, matmul
  precision (``highest`` keeps float32 float32 on TPUs), and the rngs that
  initialise parameters (replaced when weights load)."""

  def __init__(
    self,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    precision: str | None = "highest",
    rngs=None,
  ):
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    self.rngs = rngs if rngs is not None else nnx.Rngs(0)


def apart(make: Callable[[Options], M], o: Options) -> M:
  """``make(o)``; under a trace (``nnx.eval_shape``), in a trace of its own
  (``tim_jax.core.tracing``): an abstract build linear in the blocks."""
  return tracing.apart(
    lambda r: make(Options(o.dtype, o.param_dtype, o.precision, r))
  )(o.rngs)


def conv(
  cin: int,
  cout: int,
  kernel: int,
  o: Options,
  *,
  stride: int = 1,
  padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
  groups: int = 1,
  bias: bool = True,
) -> nnx.Conv:
  """``torch.nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups,
  bias=bias)``; ``padding`` defaults to ``kernel // 2`` on every side, or a
  ((top, bottom), (left, right)) pair."""
  if padding is None:
    padding = kernel // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(
    cin,
    cout,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    feature_group_count=groups,
    use_bias=bias,
    dtype=o.dtype,
    param_dtype=o.param_dtype,
    precision=o.precision,
    rngs=o.rngs,
  )


def linear(cin: int, cout: int, o: Options, *, bias: bool = True) -> nnx.Linear:
  """A linear layer with the options' dtypes and precision."""
  return nnx.Linear(
    cin,
    cout,
    use_bias=bias,
    dtype=o.dtype,
    param_dtype=o.param_dtype,
    precision=o.precision,
    rngs=o.rngs,
  )


def group_norm(
  channels: int, groups: int, eps: float, o: Options
) -> nnx.GroupNorm:
  """GroupNorm with PyTorch's variance formula."""
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it.
  return nnx.GroupNorm(
    channels,
    num_groups=groups,
    epsilon=eps,
    use_fast_variance=False,
    dtype=o.dtype,
    param_dtype=o.param_dtype,
    rngs=o.rngs,
  )


class RMSNorm(nnx.Module):
  """diffusers' ``RMSNorm`` over the last (channel) axis: the mean square in
  float32, ``x * rsqrt(ms + eps) * weight + bias``."""

  def __init__(
    self,
    dim: int,
    eps: float,
    o: Options,
    *,
    affine: bool = True,
    bias: bool = True,
  ):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), o.param_dtype)) if affine else None
    self.bias = (
      nnx.Param(jnp.zeros((dim,), o.param_dtype)) if affine and bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    wide = jnp.promote_types(x.dtype, jnp.float32)
    ms = jnp.mean(jnp.square(x.astype(wide)), axis=-1, keepdims=True)
    y = (x * jax.lax.rsqrt(ms + self.eps)).astype(x.dtype)
    if self.weight is not None:
      y = y * self.weight[...]
      if self.bias is not None:
        y = y + self.bias[...]
    return y


class BatchNorm(nnx.Module):
  """``torch.nn.BatchNorm2d`` in eval mode (running statistics), the names
  PyTorch saves: ``weight``, ``bias``, ``running_mean``, ``running_var``."""

  def __init__(self, dim: int, eps: float, o: Options):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), o.param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), o.param_dtype))
    self.running_mean = nnx.BatchStat(jnp.zeros((dim,), o.param_dtype))
    self.running_var = nnx.BatchStat(jnp.ones((dim,), o.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return (x - self.running_mean[...]) * scale + self.bias[...]


def pixel_unshuffle(x: jax.Array, r: int = 2) -> jax.Array:
  """``F.pixel_unshuffle`` in NHWC: (B, H*r, W*r, C) -> (B, H, W, C*r*r),
  output channel ``c*r*r + i*r + j`` from offset (i, j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int = 2) -> jax.Array:
  """``F.pixel_shuffle`` in NHWC, the inverse of ``pixel_unshuffle``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


def channel_group_mean(x: jax.Array, group: int) -> jax.Array:
  """``x.unflatten(1, (-1, group)).mean(2)`` over NHWC channels."""
  *lead, c = x.shape
  return x.reshape(*lead, c // group, group).mean(-1)


def repeat_channels(x: jax.Array, repeats: int) -> jax.Array:
  """``x.repeat_interleave(repeats, dim=1)`` over NHWC channels."""
  return jnp.repeat(x, repeats, axis=-1)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """``F.interpolate(x, scale_factor=factor, mode="nearest")``."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
