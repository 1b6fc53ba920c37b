"""Writes the first-train-step golden case from the official TiM code.

    python tests/make_train_golden.py --official=PATH/TO/TiM

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its model and ``TransitionSchedule`` are imported from there, never copied
here. Needs torch and timm; ``flash_attn`` and a missing ``torchvision`` are
stubbed as in ``make_radio_golden.py``, and so are the CUDA RNG-state calls
of ``TransitionSchedule`` (the model has no dropout, so they change nothing).

The network is ``configs/c2i.py:xl2_256,smoke`` at tim_jax's own
initialisation (seed 0), written with the official parameter names
(``tim_jax.weights.convert.to_official``). The batch (latents, labels with
some dropped to the null class, REPA targets) is random; the times t, r and
the noise z are what ``tim_jax.method.transition.loss`` draws from the
stored key (``transition.draw_inputs``), fed to the official
``TransitionSchedule.__call__`` in place of its own draws. The official
trainer's loss ``weighted_loss + proj_coeff * proj_loss`` is then
back-propagated, in float64 from the float32 weights, and the gradient's
global norm (what ``accelerator.clip_grad_norm_`` returns, before clipping)
and per-parameter norms are stored in
``tests/data/golden/train_step/``.
"""

import argparse
import json
import os
import sys

from make_radio_golden import use_official
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "tests", "data", "golden", "train_step")
CONFIG = "xl2_256,smoke"
SEED = 0


def tim_jax_side():
  """The tim_jax init, batch and loss inputs (numpy, official layout)."""
  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp

  from configs import c2i
  from tim_jax.config import builders
  from tim_jax.method import transition
  from tim_jax.weights import convert
  # pylint: enable=import-outside-toplevel

  c = c2i.get_config(CONFIG)
  model = builders.new_model(c, seed=SEED)
  net = dict(c.model.network)
  loss_config = builders.loss_config(c, 1)
  transport = builders.transport(c)
  b, s, ch = c.batch_size, net["input_size"], net["in_channels"]
  rng = np.random.default_rng(4)
  x = rng.standard_normal((b, s, s, ch)).astype(np.float32)
  labels = rng.integers(0, net["num_classes"], b)
  dropped = np.where(rng.random(b) < 0.3, net["num_classes"], labels)
  tokens = (s // net["patch_size"]) ** 2
  h_target = rng.standard_normal((b, tokens, net["z_dim"])).astype(np.float32)
  key = jax.random.key(7)
  t, r, z = transition.draw_inputs(
    key, x.shape, transport, loss_config, jnp.float32
  )
  meta = dict(
    config=f"configs/c2i.py:{CONFIG}",
    seed=SEED,
    network=net,
    transport=dict(name=c.transport.name, **dict(c.transport.params)),
    loss={
      k: getattr(loss_config, k)
      for k in (
        "diffusion_ratio",
        "consistency_ratio",
        "derivative",
        "epsilon",
        "weight_time_type",
        "weight_time_tangent",
        "weight_time_sigmoid",
        "weight_t_and_r",
        "adaptive_eps",
        "directional_loss",
        "proj_coeff",
      )
    },
  )
  arrays = dict(
    x=np.moveaxis(x, -1, 1),
    z=np.moveaxis(np.asarray(z), -1, 1),
    t=np.asarray(t),
    r=np.asarray(r),
    labels=labels,
    dropped=dropped,
    h_target=h_target,
    key=np.asarray(jax.random.key_data(key)),
  )
  return convert.to_official(model), meta, arrays


def main():
  p = argparse.ArgumentParser()
  p.add_argument(
    "--official", required=True, help="a checkout of github.com/WZDTHU/TiM"
  )
  a = p.parse_args()
  weights, meta, arrays = tim_jax_side()
  use_official(a.official)
  # pylint: disable=import-outside-toplevel
  import safetensors.numpy
  from tim.models.c2i.tim_model import TiM
  from tim.schedulers import transports
  from tim.schedulers.transition import TransitionSchedule
  import torch
  # pylint: enable=import-outside-toplevel

  os.makedirs(FOLDER, exist_ok=True)
  safetensors.numpy.save_file(
    weights, os.path.join(FOLDER, "model.safetensors")
  )
  net = TiM(**meta["network"]).double().train()
  net.load_state_dict(
    {k: torch.from_numpy(v).double() for k, v in weights.items()}
  )
  # The trainer's default flash attention is CUDA-only; the same math.
  model = lambda *args, **kw: net(*args, **{"attn_type": "fused_attn", **kw})
  torch.cuda.get_rng_state = lambda: None
  torch.cuda.set_rng_state = lambda state: None

  loss = meta["loss"]
  assert meta["transport"]["name"] == "ot_fm" and loss["directional_loss"]
  schedule = TransitionSchedule(
    transports.OT_FM(
      P_mean=meta["transport"]["P_mean"], P_std=meta["transport"]["P_std"]
    ),
    diffusion_ratio=loss["diffusion_ratio"],
    consistency_ratio=loss["consistency_ratio"],
    derivative_type=loss["derivative"],
    differential_epsilon=loss["epsilon"],
    weight_t_and_r=loss["weight_t_and_r"],
    weight_time_type=loss["weight_time_type"],
    weight_time_tangent=loss["weight_time_tangent"],
    weight_time_sigmoid=loss["weight_time_sigmoid"],
  )
  batch = arrays["x"].shape[0]
  n_diffusion = round(loss["diffusion_ratio"] * batch)
  t = torch.from_numpy(arrays["t"]).double()
  r = torch.from_numpy(arrays["r"]).double()
  # tim_jax's draws in place of the official ones (same rule: r = t on the
  # first rows, r = T_min on the last).
  schedule.sample_t_and_r = lambda batch_size, dtype, device: (
    t,
    r,
    n_diffusion,
  )
  as_t = lambda k: torch.from_numpy(arrays[k])
  weighted, proj, parts = schedule(
    model,
    model,
    model,
    batch,
    as_t("x").double(),
    as_t("z").double(),
    dict(y=as_t("dropped"), return_zs=True),
    use_dir_loss=True,
    h_target=as_t("h_target").double(),
    ema_kwargs=dict(y=as_t("labels"), return_zs=False),
    null_kwargs=dict(y=torch.full((batch,), meta["network"]["num_classes"])),
  )
  total = weighted + loss["proj_coeff"] * proj
  total.backward()
  grads = {k: v.grad for k, v in net.named_parameters() if v.grad is not None}
  norm = torch.nn.utils.get_total_norm(list(grads.values()))
  arrays.update(
    loss=total.item(),
    weighted_loss=weighted.item(),
    proj_loss=proj.item(),
    denoising_loss=parts["denoising_loss"],
    grad_norm=norm.item(),
    grad_names=np.asarray(sorted(grads)),
    grad_norms=np.asarray([grads[k].norm().item() for k in sorted(grads)]),
  )
  np.savez(os.path.join(FOLDER, "step.npz"), **arrays)
  with open(os.path.join(FOLDER, "network.json"), "w") as f:
    json.dump(meta, f, indent=1)
  top = np.argsort(-arrays["grad_norms"])[:4]
  print(
    f"official first step: loss {total.item():.6g}, grad norm "
    f"{norm.item():.6g}; largest: "
    + ", ".join(
      f"{arrays['grad_names'][i]} {arrays['grad_norms'][i]:.4g}" for i in top
    )
  )


if __name__ == "__main__":
  main()
