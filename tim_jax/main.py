"""Trains TiM: ``python -m tim_jax.main --config=configs/t2i.py --workdir=DIR``.

Overrides: ``--config.batch_size=32``, ``--config.model.dtype=bfloat16``,
``--config.mesh.fsdp=4`` ...; an unknown key stops with an error naming it.
Re-running with the same workdir resumes from its latest checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/t2i.py, configs/c2i.py), with an "
    "optional ':variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, sample grids and "
                    "TensorBoard logs go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "first (multi-host TPU pods and GPU clusters).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the console."""

  def filter(self, record):
    noisy = ("orbax" in record.pathname or "/grain/" in record.pathname)
    return not (noisy and record.levelno < 30)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tim_jax import config_base
  config = config_base.flag_config(flags.FLAGS)  # A bad file stops first.
  import logging as std_logging
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  import jax
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  from tim_jax import train
  logging.info("JAX %s on %d %s device(s), %d process(es)", jax.__version__,
               jax.device_count(), jax.devices()[0].platform,
               jax.process_count())
  logging.info("config:\n%s", config)
  train.train_and_evaluate(config, os.path.abspath(flags.FLAGS.workdir))


if __name__ == "__main__":
  app.run(main)
