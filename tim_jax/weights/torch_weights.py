"""PyTorch weight files and layouts, for every converter in tim_jax.

One reader for the files PyTorch projects publish (``.safetensors``, torch
pickles ``.pth``/``.pt``/``.bin``, and ``.npz``) and the kernel layout
conversions between PyTorch and JAX. ``tim_jax.weights.convert`` (TiM checkpoints)
and ``tim_jax.eval.inception`` (the FID network) both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from flax import nnx

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# Training-checkpoint wrappers around a state dict, and key prefixes that
# DataParallel, torch.compile and wrapper modules add.
WRAPPER_KEYS = ("ema", "model", "state_dict", "module", "params")
PREFIXES = ("module.", "_orig_mod.", "model.")


def unwrap(obj: object) -> dict[str, Any]:
  """The state dict inside common training-checkpoint wrappers
  (``{"ema": ...}``, ``{"model": ...}``, ...), with ``module.``-style key
  prefixes removed."""
  while isinstance(obj, Mapping) and not any(
    hasattr(v, "shape") for v in obj.values()
  ):
    for key in WRAPPER_KEYS:
      if key in obj:
        obj = obj[key]
        break
    else:
      raise UserError(
        f"no state_dict found in the checkpoint; top-level "
        f"keys: {sorted(obj)[:10]}"
      )
  if not isinstance(obj, Mapping):
    raise UserError(
      f"the checkpoint holds a {type(obj).__name__}, not a state dict"
    )
  out = {}
  for k, v in obj.items():
    for prefix in PREFIXES:
      if k.startswith(prefix):
        k = k[len(prefix) :]
    out[k] = v
  return out


def read(
  path: str | os.PathLike[str], *, missing_torch_hint: str = ""
) -> dict[str, np.ndarray]:
  """The state dict in a weight file, as numpy arrays in their stored dtype
  (bfloat16 becomes float32, which numpy lacks). Wrappers are unwrapped
  (``unwrap``); entries that are not tensors are dropped.

  Torch pickles are read with ``weights_only=True`` and need PyTorch; the
  ImportError otherwise says so, followed by ``missing_torch_hint``.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise UserError(
      f"unknown weight file type {suffix!r} for {path!r}; "
      f"expected {', '.join(SUFFIXES)}"
    )
  if suffix in TORCH_SUFFIXES:
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        f"reading {path!r} (a torch-pickled file) needs PyTorch, which is "
        "not installed: pip install torch (the CPU build is enough)"
        + (f". {missing_torch_hint}" if missing_torch_hint else "")
      ) from e
  if not paths.as_path(path).exists():
    raise FileNotFoundError(f"no weight file at {path!r}")
  try:
    return _read(paths.local_copy(path), suffix)  # gs:// copied once.
  except Exception as e:  # pylint: disable=broad-except
    # safetensors, numpy and torch (whose unpickler raises anything from
    # IndexError to UnpicklingError) say what is wrong but not with which
    # file.
    if isinstance(e, (ImportError, FileNotFoundError)):
      raise
    raise UserError(
      f"cannot read the weight file {path!r} (damaged or not "
      f"a {suffix} file?): {e}"
    ) from e


def _read(path: str, suffix: str) -> dict[str, np.ndarray]:
  if suffix in TORCH_SUFFIXES:
    import torch  # pylint: disable=g-import-not-at-top
  if suffix == ".safetensors":
    from safetensors import safe_open

    out = {}
    # The flax framework reads bfloat16 tensors too (numpy cannot).
    with safe_open(path, framework="flax") as f:
      for key in f.keys():
        value = f.get_tensor(key)
        if value.dtype.name == "bfloat16":
          value = value.astype(np.float32)
        out[key] = np.asarray(value)
    return unwrap(out)
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return unwrap({k: f[k] for k in f.files})
  obj = unwrap(torch.load(path, map_location="cpu", weights_only=True))
  return {
    k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
    for k, v in obj.items()
    if hasattr(v, "detach")
  }


def kernel_from_torch(array: np.ndarray) -> np.ndarray:
  """A PyTorch Linear (out, in) or Conv2d (O, I, kh, kw) weight in JAX
  layout: (in, out) or (kh, kw, I, O) (NHWC convolutions)."""
  if array.ndim == 2:
    return array.T
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def kernel_to_torch(array: np.ndarray) -> np.ndarray:
  """The inverse of ``kernel_from_torch``."""
  if array.ndim == 2:
    return array.T
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of a JAX-layout kernel's shape."""
  shape = tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


# --------------------------------------------------------------------------
# NNX modules whose attribute names follow a PyTorch module's, one to one.

# NNX leaf names -> PyTorch's. BatchNorm statistics keep PyTorch's names.
LEAF_TO_TORCH = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "weight": "weight",
  "mean": "running_mean",
  "var": "running_var",
  "running_mean": "running_mean",
  "running_var": "running_var",
}
# PyTorch's BatchNorm training counter: in state dicts, never a weight.
IGNORED_SUFFIXES = (".num_batches_tracked",)


def torch_key(path: Sequence[Any]) -> str:
  """The PyTorch state-dict key of an NNX variable path, e.g.
  ``('down_blocks', 0, 'conv', 'kernel')`` -> ``down_blocks.0.conv.weight``
  (leaf names not in ``LEAF_TO_TORCH`` are kept: ``pos_embed``, ``gamma``).
  """
  *modules, leaf = [str(p) for p in path]
  return ".".join(modules + [LEAF_TO_TORCH.get(leaf, leaf)])


def named_variables(
  model: nnx.Module, variable_filter: nnx.filterlib.Filter = None
) -> dict[str, Any]:
  """``{torch key: nnx.Variable}`` of a module's parameters and batch
  statistics (or of ``variable_filter``), in the module's order."""
  return {k: v for k, (v, _) in _variables(model, variable_filter).items()}


def _variables(model, variable_filter=None):
  """``{torch key: (variable, is_kernel)}``: only ``kernel`` leaves (Linear
  and Conv weights) change layout; embedding tables and norms do not."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  variable_filter = variable_filter or nnx.Any(nnx.Param, nnx.BatchStat)
  flat = nnx.to_flat_state(nnx.state(model, variable_filter))
  return {
    torch_key(path): (var, str(path[-1]) == "kernel") for path, var in flat
  }


def _torch_layout_shape(var, kernel: bool):
  shape = tuple(var.get_value().shape)
  return torch_shape(shape) if kernel else shape


def summarise(keys: Sequence[str], limit: int = 8) -> str:
  """``a, b, c and 5 more``: a short list of keys for an error message."""
  keys = sorted(keys)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def check_keys(
  state_dict: Mapping[str, Any],
  expected: Mapping[str, Sequence[int]],
  what: str,
  *,
  allow_unexpected: bool = False,
) -> None:
  """Raises ValueError unless ``state_dict`` has exactly the keys of
  ``expected`` (or, with ``allow_unexpected``, at least them) with those
  (PyTorch-layout) shapes, naming the first offenders and ``what`` the model
  is. ``IGNORED_SUFFIXES`` are skipped."""
  given = {
    k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)
  }
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  if missing:
    raise UserError(
      f"the state dict lacks {len(missing)} key(s) of the "
      f"{what}: {summarise(missing)}"
    )
  if unexpected and not allow_unexpected:
    raise UserError(
      f"the state dict has {len(unexpected)} key(s) that the "
      f"{what} does not: {summarise(unexpected)}"
    )
  for key, shape in expected.items():
    got = tuple(np.shape(given[key]))
    if got != tuple(shape):
      raise UserError(
        f"shape mismatch for {key!r}: the state dict has "
        f"{got}, the model expects {tuple(shape)} (PyTorch "
        f"layout; the model: {what})"
      )


def expected_shapes(
  model: nnx.Module, variable_filter: nnx.filterlib.Filter = None
) -> dict[str, tuple[int, ...]]:
  """``{torch key: PyTorch-layout shape}`` of a module's variables."""
  return {
    k: _torch_layout_shape(v, kernel)
    for k, (v, kernel) in _variables(model, variable_filter).items()
  }


def load_module(
  model: nnx.Module,
  state_dict: Mapping[str, Any],
  what: str,
  variable_filter: nnx.filterlib.Filter = None,
  *,
  allow_unexpected: bool = False,
) -> nnx.Module:
  """Copies a PyTorch-layout state dict into ``model`` in place, strictly:
  missing keys (and unexpected ones, unless ``allow_unexpected``) and shape
  mismatches raise ValueError (naming them) before anything changes. Arrays
  take each variable's dtype. Returns ``model``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  variables = _variables(model, variable_filter)
  check_keys(
    state_dict,
    {k: _torch_layout_shape(v, kernel) for k, (v, kernel) in variables.items()},
    what,
    allow_unexpected=allow_unexpected,
  )
  for key, (var, kernel) in variables.items():
    array = np.asarray(state_dict[key])
    if kernel:
      array = kernel_from_torch(array)
    var.set_value(jnp.asarray(array, dtype=var.get_value().dtype))
  return model


def module_state_dict(
  model: nnx.Module, variable_filter: nnx.filterlib.Filter = None
) -> dict[str, np.ndarray]:
  """A module's variables as a PyTorch-layout state dict (numpy)."""
  out = {}
  for k, (v, kernel) in _variables(model, variable_filter).items():
    array = np.asarray(v.get_value())
    out[k] = np.ascontiguousarray(kernel_to_torch(array) if kernel else array)
  return out
