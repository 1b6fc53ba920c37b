"""The sampling command and its library form (tim_jax.sample)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import train_utils
from tim_jax import convert, sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tiny_t2i_workdir):
  return tiny_t2i_workdir


@pytest.fixture(scope="module")
def loaded(workdir):
  return sample.load(None, workdir)


def test_resolve_accepts_workdir_checkpoints_and_step_dirs(workdir):
  a = sample.resolve(workdir)
  b = sample.resolve(os.path.join(workdir, "checkpoints"))
  c = sample.resolve(os.path.join(workdir, "checkpoints", "2"))
  assert a == b == c
  assert a.kind == "tim_jax" and a.step == 2


def test_resolve_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    sample.resolve(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no tim_jax checkpoint"):
    sample.resolve(str(tmp_path))
  bad = tmp_path / "weights.txt"
  bad.write_text("x")
  with pytest.raises(ValueError, match="not an official checkpoint"):
    sample.resolve(str(bad))


def test_config_comes_from_the_checkpoint(loaded):
  _, _, config = loaded
  want = train_utils.tiny_t2i()
  assert config.model.network.to_dict() == want.model.network.to_dict()
  assert config.sample.cfg_scale == 2.0
  assert tuple(config.sample.prompts) == tuple(want.sample.prompts)


def test_loads_the_ema_weights(workdir, loaded):
  trainer, params, _ = loaded
  from tim_jax import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every=1)
  it = train.make_data_iterator(trainer.config, train.make_source(
      trainer.config))
  state = ckpt.restore(2, trainer.abstract_with_shardings(), it)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And not the raw parameters (EMA differs after 2 steps).
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(state.params)))


def test_generate_is_independent_of_batch_size(loaded):
  trainer, params, _ = loaded
  cond, names = sample.conditions(trainer, ["a red circle at the top left",
                                            "a blue square in the center"])
  assert names == ["a red circle at the top left",
                   "a blue square in the center"]
  a = sample.generate(trainer, params, cond, num_steps=2, num=3,
                      batch_size=6)
  b = sample.generate(trainer, params, cond, num_steps=2, num=3,
                      batch_size=4)
  assert a.shape == (6, 32, 32, 3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Different seeds, different images; rows share nothing by accident.
  c = sample.generate(trainer, params, cond, num_steps=2, num=3,
                      batch_size=6, seed=1)
  assert np.abs(a - c).mean() > 0.1
  assert np.abs(a[0] - a[1]).mean() > 0.1


def test_bad_input_is_refused_clearly(loaded):
  trainer, params, _ = loaded
  with pytest.raises(ValueError, match="class-conditional models"):
    sample.conditions(trainer, labels=[1])
  with pytest.raises(ValueError, match="never saw.*'dog'"):
    sample.conditions(trainer, ["a red dog at the top"])
  cond, _ = sample.conditions(trainer, ["a red circle at the top left"])
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    sample.generate(trainer, params, cond, num_steps=0)
  with pytest.raises(ValueError, match="guidance interval"):
    sample.generate(trainer, params, cond, num_steps=1,
                    guidance_interval=(0.8, 0.2))


def test_checkpoint_of_another_architecture_is_refused(workdir):
  other = train_utils.tiny_t2i()
  other.model.network.hidden_size = 64
  with pytest.raises(ValueError, match="does not fit this config.*"
                     "hidden_size"):
    sample.load(other, workdir)


def test_prompt_on_a_class_model_is_refused(tmp_path):
  c = train_utils.tiny_c2i()
  trainer = train.Trainer(c, mesh=sample._single_device_mesh())
  with pytest.raises(ValueError, match="class-conditional model: use "
                     "--labels"):
    sample.conditions(trainer, prompts=["a red circle at the top"])
  with pytest.raises(ValueError, match=r"labels must be in \[0, 18\)"):
    sample.conditions(trainer, labels=[18])
  cond, names = sample.conditions(trainer, labels=[0, 5])
  assert names == ["0", "5"]


def test_official_checkpoint_samples_like_the_tim_jax_one(tmp_path, loaded):
  trainer, params, config = loaded
  path = str(tmp_path / "official.safetensors")
  convert.save_official(trainer.model(params), path)
  trainer2, params2, _ = sample.load(config, path)
  cond, _ = sample.conditions(trainer, ["a green triangle at the bottom"])
  a = sample.generate(trainer, params, cond, num_steps=2)
  b = sample.generate(trainer2, params2, cond, num_steps=2)
  np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="needs --config"):
    sample.load(None, path)
  other = train_utils.tiny_t2i()
  other.model.network.depth = 2
  with pytest.raises(ValueError, match="lacks"):
    sample.load(other, path)


def test_progress_follows_every_step(loaded):
  trainer, params, _ = loaded
  cond, _ = sample.conditions(trainer, ["a red circle at the top left"])
  seen = []
  from tim_jax import sampling
  noise = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  out = sampling.sample(trainer.network(params), noise, cond,
                        trainer.conditioner.null(1),
                        transport=trainer.transport, num_steps=3,
                        progress=lambda i: seen.append(int(i)))
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert sorted(seen) == [0, 1, 2]


def test_command_writes_the_grid(workdir, tmp_path):
  out = tmp_path / "grid.png"
  latents = tmp_path / "x.npy"
  cmd = [sys.executable, "-m", "tim_jax.sample", f"--checkpoint={workdir}",
         "--prompt=a red circle at the top left",
         "--prompt=a blue square in the center", "--steps=2", "--num=3",
         "--cfg=1.5", "--guidance-interval=0.1,0.9", f"--out={out}",
         f"--latents_out={latents}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote" in done.stdout and "row 1: a blue square" in done.stdout
  assert "sampling" in done.stderr  # The progress bar.
  # 2 rows x 3 columns of 32 px with 1 px gaps.
  assert Image.open(out).size == (3 * 33 + 1, 2 * 33 + 1)
  assert np.load(latents).shape == (6, 32, 32, 3)
  bad = subprocess.run(cmd[:4] + ["--steps=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--steps must be >= 1" in bad.stderr
