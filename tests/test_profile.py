"""Profiling steps and the persistent compilation cache of training runs."""

import glob
import os
import subprocess
import sys

import pytest

from tim_jax.training import loop

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, *overrides, env_extra=None):
  """``python -m tim_jax.main`` on the smoke c2i config; returns stderr."""
  env = dict(os.environ)
  # The run's own cache (its workdir's), not the test suite's.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # JAX says at debug level which programs the cache held.
  env["JAX_DEBUG_LOG_MODULES"] = "jax._src.compilation_cache,jax._src.compiler"
  env.update(env_extra or {})
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tim_jax.main",
      f"--config={ROOT}/configs/c2i.py:tiny,smoke",
      f"--workdir={workdir}",
      "--config.sample.every=0",
      *overrides,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def is_step_hit(line):
  return "cache hit for 'jit_step'" in line  # The trainer's jitted step.


def test_profile_and_a_relaunch_that_compiles_nothing_new(tmp_path):
  workdir = tmp_path / "run"
  first = train(
    workdir,
    "--config.num_steps=3",
    "--config.profile.first_step=2",
    "--config.profile.num_steps=1",
  )
  # The trace, where TensorBoard's profile plugin looks for it.
  traces = glob.glob(str(workdir / "plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, first
  assert "profiling steps 2-2" in first
  cache = workdir / "compilation_cache"
  assert any(cache.iterdir()), "nothing was written to the cache"
  assert not [ln for ln in first.splitlines() if is_step_hit(ln)]
  assert "CACHE MISS for 'jit_step'" in first
  # Resumed with more steps: the train step comes from the cache.
  second = train(workdir, "--config.num_steps=5")
  assert [ln for ln in second.splitlines() if is_step_hit(ln)], second[-3000:]
  assert not glob.glob(str(workdir / "plugins/profile/*/*.xplane.pb"))[1:]


def test_cache_location_follows_the_config(tmp_path, monkeypatch):
  make = lambda v: {"compilation_cache_dir": v}
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert loop.compilation_cache_dir(make(""), "w") == os.path.join(
    "w", "compilation_cache"
  )
  assert loop.compilation_cache_dir(make("none"), "w") is None
  assert loop.compilation_cache_dir(make("gs://b/c"), "w") == "gs://b/c"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/cache")
  assert loop.compilation_cache_dir(make(""), "w") == "/shared/cache"
