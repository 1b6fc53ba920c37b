"""Reproducing an official sampling run through the public API: the official
config YAML read as it is, the official file, the initial and per-step
noise, and the time grid's bounds (``T_max``/``T_min``)."""

import json
import os

from golden_utils import GOLDEN, nchw, nhwc, rel_err
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tim_jax import inference
from tim_jax.commands import cli
from tim_jax.commands import sample as sample_command
from tim_jax.config import official
from tim_jax.core.errors import UserError

pytestmark = [pytest.mark.parity]

C2I = os.path.join(GOLDEN, "c2i_tiny")
WEIGHTS = os.path.join(C2I, "model.safetensors")
with open(os.path.join(C2I, "network.json")) as f:
  META = json.load(f)
CASES = dict(np.load(os.path.join(C2I, "cases.npz")))
REPLAY = dict(np.load(os.path.join(C2I, "sampler_replay.npz")))


def official_yaml(network, kind="c2i", **model):
  """A config in the layout of the official configs/c2i/*.yaml (model:
  transport, transition_loss, network, vae_dir, ...; data; training)."""
  tree = dict(
    model=dict(
      transport=dict(
        target="tim.schedulers.transports.OT_FM",
        params=dict(
          P_mean=-0.4,
          P_std=1.0,
          sigma_d=1.0,
          T_max=1.0,
          T_min=0.0,
          enhance_target=False,
          w_gt=1.0,
          w_cond=0.0,
          w_start=0.0,
          w_end=0.0,
        ),
      ),
      transition_loss=dict(
        diffusion_ratio=0.5,
        consistency_ratio=0.1,
        derivative_type="dde",
        differential_epsilon=0.005,
        weight_time_type="sqrt",
        weight_time_tangent=True,
      ),
      network=dict(target=f"tim.models.{kind}.tim_model.TiM", params=network),
      vae_dir="stabilityai/sd-vae-ft-ema",
      enc_dir="checkpoints/radio/radio-v2.5-b_half.pth.tar",
      proj_coeff=1.0,
      use_ema=True,
      ema_decay=0.9999,
      **model,
    ),
    data=dict(data_type="latent", dataset=dict(image_size=256)),
    training=dict(max_train_steps=10, learning_rate=1.0e-4),
  )
  return yaml.safe_dump(tree)


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("official") / "tim_tiny.yaml"
  path.write_text(official_yaml(META["network"]))
  return str(path)


@pytest.fixture(scope="module")
def pipe(yaml_path):
  return inference.load(WEIGHTS, yaml_path)


def test_official_yaml_maps_every_model_field(tmp_path):
  network = dict(META["network"], input_size=16, patch_size=1)
  path = tmp_path / "t2i.yaml"
  text = official_yaml(
    dict(network, cap_feat_dim=48),
    kind="t2i",
    text_encoder_dir="google/gemma-3-1b-it",
    max_seq_length=128,
    use_last_hidden_state=True,
  )
  # The target-enhancement (MG) weights sit among the transport's arguments
  # in the official YAMLs; they belong to the loss here.
  text = text.replace("enhance_target: false", "enhance_target: true")
  text = text.replace("w_cond: 0.0", "w_cond: 0.75")
  text = text.replace(
    "vae_dir: stabilityai/sd-vae-ft-ema",
    "vae_dir: x/dc-ae-f32c32-sana-1.1-diffusers",
  )
  path.write_text(text)
  c = official.config_from_yaml(str(path))
  assert c.model.kind == "t2i"
  assert dict(c.model.network) == dict(network, cap_feat_dim=48)
  assert c.transport.name == "OT_FM"
  assert dict(c.transport.params) == dict(
    P_mean=-0.4, P_std=1.0, sigma_d=1.0, T_max=1.0, T_min=0.0
  )
  assert c.loss.enhance_target and c.loss.w_cond == 0.75 and c.loss.w_end == 0
  assert c.loss.derivative == "dde" and c.loss.epsilon == 0.005
  assert c.autoencoder.name == "dc_ae_f32c32_sana_1.1"
  assert c.text_encoder.name == "gemma3" and c.text_encoder.max_length == 128
  assert c.sample.image_size == 16


@pytest.mark.parametrize(
  "edit,message",
  [
    (("tim.models.c2i.tim_model.TiM", "my.models.Net"), "not an official TiM"),
    (("sd-vae-ft-ema", "my-vae"), "none of the official autoencoders"),
    (("P_std: 1.0", "P_std: 1.0\n      rho: 7"), "no parameter 'rho'"),
    (("derivative_type", "derivative_kind"), "transition_loss.derivative_kind"),
    (("model:", "modell:"), "no 'model.network'"),
  ],
)
def test_a_yaml_that_is_not_an_official_config_is_refused(
  edit, message, tmp_path
):
  path = tmp_path / "bad.yaml"
  path.write_text(official_yaml(META["network"]).replace(*edit))
  with pytest.raises(UserError, match=message):
    official.config_from_yaml(str(path))
  with pytest.raises(UserError, match="no official config YAML"):
    official.config_from_yaml(str(tmp_path / "missing.yaml"))


def test_official_file_and_yaml_sample_as_the_official_sampler(pipe):
  """The official file and YAML, the golden noise through ``generate``:
  the official sampler's deterministic result."""
  s = META["sample"]
  cond = pipe.conditioner.from_labels(CASES["smp_y"])
  out = pipe.generate(
    cond,
    num_steps=s["num_steps"],
    cfg_scale=s["cfg_scale"],
    guidance_interval=(s["cfg_low"], s["cfg_high"]),
    noise=nhwc(CASES["smp_noise"]),
    batch_size=2,
  )
  assert rel_err(nchw(out), CASES["smp_out"]) < 2e-3


@pytest.mark.parametrize("batch_size", [3, 2])
def test_generate_replays_an_official_stochastic_run(pipe, batch_size):
  """Given noise, per-step noise and T_max/T_min, ``generate`` reproduces
  the official stochastic sampler, whatever its batch size."""
  case = "bounds_stochastic"
  s = json.loads(str(REPLAY[f"{case}_settings"]))
  kwargs = dict(
    num_steps=s["num_steps"],
    cfg_scale=s["cfg_scale"],
    guidance_interval=(s["cfg_low"], s["cfg_high"]),
    stochasticity=s["stochasticity_ratio"],
    noise=nhwc(REPLAY[f"{case}_noise"]),
    batch_size=batch_size,
  )
  cond = pipe.conditioner.from_labels(REPLAY[f"{case}_y"])
  step_noise = np.moveaxis(REPLAY[f"{case}_step_noise"], 2, -1)
  out = pipe.generate(
    cond, T_max=s["T_max"], T_min=s["T_min"], step_noise=step_noise, **kwargs
  )
  assert rel_err(nchw(out), REPLAY[f"{case}_out"]) < 2e-3
  # Without the bounds, or with the seed's draws, the run is another one.
  default = pipe.generate(cond, step_noise=step_noise, **kwargs)
  assert rel_err(nchw(default), REPLAY[f"{case}_out"]) > 1e-2
  seeded = pipe.generate(cond, T_max=s["T_max"], T_min=s["T_min"], **kwargs)
  assert rel_err(nchw(seeded), REPLAY[f"{case}_out"]) > 1e-2


def test_sample_takes_step_noise_and_bounds(pipe):
  cond = pipe.conditioner.from_labels(np.array([1, 2]))
  noise = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  step_noise = jax.random.normal(jax.random.key(1), (3, 2, 16, 16, 4))
  run = lambda **k: pipe.sample(
    noise, cond, num_steps=3, stochasticity=0.5, **k
  )
  a = run(step_noise=step_noise, T_max=0.8, T_min=0.1)
  b = run(step_noise=step_noise, T_max=0.8, T_min=0.1)
  np.testing.assert_array_equal(a, b)
  assert jnp.abs(a - run(step_noise=step_noise)).mean() > 1e-2
  assert (
    jnp.abs(a - run(step_noise=-step_noise, T_max=0.8, T_min=0.1)).mean() > 1e-2
  )


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(T_max=1.5), "T_max=1.5, T_min=0.0"),
    (dict(T_max=0.5, T_min=0.5), "T_min < T_max"),
    (dict(T_min=-0.1), "T_min=-0.1"),
    (dict(noise=np.zeros((3, 16, 16, 4))), r"noise has shape \(3, 16, 16, 4\)"),
    (
      dict(step_noise=np.zeros((2, 2, 16, 16, 4))),
      r"step_noise has shape \(2, 2, 16, 16, 4\); expected \(3, 2, 16, 16, 4\)",
    ),
  ],
)
def test_bad_replay_inputs_are_refused(pipe, kwargs, message):
  cond = pipe.conditioner.from_labels(np.array([1, 2]))
  with pytest.raises(UserError, match=message):
    pipe.generate(cond, num_steps=3, stochasticity=0.2, **kwargs)


def test_the_command_reads_the_official_yaml_and_bounds(
  yaml_path, pipe, tmp_path, capsys
):
  out = tmp_path / "latents.npy"
  argv = [
    f"--checkpoint={WEIGHTS}",
    f"--official_config={yaml_path}",
    "--labels=1,7",
    "--num_steps=3",
    "--T_max=0.9",
    "--T_min=0.05",
    f"--latents_out={out}",
    f"--out={tmp_path / 'grid.png'}",
  ]
  assert cli.call(sample_command, argv) == 0, capsys.readouterr().err
  capsys.readouterr()
  cond = pipe.conditioner.from_labels(np.array([1, 7]))
  want = pipe.generate(cond, num_steps=3, T_max=0.9, T_min=0.05)
  np.testing.assert_allclose(np.load(out), want, atol=1e-5)
  assert cli.call(sample_command, argv + ["--T_max=2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "--T_max" in err, err
  both = argv + ["--config=configs/c2i.py"]
  assert cli.call(sample_command, both) == 2
  assert "not both" in capsys.readouterr().err
