"""What the network is conditioned on, and its null value for guidance.

A conditioner turns a data batch into the network's ``y`` (class labels or
caption features), gives the null ``y`` for classifier-free guidance, and
drops conditioning to null with the configured probability during training
(the official trainers do this before the network, not inside it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from jax.typing import ArrayLike


class LabelConditioner:
  """Integer class labels; the null class is ``num_classes``."""

  def __init__(self, num_classes: int, drop_prob: float = 0.1):
    self.num_classes = num_classes
    self.drop_prob = drop_prob

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    if "label" not in batch:
      raise UserError(
        f"a class-conditional model needs 'label' in the batch;"
        f" it has {sorted(batch)}: is data.data_dir a dataset of"
        " captions?"
      )
    return batch["label"].astype(jnp.int32)

  def null(self, batch_size: int) -> jax.Array:
    """The null class for a batch."""
    return jnp.full((batch_size,), self.num_classes, jnp.int32)

  def null_like(
    self, y: jax.Array, frozen: Mapping[str, Any] | None = None
  ) -> jax.Array:
    """The null class matching ``y``'s batch."""
    del frozen
    return self.null(jnp.shape(y)[0])

  def drop(self, key: jax.Array, y: jax.Array) -> jax.Array:
    """Replaces each label by the null class with probability ``drop_prob``."""
    if self.drop_prob <= 0:
      return y
    keep = jax.random.uniform(key, y.shape) >= self.drop_prob
    return jnp.where(keep, y, self.num_classes)

  def training_conditions(
    self,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    frozen: Mapping[str, Any] | None = None,
    drop: bool = True,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y with conditions dropped to null for guidance, y undropped, null
    y), as the train step needs them."""
    del frozen
    y_true = self(batch)
    y = self.drop(key, y_true) if drop else y_true
    return y, y_true, self.null_like(y)

  def from_labels(self, labels: Sequence[int]) -> jax.Array:
    """Requested classes; the null class is not one (use ``null``)."""
    labels = np.asarray(labels)
    bad = [
      int(l) for l in labels.reshape(-1) if not 0 <= int(l) < self.num_classes
    ]
    if labels.ndim != 1 or not labels.size or bad:
      raise UserError(
        f"labels must be in [0, {self.num_classes}), got "
        f"{bad or labels.tolist()}"
      )
    return jnp.asarray(labels, jnp.int32)


class CaptionConditioner:
  """Caption features (B, M, D).

  Either the batch holds precomputed ``caption_features`` (latent datasets;
  then ``null_features`` must be given), or it holds ``tokens`` that a frozen
  ``encoder`` turns into features on device.
  """

  kind = "t2i"

  def __init__(
    self,
    encoder=None,
    tokenizer=None,
    drop_prob: float = 0.1,
    null_features: np.ndarray | None = None,
    max_len: int | None = None,
  ):
    if encoder is None and null_features is None:
      raise ValueError(
        "a caption conditioner needs an encoder or the null caption features"
      )
    self.encoder = encoder
    self.tokenizer = tokenizer
    self.drop_prob = drop_prob
    self.max_len = max_len
    self._null = (
      jnp.asarray(null_features, jnp.float32)
      if null_features is not None
      else None
    )

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    if "caption_features" in batch:
      return batch["caption_features"].astype(jnp.float32)
    if "tokens" in batch and self.encoder is not None:
      return self.encoder(batch["tokens"])
    raise UserError(
      "a text-to-image model needs 'tokens' (with a caption "
      "encoder) or 'caption_features' in the batch; it has "
      f"{sorted(batch)}: is data.data_dir a dataset of class labels?"
    )

  def null_single(self) -> jax.Array:
    """The empty caption's features, (1, M, D)."""
    if self._null is not None:
      return self._null.reshape((1,) + self._null.shape[-2:])
    return self.encoder.null_features()

  def null(self, batch_size: int) -> jax.Array:
    """The empty caption's features for a batch."""
    one = self.null_single()
    return jnp.broadcast_to(one, (batch_size,) + one.shape[1:])

  def null_like(
    self, y: jax.Array, frozen: Mapping[str, Any] | None = None
  ) -> jax.Array:
    """The null conditioning matching ``y``'s batch."""
    del frozen
    return self.null(jnp.shape(y)[0])

  def drop(self, key: jax.Array, y: jax.Array) -> jax.Array:
    """Replaces each row by the empty caption with probability ``drop_prob``."""
    if self.drop_prob <= 0:
      return y
    keep = jax.random.uniform(key, (y.shape[0], 1, 1)) >= self.drop_prob
    return jnp.where(keep, y, self.null_single().astype(y.dtype))

  training_conditions = LabelConditioner.training_conditions

  def from_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """The features of prompts; refuses words the tokenizer does not know."""
    if self.tokenizer is None or self.encoder is None:
      raise UserError(
        "this model's captions come as precomputed features; "
        "prompts need a tokenizer and a caption encoder"
      )
    for p in prompts:
      unknown = self.tokenizer.unknown_words(p)
      if unknown:
        raise UserError(
          f"prompt {p!r} has words the model never saw: "
          f"{unknown}; its vocabulary is "
          f"{sorted(self.tokenizer.vocabulary)}"
        )
    from tim_jax.shapes import text  # pylint: disable=g-import-not-at-top

    limit = self.max_len
    for p in prompts:
      words = text.split_words(p)
      if len(words) > limit:
        logging.warning(
          "prompt %r has %d words; the model reads %d: the rest (%r) is "
          "cut off",
          p,
          len(words),
          limit,
          " ".join(words[limit:]),
        )
    tokens = self.tokenizer.encode(list(prompts), self.max_len)
    return self.encoder(jnp.asarray(tokens))


def escape_unicode(text: str) -> str:
  """The official T2I loader's caption transform (``tim/data/t2i_data.py``
  and the GenEval sampler): ``encode('unicode-escape').decode('utf-8')``,
  so non-ASCII letters and newlines reach the tokenizer as escapes."""
  return text.encode("unicode-escape").decode("utf-8")


def length_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest of ``buckets`` (ascending) holding ``length`` tokens."""
  for b in buckets:
    if length <= b:
      return int(b)
  raise ValueError(
    f"{length} tokens exceed the largest caption length bucket {buckets[-1]}"
  )


class TextConditioner:
  """Captions through a frozen text encoder on device (the official T2I
  pipeline's Gemma-3 features, ``tim/models/utils/text_encoders.py``).

  The host tokenises (``tokenize``: BOS first, right-padded, truncated to
  the encoder's ``max_length``) and cuts the batch to the smallest of
  ``length_buckets`` that holds its longest caption, so compiled shapes
  stay few. On device the encoder runs on those tokens (causal attention:
  the cut changes no feature), and the conditioning is ``{"features",
  "length"}`` with every row's ``length`` the batch's longest caption: TiM
  then sees exactly what the official trainer's truncation gives it.

  Guidance dropout replaces a caption by the empty one *before* encoding,
  as the official trainer does; the null conditioning is the empty
  caption's features, cut and masked like the batch it goes with.

  ``frozen`` arguments are the encoder's weights as the train step receives
  them (``Trainer.frozen["text"]``); None uses the encoder's own.
  """

  def __init__(
    self,
    encoder,
    drop_prob: float = 0.1,
    length_buckets: Sequence[int] = (32, 64, 128, 256),
  ):
    self.encoder = encoder
    self.drop_prob = drop_prob
    buckets = sorted(
      {int(b) for b in length_buckets if 0 < int(b) < encoder.max_length}
    )
    self.length_buckets = tuple(buckets) + (int(encoder.max_length),)
    self.null_ids = np.asarray(encoder.null_ids, np.int32)
    self.null_mask = np.asarray(encoder.null_mask, np.int32)
    self._null_cache = {}
    # Jitted once: called eagerly (prompts, the null caption) it would run
    # the encoder op by op; inside the train step's jit it is inlined.
    self._apply = jax.jit(encoder.apply)

  @property
  def dim(self) -> int:
    """The text encoder's feature width."""
    return self.encoder.dim

  # --- host side ---------------------------------------------------------

  def tokenize(self, captions: Sequence[str]) -> dict:
    """``caption_ids`` and ``caption_mask`` (B, max_length) int32."""
    ids, mask = self.encoder.tokenize(list(captions))
    return {
      "caption_ids": ids.astype(np.int32),
      "caption_mask": mask.astype(np.int32),
    }

  def cut(self, batch: dict, longest: int | None = None) -> dict:
    """``batch`` with its caption tokens cut to the length bucket of its
    longest caption (``longest``, when given, is that length over all
    processes of a multi-host batch)."""
    if "caption_mask" not in batch:
      return batch
    mask = np.asarray(batch["caption_mask"])
    if longest is None:
      longest = int(mask.sum(-1).max()) if mask.size else 1
    n = length_bucket(max(int(longest), 1), self.length_buckets)
    out = dict(batch)
    out["caption_ids"] = np.asarray(batch["caption_ids"])[:, :n]
    out["caption_mask"] = mask[:, :n]
    return out

  # --- device side ---------------------------------------------------------

  def _params(self, frozen):
    return self.encoder.params if frozen is None else frozen["text"]

  def encode(
    self,
    ids: ArrayLike,
    mask: ArrayLike,
    frozen: Mapping[str, Any] | None = None,
  ) -> dict[str, jax.Array]:
    """{"features" float32 (B, M, D), "length" (B,)} of tokens (B, M)."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask).astype(bool)
    # Traced inside a step: the encoder's own function, so that it is
    # traced there with the step's activation sharding (jit's cache of
    # self._apply does not see that context and would reuse an eager
    # trace without it, or pin eager calls to the training mesh).
    apply = (
      self.encoder.apply if isinstance(ids, jax.core.Tracer) else self._apply
    )
    feats = apply(self._params(frozen), ids, mask)
    longest = jnp.max(jnp.sum(mask, axis=-1)).astype(jnp.int32)
    return {
      "features": feats.astype(jnp.float32),
      "length": jnp.full((ids.shape[0],), longest, jnp.int32),
    }

  def __call__(
    self,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any] | None = None,
  ) -> dict[str, jax.Array]:
    for key in ("caption_ids", "caption_mask"):
      if key not in batch:
        raise KeyError(
          f"a text-encoder conditioner needs {key!r} in the "
          f"batch; it has {sorted(batch)}"
        )
    return self.encode(batch["caption_ids"], batch["caption_mask"], frozen)

  def drop_captions(
    self, key: jax.Array, batch: Mapping[str, jax.Array]
  ) -> Mapping[str, jax.Array]:
    """``batch`` with each caption replaced by the empty one with
    probability ``drop_prob``."""
    if self.drop_prob <= 0:
      return batch
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    m = ids.shape[1]
    drop = jax.random.uniform(key, (ids.shape[0], 1)) < self.drop_prob
    out = dict(batch)
    out["caption_ids"] = jnp.where(drop, self.null_ids[None, :m], ids)
    out["caption_mask"] = jnp.where(drop, self.null_mask[None, :m], mask)
    return out

  def null_like(
    self, y: Mapping[str, jax.Array], frozen: Mapping[str, Any] | None = None
  ) -> dict[str, jax.Array]:
    """The empty caption's conditioning shaped and masked like ``y``."""
    feats = y["features"]
    b, m = feats.shape[0], feats.shape[1]
    if frozen is None:
      if m not in self._null_cache:
        self._null_cache[m] = self.encode(
          self.null_ids[None, :m], self.null_mask[None, :m]
        )
      one = self._null_cache[m]["features"]
    else:
      one = self.encode(
        self.null_ids[None, :m], self.null_mask[None, :m], frozen
      )["features"]
    return {
      "features": jnp.broadcast_to(one, (b,) + one.shape[1:]),
      "length": y["length"],
    }

  def training_conditions(
    self,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    frozen: Mapping[str, Any] | None = None,
    drop: bool = True,
  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
    """(y with captions dropped for guidance, y undropped, null y)."""
    y_true = self(batch, frozen)
    y = self(self.drop_captions(key, batch), frozen) if drop else y_true
    return y, y_true, self.null_like(y, frozen)

  def from_prompts(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    """The conditioning of ``prompts`` (one batch: every row sees the
    longest prompt's length, as the official samplers give it)."""
    if isinstance(prompts, str) or not len(prompts):
      raise ValueError("pass a non-empty list of prompts")
    for p, cut in zip(prompts, self.encoder.truncated(prompts)):
      if cut:
        logging.warning(
          "prompt %r is longer than the text encoder's %d tokens: its end "
          "is cut off (as in training)",
          p,
          self.encoder.max_length,
        )
    batch = self.cut(self.tokenize(prompts))
    return self.encode(batch["caption_ids"], batch["caption_mask"])
