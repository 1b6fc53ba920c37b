"""Trains TiM: ``python -m tim_jax.main --config=configs/t2i.py --workdir=DIR``.

Overrides: ``--config.batch_size=32``, ``--config.model.dtype=bfloat16``,
``--config.mesh.fsdp=4`` ...; an unknown key stops with an error naming it.
Re-running with the same workdir resumes from its latest checkpoint.
"""

import sys

from absl import flags, logging

from tim_jax.commands import cli
from tim_jax.core import host_memory, paths
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_config(
    fv,
    "A config file (configs/t2i.py, configs/c2i.py), "
    "with an optional ':variant'.",
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, sample grids and TensorBoard logs go: a "
    "local folder or gs://bucket/path.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() "
    "first (multi-host TPU pods and GPU clusters).",
    flag_values=fv,
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(fv: flags.FlagValues, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.flag_config(fv)  # A bad file stops first.
  import jax  # pylint: disable=g-import-not-at-top

  if fv.distributed:
    jax.distributed.initialize()
  from tim_jax import training  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX %s on %d %s device(s), %d process(es)",
    jax.__version__,
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  logging.info("config:\n%s", config)
  # A local folder (made absolute) or a URL such as gs://bucket/run.
  training.train_and_evaluate(config, paths.absolute(fv.workdir))


def entry() -> None:
  """The console script ``tim-train``."""
  # XLA:CPU's per-step buffers on huge pages (a third of the CPU loop's
  # time went to page faults): tim_jax.core.host_memory.
  host_memory.exec_with_huge_pages()
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
