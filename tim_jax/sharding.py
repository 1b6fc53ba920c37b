"""Device mesh and logical-axis partitioning.

Parameters carry logical axis names (``tim_jax.models``); the config maps them
to the mesh axes ``data``, ``fsdp`` and ``tensor``. Batches are split over
``data`` and ``fsdp`` together (FSDP shards parameters, yet every device still
processes its own rows). One code path serves one device, many devices and
many hosts.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Every logical axis name the backbone uses; a name the rules leave out is
# replicated.
LOGICAL_AXES = ("embed", "mlp", "heads", "qkv", "kv", "adaln", "modulation",
                "vocab", "cap", "freq", "out", "head_dim", "patch_h",
                "patch_w", "channels", "proj_hidden", "proj_out", "norm")

# FSDP over the model width, tensor parallelism over the wide projections.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("kv", "tensor"),
    ("modulation", "tensor"),
)


def make_mesh(shape: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 (fills)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh "
                       f"{dict(shape)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{int(np.prod(sizes))} devices, there are "
                     f"{len(devices)}")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # Non-TPU topologies mesh_utils cannot lay out.
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def complete_rules(rules: Iterable[Tuple[str, object]]):
  """The config's rules plus ``(name, None)`` for every other logical axis,
  so no logical name survives into a PartitionSpec."""
  rules = [tuple(r) for r in rules]
  named = {r[0] for r in rules}
  for name, target in rules:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"rule ({name!r}, {target!r}) names an unknown mesh"
                         f" axis; use {MESH_AXES}")
  return tuple(rules) + tuple((n, None) for n in LOGICAL_AXES
                              if n not in named)


def _is_spec(x):
  return isinstance(x, P)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension (small layers, odd
  widths): those dimensions are replicated instead of failing."""
  out = []
  for i, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is None:
      out.append(None)
      continue
    axes = axis if isinstance(axis, tuple) else (axis,)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    out.append(axis if shape[i] % size == 0 else None)
  return P(*out)


def state_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree whose nnx Variables carry logical names.

  Leaves without names (step counters, keys) are replicated.
  """
  with nnx.logical_axis_rules(complete_rules(rules)):
    specs = nnx.get_partition_spec(abstract_tree)
  flat_specs = jax.tree.leaves(specs, is_leaf=_is_spec)
  flat_leaves = jax.tree.leaves(abstract_tree)
  if len(flat_specs) != len(flat_leaves):
    raise AssertionError("partition specs do not match the state's leaves")
  shardings = [NamedSharding(mesh, _fit(s, leaf.shape, mesh))
               for s, leaf in zip(flat_specs, flat_leaves)]
  return jax.tree.unflatten(jax.tree.structure(specs, is_leaf=_is_spec),
                            shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Rows over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
  """Assembles per-process numpy batches into global jax.Arrays sharded over
  the batch axes (each process contributes its own rows)."""
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, a.ndim), a)
  return jax.tree.map(put, local_batch)


def data_shards(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
