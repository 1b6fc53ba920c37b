import os
import sys

# libtpu (for tim_jax.compile's TPU compiler) takes a host-wide lock file
# when it loads; test processes (xdist workers, subprocesses) share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def x64():
  """float64 for one test; the global flag is restored afterwards."""
  before = jax.config.read("jax_enable_x64")
  with jax.enable_x64(True):
    assert jax.config.read("jax_enable_x64")
    yield
  assert jax.config.read("jax_enable_x64") == before


@pytest.fixture(scope="session")
def tiny_t2i_workdir(tmp_path_factory):
  """A workdir holding a 2-step run of train_utils.tiny_t2i."""
  import train_utils
  from tim_jax import train
  path = str(tmp_path_factory.mktemp("tiny_t2i_run"))
  train.train_and_evaluate(train_utils.tiny_t2i(), path)
  return path
