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


def of_files(paths: Iterable[str]) -> str:
  """A fingerprint of files: their names, sizes and modification times (a
  changed or replaced file changes it without reading any content)."""
  digest = hashlib.sha256()
  for path in paths:
    st = os.stat(path)
    digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]
