"""A small Hugging Face Hub on 127.0.0.1 for huggingface_hub's real client.

It speaks the part of the Hub's HTTP protocol that ``hf_hub_download``,
``snapshot_download`` and ``list_repo_files`` use (huggingface_hub 0.2x to
0.3x):

* ``HEAD``/``GET /[datasets/]{owner}/{name}/resolve/{revision}/{path}``:
  the file, with ``X-Repo-Commit``, ``ETag`` (the git blob id) and, for
  large-file-storage files (weights), ``X-Linked-Etag`` (sha256) and
  ``X-Linked-Size``; ``Range: bytes=N-`` resumes;
* ``GET /api/{models|datasets}/{owner}/{name}[/revision/{revision}]``: the
  commit and its files (``sha``, ``siblings``);
* ``GET /api/{models|datasets}/{owner}/{name}/tree/{revision}``: the files;
* errors as the Hub signals them (``X-Error-Code``): ``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound`` (with ``X-Repo-Commit``) and
  ``GatedRepo`` (401 without a token, 403 with one that has no access).

Written by hand because no emulator of the Hub is packaged; the behaviour
follows huggingface_hub's ``file_download.py`` and ``utils/_http.py``.

In tests::

    hub = Hub()
    hub.add("owner/repo", {"config.json": b"{}"})
    with serve(hub) as url:   # then HF_ENDPOINT=url for the client
      ...
    hub.requests              # [(method, path), ...] it answered

From a shell (each ROOT/owner/name folder is a repository)::

    python tests/hub_server.py ROOT [--port=8123] [--gated=owner/name]
        [--token=TOKEN]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.server
import json
import os
import threading
from urllib.parse import unquote, urlsplit

# Files the Hub keeps in large-file storage (LFS): weights and archives.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tar", ".model", ".npz")


@dataclasses.dataclass
class Commit:
  sha: str
  files: dict  # path -> bytes


@dataclasses.dataclass
class Repo:
  repo_type: str = "model"
  gated: bool = False
  refs: dict = dataclasses.field(default_factory=dict)  # branch/tag -> Commit


class Hub:
  """Repositories in memory, their tokens, and a log of the requests."""

  def __init__(self, tokens=()):
    self.repos = {}  # (repo_type, repo_id) -> Repo
    self.tokens = set(tokens)  # Tokens with access to gated repositories.
    self.requests = []
    self.lock = threading.Lock()

  def add(
    self,
    repo_id,
    files,
    *,
    revision="main",
    repo_type="model",
    gated=False,
  ):
    """Adds a commit of ``files`` (path -> bytes or a local file's path)
    as ``revision`` (a branch or tag) of ``repo_id``; returns its sha."""
    content = {}
    for path, data in files.items():
      if not isinstance(data, bytes):
        with open(data, "rb") as f:
          data = f.read()
      content[path] = data
    digest = hashlib.sha1(repo_id.encode() + revision.encode())
    for path in sorted(content):
      digest.update(path.encode() + hashlib.sha1(content[path]).digest())
    sha = digest.hexdigest()
    repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type))
    repo.gated = repo.gated or gated
    repo.refs[revision] = Commit(sha, content)
    return sha

  def add_folder(self, repo_id, directory, **kw):
    """Adds every file under ``directory`` (relative paths, '/')."""
    files = {}
    for root, _, names in os.walk(directory):
      for name in names:
        full = os.path.join(root, name)
        rel = os.path.relpath(full, directory).replace(os.sep, "/")
        files[rel] = full
    return self.add(repo_id, files, **kw)

  def commit(self, repo, revision):
    if revision in repo.refs:
      return repo.refs[revision]
    for c in repo.refs.values():
      if c.sha == revision:
        return c
    return None

  def count(self, needle=""):
    """How many requests' paths contain ``needle``."""
    with self.lock:
      return sum(needle in path for _, path in self.requests)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  hub: Hub

  def log_message(self, *args):  # Quiet: tests read hub.requests.
    pass

  def do_HEAD(self):
    self._answer(head=True)

  def do_GET(self):
    self._answer(head=False)

  def _send(self, status, headers=(), body=b"", head=False):
    self.send_response(status)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if not head and body:
      self.wfile.write(body)

  def _error(self, status, code, message, commit=None, head=False):
    headers = [("X-Error-Code", code), ("X-Error-Message", message)]
    if commit is not None:
      headers.append(("X-Repo-Commit", commit.sha))
    body = json.dumps({"error": message}).encode()
    headers.append(("Content-Type", "application/json"))
    self._send(status, headers, body, head)

  def _repo(self, repo_type, repo_id, head):
    """The repository, or None after answering with the error."""
    repo = self.hub.repos.get((repo_type, repo_id))
    if repo is None:
      self._error(404, "RepoNotFound", "Repository not found", head=head)
      return None
    if repo.gated:
      auth = self.headers.get("Authorization", "")
      token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
      if not token:
        self._error(
          401,
          "GatedRepo",
          f"Access to model {repo_id} is restricted. You must have access "
          "to it and be authenticated to access it. Please log in.",
          head=head,
        )
        return None
      if token not in self.hub.tokens:
        self._error(
          403,
          "GatedRepo",
          f"Access to model {repo_id} is restricted and you are not in the "
          "authorized list.",
          head=head,
        )
        return None
    return repo

  def _answer(self, head):
    url = urlsplit(self.path)
    with self.hub.lock:
      self.hub.requests.append((self.command, url.path))
    parts = [unquote(p) for p in url.path.strip("/").split("/")]
    if parts and parts[0] == "api":
      return self._api(parts[1:], head)
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces"):
      repo_type = parts.pop(0)[:-1]
    if len(parts) < 5 or parts[2] != "resolve":
      return self._error(404, "NotFound", "no such route", head=head)
    repo = self._repo(repo_type, "/".join(parts[:2]), head)
    if repo is None:
      return None
    commit = self.hub.commit(repo, parts[3])
    if commit is None:
      return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
    path = "/".join(parts[4:])
    if path not in commit.files:
      return self._error(
        404, "EntryNotFound", f"{path} does not exist", commit, head
      )
    data = commit.files[path]
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    headers = [
      ("X-Repo-Commit", commit.sha),
      ("ETag", f'"{blob}"'),
      ("Accept-Ranges", "bytes"),
      ("Content-Type", "application/octet-stream"),
    ]
    if path.endswith(LFS_SUFFIXES):
      headers += [
        ("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"'),
        ("X-Linked-Size", str(len(data))),
      ]
    start = 0
    ranged = self.headers.get("Range", "")
    if ranged.startswith("bytes=") and ranged.endswith("-"):
      start = min(int(ranged[6:-1] or 0), len(data))
      headers.append(
        ("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
      )
    return self._send(206 if start else 200, headers, data[start:], head)

  def _api(self, parts, head):
    # {models|datasets}/{owner}/{name}[/revision/{rev} | /tree/{rev}[/path]]
    if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
      return self._error(404, "NotFound", "no such route", head=head)
    repo_id = "/".join(parts[1:3])
    repo = self._repo(parts[0][:-1], repo_id, head)
    if repo is None:
      return None
    rest = parts[3:]
    revision = rest[1] if len(rest) >= 2 else "main"
    commit = self.hub.commit(repo, revision)
    if commit is None:
      return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
    if rest and rest[0] == "tree":
      sub = "/".join(rest[2:])
      body = [
        {
          "type": "file",
          "path": p,
          "size": len(d),
          "oid": hashlib.sha1(d).hexdigest(),
        }
        for p, d in sorted(commit.files.items())
        if not sub or p.startswith(sub + "/")
      ]
    else:
      body = {
        "id": repo_id,
        "sha": commit.sha,
        "private": False,
        "gated": "manual" if repo.gated else False,
        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
      }
    self._send(
      200, [("Content-Type", "application/json")], json.dumps(body).encode()
    )
    return None


@contextlib.contextmanager
def serve(hub, port=0):
  """Serves ``hub`` on 127.0.0.1 in a thread; yields its URL."""
  handler = type("Handler", (_Handler,), {"hub": hub})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("root", help="a folder of owner/name repository folders")
  p.add_argument("--port", type=int, default=8123)
  p.add_argument("--gated", action="append", default=[])
  p.add_argument("--token", action="append", default=[])
  a = p.parse_args()
  hub = Hub(a.token)
  for owner in sorted(os.listdir(a.root)):
    for name in sorted(os.listdir(os.path.join(a.root, owner))):
      repo_id = f"{owner}/{name}"
      hub.add_folder(
        repo_id, os.path.join(a.root, owner, name), gated=repo_id in a.gated
      )
  with serve(hub, a.port) as url:
    print(f"serving {len(hub.repos)} repositories at {url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
  main()
