"""Writes the float64 golden arrays from the official TiM code.

    python tests/make_float64_golden.py --official=PATH/TO/TiM

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its models, ``TransitionSchedule`` and transport are imported from there,
never copied here. Needs torch and timm; ``flash_attn`` and a missing
``torchvision`` are stubbed as in ``make_radio_golden.py`` (the model runs
its ``fused_attn`` path on CPU).

For each golden model (``c2i_tiny``, ``t2i_tiny``), run in float64 as the
official code runs it (``TiM(...).double()`` from ``model.safetensors``):

- it first recomputes ``cases.npz``'s forward pass, DDE and JVP targets
  and checks that they come out the same (so the recipe below is the one
  that made them);
- ``smp_traj``: the official sampler (``TransitionSchedule.sample``) on
  ``cases.npz``'s ``smp_*`` inputs and settings, with every state kept in
  float64. The official sampler's states are float64 but it returns them
  rounded to float32 (``cases.npz``'s ``smp_traj``); here each state is
  taken from the official ``from_x_t_to_x_r`` as it returns it;
- ``temb_t``, ``temb_features``, ``temb_freqs``: every time value the
  official runs above fed to the sinusoidal time embedding
  (``TimestepEmbedder.positional_embedding``, cast to float32 there, as
  the official code does even in float64), with the float32 features it
  returned, and its 128 float32 frequencies. PyTorch's float32 ``exp``,
  ``cos`` and ``sin`` are not XLA's (they differ by an ulp on some
  entries), so tests can feed these features to tim_jax to check the rest
  of the float64 network on its own.

Writes ``tests/data/golden/<case>/float64.npz``.
"""

import argparse
import json
import math
import os

from make_radio_golden import use_official
import numpy as np

GOLDEN = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "data", "golden"
)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
  p = argparse.ArgumentParser()
  p.add_argument(
    "--official", required=True, help="a checkout of github.com/WZDTHU/TiM"
  )
  a = p.parse_args()
  use_official(a.official)
  # pylint: disable=import-outside-toplevel
  import safetensors.torch
  from tim.models.c2i import tim_model as c2i_model
  from tim.models.t2i import tim_model as t2i_model
  from tim.schedulers import transports
  from tim.schedulers.transition import TransitionSchedule
  import torch
  from torch._C import _functorch
  import torch.autograd.forward_ad as fwad
  # pylint: enable=import-outside-toplevel

  # The official losses restore a CUDA RNG state around each model call.
  torch.cuda.set_rng_state = lambda state: None
  table, tangents = {}, {}

  def recording(embedder):
    inner = embedder.positional_embedding

    def positional_embedding(t, dim, max_period=10000):
      out = inner(t, dim, max_period)
      # Inside torch.func.jvp the values cannot be read (the same pass is
      # recorded again below with plain forward-mode dual tensors).
      if _functorch.is_functorch_wrapped_tensor(t):
        return out
      t, dt = fwad.unpack_dual(t)
      primal, d_out = fwad.unpack_dual(out)
      ts = t.detach().to(torch.float32).numpy()
      feats = primal.detach().numpy()
      assert feats.dtype == np.float32
      for ti, fi in zip(ts, feats):
        table[ti.tobytes()] = (ti, fi.copy())
      if dt is not None:
        dts = dt.detach().to(torch.float32).numpy()
        for ti, di, gi in zip(ts, dts, d_out.detach().numpy()):
          tangents[(ti.tobytes(), di.tobytes())] = (ti, di, gi.copy())
      return out

    embedder.positional_embedding = staticmethod(positional_embedding)

  recording(c2i_model.TimestepEmbedder)
  recording(t2i_model.TimestepEmbedder)

  for name in ("c2i_tiny", "t2i_tiny"):
    folder = os.path.join(GOLDEN, name)
    with open(os.path.join(folder, "network.json")) as f:
      meta = json.load(f)
    module = c2i_model if meta["kind"] == "c2i" else t2i_model
    net = module.TiM(**meta["network"]).double().eval()
    state = safetensors.torch.load_file(
      os.path.join(folder, "model.safetensors")
    )
    net.load_state_dict({k: v.double() for k, v in state.items()})
    c = dict(np.load(os.path.join(folder, "cases.npz")))
    arr = lambda k: (
      torch.from_numpy(c[k])
      if np.issubdtype(c[k].dtype, np.integer)
      else torch.from_numpy(c[k]).double()
    )
    transport = transports.OT_FM(T_max=meta["T_max"], T_min=meta["T_min"])
    schedule = TransitionSchedule(
      transport, differential_epsilon=meta["differential_epsilon"]
    )
    table.clear()
    tangents.clear()

    with torch.no_grad():
      out, zs = net(
        arr("fwd_x"),
        arr("fwd_t"),
        arr("fwd_r"),
        arr("fwd_y"),
        attn_type="fused_attn",
        return_zs=True,
      )
    print(name, "fwd_out", _rel(out, c["fwd_out"]), "fwd_proj", end=" ")
    print(_rel(zs[0] if isinstance(zs, (list, tuple)) else zs, c["fwd_proj"]))

    # The targets as the official loss forms them; row 0 is a diffusion
    # row (r == t), so one row is skipped by the derivative.
    x, z = arr("tgt_x"), arr("tgt_z")
    shape = (-1, 1, 1, 1)
    t, r = arr("tgt_t").reshape(shape), arr("tgt_r").reshape(shape)
    alpha, sigma, d_alpha, d_sigma = transport.interpolant(t)
    x_t, v_t = alpha * x + sigma * z, d_alpha * x + d_sigma * z
    n_diffusion = int((c["tgt_t"] == c["tgt_r"]).sum())
    assert np.all(c["tgt_t"][:n_diffusion] == c["tgt_r"][:n_diffusion])
    for kind in ("dde", "jvp"):
      kwargs = {"y": arr("tgt_y"), "attn_type": "fused_attn"}
      if kind == "dde":
        d_f = schedule.dde_derivative(
          net, x, z, t, r, kwargs, None, n_diffusion
        )
      else:
        d_f = schedule.jvp_derivative(
          net, x_t, v_t, t, r, kwargs, None, n_diffusion
        )
        # The same forward-mode pass with plain dual tensors, to record
        # the time features' tangents; it must give the same derivative
        # (up to float64 rounding: torch.func batches differently).
        k = n_diffusion
        with fwad.dual_level(), torch.no_grad():
          dual = net(
            fwad.make_dual(x_t[k:], v_t[k:]),
            fwad.make_dual(t[k:].flatten(), torch.ones_like(t[k:].flatten())),
            fwad.make_dual(r[k:].flatten(), torch.zeros_like(r[k:].flatten())),
            arr("tgt_y")[k:],
            attn_type="vanilla_attn",
            jvp=True,
          )
          again = fwad.unpack_dual(dual).tangent
        assert _rel(again, d_f[k:]) < 1e-13, _rel(again, d_f[k:])
      target = transport.target(x_t, v_t, x, z, t, r, d_f, 0, 0, False)
      print(
        name,
        f"tgt_{kind}",
        _rel(target, c[f"tgt_{kind}"]),
        f"tgt_dFdt_{kind}",
        _rel(d_f[n_diffusion:], c[f"tgt_dFdt_{kind}"][n_diffusion:]),
      )

    # The sampler, every state as the official transport returns it.
    s = meta["sample"]
    states = []
    inner = transport.from_x_t_to_x_r

    def keep(x_t, t, r, F, s_ratio=0.0, inner=inner, states=states):
      x_r = inner(x_t, t, r, F, s_ratio)
      assert x_r.dtype == torch.float64
      states.append(x_r.detach().numpy().copy())
      return x_r

    transport.from_x_t_to_x_r = keep
    noise = arr("smp_noise")
    with torch.no_grad():
      rounded = schedule.sample(
        lambda *args: net(*args, attn_type="fused_attn"),
        arr("smp_y"),
        arr("smp_y_null"),
        noise,
        T_max=meta["T_max"],
        T_min=meta["T_min"],
        num_steps=s["num_steps"],
        cfg_scale=s["cfg_scale"],
        cfg_low=s["cfg_low"],
        cfg_high=s["cfg_high"],
        stochasticity_ratio=s["stochasticity_ratio"],
      )
    traj = np.stack([noise.numpy()] + states)
    # The kept states are the official ones before its float32 cast.
    np.testing.assert_array_equal(traj.astype(np.float32), rounded.numpy())
    np.testing.assert_array_equal(rounded.numpy(), c["smp_traj"])
    print(
      name, "smp_traj float64 vs the float32 golden", _rel(traj, c["smp_traj"])
    )

    half = 128
    freqs = torch.exp(
      -math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half
    ).numpy()
    keys = sorted(table, key=lambda k: float(table[k][0]))
    arrays = dict(
      smp_traj=traj,
      temb_t=np.stack([table[k][0] for k in keys]),
      temb_features=np.stack([table[k][1] for k in keys]),
      temb_freqs=freqs,
      temb_jvp_t=np.stack([v[0] for v in tangents.values()]),
      temb_jvp_dt=np.stack([v[1] for v in tangents.values()]),
      temb_jvp_tangent=np.stack([v[2] for v in tangents.values()]),
    )
    out_path = os.path.join(folder, "float64.npz")
    np.savez_compressed(out_path, **arrays)
    print(f"wrote {out_path}: {len(keys)} time values")


if __name__ == "__main__":
  main()
