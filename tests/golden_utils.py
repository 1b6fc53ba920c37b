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


class OfficialTimeFeatures:
  """The official time features of one golden folder (``float64.npz``,
  tests/make_float64_golden.py), as a stand-in for
  ``TimestepEmbedder.features``.

  The official code forms these in float32 even in float64, with
  PyTorch's float32 exp, cos and sin, which differ from XLA's by an ulp on
  some entries; fed the official features, a float64 tim_jax run checks
  everything else at float64 precision. A time the official runs did not
  feed (the DDE of a diffusion row, which it skips) gets NaN features, so
  an output that depends on one cannot pass. The tangent (for the "jvp" derivative) follows PyTorch's
  forward-mode rule, in float32: ``dt * freqs`` times ``-sin`` or ``cos``.
  """

  def __init__(self, name):
    z = np.load(os.path.join(GOLDEN, name, "float64.npz"))
    self.rows = {
      t.tobytes(): f for t, f in zip(z["temb_t"], z["temb_features"])
    }
    self.freqs = z["temb_freqs"]
    self.jvp = (z["temb_jvp_t"], z["temb_jvp_dt"], z["temb_jvp_tangent"])

  def lookup(self, t):
    t = np.asarray(t, np.float32)
    nan = np.full(2 * len(self.freqs), np.nan, np.float32)
    return np.stack([self.rows.get(v.tobytes(), nan) for v in t])

  def tangent(self, features, dt):
    """PyTorch's forward-mode tangent of the features, in float32."""
    half = features.shape[-1] // 2
    d_args = dt.astype(jnp.float32)[:, None] * jnp.asarray(self.freqs)[None]
    cos, sin = features[:, :half], features[:, half:]
    return jnp.concatenate([d_args * -sin, d_args * cos], axis=-1)

  def __call__(self, t):
    import jax  # pylint: disable=import-outside-toplevel

    @jax.custom_jvp
    def features(t):
      shape = jax.ShapeDtypeStruct(t.shape + (2 * len(self.freqs),), np.float32)
      return jax.pure_callback(self.lookup, shape, t)

    @features.defjvp
    def _(primals, tangents):
      y = features(primals[0])
      return y, self.tangent(y, tangents[0])

    return features(t)
