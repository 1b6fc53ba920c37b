"""The Gemma-3 text decoder in Flax NNX: the official T2I caption encoder.

The official T2I code (``tim/models/utils/text_encoders.py``) loads
``google/gemma-3-1b-it`` with ``AutoModelForCausalLM(...).get_decoder()``
(no LM head) in bfloat16 with FlashAttention-2, tokenises captions with
right padding to 256 tokens (BOS first, truncated), and takes
``last_hidden_state`` (after the final RMSNorm) as the features. The
trainers then cut the batch to its longest caption and give TiM the
features without a mask. This module computes the same:

* layers alternate sliding-window (local RoPE base) and global attention
  (``layer_types`` or every ``sliding_window_pattern``-th layer global),
  grouped-query attention with q/k RMSNorm, scaling
  ``query_pre_attn_scalar ** -0.5``, causal masks;
* every RMSNorm multiplies by ``(1 + w)``; the embedding is scaled by
  ``sqrt(hidden_size)`` rounded to the weights' dtype (34.0 in bfloat16);
* the MLP is GeGLU with the tanh GELU;
* pad positions: FlashAttention-2 drops padded query rows before attention
  and puts zeros back, so a pad row's attention output is exactly zero (its
  residual stream still goes through the MLPs). Eager attention would
  instead let pad rows attend to the real tokens; we follow the official
  (FlashAttention-2) behaviour.

    enc = gemma.load("gemma-3-1b-it")
    features, lengths = enc.encode(["a cat", "a red bus at night"])
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core import hub, numerics, paths, tracing
from tim_jax.core.errors import UserError
from tim_jax.encoders import batch_rows, layer_kwargs
from tim_jax.weights import torch_weights

if TYPE_CHECKING:
  from jax.typing import DTypeLike
  import tokenizers

MAX_LENGTH = 256  # The official max_seq_length.
# What a hub id's download fetches (not tokenizer.model: tokenizer.json
# is read).
HUB_FILES = ("*.json", "*.safetensors")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """``Gemma3TextConfig`` fields that shape the network (``ONE_B``: the
  1B model's values)."""

  # Sizes.
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  # Attention: grouped-query heads, q/k norms, the logit scale.
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  rms_norm_eps: float
  # Local (sliding-window) and global layers and their RoPE bases.
  layer_types: tuple[str, ...]
  sliding_window: int
  rope_local_base_freq: float
  rope_theta: float
  rope_scaling_factor: float = 1.0  # linear scaling of the global RoPE

  @classmethod
  def from_json(cls, cfg: dict) -> GemmaConfig:
    """From a ``config.json`` dict; fields it lacks take the 1B values."""
    cfg = dict(cfg.get("text_config", cfg))
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = dataclasses.asdict(ONE_B)
    kw.update({k: v for k, v in cfg.items() if k in fields and v is not None})
    n = int(kw["num_hidden_layers"])
    types = cfg.get("layer_types")
    if not types:
      pattern = int(cfg.get("sliding_window_pattern", 6))
      types = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(n)
      ]
    kw["layer_types"] = tuple(types)
    scaling = cfg.get("rope_scaling") or {}
    if scaling:
      if scaling.get("rope_type", scaling.get("type")) != "linear":
        raise UserError(
          f"rope_scaling {scaling} is not supported (linear only)"
        )
      kw["rope_scaling_factor"] = float(scaling["factor"])
    return cls(**kw)


ONE_B = GemmaConfig(
  vocab_size=262144,
  hidden_size=1152,
  intermediate_size=6912,
  num_hidden_layers=26,
  num_attention_heads=4,
  num_key_value_heads=1,
  head_dim=256,
  query_pre_attn_scalar=256.0,
  rms_norm_eps=1e-6,
  layer_types=tuple(
    "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
    for i in range(26)
  ),
  sliding_window=512,
  rope_local_base_freq=10_000.0,
  rope_theta=1e6,
)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32,
  cast back to the input dtype."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def _rope(x, positions, base: float, scaling: float):
  """HF's rotate-half RoPE on (B, L, H, D) with integer positions (B, L)."""
  d = x.shape[-1]
  inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  inv = inv / scaling
  ang = positions.astype(jnp.float32)[..., None] * inv  # (B, L, D/2)
  emb = jnp.concatenate([ang, ang], -1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = d // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rot * sin


class Attention(nnx.Module):
  def __init__(self, c: GemmaConfig, local: bool, kw):
    h, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.c, self.local = c, local
    self.q_proj = nnx.Linear(c.hidden_size, h * d, use_bias=False, **kw)
    self.k_proj = nnx.Linear(c.hidden_size, kv * d, use_bias=False, **kw)
    self.v_proj = nnx.Linear(c.hidden_size, kv * d, use_bias=False, **kw)
    self.o_proj = nnx.Linear(h * d, c.hidden_size, use_bias=False, **kw)
    self.q_norm = RMSNorm(d, c.rms_norm_eps, kw["param_dtype"])
    self.k_norm = RMSNorm(d, c.rms_norm_eps, kw["param_dtype"])

  def __call__(
    self, x: jax.Array, positions: jax.Array, valid: jax.Array
  ) -> jax.Array:
    c = self.c
    b, n, _ = x.shape
    h, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = self.q_norm(batch_rows(self.q_proj(x)).reshape(b, n, h, d))
    k = self.k_norm(batch_rows(self.k_proj(x)).reshape(b, n, kv, d))
    v = batch_rows(self.v_proj(x)).reshape(b, n, kv, d)
    base = c.rope_local_base_freq if self.local else c.rope_theta
    scaling = 1.0 if self.local else c.rope_scaling_factor
    q, k = (
      _rope(q, positions, base, scaling),
      _rope(k, positions, base, scaling),
    )
    i = jnp.arange(n)
    mask = i[None, :] <= i[:, None]  # causal (query, key)
    if self.local:
      mask = mask & (i[:, None] - i[None, :] < c.sliding_window)
    mask = mask[None, None] & valid[:, None, None, :]  # pad keys hidden
    out = numerics.dot_product_attention(
      q, k, v, mask=mask, scale=c.query_pre_attn_scalar**-0.5
    )
    # FlashAttention-2's unpadding: pad query rows get a zero output.
    out = jnp.where(valid[:, :, None, None], out, 0).astype(x.dtype)
    return self.o_proj(batch_rows(out.reshape(b, n, h * d)))


class MLP(nnx.Module):
  def __init__(self, c: GemmaConfig, kw):
    self.gate_proj = nnx.Linear(
      c.hidden_size, c.intermediate_size, use_bias=False, **kw
    )
    self.up_proj = nnx.Linear(
      c.hidden_size, c.intermediate_size, use_bias=False, **kw
    )
    self.down_proj = nnx.Linear(
      c.intermediate_size, c.hidden_size, use_bias=False, **kw
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.gelu(
      batch_rows(self.gate_proj(x)), approximate=True
    ) * batch_rows(self.up_proj(x))
    return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
  def __init__(self, c: GemmaConfig, local: bool, kw):
    p, eps = kw["param_dtype"], c.rms_norm_eps
    self.input_layernorm = RMSNorm(c.hidden_size, eps, p)
    self.self_attn = Attention(c, local, kw)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, eps, p)
    self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, eps, p)
    self.mlp = MLP(c, kw)
    self.post_feedforward_layernorm = RMSNorm(c.hidden_size, eps, p)

  def __call__(
    self, x: jax.Array, positions: jax.Array, valid: jax.Array
  ) -> jax.Array:
    h = self.self_attn(self.input_layernorm(x), positions, valid)
    x = x + self.post_attention_layernorm(h)
    h = self.mlp(self.pre_feedforward_layernorm(x))
    return x + self.post_feedforward_layernorm(h)


class Embedding(nnx.Module):
  def __init__(self, c: GemmaConfig, param_dtype):
    self.weight = nnx.Param(
      jnp.zeros((c.vocab_size, c.hidden_size), param_dtype)
    )


class Gemma3TextModel(nnx.Module):
  """``model(ids, valid)`` -> ``last_hidden_state`` (B, L, hidden)."""

  def __init__(
    self,
    c: GemmaConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    precision="highest",
    rngs=None,
  ):
    kw = layer_kwargs(dtype, param_dtype, precision, rngs)
    self.c, self.dtype = c, dtype
    self.embed_tokens = Embedding(c, param_dtype)
    # Layers built apart under a trace (tim_jax.core.tracing), one builder
    # (one trace) per kind of layer.
    build = {
      local: tracing.apart(
        lambda r, local=local: DecoderLayer(c, local, dict(kw, rngs=r))
      )
      for local in (False, True)
    }
    self.layers = nnx.List(
      [build[t == "sliding_attention"](kw["rngs"]) for t in c.layer_types]
    )
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Scaled token embeddings. The scale is rounded to the embedding's
    dtype, as HF's ``Gemma3TextScaledWordEmbedding`` does (34.0, not
    33.94, in bfloat16)."""
    table = self.embed_tokens.weight[...]
    scale = jnp.asarray(math.sqrt(self.c.hidden_size), table.dtype)
    return (jnp.take(table, ids, axis=0) * scale).astype(self.dtype)

  def __call__(self, ids: jax.Array, valid: jax.Array) -> jax.Array:
    x = batch_rows(self.embed(ids))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    for layer in self.layers:
      x = batch_rows(layer(x, positions, valid))
    return self.norm(x)


class GemmaEncoder:
  """Captions -> the features the official T2I pipeline gives TiM.

  ``encode(prompts)`` -> (features (B, L, hidden) float32, lengths (B,)),
  L = the longest caption in the batch (BOS included), as the trainers cut
  it; ``encode_padded(prompts)`` keeps all ``max_length`` positions (pads
  included) for static shapes."""

  def __init__(
    self, model: Gemma3TextModel, tokenizer, *, max_length: int = MAX_LENGTH
  ):
    self.config = model.c
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.graphdef, self.params = nnx.split(model)
    self._forward = jax.jit(self.apply)
    null_ids, null_mask = self.tokenize([""])
    # The empty caption (the official null prompt): BOS, then pads.
    self.null_ids, self.null_mask = null_ids[0], null_mask[0]

  def apply(
    self, params: nnx.State, ids: jax.Array, valid: jax.Array
  ) -> jax.Array:
    """The pure forward pass: ``last_hidden_state`` (B, L, hidden) in the
    compute dtype of token ``ids`` (B, L) with ``valid`` (B, L) bool
    marking real tokens. Causal, so cutting ids after the longest caption
    leaves every earlier position's features unchanged."""
    return nnx.merge(self.graphdef, params)(ids, valid)

  @property
  def dim(self) -> int:
    """The feature width (hidden size)."""
    return self.config.hidden_size

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, max_length): BOS first, truncated, right-padded."""
    if isinstance(prompts, str):
      raise ValueError("pass a list of prompts, not one string")
    out = self.tokenizer.encode_batch(list(prompts))
    ids = np.asarray([e.ids for e in out], np.int32)
    mask = np.asarray([e.attention_mask for e in out], np.int32)
    return ids, mask

  def truncated(self, prompts: Sequence[str]) -> list[bool]:
    """Per prompt: whether its tokens run past ``max_length`` (cut)."""
    return [
      bool(e.overflowing) for e in self.tokenizer.encode_batch(list(prompts))
    ]

  def encode_padded(
    self, prompts: Sequence[str]
  ) -> tuple[jax.Array, np.ndarray]:
    """(features (B, max_length, hidden), lengths (B,))."""
    ids, mask = self.tokenize(prompts)
    feats = self._forward(
      self.params, jnp.asarray(ids), jnp.asarray(mask.astype(bool))
    )
    return feats, mask.sum(-1)

  def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, np.ndarray]:
    """(features (B, L, hidden), lengths (B,)), L the longest caption."""
    feats, lengths = self.encode_padded(prompts)
    return feats[:, : int(lengths.max())], lengths


def load_tokenizer(
  directory: str, max_length: int = MAX_LENGTH
) -> tokenizers.Tokenizer:
  """The checkpoint's tokenizer (``tokenizer.json``, through the
  ``tokenizers`` library) set up as the official ``tokenizer(...,
  padding="max_length", truncation=True)``: right padding with the pad
  token, truncation to ``max_length``. ``directory`` may be a hub id."""
  directory = hub.resolve(directory, allow_patterns=HUB_FILES)
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  directory = paths.local_copy(os.fspath(directory))  # gs:// copied once.
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no tokenizer.json in {directory!r} (the "
      "Hugging Face layout of gemma-3-1b-it has one)"
    )
  tok = Tokenizer.from_file(path)
  pad_token, pad_id = "<pad>", tok.token_to_id("<pad>")
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      tc = json.load(f)
    pad = tc.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad and tok.token_to_id(pad) is not None:
      pad_token, pad_id = pad, tok.token_to_id(pad)
  if pad_id is None:
    raise UserError(f"{path} has no <pad> token")
  tok.enable_truncation(max_length=max_length)
  tok.enable_padding(
    direction="right", pad_id=pad_id, pad_token=pad_token, length=max_length
  )
  return tok


def load(
  directory: str,
  *,
  dtype: DTypeLike = jnp.float32,
  param_dtype: DTypeLike | None = None,
  max_length: int = MAX_LENGTH,
) -> GemmaEncoder:
  """A Gemma-3 text encoder from a Hugging Face directory (``config.json``,
  ``model.safetensors``, ``tokenizer.json``). Strict: every decoder weight
  must be there; the LM head (tied to the embedding) is not needed.
  ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``) the
  weights' (the official encoder holds and runs them in bfloat16).
  ``directory`` may be a hub id (``hf://google/gemma-3-1b-it``, a gated
  repository: a token is needed; ``tim_jax.core.hub``)."""
  directory = hub.resolve(directory, allow_patterns=HUB_FILES)
  if paths.is_remote(directory) and paths.as_path(directory).is_dir():
    directory = paths.local_copy(directory)  # gs:// copied once.
  if not os.path.isdir(os.fspath(directory)):
    raise FileNotFoundError(
      f"text encoder directory {directory!r} does not "
      "exist (a Hugging Face download of "
      "google/gemma-3-1b-it)"
    )
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  with open(cfg_path, encoding="utf-8") as f:
    try:
      c = GemmaConfig.from_json(json.load(f))
    except (UserError, json.JSONDecodeError) as e:
      raise UserError(f"{cfg_path}: {e}") from None
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors weights in {directory!r}")
  sd = {}
  for f in files:
    sd.update(torch_weights.read(os.path.join(directory, f)))
  # Accept the CausalLM layout ("model." prefix, done by torch_weights) and
  # the multimodal one ("language_model.model.").
  sd = {
    (
      k[len("language_model.model.") :]
      if k.startswith("language_model.model.")
      else k
    ): v
    for k, v in sd.items()
  }
  sd = {k: v for k, v in sd.items() if not k.startswith("lm_head")}
  param_dtype = dtype if param_dtype is None else param_dtype
  model = nnx.eval_shape(
    lambda: Gemma3TextModel(c, dtype=dtype, param_dtype=param_dtype)
  )
  torch_weights.load_module(model, sd, f"Gemma-3 text model of {directory}")
  return GemmaEncoder(
    model, load_tokenizer(directory, max_length), max_length=max_length
  )


class _EmptyCaptionTokenizer:
  """Tokenises every caption as the empty one (BOS, then pads): enough for
  an encoder that is only compiled, never run."""

  def __init__(self, max_length: int, bos_id: int = 2, pad_id: int = 0):
    self.max_length, self.bos_id, self.pad_id = max_length, bos_id, pad_id

  def encode_batch(self, texts):
    out = []
    for _ in texts:
      ids = [self.bos_id] + [self.pad_id] * (self.max_length - 1)
      mask = [1] + [0] * (self.max_length - 1)
      out.append(type("Encoding", (), dict(ids=ids, attention_mask=mask)))
    return out


def abstract_encoder(
  c: GemmaConfig = ONE_B,
  *,
  dtype: DTypeLike = jnp.bfloat16,
  max_length: int = MAX_LENGTH,
) -> GemmaEncoder:
  """An encoder of ``c``'s architecture holding shapes only (parameters as
  ``jax.ShapeDtypeStruct``): for compiling train steps for devices this host
  does not have (``tim_jax.commands.compile``). It cannot encode real captions."""
  model = nnx.eval_shape(
    lambda: Gemma3TextModel(c, dtype=dtype, param_dtype=dtype)
  )
  return GemmaEncoder(
    model, _EmptyCaptionTokenizer(max_length), max_length=max_length
  )
