"""Sharded training on 8 fake CPU devices (a subprocess, since the device
count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

from tim_jax import sharding

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(HERE,
                                                     "multidevice_step.py")],
                       capture_output=True, text=True, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):])


def test_one_step_is_the_same_on_every_mesh(report):
  meshes = {"1", "data8", "data4_fsdp2", "data2_fsdp2_tensor2"}
  assert meshes <= set(report)
  for name in meshes:
    entry = report[name]
    assert entry["loss_diff"] <= 1e-5 * max(1.0, abs(entry["loss"])), name
    assert entry["grad_norm_diff"] <= 1e-5 * entry["grad_norm"], name
    assert entry["param_max_diff"] <= 1e-5, name


def test_parameters_are_sharded_as_the_rules_say(report):
  # MLP kernel (embed, mlp) -> (fsdp, tensor): hidden 48 -> MLP width 128.
  full = [48, 128]
  assert report["1"]["mlp_kernel_shard_shape"] == full
  assert report["data8"]["mlp_kernel_shard_shape"] == full
  assert report["data4_fsdp2"]["mlp_kernel_shard_shape"] == [24, 128]
  assert report["data2_fsdp2_tensor2"]["mlp_kernel_shard_shape"] == [24, 64]
  entry = report["data2_fsdp2_tensor2"]
  assert entry["mlp_kernel_spec"] == "PartitionSpec('fsdp', 'tensor')" or (
      entry["mlp_kernel_spec"] == "P('fsdp', 'tensor')")
  # Optimizer moments follow their parameters.
  assert entry["adam_mu_spec"] == entry["mlp_kernel_spec"]


def test_checkpoint_restores_onto_another_mesh(report):
  restored = report["restore"]  # Saved on data 2 x fsdp 2 x tensor 2.
  assert restored["data8"]["num_devices"] == 8
  assert restored["data8"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert restored["1"]["num_devices"] == 1
  for entry in restored.values():
    assert entry["max_diff"] == 0.0
    assert entry["step"] == 1


def test_mesh_shapes():
  import jax
  n = jax.device_count()
  mesh = sharding.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh({"data": n + 1})


def test_rules_cover_every_logical_axis():
  rules = sharding.complete_rules(sharding.DEFAULT_RULES)
  assert {r[0] for r in rules} >= set(sharding.LOGICAL_AXES)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.complete_rules([("embed", "model")])
