"""Resumable work in numbered parts, shared among a job's processes.

Long jobs (encoding a dataset, generating 50,000 samples) are cut into
parts, each written as one ``.npz`` when it is done, so that a job killed
halfway resumes where it stopped. Process p of P does parts p, p + P, ...;
process 0 collects them once every process has passed the barrier.

    work = Parts(directory, "shard", sizes, process_index=0, process_count=1)
    for i in work.todo():          # this process's parts not yet on disk
      ...                          # (work.advance(n) after n items)
      work.save(i, arrays)         # atomic (written, then renamed)
    if work.finish(barrier):       # True on process 0, every part present
      ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import io
import json

import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError


class Parts:
  """``sizes[i]`` items in part i (the progress bar counts items).

  ``meta`` (JSON-able) describes the job; parts left by a job with other
  ``meta`` or sizes are refused (ValueError) rather than mixed in.
  """

  def __init__(
    self,
    directory: str,
    prefix: str,
    sizes: Sequence[int],
    *,
    meta: dict | None = None,
    process_index: int = 0,
    process_count: int = 1,
    desc: str = "",
    progress: bool = True,
  ):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
        f"need 0 <= process_index < process_count, got "
        f"{process_index} and {process_count}"
      )
    # A local folder or a bucket's (gs://...).
    self.directory, self.prefix = paths.absolute(directory), prefix
    self.sizes = list(sizes)
    self.process_index = process_index
    self.mine = [
      i for i in range(len(self.sizes)) if i % process_count == process_index
    ]
    self.desc, self.progress = desc, progress
    self._bar, self._advanced = None, 0
    paths.as_path(self.directory).mkdir(parents=True, exist_ok=True)
    self._check_meta(dict(meta or {}, sizes=self.sizes))

  def _check_meta(self, meta: dict):
    path = paths.as_path(self.directory) / f"{self.prefix}_job.json"
    if path.exists():
      old = json.loads(path.read_text())
      if old != json.loads(json.dumps(meta)):
        diff = sorted(
          k
          for k in set(old) | set(meta)
          if old.get(k) != json.loads(json.dumps(meta)).get(k)
        )
        raise UserError(
          f"{self.directory} holds parts of another job: its "
          f"{', '.join(diff)} differ from this run's (there: "
          f"{ {k: old.get(k) for k in diff} }). To start over, delete "
          f"{self.directory}; to keep it, write elsewhere"
        )
    elif self.process_index == 0:
      paths.write_text(path, json.dumps(meta, indent=1))

  def path(self, i: int) -> str:
    """The file of part ``i``."""
    return paths.join(self.directory, f"{self.prefix}_{i:07d}.npz")

  def done(self, i: int) -> bool:
    """Whether part ``i`` is complete on disk."""
    return paths.as_path(self.path(i)).exists()

  def todo(self) -> Iterator[int]:
    """This process's unfinished parts; the bar advances after each."""
    todo = [i for i in self.mine if not self.done(i)]
    bar = None
    if self.progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

      total = sum(self.sizes[i] for i in self.mine)
      bar = tqdm(
        total=total,
        unit="img",
        smoothing=0.1,
        initial=total - sum(self.sizes[i] for i in todo),
        desc=f"{self.desc} (process {self.process_index})",
      )
    self._bar = bar
    try:
      for i in todo:
        self._advanced = 0
        yield i
        if bar is not None:
          bar.update(self.sizes[i] - self._advanced)
    finally:
      self._bar = None
      if bar is not None:
        bar.close()

  def advance(self, n: int) -> None:
    """Counts ``n`` items of the current part as done (a finer bar)."""
    if self._bar is not None:
      self._bar.update(n)
      self._advanced += n

  def save(self, i: int, arrays: dict) -> None:
    """Writes part ``i`` atomically (a torn write never looks complete)."""
    # Not *.npz until complete: readers of the folder never see a torn part.
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(self.path(i), buf.getvalue())

  def finish(self, barrier: Callable[[str], None] | None = None) -> bool:
    """Waits for every process (``barrier``); on process 0 checks that all
    parts exist and returns True, elsewhere returns False."""
    if barrier is not None:
      barrier(f"tim_jax.core.resumable: {self.directory} written")
    if self.process_index != 0:
      return False
    missing = [i for i in range(len(self.sizes)) if not self.done(i)]
    if missing:
      raise UserError(
        f"parts {missing[:5]} of {self.directory} are "
        "missing; run the command again to finish them"
      )
    return True
