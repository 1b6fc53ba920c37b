"""The optimiser of the official trainers, from the config, with optax.

AdamW over every parameter (no weight-decay exclusions: the official trainers
pass ``model.parameters()`` unsplit, ``projects/train/trainer_c2i.py``), betas
(0.9, 0.95), eps 1e-6, weight decay 0.01, gradient clipping by global norm,
and ``lr = base_lr * global_batch / base_batch`` when ``scale_lr``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optax

from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  import ml_collections

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(
  config: ml_collections.ConfigDict, global_batch: int
) -> float:
  """The peak learning rate: ``base_lr``, scaled by the global batch over ``base_batch`` when ``scale_lr``."""
  lr = float(config.base_lr)
  if config.scale_lr:
    lr *= global_batch / float(config.base_batch)
  return lr


def schedule(
  config: ml_collections.ConfigDict, global_batch: int, total_steps: int
) -> optax.Schedule:
  """The learning-rate schedule of ``config`` (warmup, then constant, cosine or linear)."""
  peak = learning_rate(config, global_batch)
  warmup = int(config.get("warmup_steps", 0))
  kind = config.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise UserError(
      f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}"
    )
  if kind == "constant":
    main = optax.constant_schedule(peak)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  else:
    main = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
  if warmup:
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), main], [warmup]
    )
  return main


def make(
  config: ml_collections.ConfigDict, global_batch: int, total_steps: int
) -> optax.GradientTransformation:
  """An optax GradientTransformation for ``config`` (``config.optimizer``)."""
  parts = []
  if config.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(config.grad_clip)))
  parts.append(
    optax.adamw(
      schedule(config, global_batch, total_steps),
      b1=float(config.b1),
      b2=float(config.b2),
      eps=float(config.eps),
      weight_decay=float(config.weight_decay),
    )
  )
  return optax.chain(*parts)
