"""Evaluators declared in the config (``config.evals.<name>``).

Each evaluator has its own schedule (``every`` steps, and the last step;
``every=0`` turns it off) and returns scalars that the trainer writes to
TensorBoard and the console:

* ``holdout_loss``: the loss of the EMA parameters on one fixed held-out
  batch with a fixed key (``holdout/loss``, ``holdout/mse_loss``);
* ``shapes_oracle`` (built-in shapes data): the shapes oracle's attribute
  accuracy and Fréchet distance of the EMA model's samples for held-out
  scenes at each NFE (``oracle/nfe4/overall``, ``oracle/nfe4/fd``, ...);
* ``fid``: FID of EMA samples at each NFE against reference statistics
  (``fid/nfe4``), when ``reference`` and ``inception_weights`` are given.

An evaluator is built once per run by ``build(config, trainer)`` and called
as ``evaluator(trainer, state)``. It reads from the trainer only what every
trainer has: ``pipeline`` (a ``tim_jax.inference.Pipeline``), ``loss``
(the training loss), ``frozen``, ``mesh`` and the state's ``ema``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

from tim_jax.core import images, sharding
from tim_jax.core.errors import UserError
from tim_jax.data import kinds

if TYPE_CHECKING:
  import ml_collections

  from tim_jax.training.trainer import Trainer, TrainState


class HoldoutLoss:
  """The EMA parameters' loss on one fixed held-out batch, fixed rng."""

  def __init__(self, config, trainer, every: int):
    self.every = every
    eval_iter = kinds.iterator(config, kinds.source(config, "eval"))
    self.batch = sharding.global_batch(next(eval_iter), trainer.mesh)

    def holdout(ema, batch, frozen):
      # The training loss with the EMA as model and (for model guidance)
      # teacher, no condition dropout, a fixed key.
      with trainer.layer_forms():
        loss, metrics = trainer.loss(
          ema, ema, batch, jax.random.key(0), frozen, drop=False
        )
      return {"holdout/loss": loss, "holdout/mse_loss": metrics["mse_loss"]}

    self._fn = jax.jit(holdout)

  def __call__(self, trainer: Trainer, state: TrainState) -> dict[str, float]:
    return {
      k: float(v)
      for k, v in jax.device_get(
        self._fn(state.ema, self.batch, trainer.frozen)
      ).items()
    }


class ShapesOracle:
  """Oracle scores of EMA samples of held-out shapes scenes per NFE."""

  def __init__(
    self,
    config,
    trainer,
    every: int,
    nfe=(1, 4),
    num: int = 64,
    batch_size: int = 64,
    reference_num: int = 1000,
  ):
    if config.data.name != "shapes":
      raise UserError(
        "evals.shapes_oracle reads only the built-in shapes "
        f"world; this run trains on {config.data.name!r}: set "
        "--config.evals.shapes_oracle.every=0"
      )
    from tim_jax.shapes import scoring

    self.every, self.nfe, self.batch_size = every, tuple(nfe), batch_size
    self.scorer = scoring.ShapesScorer(
      config.model.kind, config.data.image_size, num, reference_num
    )
    self.cond, _ = trainer.pipeline.conditions(**self.scorer.requests())

  def __call__(self, trainer: Trainer, state: TrainState) -> dict[str, float]:
    out = {}
    pipe = trainer.pipeline
    for nfe in self.nfe:
      # A NaN sample scores as a miss; it does not stop the training run.
      images = pipe.generate(
        self.cond,
        num_steps=int(nfe),
        batch_size=self.batch_size,
        params=state.ema,
        check_finite=False,
      )
      scores = self.scorer.score(pipe.decode(images, check_finite=False))
      out.update({f"oracle/nfe{nfe}/{k}": float(v) for k, v in scores.items()})
    return out


class FID:
  """FID of EMA samples against reference statistics, per NFE."""

  def __init__(
    self,
    config,
    trainer,
    every: int,
    nfe=(4,),
    num: int = 5000,
    batch_size: int = 64,
    reference: str = "",
    inception_weights: str = "",
  ):
    from tim_jax.eval import fid, inception

    self.every, self.nfe, self.num = every, tuple(nfe), int(num)
    self.batch_size = batch_size
    self.reference = fid.Statistics.load(reference)
    self.extractor = inception.FeatureExtractor(
      inception.load_fid_weights(inception_weights), batch_size=batch_size
    )
    pipe = trainer.pipeline
    if not pipe.can_decode:
      pipe.decode(np.zeros((1,)))  # Raises: says which decoder is missing.
    # The sample grids' labels or prompts, cycled to `num` requests.
    cond, names = pipe.conditions()
    rows = np.arange(self.num) % len(names)
    self.cond = jax.tree.map(lambda c: np.asarray(c)[rows], cond)

  def __call__(self, trainer: Trainer, state: TrainState) -> dict[str, float]:
    from tim_jax.eval import fid

    pipe = trainer.pipeline
    out = {}
    for nfe in self.nfe:
      # As saved images: clipped and quantised (the official conversion).
      pixels = images.to_uint8(
        pipe.decode(
          pipe.generate(
            self.cond,
            num_steps=int(nfe),
            batch_size=self.batch_size,
            params=state.ema,
            check_finite=False,
          ),
          check_finite=False,
        )
      )
      stats = fid.Statistics.from_features(self.extractor(pixels))
      out[f"fid/nfe{nfe}"] = float(stats.frechet_distance(self.reference))
    return out


REGISTRY: dict[str, Callable] = {
  "holdout_loss": HoldoutLoss,
  "shapes_oracle": ShapesOracle,
  "fid": FID,
}


def build(config: ml_collections.ConfigDict, trainer: Trainer) -> dict:
  """The evaluators ``config.evals`` turns on, by name."""
  out = {}
  for name, settings in config.evals.items():
    if name not in REGISTRY:
      raise UserError(f"unknown evaluator {name!r}; known: {sorted(REGISTRY)}")
    settings = dict(settings)
    if not settings.get("every"):
      continue
    if name == "fid" and not (
      settings.get("reference") and settings.get("inception_weights")
    ):
      raise UserError(
        "evals.fid needs reference (an .npz of mu/sigma) and "
        "inception_weights (the FID InceptionV3); set them or "
        "--config.evals.fid.every=0"
      )
    out[name] = REGISTRY[name](config, trainer, **settings)
  return out
