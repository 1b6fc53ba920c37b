"""InceptionV3 for the FID, in Flax NNX, loading pytorch-fid's weights.

The network is the one behind the standard FID numbers: TensorFlow's
``inception-2015-12-05`` graph as ported to PyTorch by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``, a plain state dict). Its layout is
torchvision's ``Inception3`` without the auxiliary head, with a 1008-way
classifier and two quirks of the TF graph that change the features:

* the average pooling in the pool branch of the A, C and first E blocks
  (Mixed_5b-d, Mixed_6b-e, Mixed_7b) averages over the valid pixels only
  (``count_include_pad=False`` in PyTorch terms);
* the last E block (Mixed_7c) max-pools in its pool branch.

Every module keeps the PyTorch attribute name, so parameters map one to one
onto the state-dict keys (``Mixed_6b.branch7x7_2.conv.weight`` is
``model.Mixed_6b.branch7x7_2.conv.kernel``); the layout is NHWC and the table
``FID_INCEPTION_SHAPES`` lists every key with its PyTorch shape.

Inputs follow pytorch-fid with ``resize_input=True, normalize_input=True``:
images are bilinearly resized to 299x299 and fed in [-1, 1]; the FID features
are the 2048 channels of the global average pool after Mixed_7c ("pool3").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import functools
import io
import os
from typing import (
  Any,
  Union,
)

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy
from tqdm.auto import tqdm

from tim_jax.core import paths, tracing
from tim_jax.core.errors import UserError
from tim_jax.eval import fid
from tim_jax.weights import torch_weights

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/"
  "fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
# The smallest input for which every stride-2 stage still has a pixel left.
MIN_INPUT_SIZE = 75
BN_EPS = 1e-3

PathLike = Union[str, "os.PathLike[str]"]
IntPair = int | tuple[int, int]


def _pair(v: IntPair) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


# --------------------------------------------------------------------------
# The expected state dict: key -> PyTorch shape, in PyTorch's key order.
# Written from the block definitions of torchvision's Inception3, separately
# from the module code below, so that the tests compare two descriptions.


def _stem_convs():
  # (name, out, in, kh, kw)
  return [
    ("Conv2d_1a_3x3", 32, 3, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 64, 32, 3, 3),
    ("Conv2d_3b_1x1", 80, 64, 1, 1),
    ("Conv2d_4a_3x3", 192, 80, 3, 3),
  ]


def _a_convs(cin, pool_features):
  return [
    ("branch1x1", 64, cin, 1, 1),
    ("branch5x5_1", 48, cin, 1, 1),
    ("branch5x5_2", 64, 48, 5, 5),
    ("branch3x3dbl_1", 64, cin, 1, 1),
    ("branch3x3dbl_2", 96, 64, 3, 3),
    ("branch3x3dbl_3", 96, 96, 3, 3),
    ("branch_pool", pool_features, cin, 1, 1),
  ]


def _b_convs(cin):
  return [
    ("branch3x3", 384, cin, 3, 3),
    ("branch3x3dbl_1", 64, cin, 1, 1),
    ("branch3x3dbl_2", 96, 64, 3, 3),
    ("branch3x3dbl_3", 96, 96, 3, 3),
  ]


def _c_convs(cin, c7):
  return [
    ("branch1x1", 192, cin, 1, 1),
    ("branch7x7_1", c7, cin, 1, 1),
    ("branch7x7_2", c7, c7, 1, 7),
    ("branch7x7_3", 192, c7, 7, 1),
    ("branch7x7dbl_1", c7, cin, 1, 1),
    ("branch7x7dbl_2", c7, c7, 7, 1),
    ("branch7x7dbl_3", c7, c7, 1, 7),
    ("branch7x7dbl_4", c7, c7, 7, 1),
    ("branch7x7dbl_5", 192, c7, 1, 7),
    ("branch_pool", 192, cin, 1, 1),
  ]


def _d_convs(cin):
  return [
    ("branch3x3_1", 192, cin, 1, 1),
    ("branch3x3_2", 320, 192, 3, 3),
    ("branch7x7x3_1", 192, cin, 1, 1),
    ("branch7x7x3_2", 192, 192, 1, 7),
    ("branch7x7x3_3", 192, 192, 7, 1),
    ("branch7x7x3_4", 192, 192, 3, 3),
  ]


def _e_convs(cin):
  return [
    ("branch1x1", 320, cin, 1, 1),
    ("branch3x3_1", 384, cin, 1, 1),
    ("branch3x3_2a", 384, 384, 1, 3),
    ("branch3x3_2b", 384, 384, 3, 1),
    ("branch3x3dbl_1", 448, cin, 1, 1),
    ("branch3x3dbl_2", 384, 448, 3, 3),
    ("branch3x3dbl_3a", 384, 384, 1, 3),
    ("branch3x3dbl_3b", 384, 384, 3, 1),
    ("branch_pool", 192, cin, 1, 1),
  ]


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  blocks = [
    ("Mixed_5b", _a_convs(192, 32)),
    ("Mixed_5c", _a_convs(256, 64)),
    ("Mixed_5d", _a_convs(288, 64)),
    ("Mixed_6a", _b_convs(288)),
    ("Mixed_6b", _c_convs(768, 128)),
    ("Mixed_6c", _c_convs(768, 160)),
    ("Mixed_6d", _c_convs(768, 160)),
    ("Mixed_6e", _c_convs(768, 192)),
    ("Mixed_7a", _d_convs(768)),
    ("Mixed_7b", _e_convs(1280)),
    ("Mixed_7c", _e_convs(2048)),
  ]
  convs = list(_stem_convs())
  for block, members in blocks:
    convs += [(f"{block}.{name}", *dims) for name, *dims in members]
  table = {}
  for name, cout, cin, kh, kw in convs:
    table[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      table[f"{name}.bn.{leaf}"] = (cout,)
  table["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
  table["fc.bias"] = (NUM_CLASSES,)
  return table


FID_INCEPTION_SHAPES: dict[str, tuple[int, ...]] = _expected_shapes()

# --------------------------------------------------------------------------
# Pooling. PyTorch pads max pooling with -inf and, with
# count_include_pad=False, divides each average by the number of real pixels
# in its window; reduce_window with explicit padding does the same.


def _max_pool(x, window: int, stride: int, pad: int = 0):
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (pad, pad), (pad, pad), (0, 0)),
  )


def _avg_pool_3x3_valid_only(x):
  """3x3, stride 1, padding 1 average over the in-image pixels only."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  dims, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
  # The count depends on the position only; under jit it is a constant.
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pads)
  return total / count


# --------------------------------------------------------------------------
# Modules.


class BasicConv2d(nnx.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    precision=None,
    rngs: nnx.Rngs,
  ):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(
      in_channels,
      out_channels,
      _pair(kernel_size),
      strides=_pair(stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=precision,
      rngs=rngs,
    )
    # The FID network is only ever evaluated: BatchNorm always uses the
    # stored running statistics, never batch statistics.
    self.bn = nnx.BatchNorm(
      out_channels, use_running_average=True, epsilon=BN_EPS, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """35x35 block; pool branch averages over valid pixels only (FID)."""

  def __init__(
    self, cin: int, pool_features: int, *, precision=None, rngs: nnx.Rngs
  ):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch1x1 = conv(cin, 64, 1)
    self.branch5x5_1 = conv(cin, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(cin, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_valid_only(x))
    # Channel order = PyTorch's torch.cat(..., dim=1) order.
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

  def __init__(self, cin: int, *, precision=None, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch3x3 = conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions; valid-only average pool."""

  def __init__(
    self, cin: int, channels_7x7: int, *, precision=None, rngs: nnx.Rngs
  ):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    c7 = channels_7x7
    self.branch1x1 = conv(cin, 192, 1)
    self.branch7x7_1 = conv(cin, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(cin, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3_valid_only(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

  def __init__(self, cin: int, *, precision=None, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch3x3_1 = conv(cin, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(cin, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (
      self.branch7x7x3_1,
      self.branch7x7x3_2,
      self.branch7x7x3_3,
      self.branch7x7x3_4,
    ):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3/3x1 branches.

  ``pool="avg"`` (Mixed_7b) averages over valid pixels only; ``pool="max"``
  (Mixed_7c) reproduces the max pooling of the TF FID graph.
  """

  def __init__(self, cin: int, *, pool: str, precision=None, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch1x1 = conv(cin, 320, 1)
    self.branch3x3_1 = conv(cin, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(cin, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate(
      [self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], -1
    )
    if self.pool == "max":
      pooled = _max_pool(x, 3, 1, pad=1)
    else:
      pooled = _avg_pool_3x3_valid_only(x)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(
  images: np.ndarray | jax.Array, resize_to: int | None = INPUT_SIZE
) -> np.ndarray | jax.Array:
  """NHWC images -> float32 in [-1, 1] at ``resize_to`` x ``resize_to``.

  Float images must already be in [-1, 1]; uint8 images are read as [0, 255].
  The resize is bilinear with half-pixel centres and no antialiasing, the
  scheme of PyTorch's ``F.interpolate(..., mode="bilinear",
  align_corners=False)`` used by pytorch-fid; jax.image.resize computes it
  with a different kernel formulation, so the result agrees to float rounding
  but is not bit-identical.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"images must be NHWC with 3 channels (N, H, W, 3), got "
      f"shape {images.shape}; repeat grayscale images to 3 "
      "channels"
    )
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 127.5 - 1.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(
      f"images must be float (in [-1, 1]) or uint8, got dtype {images.dtype}"
    )
  n, h, w, c = x.shape
  if resize_to is None:
    if min(h, w) < MIN_INPUT_SIZE:
      raise UserError(
        f"images of {h}x{w} are too small for InceptionV3 "
        f"(at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}); resize "
        "them"
      )
  elif (h, w) != (resize_to, resize_to):
    # antialias=False: PyTorch's bilinear interpolate does not prefilter when
    # downsampling, and FID reference numbers were computed that way.
    x = jax.image.resize(
      x, (n, resize_to, resize_to, c), method="bilinear", antialias=False
    )
  return x


class InceptionV3(nnx.Module):
  """The FID InceptionV3 (pytorch-fid's port of TF ``inception-2015-12-05``).

  ``model(images)`` -> (N, 2048) pool3 features; ``return_logits=True`` also
  returns the (N, 1008) classifier logits. ``images``: NHWC, float in
  [-1, 1] or uint8 in [0, 255], any size (resized to ``resize_to``; None
  feeds them as they are). ``precision`` is the matmul/conv precision:
  HIGHEST by default so that GPUs and TPUs do not silently use TF32/bf16
  passes, which would shift the features and the FID.
  """

  def __init__(
    self,
    *,
    resize_to: int | None = INPUT_SIZE,
    precision=jax.lax.Precision.HIGHEST,
    rngs: nnx.Rngs | None = None,
  ):
    # The weights are meant to be loaded (from_state_dict and
    # load_fid_weights skip this initialisation altogether).
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if resize_to is not None and resize_to < MIN_INPUT_SIZE:
      raise ValueError(
        f"resize_to must be >= {MIN_INPUT_SIZE} or None, got {resize_to}"
      )
    self.resize_to = resize_to
    kw = dict(precision=precision, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    # Each mixed block built apart under a trace (nnx.eval_shape):
    # linear, not quadratic, in the blocks (tim_jax.core.tracing).
    mixed = lambda block, *args, **opts: tracing.apart(
      lambda r: block(*args, precision=precision, rngs=r, **opts)
    )(rngs)
    self.Mixed_5b = mixed(InceptionA, 192, 32)
    self.Mixed_5c = mixed(InceptionA, 256, 64)
    self.Mixed_5d = mixed(InceptionA, 288, 64)
    self.Mixed_6a = mixed(InceptionB, 288)
    self.Mixed_6b = mixed(InceptionC, 768, 128)
    self.Mixed_6c = mixed(InceptionC, 768, 160)
    self.Mixed_6d = mixed(InceptionC, 768, 160)
    self.Mixed_6e = mixed(InceptionC, 768, 192)
    self.Mixed_7a = mixed(InceptionD, 768)
    self.Mixed_7b = mixed(InceptionE, 1280, pool="avg")
    self.Mixed_7c = mixed(InceptionE, 2048, pool="max")
    self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, **kw)

  @classmethod
  def from_state_dict(
    cls, state_dict: Mapping[str, Any], **kwargs
  ) -> InceptionV3:
    """A model holding ``state_dict`` (PyTorch layout, strict), built
    without the random initialisation.

    Drawing 24M random numbers layer by layer compiles one XLA program per
    shape, which takes tens of seconds on a CPU; here the module tree is
    traced abstractly (nnx.eval_shape) and every array comes from the state
    dict. ``kwargs`` go to the constructor (``resize_to``, ``precision``).
    """
    model = nnx.eval_shape(lambda: cls(**kwargs))
    return load_state_dict(model, state_dict)

  def __call__(
    self, images: np.ndarray | jax.Array, *, return_logits: bool = False
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    x = preprocess(images, self.resize_to)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 3, 2)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    features = x.mean(axis=(1, 2))
    if return_logits:
      # pytorch-fid never uses the classifier; it is kept because the weight
      # file has it (strict loading) and it gives Inception-Score logits.
      return features, self.fc(features)
    return features


# --------------------------------------------------------------------------
# State dicts.

_WHAT = "FID InceptionV3"


def check_state_dict(
  state_dict: Mapping[str, Any],
  expected: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
  """Raises ValueError unless keys and PyTorch-layout shapes match exactly.

  ``num_batches_tracked`` entries are ignored. ``expected`` defaults to
  ``FID_INCEPTION_SHAPES``.
  """
  torch_weights.check_keys(
    state_dict, FID_INCEPTION_SHAPES if expected is None else expected, _WHAT
  )


def state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
  """The model's weights and BN statistics as a PyTorch-layout state dict."""
  out = torch_weights.module_state_dict(model)
  order = [k for k in FID_INCEPTION_SHAPES if k in out]
  order += [k for k in out if k not in FID_INCEPTION_SHAPES]
  return {k: out[k] for k in order}


def load_state_dict(
  model: InceptionV3, state_dict: Mapping[str, Any]
) -> InceptionV3:
  """Copies a PyTorch-layout state dict into ``model`` in place (strict).

  Missing keys, unexpected keys and shape mismatches raise ValueError naming
  the keys (and shapes) before anything is changed; ``num_batches_tracked``
  entries are ignored. Returns ``model``.
  """
  return torch_weights.load_module(model, state_dict, _WHAT)


# --------------------------------------------------------------------------
# Weight files.


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """A state dict of numpy arrays from a weight file.

  ``.pth``/``.pt``/``.bin`` are read with torch (``weights_only=True``),
  ``.safetensors`` and ``.npz`` without it (``tim_jax.weights.torch_weights``).
  ``num_batches_tracked`` entries are dropped.
  """
  hint = (
    "Without it, convert the file once where torch is installed: "
    "python -m tim_jax.commands.fid convert --inception_weights="
    f"{os.path.basename(os.fspath(path))} "
    "--out=fid_inception.safetensors"
  )
  out = torch_weights.read(path, missing_torch_hint=hint)
  return {
    k: v
    for k, v in out.items()
    if not k.endswith(torch_weights.IGNORED_SUFFIXES)
  }


def save_state_dict(state_dict: Mapping[str, Any], path: PathLike) -> None:
  """Writes a state dict as ``.safetensors`` or ``.npz`` (no torch needed)."""
  path = os.fspath(path)
  arrays = {
    k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()
  }
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    paths.write_bytes(path, safetensors_numpy.save(arrays))  # Local or gs://.
  elif suffix == ".npz":
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())
  else:
    raise UserError(
      f"cannot write {suffix!r} ({path!r}); use .safetensors or .npz"
    )


def load_fid_weights(
  path: PathLike, model: InceptionV3 | None = None, **model_kwargs
) -> InceptionV3:
  """The FID InceptionV3 with the weights of ``path`` (see read_state_dict).

  Builds ``InceptionV3(**model_kwargs)`` (without random initialisation)
  unless ``model`` is given, loads strictly and returns the model.
  """
  sd = read_state_dict(path)
  try:
    check_state_dict(sd)
  except UserError as e:  # Not the FID InceptionV3: name the file.
    raise UserError(f"{os.fspath(path)}: {e}") from None
  if model is None:
    return InceptionV3.from_state_dict(sd, **model_kwargs)
  if model_kwargs:
    raise ValueError("pass either a model or model_kwargs, not both")
  return load_state_dict(model, sd)


# --------------------------------------------------------------------------
# Feature extraction.

ValueRange = tuple[float, float]
# An (N, H, W, 3) array, or an iterable of (n, H, W, 3) arrays.
Images = np.ndarray | jax.Array | Iterable[np.ndarray]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(
  graphdef, state, images, value_range: ValueRange, logits: bool = False
):
  model = nnx.merge(graphdef, state)
  if images.dtype != jnp.uint8 and tuple(value_range) != (-1.0, 1.0):
    lo, hi = value_range
    images = (images.astype(jnp.float32) - lo) * (2.0 / (hi - lo)) - 1.0
  if logits:
    return jnp.concatenate(model(images, return_logits=True), axis=-1)
  return model(images)


def _chunks(
  images: Images, batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
  """(batch, n_real) with every batch exactly ``batch_size`` rows long.

  The last batch is zero-padded so that the jitted forward sees one shape and
  compiles once; BatchNorm uses stored statistics, so padding rows do not
  affect the real ones and are dropped afterwards.
  """
  if hasattr(images, "shape"):
    if len(images.shape) != 4:
      raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    array = images
    images = (
      array[i : i + batch_size] for i in range(0, array.shape[0], batch_size)
    )
  pending, count = [], 0
  for chunk in images:
    chunk = np.asarray(chunk)
    if chunk.ndim != 4:
      raise ValueError(
        f"each batch must be (n, H, W, 3), got shape {chunk.shape}"
      )
    if pending and chunk.shape[1:] != pending[0].shape[1:]:
      raise ValueError(
        f"image batches differ in shape: {chunk.shape[1:]} vs "
        f"{pending[0].shape[1:]}"
      )
    if chunk.shape[0]:
      pending.append(chunk)
      count += chunk.shape[0]
    while count >= batch_size:
      # Views, not copies, when one chunk covers the batch.
      joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
      yield joined[:batch_size], batch_size
      rest = joined[batch_size:]
      pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
  if count:
    joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
    pad = np.zeros((batch_size - count,) + joined.shape[1:], joined.dtype)
    yield np.concatenate([joined, pad]), count


class FeatureExtractor:
  """Jitted, batched pool3 features of many images.

  ``images`` is an (N, H, W, 3) array or an iterable of (n, H, W, 3) arrays
  of any n (e.g. a data loader); they are regrouped into batches of exactly
  ``batch_size``. Float images are mapped from ``value_range`` to [-1, 1]
  (pytorch-fid's convention is (0, 1)); uint8 images are always [0, 255].
  The model's current weights are used at every call.
  """

  def __init__(
    self,
    model: InceptionV3,
    *,
    batch_size: int = 50,
    value_range: ValueRange = (-1.0, 1.0),
  ):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise UserError(f"batch_size must be a positive int, got {batch_size!r}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
      raise ValueError(
        f"value_range must be (low, high) with high > low, got {value_range!r}"
      )
    self.model = model
    self.batch_size = batch_size
    self.value_range = (lo, hi)

  def _check_range(self, batch: np.ndarray, n: int) -> None:
    # A cheap host-side guard against the classic mistake of feeding
    # [0, 255] floats (or [0, 1] data declared as something else).
    if batch.dtype == np.uint8:
      return
    if not np.issubdtype(batch.dtype, np.floating):
      raise ValueError(f"images must be float or uint8, got {batch.dtype}")
    lo, hi = self.value_range
    tol = 1e-3 * (hi - lo)
    bmin, bmax = float(batch[:n].min()), float(batch[:n].max())
    if bmin < lo - tol or bmax > hi + tol:
      raise ValueError(
        f"float images span [{bmin:.4g}, {bmax:.4g}], outside "
        f"value_range {self.value_range}; pass the right "
        "value_range (or uint8 images)"
      )

  def iter_features(
    self, images: Images, *, progress: bool = False, logits: bool = False
  ) -> Iterator[np.ndarray]:
    """Yields float32 (n, 2048) feature batches in input order; with
    ``logits`` (n, 2048 + 1008): the features, then the classifier's
    logits (for the Inception Score)."""
    total = int(images.shape[0]) if hasattr(images, "shape") else None
    graphdef, state = nnx.split(self.model)
    with tqdm(
      total=total, unit="img", desc="Inception features", disable=not progress
    ) as bar:
      in_flight = None
      for batch, n in _chunks(images, self.batch_size):
        self._check_range(batch, n)
        out = _forward(graphdef, state, batch, self.value_range, logits)
        # Dispatch is asynchronous: fetch the previous batch while this one
        # runs, so the host prepares batch i+1 during the forward of batch i.
        if in_flight is not None:
          feats = np.asarray(in_flight[0])[: in_flight[1]]
          bar.update(feats.shape[0])
          yield feats
        in_flight = (out, n)
      if in_flight is not None:
        feats = np.asarray(in_flight[0])[: in_flight[1]]
        bar.update(feats.shape[0])
        yield feats

  def __call__(self, images: Images, *, progress: bool = False) -> np.ndarray:
    """(N, 2048) float32 features of all images."""
    feats = list(self.iter_features(images, progress=progress))
    if not feats:
      raise UserError("no images given")
    return np.concatenate(feats)

  def statistics(
    self, images: Images, *, progress: bool = False
  ) -> fid.Statistics:
    """FID statistics of the images, accumulated without keeping features."""
    running = fid.RunningStatistics(FEATURE_DIM)
    for feats in self.iter_features(images, progress=progress):
      running.update(feats)
    return running.finalize()
