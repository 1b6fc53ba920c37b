"""Trains the shapes oracle: ``python -m tim_jax.commands.train_oracle``.

    python -m tim_jax.commands.train_oracle --out=tim_jax/shapes/oracle.safetensors

Deterministic: a function of its flags (``tim_jax.shapes.train_oracle``).
The weights' metadata records the flags, the seconds taken and the
validation figures.
"""

from __future__ import annotations

import sys
import time

from absl import flags, logging

from tim_jax.commands import cli
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  from tim_jax.shapes import oracle  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
    "out",
    oracle.DEFAULT_WEIGHTS,
    "Where to write the weights (safetensors).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_steps", 2500, "Training steps.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "batch_size", 128, "Scenes per step.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_float(
    "learning_rate",
    2e-3,
    "Peak learning rate (cosine schedule).",
    lower_bound=0.0,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "seed", 0, "Initialisation and augmentation seed.", flag_values=fv
  )


def main(fv: flags.FlagValues, args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.shapes import oracle, train_oracle  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  cli.check_writable(fv.out, "--out")
  t0 = time.time()
  settings = dict(
    steps=fv.num_steps, batch=fv.batch_size, lr=fv.learning_rate, seed=fv.seed
  )
  model = train_oracle.train(**settings)
  seconds = time.time() - t0
  figures = train_oracle.validate(model)
  for name, scores in figures.items():
    logging.info("%s: %s", name, {k: round(v, 4) for k, v in scores.items()})
  oracle.save(
    model,
    fv.out,
    {
      "training": dict(
        settings,
        seconds=round(seconds, 1),
        train_seed=train_oracle.TRAIN_SEED,
        valid_seed=train_oracle.VALID_SEED,
        jax=jax.__version__,
      ),
      "validation": figures,
    },
  )
  logging.info("wrote %s (trained in %.0f s)", fv.out, seconds)


def entry() -> None:
  """The console script ``tim-train-oracle``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
