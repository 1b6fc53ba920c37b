"""The package as users install it: a wheel, not this checkout."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A non-editable install of the project (no dependencies) in a folder."""
  tmp = tmp_path_factory.mktemp("wheel")
  # Built from a copy: setuptools writes build/ and *.egg-info beside
  # setup.py, and the checkout stays as it is.
  source = tmp / "source"
  source.mkdir()
  for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  for name in ("tim_jax", "configs"):
    shutil.copytree(
      os.path.join(ROOT, name),
      source / name,
      ignore=shutil.ignore_patterns("__pycache__"),
    )
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(tmp / "dist"),
      str(source),
    ],
    check=True,
    timeout=600,
    cwd=tmp,
  )
  wheel = [f for f in os.listdir(tmp / "dist") if f.endswith(".whl")]
  assert len(wheel) == 1, wheel
  target = tmp / "site"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "--no-deps",
      "-q",
      "--target",
      str(target),
      str(tmp / "dist" / wheel[0]),
    ],
    check=True,
    timeout=600,
    cwd=tmp,
  )
  return target


def _python(installed, code, cwd):
  env = dict(os.environ, PYTHONPATH=str(installed))
  return subprocess.run(
    [sys.executable, "-c", code],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_the_wheel_carries_configs_weights_and_types(installed):
  package = installed / "tim_jax"
  assert (package / "configs" / "c2i.py").is_file()
  assert (package / "configs" / "t2i.py").is_file()
  assert (package / "shapes" / "oracle.safetensors").is_file()
  assert (package / "py.typed").is_file()
  # The GPU cards' target configs (tim_jax.commands.compile --topology=h100x8).
  for card in ("h100_sxm", "h200", "a100_sxm_80"):
    assert (package / "commands" / "gpu_targets" / f"{card}.txtpb").is_file()


def test_documented_configs_load_from_any_folder(installed, tmp_path):
  done = _python(
    installed,
    (
      "import tim_jax; from tim_jax.config import config_base; "
      "c = config_base.load_file('configs/c2i.py:xl2_256,mg'); "
      "print(tim_jax.__file__, c.model.network.depth, c.loss.w_cond)"
    ),
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  path, depth, w_cond = done.stdout.split()
  assert path.startswith(str(installed))  # Not this checkout.
  assert (int(depth), float(w_cond)) == (28, 0.75)


def test_console_scripts_run(installed, tmp_path):
  script = installed / "bin" / "tim-sample"
  assert script.is_file()
  env = dict(os.environ, PYTHONPATH=str(installed))
  done = subprocess.run(
    [str(script), "--num_steps=0", "--checkpoint=x"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  # The installed command parsed its flags and refused in one line.
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.startswith("error: flag --num_steps=0")
