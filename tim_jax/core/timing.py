"""Helpers of the benchmark commands: wall-clock timing, config files."""

from __future__ import annotations

from collections.abc import Callable
import statistics
import time


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall seconds of ``fn()`` over ``repeats`` calls after one
  warm-up (compile) call; ``fn`` must wait for its result."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def read_config_json(path: str) -> tuple:
  """(path of the file, its dict) of a ``config.json`` or a directory
  holding one (the benchmarks' ``--config``)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  with open(path, encoding="utf-8") as f:
    return path, json.load(f)
