"""One writer per output directory: a lock file that names its holder.

A trainer's workdir, ``prepare``'s data directory and ``generate``'s parts
folder each hold a ``.tim_jax.lock`` while a job writes there. The file is
created atomically (``O_CREAT | O_EXCL``, which local disks and NFS honour;
in a bucket, an object written only if none exists) and says who holds it: host, process id, start time and job. A second job
on the same directory stops at once with those details.

A crashed holder does not block the directory for ever. The lock is stale,
and the next job takes it over, when

* its holder ran on this host and that process no longer exists, or
* its heartbeat is older than ``STALE_SECONDS``: the holder rewrites the
  file's modification time every ``HEARTBEAT_SECONDS`` from a background
  thread, so a lock of a holder on another host that stopped (a lost VM)
  expires after ten minutes.

In a multi-process job only process 0 takes the lock; every process then
learns its outcome from ``agree`` (a broadcast from process 0), so all of
them stop together and none waits on the others.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import logging
import os
import socket
import threading
import time

from tim_jax.core import paths
from tim_jax.core.errors import UserError

LOCK_NAME = ".tim_jax.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: it exists.
    return True
  return True


def read_holder(path: str) -> dict | None:
  """The holder recorded in a lock file (None if unreadable or torn)."""
  try:
    return json.loads(paths.as_path(path).read_text())
  except (OSError, ValueError):
    return None


def is_stale(path: str, holder: dict | None, now: float | None = None) -> bool:
  """Whether a lock may be taken over (see the module's rule)."""
  now = time.time() if now is None else now
  try:
    beat = paths.mtime(path)
  except OSError:
    return True  # Gone meanwhile.
  if now - beat > STALE_SECONDS:
    return True
  if holder and holder.get("host") == socket.gethostname():
    return not _alive(int(holder.get("pid", -1)))
  return False


class WorkdirLock:
  """The lock of ``directory`` for a job described by ``what``."""

  def __init__(self, directory: str, what: str):
    self.directory = paths.absolute(directory)
    self.path = paths.join(self.directory, LOCK_NAME)
    self.what = what
    self.record = dict(
      host=socket.gethostname(),
      pid=os.getpid(),
      started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      job=what,
    )
    self._stop = threading.Event()
    self._thread = None

  def _create(self) -> bool:
    return paths.create_exclusive(
      self.path, json.dumps(self.record).encode("utf-8")
    )

  def _create_or_explain(self) -> bool:
    if not paths.is_remote(self.path):
      return self._create()
    try:
      return self._create()
    except Exception as e:  # pylint: disable=broad-except
      # The bucket's client names only the request URL (a missing bucket
      # is a FileNotFoundError of the upload URL).
      raise UserError(
        f"cannot write {self.path} ({type(e).__name__}: {e}): does the "
        "bucket exist, and may these credentials write to it?"
      ) from None

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises UserError naming the holder."""
    paths.as_path(self.directory).mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      if self._create_or_explain():
        self._start_heartbeat()
        return self
      holder = read_holder(self.path)
      if not is_stale(self.path, holder):
        break
      # Take over a stale lock (another job may be doing the same).
      paths.remove(self.path)
    holder = read_holder(self.path) or {}
    raise UserError(
      f"{self.directory} is in use by another {holder.get('job', 'job')} "
      f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
      f"started {holder.get('started', '?')}): one {self.what} per "
      f"directory. Wait for it to end; if it crashed on another host, "
      f"delete {self.path} (it also expires {STALE_SECONDS / 60:.0f} "
      "minutes after its last heartbeat)"
    )

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(HEARTBEAT_SECONDS):
        if not paths.is_remote(self.path):
          try:
            os.utime(self.path)
          except OSError:
            return
          continue
        # An object's time changes only when it is written again.
        try:
          if not self._mine(read_holder(self.path)):
            return  # Taken over (or deleted): not ours to renew.
          paths.as_path(self.path).write_text(json.dumps(self.record))
        except Exception as e:  # pylint: disable=broad-except
          # The bucket's client raises its own errors; try at the next beat.
          logging.warning("cannot renew the lock %s: %s", self.path, e)

    self._thread = threading.Thread(target=beat, daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Removes the lock if it is still this job's."""
    self._stop.set()
    if self._mine(read_holder(self.path)):
      paths.remove(self.path)

  def _mine(self, holder: dict | None) -> bool:
    return bool(holder) and all(
      holder.get(k) == self.record[k] for k in ("host", "pid", "started")
    )

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc: object) -> None:
    self.release()


def acquire(
  directory: str,
  what: str,
  process_index: int = 0,
  agree: Callable[[bool], bool] | None = None,
) -> WorkdirLock | None:
  """The job's lock: process 0 takes it, and with ``agree`` (a broadcast of
  process 0's outcome) every process raises if it could not. Returns the
  lock on process 0 (to ``release`` at the end), None elsewhere."""
  lock, error = None, None
  if process_index == 0:
    try:
      lock = WorkdirLock(directory, what).acquire()
    except UserError as e:
      error = e
  if agree is not None and not agree(error is None):
    raise error or UserError(
      f"{directory} is in use by another job (process 0 could not lock it)"
    )
  if error is not None:
    raise error
  return lock
