"""Checkpoints with orbax: train state, data-iterator state and config.

Each checkpoint is one step directory holding three items: ``state`` (the
train state: parameters, EMA, optimizer state, step, RNG, guard counters),
``data`` (the grain iterator's position) and ``config`` (the run's config as
JSON). Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete), so a run killed during a save leaves
the previous checkpoint intact; the last ``keep`` are kept.

Restoring onto another mesh is a matter of the target shardings: the state
is restored straight into the new layout.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any
import uuid

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tim_jax.core import paths

if TYPE_CHECKING:
  import grain

# The config fields that fix the parameter tree or what the weights mean: a
# checkpoint whose values here differ cannot be restored into this run. The
# default is what a checkpoint written before the field existed holds.
ARCHITECTURE_KEYS = {
  "model.kind": None,
  "model.network": None,
  "model.scan_blocks": False,  # The blocks' parameter layout.
  "model.use_projector": True,
  "model.rope_positions": "official",
  "data.caption_seed": 0,  # The shapes world's caption encoder table.
  "data.caption_context": 0.0,  # ... and its context mixing.
}


def _get(tree, dotted, default=None):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return default
    tree = tree[part]
  return tree


def _diff(a, b, prefix=""):
  """Human-readable differences between two JSON-like dicts."""
  out = []
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
  elif a != b:
    out.append(f"{prefix}: checkpoint {a!r} vs config {b!r}")
  return out


def architecture_differences(saved: dict, config_dict: dict) -> list:
  """What differs between two configs (JSON dicts) in the sections that fix
  the parameter tree; empty when a checkpoint of one fits the other."""
  problems = []
  for key, default in ARCHITECTURE_KEYS.items():
    problems += _diff(
      _get(saved, key, default), _get(config_dict, key, default), key
    )
  return problems


# One jitted function for every call: it compiles once per state layout,
# not at every save.
_ALL_FINITE = jax.jit(
  lambda leaves: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
)


def all_finite(tree: Any) -> bool:
  """Whether every float leaf of ``tree`` is finite (one device reduction)."""
  leaves = [
    x
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  if not leaves:
    return True
  return bool(_ALL_FINITE(leaves))


# The weight sets a train state holds, as inference may read them.
WEIGHT_SETS = ("ema", "params")


class CheckpointWriteError(RuntimeError):
  """The checkpoint directory cannot be written."""


def check_writable(directory: str) -> None:
  """Raises CheckpointWriteError unless files can be created in
  ``directory`` (made if missing; local or gs://). Orbax's asynchronous
  save reports such a failure only inside its thread, where the next save
  then waits forever: this check runs first."""
  # A bucket's client raises its own errors besides OSError.
  errors = Exception if paths.is_remote(directory) else OSError
  try:
    if paths.is_remote(directory):
      probe = paths.as_path(directory) / f".write_check-{uuid.uuid4().hex}"
      probe.write_bytes(b"")
      probe.unlink()
      return
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check"):
      pass
  except errors as e:
    raise CheckpointWriteError(
      f"cannot write checkpoints to {directory}: {e}. Make it writable or "
      "choose another --workdir."
    ) from None


class CheckpointReadError(RuntimeError):
  """No checkpoint of the directory can be read."""


def _free_name(path: str) -> str:
  """``path``, or ``path-2``, ``path-3``, ... : the first that is free."""
  candidate, k = path, 1
  while paths.as_path(candidate).exists():
    k += 1
    candidate = f"{path}-{k}"
  return candidate


def _move(src: str, dst: str) -> None:
  """Renames a folder; in a bucket (no folders to rename) copies it, then
  deletes the original."""
  if not paths.is_remote(src):
    os.replace(src, dst)
    return
  paths.copytree(src, dst)
  paths.as_path(src).rmtree()


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:limit]}"


class Checkpointer:
  """Saves and restores (state, data iterator, config) under ``directory``."""

  def __init__(
    self, directory: str, *, keep: int = 3, asynchronous: bool = True
  ):
    self.directory = paths.absolute(directory)  # Local or gs://.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "config")
    )

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self.manager.latest_step()

  def saved_config(self, step: int | None = None) -> dict | None:
    """The config saved with ``step``; by default the newest one that can
    be read (a damaged newer step is left to ``restore_latest``)."""
    if step is None:
      for s in sorted(self.manager.all_steps(), reverse=True):
        try:
          return self.saved_config(s)
        except Exception as e:  # pylint: disable=broad-except
          logging.error(
            "the config of checkpoint step %d cannot be read: %s",
            s,
            _first_line(e),
          )
      return None
    path = paths.as_path(
      paths.join(self.directory, str(step), "config", "metadata")
    )
    if not path.exists():
      restored = self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
      )
      return dict(restored["config"])
    return json.loads(path.read_text())

  def check_compatible(self, config_dict: dict) -> None:
    """Refuses (ValueError) to resume from a checkpoint of another
    architecture; nothing on disk is touched."""
    saved = self.saved_config()
    if saved is None:
      return
    problems = architecture_differences(saved, config_dict)
    if problems:
      raise ValueError(
        f"the checkpoint in {self.directory} is "
        f"of another architecture than this config: {'; '.join(problems)}."
        " Use a new --workdir, or the config the checkpoint was made with."
        " Nothing was changed on disk."
      )

  def save(
    self,
    step: int,
    state: Any,
    data_iterator: grain.DatasetIterator,
    config_dict: dict,
    *,
    force: bool = False,
  ) -> bool:
    """Saves unless the state is non-finite (then refuses and says so).
    Raises CheckpointWriteError, naming the latest saved step, when the
    directory cannot be written or an earlier asynchronous save failed."""
    if not all_finite((state.params, state.ema)):
      logging.error("not saving step %d: the parameters are not finite", step)
      return False
    try:
      check_writable(self.directory)
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      latest = self.latest_step()
      raise CheckpointWriteError(
        f"step {step} was not saved: {e} The latest saved checkpoint is "
        + (f"step {latest}." if latest is not None else "none.")
      ) from None
    import grain

    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config_dict),
    )
    return self.manager.save(step, args=args, force=force)

  def restore(
    self,
    step: int,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator | None = None,
  ) -> Any:
    """Restores into ``abstract_state``'s shapes and shardings (which may
    describe another mesh than the one the checkpoint was saved from), and
    the data iterator's position when one is given."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      import grain

      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(
    self,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator | None = None,
  ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that reads whole, or (None,
    None) when there is none. A damaged newer step (truncated file, missing
    item) is named, moved aside to ``damaged-step-N`` (kept, not deleted)
    and the previous one used; when every step is damaged this raises
    CheckpointReadError listing them, and nothing on disk is changed."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and TensorStore raise many kinds; what matters is the step.
        failures.append((step, _first_line(e)))
        logging.error(
          "checkpoint step %d in %s cannot be read: %s",
          step,
          self.directory,
          failures[-1][1],
        )
        continue
      for bad, why in failures:
        aside = _free_name(paths.join(self.directory, f"damaged-step-{bad}"))
        if jax.process_index() == 0:  # One rename on shared storage.
          _move(paths.join(self.directory, str(bad)), aside)
        logging.warning(
          "resuming from step %d instead of the damaged step %d (%s); "
          "the damaged step is kept at %s",
          step,
          bad,
          why,
          aside,
        )
      if failures:
        if jax.process_count() > 1:
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

          multihost_utils.sync_global_devices("tim_jax_damaged_steps_moved")
        self.manager.reload()
      return step, state
    if failures:
      listed = "; ".join(
        f"step {s} ({paths.join(self.directory, str(s))}): {why}"
        for s, why in failures
      )
      raise CheckpointReadError(
        f"no checkpoint in {self.directory} can be read: {listed}. If "
        "every step fails alike, the config or code may have changed what "
        "a train state holds (optimizer, data iterator): run with the "
        "config the checkpoints were made with. If the files are damaged, "
        "delete those step directories to start over (or restore them "
        "from a copy). Nothing was changed on disk."
      )
    return None, None

  def restore_weights(
    self, step: int, abstract_params: Any, which: str = "ema"
  ) -> Any:
    """One weight set of the train state alone, the EMA (``"ema"``) or the
    trained ``"params"``, into ``abstract_params``' shapes, dtypes and
    shardings (ShapeDtypeStructs with ``sharding``): no optimizer state is
    read or built (inference)."""
    if which not in WEIGHT_SETS:
      raise ValueError(f"weights must be one of {WEIGHT_SETS}, got {which!r}")
    item = {which: abstract_params}
    args = ocp.args.PyTreeRestore(
      item=item,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
    )
    restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    return restored["state"][which]

  def wait(self) -> None:
    """Waits for in-flight asynchronous saves."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
