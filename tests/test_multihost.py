"""Two processes joined by jax.distributed on 127.0.0.1 (gloo collectives)
train one step together; the result equals one process with the whole
global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from train_utils import tiny_c2i

from tim_jax import training
from tim_jax.core import sharding
from tim_jax.data import kinds, pipeline

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port = str(_free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, "multihost_step.py"),
        str(i),
        port,
        outs[i],
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  results = [json.load(open(o)) for o in outs]

  # Each process read a different half of the same global batch.
  assert results[0]["local_labels"] != results[1]["local_labels"]
  assert results[0]["global_labels"] == (
    results[0]["local_labels"] + results[1]["local_labels"]
  )
  # Both processes see the same loss.
  assert results[0]["loss"] == results[1]["loss"]

  # One process, the same global batch and partition: the same step.
  config = tiny_c2i()
  config.loss.groups = 2
  trainer = training.Trainer(config)
  whole = next(
    pipeline.make_iterator(
      kinds.source(config),
      global_batch_size=config.batch_size,
      seed=config.data.seed,
      process_index=0,
      process_count=1,
    )
  )
  # The same examples; the pipeline deals them to processes in turn, so the
  # assembled global array holds process 0's rows, then process 1's.
  order = np.concatenate(
    [np.arange(0, config.batch_size, 2), np.arange(1, config.batch_size, 2)]
  )
  whole = {k: v[order] for k, v in whole.items()}
  assert whole["label"].tolist() == results[0]["global_labels"]
  state = trainer.init_state()
  _, metrics = trainer.train_step(
    state, sharding.global_batch(whole, trainer.mesh)
  )
  np.testing.assert_allclose(
    float(metrics["loss"]), results[0]["loss"], rtol=1e-5
  )
  np.testing.assert_allclose(
    float(metrics["grad_norm"]), results[0]["grad_norm"], rtol=1e-5
  )
