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

Images are laid out one row per prompt or label, ``--num`` per row. The
noise is drawn for all images at once from ``--seed``, so the result does not
depend on ``--batch_size``. Latent-space models without a decoder in tim_jax
write their latents (``--latents_out``) for decoding elsewhere.

The functions here (``load``, ``conditions``, ``generate``) are the library
form of the command; the evaluation tools use them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

OFFICIAL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclasses.dataclass
class Checkpoint:
  """Where the weights are: a tim_jax checkpoint step or an official file."""
  kind: str  # "tim_jax" | "official"
  path: str  # checkpoints directory, or the official file
  step: Optional[int] = None


def resolve(path: str) -> Checkpoint:
  """A workdir, a ``checkpoints`` dir, one step's dir or an official file."""
  if not path:
    raise ValueError("--checkpoint is required")
  if os.path.isfile(path):
    if not path.endswith(OFFICIAL_SUFFIXES):
      raise ValueError(f"{path} is a file but not an official checkpoint "
                       f"({', '.join(OFFICIAL_SUFFIXES)})")
    return Checkpoint("official", path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(
      path).isdigit():
    return Checkpoint("tim_jax", os.path.dirname(path),
                      int(os.path.basename(path)))
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()
                 and os.path.isdir(os.path.join(path, d, "state")))
  if not steps:
    raise FileNotFoundError(
        f"{path} holds no tim_jax checkpoint (no <step>/state directory); "
        "pass a run's workdir, its checkpoints directory, one step's "
        f"directory, or an official {'/'.join(OFFICIAL_SUFFIXES)} file")
  return Checkpoint("tim_jax", path, steps[-1])


def _checkpointer(ckpt: Checkpoint):
  from tim_jax import checkpoint
  return checkpoint.Checkpointer(ckpt.path, every=1, asynchronous=False)


def saved_config(ckpt: Checkpoint) -> dict:
  manager = _checkpointer(ckpt)
  try:
    saved = manager.saved_config(ckpt.step)
  finally:
    manager.close()
  if saved is None:
    raise FileNotFoundError(f"the checkpoint {ckpt.path} step {ckpt.step} has "
                            "no saved config; pass --config")
  return saved


def config_from_checkpoint(ckpt: Checkpoint) -> ml_collections.ConfigDict:
  """The run's config as saved with the checkpoint (locked)."""
  from tim_jax import config_base
  saved = saved_config(ckpt)
  config = config_base.base_config()
  config.unlock()
  _merge(config, saved)
  return config_base.lock(config)


def _merge(config, saved: dict):
  for key, value in saved.items():
    if isinstance(value, dict) and key in config and isinstance(
        config[key], ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = tuple(map(_tuples, value)) if isinstance(
          value, list) else value


def _tuples(v):
  return tuple(map(_tuples, v)) if isinstance(v, list) else v


def load(config, checkpoint: str):
  """(trainer, params, config): the model of ``config`` (or of the
  checkpoint's saved config when ``config`` is None) with the checkpoint's
  EMA weights (tim_jax) or the official weights.

  Raises ValueError when the checkpoint does not fit the config.
  """
  from tim_jax import train
  ckpt = resolve(checkpoint)
  if config is None:
    if ckpt.kind == "official":
      raise ValueError("an official checkpoint needs --config (the "
                       "architecture is not stored in the file)")
    config = config_from_checkpoint(ckpt)
  trainer = train.Trainer(config, mesh=_single_device_mesh())
  if ckpt.kind == "official":
    from flax import nnx

    from tim_jax import convert
    model = trainer.new_model()
    report = convert.load_state_dict(model, convert.read_state_dict(
        ckpt.path))
    if report.unexpected:
      raise ValueError(
          f"{ckpt.path} holds {len(report.unexpected)} parameters this config"
          f"'s model does not have, e.g. {report.unexpected[:5]}: the "
          "checkpoint is of another architecture")
    return trainer, nnx.state(model, nnx.Param), config
  from tim_jax import checkpoint as checkpoint_lib
  problems = checkpoint_lib.architecture_differences(
      saved_config(ckpt), train.json_safe(config.to_dict()))
  if problems:
    raise ValueError(f"the checkpoint {ckpt.path} (step {ckpt.step}) does not"
                     f" fit this config: {'; '.join(problems)}")
  params = restore_ema(ckpt, trainer)
  return trainer, params, config


def restore_ema(ckpt: Checkpoint, trainer):
  """The EMA parameters of a tim_jax checkpoint (the state item only)."""
  manager = _checkpointer(ckpt)
  try:
    state = manager.restore(ckpt.step, trainer.abstract_with_shardings())
  finally:
    manager.close()
  return state.ema


def _single_device_mesh():
  from tim_jax import sharding
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1),
                            devices=jax.devices()[:1])


def conditions(trainer, prompts: Sequence[str] = (),
               labels: Sequence[int] = ()):
  """(conditioning with a batch axis, the names of the rows)."""
  kind = trainer.config.model.kind
  if kind == "c2i":
    if prompts:
      raise ValueError("--prompt is for text-to-image models; this is a "
                       "class-conditional model: use --labels")
    labels = list(labels) or list(trainer.config.sample.labels) or list(
        range(min(8, trainer.model_config.num_classes)))
    num_classes = trainer.model_config.num_classes
    bad = [l for l in labels if not 0 <= int(l) < num_classes]
    if bad:
      raise ValueError(f"labels must be in [0, {num_classes}), got {bad}")
    return trainer.conditioner.from_labels(labels), [str(l) for l in labels]
  if labels:
    raise ValueError("--labels is for class-conditional models; this is a "
                     "text-to-image model: use --prompt")
  prompts = list(prompts) or list(trainer.config.sample.prompts)
  if not prompts:
    raise ValueError("no --prompt given and the config has no "
                     "sample.prompts")
  if trainer.config.data.name == "shapes":
    from tim_jax.data import text
    known = set(trainer.conditioner.tokenizer.words)
    for p in prompts:
      unknown = [w for w in text.split_words(p) if w not in known]
      if unknown:
        raise ValueError(f"prompt {p!r} has words the shapes model never saw:"
                         f" {unknown}; its vocabulary is {sorted(known)}")
  return trainer.conditioner.from_prompts(prompts), prompts


def generate(trainer, params, cond, *, num_steps: int, num: int = 1,
             cfg_scale: Optional[float] = None,
             guidance_interval: Optional[Sequence[float]] = None,
             stochasticity: float = 0.0, seed: int = 0,
             batch_size: int = 64, mode: Optional[str] = None,
             image_size: Optional[int] = None, progress: bool = False,
             desc: str = "sampling") -> np.ndarray:
  """``num`` samples per row of ``cond`` (row-major: all of row 0 first), in
  network space (pixels in [-1, 1] for pixel models), as numpy.

  Every image's noise comes from ``seed`` and its index, whatever the batch
  size. Batches have a fixed size (the last one is padded), so the sampler
  compiles once.
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {num_steps}")
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  s = trainer.config.sample
  cfg_scale = float(s.cfg_scale if cfg_scale is None else cfg_scale)
  interval = tuple(s.guidance_interval if guidance_interval is None
                   else guidance_interval)
  if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
    raise ValueError(f"guidance interval must be low,high with 0 <= low <= "
                     f"high <= 1, got {interval}")
  mode = mode or s.mode
  size = int(image_size or s.image_size)
  rows = jax.tree.leaves(cond)[0].shape[0]
  total = rows * num
  index = np.repeat(np.arange(rows), num)
  all_cond = jax.tree.map(lambda c: np.asarray(c)[index], cond)
  shape = (size, size, trainer.model_config.in_channels)
  base = jax.random.key(seed)
  noise_all = jax.vmap(lambda i: jax.random.normal(
      jax.random.fold_in(base, i), shape))(np.arange(total))
  bs = min(int(batch_size), total)
  null = trainer.conditioner.null(1)

  bar = None
  if progress:
    from tqdm.auto import tqdm
    batches = -(-total // bs)
    bar = tqdm(total=batches * num_steps, desc=desc, unit="step",
               leave=False)
  update = (lambda _: bar.update(1)) if bar is not None else None
  out = []
  try:
    for start in range(0, total, bs):
      stop = min(start + bs, total)
      pad = bs - (stop - start)
      take = np.concatenate([np.arange(start, stop),
                             np.full(pad, stop - 1, np.int64)])
      batch_cond = jax.tree.map(lambda c: c[take], all_cond)
      rng = jax.random.fold_in(jax.random.key(seed + 1), start)
      images = trainer.sample(
          params, noise_all[take], batch_cond, null,
          num_steps=int(num_steps), cfg_scale=cfg_scale,
          guidance_interval=interval, stochasticity=stochasticity, rng=rng,
          mode=mode, progress=update)
      out.append(np.asarray(jax.device_get(images))[:bs - pad])
  finally:
    if bar is not None:
      bar.close()
  return np.concatenate(out)


# --- the command ---------------------------------------------------------------


def _flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Config file (+ ':variant'); optional for tim_jax "
      "checkpoints, which store theirs.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A tim_jax workdir / checkpoints "
                      "dir / step dir, or an official .safetensors/.pt/.pth/"
                      ".bin file.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable; t2i).")
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
  flags.DEFINE_string("out", "samples.png", "The grid (PNG).")
  flags.DEFINE_string("latents_out", "", "Also write the raw samples (.npy).")
  flags.DEFINE_integer("cols", 0, "Grid columns (default: --num, or up to 8 "
                       "when --num is 1).")


def main(argv):
  from absl import flags, logging
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  from tim_jax import train
  interval = f["guidance-interval"].value
  if interval is not None:
    try:
      interval = tuple(float(v) for v in interval)
    except ValueError:
      raise ValueError(f"--guidance-interval must be two numbers low,high; "
                       f"got {interval}") from None
    if len(interval) != 2:
      raise ValueError(f"--guidance-interval must be low,high; got {interval}")
  if f.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {f.steps}")
  try:
    labels = [int(v) for v in f.labels]
  except ValueError:
    raise ValueError(f"--labels must be integers, got {f.labels}") from None
  trainer, params, config = load(f.config, f.checkpoint)
  cond, names = conditions(trainer, f.prompt, labels)
  images = generate(trainer, params, cond, num_steps=f.steps, num=f.num,
                    cfg_scale=f.cfg, guidance_interval=interval,
                    stochasticity=f.stochasticity, seed=f.seed,
                    batch_size=f.batch_size, mode=f.mode, progress=True)
  if f.latents_out:
    np.save(f.latents_out, images)
    logging.info("wrote %s %s", f.latents_out, images.shape)
  try:
    pixels = train.decode(config, images)
  except NotImplementedError as e:
    if not f.latents_out:
      raise ValueError(f"{e}. Pass --latents_out=FILE.npy to keep the "
                       "latents and decode them elsewhere.") from None
    logging.warning("%s; wrote only the latents", e)
    return
  cols = f.cols or (f.num if f.num > 1 else min(len(names), 8))
  picture = train.grid(train.to_uint8(pixels), cols=cols)
  out_dir = os.path.dirname(os.path.abspath(f.out))
  os.makedirs(out_dir, exist_ok=True)
  from PIL import Image
  Image.fromarray(picture).save(f.out)
  print(f"wrote {f.out}: {len(names)} x {f.num} images at {f.steps} steps")
  for i, name in enumerate(names):
    print(f"  row {i}: {name}" if f.num > 1 else f"  {i}: {name}")


if __name__ == "__main__":
  from absl import app
  _flags()
  app.run(main)
