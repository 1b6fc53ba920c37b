"""tim_jax.core.host_memory: the training command runs again with glibc's
huge-page tunable, and XLA:CPU's large per-call buffers then fault in far
fewer pages."""

import os
import subprocess
import sys

import pytest

from tim_jax.core import host_memory

pytestmark = [pytest.mark.multiprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted call whose temporaries (a few 64 MiB arrays) exceed glibc's
# 32 MiB mmap threshold; prints the minor page faults of ten calls.
FAULTS = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x) + jnp.exp(x)))
x = jnp.ones((4096, 4096), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x + 1.0).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code, environ):
  env = dict(environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-1]


def test_the_tunable_is_added_once_and_kept_with_others():
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == (
    "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  )
  assert not host_memory.wanted(env)
  assert not host_memory.wanted({"TIM_JAX_HUGE_PAGES": "0"})
  if host_memory.glibc_version() and host_memory.glibc_version() >= (2, 35):
    assert host_memory.wanted({})


def test_the_process_runs_again_with_the_tunable():
  if not host_memory.wanted({}):
    pytest.skip("not a Linux glibc 2.35+: nothing to re-run for")
  code = (
    "import os, sys; from tim_jax.core import host_memory; "
    "host_memory.exec_with_huge_pages(); "
    "print(os.environ['GLIBC_TUNABLES'], sys.orig_argv[1])"
  )
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert run(code, env) == "glibc.malloc.hugetlb=1 -c"


def test_large_buffers_fault_in_fewer_pages():
  with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    thp = f.read()
  if "[never]" in thp or not host_memory.wanted({}):
    pytest.skip(f"no transparent huge pages to use here: {thp.strip()}")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  small_pages = int(run(FAULTS, env))
  huge_pages = int(run(FAULTS, host_memory.environment(env)))
  # 4 KiB pages: tens of thousands of faults a call; 2 MiB pages: few.
  assert small_pages > 10 * 16384
  assert huge_pages < small_pages / 5, (small_pages, huge_pages)
