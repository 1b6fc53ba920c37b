"""Run as a subprocess with 8 fake CPU devices (see test_sharding.py).

One train step on several meshes; prints a JSON report.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tim_jax import training  # noqa: E402
from tim_jax.config import config_base
from tim_jax.core import sharding


def tiny_config():
  c = config_base.base_config()
  c.model.kind = "c2i"
  c.model.network = dict(
    patch_size=2,
    in_channels=4,
    depth=2,
    hidden_size=48,
    num_heads=2,
    encoder_depth=1,
    z_dim=16,
    projector_dim=32,
    lora_hidden_size=8,
    num_classes=10,
  )
  c.batch_size = 16
  c.num_steps = 10
  c.loss.groups = 8  # The same row partition on every mesh.
  c.optimizer.base_lr = 1e-3
  c.optimizer.base_batch = 16
  c.ema_decay = 0.9
  return c


def main():
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.standard_normal((16, 8, 8, 4)).astype(np.float32),
    "label": rng.integers(0, 10, (16,)).astype(np.int32),
  }
  meshes = {
    "1": dict(data=1),
    "data8": dict(data=8),
    "data4_fsdp2": dict(data=4, fsdp=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "data4_tensor2": dict(data=4, tensor=2),
  }
  # The exact JVP derivative, on one device and on FSDP meshes (the
  # official code calls JVP incompatible with FSDP).
  jvp_meshes = {
    "jvp_1": dict(data=1),
    "jvp_data2_fsdp4": dict(data=2, fsdp=4),
    "jvp_fsdp8": dict(data=1, fsdp=8),
  }
  jvp_config = tiny_config()
  jvp_config.loss.derivative = "jvp"
  report = {}
  ref = None
  runs = [(n, m, config) for n, m in meshes.items()] + [
    (n, m, jvp_config) for n, m in jvp_meshes.items()
  ]
  for name, shape, cfg in runs:
    if name == "jvp_1":
      ref = None  # JVP runs compare with the one-device JVP run.
    devices = jax.devices()[: int(np.prod(list(shape.values())))]
    mesh = sharding.make_mesh(shape, devices)
    trainer = training.Trainer(cfg, mesh)
    state = trainer.init_state()
    state, metrics = trainer.train_step(
      state, sharding.global_batch(batch, mesh)
    )
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
    flat = jax.tree.leaves(params)
    entry = {
      "loss": float(metrics["loss"]),
      "grad_norm": float(metrics["grad_norm"]),
    }
    if ref is None:
      ref = (entry["loss"], flat, entry["grad_norm"])
    entry["loss_diff"] = abs(entry["loss"] - ref[0])
    entry["grad_norm_diff"] = abs(entry["grad_norm"] - ref[2])
    entry["param_max_diff"] = max(
      float(np.max(np.abs(a - b))) for a, b in zip(flat, ref[1])
    )
    k = state.params["blocks"][0]["mlp"]["fc1_g"]["kernel"]
    q = state.params["blocks"][0]["attn"]["qkv"]["kernel"]
    o = state.opt_state[1][0].mu["blocks"][0]["mlp"]["fc1_g"]["kernel"]
    entry["mlp_kernel_spec"] = str(k.sharding.spec)
    entry["qkv_kernel_spec"] = str(q.sharding.spec)
    entry["adam_mu_spec"] = str(o.sharding.spec)
    entry["mlp_kernel_shard_shape"] = list(k.addressable_shards[0].data.shape)
    report[name] = entry
    if cfg is config:
      last = (trainer, state, params)

  # Save on the last mesh (data 2 x fsdp 2 x tensor 2), restore onto others.
  import tempfile

  from tim_jax.data import pipeline
  from tim_jax.shapes import world
  from tim_jax.weights import checkpoint

  trainer, state, params = last
  it = pipeline.make_iterator(
    world.ShapesSource(size=8, kind="c2i"), global_batch_size=16, seed=0
  )
  directory = tempfile.mkdtemp()
  ck = checkpoint.Checkpointer(directory)
  ck.save(1, state, it, {"model": {}})
  ck.close()
  restored = {}
  for name in ("data8", "1"):
    shape = meshes[name]
    devices = jax.devices()[: int(np.prod(list(shape.values())))]
    other = training.Trainer(config, sharding.make_mesh(shape, devices))
    ck = checkpoint.Checkpointer(directory)
    back = ck.restore(1, other.abstract_with_shardings(), it)
    ck.close()
    got = jax.tree.leaves(
      jax.tree.map(np.asarray, nnx.to_pure_dict(back.params))
    )
    k = back.params["blocks"][0]["mlp"]["fc1_g"]["kernel"]
    restored[name] = {
      "max_diff": max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(got, jax.tree.leaves(params))
      ),
      "num_devices": len(k.sharding.device_set),
      "mesh": dict(k.sharding.mesh.shape),
      "step": int(back.step),
    }
  report["restore"] = restored
  print("REPORT " + json.dumps(report))


if __name__ == "__main__":
  main()
