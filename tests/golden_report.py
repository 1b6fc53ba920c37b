"""Prints the relative error of every golden output: in float32, in
float64, and in float64 with the official time features swapped in
(``float64*``; see golden_utils.OfficialTimeFeatures).

python tests/golden_report.py
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from golden_utils import (  # noqa: E402
  CASES,
  GOLDEN,
  Golden,
  OfficialTimeFeatures,
  nchw,
  rel_err,
)

from tim_jax.method import sampling, transition  # noqa: E402
from tim_jax.models import layers  # noqa: E402


def errors(name, precision):
  g = Golden(name, np.float32 if precision == "float32" else np.float64)
  a = g.arrays
  out = {}
  fwd, proj = g.model(
    g.x("fwd_x"),
    g.a("fwd_t"),
    g.a("fwd_r"),
    g.a("fwd_y"),
    return_projection=True,
  )
  out["fwd_out"] = rel_err(nchw(fwd), a["fwd_out"])
  out["fwd_proj"] = rel_err(proj, a["fwd_proj"])
  args = (g.x("tgt_x"), g.x("tgt_z"), g.a("tgt_t"), g.a("tgt_r"))
  for d in ("dde", "jvp"):
    tgt = transition.target(
      g.fn,
      *args,
      g.transport,
      d,
      g.meta["differential_epsilon"],
      cond=g.a("tgt_y"),
    )
    out[f"tgt_{d}"] = rel_err(nchw(tgt), a[f"tgt_{d}"])
    dfdt = transition.time_derivative(
      g.fn,
      *args,
      transport=g.transport,
      derivative=d,
      epsilon=g.meta["differential_epsilon"],
      cond=g.a("tgt_y"),
    )
    out[f"tgt_dFdt_{d} (rows 1:)"] = rel_err(
      nchw(dfdt)[1:], a[f"tgt_dFdt_{d}"][1:]
    )
  s = g.meta["sample"]
  final, traj = sampling.sample(
    g.fn,
    g.x("smp_noise"),
    g.a("smp_y"),
    g.a("smp_y_null"),
    transport=g.transport,
    num_steps=s["num_steps"],
    cfg_scale=s["cfg_scale"],
    guidance_interval=(s["cfg_low"], s["cfg_high"]),
    return_trajectory=True,
  )
  out["smp_out"] = rel_err(nchw(final), a["smp_out"])
  out["smp_traj (worst state)"] = max(
    rel_err(nchw(traj[i]), a["smp_traj"][i]) for i in range(traj.shape[0])
  )
  if precision != "float32":
    # The official states before its sampler rounds them to float32.
    with np.load(os.path.join(GOLDEN, name, "float64.npz")) as z:
      states = z["smp_traj"]
    out["smp_traj float64 (worst)"] = max(
      rel_err(nchw(traj[i]), states[i]) for i in range(traj.shape[0])
    )
  return out


def main():
  features = layers.TimestepEmbedder.features
  for precision in ("float64", "float64*", "float32"):
    with jax.enable_x64(precision != "float32"):
      for name in CASES:
        if precision == "float64*":
          official = staticmethod(OfficialTimeFeatures(name))
          layers.TimestepEmbedder.features = official
        try:
          for key, value in errors(name, precision).items():
            print(f"{precision:8s} {name:9s} {key:26s} {value:.2e}")
        finally:
          layers.TimestepEmbedder.features = features


if __name__ == "__main__":
  main()
