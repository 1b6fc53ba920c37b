"""Many samples for FID as an ADM ``.npz`` (the command:
``python -m tim_jax.commands.generate``).

``generate`` writes an ADM-style ``.npz``: ``arr_0`` uint8 (N, H, W, 3) images and
``arr_1`` int64 (N,) class labels, drawn as the official C2I sampler
(``projects/sample/sample_c2i_ddp.py``) draws them: uniform over the
classes, one per image. Text-to-image models take prompts and cycle
through them instead (``arr_1`` is then the prompt index).

Image i's noise and label come from the seed and i alone, so the file does
not depend on the batch size, the device count or interruptions. Batches are
split over this process's devices and, in a multi-process job, over
processes. Finished batches are kept in
``OUT.parts/`` and skipped when the command runs again; the ``.npz`` is
written (by process 0) when all are there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import io
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from jax.typing import ArrayLike

  from tim_jax.inference.pipeline import Pipeline


@functools.partial(jax.jit, static_argnums=(2,))
def _labels(seed, indices, num_classes):
  key = jax.random.fold_in(jax.random.key(seed), 1)
  return jax.vmap(
    lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
  )(indices)


def labels_for(seed: int, indices: ArrayLike, num_classes: int) -> np.ndarray:
  """Image i's class: uniform over ``num_classes``, from ``seed`` and i."""
  return np.asarray(_labels(seed, np.asarray(indices), num_classes))


def generate(
  pipe: Pipeline,
  *,
  num: int,
  out: str,
  num_steps: int,
  seed: int = 0,
  batch_size: int = 64,
  prompts: Sequence[str] = (),
  cfg_scale: float | None = None,
  guidance_interval: Sequence[float] | None = None,
  stochasticity: float = 0.0,
  T_max: float | None = None,
  T_min: float | None = None,
  mode: str | None = None,
  height: int | None = None,
  width: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  barrier: Callable[[str], None] | None = None,
  progress: bool = True,
) -> str | None:
  """Writes ``out`` (on process 0) and returns its path there, else None."""
  from tim_jax.core import fingerprint, images, resumable, sharding

  if num < 1 or batch_size < 1:
    raise UserError(
      f"num and batch_size must be >= 1, got {num} and {batch_size}"
    )
  if not pipe.can_decode:
    raise UserError(
      f"decoding {pipe.config.autoencoder.name!r} latents needs its "
      "autoencoder (--autoencoder_path=DIR, a diffusers directory)"
    )
  settings = pipe.settings(
    num_steps,
    cfg_scale,
    guidance_interval,
    stochasticity,
    mode,
    T_max=T_max,
    T_min=T_min,
  )
  size = int(pipe.config.sample.image_size)
  h, w = (
    (size, size)
    if not (height or width)
    else pipe.network_size(
      height or size * pipe.downsample, width or size * pipe.downsample
    )
  )
  out = paths.absolute(out)  # A local file or gs://bucket/....npz.
  out_dir = os.path.dirname(out)
  if not paths.is_remote(out) and not os.access(out_dir, os.W_OK):
    raise UserError(f"cannot write to {out_dir} (for --out={out})")
  if pipe.kind == "c2i":
    if prompts:
      raise UserError(
        "--prompt is for text-to-image models; a class-conditional model "
        "draws its labels uniformly (ADM's protocol)"
      )
    num_classes = pipe.model_config.num_classes
  elif not prompts:
    raise UserError("a text-to-image model needs --prompt (repeatable)")
  mesh = sharding.make_mesh(
    {"data": jax.local_device_count()}, devices=jax.local_devices()
  )
  params = jax.device_put(pipe.params, sharding.replicated(mesh))
  prompt_cond = (
    pipe.conditions(list(prompts))[0] if pipe.kind == "t2i" else None
  )
  batches = [
    range(s, min(s + batch_size, num)) for s in range(0, num, batch_size)
  ]
  meta = dict(
    num=num,
    seed=seed,
    settings=str(settings),
    size=[h, w],
    prompts=list(prompts),
    weights=fingerprint.of_arrays(pipe.params),
    autoencoder=(
      pipe.autoencoder.fingerprint()
      if pipe.config.autoencoder.name != "identity"
      else "identity"
    ),
  )
  work = resumable.Parts(
    out + ".parts",
    "batch",
    [len(r) for r in batches],
    meta=meta,
    process_index=process_index,
    process_count=process_count,
    desc="generating",
    progress=progress,
  )
  key = jax.random.key(seed)
  shards = sharding.data_shards(mesh)
  # Pad every batch to one shape that the devices divide: one compile.
  padded = -(-batch_size // shards) * shards
  shape = (h, w, pipe.model_config.in_channels)
  draw_noise = jax.jit(
    jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))
  )  # One compile for every batch.
  for b in work.todo():
    r = batches[b]
    idx = np.arange(r.start, r.stop)
    take = np.concatenate([idx, np.full(padded - len(idx), idx[-1])])
    noise = draw_noise(take)
    if pipe.kind == "c2i":
      cls = labels_for(seed, take, num_classes)
      cond = pipe.conditioner.from_labels(cls)
    else:
      cls = take % len(prompts)
      cond = jax.tree.map(lambda c: np.asarray(c)[cls], prompt_cond)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))
    cond = jax.tree.map(put, cond)
    x = pipe.sample(
      put(noise),
      cond,
      pipe.null_like(cond),
      num_steps=settings.num_steps,
      cfg_scale=settings.cfg_scale,
      guidance_interval=settings.guidance_interval,
      stochasticity=settings.stochasticity,
      rng=jax.random.fold_in(jax.random.fold_in(key, 2), b),
      mode=settings.mode,
      params=params,
      T_max=settings.T_max,
      T_min=settings.T_min,
    )
    pixels = pipe.decode(np.asarray(jax.device_get(x))[: len(idx)])
    if not np.isfinite(pixels).all():
      raise UserError(
        f"batch {b} (images {r.start}-{r.stop - 1}) decoded to non-finite "
        "values: the checkpoint's weights are not usable"
      )
    work.save(
      b,
      dict(
        images=images.to_uint8(pixels, pipe.kind),
        labels=np.asarray(cls[: len(idx)], np.int64),
      ),
    )
  if not work.finish(barrier):
    return None
  arrays, labels = [], []
  for b in range(len(batches)):
    part = io.BytesIO(paths.as_path(work.path(b)).read_bytes())
    with np.load(part) as z:
      arrays.append(z["images"])
      labels.append(z["labels"])
  buf = io.BytesIO()
  np.savez(buf, arr_0=np.concatenate(arrays), arr_1=np.concatenate(labels))
  paths.write_bytes(out, buf.getvalue())  # Whole or not at all.
  return out
