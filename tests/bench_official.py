"""Times tim_jax and the official PyTorch TiM side by side, in one process.

    python tests/bench_official.py --official=PATH/TO/TiM [--batch_size=64] \
        [--repeats=5] [--out=side_by_side.json]

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its model and ``TransitionSchedule`` are imported from there (``update_ema``
is repeated: its module imports wandb) (needs torch and timm; ``torchvision`` and ``flash_attn`` are stubbed
as in make_radio_golden.py). Both sides run the small benchmark config of
docs/results/benchmarks.md (``configs/c2i.py`` tiny with D 256, depth 6,
4 heads, 32x32x3 images, patch 4: 64 tokens), batch 64, float32, on the
CPU, with the same weights (tim_jax's init converted to the official names):

* ``forward``: one network evaluation (official: ``attn_type="fused_attn"``,
  PyTorch's scaled_dot_product_attention, under ``no_grad``);
* ``tim_dde_step``: loss (DDE target, directional loss, time and adaptive
  weights), gradient, AdamW and the EMA update (official: the trainer's
  ``loss_fn`` + ``backward`` + ``clip_grad_norm_`` + ``AdamW.step`` +
  ``update_ema``; its loss also runs the REPA projector on a fixed random
  target, which tim_jax's tiny config does not have: a few percent of a
  step);
* ``sample_nfe1``, ``sample_nfe8``: the sampler without guidance.

Each row is the median of ``--repeats`` runs after a warm-up run;
tim_jax's are compiled first. Both use every core (``torch.set_num_threads``
= the CPU count; XLA's CPU thread pool). Outputs are compared as a check that
both compute the same function (forward: relative L2 error).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tim_jax_config(batch):
  from tim_jax.config import config_base  # pylint: disable=import-outside-toplevel

  c = config_base.load_file(os.path.join(ROOT, "configs", "c2i.py"))
  c.unlock()
  net = c.model.network
  net.hidden_size, net.depth, net.lora_hidden_size = 256, 6, 64
  # The official RoPE index rule, so both sides compute the same function.
  c.model.rope_positions = "official"
  c.batch_size = batch
  return config_base.lock(c)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--official", required=True)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  p.add_argument(
    "--huge_pages",
    type=int,
    default=1,
    help="1: run with glibc's huge-page tunable, as the training command "
    "does (both sides share the process); 0: 4 KiB pages",
  )
  a = p.parse_args()
  from tim_jax.core import host_memory  # pylint: disable=import-outside-toplevel

  if a.huge_pages:
    host_memory.exec_with_huge_pages()

  import jax  # pylint: disable=import-outside-toplevel

  from tim_jax import training  # pylint: disable=import-outside-toplevel
  from tim_jax.core import sharding  # pylint: disable=import-outside-toplevel
  from tim_jax.core.timing import median_seconds  # pylint: disable=import-outside-toplevel
  from tim_jax.data import kinds  # pylint: disable=import-outside-toplevel
  from tim_jax.weights import convert  # pylint: disable=import-outside-toplevel

  batch = a.batch_size
  config = tim_jax_config(batch)
  trainer = training.Trainer(config)
  pipe = trainer.pipeline
  state = trainer.init_state()
  # The init's output layer is zero: perturb every weight so the forward
  # comparison means something (the timings do not depend on the values).
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    tree,
    [
      w + 0.02 * jax.random.normal(k, w.shape, w.dtype)
      for w, k in zip(leaves, keys)
    ],
  )
  data = sharding.global_batch(
    kinds.synthetic_batch(config, batch), trainer.mesh
  )
  y = trainer.conditioner(data)
  x = data["image"]
  t = jax.numpy.full((batch,), 0.7)
  r = jax.numpy.full((batch,), 0.3)
  noise = jax.random.normal(jax.random.key(0), x.shape)
  rows = {}

  weights = convert.to_official(pipe.model(params))
  network = dict(config.model.network)
  loss_cfg = config.loss
  transport_params = dict(config.transport.params)

  # --- the official side ---------------------------------------------------
  sys.path.insert(0, HERE)
  import make_radio_golden  # pylint: disable=import-outside-toplevel

  make_radio_golden.use_official(a.official)
  # pylint: disable=import-outside-toplevel
  from tim.models.c2i.tim_model import TiM
  from tim.schedulers import transports
  from tim.schedulers.transition import TransitionSchedule
  import torch
  # pylint: enable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count())

  @torch.no_grad()
  def update_ema(ema_model, model, decay):
    # The official tim/utils/train_utils.py update_ema, per parameter (its
    # module imports wandb, so it is not imported here).
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
      ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

  torch.cuda.get_rng_state = lambda: None
  torch.cuda.set_rng_state = lambda state: None
  net = TiM(**network)
  missing, unexpected = net.load_state_dict(
    {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
    strict=False,
  )
  assert not unexpected, unexpected
  assert all(k.startswith("projector") for k in missing), missing
  ema = TiM(**network)
  ema.load_state_dict(net.state_dict())
  model = lambda *args, **kw: net(*args, **{"attn_type": "fused_attn", **kw})
  xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
  yt = torch.from_numpy(np.asarray(y)).long()
  tt = torch.from_numpy(np.asarray(t))
  rt = torch.from_numpy(np.asarray(r))
  zt = torch.from_numpy(np.moveaxis(np.asarray(noise), -1, 1).copy())
  with torch.no_grad():
    theirs_fwd = model(xt, tt, rt, yt).numpy()

  def official_forward():
    with torch.no_grad():
      model(xt, tt, rt, yt)

  rows["forward"] = [median_seconds(official_forward, a.repeats)]

  schedule = TransitionSchedule(
    transports.OT_FM(**transport_params),
    diffusion_ratio=loss_cfg.diffusion_ratio,
    consistency_ratio=loss_cfg.consistency_ratio,
    derivative_type=loss_cfg.derivative,
    differential_epsilon=loss_cfg.epsilon,
    weight_t_and_r=loss_cfg.weight_t_and_r,
    weight_time_type=loss_cfg.weight_time_type,
    weight_time_tangent=loss_cfg.weight_time_tangent,
    weight_time_sigmoid=loss_cfg.weight_time_sigmoid,
  )
  opt = torch.optim.AdamW(
    net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.01
  )
  tokens = (network["input_size"] // network["patch_size"]) ** 2
  h_target = torch.randn(batch, tokens, network["z_dim"])

  def official_step():
    weighted, proj, _ = schedule(
      model,
      ema,
      model,
      batch,
      xt,
      torch.randn_like(xt),
      dict(y=yt, return_zs=True),
      use_dir_loss=True,
      h_target=h_target,
    )
    (weighted + proj).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, net, 0.9999)

  rows["tim_dde_step"] = [median_seconds(official_step, a.repeats)]
  ynull = torch.full_like(yt, network["num_classes"])
  for n in (1, 8):
    rows[f"sample_nfe{n}"] = [
      median_seconds(
        lambda n=n: schedule.sample(
          model, yt, ynull, zt, T_max=1.0, num_steps=n
        ),
        a.repeats,
      )
    ]

  # tim_jax last: XLA's CPU threads then do not compete with PyTorch's.
  fwd = jax.jit(lambda p, *args: pipe.network(p)(*args))
  ours_fwd = np.moveaxis(np.asarray(fwd(params, x, t, r, y)), -1, 1)
  agreement = float(
    np.linalg.norm(ours_fwd - theirs_fwd) / np.linalg.norm(theirs_fwd)
  )
  ours = {
    "forward": lambda: fwd(params, x, t, r, y),
    "tim_dde_step": lambda: step(state, data),
  }
  step = trainer.jit_step(data, donate=False)
  for n in (1, 8):
    ours[f"sample_nfe{n}"] = lambda n=n: pipe.sample(
      noise, y, num_steps=n, cfg_scale=1.0, params=params
    )
  for name, fn in ours.items():
    rows[name].insert(
      0, median_seconds(lambda fn=fn: jax.block_until_ready(fn()), a.repeats)
    )
  print(
    f"batch {batch}, D {network['hidden_size']}, depth {network['depth']}, "
    f"{tokens} tokens, float32; {os.cpu_count()} CPU threads each; forward "
    f"outputs agree to {agreement:.1e} (relative L2)"
  )
  print(
    f"{'row':14s} {'tim_jax ms':>11s} {'official ms':>12s} {'speed-up':>9s}"
  )
  table = []
  for name, (ours, theirs) in rows.items():
    print(
      f"{name:14s} {ours * 1e3:11.1f} {theirs * 1e3:12.1f} "
      f"{theirs / ours:8.2f}x"
    )
    table.append(
      dict(name=name, tim_jax_s=ours, official_s=theirs, speedup=theirs / ours)
    )
  if a.out:
    with open(a.out, "w") as f:
      json.dump(
        dict(
          date=time.strftime("%Y-%m-%d"),
          batch=batch,
          network=network,
          forward_agreement=agreement,
          torch=torch.__version__,
          jax=jax.__version__,
          glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
          rows=table,
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
