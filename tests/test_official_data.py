"""The official released data, read as released: the ImageNet latents of
``tools/download_imagenet_256x256.sh`` (one ``<class>/<stem>.safetensors``
per image, ``latent`` = [original, flipped] channels first, ``label`` a
float32 scalar, as ``projects/preprocess/image_latent_c2i.py`` writes them)
imported with their images, and the T2I toy dataset
(``data_info.jsonl``, ``bucket_sampler.json``, ``dataset.tar.gz``) as the
official download script unpacks it. Both layouts are built small here."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import autoencoder_utils as au
import numpy as np
from PIL import Image
import pytest
from safetensors.numpy import save_file

from tim_jax.commands import cli
from tim_jax.commands import prepare as prepare_command
from tim_jax.config import config_base
from tim_jax.data import captioned, kinds, latents, official, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("n01440764", "n01443537", "n01484850")
LATENT = (4, 32, 32)  # SD-VAE at 256 px, channels first as released.


def write_official_c2i(root, per_class=3, seed=0):
  """(images dir, latents dir, {latent path: stored latent}): JPEGs in
  class folders and, per image, the official latent file: same class
  folder, the image name up to its first dot, ``latent`` (2, C, H, W)
  float32 and ``label`` a float32 scalar (the preprocessing casts it with
  the pixels)."""
  images = au.write_image_folder(
    os.path.join(root, "images", "train"),
    classes=CLASSES,
    per_class=per_class,
    min_side=256,
    max_side=300,
    seed=seed,
  )
  latent_dir = os.path.join(root, "sd-vae-ft-ema-256x256")
  rng = np.random.default_rng(seed)
  stored = {}
  for label, cls in enumerate(CLASSES):
    os.makedirs(os.path.join(latent_dir, cls))
    for name in sorted(os.listdir(os.path.join(images, cls))):
      path = os.path.join(latent_dir, cls, name.split(".")[0] + ".safetensors")
      z = rng.normal(size=(2,) + LATENT).astype(np.float32)
      save_file({"latent": z, "label": np.array(label, np.float32)}, path)
      stored[path] = z
  return images, latent_dir, stored


def prepare_args(images, latent_dir, data_dir, *extra):
  return [
    f"--official_latents={latent_dir}",
    f"--images={images}",
    f"--data_dir={data_dir}",
    *extra,
  ]


def c2i_config(data_dir):
  c = config_base.load_file(
    os.path.join(ROOT, "configs", "c2i.py") + ":xl2_256,smoke"
  )
  c.unlock()
  c.data.data_dir = str(data_dir)
  c.batch_size = 3
  c.lock()
  return c


def check_dataset(data_dir, images, latent_dir, stored):
  """Every row equals its source: the latent and the flip's latent (NHWC),
  the label, and the crop."""
  src = latents.LatentSource(data_dir, with_images=True)
  items, _ = prepare.image_folder(images)
  assert len(src) == len(items) == len(stored)
  for i, (path, label) in enumerate(items):
    cls, name = path.split(os.sep)[-2:]
    z = stored[
      os.path.join(latent_dir, cls, name.split(".")[0] + ".safetensors")
    ]
    ex = src[i]
    np.testing.assert_array_equal(ex["image"], z[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(ex["image_flip"], z[1].transpose(1, 2, 0))
    assert ex["label"] == label
    with Image.open(path) as im:
      crop = prepare.center_crop(prepare.to_rgb(im), 256)
    np.testing.assert_array_equal(ex["pixels"], crop)
  return src


def test_official_latents_import_and_train_pipeline(tmp_path, capsys):
  images, latent_dir, stored = write_official_c2i(str(tmp_path))
  data_dir = tmp_path / "data"
  args = prepare_args(images, latent_dir, data_dir, "--shard_size=4")
  assert cli.call(prepare_command, args) == 0
  out = capsys.readouterr().out
  assert "imported 9 official latents (32, 32, 4)" in out
  assert "256px" in out
  src = check_dataset(str(data_dir), images, latent_dir, stored)
  # The dataset prepare --images writes: same config name and features.
  assert os.path.basename(os.path.dirname(src.path)) == "label_32x32x4_flip_img"
  # The trainer's data path reads it: the paper config (REPA on, so with
  # the crops) accepts its shape, and its batches are originals or flips
  # with their crops flipped alike, both kinds seen.
  config = c2i_config(data_dir)
  source = kinds.source(config)
  kinds.check_source(config, source)
  it = kinds.iterator(config, source)
  originals = [z[0].transpose(1, 2, 0) for z in stored.values()]
  flips = [z[1].transpose(1, 2, 0) for z in stored.values()]
  seen = set()
  for _ in range(6):  # Two epochs.
    batch = next(it)
    assert batch["pixels"].shape == (3, 256, 256, 3)
    for x, pixels in zip(batch["image"], batch["pixels"]):
      hit = [j for j, o in enumerate(originals) if np.array_equal(o, x)]
      flip = [j for j, f in enumerate(flips) if np.array_equal(f, x)]
      assert len(hit) + len(flip) == 1
      j = (hit or flip)[0]
      crop = source[j]["pixels"]
      np.testing.assert_array_equal(pixels, crop if hit else crop[:, ::-1])
      seen.add("original" if hit else "flip")
  assert seen == {"original", "flip"}
  # A rerun of the finished job: nothing to do, the same dataset.
  assert cli.call(prepare_command, args) == 0
  assert "imported 9" in capsys.readouterr().out
  # Images of fewer classes keep the official labels; the other classes'
  # latents are left out, as the official loader leaves them.
  subset = tmp_path / "subset"
  for cls in CLASSES[1:]:
    shutil.copytree(os.path.join(images, cls), subset / cls)
  other = tmp_path / "data_subset"
  assert cli.call(prepare_command, prepare_args(subset, latent_dir, other)) == 0
  labels = [ex["label"] for ex in latents.LatentSource(str(other))]
  assert labels == [1, 1, 1, 2, 2, 2]


def test_official_layout_mistakes_are_one_line(tmp_path, capsys):
  images, latent_dir, stored = write_official_c2i(str(tmp_path), per_class=2)
  out = str(tmp_path / "out")
  runs = iter(range(100))

  def error(*extra, latents=latent_dir):
    # A new data_dir each time: a changed input refuses old shards.
    fresh = str(tmp_path / f"out{next(runs)}")
    args = prepare_args(images, latents, fresh, "--shard_size=2", *extra)
    assert cli.call(prepare_command, args) == 2
    # One line (after the progress bar of a run that stopped in a shard).
    err = capsys.readouterr().err.strip().split("\r")[-1].splitlines()[-1]
    assert err.startswith("error: ")
    return err

  # The folder above the unzipped class folders.
  assert "have no folder in --official_latents" in error(
    latents=os.path.dirname(latent_dir)
  )
  assert "needs --images" in (
    cli.call(
      prepare_command,
      [f"--official_latents={latent_dir}", f"--data_dir={out}"],
    )
    == 2
    and capsys.readouterr().err
  )
  assert "needs --autoencoder" in (
    cli.call(prepare_command, [f"--images={images}", f"--data_dir={out}"]) == 2
    and capsys.readouterr().err
  )
  assert "256 px crops" in error("--resolution=512")
  assert "are sd_vae_ft_ema's" in error("--autoencoder=dc_ae_f32c32_sana_1.1")
  paths = sorted(stored)
  # An image without its latent.
  extra = os.path.join(images, CLASSES[1], "new.JPEG")
  Image.new("RGB", (260, 260)).save(extra)
  err = error()
  assert "1 of 7 images" in err and "new.safetensors" in err
  os.remove(extra)
  # Two images whose names agree up to the first dot: one latent for both.
  twin = os.path.join(images, CLASSES[1], "img_0.copy.png")
  Image.new("RGB", (260, 260)).save(twin)
  assert "share one latent" in error()
  os.remove(twin)
  # A file without a key, of another shape, of another class's label.
  first, second = paths[0], paths[1]
  keep = open(second, "rb").read()
  save_file({"latent": stored[second]}, second)
  assert "no key 'label'" in error()
  save_file(
    {"latent": stored[second][:, :, :16], "label": np.array(0.0, np.float32)},
    second,
  )
  assert "shape mismatch" in error()
  save_file({"latent": stored[second], "label": np.array(2.0)}, second)
  assert "label folder mismatch" in error() and "label 2" in error()
  open(second, "wb").write(keep)
  # Class folders whose labels do not follow their sorted order.
  save_file({"latent": stored[first], "label": np.array(5, np.int64)}, first)
  assert "label folder mismatch" in error()
  save_file({"latent": stored[first][:1], "label": np.array(0)}, first)
  assert "(2, C, H, W)" in error()


def _wait_for(path, proc, timeout=300):
  start = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(proc.communicate()[1][-3000:])
    if time.time() - start > timeout:
      raise AssertionError(f"{path} never appeared")
    time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_official_import_killed_resumes(tmp_path):
  """The import killed (SIGKILL) in the middle: the rerun keeps the shards
  it had written and the result equals the source. The 5th latent is a
  named pipe, so the first run stops there until it is killed."""
  images, latent_dir, stored = write_official_c2i(str(tmp_path))
  paths = sorted(stored)
  blocked = paths[4]  # Not the first of its class (those are read early).
  content = open(blocked, "rb").read()
  os.remove(blocked)
  os.mkfifo(blocked)
  data_dir = tmp_path / "data"
  shards = data_dir / "shards"
  args = prepare_args(images, latent_dir, data_dir, "--shard_size=1")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-m", "tim_jax.commands.prepare", *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for(shards / "shard_0000003.npz", proc)
    time.sleep(0.5)  # It is stuck at shard 4.
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  done = sorted(f for f in os.listdir(shards) if f.endswith(".npz"))
  assert done == [f"shard_{i:07d}.npz" for i in range(4)]
  kept = {f: os.stat(shards / f).st_mtime_ns for f in done}

  def feed():  # The pipe gives the latent once the rerun opens it.
    with open(blocked, "wb") as f:
      f.write(content)

  feeder = threading.Thread(target=feed, daemon=True)
  feeder.start()
  try:
    assert cli.call(prepare_command, args) == 0
  finally:
    if feeder.is_alive():  # Never opened: let the thread go.
      os.close(os.open(blocked, os.O_RDONLY | os.O_NONBLOCK))
    feeder.join(10)
  assert {f: os.stat(shards / f).st_mtime_ns for f in done} == kept
  check_dataset(str(data_dir), images, latent_dir, stored)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_official_import_by_two_processes(tmp_path):
  """Two processes of one job (``--distributed``; jax.distributed finds
  them from SLURM's variables, the coordinator on 127.0.0.1) share the
  shards, p doing p, p + 2, ...; process 0 writes the dataset."""
  images, latent_dir, stored = write_official_c2i(str(tmp_path))
  data_dir = tmp_path / "data"
  args = prepare_args(images, latent_dir, data_dir, "--shard_size=2")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      SLURM_JOB_ID="1",
      SLURM_STEP_NODELIST="localhost",
      SLURM_NTASKS="2",
      SLURM_PROCID=str(i),
      SLURM_LOCALID=str(i),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "tim_jax.commands.prepare", "--distributed"]
        + args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # 9 images in shards of 2: process 0 has shards 0, 2, 4 (5 images),
  # process 1 shards 1, 3 (4 images); only process 0 reports the dataset.
  for i, n in ((0, 5), (1, 4)):
    bar = rf"importing \(process {i}\):\s+0%\|[^|]*\| 0/{n} "
    assert re.search(bar, outs[i][1]), outs[i][1][-2000:]
  assert "imported 9" in outs[0][0] and "imported" not in outs[1][0]
  check_dataset(str(data_dir), images, latent_dir, stored)


@pytest.mark.slow
def test_toy_t2i_dataset_as_unpacked(tmp_path, capsys):
  """The toy T2I layout: data_info.jsonl lines (image_file relative to the
  folder, captions, bucket ``...-HxW``), bucket_sampler.json (packed
  batches of line indices) and the images in dataset.tar.gz."""
  root = tmp_path / "t2i_toy_dataset"
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  sizes = [(70, 60), (40, 130)] * 3  # (h, w) of the files.
  buckets = ["1.17-64x64", "0.25-32x128"] * 3  # Ratio, then HxW.
  records, batches = [], {}
  for i, ((h, w), bucket) in enumerate(zip(sizes, buckets)):
    name = f"images/{i:06d}.jpg"
    pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / name, quality=95)
    captions = [f"caption {i}", f"another caption {i}"][: 1 + i % 2]
    records.append(dict(image_file=name, captions=captions, bucket=bucket))
    batches.setdefault(bucket, []).append(i)
  with open(root / "data_info.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  (root / "bucket_sampler.json").write_text(json.dumps(list(batches.values())))
  with tarfile.open(root / "dataset.tar.gz", "w:gz") as tar:
    tar.add(root / "images", arcname="images")
  for p in (root / "images").iterdir():  # As downloaded: not unpacked yet.
    p.unlink()
  ae_dir = tmp_path / "ae"
  au.write(dict(au.DC_CONV, latent_channels=32), ae_dir)
  data_dir = tmp_path / "data"
  args = [
    f"--official_t2i={root}",
    "--autoencoder=dc_ae_f32c32_sana_1.1",
    f"--autoencoder_path={ae_dir}",
    f"--data_dir={data_dir}",
    "--batch_size=4",
  ]
  assert cli.call(prepare_command, args) == 2
  err = capsys.readouterr().err
  assert "6 of 6 images" in err and "tar -xzf" in err
  with tarfile.open(root / "dataset.tar.gz") as tar:  # As the script does.
    tar.extractall(root, filter="data")
  # A sampler of another download is refused (it is only checked).
  (root / "bucket_sampler.json").write_text("[[0, 1]]")
  assert cli.call(prepare_command, args) == 2
  assert "mixes buckets" in capsys.readouterr().err
  (root / "bucket_sampler.json").write_text(json.dumps(list(batches.values())))
  assert cli.call(prepare_command, args) == 0
  assert "in 2 buckets" in capsys.readouterr().out
  # The captions data kind reads it: each image in its named bucket, with
  # its captions and the bicubic resize the official loader makes.
  src = captioned.CaptionedSource(str(data_dir), with_images=True)
  shapes = sorted(tuple(s) for s, _, _ in src.buckets)
  assert shapes == [(4, 16, 32), (8, 8, 32)]
  got = {}
  for i in range(len(src)):
    ex = src[i]
    got[ex["captions"][0]] = ex
  assert len(got) == 6
  for i, r in enumerate(records):
    ex = got[f"caption {i}"]
    assert ex["captions"] == r["captions"]
    h, w = (int(v) for v in r["bucket"].split("-")[-1].split("x"))
    assert ex["image"].shape == (h // 8, w // 8, 32)
    with Image.open(root / r["image_file"]) as im:
      want = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC))
    np.testing.assert_array_equal(ex["pixels"], want)
  items = official.read_t2i(str(root))
  assert [tuple(b) for _, _, b in items] == [(64, 64), (32, 128)] * 3
