"""Trains the shapes oracle, deterministically, from the data's ground truth.

    python -m tim_jax.commands.train_oracle --out=tim_jax/shapes/oracle.safetensors

Batches are scenes ``step * batch … (step + 1) * batch - 1`` of a stream seed
used for nothing else, so the oracle never sees the generative models'
training or held-out scenes, and a run is a function of its arguments. Half of
the images are blurred and all get a little noise: generated images are
softer than the renderer's, and the oracle should read what they show, not
fail on texture. The run ends with a validation on fresh scenes (clean,
blurred and pure noise) whose figures go into the weights' metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tim_jax.shapes import oracle, world

if TYPE_CHECKING:
  from jax.typing import ArrayLike

TRAIN_SEED = 2_000_029  # Scene streams of the oracle only.
VALID_SEED = 3_000_017


def render_batch(
  start: int, count: int, seed: int, size: int = 32
) -> tuple[np.ndarray, list[world.Scene]]:
  """Images and scenes ``start`` ... ``start + count - 1`` of stream ``seed``."""
  scenes = [world.scene(i, seed) for i in range(start, start + count)]
  images = np.stack([world.render(s, size) for s in scenes])
  return images, scenes


def blur(images: ArrayLike, sigma: ArrayLike, radius: int = 3) -> jax.Array:
  """Gaussian blur per image, on device: images (B, H, W, C), sigma in
  pixels, a scalar or one per image (0 = unchanged).

  Written as a sum of shifted copies rather than a library call because the
  kernel differs per image; with a 7-tap kernel that is 14 shifted adds.
  """
  images = jnp.asarray(images, jnp.float32)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (images.shape[0],))
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  safe = jnp.maximum(sigma, 1e-3)[:, None]
  taps = jnp.exp(-0.5 * (offsets[None] / safe) ** 2)
  taps = taps / taps.sum(axis=1, keepdims=True)
  identity = (offsets == 0).astype(jnp.float32)[None]
  taps = jnp.where(sigma[:, None] > 0, taps, identity)  # (B, 2r + 1)

  def along(x, axis):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="edge")
    out = jnp.zeros_like(x)
    for i in range(2 * radius + 1):
      part = jax.lax.slice_in_dim(padded, i, i + x.shape[axis], axis=axis)
      out = out + taps[:, i, None, None, None] * part
    return out

  return along(along(images, 1), 2)


def augment(
  key: jax.Array, images: jax.Array, max_blur: float, max_noise: float
) -> jax.Array:
  """Half the images blurred by sigma ~ U[0, max_blur]; all get Gaussian
  noise of std ~ U[0, max_noise]."""
  n = images.shape[0]
  k_pick, k_sigma, k_std, k_noise = jax.random.split(key, 4)
  sigma = jnp.where(
    jax.random.uniform(k_pick, (n,)) < 0.5,
    jax.random.uniform(k_sigma, (n,), maxval=max_blur),
    0.0,
  )
  std = jax.random.uniform(k_std, (n, 1, 1, 1), maxval=max_noise)
  return blur(images, sigma) + std * jax.random.normal(k_noise, images.shape)


def loss_fn(
  model: oracle.OracleNet,
  images: jax.Array,
  occupancy: jax.Array,
  shape: jax.Array,
  size: jax.Array,
) -> jax.Array:
  """Cross-entropy of occupancy, shape and size (the last two on occupied cells)."""
  _, logits = model(images)
  occ, shp, sz = oracle.split_logits(logits)
  ce = optax.softmax_cross_entropy_with_integer_labels
  filled = occupancy > 0
  n_filled = jnp.maximum(filled.sum(), 1)
  l_occ = ce(occ, occupancy).mean()
  l_shape = jnp.sum(jnp.where(filled, ce(shp, jnp.maximum(shape, 0)), 0.0))
  l_size = jnp.sum(jnp.where(filled, ce(sz, jnp.maximum(size, 0)), 0.0))
  return l_occ + (l_shape + l_size) / n_filled


def train(
  steps: int = 2500,
  batch: int = 128,
  lr: float = 2e-3,
  seed: int = 0,
  max_blur: float = 0.8,
  max_noise: float = 0.08,
  progress: bool = True,
) -> oracle.OracleNet:
  """Trains an oracle; the same arguments give the same weights."""
  model = oracle.OracleNet(rngs=nnx.Rngs(seed))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, min(200, steps // 10), steps, lr * 0.01
  )
  optimizer = nnx.Optimizer(
    model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param
  )

  @nnx.jit(donate_argnums=(0, 1), static_argnums=(7, 8))
  def step(
    model, optimizer, key, images, occupancy, shape, size, max_blur, max_noise
  ):
    images = augment(key, images, max_blur, max_noise)
    loss, grads = nnx.value_and_grad(loss_fn)(
      model, images, occupancy, shape, size
    )
    optimizer.update(model, grads)
    return loss

  key = jax.random.key(seed)
  iterator = range(steps)
  if progress:
    from tqdm.auto import tqdm

    iterator = tqdm(iterator, desc="oracle training", unit="step")
  for i in iterator:
    images, scenes = render_batch(i * batch, batch, TRAIN_SEED)
    occ, shp, sz = oracle.cell_targets(
      np.stack([world.attributes(s) for s in scenes])
    )
    loss = step(
      model,
      optimizer,
      jax.random.fold_in(key, i),
      images,
      occ,
      shp,
      sz,
      max_blur,
      max_noise,
    )
    if progress and (i % 100 == 0 or i == steps - 1):
      iterator.set_postfix(loss=f"{float(loss):.4f}")
  return model


def validate(
  model: oracle.OracleNet, num: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
  """Accuracy of ``model`` on fresh real scenes (clean and blurred) and on
  pure noise; sizes are checked on every object."""
  images, scenes = render_batch(0, num, VALID_SEED)
  targets = oracle.targets_from_scenes(scenes)
  targets.size_mentioned[:] = targets.attributes[..., 0] == 1
  reader = oracle.Oracle(model=model)
  rng = np.random.default_rng([seed, VALID_SEED])
  noise = rng.standard_normal(images.shape).astype(np.float32)
  return {
    "real": reader.score(images, targets),
    "real_blur_0.5": reader.score(np.asarray(blur(images, 0.5)), targets),
    "noise": reader.score(noise, targets),
  }
