"""Samples from a checkpoint: ``python -m tim_jax.sample``.

    # A tim_jax run (its workdir, checkpoints dir or one step's dir); the
    # config is read from the checkpoint unless --config is given.
    python -m tim_jax.sample --checkpoint=/tmp/tim_t2i \\
        --prompt="a red circle at the top left" --prompt="a blue square in \\
        the center" --steps=4 --num=4 --out=grid.png

    # An official PyTorch checkpoint: the config gives the architecture.
    python -m tim_jax.sample --config=configs/c2i.py:xl2_256 \\
        --checkpoint=TiM-XL-2-256.pt --labels=207,360 --steps=8 --cfg=2.5 \\
        --out=grid.png --latents_out=latents.npy

    # The official text-to-image model, from a prompt, at any size.
    python -m tim_jax.sample --config=configs/t2i.py:xl \\
        --checkpoint=t2i_model.bin --text_encoder=gemma-3-1b-it \\
        --config.autoencoder.path=dc-ae-f32c32-sana-1.1-diffusers \\
        --prompt="a lighthouse at dusk" --height=1024 --width=768 \\
        --steps=4 --cfg=2.5 --out=lighthouse.png

    # A benchmark's prompts into the folder its evaluator reads (four
    # images per prompt; resumable): GenEval or DPG-Bench.
    python -m tim_jax.sample ... --prompt_set=geneval:evaluation_metadata.jsonl \\
        --out=geneval_samples
    python -m tim_jax.sample ... --prompt_set=dpg:dpg_bench/prompts \\
        --out=dpg_samples

Images are laid out one row per prompt or label, ``--num`` per row, the
prompt or class name beside each row and images smaller than
``--min_side`` (128) pixels enlarged; ``--raw_size`` writes a plain grid at
the images' own size instead. The
noise is drawn for all images at once from ``--seed``, so the result does not
depend on ``--batch_size``. Latent-space models decode with the config's
autoencoder (``--config.autoencoder.path=DIR``, a diffusers directory); with
``--latents_out`` the raw latents are kept too. ``--height``/``--width``
choose any size the patch and the autoencoder's downsampling divide.

The library form of the command is ``tim_jax.inference`` (``load``,
``Pipeline.conditions``, ``Pipeline.generate``, ``Pipeline.decode``).
"""

from __future__ import annotations

import os

import numpy as np

# --- the command ---------------------------------------------------------------

# The largest grid the command writes as one PNG (pixels): more is a
# misuse of a picture (keep the latents with --latents_out, or sample a
# prompt set into a folder).
MAX_GRID_PIXELS = 2 ** 28


def check_writable(path: str, flag: str) -> None:
  """Raises ValueError unless a file can be written at ``path`` (its folder
  is created): checked before sampling, not after."""
  import tempfile
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(os.path.abspath(path)):
    raise ValueError(f"{flag}={path} is a directory; give a file name")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check"):
      pass
  except OSError as e:
    raise ValueError(f"cannot write {flag}={path}: {e}") from None


def check_flags(f) -> None:
  """The numeric flags and output paths, before any model is loaded."""
  positive = dict(num=f.num, batch_size=f.batch_size, steps=f.steps)
  for name, value in positive.items():
    if value < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}")
  if f.cols < 0:
    raise ValueError(f"--cols must be >= 0 (0 = automatic), got {f.cols}")
  if f.min_side < 1:
    raise ValueError(f"--min_side must be >= 1, got {f.min_side}")
  for name in ("height", "width"):
    value = getattr(f, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}")
  if f.cfg is not None and not f.cfg >= 1.0:
    raise ValueError(f"--cfg must be >= 1 (1 = no guidance; the sampler "
                     f"guides only above 1), got {f.cfg}")
  if f.stochasticity < 0:
    raise ValueError(f"--stochasticity must be >= 0, got {f.stochasticity}")
  if not f.prompt_set:
    check_writable(f.out, "--out")
  if f.latents_out:
    check_writable(f.latents_out, "--latents_out")


def _flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Config file (+ ':variant'); optional for tim_jax "
      "checkpoints, which store theirs.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A tim_jax workdir / checkpoints "
                      "dir / step dir, or an official .safetensors/.pt/.pth/"
                      ".bin file.")
  flags.DEFINE_string("autoencoder_path", None, "The autoencoder's "
                      "diffusers directory (latent models; replaces the "
                      "config's autoencoder.path).")
  flags.DEFINE_string("text_encoder", None, "The Gemma-3 directory of "
                      "models trained on captions (replaces the config's "
                      "text_encoder.path).")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable; t2i).")
  flags.DEFINE_string("prompt_set", None, "geneval:METADATA.jsonl or "
                      "dpg:PROMPTS_DIR: four images per prompt into the "
                      "folder --out, laid out for that benchmark's "
                      "evaluator (see tim_jax.prompt_sets).")
  flags.DEFINE_list("labels", [], "Class labels, comma-separated (c2i).")
  flags.DEFINE_integer("steps", 4, "Sampling steps (NFE without guidance).")
  flags.DEFINE_float("cfg", None, "Guidance scale (default: the config's "
                     "sample.cfg_scale; 1 = no guidance).")
  flags.DEFINE_list("guidance-interval", None, "low,high: guide where "
                    "low*T_max < t < high*T_max (default: the config's).")
  flags.DEFINE_float("stochasticity", 0.0, "OT-FM stochastic ratio.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_integer("num", 1, "Images per prompt or label.")
  flags.DEFINE_integer("batch_size", 64, "Images per sampler call.")
  flags.DEFINE_enum("mode", None, ["transition", "diffusion"], "Sampler mode "
                    "(default: the config's sample.mode).")
  flags.DEFINE_integer("height", None, "Image height in pixels (default: "
                       "the config's sample.image_size, decoded); any "
                       "multiple of the autoencoder's downsampling times "
                       "the patch size.")
  flags.DEFINE_integer("width", None, "Image width in pixels (as --height).")
  flags.DEFINE_string("out", "samples.png", "The grid (PNG); with "
                      "--prompt_set, the output folder.")
  flags.DEFINE_string("latents_out", "", "Also write the raw samples (.npy).")
  flags.DEFINE_integer("cols", 0, "Grid columns with --raw_size (default: "
                       "the config's sample.cols, else --num, or up to 8 "
                       "when --num is 1).")
  flags.DEFINE_bool("raw_size", False, "Write the images at their own size "
                    "in a plain grid, without labels (default: one row per "
                    "prompt or label, its text beside it, images enlarged "
                    "to --min_side).")
  flags.DEFINE_integer("min_side", 128, "Enlarge smaller images (nearest) "
                       "to at least this many pixels a side in the "
                       "labelled grid.")


def main(argv):
  from absl import flags, logging
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  from tim_jax import images, inference
  interval = f["guidance-interval"].value
  if interval is not None:
    try:
      interval = tuple(float(v) for v in interval)
    except ValueError:
      raise ValueError(f"--guidance-interval must be two numbers low,high; "
                       f"got {interval}") from None
  try:
    labels = [int(v) for v in f.labels]
  except ValueError:
    raise ValueError(f"--labels must be integers, got {f.labels}") from None
  if not f.checkpoint:
    raise ValueError("--checkpoint is required")
  check_flags(f)
  if f.prompt_set and (f.prompt or labels):
    raise ValueError("--prompt_set takes its prompts from the set: drop "
                     "--prompt/--labels")
  from tim_jax import config_base
  pipe = inference.load(f.checkpoint, config_base.flag_config(f),
                        f.autoencoder_path, f.text_encoder)
  try:  # Checked before the (slow) conditioning and sampling.
    settings = pipe.settings(f.steps, f.cfg, interval, f.stochasticity,
                             f.mode)
  except ValueError as e:
    raise ValueError(f"bad sampler flags (--steps, --guidance-interval, "
                     f"--stochasticity, --mode): {e}") from None
  if not pipe.can_decode and not f.latents_out:
    raise ValueError(
        f"decoding {pipe.config.autoencoder.name!r} latents needs "
        "--config.autoencoder.path=DIR (a diffusers directory of that "
        "autoencoder; see the README's 'Files' section), or pass "
        "--latents_out=FILE.npy to keep only the latents")
  height = width = None
  if f.height or f.width:
    size = int(pipe.config.sample.image_size) * pipe.downsample
    height, width = pipe.network_size(f.height or size, f.width or size)
  if f.prompt_set:
    from tim_jax import prompt_sets
    if not pipe.can_decode:
      raise ValueError("--prompt_set writes images: set "
                       "--config.autoencoder.path=DIR")
    written, skipped = prompt_sets.run(
        pipe, f.prompt_set, f.out, num_steps=f.steps, cfg_scale=f.cfg,
        guidance_interval=interval, stochasticity=f.stochasticity,
        seed=f.seed, batch_size=max(1, f.batch_size // prompt_sets.PER_PROMPT),
        height=height, width=width, mode=f.mode)
    print(f"wrote {written} prompts' images to {f.out} ({skipped} were "
          "already there)")
    return
  cond, names = pipe.conditions(f.prompt, labels)
  side = int(pipe.config.sample.image_size) * pipe.downsample
  pixels = len(names) * f.num * (f.height or side) * (f.width or side)
  if pipe.can_decode and pixels > MAX_GRID_PIXELS:
    raise ValueError(
        f"{len(names)} x {f.num} images of {f.height or side}x"
        f"{f.width or side} make a {pixels / 1e6:.0f} MP grid, above the "
        f"{MAX_GRID_PIXELS / 1e6:.0f} MP one PNG holds here: lower --num, or "
        "write a folder with --prompt_set")
  samples = pipe.generate(cond, num_steps=f.steps, num=f.num,
                          cfg_scale=f.cfg, guidance_interval=interval,
                          stochasticity=f.stochasticity, seed=f.seed,
                          batch_size=f.batch_size, mode=f.mode,
                          height=height, width=width, progress=True)
  if f.latents_out:
    np.save(f.latents_out, samples)
    logging.info("wrote %s %s", f.latents_out, samples.shape)
  if not pipe.can_decode:
    logging.warning("no --config.autoencoder.path for %r; wrote only the "
                    "latents", pipe.config.autoencoder.name)
    return
  pictures = images.to_uint8(pipe.decode(samples), pipe.kind)
  if f.raw_size:
    cols = (f.cols or int(pipe.config.sample.get("cols", 0)) or
            (f.num if f.num > 1 else min(len(names), 8)))
    picture = images.grid(pictures, cols=cols)
  else:
    guidance = (f", cfg {settings.cfg_scale:g}" if settings.cfg_scale > 1
                else "")
    picture = images.annotated_grid(
        pictures, cols=f.num, row_labels=names,
        title=f"{f.steps} steps{guidance}, seed {f.seed}",
        min_side=f.min_side)
  images.save_png(f.out, picture)
  print(f"wrote {f.out}: {len(names)} x {f.num} images at {f.steps} steps")
  for i, name in enumerate(names):
    print(f"  row {i}: {name}" if f.num > 1 else f"  {i}: {name}")


if __name__ == "__main__":
  from absl import app
  _flags()
  app.run(main)
