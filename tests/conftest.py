import os
import sys

import jax
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
