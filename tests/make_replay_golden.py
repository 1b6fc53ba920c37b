"""Writes the sampler-replay golden cases from the official TiM code.

    python tests/make_replay_golden.py --official=PATH/TO/TiM \
        --out=tests/data/golden/c2i_tiny/sampler_replay.npz

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its model and ``TransitionSchedule.sample`` are imported from there, never
copied here. Needs torch and timm (``torchvision`` is stubbed as in
make_radio_golden.py).

The c2i_tiny golden model (``model.safetensors``) is run through the official
sampler in float64 with settings the other golden cases do not use: the
official scripts' ``--T-max``/``--T-min`` (a grid from 0.9 to 0.05),
guidance on a window, and stochastic steps. Every Gaussian draw the official
``OT_FM.from_x_t_to_x_r`` makes (``torch.randn_like``) is recorded, so
tim_jax can replay the run with ``step_noise``. Each case writes
``<case>_noise``, ``<case>_step_noise`` (steps, B, C, H, W; zero rows for
steps that drew nothing), ``<case>_y``, ``<case>_out`` and its settings as
``<case>_settings`` (JSON).
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "data", "golden", "c2i_tiny")

CASES = {
  # The official scripts' --T-max/--T-min with stochastic interior steps.
  "bounds_stochastic": dict(
    T_max=0.9,
    T_min=0.05,
    num_steps=6,
    cfg_scale=2.0,
    cfg_low=0.1,
    cfg_high=0.8,
    stochasticity_ratio=0.3,
    sample_type="transition",
  ),
  # The default bounds, stochastic, no guidance.
  "stochastic": dict(
    T_max=1.0,
    T_min=0.0,
    num_steps=5,
    cfg_scale=1.0,
    cfg_low=0.0,
    cfg_high=1.0,
    stochasticity_ratio=0.2,
    sample_type="transition",
  ),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--official", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  sys.path.insert(0, HERE)
  import make_radio_golden  # pylint: disable=import-outside-toplevel

  make_radio_golden.use_official(args.official)
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  from tim.models.c2i import tim_model  # pylint: disable=import-outside-toplevel
  from tim.schedulers import transition, transports  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  with open(os.path.join(MODEL, "network.json")) as f:
    meta = json.load(f)
  model = tim_model.TiM(**meta["network"])
  state = safetensors.torch.load_file(os.path.join(MODEL, "model.safetensors"))
  model.load_state_dict(state)
  model = model.double().eval()
  schedule = transition.TransitionSchedule(transport=transports.OT_FM())

  draws = []
  randn_like = torch.randn_like

  def recording_randn_like(x, *a, **k):
    out = randn_like(x, *a, **k)
    draws.append(out.detach().cpu().numpy().copy())
    return out

  torch.randn_like = recording_randn_like
  rows, n = 3, meta["network"]["num_classes"]
  size, ch = meta["network"]["input_size"], meta["network"]["in_channels"]
  arrays = {}
  for i, (name, case) in enumerate(CASES.items()):
    torch.manual_seed(100 + i)
    z = torch.randn(rows, ch, size, size, dtype=torch.float64)
    y = torch.tensor([1, 7, 4][:rows])
    y_null = torch.full_like(y, n)
    draws.clear()
    with torch.no_grad():
      # The plain attention (flash_attn needs CUDA; the math is the same).
      out = schedule.sample(
        lambda *a: model(*a, attn_type="vanilla_attn"), y, y_null, z, **case
      )
    final = out[-1]  # The official returns every state, rounded to float32.
    # Which steps drew noise, by the official rule (interior steps only).
    grid = np.linspace(case["T_max"], case["T_min"], case["num_steps"] + 1)
    drew = [
      case["stochasticity_ratio"] > 0
      and grid[k] < case["T_max"]
      and grid[k + 1] > case["T_min"]
      for k in range(case["num_steps"])
    ]
    assert len(draws) == sum(drew), (len(draws), drew)
    step_noise = np.zeros((case["num_steps"],) + tuple(z.shape))
    it = iter(draws)
    for k, d in enumerate(drew):
      if d:
        step_noise[k] = next(it)
    arrays[f"{name}_noise"] = z.numpy()
    arrays[f"{name}_y"] = y.numpy()
    arrays[f"{name}_step_noise"] = step_noise
    arrays[f"{name}_out"] = final.detach().double().numpy()
    arrays[f"{name}_settings"] = np.array(json.dumps(case))
    print(name, "steps with noise:", drew)
  np.savez_compressed(args.out, **arrays)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
