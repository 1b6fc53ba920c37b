"""Samples from a checkpoint: ``python -m tim_jax.commands.sample``.

    # A tim_jax run (its workdir, checkpoints dir or one step's dir); the
    # config is read from the checkpoint unless --config is given.
    python -m tim_jax.commands.sample --checkpoint=workdir/t2i_tiny \\
        --prompt="a red circle at the top left" \\
        --prompt="a blue square in the center" --num_steps=4 \\
        --num_per_prompt=4 --out=grid.png

    # A released model by name, from the Hugging Face Hub (weights, config,
    # autoencoder and text encoder; cached after the first run).
    python -m tim_jax.commands.sample --model=tim-c2i-256 --labels=207,360 \\
        --steps=2 --out=grid.png
    python -m tim_jax.commands.sample --model=tim-t2i \\
        --prompt="a lighthouse at dusk" --height=1024 --width=768

    # An official checkpoint: the config gives the architecture (paths or
    # hub ids, hf://owner/repo[/file]).
    python -m tim_jax.commands.sample --config=configs/c2i.py:xl2_256 \\
        --checkpoint=hf://GoodEnough/TiM-C2I/c2i_model_256.safetensors \\
        --autoencoder_path=hf://stabilityai/sd-vae-ft-ema \\
        --labels=207,360 --num_steps=8 --cfg_scale=2.5 --out=grid.png

    # A benchmark's prompts into the folder its evaluator reads (four
    # images per prompt; resumable): GenEval or DPG-Bench.
    python -m tim_jax.commands.sample ... \\
        --prompt_set=geneval:evaluation_metadata.jsonl --out=geneval_samples

Images are laid out one row per prompt or label, ``--num_per_prompt`` per
row, the prompt or class name beside each row and images smaller than
``--min_side`` pixels enlarged; ``--raw_size`` writes a plain grid at the
images' own size instead. The noise is drawn per image from ``--seed``, so
the result does not depend on ``--batch_size``. Latent-space models decode
with their autoencoder (``--autoencoder_path``); ``--latents_out`` keeps the
raw latents too. The library form is ``tim_jax.inference``.
"""

from __future__ import annotations

import io
import sys

from absl import flags
import numpy as np

from tim_jax.commands import cli
from tim_jax.core import paths
from tim_jax.core.errors import UserError

# The largest grid the command writes as one PNG (pixels): more is a
# misuse of a picture (keep the latents with --latents_out, or sample a
# prompt set into a folder).
MAX_GRID_PIXELS = 2**28


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_model_flags(fv)
  cli.define_sampler_flags(fv, num_steps=4)
  flags.DEFINE_multi_string(
    "prompt", [], "A prompt (repeatable; t2i).", flag_values=fv
  )
  flags.DEFINE_list(
    "labels", [], "Class labels, comma-separated (c2i).", flag_values=fv
  )
  flags.DEFINE_string(
    "prompt_set",
    None,
    "geneval:METADATA.jsonl or "
    "dpg:PROMPTS_DIR: four images per prompt into the "
    "folder --out, laid out for that benchmark's "
    "evaluator (see tim_jax.inference.prompt_sets).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_per_prompt",
    1,
    "Images per prompt or label.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out",
    "samples.png",
    "The grid (PNG); with --prompt_set, the output folder (local or gs://).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "latents_out", "", "Also write the raw samples (.npy).", flag_values=fv
  )
  flags.DEFINE_integer(
    "cols",
    0,
    "Grid columns with --raw_size (0: the "
    "config's sample.cols, else --num_per_prompt, or up "
    "to 8 when it is 1).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "raw_size",
    False,
    "Write the images at their own size "
    "in a plain grid, without labels (default: one row per "
    "prompt or label, its text beside it, images enlarged "
    "to --min_side).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "min_side",
    128,
    "Enlarge smaller images (nearest) "
    "to at least this many pixels a side in the "
    "labelled grid.",
    lower_bound=1,
    flag_values=fv,
  )


def main(fv: flags.FlagValues, args) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top

  from tim_jax.core import images  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  interval = cli.guidance_interval(fv)
  try:
    labels = [int(v) for v in fv.labels]
  except ValueError:
    raise UserError(f"--labels must be integers, got {fv.labels}") from None
  if fv.prompt_set and (fv.prompt or labels):
    raise UserError(
      "--prompt_set takes its prompts from the set: drop --prompt/--labels"
    )
  if not fv.prompt_set:
    cli.check_writable(fv.out, "--out")
    try:
      images.image_format(fv.out)
    except ValueError as e:
      raise UserError(f"--out={e}") from None
  if fv.latents_out:
    if not fv.latents_out.endswith(".npy"):
      raise UserError(
        f"--latents_out={fv.latents_out}: the latents are written as .npy; "
        "give a name ending in .npy"
      )
    cli.check_writable(fv.latents_out, "--latents_out")
  pipe = cli.load_pipeline(fv)
  try:  # Checked before the (slow) conditioning and sampling.
    settings = pipe.settings(
      fv.num_steps,
      fv.cfg_scale,
      interval,
      fv.stochasticity,
      fv.mode,
      T_max=fv.T_max,
      T_min=fv.T_min,
    )
  except ValueError as e:
    raise UserError(
      f"bad sampler flags (--num_steps, --guidance_interval, "
      f"--stochasticity, --mode, --T_max, --T_min): {e}"
    ) from None
  if not pipe.can_decode and not fv.latents_out:
    raise UserError(
      f"decoding {pipe.config.autoencoder.name!r} latents needs "
      "--autoencoder_path=DIR (a diffusers directory of that "
      "autoencoder), or pass --latents_out=FILE.npy to keep only the "
      "latents"
    )
  height = width = None
  if fv.height or fv.width:
    size = int(pipe.config.sample.image_size) * pipe.downsample
    height, width = pipe.network_size(fv.height or size, fv.width or size)
  if fv.prompt_set:
    from tim_jax.inference import prompt_sets  # pylint: disable=g-import-not-at-top

    if not pipe.can_decode:
      raise UserError("--prompt_set writes images: set --autoencoder_path")
    written, skipped = prompt_sets.run(
      pipe,
      fv.prompt_set,
      fv.out,
      num_steps=fv.num_steps,
      cfg_scale=fv.cfg_scale,
      guidance_interval=interval,
      stochasticity=fv.stochasticity,
      T_max=settings.T_max,
      T_min=settings.T_min,
      seed=fv.seed,
      batch_size=max(1, fv.batch_size // prompt_sets.PER_PROMPT),
      height=height,
      width=width,
      mode=fv.mode,
    )
    print(
      f"wrote {written} prompts' images to {fv.out} ({skipped} were "
      "already there)"
    )
    return
  cond, names = pipe.conditions(fv.prompt, labels)
  num = fv.num_per_prompt
  side = int(pipe.config.sample.image_size) * pipe.downsample
  pixels = len(names) * num * (fv.height or side) * (fv.width or side)
  if pipe.can_decode and pixels > MAX_GRID_PIXELS:
    raise UserError(
      f"{len(names)} x {num} images of {fv.height or side}x"
      f"{fv.width or side} make a {pixels / 1e6:.0f} MP grid, above the "
      f"{MAX_GRID_PIXELS / 1e6:.0f} MP one PNG holds here: lower "
      "--num_per_prompt, or write a folder with --prompt_set"
    )
  samples = pipe.generate(
    cond,
    num_steps=fv.num_steps,
    num=num,
    cfg_scale=fv.cfg_scale,
    guidance_interval=interval,
    stochasticity=fv.stochasticity,
    T_max=settings.T_max,
    T_min=settings.T_min,
    seed=fv.seed,
    batch_size=fv.batch_size,
    mode=fv.mode,
    height=height,
    width=width,
    progress=True,
  )
  if fv.latents_out:
    buf = io.BytesIO()
    np.save(buf, samples)
    paths.write_bytes(fv.latents_out, buf.getvalue())  # Local or gs://.
    logging.info("wrote %s %s", fv.latents_out, samples.shape)
  if not pipe.can_decode:
    logging.warning(
      "no --autoencoder_path for %r; wrote only the latents",
      pipe.config.autoencoder.name,
    )
    return
  pictures = images.to_uint8(pipe.decode(samples), pipe.kind)
  if fv.raw_size:
    cols = (
      fv.cols
      or int(pipe.config.sample.get("cols", 0))
      or (num if num > 1 else min(len(names), 8))
    )
    picture = images.grid(pictures, cols=cols)
  else:
    guidance = f", cfg {settings.cfg_scale:g}" if settings.cfg_scale > 1 else ""
    picture = images.annotated_grid(
      pictures,
      cols=num,
      row_labels=names,
      title=f"{fv.num_steps} steps{guidance}, seed {fv.seed}",
      min_side=fv.min_side,
    )
  images.save_image(fv.out, picture)
  print(f"wrote {fv.out}: {len(names)} x {num} images at {fv.num_steps} steps")
  for i, name in enumerate(names):
    print(f"  row {i}: {name}" if num > 1 else f"  {i}: {name}")


def entry() -> None:
  """The console script ``tim-sample``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
