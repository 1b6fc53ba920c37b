"""One process of a two-process run on 127.0.0.1 (see test_multihost.py).

    python multihost_step.py PROCESS_ID PORT OUT_JSON

Each process reads its own half of the global batch through the grain
pipeline, the halves are joined with make_array_from_process_local_data, and
one train step runs on a (data 2) mesh spanning both processes.
"""

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(
  coordinator_address=f"127.0.0.1:{port}",
  num_processes=2,
  process_id=process_id,
)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from train_utils import tiny_c2i  # noqa: E402

from tim_jax import training  # noqa: E402
from tim_jax.core import sharding  # noqa: E402
from tim_jax.data import kinds  # noqa: E402


def main():
  assert jax.process_count() == 2 and jax.device_count() == 2
  config = tiny_c2i()
  config.loss.groups = 2
  trainer = training.Trainer(config, sharding.make_mesh({"data": 2}))
  source = kinds.source(config)
  it = kinds.iterator(config, source)
  local = next(it)
  assert local["image"].shape[0] == config.batch_size // 2
  state = trainer.init_state()
  state, metrics = trainer.train_step(
    state, sharding.global_batch(local, trainer.mesh)
  )
  labels = jax.experimental.multihost_utils.process_allgather(
    local["label"], tiled=True
  )
  with open(out, "w") as f:
    json.dump(
      {
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "local_labels": local["label"].tolist(),
        "global_labels": np.asarray(labels).tolist(),
      },
      f,
    )


if __name__ == "__main__":
  main()
  jax.distributed.shutdown()
