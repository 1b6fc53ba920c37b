"""Quality against steps: ``python -m tim_jax.commands.nfe_study``.

    python -m tim_jax.commands.nfe_study --run=TiM=RUN_DIR \\
        --run=FM=FM_RUN_DIR --num_steps=1,2,4,8,16,32,64 --num_images=500 \\
        --out=DIR

For every run and step count, samples ``--num_images`` held-out scenes of
the built-in shapes world and scores them with the shapes oracle
(``tim_jax.shapes.nfe_study``); writes ``results.csv`` (after every row),
``results.md``, ``nfe_study.png`` and ``samples_<run>.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os
import sys
import time

from absl import flags

from tim_jax.commands import cli
from tim_jax.core.errors import UserError
from tim_jax.weights import checkpoint


def parse_runs(items: Sequence[str]) -> dict[str, str]:
  """["NAME=PATH", ...] -> {NAME: PATH}, refusing bad or repeated names."""
  runs = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--run must be NAME=PATH, got {item!r}")
    if name == "real" or name in runs:
      raise UserError(f"--run: the name {name!r} is reserved or repeated")
    runs[name] = path
  if not runs:
    raise UserError("give at least one --run=NAME=PATH")
  return runs


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string(
    "run", [], "NAME=PATH of a tim_jax run (repeatable).", flag_values=fv
  )
  flags.DEFINE_list(
    "num_steps",
    ["1", "2", "4", "8", "16", "32", "64"],
    "Step counts, one study row each.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_images",
    500,
    "Images per run and step count.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_reference",
    5000,
    "Real images the distance is measured to.",
    lower_bound=2,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size", 250, "Images per sampler call.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "seed", 0, "Noise seed (the same for every run).", flag_values=fv
  )
  flags.DEFINE_float(
    "cfg_scale",
    None,
    "Guidance scale for every run (default: each run's sample.cfg_scale).",
    lower_bound=1.0,
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "mode",
    None,
    ["transition", "diffusion"],
    "Sampler "
    "mode for every run (default: each run's sample.mode); "
    "diffusion = Euler steps of the model's flow (r = t).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "stochasticity",
    0.0,
    "OT-FM stochastic ratio of the sampler for every run (0: deterministic).",
    lower_bound=0.0,
    flag_values=fv,
  )
  flags.DEFINE_boolean(
    "last_step_noise",
    True,
    "With --mode=diffusion and --stochasticity > 0: whether the last Euler "
    "step (to T_min) adds noise too, as the official sampler's does; "
    "--nolast_step_noise keeps it deterministic.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "weights",
    "ema",
    list(checkpoint.WEIGHT_SETS),
    "Each checkpoint's EMA weights or its trained weights.",
    flag_values=fv,
  )
  flags.DEFINE_string("out", "nfe_study", "Output directory.", flag_values=fv)

  def step_counts(value):
    try:
      return all(int(v) >= 1 for v in value) and bool(value)
    except ValueError:
      return False

  flags.register_validator(
    "num_steps", step_counts, "must be integers >= 1", flag_values=fv
  )
  # A flag that would change nothing is refused rather than ignored.
  flags.register_multi_flags_validator(
    ["last_step_noise", "stochasticity", "mode"],
    lambda v: (
      v["last_step_noise"]
      or (v["stochasticity"] > 0 and v["mode"] != "transition")
    ),
    "--nolast_step_noise needs --stochasticity > 0 and the diffusion mode "
    "(--mode=diffusion)",
    flag_values=fv,
  )


def main(fv: flags.FlagValues, args) -> None:
  from tim_jax import inference  # pylint: disable=g-import-not-at-top
  from tim_jax.shapes import nfe_study  # pylint: disable=g-import-not-at-top

  if args:
    raise UserError(f"unexpected arguments: {args}")
  runs = parse_runs(fv.run)
  nfes = [int(v) for v in fv.num_steps]
  t0 = time.time()
  os.makedirs(fv.out, exist_ok=True)
  partial = os.path.join(fv.out, "results.csv")
  rows, strips = nfe_study.run_study(
    runs,
    nfes,
    num=fv.num_images,
    batch_size=fv.batch_size,
    seed=fv.seed,
    cfg_scale=fv.cfg_scale,
    reference_num=fv.num_reference,
    mode=fv.mode,
    stochasticity=fv.stochasticity,
    last_step_noise=fv.last_step_noise,
    load=functools.partial(inference.load, weights=fv.weights),
    on_row=lambda rows: nfe_study.write_csv(rows, partial),
  )
  nfe_study.write_outputs(rows, strips, fv.out, nfes)
  print(nfe_study.markdown(rows))
  print(
    f"wrote {fv.out}/results.csv, results.md, nfe_study.png and "
    f"samples_*.png in {time.time() - t0:.0f} s"
  )


def entry() -> None:
  """The console script ``tim-nfe-study``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
