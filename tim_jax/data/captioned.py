"""Captioned images at native aspect ratio, in buckets (text-to-image data).

The official T2I recipe (``tim/data/t2i_data.py``) trains on images resized
(bicubic, no crop) to a bucket whose sides are multiples of 32 pixels, one
bucket per batch, each bucket with its own batch size; each visit takes one
of the image's captions at random. tim_jax does the same from latents:

* ``aspect_buckets(resolution)`` lists the buckets (height, width) for a
  nominal ``resolution``^2 area; ``nearest_bucket`` puts an image in the
  one closest to its aspect ratio. An official ``data_info.jsonl`` names
  each image's bucket itself (``...-HxW``), and that is used as given.
* ``read_corpus`` reads a folder of images with same-named ``.txt``
  captions (one caption per non-empty line) or a JSONL manifest
  (``image_file`` or ``path``; ``captions`` list or ``caption``; optional
  ``bucket``): the official ``data_info.jsonl`` is such a manifest.
* ``python -m tim_jax.commands.prepare --captioned=DIR`` (or ``--manifest``)
  writes one ``tim_latents`` dataset per bucket (``text_HxWxC_img``: the
  latents, the captions, the resized image for REPA) under one data_dir;
  ``CaptionedSource`` reads them all as one source.
* ``make_iterator`` yields whole batches of one bucket: each epoch shuffles
  every bucket's rows, cuts them into batches of that bucket's size, and
  shuffles the batches (all from ``seed`` and the epoch, as the official
  packed batch sampler does). Captions are drawn, escaped and tokenised in
  the pipeline; the iterator is grain's, so its state resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import json
import math
import os

import grain
import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError
from tim_jax.data import latents as latents_lib

MULTIPLE = 32  # Bucket sides are multiples of this many pixels.
MAX_RATIO = 4.0  # Longest side / shortest side of the widest bucket.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def aspect_buckets(
  resolution: int, multiple: int = MULTIPLE, max_ratio: float = MAX_RATIO
) -> list[tuple[int, int]]:
  """(height, width) pairs, sides multiples of ``multiple``, area at most
  ``resolution``^2 and as close to it as the multiple allows, aspect
  ratios from 1/``max_ratio`` to ``max_ratio``; sorted by height / width."""
  if resolution < multiple or resolution % multiple:
    raise UserError(
      f"resolution {resolution} must be a positive multiple of {multiple}"
    )
  area = resolution * resolution
  out = set()
  h = multiple
  while h <= resolution * max_ratio:
    w = (area // h) // multiple * multiple
    if w >= multiple and max(h / w, w / h) <= max_ratio:
      out.add((h, w))
    h += multiple
  return sorted(out, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(
  height: int, width: int, buckets: Sequence[tuple[int, int]]
) -> tuple[int, int]:
  """The bucket whose aspect ratio is nearest (in log ratio) the image's."""
  r = math.log(height / width)
  return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - r))


def parse_bucket(text: str) -> tuple[int, int]:
  """An official ``bucket`` string (last ``-`` field ``HxW``) -> (h, w)
  floored to multiples of 32, as ``T2IDatasetMS.get_one_data`` does."""
  try:
    h, w = (int(v) for v in str(text).split("-")[-1].split("x"))
  except ValueError:
    raise UserError(f"bucket {text!r} is not '...-HxW'") from None
  h, w = h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE
  if h < MULTIPLE or w < MULTIPLE:
    raise UserError(f"bucket {text!r} is smaller than {MULTIPLE} pixels")
  return h, w


class Item(tuple):
  """(path, captions, bucket or None)."""

  __slots__ = ()

  def __new__(
    cls, path: str, captions: list[str], bucket: tuple[int, int] | None
  ):
    return super().__new__(cls, (path, captions, bucket))


def _captions(value, where: str) -> list[str]:
  caps = [value] if isinstance(value, str) else value
  if (
    not isinstance(caps, list)
    or not caps
    or not all(isinstance(c, str) and c.strip() for c in caps)
  ):
    raise UserError(
      f"{where}: captions must be a non-empty string or list "
      f"of non-empty strings, got {value!r}"
    )
  return caps


def _walk(root: str) -> list[tuple[str, list[str]]]:
  """(folder, sorted file names) of every folder under ``root`` that has
  files, sorted: a local walk (links followed), or a bucket's listing."""
  if not paths.is_remote(root):
    return [
      (dirpath, sorted(files))
      for dirpath, _, files in sorted(os.walk(root, followlinks=True))
    ]
  folders = {}
  for rel in paths.files(root):
    folder, _, name = rel.rpartition("/")
    folders.setdefault(paths.join(root, folder) if folder else root, [])
    folders[paths.join(root, folder) if folder else root].append(name)
  return sorted((d, sorted(f)) for d, f in folders.items())


def read_folder(root: str) -> list[Item]:
  """Images under ``root`` (walked in sorted order; local or gs://) with a
  ``.txt`` of the same stem beside each: one caption per non-empty line."""
  root = paths.absolute(root)
  if not paths.as_path(root).is_dir():
    raise FileNotFoundError(f"--captioned {root!r} is not a directory")
  items, missing = [], []
  for dirpath, files in _walk(root):
    present = set(files)
    for f in files:
      if not f.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = paths.join(dirpath, f)
      txt = os.path.splitext(path)[0] + ".txt"
      if os.path.splitext(f)[0] + ".txt" not in present:
        missing.append(path)
        continue
      text = paths.as_path(txt).read_text(encoding="utf-8")
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      items.append(Item(path, _captions(lines, txt), None))
  if missing:
    raise UserError(
      f"{len(missing)} image(s) in {root!r} have no caption "
      f"file beside them, e.g. {missing[0]!r} (expected "
      f"{os.path.splitext(missing[0])[0] + '.txt'!r})"
    )
  if not items:
    raise UserError(
      f"--captioned {root!r} holds no images "
      f"({', '.join(IMAGE_EXTENSIONS)}) with .txt captions"
    )
  return items


def read_manifest(path: str, root: str | None = None) -> list[Item]:
  """A JSONL file, one image per line: ``image_file`` (or ``path``),
  relative to ``root`` (default: the manifest's folder), ``captions`` (a
  list; or ``caption``, one string) and optionally the official
  ``bucket``."""
  path = paths.absolute(path)  # Local or gs://.
  if not paths.as_path(path).is_file():
    raise FileNotFoundError(f"--manifest {path!r} does not exist")
  root = os.fspath(paths.as_path(path).parent) if root is None else root
  items = []
  with paths.as_path(path).open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {n}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON: {e}") from e
      image = rec.get("image_file", rec.get("path"))
      if not isinstance(image, str):
        raise UserError(f"{where}: needs 'image_file' (or 'path')")
      caps = rec.get("captions", rec.get("caption"))
      try:
        bucket = parse_bucket(rec["bucket"]) if rec.get("bucket") else None
      except UserError as e:
        raise UserError(f"{where}: {e}") from None
      items.append(
        Item(paths.join(root, image), _captions(caps, where), bucket)
      )
  if not items:
    raise UserError(f"--manifest {path!r} lists no images")
  return items


def bucket_name(latent_shape: Sequence[int]) -> str:
  """The dataset config of a bucket: ``text_HxWxC_img``."""
  return latents_lib.config_name(latent_shape, "text", images=True)


class CaptionedSource:
  """Every bucket of a captioned data_dir as one random-access source.

  Example: ``image`` (the latent, NHWC float32), ``captions`` (list of
  str) and, with ``with_images``, ``pixels`` (uint8 (H, W, 3), the resized
  image). ``buckets`` lists (latent shape, first index, count) in index
  order."""

  def __init__(self, data_dir: str, with_images: bool = False):
    root = paths.as_path(paths.join(data_dir, latents_lib.NAME))
    names = (
      sorted(p.name for p in root.iterdir() if p.name.startswith("text_"))
      if root.is_dir()
      else []
    )
    if not names:
      raise FileNotFoundError(
        f"no captioned buckets ({latents_lib.NAME}/text_*) under "
        f"{data_dir!r}; write them with python -m tim_jax.commands.prepare "
        "--captioned=DIR (or --manifest=FILE)"
      )
    self.parts = [
      latents_lib.LatentSource(data_dir, config=n, with_images=with_images)
      for n in names
    ]
    self.buckets, start = [], 0
    for part in self.parts:
      self.buckets.append((part.latent_shape, start, len(part)))
      start += len(part)
    self._len = start

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    index = int(index)
    for part, (_, start, count) in zip(self.parts, self.buckets):
      if start <= index < start + count:
        return part[index - start]
    raise IndexError(f"index {index} out of range of {self._len}")

  def __repr__(self):
    return f"CaptionedSource({len(self.buckets)} buckets, n={self._len})"


def bucket_batch_sizes(
  buckets: Sequence[tuple[tuple[int, ...], int, int]],
  *,
  batch_size: int,
  image_size: int,
  multiple: int,
  mode: str = "area",
) -> list[int]:
  """Each bucket's global batch: ``batch_size`` ("fixed"), or
  ``batch_size * image_size^2 / (h * w)`` ("area": about the same tokens
  per step), rounded down to a multiple of ``multiple`` (the data shards
  and processes), at least ``multiple``."""
  if mode not in ("area", "fixed"):
    raise UserError(
      f"data.bucket_batch must be 'area' or 'fixed', got {mode!r}"
    )
  out = []
  for shape, _, _ in buckets:
    b = batch_size
    if mode == "area":
      b = int(batch_size * image_size * image_size / (shape[0] * shape[1]))
    out.append(max(multiple, b // multiple * multiple))
  return out


class BatchPlan:
  """Random access to the global batches: element ``i`` is epoch
  ``i // per_epoch``'s batch ``i % per_epoch``, a list of source indices of
  one bucket. Each epoch's plan depends only on ``seed`` and the epoch."""

  def __init__(self, buckets, batch_sizes: Sequence[int], seed: int):
    self.buckets, self.batch_sizes = list(buckets), list(batch_sizes)
    self.seed = seed
    self.per_epoch = sum(
      count // bs for (_, _, count), bs in zip(self.buckets, self.batch_sizes)
    )
    if self.per_epoch == 0:
      sizes = {
        str(tuple(s)): (c, bs)
        for (s, _, c), bs in zip(self.buckets, self.batch_sizes)
      }
      raise UserError(
        f"no bucket fills one batch ((examples, batch) per "
        f"bucket: {sizes}); lower the config's batch_size"
      )
    # Reader threads ask for batches of neighbouring epochs at once.
    self.epoch_plan = functools.lru_cache(maxsize=4)(self._epoch_plan)

  def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for (_, start, count), bs in zip(self.buckets, self.batch_sizes):
      rows = start + rng.permutation(count)
      batches += [rows[i : i + bs] for i in range(0, count - bs + 1, bs)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]

  def __len__(self):
    return self.per_epoch

  def __getitem__(self, i):
    epoch, j = divmod(int(i), self.per_epoch)
    return self.epoch_plan(epoch)[j]


def make_iterator(
  source: CaptionedSource,
  *,
  batch_sizes: Sequence[int],
  seed: int,
  tokenize: Callable[[list[str]], dict],
  escape: Callable[[str], str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 4,
  prefetch: int = 2,
) -> grain.DatasetIterator:
  """A checkpointable grain iterator of this process's share of each global
  batch (rows ``process_index::process_count``): ``image`` (B, h, w, C),
  ``caption_ids`` / ``caption_mask`` from ``tokenize`` and, when the
  source has them, ``pixels``. One caption per example, drawn from
  ``seed``, the batch's position and the row."""
  for bs in batch_sizes:
    if bs % process_count:
      raise ValueError(
        f"bucket batch {bs} is not divisible by {process_count} processes"
      )
  plan = BatchPlan(source.buckets, batch_sizes, seed)

  def load(position, rows):
    rows = np.asarray(rows)[process_index::process_count]
    examples = [source[int(r)] for r in rows]
    rng = np.random.default_rng([seed, 1, int(position)])
    captions = []
    for ex in examples:
      cap = ex["captions"][int(rng.integers(len(ex["captions"])))]
      captions.append(escape(cap) if escape is not None else cap)
    out = {"image": np.stack([ex["image"] for ex in examples])}
    if "pixels" in examples[0]:
      out["pixels"] = np.stack([ex["pixels"] for ex in examples])
    out.update(tokenize(captions))
    return out

  # Positions 0, 1, ... (a million epochs): the plan maps each to its rows.
  ds = grain.MapDataset.range(len(plan) * 1_000_000)
  ds = ds.map(lambda i: load(i, plan[i]))
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )
  return iter(ds)
