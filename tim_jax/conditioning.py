"""What the network is conditioned on, and its null value for guidance.

A conditioner turns a data batch into the network's ``y`` (class labels or
caption features), gives the null ``y`` for classifier-free guidance, and
drops conditioning to null with the configured probability during training
(the official trainers do this before the network, not inside it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class LabelConditioner:
  """Integer class labels; the null class is ``num_classes``."""

  def __init__(self, num_classes: int, drop_prob: float = 0.1):
    self.num_classes = num_classes
    self.drop_prob = drop_prob

  def __call__(self, batch):
    if "label" not in batch:
      raise KeyError(f"a class-conditional model needs 'label' in the batch;"
                     f" it has {sorted(batch)}")
    return batch["label"].astype(jnp.int32)

  def null(self, batch_size: int):
    return jnp.full((batch_size,), self.num_classes, jnp.int32)

  def drop(self, key, y):
    if self.drop_prob <= 0:
      return y
    keep = jax.random.uniform(key, y.shape) >= self.drop_prob
    return jnp.where(keep, y, self.num_classes)

  def from_labels(self, labels: Sequence[int]):
    """Requested classes; the null class is not one (use ``null``)."""
    labels = np.asarray(labels)
    bad = [int(l) for l in labels.reshape(-1)
           if not 0 <= int(l) < self.num_classes]
    if labels.ndim != 1 or not labels.size or bad:
      raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                       f"{bad or labels.tolist()}")
    return jnp.asarray(labels, jnp.int32)


class CaptionConditioner:
  """Caption features (B, M, D).

  Either the batch holds precomputed ``caption_features`` (latent datasets;
  then ``null_features`` must be given), or it holds ``tokens`` that a frozen
  ``encoder`` turns into features on device.
  """

  kind = "t2i"

  def __init__(self, encoder=None, tokenizer=None, drop_prob: float = 0.1,
               null_features: Optional[np.ndarray] = None,
               max_len: Optional[int] = None):
    if encoder is None and null_features is None:
      raise ValueError("a caption conditioner needs an encoder or the null "
                       "caption features")
    self.encoder = encoder
    self.tokenizer = tokenizer
    self.drop_prob = drop_prob
    self.max_len = max_len
    self._null = (jnp.asarray(null_features, jnp.float32)
                  if null_features is not None else None)

  def __call__(self, batch):
    if "caption_features" in batch:
      return batch["caption_features"].astype(jnp.float32)
    if "tokens" in batch and self.encoder is not None:
      return self.encoder(batch["tokens"])
    raise KeyError("a text-to-image model needs 'tokens' (with a caption "
                   "encoder) or 'caption_features' in the batch; it has "
                   f"{sorted(batch)}")

  def null_single(self):
    if self._null is not None:
      return self._null.reshape((1,) + self._null.shape[-2:])
    return self.encoder.null_features()

  def null(self, batch_size: int):
    one = self.null_single()
    return jnp.broadcast_to(one, (batch_size,) + one.shape[1:])

  def drop(self, key, y):
    if self.drop_prob <= 0:
      return y
    keep = jax.random.uniform(key, (y.shape[0], 1, 1)) >= self.drop_prob
    return jnp.where(keep, y, self.null_single().astype(y.dtype))

  def from_prompts(self, prompts: Sequence[str]):
    if self.tokenizer is None or self.encoder is None:
      raise ValueError("this model's captions come as precomputed features; "
                       "prompts need a tokenizer and a caption encoder")
    for p in prompts:
      unknown = self.tokenizer.unknown_words(p)
      if unknown:
        raise ValueError(f"prompt {p!r} has words the model never saw: "
                         f"{unknown}; its vocabulary is "
                         f"{sorted(self.tokenizer.vocabulary)}")
    tokens = self.tokenizer.encode(list(prompts), self.max_len)
    return self.encoder(jnp.asarray(tokens))
