"""Latent shards to a dataset: ``python -m tim_jax.commands.latents``.

    python -m tim_jax.commands.latents --input_dir=SHARDS --data_dir=LATENTS \\
        --latent_shape=32,32,4 --cond=label

writes ``.npz`` shards (see ``tim_jax.data.latents``) as an array_record
TFDS dataset that ``--config.data.data_dir=LATENTS`` trains on.
"""

from __future__ import annotations

import sys

from absl import flags

from tim_jax.commands import cli
from tim_jax.core.errors import UserError

CONDS = ("label", "caption", "text")


def shape(flag: str, text: str | None) -> tuple[int, ...] | None:
  """``"32,32,4"`` -> (32, 32, 4); None stays None."""
  if text is None:
    return None
  try:
    return tuple(int(n) for n in text.split(","))
  except ValueError:
    raise UserError(
      f"--{flag} must be comma-separated integers like 32,32,4, got {text!r}"
    ) from None


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "input_dir",
    None,
    ".npz shards with 'latent' and 'label' or 'caption'.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "data_dir", None, "The TFDS data_dir to write.", flag_values=fv
  )
  flags.DEFINE_string("latent_shape", None, "H,W,C.", flag_values=fv)
  flags.DEFINE_enum(
    "cond",
    "label",
    list(CONDS),
    "The conditioning the shards hold.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "cap_shape", None, "M,D (for --cond=caption).", flag_values=fv
  )
  flags.DEFINE_string(
    "repa_shape",
    None,
    "T,D: the shards also hold 'repa_features' (N, T, D).",
    flag_values=fv,
  )
  flags.mark_flags_as_required(
    ["input_dir", "data_dir", "latent_shape"], flag_values=fv
  )


def main(fv: flags.FlagValues, args) -> None:
  from tim_jax.data import latents  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  try:
    path = latents.write_latents(
      fv.input_dir,
      fv.data_dir,
      latent_shape=shape("latent_shape", fv.latent_shape),
      cond=fv.cond,
      cap_shape=shape("cap_shape", fv.cap_shape),
      repa_shape=shape("repa_shape", fv.repa_shape),
    )
  except FileExistsError as e:  # The dataset is there already.
    raise UserError(str(e)) from None
  source = latents.LatentSource(path)
  print(f"wrote {len(source)} examples (train) to {path}")
  print(
    f"  latent {source.latent_shape} float32, "
    + (
      "label int64"
      if source.cond == "label"
      else f"caption {source.cap_shape} float32"
    )
  )
  print(f"  read with tim_jax.data.latents.LatentSource({path!r})")


def entry() -> None:
  """The console script ``tim-latents``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
