"""The TPU cost guard's step and its recorded baseline.

A small bf16 TiM train step (256 tokens, head_dim 64: the shapes where the
TPU forms of the layers matter) compiled for four v5e chips by libtpu's
compiler on any host. ``tests/test_compile.py`` checks that its cost-model
time and HBM stay within a few percent of ``data/tpu_cost/baseline.json``.
After a deliberate change (or a new jax/libtpu), re-record with

    PYTHONPATH=. python tests/tpu_cost_baseline.py

and say why in the commit.
"""

import datetime
import importlib.metadata
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "tests", "data", "tpu_cost", "baseline.json")
TOPOLOGY = "v5e:2x2"
OVERRIDES = {
  "mesh.data": 4,
  "model.dtype": "bfloat16",
  "model.network.hidden_size": 256,
  "model.network.num_heads": 4,
  "model.network.patch_size": 2,
  "model.network.depth": 2,
  "batch_size": 32,
}


def config():
  """configs/c2i.py (tiny) with ``OVERRIDES``."""
  sys.path.insert(0, ROOT)
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  c = config_base.load_file(os.path.join(ROOT, "configs", "c2i.py"))
  return config_base.with_overrides(c, OVERRIDES)


def measure(devices) -> dict:
  """The guard step's compiled train step: the figures the guard checks."""
  from tim_jax.commands import compile as compile_lib  # pylint: disable=g-import-not-at-top

  row = compile_lib.compile_steps(config(), devices, sampler=False)["rows"][0]
  return dict(
    roofline_seconds=row["roofline_seconds"],
    hbm_bytes=row["memory"]["total"],
    xla_flops_per_device=row["xla_flops_per_device"],
  )


def versions() -> dict:
  return {name: importlib.metadata.version(name) for name in ("jax", "libtpu")}


def main() -> None:
  sys.path.insert(0, ROOT)
  from tim_jax.commands import compile as compile_lib  # pylint: disable=g-import-not-at-top

  record = dict(
    measure(compile_lib.topology_devices(TOPOLOGY)),
    topology=TOPOLOGY,
    overrides=OVERRIDES,
    versions=versions(),
    recorded=datetime.date.today().isoformat(),
    command="PYTHONPATH=. python tests/tpu_cost_baseline.py",
  )
  with open(BASELINE, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  print(json.dumps(record, indent=1))


if __name__ == "__main__":
  main()
