"""Training: the trainer's step, the loop, the optimizer, the evaluators.

``train_and_evaluate(config, workdir)`` runs a whole training run;
``Trainer`` holds its mesh, state and compiled step.
"""

from tim_jax.training.loop import is_due, train_and_evaluate, write_sample_grids
from tim_jax.training.trainer import NonFiniteError, Trainer, TrainState

__all__ = [
  "NonFiniteError",
  "TrainState",
  "Trainer",
  "is_due",
  "train_and_evaluate",
  "write_sample_grids",
]
