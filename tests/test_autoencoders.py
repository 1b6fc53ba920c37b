"""The autoencoders against diffusers' PyTorch AutoencoderKL and
AutoencoderDC: random weights in small configs that cover every block type
(DC-AE's linear and quadratic attention both), float32 within 1e-4
relative; float64 within 1e-13 for the KL-VAE (measured 4e-15) and 1e-6
for DC-AE (measured 1.3e-7: diffusers takes DC-AE's attention in float32
even in float64, and float32 sums in another order round differently);
the real configs' parameter names, shapes and counts."""

import json
import os

import autoencoder_utils as au
from flax import nnx
import jax
import numpy as np
import pytest
import torch

from tim_jax import autoencoders
from tim_jax.weights import torch_weights

pytestmark = [pytest.mark.parity]

DATA = os.path.join(os.path.dirname(__file__), "data", "autoencoders")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = {}
  for name, cfg in au.CONFIGS.items():
    d = tmp_path_factory.mktemp(name)
    out[name] = (d, au.write(cfg, d))
  return out


def reference(model, images, noise):
  """diffusers' encode (mean, std, sample with ``noise``) and decode, with
  the official scaling (tim/models/vae/__init__.py)."""
  x = torch.from_numpy(images.transpose(0, 3, 1, 2))
  sf = model.config.scaling_factor
  with torch.no_grad():
    if hasattr(model, "quant_conv"):
      post = model.encode(x).latent_dist
      mean, std = post.mean, post.std
    else:
      mean = model.encode(x).latent
      std = torch.zeros_like(mean)
    n = torch.from_numpy(noise.transpose(0, 3, 1, 2))
    sample = (mean + std * n) * sf
    decoded = model._decode(sample / sf)  # pylint: disable=protected-access
    decoded = decoded.sample if hasattr(decoded, "sample") else decoded
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return nhwc(mean), nhwc(std), nhwc(sample), nhwc(decoded)


@pytest.mark.parametrize("name", sorted(au.CONFIGS))
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_parity_with_diffusers(name, precision, written):
  directory, model = written[name]
  tol = {"float32": 1e-4, "float64": 1e-6 if "dc" in name else 1e-13}[precision]
  with jax.enable_x64(precision == "float64"):
    ae = autoencoders.from_diffusers(directory, dtype=precision)
    dt = np.float64 if precision == "float64" else np.float32
    images = au.images(2, 32).astype(dt)
    rng = jax.random.key(3)
    h, w, c = ae.latent_shape(32, 32)
    noise = np.asarray(jax.random.normal(rng, (2, h, w, c), dt))
    ref = reference(
      model.to(torch.float64 if dt is np.float64 else torch.float32),
      images,
      noise,
    )
    mean, std = ae.moments(images)
    sample = ae.encode(images, rng=rng)
    decoded = ae.decode(ref[2].astype(dt))
    assert np.asarray(sample).dtype == dt
    assert rel(mean, ref[0]) < tol
    assert (
      rel(std, ref[1]) < tol
      if np.abs(ref[1]).max() > 0
      else (np.abs(np.asarray(std)).max() == 0)
    )
    assert rel(sample, ref[2]) < tol
    assert rel(decoded, ref[3]) < tol
    # rng=None: the posterior mean, scaled.
    np.testing.assert_allclose(
      np.asarray(ae.encode(images)),
      np.asarray(mean) * ae.scaling_factor,
      rtol=1e-6,
      atol=1e-6,
    )


def test_dc_configs_exercise_both_attention_branches():
  """The small DC-AE's last stages see maps with more and with fewer
  positions than a head has channels (linear vs quadratic attention)."""
  cfg = au.DC_PIXEL
  maps = [32 // 2**i for i in range(len(cfg["encoder_block_out_channels"]))]
  d = cfg["attention_head_dim"]
  vit = [
    m * m
    for m, t in zip(maps, cfg["encoder_block_types"])
    if t == "EfficientViTBlock"
  ]
  assert max(vit) > d and min(vit) <= d


@pytest.mark.parametrize("name", ["sd_vae_ft_ema", "dc_ae_f32c32_sana_1.1"])
def test_real_configs_have_diffusers_names_shapes_and_count(name):
  import diffusers

  with open(os.path.join(DATA, name, "config.json")) as f:
    cfg = json.load(f)
  cls = getattr(diffusers, cfg["_class_name"])
  with torch.device("meta"):
    ref = cls.from_config(cfg)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  module = nnx.eval_shape(lambda: autoencoders.build(cfg, rngs=nnx.Rngs(0)))
  got = torch_weights.expected_shapes(module)
  assert got == want
  assert sum(int(np.prod(s)) for s in got.values()) == sum(
    p.numel() for p in ref.parameters()
  ) + sum(b.numel() for b in ref.buffers())


def test_real_sd_vae_geometry():
  ae_cfg = autoencoders.read_config(os.path.join(DATA, "sd_vae_ft_ema"))
  c = autoencoders.architecture(ae_cfg)
  assert c.downsample == 8 and c.latent_channels == 4
  assert c.scaling_factor == 0.18215
  dc_cfg = autoencoders.read_config(os.path.join(DATA, "dc_ae_f32c32_sana_1.1"))
  c = autoencoders.architecture(dc_cfg)
  assert c.downsample == 32 and c.latent_channels == 32


def test_strict_loading_names_the_key(tmp_path, written):
  from safetensors.numpy import load_file, save_file

  src, _ = written["kl"]
  weights = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  cfg = json.load(open(os.path.join(src, "config.json")))
  missing = tmp_path / "missing"
  missing.mkdir()
  json.dump(cfg, open(missing / "config.json", "w"))
  gone = "decoder.conv_out.bias"
  save_file(
    {k: v for k, v in weights.items() if k != gone},
    str(missing / "diffusion_pytorch_model.safetensors"),
  )
  with pytest.raises(ValueError, match=gone):
    autoencoders.from_diffusers(missing)
  extra = tmp_path / "extra"
  extra.mkdir()
  json.dump(cfg, open(extra / "config.json", "w"))
  save_file(
    {**weights, "encoder.surplus.weight": np.zeros(3, np.float32)},
    str(extra / "diffusion_pytorch_model.safetensors"),
  )
  with pytest.raises(ValueError, match="encoder.surplus.weight"):
    autoencoders.from_diffusers(extra)


def test_deprecated_attention_names_load(tmp_path, written):
  """Older files (sd-vae-ft-ema's) name the attention query/key/value/
  proj_attn; they load to the same model."""
  from safetensors.numpy import load_file, save_file

  src, _ = written["kl"]
  weights = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  old = {}
  for k, v in weights.items():
    for new, dep in (
      (".to_q.", ".query."),
      (".to_k.", ".key."),
      (".to_v.", ".value."),
      (".to_out.0.", ".proj_attn."),
    ):
      k = k.replace(new, dep)
    old[k] = v
  assert any(".proj_attn." in k for k in old)
  d = tmp_path / "old"
  d.mkdir()
  json.dump(
    json.load(open(os.path.join(src, "config.json"))),
    open(d / "config.json", "w"),
  )
  save_file(old, str(d / "diffusion_pytorch_model.safetensors"))
  images = au.images(1)
  a = autoencoders.from_diffusers(src).encode(images)
  b = autoencoders.from_diffusers(d).encode(images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_clear(tmp_path, written):
  src, _ = written["dc_pixel"]
  ae = autoencoders.from_diffusers(src)
  with pytest.raises(ValueError, match="multiple of 8"):
    ae.latent_shape(36, 32)
  with pytest.raises(ValueError, match="NHWC"):
    ae.encode(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(FileNotFoundError, match="config.json"):
    autoencoders.from_diffusers(tmp_path)
  (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
  with pytest.raises(ValueError, match="AutoencoderKL and AutoencoderDC"):
    autoencoders.from_diffusers(tmp_path)


def test_speed_benchmark_runs_beside_diffusers(tmp_path, written, capsys):
  from tim_jax.commands import bench_autoencoders, cli

  src, _ = written["kl"]
  out = tmp_path / "bench.json"
  assert (
    cli.call(
      bench_autoencoders,
      [
        f"--config_json={src}",
        "--resolution=32",
        "--batch_size=2",
        "--repeats=1",
        "--torch",
        f"--out={out}",
      ],
    )
    == 0
  )
  result = json.loads(out.read_text())
  for side in ("tim_jax", "diffusers"):
    assert result[side]["encode_images_per_s"] > 0
    assert result[side]["decode_images_per_s"] > 0
  assert result["max_rel_diff_decode"] < 1e-4  # The same weights.
