"""What each kind of dataset (``config.data.name``) provides.

One place answers, for ``shapes`` (the built-in captioned-shapes world,
pixel space), ``latents`` (precomputed autoencoder latents in
array_record files, with labels or stored caption features) and
``captions`` (latents in aspect buckets with caption text, encoded by a
frozen text encoder in the train step): where the examples come from, how
captions become the network's conditioning, and what a synthetic batch of
the right shapes looks like (for benchmarks). The trainer, the sampler and
the benchmark ask here instead of branching on the dataset's name
themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
import io
import math
from typing import TYPE_CHECKING, Any

from absl import logging
import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError
from tim_jax.data import conditioning

if TYPE_CHECKING:
  import grain
  import ml_collections

  from tim_jax.data import captioned, latents
  from tim_jax.encoders import gemma
  from tim_jax.shapes import world

NAMES = ("shapes", "latents", "captions")
EVAL_SEED_OFFSET = 1_000_003  # The eval split's scenes: other seeds.


def _check(config):
  if config.data.name not in NAMES:
    raise UserError(
      f"data.name must be one of {NAMES}, got {config.data.name!r}"
    )
  return config.data.name


def label_names(
  config: ml_collections.ConfigDict, labels: Iterable[int]
) -> list:
  """What people read beside class-conditional samples: the shapes world's
  class names ("3: blue square"), else "class N"."""
  if config.data.get("name", "") == "shapes":
    from tim_jax.shapes import world

    return [
      f"{int(l)}: {world.label_name(l)}"
      if 0 <= int(l) < world.num_classes()
      else f"class {int(l)}"
      for l in labels
    ]
  return [f"class {int(l)}" for l in labels]


def source(
  config: ml_collections.ConfigDict, split: str = "train"
) -> world.ShapesSource | latents.LatentSource | captioned.CaptionedSource:
  """The random-access source of ``split`` ("train" or "eval")."""
  d = config.data
  if _check(config) == "shapes":
    from tim_jax.shapes import world

    seed = d.seed if split == "train" else d.seed + EVAL_SEED_OFFSET
    return world.ShapesSource(
      size=d.image_size,
      seed=seed,
      kind=config.model.kind,
      max_caption_len=d.max_caption_len,
    )
  if not d.data_dir or not paths.as_path(d.data_dir).is_dir():
    raise UserError(
      f"data.data_dir={d.data_dir!r} does not exist: this config trains "
      "on a latent dataset. Write one with `python -m "
      "tim_jax.commands.prepare` and pass --config.data.data_dir=DIR"
    )
  teacher = config.loss_extras.get("repa_encoder", "none") != "none"
  if d.name == "captions":
    from tim_jax.data import captioned

    if split != "train":
      raise UserError(
        "a captioned dataset has only a train split: turn "
        "the held-out loss off (evals.holdout_loss.every=0)"
      )
    return captioned.CaptionedSource(d.data_dir, with_images=teacher)
  from tim_jax.data import latents

  return latents.LatentSource(d.data_dir, split=split, with_images=teacher)


def check_source(config: ml_collections.ConfigDict, src: Any) -> None:
  """Refuses a dataset whose examples do not fit the config's model,
  naming both, before anything is compiled: a latent dataset of another
  latent shape or conditioning (shapes that happen to broadcast would
  otherwise train), or caption buckets of another channel count."""
  if config.data.name == "shapes":
    return
  net = config.model.network
  channels = int(net.in_channels)
  where = f"data.data_dir={config.data.data_dir!r}"
  if config.data.name == "captions":
    shapes = sorted({tuple(shape) for shape, _, _ in src.buckets})
    wrong = [s for s in shapes if s[-1] != channels]
    if wrong:
      raise UserError(
        f"{where} holds latents of {wrong[0][-1]} channels (buckets "
        f"{shapes[:4]}...), but model.network.in_channels is {channels}: "
        "prepare the data with this config's autoencoder"
      )
    return
  size = int(config.data.image_size)
  want = (size, size, channels)
  if tuple(src.latent_shape) != want:
    raise UserError(
      f"{where} holds latents of shape {tuple(src.latent_shape)}, but the "
      f"config trains on {want} (data.image_size={size}, "
      f"model.network.in_channels={channels}): use a config for this "
      "dataset, or prepare the dataset at that size"
    )
  cond = {"c2i": "label", "t2i": "caption"}[config.model.kind]
  if src.cond != cond:
    raise UserError(
      f"{where} is conditioned on {src.cond!r}, but a {config.model.kind} "
      f"model needs {cond!r} data"
    )


def iterator(
  config: ml_collections.ConfigDict,
  src: world.ShapesSource | latents.LatentSource | captioned.CaptionedSource,
  conditioner: conditioning.TextConditioner | None = None,
  data_shards: int = 1,
) -> grain.DatasetIterator:
  """Batches of ``src`` for this process (grain; checkpointable). Captioned
  data needs the ``conditioner`` (its tokenizer) and the mesh's
  ``data_shards`` (each bucket's batch divides over them)."""
  import jax

  if config.data.name == "captions":
    from tim_jax.data import captioned

    multiple = math.lcm(int(data_shards), jax.process_count())
    sizes = captioned.bucket_batch_sizes(
      src.buckets,
      batch_size=config.batch_size,
      image_size=config.data.image_size,
      multiple=multiple,
      mode=config.data.bucket_batch,
    )
    logging.info(
      "caption buckets (latent shape: examples, global batch): %s",
      ", ".join(
        f"{tuple(s)}: {n}, {b}" for (s, _, n), b in zip(src.buckets, sizes)
      ),
    )
    return captioned.make_iterator(
      src,
      batch_sizes=sizes,
      seed=config.data.seed,
      tokenize=conditioner.tokenize,
      escape=(
        conditioning.escape_unicode if config.data.escape_unicode else None
      ),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  from tim_jax.data import pipeline

  return pipeline.make_iterator(
    src,
    global_batch_size=config.batch_size,
    seed=config.data.seed,
    worker_count=config.data.worker_count,
  )


def host_batch(
  config: ml_collections.ConfigDict,
  conditioner: conditioning.LabelConditioner
  | conditioning.CaptionConditioner
  | conditioning.TextConditioner,
  batch: dict,
) -> dict:
  """The last host-side step before a batch goes to the devices: captioned
  data cuts its caption tokens to the length bucket of the global batch's
  longest caption (one small all-gather between processes of a
  multi-host job)."""
  if config.data.name != "captions":
    return batch
  longest = int(np.asarray(batch["caption_mask"]).sum(-1).max())
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
  return conditioner.cut(batch, longest)


def conditioner(
  config: ml_collections.ConfigDict,
  text_encoder: gemma.GemmaEncoder | None = None,
) -> (
  conditioning.LabelConditioner
  | conditioning.CaptionConditioner
  | conditioning.TextConditioner
):
  """Labels (c2i) or caption features (t2i) for the network, with nulls.
  ``text_encoder`` stands in for ``config.text_encoder.path``."""
  drop = float(config.conditioning.drop_prob)
  if config.model.kind == "c2i":
    return conditioning.LabelConditioner(
      int(config.model.network.num_classes), drop
    )
  d = config.data
  if _check(config) == "captions":
    from tim_jax.config import builders

    encoder = text_encoder or builders.text_encoder(config)
    if encoder.dim != int(config.model.network.cap_feat_dim):
      raise UserError(
        f"the text encoder's features are {encoder.dim} wide "
        "but model.network.cap_feat_dim is "
        f"{config.model.network.cap_feat_dim}: they must match"
      )
    return conditioning.TextConditioner(
      encoder, drop, tuple(config.text_encoder.length_buckets)
    )
  if _check(config) == "shapes":
    from tim_jax.shapes import text, world

    tokenizer = world.tokenizer()
    encoder = text.CaptionEncoder(
      tokenizer.vocab_size,
      d.max_caption_len,
      int(config.model.network.cap_feat_dim),
      seed=d.caption_seed,
      context=float(d.get("caption_context", 0.0)),
    )
    return conditioning.CaptionConditioner(
      encoder, tokenizer, drop, max_len=d.max_caption_len
    )
  null_path = d.get("null_caption_features")
  if not null_path or not paths.as_path(null_path).exists():
    raise UserError(
      "data.null_caption_features must point at a .npy file of"
      " the empty caption's features (M, D) for a latent t2i "
      f"dataset; got {null_path!r}"
    )
  return conditioning.CaptionConditioner(
    drop_prob=drop,
    null_features=np.load(io.BytesIO(paths.as_path(null_path).read_bytes())),
  )


def synthetic_batch(
  config: ml_collections.ConfigDict,
  batch: int,
  seed: int = 0,
  caption_len: int = 32,
) -> dict:
  """A host batch with this dataset's keys and shapes, random values."""
  rng = np.random.default_rng(seed)
  net = config.model.network
  size = config.data.image_size
  out = {
    "image": rng.standard_normal(
      (batch, size, size, int(net.in_channels))
    ).astype(np.float32)
  }
  if config.model.kind == "c2i":
    out["label"] = rng.integers(0, int(net.num_classes), (batch,)).astype(
      np.int32
    )
  elif _check(config) == "shapes":
    out["tokens"] = rng.integers(
      2, 10, (batch, config.data.max_caption_len)
    ).astype(np.int32)
  elif _check(config) == "captions":
    out["caption_ids"] = rng.integers(2, 100, (batch, caption_len)).astype(
      np.int32
    )
    out["caption_mask"] = np.ones((batch, caption_len), np.int32)
  else:
    out["caption_features"] = rng.standard_normal(
      (batch, caption_len, int(net.cap_feat_dim))
    ).astype(np.float32)
  if (
    _check(config) in ("latents", "captions")
    and config.loss_extras.get("repa_encoder", "none") != "none"
  ):
    # The crops the REPA teacher reads, at the autoencoder's pixel size.
    from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top

    px = size * autoencoders.DOWNSAMPLE[config.autoencoder.name]
    out["pixels"] = rng.integers(0, 256, (batch, px, px, 3)).astype(np.uint8)
  return out


def caption_length(config: ml_collections.ConfigDict, default: int = 32) -> int:
  """Caption tokens per example (0 for class-conditional models)."""
  if config.model.kind == "c2i":
    return 0
  return (
    int(config.data.max_caption_len) if _check(config) == "shapes" else default
  )
