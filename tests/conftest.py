import os
import sys
import tempfile

# libtpu (for tim_jax.commands.compile's TPU compiler) takes a host-wide
# lock file when it loads; test processes (xdist workers, subprocesses)
# share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The suite runs on the CPU: no process tries to start a TPU runtime (the
# TPU compiler still compiles for topologies: tests/test_compile.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for every test process and the commands
# they start: the same small steps compile once per suite, not once per
# test. Entries are keyed by the program and the JAX version.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), "tim_jax_test_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# XLA:CPU compiles faster with LLVM's passes at level 0 and with its
# classic elemental emitters instead of the fusion emitters: the tiny test
# programs compile in about a third of the time (the suite is mostly
# compiles). Results differ from the default settings by float rounding, as
# after any compiler change (three Adam steps of a tiny run: 2e-4 of a
# parameter's scale, as with level 0 alone); the suite compares runs made
# under the same settings, or to a tolerance.
_FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
)
for _flag in _FAST_COMPILE:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _flag
    ).strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

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

  from tim_jax import training

  path = str(tmp_path_factory.mktemp("tiny_t2i_run"))
  training.train_and_evaluate(train_utils.tiny_t2i(), path)
  return path


@pytest.fixture(scope="module")
def model_hub(tmp_path_factory):
  """A loopback Hub serving the released repositories' layout (small
  weights), as tests/hub_repos.py makes them."""
  import hub_repos
  import hub_server

  h = hub_repos.make_hub(str(tmp_path_factory.mktemp("hub_repos")))
  with hub_server.serve(h) as url:
    h.url = url
    yield h


def pytest_collection_modifyitems(items):
  """Slow tests first: under -n, a long test started last would leave the
  other workers idle at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
