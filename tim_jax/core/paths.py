"""Every path a user gives, local or in a bucket, through one abstraction.

A user's path may be a local path or a URL of any scheme ``etils.epath``
reads (``gs://bucket/run`` above all; orbax, tfds and grain read them
alike). Code that touches user paths goes through this module and
``epath.Path`` rather than ``os.path`` and ``open``:

    out = paths.as_path(flag_value)         # epath.Path; local ones absolute
    (out / "samples").mkdir(parents=True, exist_ok=True)
    paths.write_bytes(out / "grid.png", data)   # whole or not at all
    local = paths.local_copy(weights_dir)   # for readers of local files only

Cloud Storage is read and written by gcsfs (``EPATH_USE_TF=false`` below):
epath's other backend, TensorFlow's GCS filesystem, cannot create an object
only if it is absent (the workdir lock needs that) and has no endpoint
setting (the tests reach it only through a proxy). The listing cache of
gcsfs is off: several hosts write one bucket, and a cached listing would
hide their files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

# Before any gs:// path is used: epath picks its backend once per process.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

PathLike = str | os.PathLike

# Where remote weight files are copied for readers that need a local file.
CACHE_ENV = "TIM_JAX_CACHE"


def _configure_gcsfs() -> None:
  import fsspec  # pylint: disable=g-import-not-at-top

  fsspec.config.conf.setdefault("gcs", {}).setdefault(
    "use_listings_cache", False
  )


_configure_gcsfs()


def is_remote(path: PathLike) -> bool:
  """Whether ``path`` is a URL (``gs://...``), not a local path."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def absolute(path: PathLike) -> str:
  """``path`` as a string: local paths made absolute, URLs unchanged
  (``os.path.abspath`` would turn ``gs://b/x`` into ``CWD/gs:/b/x``)."""
  text = os.fspath(path)
  if is_remote(text):
    return text
  return os.path.abspath(os.path.expanduser(text))


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path`` (local ones absolute)."""
  return epath.Path(absolute(path))


def join(path: PathLike, *parts: str) -> str:
  """``path/part/...`` as a string, for a URL as for a local path."""
  return os.fspath(as_path(path).joinpath(*parts))


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` whole or not at all, creating the folder. Locally
  written to a temporary name and renamed; an object store's upload is
  already all-or-nothing (and renaming there is a copy)."""
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f".{p.name}.tmp"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(path: PathLike, text: str) -> None:
  """``write_bytes`` of UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))


def create_exclusive(path: PathLike, data: bytes) -> bool:
  """Creates ``path`` holding ``data`` only if it does not exist; False if
  it does. Atomic: ``O_CREAT | O_EXCL`` locally, an object written on the
  condition that none exists (generation 0) in a bucket."""
  p = as_path(path)
  if not is_remote(p):
    try:
      fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True
  import fsspec  # pylint: disable=g-import-not-at-top

  fs, location = fsspec.core.url_to_fs(os.fspath(p))
  try:
    fs.pipe_file(location, data, mode="create")
  except FileExistsError:
    return False
  return True


def mtime(path: PathLike) -> float:
  """Seconds since the epoch of the last change of ``path`` (OSError if
  it is missing)."""
  p = as_path(path)
  if not is_remote(p):
    return os.path.getmtime(p)
  try:
    return float(p.stat().mtime)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(f"cannot stat {p}: {e}") from e


def remove(path: PathLike, missing_ok: bool = True) -> None:
  """Deletes a file."""
  try:
    as_path(path).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


def listing(path: PathLike) -> list[tuple[str, int, float]]:
  """(path relative to the folder ``path``, size, modification time) of
  every file under it, sorted; a bucket's folder in one listing request
  per thousand files rather than one request per file."""
  root = absolute(path)
  if not is_remote(root):
    out = []
    for folder, _, names in os.walk(root):
      for name in names:
        st = os.stat(os.path.join(folder, name))
        rel = os.path.relpath(os.path.join(folder, name), root)
        out.append((rel, st.st_size, st.st_mtime))
    return sorted(out)
  import fsspec  # pylint: disable=g-import-not-at-top

  fs, location = fsspec.core.url_to_fs(root)
  location = location.rstrip("/")
  out = []
  for name, info in fs.find(location, detail=True).items():
    if info.get("type") == "directory" or name.endswith("/"):
      continue  # Folder markers that some tools write.
    when = info.get("mtime")
    when = when.timestamp() if hasattr(when, "timestamp") else float(when or 0)
    rel = name[len(location) + 1 :]
    out.append((rel, int(info.get("size") or 0), when))
  return sorted(out)


def files(path: PathLike) -> list[str]:
  """The files under the folder ``path``, relative to it, sorted."""
  return [rel for rel, _, _ in listing(path)]


def copytree(src: PathLike, dst: PathLike) -> None:
  """Copies the folder ``src`` into ``dst`` (either may be remote)."""
  src, dst = as_path(src), as_path(dst)
  for rel in files(src):
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).copy(dst / rel, overwrite=True)


def cache_dir() -> str:
  """The local folder of copies of remote files (``$TIM_JAX_CACHE``, else
  ``~/.cache/tim_jax``)."""
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "tim_jax"
  )


def _listing(p: epath.Path) -> list[tuple[str, int, float]]:
  """``listing`` of the folder ``p``, or the one entry of the file ``p``."""
  if p.is_dir():
    return listing(p)
  st = p.stat()
  return [(p.name, st.length, st.mtime)]


def local_copy(path: PathLike) -> str:
  """A local path holding ``path``'s content, for readers of local files
  only (safetensors' memory map, torch, tokenizers): a local path itself;
  a remote file or folder copied once into ``cache_dir()`` and copied
  again when a file's size or time changes there."""
  if not is_remote(path):
    return os.fspath(path)
  p = as_path(path)
  if not p.exists():
    raise FileNotFoundError(f"no file or folder at {p}")
  listing = _listing(p)
  key = hashlib.sha256(os.fspath(p).encode()).hexdigest()[:16]
  home = os.path.join(cache_dir(), "remote", key)
  target = os.path.join(home, p.name)
  stamp = os.path.join(home, "listing.json")
  want = json.loads(json.dumps(listing))
  try:
    with open(stamp, encoding="utf-8") as f:
      if json.load(f) == want and os.path.exists(target):
        return target
  except (OSError, ValueError):
    pass
  os.makedirs(home, exist_ok=True)
  # Copied beside the target, then renamed: a torn copy is never used.
  scratch = tempfile.mkdtemp(dir=home, prefix=".partial-")
  try:
    if p.is_dir():
      copytree(p, os.path.join(scratch, p.name))
    else:
      p.copy(epath.Path(scratch) / p.name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
    os.replace(os.path.join(scratch, p.name), target)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  with open(stamp + ".tmp", "w", encoding="utf-8") as f:
    json.dump(want, f)
  os.replace(stamp + ".tmp", stamp)
  return target
