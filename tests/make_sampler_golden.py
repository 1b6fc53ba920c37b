"""Writes the stochastic Euler sampler golden case from the official TiM code.

    python tests/make_sampler_golden.py --official=PATH/TO/TiM

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its model and ``TransitionSchedule`` are imported from there, never copied
here. Needs torch and timm; ``flash_attn`` and a missing ``torchvision`` are
stubbed as in ``make_radio_golden.py`` (the model runs its ``fused_attn``
path on CPU).

The model is the ``c2i_tiny`` golden network (its ``model.safetensors``), run
in float64 by ``TransitionSchedule.sample`` in its Euler mode (the official
spelling ``sample_type="ddiffusion"``: r = t_cur) with stochasticity, from
noise and per-step noise drawn here and stored with the result, so that
tim_jax can be fed the same draws. The per-step noise replaces the official
``torch.randn_like`` call of ``OT_FM.from_x_t_to_x_r``; row i is step i's.
Writes ``tests/data/golden/c2i_tiny/euler_stochastic.npz``.
"""

import argparse
import json
import os

from make_radio_golden import use_official
import numpy as np

FOLDER = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "data", "golden", "c2i_tiny"
)
SETTINGS = dict(
  num_steps=8,
  cfg_scale=2.0,
  cfg_low=0.0,
  cfg_high=0.7,
  stochasticity_ratio=0.2,
  sample_type="ddiffusion",
)


def main():
  p = argparse.ArgumentParser()
  p.add_argument(
    "--official", required=True, help="a checkout of github.com/WZDTHU/TiM"
  )
  a = p.parse_args()
  use_official(a.official)
  # pylint: disable=import-outside-toplevel
  import safetensors.torch
  from tim.models.c2i.tim_model import TiM
  from tim.schedulers import transports
  from tim.schedulers.transition import TransitionSchedule
  import torch
  # pylint: enable=import-outside-toplevel

  with open(os.path.join(FOLDER, "network.json")) as f:
    meta = json.load(f)
  net = TiM(**meta["network"]).double().eval()
  state = safetensors.torch.load_file(os.path.join(FOLDER, "model.safetensors"))
  net.load_state_dict({k: v.double() for k, v in state.items()})
  model = lambda x, t, r, y: net(x, t, r, y, attn_type="fused_attn")
  schedule = TransitionSchedule(
    transports.OT_FM(T_max=meta["T_max"], T_min=meta["T_min"])
  )

  rng = np.random.default_rng(30)
  n, c, s = 4, meta["network"]["in_channels"], meta["network"]["input_size"]
  steps = SETTINGS["num_steps"]
  noise = rng.standard_normal((n, c, s, s)).astype(np.float32)
  step_noise = rng.standard_normal((steps, n, c, s, s)).astype(np.float32)
  y = rng.integers(0, meta["network"]["num_classes"], n)
  y_null = np.full(n, meta["network"]["num_classes"])

  # Feed step i's noise to the official draw of step i.
  step = {"i": -1, "noisy": []}
  inner = schedule.transport.from_x_t_to_x_r

  def transition(x_t, t, r, F, s_ratio=0.0):
    step["i"] += 1
    if s_ratio > 0.0:
      step["noisy"].append(step["i"])
    return inner(x_t, t, r, F, s_ratio)

  schedule.transport.from_x_t_to_x_r = transition
  randn_like = torch.randn_like
  torch.randn_like = lambda z: torch.from_numpy(step_noise[step["i"]]).to(z)
  try:
    traj = schedule.sample(
      model,
      torch.from_numpy(y),
      torch.from_numpy(y_null),
      torch.from_numpy(noise).double(),
      T_max=meta["T_max"],
      T_min=meta["T_min"],
      **SETTINGS,
    )
  finally:
    torch.randn_like = randn_like
  arrays = dict(
    noise=noise,
    step_noise=step_noise,
    y=y,
    y_null=y_null,
    traj=traj.numpy(),
    stochastic=np.isin(np.arange(steps), step["noisy"]),
    settings=json.dumps(SETTINGS),
  )
  out = os.path.join(FOLDER, "euler_stochastic.npz")
  np.savez(out, **arrays)
  print(f"wrote {out}: stochastic steps {step['noisy']}")


if __name__ == "__main__":
  main()
