"""FID and Inception Score: ``python -m tim_jax.commands.fid ACTION``.

    # Reference statistics of an image folder (ADM centre crop) or an .npz.
    python -m tim_jax.commands.fid stats --images=imagenet/val \\
        --resolution=256 --inception_weights=pt_inception-2015-12-05.pth \\
        --out=ref.npz
    # FID and Inception Score of generated samples (arr_0 uint8).
    python -m tim_jax.commands.fid score --samples=samples.npz \\
        --reference=ref.npz --inception_weights=pt_inception-2015-12-05.pth
    # pytorch-fid's .pth once to .safetensors, which loads without PyTorch.
    python -m tim_jax.commands.fid convert \\
        --inception_weights=pt_inception-2015-12-05-6726825d.pth \\
        --out=fid_inception.safetensors

The network and the statistics are ``tim_jax.eval.inception`` and
``tim_jax.eval.fid``.
"""

from __future__ import annotations

import sys
import zipfile

from absl import flags
import numpy as np

from tim_jax.commands import cli
from tim_jax.core import paths
from tim_jax.core.errors import UserError

ACTIONS = ("stats", "score", "convert")


def load_images(path: str, resolution: int | None = None) -> np.ndarray:
  """uint8 (N, H, W, 3): an .npz's ``arr_0`` or a folder's images (ADM
  centre crop to ``resolution``)."""
  if paths.as_path(path).is_dir():  # Local or gs://.
    if not resolution:
      raise UserError(f"{path} is a folder of images: give --resolution")

    from tim_jax.data import prepare  # pylint: disable=g-import-not-at-top

    files = [p for p, _ in prepare.image_folder(path)[0]]
    out = []
    for f in files:
      with prepare.open_image(f) as im:
        out.append(prepare.center_crop(prepare.to_rgb(im), resolution))
    if len(out) < 2:
      raise UserError(
        f"{path}: {len(out)} image(s); FID statistics need at least 2"
      )
    return np.stack(out)
  local = paths.local_copy(path)  # gs:// copied once.
  if not zipfile.is_zipfile(local):
    raise UserError(f"{path} is not an .npz file (arr_0 images)")
  with np.load(local, allow_pickle=False) as z:
    if "arr_0" not in z:
      raise UserError(f"{path} has no 'arr_0' images (has {z.files})")
    images = z["arr_0"]
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise UserError(
      f"{path}: arr_0 must be uint8 (N, H, W, 3), got "
      f"{images.dtype} {images.shape}"
    )
  if len(images) < 2:
    raise UserError(
      f"{path}: {len(images)} image(s); FID statistics need at least 2"
    )
  return images


def load_reference(path: str, dim: int):
  """The reference statistics of an ``.npz``: its ``mu``/``sigma`` (of
  ``dim`` features, as the FID network gives), or None when it holds
  images (``arr_0``) instead."""
  from tim_jax.eval import fid  # pylint: disable=g-import-not-at-top

  local = paths.local_copy(path)  # gs:// copied once.
  if not zipfile.is_zipfile(local):
    raise UserError(f"--reference={path} is not an .npz file")
  with np.load(local, allow_pickle=False) as z:
    names = set(z.files)
  if not {"mu", "sigma"} <= names:
    if "arr_0" in names:
      return None
    raise UserError(
      f"--reference={path} holds neither mu/sigma statistics nor arr_0 "
      f"images (its keys: {sorted(names)})"
    )
  try:
    ref = fid.Statistics.load(path)
  except ValueError as e:
    raise UserError(f"--reference={path}: {e}") from None
  if ref.dim != dim:
    raise UserError(
      f"--reference={path} holds statistics of {ref.dim} features; the FID "
      f"network gives {dim} (pool3): statistics of another network or "
      "layer cannot be compared"
    )
  return ref


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "images",
    None,
    "stats: an image folder (<class>/<image>) or an .npz (arr_0); "
    "local or gs://.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "resolution",
    None,
    "stats: the centre-crop size for a folder.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "samples", None, "score: an .npz with arr_0 uint8 images.", flag_values=fv
  )
  flags.DEFINE_string(
    "reference",
    None,
    "score: an .npz with mu and sigma (or arr_0 images); local or gs://.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "inception_weights",
    None,
    "pytorch-fid's "
    "pt_inception-2015-12-05 (.pth, or converted "
    ".safetensors/.npz).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out",
    None,
    "stats: the statistics .npz; convert: the .safetensors or .npz to "
    "write (local or gs://).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    50,
    "Images per InceptionV3 call.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.mark_flag_as_required("inception_weights", flag_values=fv)


def _require(fv, action, names):
  missing = [f"--{n}" for n in names if not fv[n].value]
  if missing:
    raise UserError(f"{action} needs {', '.join(missing)}")


def main(fv: flags.FlagValues, args) -> None:
  from tim_jax.eval import fid, inception  # pylint: disable=g-import-not-at-top

  if len(args) != 1 or args[0] not in ACTIONS:
    raise UserError(f"give one action: {' | '.join(ACTIONS)} (got {args})")
  action = args[0]
  if action == "convert":
    _require(fv, action, ["out"])
    cli.check_writable(fv.out, "--out")
    sd = inception.read_state_dict(fv.inception_weights)
    try:
      inception.check_state_dict(sd)
    except UserError as e:
      raise UserError(f"--inception_weights: {e}") from None
    inception.save_state_dict(sd, fv.out)
    print(f"wrote {len(sd)} arrays to {fv.out}")
    return
  _require(
    fv,
    action,
    ["images", "out"] if action == "stats" else ["samples", "reference"],
  )
  # Every input and output is checked before the network runs.
  if action == "stats":
    cli.check_writable(fv.out, "--out")
    images = load_images(fv.images, fv.resolution)
  else:
    images = load_images(fv.samples)
    ref = load_reference(fv.reference, inception.FEATURE_DIM)
    ref_images = load_images(fv.reference) if ref is None else None
  model = inception.load_fid_weights(fv.inception_weights)
  extract = inception.FeatureExtractor(model, batch_size=fv.batch_size)
  if action == "stats":
    extract.statistics(images, progress=True).save(fv.out)
    print(f"wrote {fv.out}: statistics of {len(images)} images")
    return
  out = np.concatenate(
    list(extract.iter_features(images, progress=True, logits=True))
  )
  if ref is None:  # Reference images: their statistics.
    ref = extract.statistics(ref_images)
  dim = ref.dim
  distance = fid.Statistics.from_features(out[:, :dim]).frechet_distance(ref)
  score = fid.inception_score(out[:, dim:])
  print(
    f"FID {distance:.4f}  IS {score:.4f}  ({len(images)} samples vs "
    f"{fv.reference})"
  )


def entry() -> None:
  """The console script ``tim-fid``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
