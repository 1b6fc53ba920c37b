"""Latent datasets: precomputed autoencoder latents in array_record files.

Training at scale reads latents (e.g. SD-VAE 32x32x4 for ImageNet 256)
rather than images. They are written once, as a TensorFlow Datasets dataset
in the array_record format (random access, so grain can shuffle globally and
checkpoint its position), and read back with ``LatentSource``.

Input: a directory of ``.npz`` shards, each holding

* ``latent``: (N, H, W, C) float, NHWC;
* ``label``: (N,) integer class ids (``cond="label"``), or
* ``caption``: (N, M, D) float caption features (``cond="caption"``), or
* ``text_bytes`` (uint8) and ``text_offsets`` (N + 1,) int64: each
  example's captions as a UTF-8 JSON list of strings, end to end
  (``cond="text"``; written by ``python -m tim_jax.commands.prepare --captioned``);
* optionally ``repa_features``: (N, T, D) float token features of a frozen
  vision encoder for the REPA loss (``repa_shape=(T, D)``), returned as the
  batch key ``repa_features`` that the paper configs' REPA loss reads;
* optionally ``latent_flip``: (N, H, W, C), the latent of each image's
  horizontal flip (``flip=True``; written by ``python -m tim_jax.commands.prepare``).
  Training then takes the original or the flip with probability 1/2 per
  visit, as the official C2I loader does;
* optionally ``image_bytes`` (uint8, all images' encoded bytes end to end)
  and ``image_offsets`` (N + 1,) int64: each example's cropped image as a
  PNG or JPEG (``images=True``), kept for encoders that see pixels.

Write (nothing is downloaded; shards are read in file-name order and their
rows keep that order in the dataset)::

    python -m tim_jax.commands.latents --input_dir=SHARDS --data_dir=LATENTS \
        --latent_shape=32,32,4 --cond=label

Read::

    source = LatentSource("LATENTS")   # example: {"image", "label"}
    it = pipeline.make_iterator(source, global_batch_size=256, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import io
import os
import tempfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from tim_jax.core import paths
from tim_jax.core.errors import UserError

CONDS = ("label", "caption", "text")
NAME = "tim_latents"


class _MissingArray(UserError, KeyError):
  """A shard without an array its dataset needs: a UserError (one line from
  the commands) that is also the KeyError a missing npz key has been."""

  __str__ = UserError.__str__  # The message, not KeyError's repr of it.


def config_name(
  latent_shape: Sequence[int],
  cond: str = "label",
  cap_shape: Sequence[int] | None = None,
  repa_shape: Sequence[int] | None = None,
  flip: bool = False,
  images: bool = False,
) -> str:
  """e.g. ``label_32x32x4``, ``caption_32x32x4_77x768``,
  ``label_32x32x4_repa256x768`` or ``label_32x32x4_flip_img``."""
  name = f"{cond}_" + "x".join(str(int(n)) for n in latent_shape)
  if cap_shape is not None:
    name += "_" + "x".join(str(int(n)) for n in cap_shape)
  if repa_shape is not None:
    name += "_repa" + "x".join(str(int(n)) for n in repa_shape)
  if flip:
    name += "_flip"
  if images:
    name += "_img"
  return name


@dataclasses.dataclass
class TimLatentsConfig(tfds.core.BuilderConfig):
  """What one latent dataset holds; the name is ``config_name(...)``."""

  latent_shape: tuple[int, int, int] = (32, 32, 4)
  cond: str = "label"
  cap_shape: tuple[int, int] | None = None
  repa_shape: tuple[int, int] | None = None
  flip: bool = False
  images: bool = False


def make_config(
  latent_shape: Sequence[int],
  cond: str = "label",
  cap_shape: Sequence[int] | None = None,
  repa_shape: Sequence[int] | None = None,
  flip: bool = False,
  images: bool = False,
) -> TimLatentsConfig:
  """The TFDS builder config of a latent dataset's shapes and extras (checked)."""
  latent_shape = tuple(int(n) for n in latent_shape)
  if len(latent_shape) != 3 or min(latent_shape) < 1:
    raise UserError(
      f"latent_shape must be (H, W, C) positive, got {latent_shape}"
    )
  if cond not in CONDS:
    raise UserError(f"cond must be one of {CONDS}, got {cond!r}")
  if cond == "caption":
    if cap_shape is None:
      raise UserError("cond='caption' needs cap_shape=(M, D)")
    cap_shape = tuple(int(n) for n in cap_shape)
    if len(cap_shape) != 2 or min(cap_shape) < 1:
      raise UserError(f"cap_shape must be (M, D) positive, got {cap_shape}")
  elif cap_shape is not None:
    raise UserError(f"cap_shape={cap_shape} is only for cond='caption'")
  if repa_shape is not None:
    repa_shape = tuple(int(n) for n in repa_shape)
    if len(repa_shape) != 2 or min(repa_shape) < 1:
      raise UserError(f"repa_shape must be (T, D) positive, got {repa_shape}")
  return TimLatentsConfig(
    name=config_name(latent_shape, cond, cap_shape, repa_shape, flip, images),
    version="1.0.0",
    latent_shape=latent_shape,
    cond=cond,
    cap_shape=cap_shape,
    repa_shape=repa_shape,
    flip=bool(flip),
    images=bool(images),
    description=f"latents {latent_shape}, conditioned on {cond}",
  )


class TimLatents(tfds.core.GeneratorBasedBuilder):
  """Autoencoder latents with class labels or caption features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  # The common cases; any other shape is a config made by make_config.
  BUILDER_CONFIGS = [
    make_config((32, 32, 4), "label"),  # ImageNet 256, SD-VAE.
    make_config((16, 16, 32), "label"),  # ImageNet 512, DC-AE f32c32.
  ]
  # Nothing is downloaded, so there are no URL checksums to look up. Saying
  # so also skips tfds 4.9.10's checksum-file lookup, which imports the
  # `importlib_resources` backport (not installed on Python >= 3.9).
  url_infos = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put .npz shards in the manual directory, each with 'latent' "
    "(N, H, W, C) and 'label' (N,) or 'caption' (N, M, D)."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    # Encoding.BYTES stores raw array bytes: reading is a frombuffer, where
    # the default (a float list in a tf.train.Example) parses every number.
    features = {
      "latent": tfds.features.Tensor(
        shape=c.latent_shape,
        dtype=np.float32,
        encoding=tfds.features.Encoding.BYTES,
      )
    }
    if c.cond == "label":
      features["label"] = tfds.features.Tensor(shape=(), dtype=np.int64)
    elif c.cond == "text":
      # The captions as a JSON list, UTF-8 bytes.
      features["captions"] = tfds.features.Tensor(shape=(), dtype=np.object_)
    else:
      features["caption"] = tfds.features.Tensor(
        shape=c.cap_shape,
        dtype=np.float32,
        encoding=tfds.features.Encoding.BYTES,
      )
    if c.repa_shape is not None:
      features["repa_features"] = tfds.features.Tensor(
        shape=c.repa_shape,
        dtype=np.float32,
        encoding=tfds.features.Encoding.BYTES,
      )
    if c.flip:
      features["latent_flip"] = tfds.features.Tensor(
        shape=c.latent_shape,
        dtype=np.float32,
        encoding=tfds.features.Encoding.BYTES,
      )
    if c.images:
      # The encoded file as it was written (PNG or JPEG), undecoded.
      features["image"] = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=tfds.features.FeaturesDict(features),
      # Keep the shards' order: grain shuffles at read time, and an
      # ordered dataset lets anyone map row i back to its input file.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    files = _shard_files(dl_manager.manual_dir)
    return {"train": self._generate_examples(files)}

  def _generate_examples(self, files):
    c = self.builder_config
    for path in files:
      latent, cond, repa = _read_shard(path, c)
      flips, crops = _read_extras(path, c, latent.shape[0])
      stem = os.path.splitext(path.rpartition("/")[2])[0]
      for i in range(latent.shape[0]):
        example = {
          "latent": latent[i],
          ("captions" if c.cond == "text" else c.cond): cond[i],
        }
        if repa is not None:
          example["repa_features"] = repa[i]
        if flips is not None:
          example["latent_flip"] = flips[i]
        if crops is not None:
          example["image"] = crops[i]
        yield f"{stem}/{i:09d}", example


def _shard_files(input_dir) -> list[str]:
  input_dir = paths.absolute(input_dir)  # Local or gs://.
  if not paths.as_path(input_dir).is_dir():
    raise FileNotFoundError(f"input_dir {input_dir!r} is not a directory")
  files = sorted(
    paths.join(input_dir, f.name)
    for f in paths.as_path(input_dir).iterdir()
    if f.name.endswith(".npz")
  )
  if not files:
    raise FileNotFoundError(f"no .npz shards in input_dir {input_dir!r}")
  return files


def _load(path: str):
  """The npz at ``path``, or a UserError naming it when it is not one."""
  try:
    if paths.is_remote(path):
      return np.load(io.BytesIO(paths.as_path(path).read_bytes()))
    return np.load(path)
  except (ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path} is not a readable .npz file: {e}") from None


def _read_shard(path: str, c: TimLatentsConfig):
  """(latent float32 (N, H, W, C), cond (N,) int64 or (N, M, D) float32,
  REPA features float32 (N, T, D) or None)."""
  keys = (
    ("latent",)
    + (("text_bytes", "text_offsets") if c.cond == "text" else (c.cond,))
    + (("repa_features",) if c.repa_shape is not None else ())
  )
  with _load(path) as z:
    for key in keys:
      if key not in z:
        raise _MissingArray(f"{path}: no array {key!r} (has {sorted(z.files)})")
    latent = z["latent"]
    cond = (
      _texts(path, z["text_bytes"], z["text_offsets"])
      if c.cond == "text"
      else z[c.cond]
    )
    repa = z["repa_features"] if c.repa_shape is not None else None
  if latent.ndim != 4 or latent.shape[1:] != c.latent_shape:
    raise UserError(
      f"{path}: 'latent' must be (N, *{c.latent_shape}), got {latent.shape}"
    )
  if not np.issubdtype(latent.dtype, np.floating):
    raise UserError(f"{path}: 'latent' must be floating, got {latent.dtype}")
  n = latent.shape[0]
  if c.cond == "label":
    if cond.shape != (n,) or not np.issubdtype(cond.dtype, np.integer):
      raise UserError(
        f"{path}: 'label' must be integers of shape ({n},), "
        f"got {cond.dtype} {cond.shape}"
      )
    if n and cond.min() < 0:
      raise UserError(f"{path}: 'label' has negative values (min {cond.min()})")
    cond = cond.astype(np.int64)
  elif c.cond == "text":
    if len(cond) != n:
      raise UserError(f"{path}: {len(cond)} caption lists for {n} latents")
  else:
    cond = _features(path, "caption", cond, (n,) + c.cap_shape)
  if not np.isfinite(latent).all():
    raise UserError(f"{path}: 'latent' has non-finite values")
  if repa is not None:
    repa = _features(path, "repa_features", repa, (n,) + c.repa_shape)
  return latent.astype(np.float32), cond, repa


def _read_extras(path: str, c: TimLatentsConfig, n: int):
  """(latent_flip float32 (N, H, W, C) or None, [bytes] * N or None)."""
  flips = crops = None
  with _load(path) as z:
    if c.flip:
      if "latent_flip" not in z:
        raise _MissingArray(
          f"{path}: no array 'latent_flip' (has {sorted(z.files)})"
        )
      flips = _features(
        path, "latent_flip", z["latent_flip"], (n,) + c.latent_shape
      )
    if c.images:
      for key in ("image_bytes", "image_offsets"):
        if key not in z:
          raise _MissingArray(
            f"{path}: no array {key!r} (has {sorted(z.files)})"
          )
      data, offsets = z["image_bytes"], z["image_offsets"]
      if offsets.shape != (n + 1,) or offsets[-1] != data.size:
        raise UserError(
          f"{path}: 'image_offsets' must be ({n + 1},) "
          f"ending at len(image_bytes)"
        )
      crops = [data[offsets[i] : offsets[i + 1]].tobytes() for i in range(n)]
  return flips, crops


def _texts(path, data, offsets) -> list:
  """Each example's captions (JSON bytes), checked: a non-empty list of
  strings."""
  import json  # pylint: disable=g-import-not-at-top

  n = offsets.shape[0] - 1
  if offsets.ndim != 1 or n < 0 or offsets[-1] != data.size:
    raise UserError(
      f"{path}: 'text_offsets' must be (N + 1,) ending at len(text_bytes)"
    )
  out = []
  for i in range(n):
    raw = data[offsets[i] : offsets[i + 1]].tobytes()
    try:
      caps = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(
        f"{path}: captions of example {i} are not UTF-8 JSON: {e}"
      ) from e
    if (
      not isinstance(caps, list)
      or not caps
      or not all(isinstance(t, str) for t in caps)
    ):
      raise UserError(
        f"{path}: captions of example {i} must be a non-empty"
        f" list of strings, got {caps!r}"
      )
    out.append(raw)
  return out


def _features(path, name, array, shape):
  """``array`` as float32, or a ValueError naming the shard and the key."""
  if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
    raise UserError(
      f"{path}: {name!r} must be floating of shape {shape}, "
      f"got {array.dtype} {array.shape}"
    )
  return array.astype(np.float32)


def write_latents(
  input_dir: str | os.PathLike[str],
  data_dir: str | os.PathLike[str],
  *,
  latent_shape: Sequence[int],
  cond: str = "label",
  cap_shape: Sequence[int] | None = None,
  repa_shape: Sequence[int] | None = None,
  flip: bool = False,
  images: bool = False,
) -> str:
  """Builds the dataset from ``input_dir``'s shards into ``data_dir``.

  Returns the dataset's directory
  (``data_dir/tim_latents/<config>/<version>``). An existing dataset there
  is never overwritten or silently reused: that raises FileExistsError.
  """
  config = make_config(latent_shape, cond, cap_shape, repa_shape, flip, images)
  files = _shard_files(input_dir)  # Fail before tfds makes any directory.
  for path in files:  # Check every shard before writing anything.
    n = _read_shard(path, config)[0].shape[0]
    _read_extras(path, config, n)
  # tfds refuses a config object of a registered config's name: use the
  # registered one (its name spells every field, so they are equal).
  config = TimLatents.builder_configs.get(config.name, config)
  data_dir = paths.absolute(data_dir)
  target = paths.join(data_dir, NAME, config.name, str(TimLatents.VERSION))
  if paths.as_path(target).exists():
    raise FileExistsError(
      f"a {NAME}/{config.name} dataset already exists at "
      f"{target}; delete it or choose another data_dir"
    )
  # tfds makes (empty) download folders; keep them out of data_dir. A
  # bucket's dataset is written here first (array_record writes local
  # files only), then copied up whole.
  with tempfile.TemporaryDirectory() as scratch:
    staged = paths.is_remote(data_dir)
    builder = TimLatents(
      config=config,
      data_dir=os.path.join(scratch, "data") if staged else data_dir,
      file_format="array_record",
    )
    builder.download_and_prepare(
      download_dir=os.path.join(scratch, "downloads"),
      download_config=tfds.download.DownloadConfig(
        manual_dir=paths.absolute(input_dir), try_download_gcs=False
      ),
    )
    if staged:
      paths.copytree(os.fspath(builder.data_dir), target)
  return target


def find_dataset(
  data_dir: str | os.PathLike[str], config: str | None = None
) -> str:
  """The versioned directory of a tim_latents dataset under ``data_dir``.

  ``data_dir`` may be the tfds data_dir given to ``write_latents`` (then
  ``config`` picks among several datasets), or a dataset directory itself.
  """
  data_dir = paths.absolute(data_dir)  # Local or gs://.
  if paths.as_path(paths.join(data_dir, "dataset_info.json")).exists():
    return data_dir
  root = paths.as_path(paths.join(data_dir, NAME))
  found = []
  if root.is_dir():
    for cdir in sorted(root.iterdir(), key=lambda p: p.name):
      if config is not None and cdir.name != config:
        continue
      versions = (
        [v.name for v in cdir.iterdir() if (v / "dataset_info.json").exists()]
        if cdir.is_dir()
        else []
      )
      if versions:
        newest = max(
          versions,
          key=lambda v: tuple(
            int(p) if p.isdigit() else -1 for p in v.split(".")
          ),
        )
        found.append(paths.join(cdir, newest))
  if not found:
    what = f"config {config!r}" if config else "any config"
    raise FileNotFoundError(
      f"no {NAME} dataset ({what}) under {data_dir!r}; "
      "write one with python -m tim_jax.commands.latents"
    )
  if len(found) > 1:
    raise UserError(
      f"several {NAME} datasets under {data_dir!r}: "
      f"{[f.rsplit('/', 2)[1] for f in found]}"
      "; pass config=NAME, or the directory of one of them"
    )
  return found[0]


class LatentSource:
  """Random-access source over a written latent dataset.

  Example ``i``: ``image`` float32 (H, W, C) (the latent, NHWC) and either
  ``label`` int32 or ``caption_features`` float32 (M, D), and
  ``repa_features`` float32 (T, D) when the dataset has them, and
  ``image_flip`` (the flipped image's latent) when it has flips: the
  pipeline then keeps one of the two at random per visit
  (``tim_jax.data.pipeline.pick_flip``). ``with_images=True`` adds
  ``pixels``, the cropped image (uint8 (H, W, 3); flipped with its latent),
  for teachers that look at pixels. Picklable (the files are opened lazily
  in each process), so it works with grain workers.
  """

  def __init__(
    self,
    data_dir,
    split: str = "train",
    config: str | None = None,
    with_images: bool = False,
  ):
    self.path = find_dataset(data_dir, config)
    self.split = split
    try:
      builder = tfds.builder_from_directory(self.path)
    except Exception as e:  # pylint: disable=broad-except
      # tfds raises UnicodeDecodeError / JSONDecodeError / KeyError for a
      # damaged dataset_info.json without naming the file.
      raise UserError(
        f"cannot read the dataset at {self.path}: "
        f"{paths.join(self.path, 'dataset_info.json')} (or its "
        f"features.json) is damaged ({type(e).__name__}: "
        f"{str(e)[:200]}); write the dataset again with "
        "python -m tim_jax.commands.prepare"
      ) from None
    if split not in builder.info.splits:
      raise UserError(
        f"split {split!r} not in {self.path} (has "
        f"{sorted(builder.info.splits)})"
      )
    self._num_examples = builder.info.splits[split].num_examples
    features = builder.info.features
    self.latent_shape = tuple(features["latent"].shape)
    self.cond = (
      "label"
      if "label" in features
      else "text"
      if "captions" in features
      else "caption"
    )
    self.cap_shape = (
      tuple(features["caption"].shape) if self.cond == "caption" else None
    )
    self.repa_shape = (
      tuple(features["repa_features"].shape)
      if "repa_features" in features
      else None
    )
    self.has_flips = "latent_flip" in features
    self.has_images = "image" in features
    if with_images and not self.has_images:
      raise UserError(
        f"{self.path} holds no images (write it with "
        "python -m tim_jax.commands.prepare)"
      )
    self.with_images = with_images
    self._source = None

  def _data_source(self):
    if self._source is None:
      builder = tfds.builder_from_directory(self.path)
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(
        f"index {index} out of range for {self.path} "
        f"split {self.split!r} of {self._num_examples}"
      )
    ex = self._data_source()[index]
    out = {"image": np.asarray(ex["latent"], np.float32)}
    if self.cond == "label":
      out["label"] = np.int32(ex["label"])
    elif self.cond == "text":
      import json  # pylint: disable=g-import-not-at-top

      out["captions"] = json.loads(bytes(ex["captions"]).decode("utf-8"))
    else:
      out["caption_features"] = np.asarray(ex["caption"], np.float32)
    if self.repa_shape is not None:
      out["repa_features"] = np.asarray(ex["repa_features"], np.float32)
    if self.has_flips:
      out["image_flip"] = np.asarray(ex["latent_flip"], np.float32)
    if self.with_images:
      from PIL import Image  # pylint: disable=g-import-not-at-top

      with Image.open(io.BytesIO(bytes(ex["image"]))) as im:
        out["pixels"] = np.asarray(im.convert("RGB"))
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # Open files do not travel to workers.
    return state

  def __repr__(self):
    return (
      f"LatentSource({self.path!r}, split={self.split!r}, "
      f"n={self._num_examples})"
    )
