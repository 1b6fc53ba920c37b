"""Sampling: the library (tim_jax.inference) and the command
(tim_jax.commands.sample)."""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import train_utils

from tim_jax import inference
from tim_jax.commands import cli
from tim_jax.commands import sample as sample_command
from tim_jax.weights import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tiny_t2i_workdir):
  return tiny_t2i_workdir


@pytest.fixture(scope="module")
def loaded(workdir):
  return inference.load(workdir)


def test_resolve_accepts_workdir_checkpoints_and_step_dirs(workdir):
  a = inference.resolve(workdir)
  b = inference.resolve(os.path.join(workdir, "checkpoints"))
  c = inference.resolve(os.path.join(workdir, "checkpoints", "2"))
  assert a == b == c
  assert a.format == "tim_jax" and a.step == 2


def test_resolve_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    inference.resolve(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no tim_jax checkpoint"):
    inference.resolve(str(tmp_path))
  bad = tmp_path / "weights.txt"
  bad.write_text("x")
  with pytest.raises(ValueError, match="not an official checkpoint"):
    inference.resolve(str(bad))


def test_one_call_from_prompts_to_pictures(loaded):
  from tim_jax.core import images

  prompts = ["a red circle at the top left", "a blue square in the center"]
  pictures = loaded(prompts, num_steps=2, num_per_prompt=2, seed=3)
  assert pictures.shape == (4, 32, 32, 3) and pictures.dtype == np.uint8
  cond, _ = loaded.conditions(prompts)
  x = loaded.generate(cond, num_steps=2, num=2, seed=3)
  np.testing.assert_array_equal(
    pictures, images.to_uint8(loaded.decode(x), loaded.kind)
  )
  wide = loaded(prompts[:1], num_steps=1, height=32, width=48)
  assert wide.shape == (1, 32, 48, 3)
  with pytest.raises(ValueError, match="vocabulary|know|word"):
    loaded(["a zebra"], num_steps=1)


def test_config_comes_from_the_checkpoint(loaded):
  config = loaded.config
  want = train_utils.tiny_t2i()
  assert config.model.network.to_dict() == want.model.network.to_dict()
  assert config.sample.cfg_scale == 2.0
  assert tuple(config.sample.prompts) == tuple(want.sample.prompts)


def test_loads_the_ema_weights(workdir, loaded):
  params = loaded.params
  from tim_jax import training
  from tim_jax.data import kinds
  from tim_jax.weights import checkpoint

  trainer = training.Trainer(loaded.config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  it = kinds.iterator(trainer.config, kinds.source(trainer.config))
  state = ckpt.restore(2, trainer.abstract_with_shardings(), it)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And not the raw parameters (EMA differs after 2 steps).
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params))
  )
  # weights="params" reads those instead.
  raw = inference.load(workdir, weights="params").params
  for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="weights must be one of"):
    inference.load(workdir, weights="opt_state")


def test_generate_is_independent_of_batch_size(loaded):
  cond, names = loaded.conditions(
    ["a red circle at the top left", "a blue square in the center"]
  )
  assert names == [
    "a red circle at the top left",
    "a blue square in the center",
  ]
  a = loaded.generate(cond, num_steps=2, num=3, batch_size=6)
  b = loaded.generate(cond, num_steps=2, num=3, batch_size=4)
  assert a.shape == (6, 32, 32, 3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Different seeds, different images; rows share nothing by accident.
  c = loaded.generate(cond, num_steps=2, num=3, batch_size=6, seed=1)
  assert np.abs(a - c).mean() > 0.1
  assert np.abs(a[0] - a[1]).mean() > 0.1


def test_bad_input_is_refused_clearly(loaded):
  with pytest.raises(ValueError, match="class-conditional models"):
    loaded.conditions(labels=[1])
  with pytest.raises(ValueError, match="never saw.*'dog'"):
    loaded.conditions(["a red dog at the top"])
  cond, _ = loaded.conditions(["a red circle at the top left"])
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    loaded.generate(cond, num_steps=0)
  with pytest.raises(ValueError, match="guidance_interval"):
    loaded.generate(cond, num_steps=1, guidance_interval=(0.8, 0.2))


def test_checkpoint_of_another_architecture_is_refused(workdir):
  other = train_utils.tiny_t2i()
  other.model.network.hidden_size = 64
  with pytest.raises(ValueError, match="does not fit this config.*hidden_size"):
    inference.load(workdir, other)


def test_prompt_on_a_class_model_is_refused(tmp_path):
  pipe = inference.Pipeline(train_utils.tiny_c2i())
  with pytest.raises(ValueError, match="class-conditional model: use --labels"):
    pipe.conditions(prompts=["a red circle at the top"])
  with pytest.raises(ValueError, match=r"labels must be in \[0, 18\)"):
    pipe.conditions(labels=[18])
  with pytest.raises(ValueError, match=r"labels must be in \[0, 18\)"):
    pipe.conditions(labels=[-1])
  cond, names = pipe.conditions(labels=[0, 5])
  from tim_jax.shapes import world

  assert names == ["0: " + world.label_name(0), "5: " + world.label_name(5)]
  assert names[0] == "0: red circle"


def test_official_checkpoint_samples_like_the_tim_jax_one(tmp_path, loaded):
  path = str(tmp_path / "official.safetensors")
  convert.save_official(loaded.model(), path)
  official = inference.load(path, loaded.config)
  cond, _ = loaded.conditions(["a green triangle at the bottom"])
  a = loaded.generate(cond, num_steps=2)
  b = official.generate(cond, num_steps=2)
  np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="needs a config"):
    inference.load(path)
  with pytest.raises(ValueError, match="holds one set of weights"):
    inference.load(path, loaded.config, weights="params")
  other = train_utils.tiny_t2i()
  other.model.network.depth = 2
  with pytest.raises(ValueError, match="lacks"):
    inference.load(path, other)


def test_progress_follows_every_step(loaded):
  cond, _ = loaded.conditions(["a red circle at the top left"])
  seen = []
  from tim_jax.method import sampling

  noise = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  out = sampling.sample(
    loaded.network(),
    noise,
    cond,
    loaded.null_like(cond),
    transport=loaded.transport,
    num_steps=3,
    progress=lambda i: seen.append(int(i)),
  )
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert sorted(seen) == [0, 1, 2]


def test_command_writes_the_grid(workdir, tmp_path, capsys):
  out = tmp_path / "grid.png"
  latents = tmp_path / "x.npy"
  argv = [
    f"--checkpoint={workdir}",
    "--prompt=a red circle at the top left",
    "--prompt=a blue square in the center",
    "--num_steps=2",
    "--num_per_prompt=3",
    "--cfg_scale=1.5",
    "--guidance_interval=0.1,0.9",
    f"--out={out}",
    f"--latents_out={latents}",
  ]
  assert cli.call(sample_command, argv) == 0
  done = capsys.readouterr()
  assert "wrote" in done.out and "row 1: a blue square" in done.out
  assert "sampling" in done.err  # The progress bar.
  # 2 rows (one per prompt) x 3 columns of 32 px enlarged 4x to 128 px,
  # 4 px gaps, the prompts in a 220 px column on the left, a title on top.
  labelled = np.asarray(Image.open(out))
  assert labelled.shape[1] == 220 + 3 * 132 + 4
  assert labelled.shape[0] > 2 * 132 + 4
  assert (labelled[-(2 * 132 + 4) :, :220] < 128).any()  # The prompts.
  assert (
    cli.call(
      sample_command, argv + ["--raw_size", f"--out={tmp_path / 'raw.png'}"]
    )
    == 0
  )
  # --raw_size: 2 rows x 3 columns of 32 px with 1 px gaps.
  assert Image.open(tmp_path / "raw.png").size == (3 * 33 + 1, 2 * 33 + 1)
  assert np.load(latents).shape == (6, 32, 32, 3)


def test_the_command_runs_as_a_program(workdir, tmp_path):
  # The process entry point: absl's app, the exit status, one-line errors.
  cmd = [
    sys.executable,
    "-m",
    "tim_jax.commands.sample",
    f"--checkpoint={workdir}",
    "--prompt=a red circle at the top left",
    "--num_steps=1",
    f"--out={tmp_path / 'one.png'}",
  ]
  done = subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "one.png").exists()
  bad = subprocess.run(
    cmd + ["--num_steps=0"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2
  assert bad.stderr.startswith("error: flag --num_steps=0")
  assert "Traceback" not in bad.stderr


def test_inference_builds_no_trainer_or_optimizer(workdir):
  # In a fresh process: loading and sampling import nothing of training
  # (optax itself comes with flax.nnx, so the trainer's modules are named).
  script = (
    "import sys; from tim_jax import inference; "
    "from tim_jax.commands import sample; "
    f"p = inference.load({workdir!r}); "
    "c, _ = p.conditions(['a red circle at the top left']); "
    "p.generate(c, num_steps=1); "
    "bad = [m for m in ('tim_jax.training', 'tim_jax.training.optim') "
    "if m in sys.modules]; print('imported', bad)"
  )
  done = subprocess.run(
    [sys.executable, "-c", script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "imported []" in done.stdout


def test_progress_hooks_of_concurrent_callers_stay_apart(loaded):
  import threading

  cond, _ = loaded.conditions(["a red circle at the top left"] * 2)
  noise = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  seen = {"a": [], "b": []}
  loaded.sample(noise, cond, num_steps=5, progress=lambda i: None)  # Compile.
  settings = loaded.settings(5, with_progress=True)
  platform = jax.devices()[0].platform  # Where sample's calls run.
  compiled = loaded.compiled_sampler(settings, platform)

  def call(name):
    for _ in range(3):
      loaded.sample(
        noise, cond, num_steps=5, progress=lambda i: seen[name].append(i)
      )

  threads = [threading.Thread(target=call, args=(n,)) for n in seen]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Each caller saw exactly its own three runs of five steps.
  assert sorted(seen["a"]) == sorted(seen["b"]) == sorted(list(range(5)) * 3)
  # One compiled sampler served every hook: no recompilation per call.
  assert loaded.compiled_sampler(settings, platform) is compiled
  # jax keeps no public compile count; the count is what is under test.
  assert compiled._cache_size() == 1  # pylint: disable=protected-access


def test_any_size_the_patch_and_autoencoder_allow(tiny_t2i_workdir):
  pipe = inference.load(tiny_t2i_workdir)
  assert pipe.downsample == 1  # Pixel space.
  assert pipe.network_size(32, 48) == (32, 48)
  with pytest.raises(ValueError, match="multiples of 8"):
    pipe.network_size(32, 44)
  cond, _ = pipe.conditions(["a red circle at the top left"])
  x = pipe.generate(cond, num_steps=1, height=32, width=48)
  assert x.shape == (1, 32, 48, 3) and np.isfinite(x).all()


@pytest.mark.parametrize(
  "flag",
  [
    "--batch_size=0",
    "--num_per_prompt=0",
    "--cols=-3",
    "--cfg_scale=-1",
    "--cfg_scale=0.5",
    "--height=-32",
    "--num_steps=0",
    "--stochasticity=-1",
    "--guidance_interval=0.1",
    "--guidance_interval=a,b",
    "--labels=x",
  ],
)
def test_sampler_flags_are_checked_before_loading(flag, tmp_path, capsys):
  # The checkpoint does not exist: the flag is refused before any loading.
  argv = ["--checkpoint=/nowhere", "--labels=1", f"--out={tmp_path / 'a.png'}"]
  assert cli.call(sample_command, argv + [flag]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and flag.split("=")[0] in err, err
  assert len(err.strip().splitlines()) == 1


def test_unwritable_outputs_fail_before_sampling(tmp_path, workdir, capsys):
  blocker = tmp_path / "file.txt"
  blocker.write_text("a file, not a folder")
  argv = [
    f"--checkpoint={workdir}",
    "--prompt=a red circle at the top left",
    "--num_steps=2",
  ]
  for extra, message in [
    ([f"--out={blocker / 'grid.png'}"], "cannot write --out"),
    (
      [f"--out={tmp_path / 'g.png'}", f"--latents_out={blocker / 'x.npy'}"],
      "cannot write --latents_out",
    ),
    ([f"--out={tmp_path}"], "is a directory"),
  ]:
    assert cli.call(sample_command, argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "sampling" not in err  # Stopped before any sampling.


def test_generate_draws_noise_batch_by_batch(loaded, monkeypatch):
  # 100k images must not allocate 100k noises before the first step.
  cond, _ = loaded.conditions(["a red circle at the top left"])
  seen = []

  class Stop(Exception):
    pass

  def first_call(noise, *a, **k):
    seen.append(noise.shape)
    seen.append(max(x.size for x in jax.live_arrays()))
    raise Stop

  monkeypatch.setattr(loaded, "sample", first_call)
  with pytest.raises(Stop):
    loaded.generate(cond, num_steps=1, num=100_000, batch_size=4)
  shape, largest = seen
  assert shape == (4, 32, 32, 3)
  assert largest < 1000 * 4 * 32 * 32 * 3, largest


def test_non_finite_samples_fail(loaded):
  cond, _ = loaded.conditions(["a red circle at the top left"])
  nan = jax.tree.map(lambda a: a * np.nan, loaded.params)
  with pytest.raises(
    inference.NonFiniteSamplesError, match="1 of the 1 samples"
  ):
    loaded.generate(cond, num_steps=2, params=nan)
  with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
    loaded.generate(cond, num_steps=2, cfg_scale=-1.0)


def test_a_prompt_longer_than_the_model_reads_is_said_cut(loaded, caplog):
  words = " and ".join(["a red circle at the top left"] * 4)
  with caplog.at_level("WARNING"):
    loaded.conditions([words])
  assert any("is cut off" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level("WARNING"):
    loaded.conditions(["a red circle at the top left"])
  assert not any("cut off" in r.getMessage() for r in caplog.records)


def test_output_suffixes_are_honoured_or_refused(workdir, tmp_path, capsys):
  # --out=x.jpg used to hold PNG bytes; --latents_out=x.bin wrote x.bin.npy.
  argv = [
    f"--checkpoint={workdir}",
    "--prompt=a red circle at the top left",
    "--num_steps=1",
  ]
  assert cli.call(sample_command, argv + [f"--out={tmp_path / 'a.jpg'}"]) == 0
  assert Image.open(tmp_path / "a.jpg").format == "JPEG"
  for bad, message in [
    (f"--out={tmp_path / 'a.gif'}", "by its suffix"),
    (f"--latents_out={tmp_path / 'x.bin'}", "ending in .npy"),
  ]:
    capsys.readouterr()
    out = [] if bad.startswith("--out") else [f"--out={tmp_path / 'b.png'}"]
    assert cli.call(sample_command, argv + out + [bad]) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "x.bin.npy").exists()
