"""Building blocks of the TiM backbone, Flax NNX, NHWC.

They mirror the modules of ``tim/models/c2i/tim_model.py`` and
``tim/models/t2i/tim_model.py`` (github.com/WZDTHU/TiM).

Every parameter carries logical axis names (see ``tim_jax.core.sharding``); the
attribute names follow the official PyTorch modules so that the converter is a
table, not a puzzle.

Numerics: parameters are ``param_dtype`` (float32), matmuls run in ``dtype``
(the compute dtype); LayerNorm statistics, RoPE and the time-frequency
features are computed in float32 (or wider) as the official code does under
autocast.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core import numerics
from tim_jax.core.errors import UserError
from tim_jax.core.sharding import constrain

if TYPE_CHECKING:
  from collections.abc import Iterator

  from jax.nn.initializers import Initializer

Array = jax.Array

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


_PLATFORM = threading.local()


@contextlib.contextmanager
def forms_for(platform: str | None) -> Iterator[None]:
  """Layers traced inside this context take the form that ``platform``
  (``"cpu"``, ``"tpu"``, ``"gpu"``: the platform of the devices the program
  is lowered for) runs fastest; ``None`` (platform unknown) and outside
  any such context they trace every form and the
  choice is made at lowering (``jax.lax.platform_dependent``): right for any
  platform, but each LayerNorm and attention is then traced and
  differentiated twice (the default T2I train step: trace and lower 5 s
  instead of 2). ``jax.jit`` caches a trace by function, not by this
  context: enter it inside the jitted function, as the trainer and the
  pipeline do."""
  previous = getattr(_PLATFORM, "value", None)
  _PLATFORM.value = platform
  try:
    yield
  finally:
    _PLATFORM.value = previous


def _per_platform(*args, default, cpu):
  """``cpu(*args)`` on CPU, ``default(*args)`` elsewhere: chosen now under
  ``forms_for``, else when the program is lowered."""
  platform = getattr(_PLATFORM, "value", None)
  if platform is None:
    return jax.lax.platform_dependent(*args, default=default, cpu=cpu)
  return (cpu if platform == "cpu" else default)(*args)


def normal(std: float) -> Initializer:
  """A normal initializer of standard deviation ``std``."""
  return nnx.initializers.normal(std)


def logical(init: Initializer, *names: str | None) -> Initializer:
  """An initializer annotated with logical axis names.

  ``eager_sharding=False``: the names are metadata only; placement happens
  where the trainer builds the model under its mesh and rules.
  """
  return nnx.with_partitioning(init, names, eager_sharding=False)


class Linear(nnx.Linear):
  """``nnx.Linear`` with logical names and the official (Xavier, 0) init."""

  def __init__(
    self,
    din,
    dout,
    names,
    *,
    kernel_init=xavier,
    use_bias=True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      din,
      dout,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=logical(kernel_init, *names),
      bias_init=logical(zeros, names[1]),
      rngs=rngs,
    )

  def __call__(self, x: Array) -> Array:
    # One 2D matmul over all leading axes: XLA:CPU runs the backward of a
    # (B, T, D) x (D, E) contraction slower than the same work as
    # (B*T, D) x (D, E) (docs/results/benchmarks.md); accelerators are
    # indifferent.
    kernel = self.kernel[...].astype(self.dtype)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel)
    y = y.reshape(lead + (kernel.shape[-1],))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _centred_and_scale(x, eps):
  """x - mean and 1 / sqrt(var + eps) over the last axis (two-pass
  variance)."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  return centred, jax.lax.rsqrt(var + eps)


def _standardize_traced(x, eps):
  """(x - mean) / sqrt(var + eps), differentiated by tracing the formula.

  ``x - mean`` is written twice on purpose: autodiff then transposes the two
  uses separately, which the TPU compiler fuses into fewer passes than the
  shared difference (libtpu's cost model: 0.7 % of an XL block).
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _standardize_written(x, eps):
  """(x - mean) / sqrt(var + eps), with the derivative written out."""
  centred, inv = _centred_and_scale(x, eps)
  return centred * inv


@_standardize_written.defjvp
def _standardize_jvp(eps, primals, tangents):
  # The derivative written out, dy = (dx - mean(dx) - y mean(dx y)) / s,
  # rather than traced through mean, square and rsqrt: the same map, but
  # its transpose (the backward pass) is two row sums and one fused
  # elementwise pass: a faster CPU train step (docs/results/benchmarks.md).
  # Forward mode (the "jvp" derivative) uses the same rule.
  (x,), (dx,) = primals, tangents
  centred, inv = _centred_and_scale(x, eps)
  y = centred * inv
  s_dx = jnp.sum(dx, axis=-1, keepdims=True)
  s_dxy = jnp.sum(dx * y, axis=-1, keepdims=True)
  return y, dx * inv - (inv / x.shape[-1]) * (s_dx + y * s_dxy)


def standardize(x: Array, eps: float) -> Array:
  """(x - mean) / sqrt(var + eps) over the last axis.

  The same values and derivative on every backend, in the form that backend
  runs fastest: the written derivative makes the CPU train step faster but
  costs the TPU step (libtpu's cost model: docs/results/tpu.md). The
  choice is made when the program is lowered for its platform, or under
  ``forms_for``.
  """
  return _per_platform(
    x,
    default=lambda a: _standardize_traced(a, eps),
    cpu=lambda a: _standardize_written(a, eps),
  )


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32, returned in the input dtype.

  ``affine=False`` is the parameter-free norm of the blocks (eps 1e-6);
  ``affine=True`` the q/k and caption norms (eps 1e-5: the official modules
  use a default ``nn.LayerNorm`` there).
  """

  def __init__(
    self,
    dim,
    *,
    affine: bool,
    eps: float,
    name: str = "norm",
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.eps = eps
    self.affine = affine
    if affine:
      self.scale = nnx.Param(
        logical(ones, name)(rngs.params(), (dim,), param_dtype)
      )
      self.bias = nnx.Param(
        logical(zeros, name)(rngs.params(), (dim,), param_dtype)
      )

  def __call__(self, x: Array) -> Array:
    h = standardize(x.astype(numerics.wide(x.dtype)), self.eps)
    if self.affine:
      h = h * self.scale[...].astype(h.dtype) + self.bias[...].astype(h.dtype)
    return h.astype(x.dtype)


class SwiGLU(nnx.Module):
  """timm's SwiGLU: ``fc2(silu(fc1_g(u)) * fc1_x(u))``, all with bias."""

  def __init__(
    self,
    din,
    hidden,
    dout,
    names=("embed", "mlp", "embed"),
    *,
    init=xavier,
    out_init=None,
    dtype,
    param_dtype,
    rngs,
  ):
    n_in, n_hidden, n_out = names
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1_g = Linear(din, hidden, (n_in, n_hidden), kernel_init=init, **kw)
    self.fc1_x = Linear(din, hidden, (n_in, n_hidden), kernel_init=init, **kw)
    self.fc2 = Linear(
      hidden, dout, (n_hidden, n_out), kernel_init=out_init or init, **kw
    )

  def __call__(self, u: Array) -> Array:
    hidden = jax.nn.silu(self.fc1_g(u)) * self.fc1_x(u)
    if hidden.ndim == 3:  # Token MLPs: hidden units over `tensor`.
      hidden = constrain(hidden, "batch", None, "mlp")
    return self.fc2(hidden)


def modulate(u: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation: ``u * (1 + scale) + shift``."""
  return u * (1 + scale) + shift


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features of the raw c_noise value (cos first, base 10000,
  no x1000 scaling), then Linear -> SiLU -> Linear."""

  freq_dim = 256

  def __init__(self, dim, *, init=xavier, dtype, param_dtype, rngs):
    kw = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_0 = Linear(self.freq_dim, dim, ("freq", "mlp"), **kw)
    self.mlp_2 = Linear(dim, dim, ("mlp", "embed"), **kw)
    self.dtype = dtype

  @classmethod
  def features(cls, t: Array) -> Array:
    """The sinusoidal features (cos, sin) of times ``t``, in float32."""
    # The official code forms these in float32 even under float64.
    half = cls.freq_dim // 2
    freqs = jnp.exp(
      -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half
    )
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)

  def __call__(self, t: Array) -> Array:
    h = self.features(t).astype(jnp.promote_types(t.dtype, self.dtype))
    return self.mlp_2(jax.nn.silu(self.mlp_0(h)))


class PatchEmbed(nnx.Module):
  """Conv(kernel = stride = p) to (B, N, D), tokens row-major over (h, w)."""

  def __init__(self, patch_size, in_channels, dim, *, dtype, param_dtype, rngs):
    # Xavier on the kernel viewed as (D, C p p), as the official init.
    init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
    self.proj = nnx.Conv(
      in_channels,
      dim,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=logical(init, "patch_h", "patch_w", "channels", "embed"),
      bias_init=logical(zeros, "embed"),
      rngs=rngs,
    )

  def __call__(self, x: Array) -> Array:
    h = self.proj(x)
    return h.reshape(h.shape[0], -1, h.shape[-1])


@functools.lru_cache(maxsize=64)
def rope_tables(
  h: int, w: int, head_dim: int, positions: str = "official"
) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin of the 2D RoPE angles, (h*w, head_dim), numpy float64.

  Each axis gets head_dim/2 dims with frequencies 10000^(-2k/d_a), each angle
  repeated twice interleaved; the token's vector is [axis A, axis B]. Tokens
  are row-major, n = y*w + x. ``positions="official"`` reproduces the
  official index rule (A = n mod h, B = n div h; official ``TiM.get_rope``
  with its ``'xy'`` meshgrid of (arange(h), arange(w))), needed for
  official weights on non-square grids; ``"xy"`` uses the true (x, y) for new
  models. Angles are formed in float32 as the official cache is.
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  if max(h, w) > 1024 and positions == "official":
    raise UserError(
      f"the official RoPE cache covers 1024 positions per "
      f"axis; got a {h}x{w} token grid: sample a smaller image"
    )
  d_a = head_dim // 2
  freqs = (
    1.0
    / (
      np.float32(10000.0)
      ** (np.arange(0, d_a, 2, dtype=np.float32) / np.float32(d_a))
    )
  ).astype(np.float32)
  n = np.arange(h * w)
  if positions == "official":
    a, b = n % h, n // h
  elif positions == "xy":
    a, b = n % w, n // w
  else:
    raise UserError(
      "model.network.rope_positions must be 'official' or 'xy', got "
      f"{positions!r}"
    )
  ang_a = (a[:, None].astype(np.float32) * freqs[None]).astype(np.float32)
  ang_b = (b[:, None].astype(np.float32) * freqs[None]).astype(np.float32)
  ang = np.concatenate(
    [np.repeat(ang_a, 2, axis=1), np.repeat(ang_b, 2, axis=1)], axis=1
  )
  ang = ang.astype(np.float64)
  return np.cos(ang), np.sin(ang)


@functools.cache
def _pair_rotation(head_dim: int) -> np.ndarray:
  """R with (u @ R)[2k] = -u[2k+1] and (u @ R)[2k+1] = u[2k]."""
  r = np.zeros((head_dim, head_dim), np.float32)
  even = np.arange(0, head_dim, 2)
  r[even + 1, even] = -1.0
  r[even, even + 1] = 1.0
  return r


def apply_rope(
  u: Array, cos: np.ndarray | Array, sin: np.ndarray | Array
) -> Array:
  """Interleaved (GPT-J) rotation of pairs (2k, 2k+1) along the last axis.

  u: (..., N, hd); cos, sin: (N, hd), broadcast over the leading axes.

  The pair swap is a product with a signed permutation matrix rather than
  a reshape to (..., hd/2, 2): on TPU that reshape puts a size-2 axis in
  the minor (lane) dimension and XLA materialises the float32 q and k
  around it; the product fuses (fewer bytes and less time in the TPU
  compiler's cost estimate of an XL block; docs/results/benchmarks.md).
  At precision "highest" each output is one input times +-1: exact.
  """
  rotation = jnp.asarray(_pair_rotation(u.shape[-1]), u.dtype)
  rotated = jnp.einsum("...d,de->...e", u, rotation, precision="highest")
  return u * cos + rotated * sin


def attention(
  q: Array,
  k: Array,
  v: Array,
  implementation: str | None = None,
  key_mask: Array | None = None,
) -> Array:
  """Softmax attention, scale hd^-1/2; (B, heads, T, hd) layout.

  ``key_mask`` (B, S) bool hides keys where False (every row must keep at
  least one); None attends to all keys.

  ``implementation="cudnn"`` (or ``"xla"``) goes through
  ``jax.nn.dot_product_attention``. ``None`` writes the two einsums here, in
  the heads-major layout: on CPU this runs the backward pass of the q/k
  LayerNorm + attention about twice as fast as the (B, T, heads, hd) layout
  the library function takes, and accelerators compile it to the same
  kernels. Logits and softmax are float32 (float64 in a float64 run).
  """
  if implementation is not None:
    t = lambda a: jnp.swapaxes(a, 1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = numerics.dot_product_attention(
      t(q), t(k), t(v), mask=mask, implementation=implementation
    )
    return t(out)
  # The same values in the form each backend runs fastest (scale on q for
  # XLA:CPU, on the logits for TPU: docs/results/tpu.md), chosen when the
  # program is lowered for its platform, or under ``forms_for``.
  return _per_platform(
    q, k, v, key_mask, default=_attend_scaled_logits, cpu=_attend_scaled_q
  )


def _attend_scaled_logits(q, k, v, key_mask):
  """Softmax attention with the scale on the logits, which the TPU
  compiler fuses into the matmul."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = (
    jnp.einsum(
      "bhqd,bhkd->bhqk", q, k, preferred_element_type=numerics.wide(q.dtype)
    )
    * scale
  )
  return _softmax_values(logits, v, key_mask)


def _attend_scaled_q(q, k, v, key_mask):
  """Softmax attention with the scale on q (T x hd values rather than T x
  S): XLA:CPU then does not materialise a logits-sized array of the
  constant for its fused matmul (docs/results/benchmarks.md)."""
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = jnp.einsum(
    "bhqd,bhkd->bhqk", q, k, preferred_element_type=numerics.wide(q.dtype)
  )
  return _softmax_values(logits, v, key_mask)


def _softmax_values(logits, v, key_mask):
  if key_mask is not None:
    # A hidden key gets weight exactly 0 (exp(-inf)), so the result equals
    # attention over the visible keys alone.
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def _heads(a, num_heads):
  """(B, T, heads*hd) -> (B, heads, T, hd)."""
  b, t, _ = a.shape
  return a.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)


def _merge_heads(a):
  """(B, heads, T, hd) -> (B, T, heads*hd)."""
  b, h, t, d = a.shape
  return a.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _qk_norms(head_dim, enabled, param_dtype, rngs):
  """The q and k LayerNorms of an attention (affine, eps 1e-5), or Nones."""
  if not enabled:
    return None, None
  norm = functools.partial(
    LayerNorm,
    head_dim,
    affine=True,
    eps=1e-5,
    name="head_dim",
    param_dtype=param_dtype,
    rngs=rngs,
  )
  return norm(), norm()


class SelfAttention(nnx.Module):
  """Interval-aware self-attention: ``qkv(u) + qkv_d(e_delta)``, q/k
  LayerNorm over head_dim, 2D RoPE, softmax attention, ``proj``."""

  def __init__(
    self,
    dim,
    num_heads,
    *,
    qk_norm=True,
    distance_aware=True,
    attention_impl=None,
    dtype,
    param_dtype,
    rngs,
  ):
    if dim % num_heads:
      raise ValueError(
        f"hidden_size {dim} is not divisible by num_heads {num_heads}"
      )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attention_impl = attention_impl
    self.qkv = Linear(dim, 3 * dim, ("embed", "qkv"), **kw)
    self.qkv_d = (
      Linear(dim, 3 * dim, ("embed", "qkv"), use_bias=False, **kw)
      if distance_aware
      else None
    )
    self.q_norm, self.k_norm = _qk_norms(
      self.head_dim, qk_norm, param_dtype, rngs
    )
    self.proj = Linear(dim, dim, ("heads", "embed"), **kw)

  def __call__(
    self,
    u: Array,
    cos: np.ndarray | Array,
    sin: np.ndarray | Array,
    e_delta: Array | None = None,
  ) -> Array:
    qkv = self.qkv(u)
    if self.qkv_d is not None:
      qkv = qkv + self.qkv_d(e_delta)
    # The fused output is ordered (3, heads, head_dim): contiguous thirds.
    q, k, v = (
      constrain(_heads(a, self.num_heads), "batch", "heads", None, None)
      for a in jnp.split(qkv, 3, axis=-1)
    )
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    rd = numerics.wide(u.dtype)
    cos, sin = cos.astype(rd), sin.astype(rd)
    q = apply_rope(q.astype(rd), cos, sin).astype(v.dtype)
    k = apply_rope(k.astype(rd), cos, sin).astype(v.dtype)
    out = attention(q, k, v, self.attention_impl)
    return self.proj(_merge_heads(out))


class CrossAttention(nnx.Module):
  """Image tokens attend to caption tokens; RoPE on queries only (as the
  official T2I ``CrossAttention``). ``key_mask`` (B, M) hides caption
  positions: the official model has none and sees the batch's features cut
  to its longest caption; hiding the positions past that length in a
  longer, padded batch gives the same result with a static shape."""

  def __init__(
    self,
    dim,
    num_heads,
    *,
    qk_norm=True,
    attention_impl=None,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attention_impl = attention_impl
    self.q = Linear(dim, dim, ("embed", "heads"), **kw)
    self.kv = Linear(dim, 2 * dim, ("embed", "kv"), **kw)
    self.q_norm, self.k_norm = _qk_norms(
      self.head_dim, qk_norm, param_dtype, rngs
    )
    self.proj = Linear(dim, dim, ("heads", "embed"), **kw)

  def __call__(
    self,
    u: Array,
    y: Array,
    cos: np.ndarray | Array,
    sin: np.ndarray | Array,
    key_mask: Array | None = None,
  ) -> Array:
    heads = lambda a: constrain(
      _heads(a, self.num_heads), "batch", "heads", None, None
    )
    q = heads(self.q(u))
    k, v = (heads(a) for a in jnp.split(self.kv(y), 2, axis=-1))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    rd = numerics.wide(u.dtype)
    q = apply_rope(q.astype(rd), cos.astype(rd), sin.astype(rd)).astype(v.dtype)
    out = attention(q, k.astype(v.dtype), v, self.attention_impl, key_mask)
    return self.proj(_merge_heads(out))


def mlp_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
  """The official SwiGLU width: int(D * ratio) * 2 // 3."""
  return (int(dim * mlp_ratio) * 2) // 3


class TiMBlock(nnx.Module):
  """adaLN block; ``cross=True`` adds the caption cross-attention (T2I).

  The modulation is ``SwiGLU(D -> K -> 6D or 9D)`` applied to c directly (no
  SiLU before it), its output layer zero-initialised.
  """

  def __init__(
    self,
    dim,
    num_heads,
    *,
    cross: bool,
    mlp_ratio=4.0,
    lora_hidden_size=None,
    qk_norm=True,
    distance_aware=True,
    attention_impl=None,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = functools.partial(LayerNorm, dim, affine=False, eps=1e-6, rngs=rngs)
    self.cross = cross
    self.norm1 = norm()
    self.attn = SelfAttention(
      dim,
      num_heads,
      qk_norm=qk_norm,
      distance_aware=distance_aware,
      attention_impl=attention_impl,
      **kw,
    )
    if cross:
      self.norm2_i = norm()
      self.norm2_t = norm()
      self.cross_attn = CrossAttention(
        dim, num_heads, qk_norm=qk_norm, attention_impl=attention_impl, **kw
      )
      self.norm3 = norm()
    else:
      self.norm2 = norm()
    self.mlp = SwiGLU(dim, mlp_hidden(dim, mlp_ratio), dim, **kw)
    k = lora_hidden_size if lora_hidden_size is not None else (dim // 4) * 3
    self.adaLN_modulation = SwiGLU(
      dim,
      k,
      (9 if cross else 6) * dim,
      ("embed", "adaln", "modulation"),
      out_init=zeros,
      **kw,
    )

  def __call__(
    self,
    u: Array,
    c: Array,
    cos: np.ndarray | Array,
    sin: np.ndarray | Array,
    e_delta: Array | None,
    y: Array | None = None,
    y_mask: Array | None = None,
  ) -> Array:
    mod = self.adaLN_modulation(c)
    if self.cross:
      (sh_msa, sc_msa, g_msa, sh_msc, sc_msc, g_msc, sh_mlp, sc_mlp, g_mlp) = (
        jnp.split(mod, 9, axis=-1)
      )
    else:
      sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
    u = u + g_msa * self.attn(
      modulate(self.norm1(u), sh_msa, sc_msa), cos, sin, e_delta
    )
    if self.cross:
      u = u + g_msc * self.cross_attn(
        modulate(self.norm2_i(u), sh_msc, sc_msc),
        self.norm2_t(y),
        cos,
        sin,
        y_mask,
      )
      h = self.norm3(u)
    else:
      h = self.norm2(u)
    return u + g_mlp * self.mlp(modulate(h, sh_mlp, sc_mlp))


class FinalLayer(nnx.Module):
  """Non-affine LN, ``SwiGLU(D -> D/2 -> 2D)`` modulation, Linear to p*p*C.

  The output projection runs in float32 (or wider) whatever the compute
  dtype, so the network's output — and the finite-difference derivative
  formed from it — keeps float32 resolution (the official output is bf16
  under autocast).
  """

  def __init__(
    self, dim, patch_size, out_channels, *, dtype, param_dtype, rngs
  ):
    self.norm_final = LayerNorm(dim, affine=False, eps=1e-6, rngs=rngs)
    self.linear = Linear(
      dim,
      patch_size * patch_size * out_channels,
      ("embed", "out"),
      kernel_init=zeros,
      dtype=numerics.wide(dtype),
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.adaLN_modulation = SwiGLU(
      dim,
      dim // 2,
      2 * dim,
      ("embed", "adaln", "modulation"),
      out_init=zeros,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, u: Array, c: Array) -> Array:
    shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
    return self.linear(modulate(self.norm_final(u), shift, scale))


class Projector(nnx.Module):
  """The REPA projector: Linear -> SiLU -> Linear -> SiLU -> Linear."""

  def __init__(self, dim, hidden, z_dim, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_0 = Linear(dim, hidden, ("embed", "mlp"), **kw)
    self.linear_2 = Linear(hidden, hidden, ("proj_hidden", "mlp"), **kw)
    self.linear_4 = Linear(hidden, z_dim, ("mlp", "proj_out"), **kw)

  def __call__(self, u: Array) -> Array:
    u = jax.nn.silu(self.linear_0(u))
    u = jax.nn.silu(self.linear_2(u))
    return self.linear_4(u)


class LabelEmbedder(nnx.Module):
  """A table of num_classes (+1 null row when CFG dropout is used) rows."""

  def __init__(self, num_rows, dim, *, dtype, param_dtype, rngs):
    self.embedding_table = nnx.Embed(
      num_rows,
      dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=logical(normal(0.02), "vocab", "embed"),
      rngs=rngs,
    )

  def __call__(self, labels: Array) -> Array:
    return self.embedding_table(labels)


class CaptionEmbedder(nnx.Module):
  """LayerNorm(cap_dim, affine, eps 1e-5) -> SwiGLU(cap_dim -> 4D -> D)."""

  def __init__(self, cap_dim, dim, *, dtype, param_dtype, rngs):
    self.norm = LayerNorm(
      cap_dim,
      affine=True,
      eps=1e-5,
      name="cap",
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.mlp = SwiGLU(
      cap_dim,
      4 * dim,
      dim,
      ("cap", "mlp", "embed"),
      init=normal(0.02),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.dtype = dtype

  def __call__(self, feats: Array) -> Array:
    return self.mlp(
      self.norm(feats.astype(jnp.promote_types(feats.dtype, self.dtype)))
    )
