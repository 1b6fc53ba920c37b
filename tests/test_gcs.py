"""gs:// everywhere, against a Cloud Storage emulator on 127.0.0.1
(fake-gcs-server; tests/gcs_utils.py points each real client at it):
a bucket of JPEGs is prepared into a bucket, a smoke variant trains with
--workdir=gs://..., is killed, resumes exactly, and samples, generates and
computes FID statistics from and into the bucket."""

import io
import os
import signal
import subprocess
import sys
import time

import autoencoder_utils as au
import fsspec
import gcs_utils
import jax
import numpy as np
from PIL import Image
import pytest

from tim_jax import training
from tim_jax.commands import cli
from tim_jax.commands import fid as fid_command
from tim_jax.commands import generate as generate_command
from tim_jax.commands import prepare as prepare_command
from tim_jax.commands import sample as sample_command
from tim_jax.core import paths, workdir_lock
from tim_jax.core.errors import UserError
from tim_jax.data import latents

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke variant of the c2i config on the bucket's dataset, as flags.
TRAIN_FLAGS = [
  "--config=configs/c2i.py:xl2_256,smoke",
  "--config.autoencoder.name=sd_vae_ft_ema",
  "--config.autoencoder.batch_size=8",
  "--config.loss_extras.repa_encoder=none",
  "--config.batch_size=4",
  "--config.num_steps=6",
  "--config.checkpoint_every=2",
  "--config.sample.every=6",
  "--config.evals.holdout_loss.every=0",
]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator, its settings in this process's environment (restored
  afterwards), and a bucket holding a JPEG folder and an autoencoder."""
  directory = tmp_path_factory.mktemp("gcs")
  emu = gcs_utils.Emulator(str(directory))
  before = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  os.environ[paths.CACHE_ENV] = str(directory / "cache")
  # This process imported fsspec before FSSPEC_GCS_TOKEN was set.
  gcs_conf = fsspec.config.conf.setdefault("gcs", {})
  gcs_conf["token"] = "anon"
  try:
    au.write_image_folder(directory / "images", per_class=4)
    au.write(au.KL_SMALL, directory / "ae")
    paths.copytree(directory / "images", emu.url("images"))
    paths.copytree(directory / "ae", emu.url("ae"))
    yield emu
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    os.environ.pop(paths.CACHE_ENV, None)
    gcs_conf.pop("token", None)
    emu.close()


def _prepare(emu):
  data_dir = emu.url("latents")
  assert (
    cli.call(
      prepare_command,
      [
        f"--images={emu.url('images')}",
        "--autoencoder=sd_vae_ft_ema",
        f"--autoencoder_path={emu.url('ae')}",
        "--resolution=64",
        f"--data_dir={data_dir}",
        "--shard_size=5",
        "--batch_size=8",
      ],
    )
    == 0
  )
  return data_dir


def _config(emu, data_dir):
  from tim_jax.config import config_base

  c = config_base.load_file(
    os.path.join(ROOT, "configs", "c2i.py") + ":xl2_256,smoke"
  )
  c.unlock()
  for flag in TRAIN_FLAGS[1:]:
    key, value = flag[len("--config.") :].split("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(value)
  c.data.data_dir = data_dir
  c.autoencoder.path = emu.url("ae")
  c.lock()
  return c


def _objects(url):
  return paths.files(url) if paths.as_path(url).is_dir() else []


def test_bucket_end_to_end(bucket, tmp_path):
  emu = bucket
  # prepare: JPEGs and autoencoder in the bucket, dataset into the bucket.
  data_dir = _prepare(emu)
  shards = _objects(emu.url("latents", "shards"))
  assert sum(f.endswith(".npz") for f in shards) == 3  # 12 images / 5.
  # Read back through grain's array_record reader (google-cloud-cpp).
  source = latents.LatentSource(data_dir, with_images=True)
  assert source.path.startswith("gs://") and len(source) == 12
  assert source[0]["label"] == 0 and source[0]["pixels"].shape == (64, 64, 3)
  assert source[11]["label"] == 2

  # Straight: six steps in one go, in this process.
  config = _config(emu, data_dir)
  straight = training.train_and_evaluate(config, emu.url("straight"))
  assert int(straight.step) == 6

  # Killed: a trainer process, stopped with SIGKILL once step 2 is saved.
  run = emu.url("run")
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(
    [sys.executable, "-m", "tim_jax.main", f"--workdir={run}"]
    + TRAIN_FLAGS
    + [
      f"--config.data.data_dir={data_dir}",
      f"--config.autoencoder.path={emu.url('ae')}",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  committed = paths.as_path(run) / "checkpoints" / "2" / "commit_success.txt"
  try:
    deadline = time.time() + 300
    while not committed.exists():
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline, "step 2 was never saved"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
  saved = [
    int(d.name)
    for d in (paths.as_path(run) / "checkpoints").iterdir()
    if d.name.isdigit() and (d / "commit_success.txt").exists()
  ]
  assert 2 in saved and 6 not in saved, saved  # Killed mid-run.
  # Its lock is left in the bucket; the holder is dead, so it is stale.
  lock = paths.join(run, workdir_lock.LOCK_NAME)
  holder = workdir_lock.read_holder(lock)
  assert holder and holder["pid"] == proc.pid
  assert workdir_lock.is_stale(lock, holder)

  # The resumed run also traces a step: into the bucket.
  traced = config.copy_and_resolve_references()
  traced.unlock()
  traced.profile.first_step, traced.profile.num_steps = 4, 1
  resumed = training.train_and_evaluate(traced, run)
  assert int(resumed.step) == 6
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves((s.params, s.ema))]
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  written = _objects(run)
  assert not paths.as_path(lock).exists()  # Released at the end.
  assert any(f.startswith("events.out.tfevents") for f in written)  # TF.
  assert "samples/step_0000006.png" in written
  trace = [f for f in written if f.startswith("plugins/profile/")]
  assert any(f.endswith(".xplane.pb") for f in trace), written
  assert {"checkpoints/6/commit_success.txt"} <= set(written)

  # sample and generate from the bucket's run into the bucket.
  grid = emu.url("out", "grid.png")
  assert (
    cli.call(
      sample_command,
      [f"--checkpoint={run}", "--labels=0,2", "--num_steps=1", f"--out={grid}"],
    )
    == 0
  )
  picture = np.asarray(Image.open(io.BytesIO(paths.as_path(grid).read_bytes())))
  assert picture.ndim == 3 and picture.std() > 0
  samples = emu.url("out", "samples.npz")
  assert (
    cli.call(
      generate_command,
      [
        f"--checkpoint={run}",
        "--num_images=8",
        "--num_steps=1",
        "--batch_size=4",
        f"--out={samples}",
      ],
    )
    == 0
  )
  with np.load(io.BytesIO(paths.as_path(samples).read_bytes())) as z:
    assert z["arr_0"].shape == (8, 64, 64, 3) and z["arr_1"].shape == (8,)
  parts = _objects(samples + ".parts")
  assert sum(f.endswith(".npz") for f in parts) == 2

  # FID statistics of the bucket's images, into the bucket, with weights
  # read from the bucket.
  weights = au.random_inception_weights(tmp_path / "inception.safetensors")
  paths.as_path(emu.url("inception.safetensors")).write_bytes(
    weights.read_bytes()
  )
  ref = emu.url("out", "ref.npz")
  assert (
    cli.call(
      fid_command,
      [
        "stats",
        f"--images={emu.url('images')}",
        "--resolution=64",
        f"--inception_weights={emu.url('inception.safetensors')}",
        f"--out={ref}",
      ],
    )
    == 0
  )
  with np.load(io.BytesIO(paths.as_path(ref).read_bytes())) as z:
    assert z["mu"].shape == (2048,)


def test_one_job_per_bucket_folder(bucket):
  folder = bucket.url("locked")
  first = workdir_lock.WorkdirLock(folder, "trainer").acquire()
  try:
    # Created only if absent: the second job's write is refused by the
    # server (ifGenerationMatch=0), not by a check that could race.
    assert not paths.create_exclusive(first.path, b"{}")
    with pytest.raises(UserError, match="in use by another trainer"):
      workdir_lock.WorkdirLock(folder, "trainer").acquire()
  finally:
    first.release()
  assert not paths.as_path(first.path).exists()
  workdir_lock.WorkdirLock(folder, "trainer").acquire().release()


def test_a_remote_weight_file_is_copied_once_and_again_when_changed(bucket):
  url = bucket.url("weights", "w.bin")
  paths.write_bytes(url, b"one")
  local = paths.local_copy(url)
  assert not paths.is_remote(local) and open(local, "rb").read() == b"one"
  assert paths.local_copy(url) == local
  paths.write_bytes(url, b"second")
  assert open(paths.local_copy(url), "rb").read() == b"second"
  assert paths.absolute(url) == url  # Not made CWD/gs:/...
  with pytest.raises(FileNotFoundError):
    paths.local_copy(bucket.url("weights", "missing.bin"))


def test_a_missing_bucket_is_one_line(bucket, capsys):
  from tim_jax import main

  rc = cli.call(
    main,
    ["--config=configs/c2i.py", "--workdir=gs://no-such-bucket/run"],
  )
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: cannot write gs://no-such-bucket")
  assert "does the bucket exist" in err


def test_captioned_corpora_in_a_bucket(bucket):
  from tim_jax.data import captioned

  root = bucket.url("captioned")
  picture = io.BytesIO()
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(picture, "PNG")
  for name in ("a/1", "a/2", "b/3"):
    paths.write_bytes(f"{root}/{name}.png", picture.getvalue())
    paths.write_text(f"{root}/{name}.txt", f"caption {name}\n\nsecond")
  items = captioned.read_folder(root)
  assert [i[0] for i in items] == [
    f"{root}/{n}.png" for n in ("a/1", "a/2", "b/3")
  ]
  assert items[2][1] == ["caption b/3", "second"]
  paths.write_text(
    f"{root}/info.jsonl",
    '{"image_file": "a/1.png", "captions": ["one"]}\n'
    '{"image_file": "b/3.png", "caption": "three"}\n',
  )
  items = captioned.read_manifest(f"{root}/info.jsonl")
  assert [i[0] for i in items] == [f"{root}/a/1.png", f"{root}/b/3.png"]
  from tim_jax.data import prepare

  images = prepare.CaptionedImages(items, 32)
  pixels, captions = images[1]
  assert pixels.ndim == 3 and captions == ["three"]
