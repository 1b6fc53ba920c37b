"""Short fingerprints of what defines a resumable job: weights and files.

A resumed ``prepare`` or ``generate`` compares them with the ones its
parts were written with, so a job never mixes two autoencoders', two
checkpoints' or two input listings' results in one output.
"""

from __future__ import annotations

from collections.abc import Iterable
import hashlib
import os
from typing import Any

import numpy as np

from tim_jax.core import paths


def of_arrays(tree: Any) -> str:
  """A fingerprint of a pytree of arrays: every leaf's path, shape, dtype,
  sum and sum of squares (float64, on the host): different weights differ
  in it, the same weights always agree."""
  import jax  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
    if a.dtype.kind in "fiub" or a.dtype.name == "bfloat16":
      x = a.astype(np.float64)
      digest.update(np.asarray([x.sum(), (x * x).sum()]).tobytes())
  return digest.hexdigest()[:16]


def of_files(paths_: Iterable[str]) -> str:
  """A fingerprint of files: their names, sizes and modification times (a
  changed or replaced file changes it without reading any content)."""
  return of_listing((p, *_stat(p)) for p in paths_)


def of_listing(entries: Iterable[tuple[str, int, float | int]]) -> str:
  """``of_files`` from (path, size, modification time) already listed (a
  bucket lists them for many files at once)."""
  digest = hashlib.sha256()
  for path, size, mtime in entries:
    digest.update(f"{path}\0{size}\0{mtime}\n".encode())
  return digest.hexdigest()[:16]


def _stat(path: str) -> tuple[int, float | int]:
  if paths.is_remote(path):
    st = paths.as_path(path).stat()
    return st.length, st.mtime
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns
