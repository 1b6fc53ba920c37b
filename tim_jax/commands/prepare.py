"""Images to a latent dataset: ``python -m tim_jax.commands.prepare``.

    # ImageNet-style class folders -> SD-VAE latents, flips and crops.
    python -m tim_jax.commands.prepare --images=imagenet/train \\
        --autoencoder=sd_vae_ft_ema --autoencoder_path=sd-vae-ft-ema \\
        --resolution=256 --data_dir=latents/imagenet256
    # Captioned images -> DC-AE latents in aspect buckets.
    python -m tim_jax.commands.prepare --captioned=corpus/ --resolution=1024 \\
        --autoencoder=dc_ae_f32c32_sana_1.1 \\
        --autoencoder_path=dc-ae-f32c32-sana-1.1-diffusers --data_dir=latents/t2i
    # The official released ImageNet latents, with their images for REPA.
    python -m tim_jax.commands.prepare \\
        --official_latents=datasets/imagenet1k/sd-vae-ft-ema-256x256 \\
        --images=imagenet/train --data_dir=latents/imagenet256
    # The official T2I toy dataset, unpacked.
    python -m tim_jax.commands.prepare \\
        --official_t2i=datasets/t2i_toy_dataset \\
        --autoencoder=dc_ae_f32c32_sana_1.1 \\
        --autoencoder_path=dc-ae-f32c32-sana-1.1-diffusers --data_dir=latents/t2i

Exactly one source: ``--images`` (with ``--official_latents`` or an
autoencoder), ``--captioned``, ``--manifest``, ``--official_t2i`` or
``--tfds`` (see ``tim_jax.data.prepare`` and ``tim_jax.data.official``).
Finished shards are kept in ``DATA_DIR/shards/``; a rerun skips them.
``--distributed`` shares the shards among a multi-host job's processes.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from tim_jax.commands import cli
from tim_jax.core.errors import UserError

SOURCES = ("images", "captioned", "manifest", "official_t2i", "tfds")
AUTOENCODERS = ("sd_vae_ft_ema", "dc_ae_f32c32_sana_1.1")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "images",
    None,
    "An ImageFolder-style directory: <class>/<image> (local or gs://).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "captioned",
    None,
    "Text-to-image: a folder of "
    "images, each with a same-named .txt of captions (one "
    "per line).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "manifest",
    None,
    "Text-to-image: a JSONL file, one "
    "image per line: image_file (or path), captions (or "
    "caption), optional bucket (the official "
    "data_info.jsonl is one).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "manifest_root",
    None,
    "The folder the manifest's "
    "paths are relative to (default: the manifest's "
    "folder).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "official_latents",
    None,
    "The official released ImageNet latents "
    "(tools/download_imagenet_*.sh, unzipped: <class>/<image "
    "stem>.safetensors), imported with the --images they were made "
    "from; no autoencoder needed.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "official_t2i",
    None,
    "The official T2I toy dataset folder "
    "(tools/download_toy_t2i_dataset.sh, dataset.tar.gz unpacked): "
    "data_info.jsonl, bucket_sampler.json and the images.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "tfds",
    None,
    "A TFDS image dataset name, e.g. "
    "imagenet2012 (already prepared in --tfds_data_dir).",
    flag_values=fv,
  )
  flags.DEFINE_string("tfds_split", "train", "The TFDS split.", flag_values=fv)
  flags.DEFINE_string(
    "tfds_data_dir", None, "The TFDS data_dir.", flag_values=fv
  )
  flags.DEFINE_enum(
    "autoencoder", None, list(AUTOENCODERS), "The autoencoder.", flag_values=fv
  )
  flags.DEFINE_string(
    "autoencoder_path",
    None,
    "The autoencoder's diffusers directory, local or gs:// "
    "(required except with --official_latents).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "resolution",
    256,
    "Crop size in pixels (256 or 512 "
    "for the paper); for captioned images the side of "
    "the nominal square: buckets have about its area, "
    "sides multiples of 32.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "data_dir",
    None,
    "Where the shards and the TFDS dataset go (local or gs://).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    32,
    "Images per encoder call (per process).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "shard_size",
    1000,
    "Images per resumable shard.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "seed", 0, "Seed of the posterior samples.", flag_values=fv
  )
  flags.DEFINE_integer(
    "workers",
    8,
    "Threads that read and crop images.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize()"
    " and share the work among the job's processes.",
    flag_values=fv,
  )
  flags.mark_flags_as_required(["data_dir"], flag_values=fv)

  @flags.multi_flags_validator(
    ["official_latents", "images", "autoencoder", "autoencoder_path"],
    message="--official_latents needs --images (the images the latents "
    "were made from); every other source needs --autoencoder and "
    "--autoencoder_path",
    flag_values=fv,
  )
  def _needs(v):
    if v["official_latents"] is not None:
      return v["images"] is not None
    return v["autoencoder"] is not None and v["autoencoder_path"] is not None

  flags.mark_flags_as_mutual_exclusive(
    list(SOURCES), required=True, flag_values=fv
  )


def main(fv: flags.FlagValues, args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  barrier = None
  if fv.distributed:
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # Not in a multi-host job.
      raise UserError(f"--distributed: {e}") from None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    barrier = multihost_utils.sync_global_devices
  # One job per data directory: a second one stops here, before any work.
  with cli.lock_output(fv.data_dir, "prepare"):
    run(fv, barrier)


def run(fv: flags.FlagValues, barrier) -> None:
  """Encodes the source the flags name into ``--data_dir``."""
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top
  from tim_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from tim_jax.data import prepare  # pylint: disable=g-import-not-at-top

  if fv.official_latents:
    run_official_latents(fv, barrier)
    return
  mesh = sharding.make_mesh(
    {"data": jax.local_device_count()}, devices=jax.local_devices()
  )
  ae = autoencoders.from_diffusers(
    fv.autoencoder_path, mesh=mesh, name=fv.autoencoder
  )
  ae.latent_shape(fv.resolution, fv.resolution)  # Fails if no fit.
  kw = dict(
    batch_size=fv.batch_size,
    shard_size=fv.shard_size,
    seed=fv.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    workers=fv.workers,
    barrier=barrier,
  )
  start = time.time()
  if fv.captioned or fv.manifest or fv.official_t2i:
    from tim_jax.data import captioned, official  # pylint: disable=g-import-not-at-top

    if fv.captioned:
      items = captioned.read_folder(fv.captioned)
    elif fv.manifest:
      items = captioned.read_manifest(fv.manifest, fv.manifest_root)
    else:
      items = official.read_t2i(fv.official_t2i)
    images = prepare.CaptionedImages(items, fv.resolution)
    paths = prepare.prepare_captioned(images, ae, fv.data_dir, **kw)
    if paths:
      print(
        f"wrote {len(images)} captioned images' latents ({ae.name}) "
        f"in {len(paths)} buckets to {fv.data_dir} in "
        f"{time.time() - start:.0f} s:"
      )
      for path in paths:
        print(f"  {path}")
      print(
        f"  train with --config.data.name=captions "
        f"--config.data.data_dir={fv.data_dir}"
      )
    return
  images = (
    prepare.FolderImages(fv.images, fv.resolution)
    if fv.images
    else prepare.TfdsImages(
      fv.tfds, fv.tfds_split, fv.tfds_data_dir, fv.resolution
    )
  )
  try:
    path = prepare.prepare(images, ae, fv.data_dir, **kw)
  except FileExistsError as e:  # Another dataset is there already.
    raise UserError(str(e)) from None
  if path:
    latent = ae.latent_shape(fv.resolution, fv.resolution)
    print(
      f"wrote {len(images)} images' latents ({ae.name}, "
      f"{fv.resolution}px -> {latent}) to {path} in "
      f"{time.time() - start:.0f} s"
    )
    print(f"  train with --config.data.data_dir={fv.data_dir}")


def run_official_latents(fv: flags.FlagValues, barrier) -> None:
  """Imports the official latents and their images into ``--data_dir``."""
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.data import official  # pylint: disable=g-import-not-at-top

  start = time.time()
  source = official.OfficialLatents(
    fv.official_latents,
    fv.images,
    # Only a --resolution the user gave is checked; else the latents say.
    resolution=fv.resolution if fv["resolution"].present else None,
    autoencoder=fv.autoencoder,
    workers=fv.workers,
  )
  try:
    path = official.import_latents(
      source,
      fv.data_dir,
      shard_size=fv.shard_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      workers=fv.workers,
      barrier=barrier,
    )
  except FileExistsError as e:  # Another dataset is there already.
    raise UserError(str(e)) from None
  if path:
    print(
      f"imported {len(source)} official latents {source.latent_shape} "
      f"with their {source.size}px crops and flips to {path} in "
      f"{time.time() - start:.0f} s"
    )
    print(f"  train with --config.data.data_dir={fv.data_dir}")


def entry() -> None:
  """The console script ``tim-prepare``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
