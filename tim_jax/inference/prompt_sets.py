"""Benchmark prompt sets -> the folders their evaluators read.

``python -m tim_jax.commands.sample --prompt_set=geneval:evaluation_metadata.jsonl
--out=DIR`` (or ``dpg:PROMPTS_DIR``) samples four images per prompt and
writes them as the official samplers do (``projects/sample/
sample_t2i_{geneval,dpgbench}_ddp.py``):

* GenEval: one JSON object per line with a ``prompt``; the prompt goes
  through ``unicode-escape`` as the official GenEval sampler sends it;
  ``DIR/<index:05d>/metadata.jsonl`` (the line's object),
  ``DIR/<index:05d>/samples/<k:05d>.png`` (k = 0..3) and a 2x2
  ``grid.png``.
* DPG-Bench: a folder of ``<name>.txt`` prompts (read as they are);
  ``DIR/<name>.png``, the four images as one 2x2 grid.

Pixels become uint8 as the T2I samplers convert them
(``clamp(127.5 x + 128)``). Prompts are sampled in batches of
``batch_size``; a batch whose outputs all exist is skipped, so a killed run
resumes where it stopped, and a batch's images depend only on the seed and
the batch's index.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from tim_jax.core import images, paths
from tim_jax.core.errors import UserError
from tim_jax.data import conditioning

if TYPE_CHECKING:
  from tim_jax.inference.pipeline import Pipeline

LAYOUTS = ("geneval", "dpg")
PER_PROMPT = 4  # Both evaluators read four images per prompt.


def read(spec: str) -> tuple[str, list[dict]]:
  """``"geneval:FILE"`` or ``"dpg:DIR"`` -> (layout, items); each item has
  ``prompt`` (as the model receives it), ``name`` (its output) and, for
  GenEval, ``metadata``."""
  layout, sep, path = spec.partition(":")
  if not sep or layout not in LAYOUTS:
    raise UserError(
      f"--prompt_set must be LAYOUT:PATH with LAYOUT one of "
      f"{LAYOUTS}, got {spec!r}"
    )
  items = []
  if layout == "geneval":
    if not paths.as_path(path).is_file():
      raise FileNotFoundError(
        f"GenEval metadata {path!r} does not exist (evaluation_metadata.jsonl)"
      )
    with paths.as_path(path).open(encoding="utf-8") as f:
      for n, line in enumerate(l for l in f if l.strip()):
        try:
          meta = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{path}: entry {n} is not JSON: {e}") from None
        if not isinstance(meta, dict) or not isinstance(
          meta.get("prompt"), str
        ):
          raise UserError(f"{path}: entry {n} has no 'prompt'")
        items.append(
          dict(
            prompt=conditioning.escape_unicode(meta["prompt"]),
            name=f"{n:05d}",
            metadata=meta,
          )
        )
  else:
    if not paths.as_path(path).is_dir():
      raise FileNotFoundError(f"DPG-Bench prompts {path!r} is not a folder")
    for f in sorted(paths.as_path(path).iterdir(), key=lambda p: p.name):
      if f.name.endswith(".txt"):
        items.append(
          dict(prompt=f.read_text(encoding="utf-8"), name=f.name[:-4])
        )
  if not items:
    raise UserError(f"--prompt_set: no prompts in {path!r}")
  return layout, items


def done(layout: str, out_dir: str, item: dict) -> bool:
  """Whether a prompt's images are already in ``out_dir``."""
  if layout == "geneval":
    return paths.as_path(paths.join(out_dir, item["name"], "grid.png")).exists()
  return paths.as_path(paths.join(out_dir, item["name"] + ".png")).exists()


def write(layout: str, out_dir: str, item: dict, pictures: np.ndarray) -> None:
  """``pictures``: this prompt's PER_PROMPT images, uint8 (4, H, W, 3).
  Every file is written under a temporary name and renamed, and the file
  that marks the prompt done comes last."""
  two_by_two = images.grid(pictures, cols=2, gap=0)
  if layout == "dpg":
    images.save_png(paths.join(out_dir, item["name"] + ".png"), two_by_two)
    return
  folder = paths.join(out_dir, item["name"])
  paths.write_text(
    paths.join(folder, "metadata.jsonl"), json.dumps(item["metadata"])
  )
  for k, picture in enumerate(pictures):
    images.save_png(paths.join(folder, "samples", f"{k:05d}.png"), picture)
  images.save_png(paths.join(folder, "grid.png"), two_by_two)


def run(
  pipe: Pipeline,
  spec: str,
  out_dir: str,
  *,
  num_steps: int,
  cfg_scale: float | None = None,
  guidance_interval: Sequence[float] | None = None,
  stochasticity: float = 0.0,
  seed: int = 0,
  batch_size: int = 32,
  T_max: float | None = None,
  T_min: float | None = None,
  height: int | None = None,
  width: int | None = None,
  mode: str | None = None,
) -> tuple[int, int]:
  """Samples the prompt set into ``out_dir``; returns (prompts written,
  prompts already there)."""
  if pipe.kind != "t2i":
    raise UserError("--prompt_set is for text-to-image models")
  layout, items = read(spec)
  out_dir = paths.absolute(out_dir)  # A local folder or gs://...
  paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)
  if not paths.is_remote(out_dir) and not os.access(out_dir, os.W_OK):
    raise UserError(f"cannot write to --out={out_dir}")
  batches = [
    items[s : s + batch_size] for s in range(0, len(items), batch_size)
  ]
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  written = skipped = 0
  for b, batch in enumerate(
    tqdm(batches, desc=f"{layout} prompts", unit="batch")
  ):
    if all(done(layout, out_dir, item) for item in batch):
      skipped += len(batch)
      continue
    cond, _ = pipe.conditions([item["prompt"] for item in batch])
    latents = pipe.generate(
      cond,
      num_steps=num_steps,
      num=PER_PROMPT,
      cfg_scale=cfg_scale,
      guidance_interval=guidance_interval,
      stochasticity=stochasticity,
      T_max=T_max,
      T_min=T_min,
      seed=seed * 1_000_003 + b,
      batch_size=len(batch) * PER_PROMPT,
      mode=mode,
      height=height,
      width=width,
    )
    pictures = images.to_uint8(pipe.decode(latents), "t2i")
    for i, item in enumerate(batch):
      write(
        layout, out_dir, item, pictures[i * PER_PROMPT : (i + 1) * PER_PROMPT]
      )
      written += 1
  return written, skipped
