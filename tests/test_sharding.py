"""Sharded training on 8 fake CPU devices (a subprocess, since the device
count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

from tim_jax.core import sharding

pytestmark = [
  pytest.mark.slow,
  pytest.mark.multiprocess,
  pytest.mark.xdist_group("sharding_report"),  # One subprocess for all.
]

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, os.path.join(HERE, "multidevice_step.py")],
    capture_output=True,
    text=True,
    env=env,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT ") :])


def test_one_step_is_the_same_on_every_mesh(report):
  # Data, FSDP and tensor parallelism (activations pinned: rows over the
  # batch axes, heads and MLP units over `tensor`), and the exact JVP
  # derivative on FSDP meshes against its one-device run.
  meshes = {
    "1",
    "data8",
    "data4_fsdp2",
    "data2_fsdp2_tensor2",
    "data4_tensor2",
    "jvp_data2_fsdp4",
    "jvp_fsdp8",
  }
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
    entry["mlp_kernel_spec"] == "P('fsdp', 'tensor')"
  )
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


def abstract_params(hidden_size):
  from flax import nnx
  import train_utils

  from tim_jax.config import builders

  config = train_utils.tiny_t2i()
  config.model.network.hidden_size = hidden_size
  config.model.network.num_heads = 1  # RoPE: head_dim divisible by 4.
  return nnx.state(
    nnx.eval_shape(lambda: builders.new_model(config)), nnx.Param
  )


def test_rules_cover_every_logical_axis_of_the_model():
  from flax import nnx
  import jax

  params = abstract_params(32)
  names = {
    n
    for v in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for n in sharding.logical_names(v)
  }
  assert {"embed", "mlp", "heads", "adaln"} <= names
  rules = sharding.complete_rules(sharding.DEFAULT_RULES, names)
  assert {r[0] for r in rules} >= names
  assert dict(rules)["adaln"] is None and dict(rules)["embed"] == "fsdp"
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.complete_rules([("embed", "model")])


FALLBACK_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import jax
import test_sharding
from tim_jax.core import sharding
mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
params = test_sharding.abstract_params({hidden})
for _ in range(2):  # Logged once, however often the shardings are built.
  out = sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)
kernel = out["blocks"][0]["mlp"]["fc1_g"]["kernel"]
print("SPEC", kernel.spec)
"""


@pytest.mark.parametrize("hidden", [32, 36])
def test_sharding_fallbacks_are_logged_once_by_name(hidden):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  out = subprocess.run(
    [sys.executable, "-c", FALLBACK_SCRIPT.format(tests=HERE, hidden=hidden)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if "sharding fallback" in l]
  spec = [l for l in out.stdout.splitlines() if l.startswith("SPEC")][0]
  if hidden == 32:  # 8 divides every embed dimension: nothing to say.
    assert not lines
    assert "fsdp" in spec
  else:  # 36 rows over 8 devices: replicated, and said so by name.
    assert "fsdp" not in spec
    fc1 = [l for l in lines if "blocks/0/mlp/fc1_g/kernel" in l]
    assert len(fc1) == 1, lines
    assert "(36, " in fc1[0] and "'embed'" in fc1[0] and "'fsdp'" in fc1[0]


def test_frozen_weights_split_their_largest_divisible_axis_over_fsdp():
  import jax
  from jax.sharding import PartitionSpec as P
  import numpy as np

  mesh = jax.sharding.AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
  tree = {
    "embed": np.zeros((262, 1152)),
    "odd": np.zeros((6, 7)),
    "vector": np.zeros((12,)),
    "scalar": np.zeros(()),
  }
  specs = {k: v.spec for k, v in sharding.frozen_shardings(tree, mesh).items()}
  assert specs == {
    "embed": P(None, "fsdp"),
    "odd": P(),
    "vector": P("fsdp"),
    "scalar": P(),
  }
  flat = jax.sharding.AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))
  assert all(
    s.spec == P() for s in sharding.frozen_shardings(tree, flat).values()
  )


def test_platform_of_concrete_and_traced_arrays():
  import jax
  import jax.numpy as jnp
  import numpy as np

  device = jax.devices()[0]
  assert sharding.platform_of({"a": jnp.ones(2)}) == device.platform
  assert sharding.platform_of(np.ones(2)) == device.platform  # Default.
  placed = jax.device_put(jnp.ones(2), device)
  assert placed.committed and sharding.platform_of([placed]) == "cpu"
  seen = []
  jax.jit(lambda x: seen.append(sharding.platform_of(x)) or x)(jnp.ones(2))
  assert seen == [None]  # Under a trace: the lowering's, unknown.
