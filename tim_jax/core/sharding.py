"""Device mesh and logical-axis partitioning.

Parameters carry logical axis names (``tim_jax.models``); the config maps them
to the mesh axes ``data``, ``fsdp`` and ``tensor``. Batches are split over
``data`` and ``fsdp`` together (FSDP shards parameters, yet every device still
processes its own rows). One code path serves one device, many devices and
many hosts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import contextlib
import threading
from typing import Any

from absl import logging
from flax import nnx
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from tim_jax.core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP over the model width, tensor parallelism over the wide projections;
# activations: rows over the batch axes, attention heads and the MLP's
# hidden units over `tensor` (the same names as the weights' outputs).
DEFAULT_RULES = (
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("qkv", "tensor"),
  ("kv", "tensor"),
  ("modulation", "tensor"),
  ("batch", ("data", "fsdp")),
)


def make_mesh(
  shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 (fills)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(
      f"unknown mesh axes {sorted(unknown)} (config mesh.*); use {MESH_AXES}"
    )
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(
        f"{len(devices)} devices do not divide into mesh {dict(shape)}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs "
      f"{int(np.prod(sizes))} devices, there are "
      f"{len(devices)}"
    )
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # Non-TPU topologies mesh_utils cannot lay out.
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names an nnx Variable carries (empty if none)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if names:
      return tuple(names)
  return ()


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def complete_rules(
  rules: Iterable[tuple[str, object]], names: Iterable[str] = ()
) -> tuple[tuple[str, object], ...]:
  """The config's rules plus ``(name, None)`` for every logical name in
  ``names`` they leave out, so no logical name survives into a
  PartitionSpec. Rules naming an unknown mesh axis are refused."""
  rules = [tuple(r) for r in rules]
  for name, target in rules:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise UserError(
          f"sharding_rules: ({name!r}, {target!r}) names an unknown mesh"
          f" axis; use {MESH_AXES}"
        )
  named = {r[0] for r in rules}
  return tuple(rules) + tuple(
    (n, None) for n in sorted(set(names) - named) if n is not None
  )


_ACTIVATIONS = threading.local()


@contextlib.contextmanager
def activation_sharding(
  mesh: Mesh, rules: Iterable[tuple[str, object]]
) -> Iterator[None]:
  """Functions traced inside this context pin their activations with
  ``constrain`` (the model's layers call it) to the mesh under ``rules``;
  outside it ``constrain`` does nothing (single-device use, tests)."""
  previous = getattr(_ACTIVATIONS, "value", None)
  _ACTIVATIONS.value = (mesh, dict(complete_rules(rules)))
  try:
    yield
  finally:
    _ACTIVATIONS.value = previous


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """``x`` with a sharding constraint from its dimensions' logical names
  (None: unconstrained-replicated), under the ``activation_sharding``
  context; a mesh axis that does not divide its dimension is dropped."""
  context = getattr(_ACTIVATIONS, "value", None)
  if context is None:
    return x
  mesh, rules = context
  spec = P(*(rules.get(n) if n is not None else None for n in names))
  fitted, _ = _fit(spec, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fitted))


def _is_spec(x):
  return isinstance(x, P)


def _fit(spec: P, shape, mesh: Mesh):
  """Drops mesh axes that do not divide the dimension (small layers, odd
  widths): those dimensions are replicated instead of failing. Returns the
  spec and (dimension, mesh axes, size) of each dropped axis."""
  out, dropped = [], []
  for i, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is None:
      out.append(None)
      continue
    axes = axis if isinstance(axis, tuple) else (axis,)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if shape[i] % size == 0:
      out.append(axis)
    else:
      out.append(None)
      dropped.append((i, axis, size))
  return P(*out), dropped


_LOGGED_FALLBACKS = set()  # Each fallback is logged once per process.


def _log_fallback(path: str, shape, names, dropped, mesh: Mesh):
  for dim, axis, size in dropped:
    key = (path, tuple(shape), dim, str(axis), size)
    if key in _LOGGED_FALLBACKS:
      continue
    _LOGGED_FALLBACKS.add(key)
    logical = names[dim] if dim < len(names) else None
    logging.warning(
      "sharding fallback: %s %s dimension %d (logical %r) is not divisible "
      "by mesh axis %r of size %d (mesh %s); it is replicated",
      path,
      tuple(shape),
      dim,
      logical,
      axis,
      size,
      dict(mesh.shape),
    )


def state_shardings(
  abstract_tree: Any, mesh: Mesh, rules: Iterable[tuple[str, object]]
) -> Any:
  """NamedShardings for a pytree whose nnx Variables carry logical names.

  Leaves without names (step counters, keys) are replicated. A rule that
  cannot apply (its mesh axis does not divide the dimension) is dropped for
  that parameter and logged once, naming the parameter.
  """
  variables = jax.tree.leaves(abstract_tree, is_leaf=_is_variable)
  names = {n for v in variables if _is_variable(v) for n in logical_names(v)}
  with nnx.logical_axis_rules(complete_rules(rules, names)):
    specs = nnx.get_partition_spec(abstract_tree)
  flat_specs = jax.tree.leaves(specs, is_leaf=_is_spec)
  with_paths = jax.tree_util.tree_flatten_with_path(
    abstract_tree, is_leaf=_is_variable
  )[0]
  if len(flat_specs) != len(with_paths):
    raise AssertionError("partition specs do not match the state's leaves")
  shardings = []
  for spec, (path, leaf) in zip(flat_specs, with_paths):
    fitted, dropped = _fit(spec, leaf.shape, mesh)
    if dropped:
      _log_fallback(
        jax.tree_util.keystr(path, simple=True, separator="/"),
        leaf.shape,
        logical_names(leaf) if _is_variable(leaf) else (),
        dropped,
        mesh,
      )
    shardings.append(NamedSharding(mesh, fitted))
  return jax.tree.unflatten(
    jax.tree.structure(specs, is_leaf=_is_spec), shardings
  )


def frozen_shardings(tree: Any, mesh: Mesh) -> Any:
  """Shardings of a frozen network's weights (a teacher or text encoder
  the step reads but never trains; no logical names): each array's largest
  axis that the ``fsdp`` axis divides is split over it (the step gathers
  it as it does the trained parameters'), the rest replicated. With
  ``fsdp=1`` everything is replicated."""
  n = mesh.shape.get("fsdp", 1)

  def one(a):
    shape = np.shape(a)
    if n > 1 and shape:
      axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0]
      if axes:
        spec = [None] * len(shape)
        spec[int(axes[0])] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def platform_of(tree: Any) -> str | None:
  """The platform that untraced work on ``tree``'s arrays runs on: that of a
  committed array's devices, else the default device's (where JAX puts
  uncommitted arrays); None when ``tree`` holds a tracer (under a trace the
  platform is the lowering's, unknown here)."""
  leaves = jax.tree.leaves(tree)
  if any(isinstance(a, jax.core.Tracer) for a in leaves):
    return None
  for a in leaves:
    if isinstance(a, jax.Array) and a.committed:
      return next(iter(a.sharding.device_set)).platform
  default = jax.config.jax_default_device
  if isinstance(default, str):
    return default
  return (default or jax.devices()[0]).platform


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Rows over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process numpy batches into global jax.Arrays sharded over
  the batch axes (each process contributes its own rows)."""

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(
      batch_sharding(mesh, a.ndim), a
    )

  return jax.tree.map(put, local_batch)


def data_shards(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
