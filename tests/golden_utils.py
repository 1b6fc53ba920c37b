"""Loading the golden cases computed by the official PyTorch code."""

import json
import os

import jax.numpy as jnp
import numpy as np

from tim_jax.method import transports
from tim_jax.weights import convert

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
CASES = ("c2i_tiny", "t2i_tiny")


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nhwc(a):
  return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def nchw(a):
  return np.moveaxis(np.asarray(a), -1, 1)


class Golden:
  """One golden folder: the network, the transport and the arrays."""

  def __init__(self, name, dtype):
    self.name = name
    self.dtype = dtype
    folder = os.path.join(GOLDEN, name)
    with open(os.path.join(folder, "network.json")) as f:
      self.meta = json.load(f)
    self.weights = os.path.join(folder, "model.safetensors")
    self.arrays = dict(np.load(os.path.join(folder, "cases.npz")))
    self.kind = self.meta["kind"]
    self.transport = transports.get(
      self.meta["transport"], T_max=self.meta["T_max"], T_min=self.meta["T_min"]
    )
    self.model = convert.load_official(
      self.weights,
      self.kind,
      self.meta["network"],
      dtype=dtype,
      param_dtype=dtype,
    )

  def x(self, key):
    """An image array in NHWC and the test dtype."""
    return jnp.asarray(nhwc(self.arrays[key]), self.dtype)

  def a(self, key):
    """Any other input in the test dtype (labels stay integer)."""
    v = self.arrays[key]
    if np.issubdtype(v.dtype, np.integer):
      return jnp.asarray(v)
    return jnp.asarray(v, self.dtype)

  def fn(self, x, t, r, y):
    return self.model(x, t, r, y)
