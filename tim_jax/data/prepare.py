"""Images -> the latent dataset TiM trains on (the command:
``python -m tim_jax.commands.prepare``).

Reads an ImageNet-style folder (``<class>/<image>``, classes numbered in
sorted order as torchvision's ``ImageFolder`` numbers them) or a TFDS image
dataset (e.g. ``imagenet2012``, with ``image`` and ``label`` features),
centre-crops each image as ADM does (``center_crop_arr`` of the official
``tim/data/c2i_data.py``), encodes the crop and its horizontal flip with the
autoencoder (the posterior *sample*, as the official preprocessing
``projects/preprocess/image_latent_c2i.py`` does), and writes a
``tim_latents`` TFDS dataset (array_record) with ``latent``,
``latent_flip``, ``label`` and the crop as PNG (``image``).

Text-to-image corpora (a folder of images with same-named ``.txt``
captions, or a JSONL manifest such as the official ``data_info.jsonl``)
are resized to aspect buckets (``tim_jax.data.captioned``) and written as one
dataset per bucket with the latents, the captions and the resized image.

Work is cut into shards of ``shard_size`` images written to
``DATA_DIR/shards/`` as they finish, so an interrupted run resumes where it
stopped. In a multi-host job (``jax.distributed``) every process encodes
its share of the shards on its own devices and process 0 writes the
dataset once all are done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
import io
import json
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tim_jax.core import fingerprint, paths
from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  import jax

  from tim_jax.autoencoders import Autoencoder

# torchvision's IMG_EXTENSIONS (ImageFolder's default).
IMAGE_EXTENSIONS = (
  ".jpg",
  ".jpeg",
  ".png",
  ".ppm",
  ".bmp",
  ".pgm",
  ".tif",
  ".tiff",
  ".webp",
)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's centre crop: halve with a box filter while the short side is at
  least twice ``size``, resize (bicubic) so the short side is ``size``,
  then cut the central ``size`` x ``size`` square. Returns uint8 HWC."""
  while min(image.size) >= 2 * size:
    image = image.resize(
      tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX
    )
  scale = size / min(image.size)
  image = image.resize(
    tuple(round(s * scale) for s in image.size),
    resample=Image.Resampling.BICUBIC,
  )
  arr = np.asarray(image)
  top = (arr.shape[0] - size) // 2
  left = (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


def to_rgb(image: Image.Image) -> Image.Image:
  """An 8-bit RGB image. 16- and 32-bit integer images (16-bit PNGs open
  as mode I;16 or I) are scaled from their full range; PIL's own
  ``convert("RGB")`` clips them, turning most pixels white."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(image).astype(np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
    a = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
    image = Image.fromarray(a, mode="L")
  return image.convert("RGB")


def open_image(path: str) -> Image.Image:
  """PIL's image of a local file or of an object in a bucket (gs://)."""
  if paths.is_remote(path):
    return Image.open(io.BytesIO(paths.as_path(path).read_bytes()))
  return Image.open(path)


def image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """``([(path, label)], classes)`` as torchvision's ``ImageFolder`` lists
  them: classes are the sorted subfolder names, files are walked in sorted
  order with the image extensions (case-insensitive). ``root`` may be a
  bucket's folder (gs://...)."""
  if paths.is_remote(root):
    items, classes, _ = _remote_image_folder(root)
    return items, classes
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root!r} is not a directory")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise UserError(
      f"--images {root!r} has no class subfolders (expected "
      "<class>/<image> as ImageNet's train/ folder)"
    )
  items = []
  for label, name in enumerate(classes):
    # Linked folders are followed as torchvision does, but each real folder
    # once: a link back up the tree would list its images again and again.
    seen = set()
    for dirpath, dirnames, files in sorted(
      os.walk(os.path.join(root, name), followlinks=True)
    ):
      real = os.path.realpath(dirpath)
      if real in seen:
        logging.warning("skipping %s: a link to a folder already read", dirpath)
        dirnames.clear()
        continue
      seen.add(real)
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          items.append((os.path.join(dirpath, f), label))
  if not items:
    raise UserError(
      f"--images {root!r}: no image files "
      f"({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
    )
  return items, classes


def _remote_image_folder(root: str):
  """``image_folder`` of a bucket's folder, from one listing, and each
  file's (size, modification time) for the fingerprint."""
  root = root.rstrip("/")
  try:
    listing = paths.listing(root)
  except FileNotFoundError:
    listing = []
  if not listing:
    raise FileNotFoundError(f"--images {root!r} is not a directory")
  classes = sorted({rel.split("/")[0] for rel, _, _ in listing if "/" in rel})
  if not classes:
    raise UserError(
      f"--images {root!r} has no class subfolders (expected "
      "<class>/<image> as ImageNet's train/ folder)"
    )
  label_of = {name: i for i, name in enumerate(classes)}
  # Sorted as the local walk is: by folder, then by file name.
  found = sorted(
    (
      (rel.rpartition("/")[0], rel.rpartition("/")[2], size, mtime)
      for rel, size, mtime in listing
      if "/" in rel and rel.lower().endswith(IMAGE_EXTENSIONS)
    ),
    key=lambda e: (label_of[e[0].split("/")[0]], e[0], e[1]),
  )
  if not found:
    raise UserError(
      f"--images {root!r}: no image files "
      f"({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
    )
  items, stats = [], {}
  for folder, name, size, mtime in found:
    path = f"{root}/{folder}/{name}"
    items.append((path, label_of[folder.split("/")[0]]))
    stats[path] = (size, mtime)
  return items, classes, stats


class FolderImages:
  """Random access to an image folder (local or gs://): (crop uint8 HWC,
  label)."""

  def __init__(self, root: str, size: int):
    self._stats = None
    if paths.is_remote(root):
      self.items, self.classes, self._stats = _remote_image_folder(root)
    else:
      self.items, self.classes = image_folder(root)
    self.size = size

  def __len__(self):
    return len(self.items)

  def fingerprint(self) -> str:
    """The listing: every image's name, size and modification time."""
    if self._stats is not None:  # As listed: no request per file.
      return fingerprint.of_listing(
        (path, *self._stats[path]) for path, _ in self.items
      )
    return fingerprint.of_files(path for path, _ in self.items)

  def __getitem__(self, i):
    path, label = self.items[i]
    try:
      with open_image(path) as im:
        crop = center_crop(to_rgb(im), self.size)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read image {path}: {e}") from e
    return crop, label


class TfdsImages:
  """Random access to a TFDS image dataset the user has prepared."""

  def __init__(self, name: str, split: str, data_dir: str | None, size: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self.source = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
        f"cannot open TFDS dataset {name!r} split {split!r} "
        f"(data_dir={data_dir!r}): {e}"
      ) from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
      raise UserError(
        f"TFDS dataset {name!r} needs 'image' and 'label' "
        f"features; it has {sorted(features)}"
      )
    self.classes = list(getattr(features["label"], "names", []) or [])
    self.size = size
    self._id = f"tfds:{name}:{split}:{data_dir}"

  def __len__(self):
    return len(self.source)

  def fingerprint(self) -> str:
    """The TFDS dataset's name, split, folder and size."""
    return f"{self._id}:{len(self)}"

  def __getitem__(self, i):
    ex = self.source[i]
    image = to_rgb(Image.fromarray(np.asarray(ex["image"])))
    return center_crop(image, self.size), int(ex["label"])


def to_unit(crops: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
  return crops.astype(np.float32) / 127.5 - 1.0


def png_bytes(crop: np.ndarray) -> bytes:
  """A crop as PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(crop).save(buf, format="PNG")
  return buf.getvalue()


def encode_shard(
  images: FolderImages | TfdsImages,
  indices: Sequence[int],
  ae: Autoencoder,
  *,
  batch_size: int,
  rng: jax.Array,
  pool: concurrent.futures.Executor,
  done: Callable[[int], None] | None = None,
) -> dict:
  """One shard's arrays: latents of the crops and of their flips (one
  posterior sample each), labels, and the crops as PNG. ``done(n)`` is
  called after each batch of n images."""
  import jax  # pylint: disable=g-import-not-at-top

  loaded = list(pool.map(images.__getitem__, indices))
  crops = np.stack([c for c, _ in loaded])
  labels = np.asarray([l for _, l in loaded], np.int64)
  latents, flips = [], []
  for b, start in enumerate(range(0, len(crops), batch_size)):
    chunk = crops[start : start + batch_size]
    n = len(chunk)
    if n < batch_size:  # One batch shape: the encoder compiles once.
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    x = to_unit(chunk)
    key = jax.random.fold_in(rng, b)
    latents.append(np.asarray(ae.encode(x, rng=jax.random.fold_in(key, 0)))[:n])
    flips.append(
      np.asarray(ae.encode(x[:, :, ::-1], rng=jax.random.fold_in(key, 1)))[:n]
    )
    if done is not None:
      done(n)
  files = list(pool.map(png_bytes, crops))
  offsets = np.zeros(len(files) + 1, np.int64)
  offsets[1:] = np.cumsum([len(f) for f in files])
  return dict(
    latent=np.concatenate(latents).astype(np.float32),
    latent_flip=np.concatenate(flips).astype(np.float32),
    label=labels,
    image_bytes=np.frombuffer(b"".join(files), np.uint8),
    image_offsets=offsets,
  )


def prepare(
  images: FolderImages | TfdsImages,
  ae: Autoencoder,
  data_dir: str,
  *,
  batch_size: int = 32,
  shard_size: int = 1000,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 8,
  progress: bool = True,
  barrier: Callable[[str], None] | None = None,
) -> str | None:
  """Encodes ``images`` into ``data_dir``; returns the dataset directory
  (on process 0; None elsewhere). Finished shards are kept and skipped."""
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.core import resumable  # pylint: disable=g-import-not-at-top
  from tim_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top

  n = len(images)
  if n == 0:
    raise UserError("no images to prepare: the image source is empty")
  latent_shape = ae.latent_shape(images.size, images.size)
  shard_dir = paths.join(data_dir, "shards")
  meta = dict(
    num_images=n,
    seed=seed,
    batch_size=batch_size,
    resolution=images.size,
    autoencoder=ae.name,
    autoencoder_weights=ae.fingerprint(),
    inputs=images.fingerprint(),
    latent_shape=list(latent_shape),
  )
  shards = [
    list(range(s, min(s + shard_size, n))) for s in range(0, n, shard_size)
  ]
  work = resumable.Parts(
    shard_dir,
    "shard",
    [len(s) for s in shards],
    meta=meta,
    process_index=process_index,
    process_count=process_count,
    desc="encoding",
    progress=progress,
  )
  base = jax.random.key(seed)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for i in work.todo():
      work.save(
        i,
        encode_shard(
          images,
          shards[i],
          ae,
          batch_size=batch_size,
          rng=jax.random.fold_in(base, i),
          pool=pool,
          done=work.advance,
        ),
      )
  if not work.finish(barrier):
    return None
  try:  # A rerun of a finished job (its shards matched): nothing to do.
    return latents_lib.find_dataset(
      data_dir,
      config=latents_lib.config_name(
        latent_shape, "label", flip=True, images=True
      ),
    )
  except FileNotFoundError:
    pass
  out = latents_lib.write_latents(
    shard_dir,
    data_dir,
    latent_shape=latent_shape,
    cond="label",
    flip=True,
    images=True,
  )
  return out


class CaptionedImages:
  """Random access to a captioned corpus (``tim_jax.data.captioned``):
  item i is (image resized to its bucket, uint8 HWC; its captions). Items
  without a bucket go to the aspect bucket of ``resolution`` nearest their
  aspect ratio (read from the file's header)."""

  def __init__(self, items, resolution: int):
    from tim_jax.data import captioned  # pylint: disable=g-import-not-at-top

    self.items = list(items)
    buckets = captioned.aspect_buckets(resolution)
    self.buckets = []
    for path, _, bucket in self.items:
      if bucket is None:
        try:
          with open_image(path) as im:
            w, h = im.size
        except Exception as e:  # pylint: disable=broad-except
          raise UserError(f"cannot read image {path}: {e}") from e
        bucket = captioned.nearest_bucket(h, w, buckets)
      self.buckets.append(tuple(bucket))

  def __len__(self):
    return len(self.items)

  def fingerprint(self) -> str:
    """The corpus: every image's name, size and modification time, and
    the captions."""
    import hashlib  # pylint: disable=g-import-not-at-top

    captions = hashlib.sha256(
      repr([list(c) for _, c, _ in self.items]).encode()
    ).hexdigest()[:16]
    files = fingerprint.of_files(path for path, _, _ in self.items)
    return f"{files}-{captions}"

  def __getitem__(self, i):
    path, captions, _ = self.items[i]
    h, w = self.buckets[i]
    try:
      with open_image(path) as im:
        # The official loader: bicubic resize to the bucket, no crop.
        image = np.asarray(
          to_rgb(im).resize((w, h), resample=Image.Resampling.BICUBIC)
        )
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read image {path}: {e}") from e
    return image, captions


def _offsets(chunks: Sequence[bytes]):
  offsets = np.zeros(len(chunks) + 1, np.int64)
  offsets[1:] = np.cumsum([len(c) for c in chunks])
  return np.frombuffer(b"".join(chunks), np.uint8), offsets


def encode_captioned_shard(
  images: CaptionedImages,
  indices: Sequence[int],
  ae: Autoencoder,
  *,
  batch_size: int,
  rng: jax.Array,
  pool: concurrent.futures.Executor,
  done: Callable[[int], None] | None = None,
) -> dict:
  """One shard of one bucket: latents (a posterior sample for KL
  autoencoders), the captions as JSON, the resized images as PNG."""
  import jax  # pylint: disable=g-import-not-at-top

  loaded = list(pool.map(images.__getitem__, indices))
  pixels = np.stack([p for p, _ in loaded])
  latents = []
  for b, start in enumerate(range(0, len(pixels), batch_size)):
    chunk = pixels[start : start + batch_size]
    n = len(chunk)
    if n < batch_size:  # One batch shape per bucket: one compile.
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    latents.append(
      np.asarray(ae.encode(to_unit(chunk), rng=jax.random.fold_in(rng, b)))[:n]
    )
    if done is not None:
      done(n)
  text_bytes, text_offsets = _offsets(
    [json.dumps(c, ensure_ascii=False).encode("utf-8") for _, c in loaded]
  )
  image_bytes, image_offsets = _offsets(list(pool.map(png_bytes, pixels)))
  return dict(
    latent=np.concatenate(latents).astype(np.float32),
    text_bytes=text_bytes,
    text_offsets=text_offsets,
    image_bytes=image_bytes,
    image_offsets=image_offsets,
  )


def prepare_captioned(
  images: CaptionedImages,
  ae: Autoencoder,
  data_dir: str,
  *,
  batch_size: int = 32,
  shard_size: int = 1000,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 8,
  progress: bool = True,
  barrier: Callable[[str], None] | None = None,
) -> list[str]:
  """Encodes a captioned corpus into one dataset per bucket under
  ``data_dir``; returns their directories (on process 0; [] elsewhere).
  Finished shards, and buckets already written, are kept and skipped."""
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.core import resumable  # pylint: disable=g-import-not-at-top
  from tim_jax.data import captioned  # pylint: disable=g-import-not-at-top
  from tim_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top

  if not len(images):
    raise UserError("no images to prepare: the image source is empty")
  groups = {}
  for i, bucket in enumerate(images.buckets):
    groups.setdefault(bucket, []).append(i)
  shapes = {b: ae.latent_shape(*b) for b in groups}  # Fails if no fit.
  inputs = images.fingerprint()
  base = jax.random.key(seed)
  written = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for k, (bucket, rows) in enumerate(sorted(groups.items())):
      name = captioned.bucket_name(shapes[bucket])
      shards = [
        rows[s : s + shard_size] for s in range(0, len(rows), shard_size)
      ]
      work = resumable.Parts(
        paths.join(data_dir, "shards", name),
        "shard",
        [len(s) for s in shards],
        meta=dict(
          bucket=list(bucket),
          seed=seed,
          batch_size=batch_size,
          autoencoder=ae.name,
          autoencoder_weights=ae.fingerprint(),
          inputs=inputs,
          latent_shape=list(shapes[bucket]),
          rows=[rows[0], rows[-1], len(rows)],
        ),
        process_index=process_index,
        process_count=process_count,
        desc=f"encoding {bucket[0]}x{bucket[1]}",
        progress=progress,
      )
      key = jax.random.fold_in(base, k)
      for i in work.todo():
        work.save(
          i,
          encode_captioned_shard(
            images,
            shards[i],
            ae,
            batch_size=batch_size,
            rng=jax.random.fold_in(key, i),
            pool=pool,
            done=work.advance,
          ),
        )
      if not work.finish(barrier):
        continue
      try:
        written.append(latents_lib.find_dataset(data_dir, config=name))
        continue  # Written by an earlier run.
      except FileNotFoundError:
        pass
      written.append(
        latents_lib.write_latents(
          work.directory,
          data_dir,
          latent_shape=shapes[bucket],
          cond="text",
          images=True,
        )
      )
  return written
