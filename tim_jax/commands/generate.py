"""Many samples for FID: ``python -m tim_jax.commands.generate``.

    python -m tim_jax.commands.generate --model=tim-c2i-256 \\
        --num_images=50000 --num_steps=1 --cfg_scale=2.5 --out=samples.npz

(``--model``: a released model from the Hugging Face Hub; or
``--checkpoint`` and ``--config`` as for ``sample``, paths or hub ids.)

writes an ADM-style ``.npz`` (``arr_0`` uint8 images, ``arr_1`` labels or
prompt indices; see ``tim_jax.inference.generate``). Image i's noise and
label depend only on ``--seed`` and i. Finished batches are kept in
``OUT.parts/`` and skipped when the command runs again; with
``--distributed`` the job's processes share the batches.
"""

from __future__ import annotations

import sys

from absl import flags

from tim_jax.commands import cli
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_model_flags(fv)
  cli.define_sampler_flags(fv, num_steps=1)
  flags.DEFINE_integer(
    "num_images", 50_000, "Images to generate.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_string(
    "out",
    "samples.npz",
    "The .npz to write (local or gs://).",
    flag_values=fv,
  )
  flags.DEFINE_multi_string(
    "prompt", [], "Prompts (t2i), cycled.", flag_values=fv
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "jax.distributed.initialize() and "
    "share the batches among the job's processes.",
    flag_values=fv,
  )


def main(fv: flags.FlagValues, args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.inference import generate  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  if not fv.out.endswith(".npz"):
    raise UserError(
      f"--out={fv.out}: the samples are written as an .npz (ADM's layout); "
      "give a name ending in .npz"
    )
  cli.check_writable(fv.out, "--out")
  barrier = None
  if fv.distributed:
    jax.distributed.initialize()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    barrier = multihost_utils.sync_global_devices
  # One job per output: a second one stops here, before loading a model.
  with cli.lock_output(fv.out + ".parts", "generate"):
    pipe = cli.load_pipeline(fv)
    path = generate.generate(
      pipe,
      num=fv.num_images,
      out=fv.out,
      num_steps=fv.num_steps,
      seed=fv.seed,
      batch_size=fv.batch_size,
      prompts=fv.prompt,
      cfg_scale=fv.cfg_scale,
      guidance_interval=cli.guidance_interval(fv),
      stochasticity=fv.stochasticity,
      T_max=fv.T_max,
      T_min=fv.T_min,
      mode=fv.mode,
      height=fv.height,
      width=fv.width,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      barrier=barrier,
    )
  if path:
    print(f"wrote {path}: {fv.num_images} images (arr_0 uint8, arr_1 labels)")


def entry() -> None:
  """The console script ``tim-generate``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
