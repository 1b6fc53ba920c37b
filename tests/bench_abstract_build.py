"""Seconds of abstract (shape-only) builds: the TiM backbones, the encoders
and the compile command's setup (its abstract trainer state), each in a
fresh process.

  python tests/bench_abstract_build.py [--repeats=2] [--other=TREE]

With ``--other`` (a checkout of another revision) the two trees alternate,
case by case, so that a shared host's load falls on both alike.
"""

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
  "TiM XL/2": (
    "from tim_jax import models\nfrom tim_jax.models import architectures\n"
    "a = architectures.get('XL/2')\n"
    "go = lambda: nnx.eval_shape(lambda: models.build(a.kind, a.network))"
  ),
  "TiM T2I-XL": (
    "from tim_jax import models\nfrom tim_jax.models import architectures\n"
    "a = architectures.get('T2I-XL')\n"
    "go = lambda: nnx.eval_shape(lambda: models.build(a.kind, a.network))"
  ),
  "RADIO v2.5-B": (
    "from tim_jax.encoders import radio\n"
    "go = lambda: radio.random_encoder(abstract=True)"
  ),
  "Gemma-3 1B": (
    "from tim_jax.encoders import gemma\ngo = gemma.abstract_encoder"
  ),
  **{
    f"autoencoder {name}": (
      "import json\nfrom tim_jax import autoencoders\n"
      f"cfg = json.load(open('tests/data/autoencoders/{name}/config.json'))\n"
      "go = lambda: nnx.eval_shape(lambda: autoencoders.build(cfg))"
    )
    for name in ("sd_vae_ft_ema", "dc_ae_f32c32_sana_1.1")
  },
  # compile_steps up to lowering (tim_jax.commands.compile): the abstract
  # REPA teacher and trainer state.
  "compile setup xl2_256 v5p:2x2x4": """
from tim_jax import training
from tim_jax.commands import compile as cc
from tim_jax.config import builders, config_base
from tim_jax.core import sharding
from tim_jax.encoders import radio
devices = cc.topology_devices("v5p:2x2x4")
def go():
  c = config_base.load_file("configs/c2i.py:xl2_256")
  c = c.copy_and_resolve_references()
  c.unlock()
  c.mesh.data, c.mesh.fsdp = 4, 4
  t = radio.random_encoder(dtype=builders.compute_dtype(c), abstract=True)
  c.model.network.z_dim = t.dim
  c.lock()
  mesh = sharding.make_mesh(dict(c.mesh), devices=devices)
  training.Trainer(c, mesh, repa_encoder=t, abstract=True)
""",
}

TIMER = """import time
from flax import nnx
{setup}
t = time.perf_counter()
go()
print(time.perf_counter() - t)
"""


def run(tree: str, setup: str) -> float:
  env = dict(os.environ, PYTHONPATH=tree)
  out = subprocess.run(
    [sys.executable, "-c", TIMER.format(setup=setup)],
    cwd=tree,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return float(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--other", default=None)
  parser.add_argument("--cases", default=",".join(CASES))
  args = parser.parse_args()
  trees = {"this": HERE}
  if args.other:
    trees["other"] = os.path.abspath(args.other)
  for name in args.cases.split(","):
    times = {k: [] for k in trees}
    for _ in range(args.repeats):
      for key, tree in trees.items():
        times[key].append(run(tree, CASES[name]))
    row = "  ".join(
      f"{k} {statistics.median(v):6.2f} s ({', '.join(f'{t:.2f}' for t in v)})"
      for k, v in times.items()
    )
    print(f"{name:34s} {row}", flush=True)


if __name__ == "__main__":
  main()
