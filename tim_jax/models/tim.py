"""The TiM backbone: class-conditional (c2i) and text-to-image (t2i).

``TiM(kind="c2i" | "t2i", ...)`` takes the official YAML ``network.params``
names, so an official config or checkpoint maps onto it one to one.

Call: ``model(x, t, r, y)`` with x (B, H, W, C) (NHWC), t and r (B,) the
network inputs (already ``c_noise``-transformed), and y integer labels (B,)
(null class = ``num_classes``) or caption features: an array
(B, M, cap_feat_dim), every position seen, or a dict ``{"features": (B, M,
cap_feat_dim), "length": (B,) int}`` where row b's cross-attention sees only
its first ``length[b]`` positions (padded, bucketed captions; see
``caption_key_mask``). Any H, W divisible by the patch size works. With ``return_projection=True`` the
REPA projection (B, N, z_dim) after block ``encoder_depth`` comes back too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from einops import rearrange
from flax import nnx
import jax
import jax.numpy as jnp

from tim_jax.core import tracing
from tim_jax.core.errors import UserError
from tim_jax.core.sharding import constrain
from tim_jax.models import layers

if TYPE_CHECKING:
  from jax.typing import ArrayLike

NEW_CONDITIONS = ("t-r", "r", "t,r", "t,t-r", "r,t-r", "t,r,t-r")
REMAT_POLICIES = ("none", "full", "dots_saveable")
KINDS = ("c2i", "t2i")


def caption_parts(
  y: jax.Array | dict[str, jax.Array],
) -> tuple[jax.Array, jax.Array | None]:
  """(features (B, M, D), key mask (B, M) bool or None) of a caption
  conditioning: an array, or ``{"features", "length"}``."""
  if isinstance(y, dict):
    if set(y) != {"features", "length"}:
      raise ValueError(
        "caption conditioning as a dict must have exactly "
        f"'features' and 'length', got {sorted(y)}"
      )
    feats = y["features"]
    return feats, caption_key_mask(y["length"], jnp.shape(feats)[1])
  return y, None


def caption_key_mask(length: ArrayLike, num_positions: int) -> jax.Array:
  """(B, M) bool: position m of row b is seen iff m < length[b]."""
  return jnp.arange(num_positions)[None, :] < jnp.asarray(length)[:, None]


@dataclasses.dataclass(frozen=True)
class TiMConfig:
  """The architecture. Field names are the official ``network.params``."""

  kind: str = "c2i"
  input_size: int = 32  # Informational: any divisible size is accepted.
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  encoder_depth: int = 8
  qk_norm: bool = True
  z_dim: int = 768
  projector_dim: int = 2048
  new_condition: str = "t-r"
  use_new_embed: bool = True
  distance_aware: bool = True
  lora_hidden_size: int | None = None
  # c2i
  num_classes: int = 1000
  class_dropout_prob: float = 0.1  # > 0 adds the null-class row.
  # t2i
  cap_feat_dim: int = 1152
  # Not official: options of this port.
  use_projector: bool = True
  rope_positions: str = "official"  # or "xy" (true 2D positions)
  attention_impl: str | None = None  # jax.nn.dot_product_attention's
  # Rematerialise each block in the backward pass: False / "none", True /
  # "full" (keep only the block's inputs), "dots_saveable" (keep matmul
  # outputs, recompute the elementwise work).
  remat: bool | str = False
  # Run the depth as one nnx.scan over blocks stacked on a leading "layers"
  # axis (one block compiled, not `depth`); official checkpoints convert
  # to and from this layout (tim_jax.weights.convert).
  scan_blocks: bool = False

  @classmethod
  def from_official(cls, kind: str, network: dict, **overrides) -> TiMConfig:
    """From the official YAML ``network.params`` (unknown keys rejected)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    ignored = {"use_checkpoint"}
    params = {}
    for key, value in dict(network).items():
      if key in ignored:
        continue
      if key not in fields:
        raise UserError(
          f"unknown network parameter {key!r}; known: "
          f"{sorted(fields - {'kind'})}"
        )
      params[key] = value
    params.update(overrides)
    return cls(kind=kind, **params)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UserError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.new_condition not in NEW_CONDITIONS:
      raise UserError(
        f"new_condition must be one of {NEW_CONDITIONS}, got "
        f"{self.new_condition!r}"
      )
    if self.hidden_size % self.num_heads:
      raise UserError(
        f"hidden_size {self.hidden_size} is not divisible by "
        f"num_heads {self.num_heads}"
      )
    if (self.hidden_size // self.num_heads) % 4:
      raise UserError(
        "2D RoPE needs head_dim = hidden_size / num_heads "
        f"divisible by 4, got {self.hidden_size // self.num_heads}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise UserError(
        f"remat must be a bool or one of {REMAT_POLICIES}, got {self.remat!r}"
      )
    if self.use_projector and not 1 <= self.encoder_depth <= self.depth:
      raise UserError(
        f"encoder_depth must lie in [1, depth={self.depth}], "
        f"got {self.encoder_depth}"
      )

  @property
  def remat_policy(self) -> str:
    """``remat`` as a name: ``none``, ``full`` or ``dots_saveable``."""
    if isinstance(self.remat, bool):
      return "full" if self.remat else "none"
    return str(self.remat)

  @property
  def num_label_rows(self) -> int:
    """Rows of the label table: the classes, plus the null class when labels are dropped."""
    return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)


class TiM(nnx.Module):
  """The TiM transformer (the official ``TiM`` of
  ``tim/models/{c2i,t2i}/tim_model.py``)."""

  def __init__(
    self,
    config: TiMConfig,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    self.config = config
    self.dtype = dtype
    c = config
    d = c.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # Each part is built by tracing.apart: under nnx.eval_shape or jax.jit,
    # in a trace of its own (linear, not quadratic, in the depth), drawing
    # the same keys in the same order.
    part = lambda make: tracing.apart(make)(rngs)
    self.x_embedder = part(
      lambda r: layers.PatchEmbed(c.patch_size, c.in_channels, d, rngs=r, **kw)
    )
    self.t_embedder = part(
      lambda r: layers.TimestepEmbedder(
        d, init=layers.normal(0.02), rngs=r, **kw
      )
    )
    # The official init (``TiM.initialize_weights``) leaves the delta embedder
    # at Xavier.
    self.delta_embedder = (
      part(lambda r: layers.TimestepEmbedder(d, rngs=r, **kw))
      if c.use_new_embed
      else None
    )
    if c.kind == "c2i":
      self.y_embedder = part(
        lambda r: layers.LabelEmbedder(c.num_label_rows, d, rngs=r, **kw)
      )
    else:
      self.y_embedder = part(
        lambda r: layers.CaptionEmbedder(c.cap_feat_dim, d, rngs=r, **kw)
      )
    block = lambda r: layers.TiMBlock(
      d,
      c.num_heads,
      cross=c.kind == "t2i",
      mlp_ratio=c.mlp_ratio,
      lora_hidden_size=c.lora_hidden_size,
      qk_norm=c.qk_norm,
      distance_aware=c.distance_aware,
      attention_impl=c.attention_impl,
      rngs=r,
      **kw,
    )
    if c.scan_blocks:
      # One block's parameters stacked `depth` times on a leading axis
      # (logical name "layers"), each layer initialised from its own key.
      @nnx.split_rngs(splits=c.depth)
      @nnx.vmap(
        in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
      )
      def stacked(r):
        return block(r)

      self.blocks = part(stacked)
    else:
      # One builder for all blocks: JAX traces it once.
      build_block = tracing.apart(block)
      self.blocks = nnx.List([build_block(rngs) for _ in range(c.depth)])
    self.projector = (
      part(
        lambda r: layers.Projector(d, c.projector_dim, c.z_dim, rngs=r, **kw)
      )
      if c.use_projector
      else None
    )
    self.final_layer = part(
      lambda r: layers.FinalLayer(d, c.patch_size, c.in_channels, rngs=r, **kw)
    )

  def _delta_embed(self, t, r):
    c = self.config.new_condition
    delta = self.delta_embedder or self.t_embedder
    if c == "t-r":
      return delta(t - r)
    if c == "r":
      return delta(r)
    if c == "t,r":
      return self.t_embedder(t) + delta(r)
    if c == "t,t-r":
      return self.t_embedder(t) + delta(t - r)
    if c == "r,t-r":
      return self.t_embedder(r) + delta(t - r)
    return self.t_embedder(t) + self.t_embedder(r) + delta(t - r)

  def _check_inputs(self, x, t, r, y):
    c = self.config
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(
        f"x must be (B, H, W, {c.in_channels}) (NHWC), got {x.shape}"
      )
    h, w = x.shape[1:3]
    if h % c.patch_size or w % c.patch_size:
      raise ValueError(
        f"image size {h}x{w} is not divisible by the patch size {c.patch_size}"
      )
    b = x.shape[0]
    for name, v in (("t", t), ("r", r)):
      if jnp.shape(v) != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {jnp.shape(v)}")
    if c.kind == "c2i":
      if jnp.shape(y) != (b,):
        raise ValueError(
          f"class labels must have shape ({b},), got {jnp.shape(y)}"
        )
    else:
      feats, mask = caption_parts(y)
      if (
        jnp.ndim(feats) != 3
        or jnp.shape(feats)[0] != b
        or (jnp.shape(feats)[-1] != c.cap_feat_dim)
      ):
        raise ValueError(
          f"caption features must be ({b}, M, "
          f"{c.cap_feat_dim}), got {jnp.shape(feats)}"
        )
      if mask is not None and jnp.shape(y["length"]) != (b,):
        raise ValueError(
          f"caption length must have shape ({b},), got {jnp.shape(y['length'])}"
        )

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    r: jax.Array,
    y: jax.Array | dict[str, jax.Array],
    *,
    return_projection: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array | None]:
    self._check_inputs(x, t, r, y)
    c = self.config
    _, height, width, _ = x.shape
    gh, gw = height // c.patch_size, width // c.patch_size
    # Tokens (B, N, D): rows over the batch axes (see
    # tim_jax.core.sharding.activation_sharding).
    x = constrain(x, "batch", None, None, None)
    u = constrain(self.x_embedder(x.astype(self.dtype)), "batch", None, None)

    e_t = self.t_embedder(t)[:, None]
    e_delta = self._delta_embed(t, r)[:, None]
    cond = e_t + e_delta
    caption = caption_mask = None
    if c.kind == "c2i":
      cond = cond + self.y_embedder(y)[:, None]
    else:
      feats, caption_mask = caption_parts(y)
      caption = constrain(self.y_embedder(feats), "batch", None, None)
    cond = cond.astype(self.dtype)
    e_delta = e_delta.astype(self.dtype)
    cos, sin = layers.rope_tables(
      gh, gw, c.hidden_size // c.num_heads, c.rope_positions
    )

    policy = c.remat_policy

    def apply(blk, u_):
      return constrain(
        blk(u_, cond, cos, sin, e_delta, caption, caption_mask),
        "batch",
        None,
        None,
      )

    def run(blk, u_):
      if policy == "none":
        return apply(blk, u_)
      # jax.checkpoint on the block as a pure function of its state, rather
      # than nnx.remat: the model is also called under plain jax.vmap, where
      # nnx's lifted remat refuses the Params of the outer trace.
      graph, state = nnx.split(blk)
      pure = lambda st, x_: apply(nnx.merge(graph, st), x_)
      kw = (
        {"policy": jax.checkpoint_policies.dots_saveable}
        if policy == "dots_saveable"
        else {}
      )
      return jax.checkpoint(pure, **kw)(state, u_)

    proj = None
    want_proj = return_projection and self.projector is not None
    if c.scan_blocks:
      graph, state = nnx.split(self.blocks)

      def scan(st, u_):
        def body(carry, layer_state):
          return run(nnx.merge(graph, layer_state), carry), None

        return jax.lax.scan(body, u_, st)[0]

      if want_proj:
        first = jax.tree.map(lambda a: a[: c.encoder_depth], state)
        rest = jax.tree.map(lambda a: a[c.encoder_depth :], state)
        u = scan(first, u)
        proj = self.projector(u)
        if c.encoder_depth < c.depth:
          u = scan(rest, u)
      else:
        u = scan(state, u)
    else:
      for i, block in enumerate(self.blocks):
        u = run(block, u)
        if want_proj and i + 1 == c.encoder_depth:
          proj = self.projector(u)

    out = self.final_layer(u, cond)
    out = rearrange(
      out,
      "b (h w) (p q c) -> b (h p) (w q) c",
      h=gh,
      w=gw,
      p=c.patch_size,
      q=c.patch_size,
    )
    if return_projection:
      return out, proj
    return out
