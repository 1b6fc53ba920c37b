"""What each kind of dataset (``config.data.name``) provides.

One place answers, for ``shapes`` (the built-in captioned-shapes world,
pixel space) and ``latents`` (precomputed autoencoder latents in
array_record files): where the examples come from, how captions become the
network's conditioning, and what a synthetic batch of the right shapes looks
like (for benchmarks). The trainer, the sampler and the benchmark ask here
instead of branching on the dataset's name themselves.
"""

from __future__ import annotations

import os

import numpy as np

from tim_jax import conditioning

NAMES = ("shapes", "latents")
EVAL_SEED_OFFSET = 1_000_003  # The eval split's scenes: other seeds.


def _check(config):
  if config.data.name not in NAMES:
    raise ValueError(f"data.name must be one of {NAMES}, got "
                     f"{config.data.name!r}")
  return config.data.name


def source(config, split: str = "train"):
  """The random-access source of ``split`` ("train" or "eval")."""
  d = config.data
  if _check(config) == "shapes":
    from tim_jax.data import shapes
    seed = d.seed if split == "train" else d.seed + EVAL_SEED_OFFSET
    return shapes.ShapesSource(size=d.image_size, seed=seed,
                               kind=config.model.kind,
                               max_caption_len=d.max_caption_len)
  if not d.data_dir or not os.path.isdir(d.data_dir):
    raise FileNotFoundError(
        f"data.data_dir={d.data_dir!r} does not exist: this config trains "
        "on a latent dataset. Write one with `python -m "
        "tim_jax.data.latents` and pass --config.data.data_dir=DIR")
  from tim_jax.data import latents
  teacher = config.loss_extras.get("repa_encoder", "none") != "none"
  return latents.LatentSource(d.data_dir, split=split, with_images=teacher)


def iterator(config, src):
  """Batches of ``src`` for this process (grain; checkpointable)."""
  from tim_jax.data import pipeline
  return pipeline.make_iterator(
      src, global_batch_size=config.batch_size, seed=config.data.seed,
      worker_count=config.data.worker_count)


def conditioner(config):
  """Labels (c2i) or caption features (t2i) for the network, with nulls."""
  drop = float(config.conditioning.drop_prob)
  if config.model.kind == "c2i":
    return conditioning.LabelConditioner(
        int(config.model.network.num_classes), drop)
  d = config.data
  if _check(config) == "shapes":
    from tim_jax.data import shapes, text
    tokenizer = shapes.tokenizer()
    encoder = text.CaptionEncoder(tokenizer.vocab_size, d.max_caption_len,
                                  int(config.model.network.cap_feat_dim),
                                  seed=d.caption_seed)
    return conditioning.CaptionConditioner(encoder, tokenizer, drop,
                                           max_len=d.max_caption_len)
  null_path = d.get("null_caption_features")
  if not null_path or not os.path.exists(null_path):
    raise ValueError("data.null_caption_features must point at a .npy file of"
                     " the empty caption's features (M, D) for a latent t2i "
                     f"dataset; got {null_path!r}")
  return conditioning.CaptionConditioner(
      drop_prob=drop, null_features=np.load(null_path))


def synthetic_batch(config, batch: int, seed: int = 0,
                    caption_len: int = 32) -> dict:
  """A host batch with this dataset's keys and shapes, random values."""
  rng = np.random.default_rng(seed)
  net = config.model.network
  size = config.data.image_size
  out = {"image": rng.standard_normal(
      (batch, size, size, int(net.in_channels))).astype(np.float32)}
  if config.model.kind == "c2i":
    out["label"] = rng.integers(0, int(net.num_classes),
                                (batch,)).astype(np.int32)
  elif _check(config) == "shapes":
    out["tokens"] = rng.integers(
        2, 10, (batch, config.data.max_caption_len)).astype(np.int32)
  else:
    out["caption_features"] = rng.standard_normal(
        (batch, caption_len, int(net.cap_feat_dim))).astype(np.float32)
  if (_check(config) == "latents" and
      config.loss_extras.get("repa_encoder", "none") != "none"):
    # The crops the REPA teacher reads, at the autoencoder's pixel size.
    from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top
    px = size * autoencoders.DOWNSAMPLE[config.autoencoder.name]
    out["pixels"] = rng.integers(0, 256, (batch, px, px, 3)).astype(np.uint8)
  return out


def caption_length(config, default: int = 32) -> int:
  """Caption tokens per example (0 for class-conditional models)."""
  if config.model.kind == "c2i":
    return 0
  return (int(config.data.max_caption_len)
          if _check(config) == "shapes" else default)
