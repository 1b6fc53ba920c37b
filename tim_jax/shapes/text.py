"""Text for closed-vocabulary captions: a word tokenizer and a frozen encoder.

The built-in shapes captions come from a closed grammar (its words are
``shapes.VOCABULARY``; ``shapes.tokenizer()`` builds the tokenizer), so a
word-level tokenizer covers them exactly. ``CaptionEncoder`` stands in for a
real text encoder (T5, Gemma, ...): it has no trained parameters, only a
fixed random word table, sinusoidal positions and optionally each word's
decaying context (``context``), which is enough for a tiny text-to-image
model to learn the binding of words to objects, and it costs nothing to
train or ship.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from jax.typing import ArrayLike

PAD_ID = 0
UNK_ID = 1
_SPECIAL = ("<pad>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
  """Lower-cased words; punctuation separates words and is dropped."""
  return _WORD.findall(text.lower())


class Tokenizer:
  """Word ids: 0 pad, 1 unknown word, then ``words`` in order."""

  def __init__(self, words: Sequence[str]):
    words = tuple(words)
    for w in words:
      # A word that split_words would change could never be matched.
      if split_words(w) != [w]:
        raise ValueError(
          f"vocabulary word {w!r} must be one lower-case alphanumeric word"
        )
    if len(set(words)) != len(words):
      dup = sorted({w for w in words if words.count(w) > 1})
      raise ValueError(f"vocabulary has duplicate words: {dup}")
    self.words = _SPECIAL + words
    self._ids = {w: i for i, w in enumerate(self.words)}

  @property
  def vocab_size(self) -> int:
    """Words in the vocabulary, the pad and unknown tokens included."""
    return len(self.words)

  @property
  def vocabulary(self) -> tuple[str, ...]:
    """The words it knows (without the special tokens)."""
    return self.words[len(_SPECIAL) :]

  def unknown_words(self, text: str) -> list[str]:
    """The words of ``text`` it would map to the unknown id."""
    return [w for w in split_words(text) if w not in self._ids]

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 (len(texts), max_len): ids, truncated, padded with PAD_ID."""
    if isinstance(texts, str):
      # A bare string would be read as a list of one-letter texts.
      raise TypeError(
        "encode takes a list of texts, got a single str "
        f"{texts!r}; wrap it in a list"
      )
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(w, UNK_ID) for w in split_words(text)][:max_len]
      out[row, : len(ids)] = ids
    return out

  def decode(self, tokens: ArrayLike) -> list[str]:
    """Texts from ids (B, L); pads are dropped, unknown ids read "<unk>"."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (B, L), got shape {tokens.shape}")
    return [
      " ".join(
        self.words[i] if 0 <= i < len(self.words) else "<unk>"
        for i in row
        if i != PAD_ID
      )
      for row in tokens.tolist()
    ]


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """float32 (length, dim): sin and cos of position x geometric frequencies."""
  half = (dim + 1) // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / max(half, 1))
  angles = np.arange(length)[:, None] * freqs[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return table[:, :dim].astype(np.float32)


class CaptionEncoder:
  """Frozen caption features: word embedding + position, (B, max_len, dim).

  The word table is N(0, 1/dim) from ``seed`` (rows of norm about 1); the
  sinusoidal positions are scaled by 1/sqrt(dim) to a comparable norm so
  neither term drowns the other. Pads are encoded like any word (as a real
  text encoder's pad features reach the model too): a pad's feature depends
  only on its position, never on the rest of the caption.

  ``context`` (a decay in [0, 1); 0 = off) adds to every word a causal,
  decaying average of the words before it, read through a second fixed
  random table: a real (causal) text encoder's features carry the words
  before each token, which is what lets a model bind "red" and "square" to
  the "left" that follows them; with word + position alone, binding the
  attributes of two objects must be learned through several
  cross-attention hops. The average over previous words j of a word i
  weighs them by context^(i - 1 - j), normalised to sum to 1; pads get
  none (their features still depend only on their position).

  Calling it is a pure jnp function of the tokens (jit-able; the tables are
  constants). Ids outside [0, vocab_size) give NaN features, so a bad id
  shows up in the loss instead of reading a wrong row.
  """

  def __init__(
    self,
    vocab_size: int,
    max_len: int,
    dim: int,
    seed: int = 0,
    context: float = 0.0,
  ):
    if vocab_size < 2 or max_len < 1 or dim < 1:
      raise UserError(
        "CaptionEncoder needs vocab_size >= 2, max_len >= 1, "
        f"dim >= 1; got vocab_size={vocab_size}, "
        f"max_len={max_len}, dim={dim}"
      )
    if not 0.0 <= context < 1.0:
      raise UserError(
        f"context (data.caption_context) must be a decay in [0, 1), got {context}"
      )
    self.vocab_size, self.max_len, self.dim = vocab_size, max_len, dim
    self.context = float(context)
    scale = 1.0 / np.sqrt(dim)
    # The word table keeps the key it had before ``context`` existed, so
    # context=0 encoders (and the models trained on them) are unchanged.
    self.word_table = scale * jax.random.normal(
      jax.random.key(seed), (vocab_size, dim), jnp.float32
    )
    self.context_table = scale * jax.random.normal(
      jax.random.fold_in(jax.random.key(seed), 1),
      (vocab_size, dim),
      jnp.float32,
    )
    self.positions = scale * jnp.asarray(sinusoidal_positions(max_len, dim))
    i, j = np.arange(max_len)[:, None], np.arange(max_len)[None, :]
    # weights[i, j] = context^(i - 1 - j) for j < i: the words before i.
    self.context_weights = jnp.asarray(
      np.where(j < i, float(context) ** np.maximum(i - 1 - j, 0), 0.0),
      jnp.float32,
    )

  def __call__(self, tokens: ArrayLike) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.max_len:
      raise ValueError(
        f"tokens must be (B, {self.max_len}), got shape {tokens.shape}"
      )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
    words = jnp.take(
      self.word_table, tokens, axis=0, mode="fill", fill_value=jnp.nan
    )
    out = words + self.positions[None]
    if self.context > 0:
      real = (tokens != PAD_ID).astype(jnp.float32)
      before = (
        jnp.take(
          self.context_table, tokens, axis=0, mode="fill", fill_value=jnp.nan
        )
        * real[..., None]
      )
      total = jnp.einsum("ij,bjd->bid", self.context_weights, before)
      # Where no word comes before (the first word) the total is 0 too.
      mass = jnp.maximum(
        jnp.einsum("ij,bj->bi", self.context_weights, real), 1e-9
      )
      out = out + (real / mass)[..., None] * total
    return out

  def null_features(self) -> jax.Array:
    """The empty caption's features (1, max_len, dim): all pads."""
    return self(jnp.full((1, self.max_len), PAD_ID, jnp.int32))
