"""Hugging Face Hub ids as paths: ``hf://owner/repo[@revision][/path]``.

Every loader that takes a weight file or a model directory calls
``resolve`` first, so a hub id works wherever a local path does::

    hf://GoodEnough/TiM-C2I/c2i_model_256.safetensors   # one file
    hf://stabilityai/sd-vae-ft-ema                      # the whole repository
    hf://owner/repo@v1.0/vae                            # a folder, at a tag
    hf://datasets/owner/name/path                       # a dataset repository

Downloads go through ``huggingface_hub`` and its cache (``HF_HOME``,
``HF_HUB_CACHE``), which shows its progress bars, honours
``HF_HUB_OFFLINE=1`` (cached files only, no request) and ``HF_ENDPOINT``,
and sends the token of ``HF_TOKEN`` or ``hf auth login`` (gated
repositories such as Gemma need one). A revision is a branch, a tag or a
commit hash; one holding ``/`` is URL-quoted (``@refs%2Fpr%2F1``). A
missing file, repository or revision, a gated repository without access
and an unreachable hub are a ``UserError`` naming the id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TypeVar
from urllib.parse import unquote

from tim_jax.core.errors import UserError

SCHEME = "hf://"
# URL prefixes of the repository types other than models (as HfFileSystem).
REPO_TYPES = {"datasets": "dataset", "spaces": "space"}

P = TypeVar("P")


@dataclasses.dataclass(frozen=True)
class HubPath:
  """A parsed ``hf://`` id: a repository, a revision and a path in it."""

  repo_id: str
  revision: str | None = None  # None: the default branch.
  path: str = ""  # "": the whole repository.
  repo_type: str = "model"

  def __str__(self) -> str:
    prefix = {v: k + "/" for k, v in REPO_TYPES.items()}.get(self.repo_type, "")
    rev = f"@{self.revision}" if self.revision else ""
    tail = f"/{self.path}" if self.path else ""
    return f"{SCHEME}{prefix}{self.repo_id}{rev}{tail}"


def is_hub(path: object) -> bool:
  """Whether ``path`` is a hub id (a string starting with ``hf://``)."""
  return isinstance(path, str) and path.startswith(SCHEME)


def parse(uri: str) -> HubPath:
  """``hf://[datasets/|spaces/]owner/repo[@revision][/path]`` -> HubPath;
  UserError when it is not one."""
  if not is_hub(uri):
    raise UserError(f"{uri!r} is not a hub id (hf://owner/repo[/path])")
  parts = uri[len(SCHEME) :].split("/")
  repo_type = "model"
  if parts and parts[0] in REPO_TYPES:
    repo_type = REPO_TYPES[parts.pop(0)]
  if len(parts) < 2 or not parts[0] or not parts[1].partition("@")[0]:
    raise UserError(
      f"{uri}: a hub id names owner/repo, e.g. "
      "hf://stabilityai/sd-vae-ft-ema or "
      "hf://GoodEnough/TiM-C2I/c2i_model_256.safetensors"
    )
  name, at, revision = parts[1].partition("@")
  if at and not revision:
    raise UserError(f"{uri}: '@' must be followed by a revision")
  path = "/".join(p for p in parts[2:] if p)
  if any(p in (".", "..") for p in parts[2:]):
    raise UserError(f"{uri}: '.' and '..' are not allowed in a hub path")
  return HubPath(
    f"{parts[0]}/{name}", unquote(revision) or None, path, repo_type
  )


def resolve(path: P, allow_patterns: tuple[str, ...] | None = None) -> P | str:
  """The local path of ``path``: a hub id is downloaded (or found in the
  cache) and its local file or folder returned; anything else is returned
  as it is.

  A path in the repository is a file when the repository has a file of
  that name, else a folder; no path is the whole repository.
  ``allow_patterns`` (fnmatch patterns relative to the folder, e.g.
  ``("*.json", "*.safetensors")``) limits what a folder download fetches.
  """
  if not is_hub(path):
    return path
  ref = parse(path)
  try:
    local = _download(ref, allow_patterns)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = _explain(ref, e)
    if message is None:
      raise
    raise UserError(message) from None
  logging.info("%s is %s", path, local)
  return local


def _download(ref: HubPath, allow_patterns) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  where = dict(repo_type=ref.repo_type, revision=ref.revision)
  offline_miss = None
  if ref.path:
    try:
      return huggingface_hub.hf_hub_download(ref.repo_id, ref.path, **where)
    except errors.LocalEntryNotFoundError as e:  # Offline: a cached folder?
      offline_miss = e
    except errors.EntryNotFoundError:  # No such file: a folder?
      pass
  prefix = f"{ref.path}/" if ref.path else ""
  patterns = [prefix + p for p in allow_patterns or ("*",)]
  try:
    folder = huggingface_hub.snapshot_download(
      ref.repo_id, allow_patterns=patterns, **where
    )
  except errors.LocalEntryNotFoundError:
    if offline_miss is None:
      raise
    raise offline_miss from offline_miss.__cause__
  local = os.path.join(folder, *ref.path.split("/")) if ref.path else folder
  if not _has_files(local):
    if offline_miss is not None:
      raise offline_miss
    raise UserError(
      f"{ref}: the repository {ref.repo_id} (revision "
      f"{ref.revision or 'main'}) has no file or folder "
      f"{ref.path or '(empty repository)'}"
      + ("" if allow_patterns is None else f" matching {list(allow_patterns)}")
      + _listing(ref)
    )
  return local


def _has_files(folder: str) -> bool:
  for _, _, files in os.walk(folder):
    if files:
      return True
  return False


def _listing(ref: HubPath) -> str:
  """'; it holds: a, b, ...' from the hub, or '' (offline, or no answer)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top

    files = huggingface_hub.list_repo_files(
      ref.repo_id, repo_type=ref.repo_type, revision=ref.revision
    )
  except Exception:  # pylint: disable=broad-except
    return ""  # Only a hint: the error itself is already known.
  shown = ", ".join(sorted(files)[:12])
  return f"; it holds: {shown}" + (", ..." if len(files) > 12 else "")


def _explain(ref: HubPath, e: Exception) -> str | None:
  """A one-line message for a download failure the user can act on, or
  None (a bug: keep the traceback)."""
  from huggingface_hub import constants, errors  # pylint: disable=g-import-not-at-top

  endpoint = constants.ENDPOINT
  if isinstance(e, errors.HFValidationError):  # A malformed repository id.
    return f"{ref}: {' '.join(str(e).split())}"
  if isinstance(e, errors.GatedRepoError):
    if _has_token():
      return (
        f"{ref}: {ref.repo_id} is a gated repository and your Hugging Face "
        f"token has no access to it: accept its terms at "
        f"{endpoint}/{ref.repo_id} with that account"
      )
    return (
      f"{ref}: {ref.repo_id} is a gated repository and no Hugging Face "
      f"token is set: accept its terms at {endpoint}/{ref.repo_id}, then "
      "run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"
    )
  if isinstance(e, errors.RepositoryNotFoundError):
    login = "" if _has_token() else " (a private one needs HF_TOKEN)"
    return (
      f"{ref}: there is no repository {ref.repo_id} on {endpoint} that this "
      f"account can read{login}"
    )
  if isinstance(e, errors.RevisionNotFoundError):
    return f"{ref}: the repository {ref.repo_id} has no revision {ref.revision}"
  if isinstance(e, errors.LocalEntryNotFoundError):
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
      return (
        f"{ref} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
        "is set: download it once online, or unset HF_HUB_OFFLINE"
      )
    cause = e.__cause__ or e.__context__
    why = f": {type(cause).__name__}" if cause is not None else ""
    return (
      f"{ref}: cannot reach {endpoint}{why}, and it is not in the Hugging "
      f"Face cache ({cache}); check the connection (or HF_ENDPOINT)"
    )
  if isinstance(e, errors.HfHubHTTPError):
    status = getattr(e.response, "status_code", "?")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{ref}: {endpoint} answered {status} ({first})"
  return None


def _has_token() -> bool:
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  return bool(huggingface_hub.get_token())
