"""The official TiM repository's released data, read as released.

**ImageNet latents** (``tools/download_imagenet_256x256.sh`` and
``..._512x512.sh`` of github.com/WZDTHU/TiM, unzipped into one folder):
one ``<class>/<stem>.safetensors`` per training image, as
``projects/preprocess/image_latent_c2i.py`` writes them:

* ``latent``: float (2, C, H, W), channels first: the autoencoder's
  posterior sample of the ADM centre crop and of its horizontal flip,
  stacked, already scaled (``sd_vae_encode`` / ``dc_ae_encode`` in
  ``tim/models/vae/__init__.py`` return ``(z - mean) / std`` with mean 0
  and std 1 / scaling_factor: the latents tim_jax's autoencoders give);
* ``label``: a scalar, the image's ImageFolder class index (the
  preprocessing casts it to float32 with the pixels).

The official loader (``ImagenetLatentDataset`` in ``tim/data/c2i_data.py``)
pairs each image of ``image_dir/<class>/`` with the latent of the same stem
(its name up to the first dot) in ``latent_dir/<class>/`` and trains on
the original or the flip, with its crop, with probability 1/2 each.
``import_latents`` writes them, with the crops (PNG) for REPA, as the same
``tim_latents`` dataset ``python -m tim_jax.commands.prepare --images``
writes (``latent``, ``latent_flip``, ``label``, ``image``), so training
reads it unchanged and makes the same choice per visit.

**The T2I toy dataset** (``tools/download_toy_t2i_dataset.sh``):
``data_info.jsonl`` (one image per line: ``image_file`` relative to the
folder, ``captions``, ``bucket`` ``...-HxW``), ``bucket_sampler.json``
(the packed batches: lists of line indices, one bucket each) and the
images in ``dataset.tar.gz``, unpacked into the same folder.
``read_t2i`` lists it for ``tim_jax.data.prepare.prepare_captioned``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
import json
import logging
import os

from etils import epath
import numpy as np

from tim_jax.core import fingerprint
from tim_jax.core.errors import UserError
from tim_jax.data import captioned
from tim_jax.data import prepare as prepare_lib

# The released latent sets' autoencoders, told apart by their channels:
# SD-VAE-ft-EMA (4, 256 px) and DC-AE f32c32 (32, 512 px).
AUTOENCODER_BY_CHANNELS = {4: "sd_vae_ft_ema", 32: "dc_ae_f32c32_sana_1.1"}
SUFFIX = ".safetensors"


def latent_stem(image_name: str) -> str:
  """The official rule for an image's latent file name: the name up to
  its first dot (``n01440764_10026.JPEG`` -> ``n01440764_10026``)."""
  return image_name.split(".")[0]


def read_latent_file(path: str) -> tuple[np.ndarray, float]:
  """(``latent`` as stored, ``label`` as a float) of one official file;
  UserError naming the file for anything else."""
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top

  try:
    data = st.load(epath.Path(path).read_bytes())
  except KeyError as e:  # safetensors' numpy reader lacks this dtype.
    raise UserError(f"cannot read {path}: unsupported dtype {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read {path} as safetensors: {e}") from None
  for key in ("latent", "label"):
    if key not in data:
      raise UserError(
        f"{path}: no key {key!r} (has {sorted(data)}); the official "
        "latents hold 'latent' (2, C, H, W) and 'label'"
      )
  latent, label = data["latent"], data["label"]
  if not np.issubdtype(latent.dtype, np.floating):
    raise UserError(f"{path}: 'latent' must be floating, got {latent.dtype}")
  if label.size != 1 or label.dtype.kind not in "iuf":
    raise UserError(
      f"{path}: 'label' must be one number, got {label.dtype} {label.shape}"
    )
  value = float(label.reshape(()))
  if not np.isfinite(value) or value != round(value) or value < 0:
    raise UserError(f"{path}: 'label' must be a class index, got {value}")
  return latent, value


class OfficialLatents:
  """Random access to the official latents with their images: item i is
  (latent (H, W, C) float32, its flip's latent, label, crop uint8 HWC).

  ``image_dir`` is an ImageFolder-style folder of the images the latents
  were made from (a subset of its classes or images is fine); every image
  needs its latent. ``resolution`` (the crop size) defaults to the one the
  latent shape and ``autoencoder`` imply (256 for the SD-VAE set, 512 for
  the DC-AE set). Mistakes of the listing (a missing latent, class folder
  or label order) raise UserError here, before any work; a damaged file
  when it is read.
  """

  def __init__(
    self,
    latent_dir: str,
    image_dir: str,
    resolution: int | None = None,
    autoencoder: str | None = None,
    workers: int = 8,
  ):
    root = epath.Path(latent_dir)
    if not root.is_dir():
      raise UserError(f"--official_latents {latent_dir!r} is not a directory")
    self.images = prepare_lib.FolderImages(image_dir, 0)  # Size set below.
    self.classes = self.images.classes
    have = sorted(p.name for p in root.iterdir() if p.is_dir())
    lost = [c for c in self.classes if c not in have]
    if lost:
      raise UserError(
        f"{len(lost)} class folder(s) of --images have no folder in "
        f"--official_latents {latent_dir!r}, e.g. {lost[0]!r} (it has "
        f"{have[:3] or 'no class folders'}...); give the folder that holds "
        "the unzipped class folders"
      )
    names = {c: {p.name for p in (root / c).iterdir()} for c in self.classes}
    # Strings, not Path objects: ImageNet has 1.28M of them.
    base = str(root)
    self.latent_paths, missing, seen = [], [], set()
    for path, k in self.images.items:
      cls = self.classes[k]
      name = latent_stem(os.path.basename(path)) + SUFFIX
      latent = f"{base}/{cls}/{name}"
      if name not in names[cls]:
        missing.append((path, latent))
      if (k, name) in seen:
        other = next(
          p
          for p, j in self.images.items
          if j == k and latent_stem(os.path.basename(p)) + SUFFIX == name
        )
        raise UserError(
          f"--images {other} and {path} share one latent ({latent}: the "
          "official name is the image name up to its first dot)"
        )
      seen.add((k, name))
      self.latent_paths.append(latent)
    if missing:
      raise UserError(
        f"{len(missing)} of {len(self.latent_paths)} images in --images "
        f"have no latent in --official_latents, e.g. {missing[0][0]} "
        f"(expected {missing[0][1]})"
      )
    # Each class's label and the latent shape, from its first image.
    first = {}
    for i, (_, k) in enumerate(self.images.items):
      first.setdefault(k, i)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      probes = list(
        pool.map(
          lambda i: read_latent_file(self.latent_paths[i]), first.values()
        )
      )
    shape = probes[0][0].shape
    if len(shape) != 4 or shape[0] != 2:
      raise UserError(
        f"{self.latent_paths[0]}: 'latent' must be (2, C, H, W) (the "
        f"image's and its flip's), got {shape}"
      )
    self.stored_shape = shape
    self.labels = {}
    for k, (latent, label) in zip(first, probes):
      self._check_shape(self.latent_paths[first[k]], latent)
      self.labels[k] = int(label)
    order = [self.labels[k] for k in sorted(self.labels)]
    for a, b in zip(sorted(self.labels), sorted(self.labels)[1:]):
      if self.labels[a] >= self.labels[b]:
        raise UserError(
          f"label folder mismatch in --official_latents: "
          f"{self.classes[a]}/ holds label {self.labels[a]} and "
          f"{self.classes[b]}/ label {self.labels[b]}; labels must follow "
          f"the class folders' sorted order (ImageFolder's), got {order[:6]}"
        )
    channels, height, width = shape[1:]
    self.latent_shape = (height, width, channels)
    self.size = self._resolution(resolution, autoencoder)
    self.images.size = self.size

  def _check_shape(self, path, latent):
    if latent.shape != self.stored_shape:
      raise UserError(
        f"latent shape mismatch: {path} holds {latent.shape}, other files "
        f"{self.stored_shape}"
      )

  def _resolution(self, resolution, autoencoder) -> int:
    from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top

    height, width, channels = self.latent_shape
    if height != width:
      raise UserError(f"the official latents are square; got {height}x{width}")
    released = AUTOENCODER_BY_CHANNELS.get(channels)
    if autoencoder and released and autoencoder != released:
      raise UserError(
        f"--autoencoder={autoencoder}, but latents of {channels} channels "
        f"are {released}'s"
      )
    name = autoencoder or released
    if name is None:
      if resolution is None or resolution % height:
        raise UserError(
          f"latents of {channels} channels are not a released set: give "
          f"--autoencoder or --resolution (a multiple of {height})"
        )
      return resolution
    implied = height * autoencoders.DOWNSAMPLE[name]
    if resolution is not None and resolution != implied:
      raise UserError(
        f"--resolution={resolution}, but {height}x{width} latents of {name} "
        f"come from {implied} px crops"
      )
    return implied

  def __len__(self):
    return len(self.latent_paths)

  def fingerprint(self) -> str:
    """The images' and the latents' names, sizes and modification times."""
    latents = fingerprint.of_files(self.latent_paths)
    return f"{self.images.fingerprint()}-{latents}"

  def __getitem__(self, i):
    path = self.latent_paths[i]
    latent, label = read_latent_file(path)
    self._check_shape(path, latent)
    _, k = self.images.items[i]
    if int(label) != self.labels[k]:
      raise UserError(
        f"label folder mismatch: {path} holds label {int(label)}, other "
        f"files of {self.classes[k]}/ label {self.labels[k]}"
      )
    if not np.isfinite(latent).all():
      raise UserError(f"{path}: 'latent' has non-finite values")
    # Channels first (PyTorch) -> NHWC.
    latent = np.transpose(latent.astype(np.float32), (0, 2, 3, 1))
    crop, _ = self.images[i]
    return latent[0], latent[1], int(label), crop


def read_shard(
  source: OfficialLatents,
  indices: Sequence[int],
  *,
  pool: concurrent.futures.Executor,
  done: Callable[[int], None] | None = None,
) -> dict:
  """One shard's arrays, as ``tim_jax.data.prepare.encode_shard`` makes
  them: latents, flips' latents, labels and crops as PNG."""
  loaded = list(pool.map(source.__getitem__, indices))
  files = list(pool.map(prepare_lib.png_bytes, [x[3] for x in loaded]))
  offsets = np.zeros(len(files) + 1, np.int64)
  offsets[1:] = np.cumsum([len(f) for f in files])
  if done is not None:
    done(len(indices))
  return dict(
    latent=np.stack([x[0] for x in loaded]),
    latent_flip=np.stack([x[1] for x in loaded]),
    label=np.asarray([x[2] for x in loaded], np.int64),
    image_bytes=np.frombuffer(b"".join(files), np.uint8),
    image_offsets=offsets,
  )


def import_latents(
  source: OfficialLatents,
  data_dir: str,
  *,
  shard_size: int = 1000,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 8,
  progress: bool = True,
  barrier: Callable[[str], None] | None = None,
) -> str | None:
  """Writes ``source`` into ``data_dir``; returns the dataset directory (on
  process 0; None elsewhere). As ``tim_jax.data.prepare.prepare``: shards
  of ``shard_size`` images in ``data_dir/shards/``, kept and skipped when
  rerun, process p doing shards p, p + P, ...; process 0 writes the
  dataset once all are there."""
  from tim_jax.core import resumable  # pylint: disable=g-import-not-at-top
  from tim_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top

  n = len(source)
  shards = [
    list(range(s, min(s + shard_size, n))) for s in range(0, n, shard_size)
  ]
  work = resumable.Parts(
    str(epath.Path(data_dir) / "shards"),
    "shard",
    [len(s) for s in shards],
    meta=dict(
      source="official_latents",
      num_images=n,
      resolution=source.size,
      inputs=source.fingerprint(),
      latent_shape=list(source.latent_shape),
    ),
    process_index=process_index,
    process_count=process_count,
    desc="importing",
    progress=progress,
  )
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for i in work.todo():
      work.save(i, read_shard(source, shards[i], pool=pool, done=work.advance))
  if not work.finish(barrier):
    return None
  kw = dict(cond="label", flip=True, images=True)
  try:  # A rerun of a finished job: nothing to do.
    return latents_lib.find_dataset(
      data_dir, config=latents_lib.config_name(source.latent_shape, **kw)
    )
  except FileNotFoundError:
    pass
  return latents_lib.write_latents(
    work.directory, data_dir, latent_shape=source.latent_shape, **kw
  )


def read_t2i(root: str) -> list[captioned.Item]:
  """The toy T2I dataset's images, captions and buckets, from
  ``root/data_info.jsonl`` (paths relative to ``root``, as
  ``T2IDatasetMS`` in ``tim/data/t2i_data.py`` reads them). Every image
  must be there (the official loader skips missing ones with a warning);
  ``bucket_sampler.json``, when present, must match."""
  folder = epath.Path(root)
  if not folder.is_dir():
    raise UserError(f"--official_t2i {root!r} is not a directory")
  info = folder / "data_info.jsonl"
  if not info.exists():
    raise UserError(
      f"--official_t2i {root!r} has no data_info.jsonl (the official "
      "tools/download_toy_t2i_dataset.sh downloads it there)"
    )
  items = captioned.read_manifest(str(info), str(folder))
  unbucketed = [path for path, _, bucket in items if bucket is None]
  if unbucketed:
    raise UserError(
      f"{info}: {len(unbucketed)} record(s) without 'bucket', e.g. for "
      f"{unbucketed[0]} (the official loader needs one; for a manifest "
      "without buckets use --manifest)"
    )
  missing = [path for path, _, _ in items if not epath.Path(path).exists()]
  if missing:
    hint = ""
    tarball = folder / "dataset.tar.gz"
    if tarball.exists():
      hint = f"; unpack the images first: tar -xzf {tarball} -C {folder}"
    raise UserError(
      f"{len(missing)} of {len(items)} images listed in {info} are "
      f"missing, e.g. {missing[0]}{hint}"
    )
  sampler = folder / "bucket_sampler.json"
  if sampler.exists():
    check_bucket_sampler(sampler, items)
  return items


def check_bucket_sampler(path: epath.Path, items: Sequence) -> int:
  """Checks the official packed batches against the listing: a JSON list
  of batches, each a list of line indices of one bucket. Returns the
  number of batches. tim_jax does not use them (it batches by
  ``data.bucket_batch``); a file that does not fit says the two files are
  of different downloads."""
  where = f"{path} (only checked, not used; move it away to skip the check)"
  try:
    batches = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{where}: not JSON: {e}") from None
  if not isinstance(batches, list):
    raise UserError(f"{where}: must be a list of batches")
  for b, batch in enumerate(batches):
    if (
      not isinstance(batch, list)
      or not batch
      or not all(isinstance(i, int) for i in batch)
    ):
      raise UserError(f"{where}: batch {b} is not a list of line indices")
    bad = [i for i in batch if not 0 <= i < len(items)]
    if bad:
      raise UserError(
        f"{where}: batch {b} names line {bad[0]}, but data_info.jsonl has "
        f"{len(items)} records: the files are of different downloads"
      )
    sizes = {tuple(items[i][2]) for i in batch}
    if len(sizes) > 1:
      raise UserError(
        f"{where}: batch {b} mixes buckets {sorted(sizes)}: the files are "
        "of different downloads"
      )
  logging.info("%s: %d packed batches match the listing", path, len(batches))
  return len(batches)
