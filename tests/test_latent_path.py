"""The class-conditional latent path end to end on a CPU: a folder of JPEGs
-> prepare with a random-weight autoencoder in diffusers' layout -> 3 train
steps of a smoke paper variant -> a decoded sample PNG -> 64 generated
samples -> FID against the folder's statistics; for SD-VAE (KL) and DC-AE.
Also: the flip choice is part of the resumable data state."""

import os

import autoencoder_utils as au
import jax
import numpy as np
from PIL import Image
import pytest

from tim_jax import inference, training
from tim_jax.commands import cli
from tim_jax.commands import fid as fid_command
from tim_jax.commands import prepare as prepare_command
from tim_jax.config import config_base
from tim_jax.data import latents, pipeline, prepare
from tim_jax.inference import generate

pytestmark = [pytest.mark.slow, pytest.mark.parity]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (variant, autoencoder name, small diffusers config, crop size): each small
# autoencoder maps the crop to the variant's latent shape (32x32x4 for
# xl2_256; 16x16x32 for xl1_512).
CASES = {
  "kl": ("xl2_256", "sd_vae_ft_ema", au.KL_SMALL, 64),
  "dc": (
    "xl1_512",
    "dc_ae_f32c32_sana_1.1",
    dict(au.DC_CONV, latent_channels=32),
    128,
  ),
}


def smoke_config(variant, name, data_dir, ae_dir, num_steps=3):
  c = config_base.load_file(
    os.path.join(ROOT, "configs", "c2i.py") + f":{variant},smoke"
  )
  c.unlock()
  c.data.data_dir = data_dir
  c.autoencoder.name = name
  c.autoencoder.path = ae_dir
  c.autoencoder.batch_size = 8
  c.loss_extras.repa_encoder = "none"  # REPA has its own tests.
  c.num_steps = num_steps
  c.checkpoint_every = num_steps
  c.sample.every = num_steps
  c.sample.labels = (0, 1, 2)
  c.lock()
  return c


def prepared_kl_dataset(tmp_path, per_class):
  """A small JPEG folder prepared at 64 px with a small KL-VAE:
  (data_dir, autoencoder dir)."""
  folder = au.write_image_folder(tmp_path / "images", per_class=per_class)
  ae_dir = tmp_path / "ae"
  au.write(au.KL_SMALL, ae_dir)
  data_dir = str(tmp_path / "latents")
  assert (
    cli.call(
      prepare_command,
      [
        f"--images={folder}",
        "--autoencoder=sd_vae_ft_ema",
        f"--autoencoder_path={ae_dir}",
        "--resolution=64",
        f"--data_dir={data_dir}",
      ],
    )
    == 0
  )
  return data_dir, ae_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_to_fid_for_each_autoencoder(case, tmp_path, capsys):
  folder = au.write_image_folder(
    tmp_path / "images", min_side=130, max_side=180
  )
  weights = au.random_inception_weights(tmp_path / "inception.safetensors")
  variant, name, ae_cfg, size = CASES[case]
  ae_dir = tmp_path / f"{case}_ae"
  au.write(ae_cfg, ae_dir)
  data_dir = str(tmp_path / f"{case}_latents")
  assert (
    cli.call(
      prepare_command,
      [
        f"--images={folder}",
        f"--autoencoder={name}",
        f"--autoencoder_path={ae_dir}",
        f"--resolution={size}",
        f"--data_dir={data_dir}",
        "--shard_size=10",
        "--batch_size=8",
      ],
    )
    == 0
  )
  source = latents.LatentSource(data_dir, with_images=True)
  assert len(source) == 24 and source.has_flips
  ex = source[0]
  assert ex["label"] == 0
  assert ex["pixels"].shape == (size, size, 3)
  assert ex["pixels"].dtype == np.uint8

  config = smoke_config(variant, name, data_dir, str(ae_dir))
  workdir = str(tmp_path / f"{case}_run")
  state = training.train_and_evaluate(config, workdir)
  assert int(state.step) == 3
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids, "no decoded sample grid"
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", grids[0])))
  assert grid.shape[0] > size and grid.std() > 0  # Decoded pixels.

  pipe = inference.load(workdir)
  out = str(tmp_path / f"{case}_samples.npz")
  assert (
    generate.generate(
      pipe, num=64, out=out, num_steps=1, batch_size=32, progress=False
    )
    == out
  )
  with np.load(out) as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (64, size, size, 3) and images.dtype == np.uint8
  assert labels.min() >= 0 and labels.max() < 1000
  np.testing.assert_array_equal(
    labels, generate.labels_for(0, np.arange(64), 1000)
  )

  ref = str(tmp_path / f"{case}_ref.npz")
  assert (
    cli.call(
      fid_command,
      [
        "stats",
        f"--images={folder}",
        f"--resolution={size}",
        f"--inception_weights={weights}",
        f"--out={ref}",
        "--batch_size=32",
      ],
    )
    == 0
  )
  capsys.readouterr()
  assert (
    cli.call(
      fid_command,
      [
        "score",
        f"--samples={out}",
        f"--reference={ref}",
        f"--inception_weights={weights}",
        "--batch_size=32",
      ],
    )
    == 0
  )
  printed = capsys.readouterr().out
  value = float(printed.split("FID ")[1].split()[0])
  score = float(printed.split("IS ")[1].split()[0])
  assert np.isfinite(value) and value > 0 and score >= 1.0


def test_generation_resumes_from_its_parts(tmp_path):
  data_dir, ae_dir = prepared_kl_dataset(tmp_path, per_class=3)
  config = smoke_config(
    "xl2_256", "sd_vae_ft_ema", data_dir, str(ae_dir), num_steps=2
  )
  config.unlock()
  config.sample.every = 0
  config.batch_size = 8
  config.lock()
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(config, workdir)
  pipe = inference.load(workdir)
  whole = str(tmp_path / "whole.npz")
  generate.generate(
    pipe, num=12, out=whole, num_steps=1, batch_size=4, progress=False
  )
  # An interrupted run: one part was lost; the rerun redoes only that one.
  part = str(tmp_path / "part.npz")
  generate.generate(
    pipe, num=12, out=part, num_steps=1, batch_size=4, progress=False
  )
  os.remove(os.path.join(part + ".parts", "batch_0000001.npz"))
  kept = os.path.getmtime(os.path.join(part + ".parts", "batch_0000000.npz"))
  os.remove(part)
  generate.generate(
    pipe, num=12, out=part, num_steps=1, batch_size=4, progress=False
  )
  assert (
    os.path.getmtime(os.path.join(part + ".parts", "batch_0000000.npz")) == kept
  )
  with np.load(whole) as a, np.load(part) as b:
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  with pytest.raises(ValueError, match="another job"):
    generate.generate(
      pipe, num=13, out=part, num_steps=1, batch_size=4, progress=False
    )


def test_flip_choice_is_random_per_visit_and_resumes_exactly(tmp_path):
  rng = np.random.default_rng(0)
  n = 16
  shards = tmp_path / "shards"
  shards.mkdir()
  lat = rng.normal(size=(n, 2, 2, 1)).astype(np.float32)
  np.savez(
    shards / "s.npz", latent=lat, latent_flip=-lat, label=np.arange(n) % 3
  )
  path = latents.write_latents(
    shards, tmp_path / "out", latent_shape=(2, 2, 1), flip=True
  )
  source = latents.LatentSource(path)

  def take(it, k):
    return [next(it)["image"].copy() for _ in range(k)]

  it = pipeline.make_iterator(
    source, global_batch_size=4, seed=7, process_index=0, process_count=1
  )
  batches = take(it, 8)  # Two epochs.
  flipped = []
  for b in batches:
    for x in b:
      hit = np.flatnonzero(np.all(np.isclose(lat, x), axis=(1, 2, 3)))
      flipped.append(hit.size == 0)
      if hit.size == 0:  # Then it is an exact flip.
        assert np.all(np.isclose(-lat, x), axis=(1, 2, 3)).any()
  # Both kinds occur, in about equal numbers.
  assert 8 <= sum(flipped) <= 24
  # Resume: the iterator restored from its state continues identically.
  it = pipeline.make_iterator(
    source, global_batch_size=4, seed=7, process_index=0, process_count=1
  )
  take(it, 3)
  saved = it.get_state()
  rest = take(it, 5)
  again = pipeline.make_iterator(
    source, global_batch_size=4, seed=7, process_index=0, process_count=1
  )
  again.set_state(saved)
  for a, b in zip(rest, take(again, 5)):
    np.testing.assert_array_equal(a, b)


def test_prepare_errors_are_clear(tmp_path, capsys):
  ae_dir = tmp_path / "ae"
  au.write(au.KL_SMALL, ae_dir)
  empty = tmp_path / "empty"
  empty.mkdir()
  args = [
    f"--autoencoder_path={ae_dir}",
    "--autoencoder=sd_vae_ft_ema",
    f"--data_dir={tmp_path / 'out'}",
  ]
  assert cli.call(prepare_command, [f"--images={empty}"] + args) == 2
  assert "no class subfolders" in capsys.readouterr().err
  folder = au.write_image_folder(tmp_path / "imgs", per_class=2)
  (folder / "n01" / "broken.jpg").write_bytes(b"not an image")
  assert (
    cli.call(prepare_command, [f"--images={folder}", "--resolution=64"] + args)
    == 2
  )
  assert "cannot read image" in capsys.readouterr().err
  os.remove(folder / "n01" / "broken.jpg")
  assert (
    cli.call(prepare_command, [f"--images={folder}", "--resolution=63"] + args)
    == 2
  )
  assert "multiple of 2" in capsys.readouterr().err
  assert (
    cli.call(
      prepare_command,
      [
        f"--images={folder}",
        "--resolution=64",
        "--autoencoder=dc_ae_f32c32_sana_1.1",
        f"--autoencoder_path={ae_dir}",
        f"--data_dir={tmp_path / 'out'}",
      ],
    )
    == 2
  )
  assert "expects an AutoencoderDC" in capsys.readouterr().err


def test_center_crop_and_folder_order(tmp_path):
  im = Image.fromarray(
    np.arange(300 * 200 * 3, dtype=np.uint8).reshape(300, 200, 3) % 251
  )
  crop = prepare.center_crop(im, 64)
  assert crop.shape == (64, 64, 3)
  # The short side was halved once (200 -> 100, box), then resized to 64.
  (tmp_path / "b").mkdir()
  (tmp_path / "a").mkdir()
  for p in ("b/2.png", "b/1.PNG", "a/z.jpeg", "a/notes.txt"):
    (tmp_path / p).write_bytes(b"")
  items, classes = prepare.image_folder(str(tmp_path))
  assert classes == ["a", "b"]
  assert [(os.path.relpath(p, tmp_path), l) for p, l in items] == [
    ("a/z.jpeg", 0),
    ("b/1.PNG", 1),
    ("b/2.png", 1),
  ]


def test_latent_run_with_flips_resumes_exactly(tmp_path):
  """Training on a dataset with flips: 4 steps straight equal 2 + 2 resumed
  (the flip choices are part of the checkpointed data state)."""
  data_dir, ae_dir = prepared_kl_dataset(tmp_path, per_class=4)

  def config(steps):
    c = smoke_config(
      "xl2_256", "sd_vae_ft_ema", data_dir, str(ae_dir), num_steps=steps
    )
    c.unlock()
    c.sample.every = 0
    c.checkpoint_every = 2
    c.batch_size = 4
    c.lock()
    return c

  # Sample grids of a latent run need the decoder's directory: said at once.
  no_decoder = smoke_config("xl2_256", "sd_vae_ft_ema", data_dir, "")
  with pytest.raises(ValueError, match="autoencoder.path"):
    training.train_and_evaluate(no_decoder, str(tmp_path / "none"))
  assert not os.path.exists(tmp_path / "none" / "checkpoints" / "2")

  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves((s.params, s.ema))]
  straight = training.train_and_evaluate(config(4), str(tmp_path / "a"))
  training.train_and_evaluate(config(2), str(tmp_path / "b"))
  resumed = training.train_and_evaluate(config(4), str(tmp_path / "b"))
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_prepare_reads_a_tfds_image_dataset(tmp_path):
  """--tfds: a TFDS dataset with image and label features (here a small
  one built in the test) gives the same crops as the folder reader."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  pictures = [
    (rng.random((90 + 5 * i, 80, 3)) * 255).astype(np.uint8) for i in range(6)
  ]

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(),
            "label": tfds.features.ClassLabel(names=["a", "b"]),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, p in enumerate(pictures):
        yield i, {"image": p, "label": i % 2}

  builder = TinyImages(
    data_dir=str(tmp_path / "tfds"), file_format="array_record"
  )
  builder.download_and_prepare()
  images = prepare.TfdsImages(
    "tiny_images", "train", str(tmp_path / "tfds"), 64
  )
  assert len(images) == 6 and images.classes == ["a", "b"]
  crop, label = images[3]
  assert label == 1
  np.testing.assert_array_equal(
    crop, prepare.center_crop(Image.fromarray(pictures[3]), 64)
  )


def test_a_decoder_that_gives_nan_is_refused(tmp_path):
  # A damaged decoder used to write black pictures without a word.
  from safetensors.numpy import load_file, save_file

  ae_dir = tmp_path / "ae"
  au.write(au.KL_SMALL, ae_dir)
  weights = ae_dir / "diffusion_pytorch_model.safetensors"
  save_file({k: v * np.nan for k, v in load_file(weights).items()}, weights)
  config = smoke_config("xl2_256", "sd_vae_ft_ema", "", str(ae_dir))
  pipe = inference.Pipeline(config)
  latents_in = np.zeros((2, 32, 32, 4), np.float32)
  with pytest.raises(inference.NonFiniteSamplesError, match="non-finite"):
    pipe.decode(latents_in)
  assert np.isnan(pipe.decode(latents_in, check_finite=False)).all()


def test_prepare_resumes_only_the_same_job(tmp_path, capsys):
  # Resumed with another autoencoder's weights, or after an input image
  # changed, prepare used to mix both into one dataset; a finished job
  # rerun used to fail with "dataset already exists".
  folder = au.write_image_folder(tmp_path / "images", per_class=1)
  for seed, name in ((0, "ae"), (1, "other_ae")):
    au.write(au.KL_SMALL, tmp_path / name, seed=seed)
  data_dir = tmp_path / "latents"

  def run(ae="ae"):
    return cli.call(
      prepare_command,
      [
        f"--images={folder}",
        "--autoencoder=sd_vae_ft_ema",
        f"--autoencoder_path={tmp_path / ae}",
        "--resolution=64",
        f"--data_dir={data_dir}",
        "--shard_size=2",
        "--batch_size=2",
      ],
    )

  assert run() == 0
  capsys.readouterr()
  assert run() == 0  # The same job again: nothing to do.
  assert "wrote" in capsys.readouterr().out
  assert run("other_ae") == 2
  err = capsys.readouterr().err
  assert "autoencoder_weights" in err and "To start over, delete" in err
  image = sorted((folder / "n01").iterdir())[0]
  image.write_bytes(sorted((folder / "n02").iterdir())[0].read_bytes())
  assert run() == 2
  assert "inputs" in capsys.readouterr().err


def test_image_folders_are_read_as_they_are(tmp_path):
  # A link back up the tree used to multiply 2 images into 82 rows; 16-bit
  # PNGs were clipped to white.
  folder = tmp_path / "images"
  (folder / "a").mkdir(parents=True)
  grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(
    np.uint16
  )
  Image.fromarray(grey16).save(folder / "a" / "deep.png")
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(
    folder / "a" / "flat.png"
  )
  os.symlink(folder / "a", folder / "a" / "loop")
  items, classes = prepare.image_folder(str(folder))
  assert classes == ["a"] and len(items) == 2
  crop, _ = prepare.FolderImages(str(folder), 64)[0]
  want = np.round(grey16 / 65535.0 * 255.0).astype(np.uint8)
  np.testing.assert_allclose(crop[..., 0], want, atol=1)
  assert (crop == 255).mean() < 0.01  # Not clipped to white.
