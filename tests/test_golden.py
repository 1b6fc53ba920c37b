"""Parity with the official PyTorch code on the golden cases.

Tolerances (relative L2 error, after moving NHWC to NCHW) from the golden
README: with x64 at most 1e-5 for every output; in float32 at most 2e-4 for
the forward pass and the projection, 2e-3 for the targets and the sampler.
"""

import dataclasses
import functools
import json
import os

from flax import nnx
from golden_utils import CASES, GOLDEN, Golden, nchw, nhwc, rel_err
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tim_jax.method import sampling, transition, transports
from tim_jax.weights import convert

pytestmark = [pytest.mark.parity]

TOL = {
  "float64": dict(fwd=1e-5, tgt=1e-5, smp=1e-5),
  "float32": dict(fwd=2e-4, tgt=2e-3, smp=2e-3),
}


@pytest.fixture(params=["float64", "float32"])
def precision(request):
  with jax.enable_x64(request.param == "float64"):
    yield request.param


def _golden(name, precision):
  return Golden(name, jnp.float64 if precision == "float64" else jnp.float32)


@pytest.mark.parametrize("name", CASES)
def test_forward_and_projection(name, precision):
  g = _golden(name, precision)
  out, proj = g.model(
    g.x("fwd_x"),
    g.a("fwd_t"),
    g.a("fwd_r"),
    g.a("fwd_y"),
    return_projection=True,
  )
  assert out.dtype == g.dtype
  assert rel_err(nchw(out), g.arrays["fwd_out"]) < TOL[precision]["fwd"]
  assert rel_err(proj, g.arrays["fwd_proj"]) < TOL[precision]["fwd"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_target_and_derivative(name, derivative, precision):
  g = _golden(name, precision)
  eps = g.meta["differential_epsilon"]
  args = (g.x("tgt_x"), g.x("tgt_z"), g.a("tgt_t"), g.a("tgt_r"))
  target = jax.jit(
    functools.partial(
      transition.target,
      g.fn,
      transport=g.transport,
      derivative=derivative,
      epsilon=eps,
    )
  )(*args, cond=g.a("tgt_y"))
  assert (
    rel_err(nchw(target), g.arrays[f"tgt_{derivative}"])
    < (TOL[precision]["tgt"])
  )
  d_f = transition.time_derivative(
    g.fn,
    *args,
    transport=g.transport,
    derivative=derivative,
    epsilon=eps,
    cond=g.a("tgt_y"),
  )
  ref = g.arrays[f"tgt_dFdt_{derivative}"]
  # Row 0 is a diffusion row (r == t): the official derivative is 0 there,
  # and so is ours after masking inside `target`. Compare the others.
  assert np.all(ref[0] == 0)
  assert rel_err(nchw(d_f)[1:], ref[1:]) < TOL[precision]["tgt"] * 10
  # The derivative term is what makes the target differ from the plain
  # diffusion target: check it is not negligible in these cases.
  plain = g.transport.diffusion_target(g.x("tgt_x"), g.x("tgt_z"), 0)
  assert rel_err(nchw(plain), g.arrays[f"tgt_{derivative}"]) > 1e-2


@pytest.mark.parametrize("name", CASES)
def test_sampler_trajectory(name, precision):
  g = _golden(name, precision)
  s = g.meta["sample"]
  run = jax.jit(
    functools.partial(
      sampling.sample,
      g.fn,
      transport=g.transport,
      num_steps=s["num_steps"],
      cfg_scale=s["cfg_scale"],
      guidance_interval=(s["cfg_low"], s["cfg_high"]),
      stochasticity=s["stochasticity_ratio"],
      return_trajectory=True,
    )
  )
  final, traj = run(g.x("smp_noise"), g.a("smp_y"), g.a("smp_y_null"))
  assert traj.shape[0] == s["num_steps"] + 1
  ref_traj = g.arrays["smp_traj"]
  assert rel_err(nchw(final), g.arrays["smp_out"]) < TOL[precision]["smp"]
  for i in range(traj.shape[0]):
    assert rel_err(nchw(traj[i]), ref_traj[i]) < TOL[precision]["smp"], i


@pytest.mark.parametrize("last_step_noise", [True, False])
def test_euler_stochastic_sampler(precision, last_step_noise):
  """The official Euler mode (``sample_type="ddiffusion"``, r = t_cur) with
  stochasticity at 8 steps, fed the same noise and per-step noise
  (``tests/make_sampler_golden.py``). Its noise rule reads r, so every step
  but the first is stochastic, the last one (to t = 0) included."""
  g = _golden("c2i_tiny", precision)
  e = dict(np.load(os.path.join(GOLDEN, "c2i_tiny", "euler_stochastic.npz")))
  s = json.loads(str(e["settings"]))
  assert s["sample_type"] == "ddiffusion"
  plan = sampling.step_schedule(
    g.transport,
    s["num_steps"],
    stochasticity=s["stochasticity_ratio"],
    mode="diffusion",
  )
  np.testing.assert_array_equal(plan["stochastic"], e["stochastic"])
  _, traj = jax.jit(
    functools.partial(
      sampling.sample,
      g.fn,
      transport=g.transport,
      num_steps=s["num_steps"],
      cfg_scale=s["cfg_scale"],
      guidance_interval=(s["cfg_low"], s["cfg_high"]),
      stochasticity=s["stochasticity_ratio"],
      mode="diffusion",
      last_step_noise=last_step_noise,
      return_trajectory=True,
    )
  )(
    jnp.asarray(nhwc(e["noise"]), g.dtype),
    jnp.asarray(e["y"]),
    jnp.asarray(e["y_null"]),
    step_noise=jnp.asarray(np.moveaxis(e["step_noise"], 2, -1), g.dtype),
  )
  # The official states are rounded to float32: ~3e-8 in float64.
  errs = [rel_err(nchw(traj[i]), e["traj"][i]) for i in range(len(traj))]
  assert max(errs[:-1]) < 1e-6, errs
  if last_step_noise:
    assert errs[-1] < 1e-6, errs
  else:
    # The deterministic last step lands elsewhere (8e-2 here).
    assert errs[-1] > 1e-2, errs


def test_first_train_step_gradient_matches_the_official_trainer():
  """The first step of ``configs/c2i.py:xl2_256,smoke`` from tim_jax's
  init, with the official trainer's loss run on the same weights, batch, t,
  r and noise (``tests/make_train_golden.py``): the same loss and gradient
  norm, ~3.5e6. The size is the directional loss at the zero-initialised
  output: without it the norm is ~0.1."""
  folder = os.path.join(GOLDEN, "train_step")
  with open(os.path.join(folder, "network.json")) as f:
    meta = json.load(f)
  ref = dict(np.load(os.path.join(folder, "step.npz")))
  model = convert.load_official(
    os.path.join(folder, "model.safetensors"), "c2i", meta["network"]
  )
  tr = meta["transport"]
  transport = transports.get(tr["name"], P_mean=tr["P_mean"], P_std=tr["P_std"])
  key = jax.random.wrap_key_data(jnp.asarray(ref["key"]))
  x = jnp.asarray(nhwc(ref["x"]))
  config = transition.LossConfig(**meta["loss"])
  # The loss draws the t, r and noise that the official run was fed.
  t, r, z = transition.draw_inputs(key, x.shape, transport, config)
  # (Equal up to float32 rounding, which depends on XLA's optimisation.)
  np.testing.assert_allclose(np.asarray(t), ref["t"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(r), ref["r"], rtol=1e-6)
  np.testing.assert_allclose(nchw(z), ref["z"], rtol=1e-5, atol=1e-6)
  graph, params = nnx.split(model, nnx.Param)

  def grad_norms(config):
    def loss(p):
      net = nnx.merge(graph, p)
      return transition.loss(
        lambda *a: net(*a, return_projection=True),
        x,
        jnp.asarray(ref["dropped"]),
        key,
        transport=transport,
        config=config,
        repa_target=jnp.asarray(ref["h_target"]),
      )

    (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    per = {
      convert.official_name(tuple(k)): float(jnp.linalg.norm(v.get_value()))
      for k, v in nnx.to_flat_state(grads)
    }
    return float(value), float(optax.tree.norm(grads)), per

  value, norm, per = grad_norms(config)
  assert abs(value / ref["loss"] - 1) < 1e-6
  assert abs(norm / ref["grad_norm"] - 1) < 1e-5, (norm, ref["grad_norm"])
  assert ref["grad_norm"] > 1e6
  assert sorted(per) == sorted(ref["grad_names"])
  for name, want in zip(ref["grad_names"], ref["grad_norms"]):
    assert abs(per[name] - want) <= 1e-5 * want + 1e-9, name
  plain = grad_norms(dataclasses.replace(config, directional_loss=False))[1]
  assert plain < 1.0


REPLAY = np.load(
  os.path.join(GOLDEN, "c2i_tiny", "sampler_replay.npz"), allow_pickle=False
)


@pytest.mark.parametrize("case", ["bounds_stochastic", "stochastic"])
def test_sampler_replays_an_official_stochastic_run(case, precision):
  """The official ``TransitionSchedule.sample`` with ``--T-max/--T-min``,
  guidance on a window and stochastic steps, replayed from its recorded
  noise (tests/make_replay_golden.py)."""
  g = _golden("c2i_tiny", precision)
  s = json.loads(str(REPLAY[f"{case}_settings"]))
  step_noise = jnp.asarray(
    np.moveaxis(REPLAY[f"{case}_step_noise"], 2, -1), g.dtype
  )
  y = jnp.asarray(REPLAY[f"{case}_y"])
  run = functools.partial(
    sampling.sample,
    g.fn,
    jnp.asarray(nhwc(REPLAY[f"{case}_noise"]), g.dtype),
    y,
    jnp.full_like(y, g.meta["network"]["num_classes"]),
    transport=g.transport,
    num_steps=s["num_steps"],
    cfg_scale=s["cfg_scale"],
    guidance_interval=(s["cfg_low"], s["cfg_high"]),
    stochasticity=s["stochasticity_ratio"],
    mode=s["sample_type"],
    T_max=s["T_max"],
    T_min=s["T_min"],
  )
  final = jax.jit(lambda n: run(step_noise=n))(step_noise)
  ref = REPLAY[f"{case}_out"]
  assert rel_err(nchw(final), ref) < TOL[precision]["smp"]
  # The bounds and the draws matter: the transport's bounds, or other
  # draws, land elsewhere.
  other = jax.jit(lambda n: run(step_noise=n))(step_noise[::-1])
  assert rel_err(nchw(other), ref) > 1e-2
  if s["T_max"] != 1.0:
    default = jax.jit(lambda n: run(step_noise=n, T_max=None, T_min=None))(
      step_noise
    )
    assert rel_err(nchw(default), ref) > 1e-2
