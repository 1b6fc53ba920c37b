"""The grain input pipeline: random-access source -> per-process batches.

``make_iterator(source, global_batch_size=..., seed=...)`` returns a
``grain.DatasetIterator`` yielding dicts of numpy arrays, each with a leading
per-process batch axis of ``global_batch_size // process_count``.

Order of operations, and why:

1. shuffle the whole source with ``seed`` (a lazy index permutation, so a
   source of 2**31 examples costs nothing), and ``repeat`` with a new
   permutation per epoch;
2. cut the stream to a whole number of global batches, then give process p
   the elements p, p + P, p + 2P, ... . Every process runs the same number
   of steps (no host waits forever at the end of a finite run), and step k's
   global batch is the same set of examples whatever the process count;
3. where examples carry ``image_flip`` (latents of the horizontally flipped
   image), keep the original or the flip with probability 1/2, drawn from
   ``seed`` and the element's position (so a resumed run draws the same);
4. drop non-array fields (captions as strings), batch.

Checkpointing. The iterator's position is ``it.get_state()`` (a small
JSON-able dict); ``it.set_state(state)`` on a freshly made iterator (same
source and arguments) resumes with exactly the same batches. With
``orbax.checkpoint.CheckpointManager`` use grain's own handler, which this
grain version (0.2.18) ships as ``grain.checkpoint.CheckpointSave`` /
``grain.checkpoint.CheckpointRestore`` (args registered with
``grain.checkpoint.CheckpointHandler``, needs orbax installed)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))  # restores `it` in place

The handler writes one ``process_{i}-of-{n}.json`` per process, named by
``jax.process_index()/process_count()``, so a run must restore with the same
process count it saved with. The state's layout also depends on
``worker_count`` (with workers it holds one position per worker), so restore
with the same ``worker_count`` too.
"""

from __future__ import annotations

import grain
import numpy as np

from tim_jax.core.errors import UserError


def _arrays_only(example: dict) -> dict:
  # Strings cannot be stacked into device arrays; numpy scalars become 0-d
  # arrays so batching gives (B,) arrays.
  out = {}
  for key, value in example.items():
    if isinstance(value, (str, bytes)):
      continue
    value = np.asarray(value)
    if value.dtype.kind in "OSU":
      continue
    out[key] = value
  return out


def pick_flip(example: dict, rng: np.random.Generator) -> dict:
  """The official C2I loader's augmentation (``tim/data/c2i_data.py``): an
  example's latent or its horizontal flip's, with probability 1/2 each; its
  ``pixels``, if any, flipped with it."""
  if "image_flip" not in example:
    return example
  example = dict(example)
  flip = example.pop("image_flip")
  if rng.random() < 0.5:
    example["image"] = flip
    if "pixels" in example:
      example["pixels"] = np.ascontiguousarray(example["pixels"][:, ::-1])
  return example


def make_iterator(
  source: grain.sources.RandomAccessDataSource[dict],
  *,
  global_batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  prefetch: int = 4,
  num_threads: int = 4,
) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's batches.

  Args:
    source: random access (``__len__``, ``__getitem__`` -> dict).
    global_batch_size: examples per step over all processes.
    seed: the shuffle seed; must be the same on every process.
    shuffle: shuffle (a new order each epoch) or read in index order.
    num_epochs: passes over the source; None repeats forever.
    process_index, process_count: this process's share; default
      ``jax.process_index()`` / ``jax.process_count()``.
    worker_count: > 0 reads in that many worker processes (``mp_prefetch``);
      the source must then be picklable.
    prefetch: batches read ahead (per worker when worker_count > 0).
    num_threads: reader threads (per worker).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = (
      jax.process_index() if process_index is None else process_index
    )
    process_count = (
      jax.process_count() if process_count is None else process_count
    )
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got "
      f"process_index={process_index}, "
      f"process_count={process_count}"
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise UserError(
      f"global_batch_size={global_batch_size} (the config's batch_size) "
      f"must be a positive multiple of process_count={process_count}"
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if worker_count < 0 or prefetch < 1 or num_threads < 1:
    raise UserError(
      f"need worker_count >= 0, prefetch >= 1, num_threads "
      f">= 1; got worker_count={worker_count}, "
      f"prefetch={prefetch}, num_threads={num_threads}"
    )

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  steps = len(ds) // global_batch_size
  if steps == 0:
    raise UserError(
      f"{len(source)} examples x {num_epochs} epoch(s) do not fill one "
      f"global batch of {global_batch_size} (the config's batch_size)"
    )
  ds = ds[: steps * global_batch_size][process_index::process_count]
  ds = ds.random_map(pick_flip, seed=seed)
  ds = ds.map(_arrays_only)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )
  if worker_count > 0:
    # grain's workers read absl flags (grain_* options) and fail with
    # UnparsedFlagAccessError outside an absl app; their defaults are right.
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch
      )
    )
  return iter(ds)
