"""NVIDIA RADIO (v2.5) in Flax NNX: the REPA teacher of the official TiM.

The official trainers (``projects/train/trainer_c2i.py``, ``trainer_t2i.py``)
load ``radio-v2.5-b_half.pth.tar`` with the vendored RADIO code
(``tim/models/nvidia_radio``) and compute REPA targets as

    raw = (x + 1) / 2                                  # x in [-1, 1]
    raw = F.interpolate(raw, 16 * grid, mode="bicubic")  # PyTorch's bicubic
    _, features = encoder(raw)                         # patch tokens

where the encoder normalises with the checkpoint's (CLIP) mean and std, cuts
16x16 patches, embeds them linearly, adds its CPE position table resized
bilinearly (``align_corners=True``) to the patch grid, prepends its class
and register tokens, runs a timm ViT (LayerScale if trained with it), applies
the final norm only if the checkpoint's ``args.model_norm`` says so, drops
the class and register tokens and applies the feature normalizer when the
checkpoint has one. This module does the same in NHWC.

    enc = radio.load("radio-v2.5-b_half.pth.tar")
    feats = enc(images, grid=(16, 16))   # (B, 256, 768) for 256 px inputs

Loading reads RADIO's checkpoint format (a pickle of ``args`` and
``state_dict`` / ``state_dict_ema``; the EMA weights are used when present,
as the official loader does) and so needs PyTorch. As the official loader
(``hubconf.py: radio_model``), it casts the ViT's weights to the
checkpoint's ``args.dtype`` and rounds the normalised input to it, and by
default computes in it; a key the ViT here does not implement is refused,
unless the official model never uses it either (``IGNORED_KEYS``).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import logging
import math
import re
from typing import TYPE_CHECKING, Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core import hub, paths, tracing
from tim_jax.core.errors import UserError
from tim_jax.encoders import batch_rows, layer_kwargs, resize
from tim_jax.models import layers
from tim_jax.weights import torch_weights

if TYPE_CHECKING:
  import argparse

  from jax.typing import ArrayLike, DTypeLike

PATCH_PIXELS_PER_TOKEN = 16  # The trainers resize to 16 x the TiM grid.
LN_EPS = 1e-6  # timm's ViT LayerNorm (blocks, final norm, q/k norms).
PATCH_NORM_EPS = 1e-5  # RADIO's patch_normalizer: a default nn.LayerNorm.
# Checkpoint keys (under ``base_model.``) the official model loads and never
# uses, or does not have, so that leaving them out computes the same
# teacher (``radio_model.create_model_from_args`` and ``enable_cpe``):
IGNORED_KEYS = (
  # timm's own patch embedding, class and register tokens and position
  # table: enable_cpe sets them to None and uses patch_generator instead.
  r"patch_embed\..*",
  r"cls_token",
  r"reg_token",
  r"pos_embed",
  # The classifier head: create_model_from_args sets head = Identity.
  r"head\..*",
  # timm's pooling head and pre-norm: RADIO runs its own forward_features
  # (_forward_cpe: patch_generator, blocks, norm), which applies neither.
  r"fc_norm\..*",
  r"attn_pool\..*",
  r"norm_pre\..*",
)
# The final norm's keys are ignored too when args.model_norm is false:
# create_model_from_args then sets norm = Identity.
FINAL_NORM_KEYS = r"norm\..*"
# RADIO's args.dtype (a torch dtype) as a JAX dtype.
TORCH_DTYPES = {
  "torch.float32": jnp.float32,
  "torch.float16": jnp.float16,
  "torch.bfloat16": jnp.bfloat16,
  "torch.float64": jnp.float64,
}
# timm ViT sizes by name: (embed_dim, depth, num_heads).
VIT_SIZES = {
  "tiny": (192, 12, 3),
  "small": (384, 12, 6),
  "base": (768, 12, 12),
  "large": (1024, 24, 16),
  "huge": (1280, 32, 16),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class RadioConfig:
  embed_dim: int
  depth: int
  num_heads: int
  mlp_hidden: int
  patch_size: int
  num_skip: int  # class + register tokens
  table: tuple[int, int]  # CPE position table (rows, cols) in patches
  cpe_mode: bool  # the table is larger than the ViT's native grid
  layer_scale: bool
  qkv_bias: bool
  patch_bias: bool
  patch_norm: bool
  final_norm: bool
  qk_norm: bool = False  # timm's qk_norm: LayerNorm of q and k per head


# RADIO v2.5-B's architecture (ViT-B/16, a 128 x 128 CPE table for inputs
# up to 2048 px, class tokens and registers padded to 8), for benchmarks and
# FLOP counts without the weight file; loading reads the real values from
# the checkpoint.
V2_5_B = RadioConfig(
  embed_dim=768,
  depth=12,
  num_heads=12,
  mlp_hidden=3072,
  patch_size=16,
  num_skip=8,
  table=(128, 128),
  cpe_mode=True,
  layer_scale=False,
  qkv_bias=True,
  patch_bias=False,
  patch_norm=False,
  final_norm=False,
)


class Attention(nnx.Module):
  """timm's ``Attention``: fused qkv, optional LayerNorm of q and k per
  head (``qk_norm``), softmax(q k^T / sqrt(d)) v, proj."""

  def __init__(self, c: RadioConfig, kw, ln):
    self.heads = c.num_heads
    self.qkv = nnx.Linear(
      c.embed_dim, 3 * c.embed_dim, use_bias=c.qkv_bias, **kw
    )
    head_dim = c.embed_dim // c.num_heads
    self.q_norm = ln(head_dim) if c.qk_norm else None
    self.k_norm = ln(head_dim) if c.qk_norm else None
    self.proj = nnx.Linear(c.embed_dim, c.embed_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = batch_rows(self.qkv(x)).reshape(b, n, 3, self.heads, d // self.heads)
    # Heads-major (b, heads, n, head_dim), as the TiM blocks: with the
    # (b, n, heads, head_dim) layout of jax.nn.dot_product_attention,
    # XLA:GPU laid the attention out with n minor and its Triton GEMM could
    # not tile the projection's rows when n is not a multiple of 16 (256
    # patches + 8 skip tokens: "Couldn't find output tile sizes", sm_90).
    q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    out = jnp.swapaxes(layers.attention(q, k, v), 1, 2)
    return self.proj(batch_rows(out.reshape(b, n, d)))


class LayerScale(nnx.Module):
  def __init__(self, dim: int, dtype):
    self.gamma = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...]


class Mlp(nnx.Module):
  def __init__(self, c: RadioConfig, kw):
    self.fc1 = nnx.Linear(c.embed_dim, c.mlp_hidden, **kw)
    self.fc2 = nnx.Linear(c.mlp_hidden, c.embed_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(batch_rows(jax.nn.gelu(self.fc1(x), approximate=False)))


class Block(nnx.Module):
  def __init__(self, c: RadioConfig, kw, ln):
    self.norm1 = ln(c.embed_dim)
    self.attn = Attention(c, kw, ln)
    self.norm2 = ln(c.embed_dim)
    self.mlp = Mlp(c, kw)
    dtype = kw["param_dtype"]
    self.ls1 = LayerScale(c.embed_dim, dtype) if c.layer_scale else None
    self.ls2 = LayerScale(c.embed_dim, dtype) if c.layer_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attn(self.norm1(x))
    x = x + (self.ls1(h) if self.ls1 is not None else h)
    h = self.mlp(self.norm2(x))
    return x + (self.ls2(h) if self.ls2 is not None else h)


class ClsToken(nnx.Module):
  def __init__(self, c: RadioConfig, dtype):
    self.token = nnx.Param(jnp.zeros((c.num_skip, c.embed_dim), dtype))


class PatchGenerator(nnx.Module):
  """RADIO's ``ViTPatchGenerator``: patches -> linear embedding + CPE
  position table, then the class and register tokens."""

  def __init__(self, c: RadioConfig, kw, ln):
    self.c = c
    p = c.patch_size
    self.embedder = nnx.Linear(
      3 * p * p, c.embed_dim, use_bias=c.patch_bias, **kw
    )
    rows, cols = c.table
    self.pos_embed = nnx.Param(
      jnp.zeros((1, rows * cols, c.embed_dim), kw["param_dtype"])
    )
    self.cls_token = ClsToken(c, kw["param_dtype"])
    self.patch_normalizer = (
      ln(c.embed_dim, epsilon=PATCH_NORM_EPS) if c.patch_norm else None
    )

  def positions(self, h: int, w: int) -> jax.Array:
    """The table at an h x w patch grid (``_get_pos_embeddings`` in eval
    mode): (1, h*w, D)."""
    rows, cols = self.c.table
    table = self.pos_embed[...].reshape(rows, cols, -1).astype(jnp.float32)
    if (rows, cols) != (h, w):
      if self.c.cpe_mode:
        side = max(h, w)
        table = resize.bilinear_align_corners(table, (side, side))
      table = table[:h, :w]
      if table.shape[:2] != (h, w):
        table = resize.bilinear_align_corners(table, (h, w))
    return table.reshape(1, h * w, -1).astype(self.pos_embed.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, hp, wp, ch = x.shape
    p = self.c.patch_size
    h, w = hp // p, wp // p
    # 'b c (py yy) (px xx) -> b (py px) (c yy xx)' of NCHW, from NHWC.
    patches = x.reshape(b, h, p, w, p, ch).transpose(0, 1, 3, 5, 2, 4)
    tokens = batch_rows(self.embedder(patches.reshape(b, h * w, ch * p * p)))
    tokens = tokens + self.positions(h, w)
    prefix = jnp.broadcast_to(
      self.cls_token.token[...][None], (b,) + self.cls_token.token.shape
    )
    tokens = jnp.concatenate([prefix.astype(tokens.dtype), tokens], 1)
    if self.patch_normalizer is not None:
      tokens = self.patch_normalizer(tokens)
    return tokens


class VisionTransformer(nnx.Module):
  """The timm ViT as RADIO runs it (``_forward_cpe``)."""

  def __init__(
    self,
    c: RadioConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    precision="highest",
    rngs=None,
  ):
    kw = layer_kwargs(dtype, param_dtype, precision, rngs)
    rngs = kw["rngs"]

    def part(make):
      # Built apart under a trace (tim_jax.core.tracing): linear in depth.
      def with_rngs(r):
        ln = functools.partial(
          nnx.LayerNorm,
          epsilon=LN_EPS,
          use_fast_variance=False,
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=r,
        )
        return make(dict(kw, rngs=r), ln)

      return tracing.apart(with_rngs)

    self.patch_generator = part(lambda k, ln: PatchGenerator(c, k, ln))(rngs)
    block = part(lambda k, ln: Block(c, k, ln))  # One trace for all blocks.
    self.blocks = nnx.List([block(rngs) for _ in range(c.depth)])
    self.norm = (
      part(lambda _, ln: ln(c.embed_dim))(rngs) if c.final_norm else None
    )
    self.num_skip = c.num_skip

  def __call__(self, x: jax.Array, scan: bool = True) -> jax.Array:
    """``scan``: the blocks as one ``lax.scan`` over their parameters
    stacked on the fly (the same arithmetic; the frozen encoder then
    compiles as one block, not twelve, inside the train step). Stacking
    copies the blocks' weights once per call, which is small beside the
    encoder's activations."""
    x = batch_rows(self.patch_generator(x))
    if scan and len(self.blocks) > 1:
      graph, _ = nnx.split(self.blocks[0])
      stacked = jax.tree.map(
        lambda *a: jnp.stack(a), *[nnx.state(b) for b in self.blocks]
      )
      x, _ = jax.lax.scan(
        lambda h, st: (batch_rows(nnx.merge(graph, st)(h)), None), x, stacked
      )
    else:
      for block in self.blocks:
        x = batch_rows(block(x))
    if self.norm is not None:
      x = self.norm(x)
    return x[:, self.num_skip :]


def _vit_size(args) -> tuple[int, int, int, int]:
  """(embed_dim, depth, num_heads, native image size) from the timm name
  and ``args.model_kwargs``."""
  kwargs = dict(getattr(args, "model_kwargs", None) or {})
  m = re.fullmatch(
    r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)\w*", str(args.model)
  )
  if m is None and "num_heads" not in kwargs:
    raise ValueError(
      f"RADIO model {args.model!r} is not a timm ViT this "
      "loader knows (vit_{tiny,small,base,large,huge}_patch"
      "P_R), and args.model_kwargs does not give num_heads"
    )
  dim, depth, heads = VIT_SIZES[m.group(1)] if m else (None, None, None)
  img = int(kwargs.get("img_size", m.group(3) if m else 224))
  return (
    int(kwargs.get("embed_dim", dim)),
    int(kwargs.get("depth", depth)),
    int(kwargs.get("num_heads", heads)),
    img,
  )


def config_from_checkpoint(
  args: argparse.Namespace, base: Mapping[str, np.ndarray]
) -> RadioConfig:
  """The architecture of a RADIO checkpoint (its args and the ViT's state
  dict, keys without ``base_model.``)."""
  if any("parametrizations" in k for k in base):
    raise ValueError(
      "this RADIO checkpoint stores spectrally "
      "reparametrized weights without an EMA copy; tim_jax "
      "reads plain or EMA weights (state_dict_ema)"
    )
  if "patch_generator.embedder.weight" not in base:
    raise ValueError(
      "not a RADIO CPE ViT checkpoint: no patch_generator.embedder.weight"
    )
  dim, _, heads, img = _vit_size(args)
  emb = base["patch_generator.embedder.weight"]
  embed_dim = int(emb.shape[0])
  if dim != embed_dim:
    raise ValueError(f"args say embed_dim {dim}, the weights {embed_dim}")
  patch = int(round(math.sqrt(emb.shape[1] // 3)))
  depth = len({k.split(".")[1] for k in base if k.startswith("blocks.")})
  n = int(base["patch_generator.pos_embed"].shape[1])
  side = int(round(math.sqrt(n)))
  if side * side != n:
    raise ValueError(f"the position table has {n} entries, not a square")
  native = img // patch
  return RadioConfig(
    embed_dim=embed_dim,
    depth=depth,
    num_heads=heads,
    mlp_hidden=int(base["blocks.0.mlp.fc1.weight"].shape[0]),
    patch_size=patch,
    num_skip=int(base["patch_generator.cls_token.token"].shape[0]),
    table=(side, side),
    cpe_mode=(side, side) != (native, native),
    layer_scale="blocks.0.ls1.gamma" in base,
    qkv_bias="blocks.0.attn.qkv.bias" in base,
    patch_bias="patch_generator.embedder.bias" in base,
    patch_norm="patch_generator.patch_normalizer.weight" in base,
    final_norm=bool(getattr(args, "model_norm", False)),
    qk_norm="blocks.0.attn.q_norm.weight" in base,
  )


class RadioEncoder:
  """``enc(images, grid)``: REPA target features of NHWC images in
  [-1, 1], (B, h*w, C), computed as the official trainers compute them.
  ``enc.apply(state, images, grid)`` is the pure form (for use inside a
  jitted train step, with ``enc.state``)."""

  def __init__(
    self,
    model: VisionTransformer,
    mean,
    std,
    feature_norm: tuple[np.ndarray, np.ndarray] | None = None,
    scan_blocks: bool = True,
    input_dtype: DTypeLike = jnp.float32,
  ):
    self.config = model.patch_generator.c
    # The official input conditioner normalises in float32 and rounds the
    # result to the checkpoint's args.dtype.
    self.input_dtype = input_dtype
    # The blocks as one scan (compiles once) or a loop (XLA's cost analysis
    # then counts every block: tim_jax.commands.compile's roofline).
    self.scan_blocks = scan_blocks
    self.graphdef, params = nnx.split(model)
    consts = dict(
      mean=jnp.asarray(np.asarray(mean, np.float32).reshape(3)),
      std=jnp.asarray(np.asarray(std, np.float32).reshape(3)),
    )
    if feature_norm is not None:
      consts["fn_mean"] = jnp.asarray(feature_norm[0])
      consts["fn_tx"] = jnp.asarray(feature_norm[1])
    self.state = dict(params=params, consts=consts)
    self._jitted = jax.jit(self.apply, static_argnums=(2,))

  @property
  def dim(self) -> int:
    """The feature width (embedding size)."""
    return self.config.embed_dim

  def apply(
    self, state: Mapping[str, Any], images: jax.Array, grid: tuple[int, int]
  ) -> jax.Array:
    """The features of ``images`` (NHWC in [-1, 1]) at token grid ``grid``, from a ``state`` of parameters and constants; pure, for use inside a jitted step."""
    h, w = (int(g) for g in grid)
    model = nnx.merge(self.graphdef, state["params"])
    c = state["consts"]
    size = (PATCH_PIXELS_PER_TOKEN * h, PATCH_PIXELS_PER_TOKEN * w)
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = resize.bicubic(x, size)
    x = ((x - c["mean"]) / c["std"]).astype(self.input_dtype)
    feats = model(x, scan=self.scan_blocks)
    if "fn_tx" in c:
      mean, tx = (c[k].astype(feats.dtype) for k in ("fn_mean", "fn_tx"))
      feats = (feats - mean) @ tx.T
    return feats

  def __call__(self, images: ArrayLike, grid: tuple[int, int]) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"RADIO takes NHWC RGB images, got shape {images.shape}")
    if self.config.patch_size != PATCH_PIXELS_PER_TOKEN:
      raise ValueError(
        f"the trainers' 16 px per token assumes patch 16; "
        f"this checkpoint's patch is {self.config.patch_size}"
      )
    return self._jitted(self.state, images, tuple(int(g) for g in grid))


def random_encoder(
  config: RadioConfig = V2_5_B,
  *,
  dtype: DTypeLike = jnp.float32,
  seed: int = 0,
  abstract: bool = False,
  scan_blocks: bool = True,
) -> RadioEncoder:
  """An encoder of ``config``'s architecture with random weights (for
  benchmarks and tests; REPA needs the trained ones); ``abstract``: shapes
  only, for compiling (``tim_jax.commands.compile``)."""
  build = lambda: VisionTransformer(config, dtype=dtype, rngs=nnx.Rngs(seed))
  model = nnx.eval_shape(build) if abstract else build()
  return RadioEncoder(model, CLIP_MEAN, CLIP_STD, scan_blocks=scan_blocks)


def _read(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"reading the RADIO checkpoint {path!r} (a pickle of "
      "args and state dicts) needs PyTorch: pip install "
      "torch (the CPU build is enough)"
    ) from e
  import argparse  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top

  # RADIO's checkpoint pickles its training arguments (an
  # argparse.Namespace) beside the tensors. torch's weights-only unpickler
  # builds tensors, containers and that one allow-listed class and refuses
  # any other object, so a file can hold no code that runs on loading.
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      chk = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f": {found.group(1)}" if found else ""
    raise UserError(
      f"{path}: refused to unpickle it: it holds an object other than "
      f"tensors, containers and argparse.Namespace{what}, which would run "
      "code on loading"
    ) from None
  if not isinstance(chk, dict) or "args" not in chk:
    raise UserError(
      f"{path} is not a RADIO checkpoint (a dict with args and state_dict)"
    )
  sd = chk.get("state_dict_ema") or chk.get("state_dict")
  if sd is None:
    raise UserError(f"{path} has neither state_dict_ema nor state_dict")
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):
      k = k[len("module.") :] if k.startswith("module.") else k
      out[k] = v.detach().float().cpu().numpy()
  return chk["args"], out


def checkpoint_dtype(args: argparse.Namespace, path: str = "") -> Any:
  """The JAX dtype of a RADIO checkpoint's ``args.dtype`` (float32 when it
  has none, as the official loader)."""
  name = str(getattr(args, "dtype", "torch.float32"))
  if name not in TORCH_DTYPES:
    raise UserError(
      f"{path}: RADIO args.dtype {name} is none of {sorted(TORCH_DTYPES)}"
    )
  return TORCH_DTYPES[name]


def ignored_keys(
  base: Mapping[str, Any], args: argparse.Namespace
) -> list[str]:
  """The keys of ``base`` (the ViT's, without ``base_model.``) that the
  official model never uses (``IGNORED_KEYS``; the final norm's without
  ``args.model_norm``)."""
  patterns = list(IGNORED_KEYS)
  if not getattr(args, "model_norm", False):
    patterns.append(FINAL_NORM_KEYS)
  rule = re.compile("|".join(f"(?:{p})" for p in patterns))
  return sorted(k for k in base if rule.fullmatch(k))


def load(path: str, *, dtype: DTypeLike | None = None) -> RadioEncoder:
  """A RADIO encoder from the official checkpoint format.

  As the official loader, the ViT's weights are cast to the checkpoint's
  ``args.dtype`` and so is the normalised input; ``dtype`` is the
  computation's dtype (default: that same ``args.dtype``, which is what the
  official loader computes in). Every ViT key must be one the model
  implements or one the official model never uses (``IGNORED_KEYS``, logged);
  any other raises a UserError naming it, as does a missing key. ``path``
  may be a hub id (``hf://nvidia/RADIO/radio-v2.5-b_half.pth.tar``).
  """
  path = str(hub.resolve(path))
  args, sd = _read(paths.local_copy(path))  # gs:// copied once.
  base = {
    k[len("base_model.") :]: v
    for k, v in sd.items()
    if k.startswith("base_model.")
  }
  c = config_from_checkpoint(args, base)
  weight_dtype = checkpoint_dtype(args, path)
  dtype = weight_dtype if dtype is None else dtype
  model = nnx.eval_shape(
    lambda: VisionTransformer(c, dtype=dtype, param_dtype=weight_dtype)
  )
  unused = ignored_keys(base, args)
  if unused:
    logging.warning(
      "RADIO: ignoring %d checkpoint key(s) the official model does not "
      "use either: %s",
      len(unused),
      torch_weights.summarise(unused),
    )
  unknown = sorted(set(base) - set(torch_weights.named_variables(model)))
  unknown = [k for k in unknown if k not in unused]
  if unknown:
    raise UserError(
      f"{path}: the RADIO checkpoint has {len(unknown)} ViT key(s) "
      "(under base_model.) that this implementation does not compute and "
      "the official model may use, so the teacher would differ: "
      f"{torch_weights.summarise(unknown)}"
    )
  torch_weights.load_module(
    model,
    {k: v for k, v in base.items() if k not in unused},
    f"RADIO checkpoint {path}",
  )
  mean = sd.get("input_conditioner.norm_mean", np.asarray(CLIP_MEAN))
  std = sd.get("input_conditioner.norm_std", np.asarray(CLIP_STD))
  fn = None
  if "_feature_normalizer.mean" in sd:
    # The official FeatureNormalizer holds its buffers in args.dtype.
    fn = tuple(
      jnp.asarray(sd[f"_feature_normalizer.{k}"], weight_dtype)
      for k in ("mean", "tx")
    )
  return RadioEncoder(model, mean, std, fn, input_dtype=weight_dtype)
