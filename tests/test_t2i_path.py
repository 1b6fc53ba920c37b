"""Text-to-image on real captions end to end on a CPU: a random-weight small
Gemma-3 (Hugging Face layout, tokenizer trained here), a small DC-AE and a
small RADIO -> prepare a dozen captioned images of two aspect ratios -> 3
train steps of the smoke variant of configs/t2i.py:xl over both buckets ->
a 64x96 PNG from a prompt; the benchmark prompt-set layouts; the caption
length buckets against the official truncation; the bucketed pipeline's
resume."""

import json
import os

import autoencoder_utils as au
import gemma_utils
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from tim_jax import inference, models, training
from tim_jax.commands import cli
from tim_jax.commands import prepare as prepare_command
from tim_jax.config import config_base
from tim_jax.data import captioned, conditioning, kinds
from tim_jax.encoders import gemma
from tim_jax.inference import prompt_sets

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "tests", "data", "radio", "radio_plain.pth")
CAPTIONS = [
  "a red bus at night",
  "two cats on a sofa near the window",
  "a bowl of soup",
  "mountains under a violet sky at dawn",
  "a dog",
  "an old map of the city with a compass rose",
  "a small boat on a lake",
  "a cup of tea on a table",
]
# Gemma as wide as the smoke variant's caption features (16).
GEMMA = dict(
  hidden_size=16,
  intermediate_size=32,
  num_attention_heads=2,
  num_key_value_heads=1,
  head_dim=8,
  query_pre_attn_scalar=8,
)
DC_AE = dict(au.DC_CONV, latent_channels=32)  # f8, 32 channels.
# Two aspect ratios: near-square (bucket 64x64) and 1:4 (bucket 32x128).
SHAPES = [(60, 70), (30, 120)]


def write_captioned_folder(root, n=12, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    h, w = SHAPES[i % 2]
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(root, f"im{i:02d}.png"))
    caps = [CAPTIONS[i % len(CAPTIONS)]]
    if i % 3 == 0:  # Some images have two captions.
      caps.append(CAPTIONS[(i + 3) % len(CAPTIONS)])
    with open(os.path.join(root, f"im{i:02d}.txt"), "w") as f:
      f.write("\n".join(caps) + "\n")
  return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(gemma dir, DC-AE dir, prepared data_dir)."""
  root = tmp_path_factory.mktemp("t2i")
  gemma_dir = str(root / "gemma")
  gemma_utils.write(gemma_dir, sentences=CAPTIONS, **GEMMA)
  ae_dir = str(root / "dcae")
  au.write(DC_AE, ae_dir)
  folder = write_captioned_folder(str(root / "images"))
  data_dir = str(root / "data")
  assert (
    cli.call(
      prepare_command,
      [
        f"--captioned={folder}",
        "--autoencoder=dc_ae_f32c32_sana_1.1",
        f"--autoencoder_path={ae_dir}",
        "--resolution=64",
        f"--data_dir={data_dir}",
        "--batch_size=4",
        "--shard_size=4",
      ],
    )
    == 0
  )
  return gemma_dir, ae_dir, data_dir


def smoke_config(gemma_dir, ae_dir, data_dir, num_steps=3):
  c = config_base.load_file(
    os.path.join(ROOT, "configs", "t2i.py") + ":xl,smoke"
  )
  c.unlock()
  c.data.data_dir = data_dir
  c.data.image_size = 8  # The 8x8 latent bucket takes batch_size.
  c.batch_size = 4
  c.optimizer.base_batch = 4
  c.text_encoder.path = gemma_dir
  c.autoencoder.path = ae_dir
  c.autoencoder.batch_size = 4
  c.loss_extras.repa_encoder_path = TEACHER
  c.model.network.z_dim = 64  # The small RADIO's width.
  c.num_steps = num_steps
  c.checkpoint_every = num_steps
  c.sample.every = num_steps
  c.sample.image_size = 8
  c.sample.num = 2
  c.sample.prompts = ("a red bus at night", "a dog")
  c.lock()
  return c


def test_prepare_writes_one_dataset_per_bucket(world):
  _, _, data_dir = world
  src = captioned.CaptionedSource(data_dir, with_images=True)
  assert len(src) == 12
  shapes = sorted(tuple(s) for s, _, _ in src.buckets)
  assert shapes == [(4, 16, 32), (8, 8, 32)]  # 32x128 and 64x64 pixels.
  for shape, start, count in src.buckets:
    assert count == 6
    ex = src[start]
    assert ex["image"].shape == shape
    assert ex["pixels"].shape == (shape[0] * 8, shape[1] * 8, 3)
    assert all(c in CAPTIONS for c in ex["captions"])
  # Two captions kept where the image had two.
  assert max(len(src[i]["captions"]) for i in range(12)) == 2


def test_buckets_and_manifest_follow_the_official_rules(tmp_path):
  buckets = captioned.aspect_buckets(1024)
  assert (1024, 1024) in buckets
  assert all(
    h % 32 == 0 and w % 32 == 0 and h * w <= 1024**2 for h, w in buckets
  )
  assert captioned.nearest_bucket(720, 1280, buckets)[1] > 1024
  # An official data_info.jsonl line: the bucket's last field is HxW,
  # floored to multiples of 32.
  (tmp_path / "a.jpg").write_bytes(b"")
  (tmp_path / "info.jsonl").write_text(
    json.dumps(
      {
        "image_file": "a.jpg",
        "captions": ["x", "y"],
        "bucket": "ratio-0.75-1000x1350",
      }
    )
    + "\n"
  )
  items = captioned.read_manifest(str(tmp_path / "info.jsonl"))
  assert items[0][1] == ["x", "y"] and items[0][2] == (992, 1344)
  (tmp_path / "bad.jsonl").write_text('{"image_file": "a.jpg"}\n')
  with pytest.raises(ValueError, match="line 1: captions"):
    captioned.read_manifest(str(tmp_path / "bad.jsonl"))
  os.makedirs(tmp_path / "f")
  Image.new("RGB", (8, 8)).save(tmp_path / "f" / "lonely.png")
  with pytest.raises(ValueError, match="no caption file"):
    captioned.read_folder(str(tmp_path / "f"))


def test_bucketed_batches_resume_exactly(world):
  gemma_dir, _, data_dir = world
  src = captioned.CaptionedSource(data_dir)
  enc = gemma.load(gemma_dir, max_length=32)
  cond = conditioning.TextConditioner(enc)
  area = lambda **kw: captioned.bucket_batch_sizes(src.buckets, **kw)
  assert area(batch_size=4, image_size=8, multiple=2) == [4, 4]
  # A nominal 12x12 bucket: 4 * 144 / 64 = 9, rounded down to 8.
  assert area(batch_size=4, image_size=12, multiple=2) == [8, 8]
  assert area(batch_size=4, image_size=12, multiple=2, mode="fixed") == [4, 4]
  make = lambda: captioned.make_iterator(
    src,
    batch_sizes=[4, 4],
    seed=3,
    tokenize=cond.tokenize,
    escape=conditioning.escape_unicode,
  )
  it = make()
  seen = [next(it) for _ in range(3)]
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  for b in seen + want:  # Whole batches of one bucket.
    assert b["image"].shape[0] == 4 and b["caption_ids"].shape == (4, 32)
  assert {b["image"].shape[1:] for b in seen + want} == {
    (4, 16, 32),
    (8, 8, 32),
  }
  again = make()
  again.set_state(state)
  for w in want:
    got = next(again)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_length_buckets_equal_the_official_truncation(world):
  gemma_dir, _, _ = world
  enc = gemma.load(gemma_dir, max_length=64)
  cond = conditioning.TextConditioner(enc, length_buckets=(8, 16, 32))
  assert cond.length_buckets == (8, 16, 32, 64)
  prompts = ["a dog", "mountains under a violet sky at dawn"]
  official, lengths = enc.encode(prompts)  # Cut to the longest caption.
  assert official.shape[1] == int(lengths.max()) == 8
  y = cond.from_prompts(prompts)
  assert y["features"].shape[1] == 8  # Bucket 8 holds 8 tokens.
  y = cond.from_prompts(
    prompts + ["an old map of the city with a compass rose"]
  )
  assert y["features"].shape[1] == 16 and (np.asarray(y["length"]) == 11).all()
  official, _ = enc.encode(
    prompts + ["an old map of the city with a compass rose"]
  )
  np.testing.assert_allclose(
    np.asarray(y["features"][:, :11]),
    np.asarray(official),
    rtol=1e-5,
    atol=1e-6,
  )
  net = dict(
    patch_size=1,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    encoder_depth=1,
    z_dim=16,
    projector_dim=32,
    lora_hidden_size=8,
    cap_feat_dim=16,
  )
  model = models.build("t2i", net)
  state = nnx_perturb(model)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
  t = jnp.full((3,), 0.6)
  r = jnp.full((3,), 0.2)
  np.testing.assert_allclose(
    np.asarray(state(x, t, r, y)),
    np.asarray(state(x, t, r, official)),
    rtol=1e-5,
    atol=1e-6,
  )
  # The null conditioning is the empty caption cut and masked alike.
  null = cond.null_like(y)
  empty, _ = enc.encode_padded([""])
  np.testing.assert_allclose(
    np.asarray(null["features"][0]),
    np.asarray(empty[0, :16]),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_array_equal(
    np.asarray(null["length"]), np.asarray(y["length"])
  )


def nnx_perturb(model, scale=0.05):
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(
      treedef,
      [
        v + scale * jax.random.normal(k, v.shape, v.dtype)
        for v, k in zip(leaves, keys)
      ],
    ),
  )
  return model


def test_dropout_replaces_captions_before_encoding(world):
  gemma_dir, _, _ = world
  enc = gemma.load(gemma_dir, max_length=32)
  cond = conditioning.TextConditioner(enc, drop_prob=1.0)
  batch = cond.cut(cond.tokenize(["a red bus at night", "a dog"]))
  y, y_true, null = cond.training_conditions(batch, jax.random.key(0))
  empty = cond.encode(
    *[
      np.asarray(v)
      for v in cond.cut(cond.tokenize(["", ""]), longest=6).values()
    ]
  )
  np.testing.assert_allclose(
    np.asarray(y["features"]),
    np.asarray(empty["features"]),
    rtol=1e-5,
    atol=1e-6,
  )
  assert (np.asarray(y["length"]) == 1).all()  # Only BOS left.
  assert (np.asarray(y_true["length"]) == 6).all()
  np.testing.assert_array_equal(np.asarray(null["length"]), [1, 1])


def test_captions_to_png_end_to_end(world, tmp_path, caplog):
  gemma_dir, ae_dir, data_dir = world
  config = smoke_config(gemma_dir, ae_dir, data_dir)
  workdir = str(tmp_path / "run")
  caplog.set_level("INFO")
  state = training.train_and_evaluate(config, workdir)
  assert int(state.step) == 3
  compiles = [
    r.getMessage()
    for r in caplog.records
    if "compiling the train step" in r.getMessage()
  ]
  # One compiled step per bucket shape (both buckets, one caption length).
  assert len(compiles) == 2, compiles
  assert "(2 distinct so far)" in compiles[-1]
  assert os.listdir(os.path.join(workdir, "samples"))

  out = str(tmp_path / "bus.png")
  from tim_jax.commands import sample as sample_command

  assert (
    cli.call(
      sample_command,
      [
        f"--checkpoint={workdir}",
        f"--text_encoder_path={gemma_dir}",
        "--prompt=a red bus at night",
        "--height=64",
        "--width=96",
        "--num_steps=2",
        "--cfg_scale=2.0",
        f"--out={out}",
        "--raw_size",
      ],
    )
    == 0
  )
  picture = np.asarray(Image.open(out))
  # --raw_size: one image at its own size, 1px frame.
  assert picture.shape == (64 + 2, 96 + 2, 3)
  assert picture[1:-1, 1:-1].std() > 0

  # The benchmark layouts, resumable.
  pipe = inference.load(workdir, text_encoder_path=gemma_dir)
  meta = tmp_path / "geneval.jsonl"
  meta.write_text(
    "\n".join(
      json.dumps({"prompt": p, "tag": "single"})
      for p in ["a dog", "a bowl of soup", "a cup of tea"]
    )
    + "\n"
  )
  out_dir = str(tmp_path / "geneval")
  kw = dict(num_steps=1, batch_size=2, height=4, width=4)
  assert prompt_sets.run(pipe, f"geneval:{meta}", out_dir, **kw) == (3, 0)
  for i in range(3):
    folder = os.path.join(out_dir, f"{i:05d}")
    assert sorted(os.listdir(os.path.join(folder, "samples"))) == [
      f"{k:05d}.png" for k in range(4)
    ]
    assert np.asarray(Image.open(os.path.join(folder, "grid.png"))).shape == (
      64,
      64,
      3,
    )  # 2x2 of 32 px, no gaps.
    with open(os.path.join(folder, "metadata.jsonl")) as f:
      assert json.load(f)["tag"] == "single"
  assert prompt_sets.run(pipe, f"geneval:{meta}", out_dir, **kw) == (0, 3)
  prompts = tmp_path / "dpg"
  prompts.mkdir()
  (prompts / "p1.txt").write_text("a small boat on a lake")
  dpg_out = str(tmp_path / "dpg_out")
  assert prompt_sets.run(pipe, f"dpg:{prompts}", dpg_out, **kw) == (1, 0)
  assert np.asarray(Image.open(os.path.join(dpg_out, "p1.png"))).shape == (
    64,
    64,
    3,
  )


def test_captioned_config_errors_are_clear(world):
  gemma_dir, ae_dir, data_dir = world
  c = smoke_config(gemma_dir, ae_dir, data_dir)
  c.unlock()
  c.text_encoder.path = ""
  c.lock()
  with pytest.raises(ValueError, match="text_encoder.path=DIR"):
    training.Trainer(c)
  c.unlock()
  c.text_encoder.path = gemma_dir
  c.model.network.cap_feat_dim = 24
  c.lock()
  with pytest.raises(ValueError, match="cap_feat_dim"):
    training.Trainer(c)
  with pytest.raises(ValueError, match="only a train split"):
    kinds.source(c, "eval")
