"""Transparent huge pages for XLA:CPU's per-call buffers.

XLA:CPU takes a compiled step's temporaries as one block per call (178 MB
for the default run's train step) from glibc's malloc, which serves a block
above 32 MiB with a fresh ``mmap`` and unmaps it when freed: every step
faulted every page in again (46,000 minor faults a step, 31 % of the
default run's CPU time in the kernel). glibc 2.35 and later advise
transparent huge pages for such blocks under
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: 2 MiB a fault instead of 4 KiB.
glibc reads its tunables only when a process starts, so a command that wants
them runs itself again, first thing, with the tunable set
(``exec_with_huge_pages``). ``TIM_JAX_HUGE_PAGES=0`` turns this off.
Measurements: docs/benchmarks.md (a quiet CPU loop).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OFF_SWITCH = "TIM_JAX_HUGE_PAGES"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (another C library)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def wanted(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process should run again with the tunable: a Linux glibc
  that knows it (2.35+), not set already, not switched off."""
  environ = os.environ if environ is None else environ
  version = glibc_version()
  return (
    sys.platform.startswith("linux")
    and version is not None
    and version >= (2, 35)
    and environ.get(OFF_SWITCH, "1") != "0"
    and TUNABLE not in environ.get("GLIBC_TUNABLES", "")
  )


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """``environ`` with the tunable added to any GLIBC_TUNABLES already set."""
  environ = dict(os.environ if environ is None else environ)
  given = environ.get("GLIBC_TUNABLES", "")
  environ["GLIBC_TUNABLES"] = f"{given}:{SETTING}" if given else SETTING
  return environ


def exec_with_huge_pages() -> None:
  """Replaces this process with the same command line (interpreter options
  included) and the tunable set; returns at once where it is not wanted.
  Call it before any work: nothing of this process survives."""
  if not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment())
