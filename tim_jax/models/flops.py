"""Model FLOPs of the TiM backbone and of the steps built on it, for MFU.

These are *model FLOPs* in the sense of MFU (model FLOPs utilisation): the
arithmetic the model needs, counted from the architecture alone, independent
of how a compiler or a remat policy executes it. A multiply-add counts as 2
FLOPs (so the numbers are twice the "GFLOPs" of the DiT paper, which counts
multiply-adds as one, as fvcore does: DiT-XL/2 at 256 px is 118.6 G
multiply-adds, ~237 GFLOPs here).

What is counted, per forward pass of ``models.TiM(config)`` on x (B, H, W, C)
with N = (H/p)(W/p) tokens and hidden size D:

* every matrix product: the patch-embedding convolution, the timestep MLPs,
  the caption embedder (t2i), q/k/v and output projections, the SwiGLU MLPs,
  the adaLN modulation SwiGLUs, the final linear and (optionally) the REPA
  projector;
* the attention products QK^T and AV (2·N·T·D each per sample, T the number
  of keys);
* the conditioning paths at their true size: the timestep embedders, the
  adaLN modulations and ``qkv_d`` act on one vector per sample, (B, 1, D),
  not on every token; the label embedding is a gather (0 FLOPs);
* identical timestep-embedder calls (``t_embedder(t)`` appears in several
  ``new_condition`` forms) once, as XLA's CSE runs them once.

What is not counted: elementwise work (LayerNorm, RoPE, softmax, SiLU, gates,
residual adds, biases). It is not "model FLOPs" by the usual MFU convention
and its share falls as ~4/D, so XLA's count of the compiled forward reads a
few percent above ours at toy widths and well under 1 % above at the
paper's D = 1152 (``tests/test_flops.py`` holds the two within 10 %). Nor
is RoPE's pair swap, which runs as a product with a signed permutation
matrix (exact; it keeps TPU layouts lane-friendly) that XLA counts as 2 hd
FLOPs per element of q and k: hd / (6 D) more.

Steps (``step_flops``): the backward pass is counted as 2x the forward (the
standard "6N" rule: forward 2N, backward 4N per token for N parameters), so a
gradient step costs 3 forwards. This slightly over-counts (no input gradient
is needed for the patch embedding or the time features), by well under 1 %.

Reading XLA's own count instead (``compiled.cost_analysis()["flops"]``)
needs care: XLA costs a ``while`` loop (``lax.scan``, e.g. the sampler's
steps) as ONE pass of its body, whatever the trip count, and a
``conditional`` (``lax.cond``, the sampler's guided/plain step) as the
larger of its branches. The compiled 4-step sampler with 2 guided steps
thus reports ~2 F, not 6 F; ``step_flops(step="sample")`` gives the real
cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tim_jax.core.errors import UserError
from tim_jax.models import layers
from tim_jax.models.tim import TiMConfig

if TYPE_CHECKING:
  import jax

STEPS = ("forward", "fm_step", "tim_dde_step", "tim_jvp_step", "sample")
COMPONENTS = (
  "patch_embed",
  "embedders",
  "self_attention",
  "cross_attention",
  "mlp",
  "adaln",
  "final",
  "projector",
)


def _mm(rows, din, dout):
  """A (rows, din) x (din, dout) product: 2 FLOPs per multiply-add."""
  return 2.0 * rows * din * dout


def _swiglu(rows, din, hidden, dout):
  """fc1_g and fc1_x (din -> hidden) and fc2 (hidden -> dout)."""
  return 2 * _mm(rows, din, hidden) + _mm(rows, hidden, dout)


def _num_tokens(config: TiMConfig, height: int, width: int) -> int:
  p = config.patch_size
  if height % p or width % p:
    raise UserError(
      f"image size {height}x{width} is not divisible by the patch size {p}"
    )
  return (height // p) * (width // p)


def _timestep_calls(config: TiMConfig) -> int:
  """Distinct (embedder, argument) pairs the forward evaluates.

  ``TiM.__call__`` always runs ``t_embedder(t)``; ``_delta_embed`` adds the
  terms of ``new_condition``, the delta term through ``delta_embedder`` (or
  ``t_embedder`` without ``use_new_embed``). Repeats of ``t_embedder(t)`` are
  one computation after CSE.
  """
  delta = "delta" if config.use_new_embed else "t"
  calls = {("t", "t")}
  terms = {
    "t-r": [(delta, "t-r")],
    "r": [(delta, "r")],
    "t,r": [("t", "t"), (delta, "r")],
    "t,t-r": [("t", "t"), (delta, "t-r")],
    "r,t-r": [("t", "r"), (delta, "t-r")],
    "t,r,t-r": [("t", "t"), ("t", "r"), (delta, "t-r")],
  }[config.new_condition]
  calls.update(terms)
  return len(calls)


def _t_independent(config: TiMConfig, batch: int, caption_len: int) -> float:
  """Work that does not depend on (x_t, t): a DDE pass shares it between
  t + eps and t - eps (XLA computes it once for the two calls) and a JVP
  has no tangent for it.

  * t2i: the caption embedder and the cross-attention k/v of every block;
  * timestep MLPs of r alone (the "r" terms of ``new_condition``), and with
    ``new_condition="r"`` also ``qkv_d`` of every block (e_delta = f(r)).
  """
  c, d = config, config.hidden_size
  out = 0.0
  if c.kind == "t2i" and caption_len:
    m = batch * caption_len
    out += _swiglu(m, c.cap_feat_dim, 4 * d, d)
    out += c.depth * _mm(m, d, 2 * d)
  if "r" in c.new_condition.split(","):
    freq = layers.TimestepEmbedder.freq_dim
    out += _mm(batch, freq, d) + _mm(batch, d, d)
    if c.new_condition == "r" and c.distance_aware:
      out += c.depth * _mm(batch, d, 3 * d)
  return out


def forward_flops(
  config: TiMConfig,
  batch: int,
  height: int,
  width: int,
  caption_len: int = 0,
  *,
  projection: bool = False,
) -> dict[str, float]:
  """Model FLOPs of one forward pass of ``TiM(config)``, by component.

  Args:
    config: the architecture.
    batch, height, width: x is (batch, height, width, in_channels).
    caption_len: M, the caption tokens of a t2i model (ignored for c2i).
    projection: the forward also returns the REPA projection
      (``return_projection=True`` with ``use_projector``).

  Returns:
    FLOPs (multiply-add = 2) under the keys ``patch_embed``, ``embedders``,
    ``self_attention``, ``cross_attention``, ``mlp``, ``adaln``, ``final``,
    ``projector`` and ``total``.
  """
  c = config
  b, d, p = batch, c.hidden_size, c.patch_size
  n = _num_tokens(c, height, width)
  bn = b * n
  t2i = c.kind == "t2i"
  m = caption_len if t2i else 0
  blocks = c.depth

  out = dict.fromkeys(COMPONENTS, 0.0)
  # Conv with kernel = stride = p: each token is a (p p C) x D product.
  out["patch_embed"] = _mm(bn, p * p * c.in_channels, d)

  freq = layers.TimestepEmbedder.freq_dim
  embed = _timestep_calls(c) * (_mm(b, freq, d) + _mm(b, d, d))
  if t2i and m:
    embed += _swiglu(b * m, c.cap_feat_dim, 4 * d, d)
  out["embedders"] = embed  # Labels: a gather, 0 FLOPs.

  sa = _mm(bn, d, 3 * d)  # qkv over the tokens
  if c.distance_aware:
    sa += _mm(b, d, 3 * d)  # qkv_d on e_delta (B, 1, D)
  sa += 2 * (2.0 * b * n * n * d)  # QK^T and AV, all heads
  sa += _mm(bn, d, d)  # proj
  out["self_attention"] = blocks * sa

  if t2i:
    ca = _mm(bn, d, d)  # q
    ca += _mm(b * m, d, 2 * d)  # kv over the caption
    ca += 2 * (2.0 * b * n * m * d)  # scores and values
    ca += _mm(bn, d, d)  # proj
    out["cross_attention"] = blocks * ca

  out["mlp"] = blocks * _swiglu(bn, d, layers.mlp_hidden(d, c.mlp_ratio), d)

  k = c.lora_hidden_size if c.lora_hidden_size is not None else (d // 4) * 3
  out["adaln"] = blocks * _swiglu(b, d, k, (9 if t2i else 6) * d) + _swiglu(
    b, d, d // 2, 2 * d
  )  # + the final layer's
  out["final"] = _mm(bn, d, p * p * c.in_channels)
  if projection and c.use_projector:
    h = c.projector_dim
    out["projector"] = _mm(bn, d, h) + _mm(bn, h, h) + _mm(bn, h, c.z_dim)
  out["total"] = sum(out[key] for key in COMPONENTS)
  return out


def _derivative_rows(batch: int, diffusion_share: float) -> int:
  """Rows that need dF/dt: B - round(share * B) (round-half-even, as
  ``transition.LossConfig.counts`` with one group)."""
  if not 0.0 <= diffusion_share <= 1.0:
    raise ValueError(
      f"diffusion_share must lie in [0, 1], got {diffusion_share}"
    )
  return batch - round(diffusion_share * batch)


def dde_flops(
  config: TiMConfig, rows: int, height: int, width: int, caption_len: int = 0
) -> float:
  """The DDE derivative over ``rows`` rows: two forwards (t ± eps), two
  calls; the work that does not depend on t (caption embedder and
  cross-attention k/v for t2i; r-only embeddings) runs once:
  2 F(rows) - t-independent(rows). For c2i with ``new_condition="t-r"`` that
  is exactly 2 F(rows)."""
  if rows == 0:
    return 0.0
  f = forward_flops(config, rows, height, width, caption_len)["total"]
  return 2 * f - _t_independent(config, rows, caption_len)


def jvp_flops(
  config: TiMConfig, rows: int, height: int, width: int, caption_len: int = 0
) -> float:
  """A forward-mode JVP over ``rows`` rows, tangents on (x_t, t).

  Model: primal + tangent (``jax.jvp`` linearises every op; weights and
  the conditioning are closed over, so their tangents are symbolic zeros).

  * a product with a weight costs the product again in the tangent
    (W dx);
  * a product of two activations that both carry tangents — QK^T and AV of
    self-attention — costs it twice (dQ K^T + Q dK^T);
  * cross-attention scores and values have one tangent operand (q, the
    weights): once;
  * t-independent work (caption embedder, cross k/v, r-only embeddings) has
    no tangent;
  * the primal output is discarded, so the primal final linear is dead code
    (XLA removes it).

  JVP = 2 F + (self-attention products) - (t-independent) - (final linear):
  ~2 forwards for c2i (2.07 F at N = 64, D = 128, where XLA's own count
  reads 2.07 F too), below 2 for short t2i sequences with long captions
  (1.85 F at N = 16, M = 8, D = 128; XLA: 1.85 F).
  """
  if rows == 0:
    return 0.0
  f = forward_flops(config, rows, height, width, caption_len)
  n = _num_tokens(config, height, width)
  sa_products = config.depth * 2 * (2.0 * rows * n * n * config.hidden_size)
  return (
    2 * f["total"]
    + sa_products
    - _t_independent(config, rows, caption_len)
    - f["final"]
  )


def step_flops(
  config: TiMConfig,
  batch: int,
  height: int,
  width: int,
  caption_len: int = 0,
  *,
  step: str,
  diffusion_share: float = 0.5,
  num_steps: int = 1,
  guided_steps: int = 0,
  projection: bool = False,
) -> float:
  """Model FLOPs of one training step or one sampling run.

  The backward pass counts as 2x the forward (the standard 6N rule), so a
  gradient step over the full batch is 3 forwards.

  step:
    ``"forward"``: one forward of the batch.
    ``"fm_step"``: a flow-matching step, forward + backward = 3 F(B).
    ``"tim_dde_step"``: ``transition.loss`` with the DDE derivative:
      3 F(B) plus the target's two forwards (t ± eps) over the derivative
      rows, B_d = B - round(diffusion_share B); the work that does not
      depend on t (t2i caption embedder and cross k/v, r-only embeddings) is
      shared by the two (XLA computes it once): ``dde_flops`` = 2 F(B_d) - that work.
    ``"tim_jvp_step"``: 3 F(B) plus one JVP over B_d rows (``jvp_flops``:
      ~2 F(B_d): primal + tangent; self-attention's QK^T and AV cost twice in
      the tangent, t-independent work has no tangent, the primal output
      layer is dead). The matmuls of XLA's compiled JVP match this model
      one for one; its total differs only by the elementwise share.
    ``"sample"``: ``num_steps`` forwards of the batch, of which
      ``guided_steps`` run on the doubled (cond + uncond) batch:
      (num_steps + guided_steps) F(B).

  ``projection``: the training forward also computes the REPA projection
  (the target's passes discard it, so it is dead code there).
  """
  if step not in STEPS:
    raise ValueError(f"step must be one of {STEPS}, got {step!r}")
  f = forward_flops(
    config, batch, height, width, caption_len, projection=projection
  )["total"]
  if step == "forward":
    return f
  if step == "fm_step":
    return 3 * f
  if step == "sample":
    if not 0 <= guided_steps <= num_steps:
      raise ValueError(
        f"guided_steps={guided_steps} must lie in [0, num_steps={num_steps}]"
      )
    plain = forward_flops(config, batch, height, width, caption_len)["total"]
    return (num_steps + guided_steps) * plain
  rows = _derivative_rows(batch, diffusion_share)
  if step == "tim_dde_step":
    return 3 * f + dde_flops(config, rows, height, width, caption_len)
  return 3 * f + jvp_flops(config, rows, height, width, caption_len)


def repa_teacher_flops(
  *,
  embed_dim: int,
  depth: int,
  mlp_hidden: int,
  patch_size: int,
  num_skip: int,
  table: tuple[int, int],
  batch: int,
  grid: tuple[int, int],
  image_hw: tuple[int, int],
) -> float:
  """FLOPs of the REPA teacher (``tim_jax.encoders.radio``) on ``batch``
  images of ``image_hw`` pixels at a TiM token ``grid`` (h, w): the two
  separable bicubic resizes to 16 x the grid, the CPE table's resize, the
  patch embedding, and per block q/k/v, QK^T, AV, the output projection and
  the MLP (no backward: the teacher is frozen)."""
  h, w = grid
  hin, win = image_hw
  hout, wout = patch_size * h, patch_size * w
  rows, cols = table
  patches = h * w
  tokens = patches + num_skip
  d = embed_dim
  resize = batch * (_mm(hout, hin, win * 3) + _mm(wout, win, hout * 3))
  side = max(h, w)
  table_resize = 0.0
  if (rows, cols) != (h, w):
    table_resize = _mm(side, rows, cols * d) + _mm(side, cols, side * d)
  block = (
    _mm(tokens, d, 3 * d)
    + 2 * _mm(tokens, d, tokens)
    + _mm(tokens, d, d)
    + _mm(tokens, d, mlp_hidden)
    + _mm(tokens, mlp_hidden, d)
  )
  return (
    resize
    + table_resize
    + batch * _mm(patches, 3 * patch_size**2, d)
    + batch * depth * block
  )


# Dense bf16 peak FLOP/s per chip, by substring of device_kind.
PEAK_BF16 = (
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
  ("A100", 312e12),
  ("H100", 989e12),
  ("H200", 989e12),
)


def peak_flops(device: jax.Device) -> float | None:
  """The device's peak bf16 FLOP/s, or None for a device kind not in the table."""
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_BF16:
    if key in kind:
      return value
  return None
