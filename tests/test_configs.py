"""The shipped configs, every variant run as a smoke test, and the
benchmark command."""

import json
import os

import jax
import numpy as np
import pytest

from tim_jax import training
from tim_jax.config import config_base
from tim_jax.core import sharding
from tim_jax.data import kinds
from tim_jax.models import architectures

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec):
  """``"c2i:xl2_256,mg"`` -> that config, read as --config= reads it."""
  family, _, variant = spec.partition(":")
  path = os.path.join(ROOT, "configs", f"{family}.py")
  return config_base.load_file(f"{path}:{variant}" if variant else path)


# The official hyperparameters of each paper variant (the official
# configs/c2i/*.yaml and configs/t2i/*.yaml).
PAPER = {
  "t2i:xl": dict(
    architecture="T2I-XL",
    batch_size=2048,
    base_lr=1e-4,
    base_batch=512,
    num_steps=500_000,
    P_mean=0.0,
    P_std=1.6,
  ),
  "c2i:b4": dict(
    architecture="B/4",
    batch_size=1024,
    base_lr=1e-4,
    base_batch=256,
    num_steps=100_000,
    P_mean=-0.4,
    P_std=1.0,
  ),
  "c2i:xl2_256": dict(
    architecture="XL/2",
    batch_size=512,
    base_lr=1e-4,
    base_batch=256,
    num_steps=750_000,
    P_mean=-0.4,
    P_std=1.0,
  ),
  "c2i:xl1_512": dict(
    architecture="XL/1",
    batch_size=512,
    base_lr=1e-4,
    base_batch=256,
    num_steps=750_000,
    P_mean=-0.4,
    P_std=1.0,
  ),
}
# The widths, depths and patches of those architectures (the paper's).
SIZES = {
  "T2I-XL": dict(hidden_size=1152, depth=28, patch_size=1),
  "B/4": dict(hidden_size=768, depth=12, patch_size=4),
  "XL/2": dict(hidden_size=1152, depth=28, patch_size=2),
  "XL/1": dict(hidden_size=1152, depth=28, patch_size=1),
}


@pytest.mark.parametrize("spec", sorted(PAPER))
def test_paper_variants_carry_the_official_hyperparameters(spec):
  c = load(spec)
  want = PAPER[spec]
  assert c.model.network.to_dict() == architectures.network(
    want["architecture"]
  )
  for field, value in SIZES[want["architecture"]].items():
    assert c.model.network[field] == value, field
  assert c.batch_size == want["batch_size"]
  assert c.optimizer.base_lr == want["base_lr"]
  assert c.optimizer.base_batch == want["base_batch"]
  assert c.num_steps == want["num_steps"]
  assert c.transport.params.P_mean == want["P_mean"]
  assert c.transport.params.P_std == want["P_std"]
  o = c.optimizer
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (
    0.9,
    0.95,
    1e-6,
    0.01,
    1.0,
  )
  assert c.ema_decay == 0.9999 and not c.ema_warmup
  assert c.loss.diffusion_ratio == 0.5 and c.loss.consistency_ratio == 0.1
  assert c.loss.derivative == "dde" and c.loss.epsilon == 0.005
  assert c.loss.enhance_target is False
  assert c.model.dtype == "bfloat16"
  if c.model.kind == "t2i":  # Captions encoded by Gemma-3 in the step.
    assert c.data.name == "captions" and c.text_encoder.name == "gemma3"
    assert c.text_encoder.dtype == "bfloat16"
    assert c.text_encoder.max_length == 256
    assert c.conditioning.drop_prob == 0.1
  else:
    assert c.data.name == "latents"
  assert c.loss_extras.repa_encoder == "radio_v2_5_b"
  assert c.loss_extras.repa_feature_key == ""


@pytest.mark.parametrize("variant", ["xl2_256", "xl1_512"])
def test_model_guidance_option(variant):
  c = load(f"c2i:{variant},mg")
  base = load(f"c2i:{variant}")
  assert c.loss.enhance_target is True
  assert c.loss.w_gt == 1.0 and c.loss.w_cond == 0.75
  assert c.loss.w_start == 0.3 and c.loss.w_end == 0.8
  assert c.model.network == base.model.network
  # The older names are the same config.
  assert load(f"c2i:{variant}_mg").to_dict() == c.to_dict()


def test_unknown_variants_options_and_keys():
  with pytest.raises(ValueError, match="unknown variant 'huge'.*tiny_fm"):
    load("t2i:huge")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['fast'\]"):
    load("c2i:xl2_256,fast")
  with pytest.raises(ValueError, match="mg is for xl2_256 and xl1_512"):
    load("c2i:b4,mg")
  c = load("t2i")
  with pytest.raises(AttributeError):
    c.modle = 1  # Locked: new keys are refused.


@pytest.mark.parametrize("family", ["t2i", "c2i"])
def test_tiny_defaults_build(family):
  c = load(family)
  assert c.data.name == "shapes"
  assert c.model.network.to_dict() == architectures.network(f"tiny-{family}")
  trainer = training.Trainer(c)
  assert trainer.model_config.kind == family


VARIANTS = [
  "c2i:tiny",
  "c2i:b4",
  "c2i:xl2_256",
  "c2i:xl1_512",
  "c2i:xl2_256,mg",
  "c2i:xl1_512,mg",
  "t2i:tiny",
  "t2i:tiny_fm",
  "t2i:xl",
]


# The REPA teacher of the smoke runs: a small random-weight RADIO (the
# golden case of tests/test_radio.py), 64 features wide.
SMOKE_TEACHER = os.path.join(ROOT, "tests", "data", "radio", "radio_plain.pth")
SMOKE_TEACHER_DIM = 64


def _png(array):
  import io

  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return np.frombuffer(buf.getvalue(), np.uint8)


def _captioned_dataset(root, c, rng, n=16):
  """One bucket of captioned latents as prepare --captioned writes it, and a
  small Gemma-3 as wide as the variant's caption features: (data_dir,
  gemma dir)."""
  import gemma_utils

  from tim_jax.data import captioned, latents

  size, channels = c.data.image_size, c.model.network.in_channels
  shards = root / "captioned_in"
  shards.mkdir()
  texts = [
    json.dumps([gemma_utils.SENTENCES[i % 6]]).encode() for i in range(n)
  ]
  crops = [
    _png((rng.random((4 * size, 4 * size, 3)) * 255).astype(np.uint8))
    for _ in range(n)
  ]
  offsets = lambda parts: np.concatenate(
    [[0], np.cumsum([len(p) for p in parts])]
  )
  np.savez(
    shards / "shard.npz",
    latent=rng.normal(size=(n, size, size, channels)).astype(np.float32),
    text_bytes=np.frombuffer(b"".join(texts), np.uint8),
    text_offsets=offsets(texts),
    image_bytes=np.concatenate(crops),
    image_offsets=offsets(crops),
  )
  data_dir = str(root / "captioned")
  latents.write_latents(
    shards,
    data_dir,
    latent_shape=(size, size, channels),
    cond="text",
    images=True,
  )
  assert captioned.CaptionedSource(data_dir).buckets[0][2] == n
  gemma_dir = str(root / "gemma")
  width = c.model.network.cap_feat_dim
  gemma_utils.write(
    gemma_dir,
    hidden_size=width,
    intermediate_size=2 * width,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=width // 2,
    query_pre_attn_scalar=width // 2,
  )
  return data_dir, gemma_dir


@pytest.fixture(scope="module")
def latent_datasets(tmp_path_factory):
  """A tiny latent dataset per latent shape and conditioning the paper
  variants need, as tim_jax.data.prepare writes them (latents, their flips,
  the pixel crops the REPA teacher reads); the t2i one with its null
  caption."""
  from tim_jax.data import latents

  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  out = {}
  for spec in VARIANTS:
    c = load(f"{spec},smoke")
    if c.data.name == "captions":
      out["captions"] = _captioned_dataset(root, c, rng)
    if c.data.name != "latents":
      continue
    net = c.model.network
    size, channels = c.data.image_size, net.in_channels
    key = (c.model.kind, size, channels)
    if key in out:
      continue
    shards, n = root / f"in_{len(out)}", 16
    shards.mkdir()
    crops = [
      _png((rng.random((4 * size, 4 * size, 3)) * 255).astype(np.uint8))
      for _ in range(n)
    ]
    arrays = dict(
      latent=rng.normal(size=(n, size, size, channels)).astype(np.float32),
      latent_flip=rng.normal(size=(n, size, size, channels)).astype(np.float32),
      image_bytes=np.concatenate(crops),
      image_offsets=np.concatenate([[0], np.cumsum([len(c) for c in crops])]),
    )
    cap_shape = None
    if c.model.kind == "c2i":
      arrays["label"] = rng.integers(0, net.num_classes, n)
    else:
      cap_shape = (6, net.cap_feat_dim)
      arrays["caption"] = rng.normal(size=(n, *cap_shape)).astype(np.float32)
    np.savez(shards / "shard.npz", **arrays)
    data_dir = str(root / f"out_{len(out)}")
    latents.write_latents(
      shards,
      data_dir,
      latent_shape=(size, size, channels),
      cond="label" if cap_shape is None else "caption",
      cap_shape=cap_shape,
      flip=True,
      images=True,
    )
    null = None
    if cap_shape is not None:
      null = str(root / f"null_{len(out)}.npy")
      np.save(null, rng.normal(size=cap_shape).astype(np.float32))
    out[key] = (data_dir, null)
  return out


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_trains_two_steps_as_smoke(spec, latent_datasets):
  full, c = load(spec), load(f"{spec},smoke")
  # The same code path as the full variant...
  for field in (
    "data.name",
    "model.kind",
    "model.dtype",
    "model.remat",
    "loss_extras.repa_encoder",
    "loss_extras.repa_feature_key",
    "autoencoder.name",
    "data.image_size",
    "model.network.in_channels",
    "model.network.patch_size",
    "sample.cfg_scale",
    "sample.guidance_interval",
    "sample.mode",
  ):
    get = lambda cfg: (
      cfg[field.split(".")[0]] if "." not in field else (eval(f"cfg.{field}"))
    )  # pylint: disable=eval-used
    assert get(c) == get(full), field
  assert c.loss.to_dict() == full.loss.to_dict()
  # ... at a size that runs on a CPU in seconds.
  assert c.model.network.hidden_size <= 32 and c.model.network.depth == 1
  repa = c.loss_extras.repa_encoder != "none"
  c.unlock()
  if c.data.name == "latents":
    data_dir, null = latent_datasets[
      (c.model.kind, c.data.image_size, c.model.network.in_channels)
    ]
    c.data.data_dir = data_dir
    if null:
      c.data.null_caption_features = null
  if c.data.name == "captions":
    c.data.data_dir, c.text_encoder.path = latent_datasets["captions"]
  if repa:
    c.loss_extras.repa_encoder_path = SMOKE_TEACHER
    c.model.network.z_dim = SMOKE_TEACHER_DIM
  c.lock()
  trainer = training.Trainer(c)
  it = kinds.iterator(
    c, kinds.source(c), trainer.conditioner, sharding.data_shards(trainer.mesh)
  )
  state = trainer.init_state()
  before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  for _ in range(2):
    batch = kinds.host_batch(c, trainer.conditioner, next(it))
    state, metrics = trainer.train_step(
      state, sharding.global_batch(batch, trainer.mesh)
    )
    assert np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite_total"]) == 0
    # REPA runs for real where the variant has it, and only there.
    assert (float(metrics["proj_loss"]) > 0) == repa
  after = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_bench_runs_and_reports(tmp_path):
  from tim_jax.commands import bench

  c = load("c2i")
  c.unlock()
  c.model.network.hidden_size = 32
  c.model.network.depth = 1
  c.model.network.lora_hidden_size = 8
  c.data.image_size = 16
  out = bench.run(
    c,
    batch=4,
    repeats=1,
    nfes=[2],
    matmul_size=64,
    rows=("matmul", "forward", "tim_dde_step", "sample_nfe2_cfg"),
  )
  names = [r["name"] for r in out["rows"]]
  assert names == ["matmul", "forward", "tim_dde_step", "sample_nfe2_cfg"]
  mm, fwd, step, smp = out["rows"]
  # The reference row: 2 n^3 FLOPs; every row's share is against it.
  assert mm["model_flops"] == 2 * 64**3
  assert mm["flops_per_s"] == pytest.approx(mm["model_flops"] / mm["seconds"])
  for row in (fwd, step, smp):
    assert row["of_matmul"] == pytest.approx(
      row["flops_per_s"] / (mm["flops_per_s"] * out["num_devices"])
    )
  assert fwd["model_flops"] > 0 and fwd["seconds"] > 0
  assert smp["model_flops"] == pytest.approx(4 * fwd["model_flops"])
  assert step["model_flops"] > 3 * fwd["model_flops"]
  json.dumps(out)  # Serialisable as written by --out.
