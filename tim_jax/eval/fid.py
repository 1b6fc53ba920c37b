"""Fréchet distances between Gaussians fitted to features (FID and friends).

The Fréchet Inception Distance compares two image sets through the mean and
covariance of their InceptionV3 pool3 features (``tim_jax.eval.inception``):

  FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The statistics here are plain float64 numpy and know nothing about images,
so they serve any feature extractor (the command that reads images is
``python -m tim_jax.commands.fid``). Statistics are stored as ``.npz`` files with the
keys ``mu`` and ``sigma``, the layout of pytorch-fid's ``--save-stats`` output
and of the reference batches of OpenAI's guided-diffusion evaluation suite
(which carry extra arrays that are ignored here), so published reference
statistics can be used directly.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import TYPE_CHECKING, Union

import numpy as np

from tim_jax.core import paths
from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from jax.typing import ArrayLike

PathLike = Union[str, "os.PathLike[str]"]

# Relative asymmetry above which a "covariance" is rejected: np.cov output and
# stored statistics are symmetric to rounding, so anything larger means that a
# wrong array (e.g. a feature matrix that happens to be square) was passed.
_SYMMETRY_RTOL = 1e-6


def _check_gaussian(mu, sigma, which: str):
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1:
    raise ValueError(f"mu{which} must be a vector (D,), got shape {mu.shape}")
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise ValueError(
      f"sigma{which} must be ({d}, {d}) to match mu{which} of "
      f"shape {mu.shape}, got shape {sigma.shape}"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"mu{which} / sigma{which} contain NaN or inf")
  scale = max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny)
  if float(np.max(np.abs(sigma - sigma.T))) > _SYMMETRY_RTOL * scale:
    raise ValueError(
      f"sigma{which} is not symmetric; expected a covariance matrix"
    )
  # Symmetrise exactly so that eigh sees the matrix it assumes.
  return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """The symmetric square root of a covariance matrix."""
  w, v = np.linalg.eigh(sigma)
  # Sample covariances are PSD but rounding leaves eigenvalues of order
  # -1e-16 * ||S||; they are zero in exact arithmetic.
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
  """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

  S1 S2 is not symmetric, so its principal square root (scipy.linalg.sqrtm, as
  in pytorch-fid) goes through a complex Schur form, can return spurious
  imaginary parts and fails when the product is singular, which is the normal
  case for 2048-d features from fewer than 2049 images. Instead: the
  eigenvalues of S1 S2 = R (R S2) with R = S1^{1/2} equal those of
  (R S2) R = R S2 R (AB and BA share eigenvalues), and R S2 R is symmetric
  PSD; so the trace is the sum of the square roots of the eigenvalues of
  R S2 R, computed with two real symmetric eigendecompositions and no epsilon
  offset, singular or not.
  """
  root1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
  m = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
  w = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(
  mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, S1), N(mu2, S2).

  All arithmetic is float64. Raises ValueError on shape mismatches, non-finite
  values and non-symmetric covariances.
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
  mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise UserError(
      f"the two Gaussians have different dimensions: mu1 "
      f"{mu1.shape} vs mu2 {mu2.shape}: are the reference statistics of "
      "another network?"
    )
  diff = mu1 - mu2
  return float(
    diff @ diff
    + np.trace(sigma1)
    + np.trace(sigma2)
    - 2.0 * trace_sqrt_product(sigma1, sigma2)
  )


def statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of an (N, D) feature matrix, float64, unbiased covariance."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {x.shape}")
  if x.shape[0] < 2:
    raise UserError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf")
  return x.mean(axis=0), np.cov(x, rowvar=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
  """Mean and covariance of a feature set, as used by the FID."""

  mu: np.ndarray
  sigma: np.ndarray

  def __post_init__(self):
    mu, sigma = _check_gaussian(self.mu, self.sigma, "")
    object.__setattr__(self, "mu", mu)
    object.__setattr__(self, "sigma", sigma)

  @property
  def dim(self) -> int:
    """The feature width."""
    return int(self.mu.shape[0])

  @classmethod
  def from_features(cls, features: ArrayLike) -> Statistics:
    """The statistics of an (N, D) feature array."""
    return cls(*statistics(features))

  def save(self, path: PathLike) -> None:
    """Writes ``mu`` and ``sigma`` to an ``.npz`` file (pytorch-fid layout)."""
    buf = io.BytesIO()
    np.savez(buf, mu=self.mu, sigma=self.sigma)
    paths.write_bytes(path, buf.getvalue())  # Local or gs://.

  @classmethod
  def load(cls, path: PathLike) -> Statistics:
    """Reads ``mu`` and ``sigma`` from an ``.npz`` file; other keys are ignored.

    npz members are read lazily, so the 10k images stored next to the
    statistics in guided-diffusion reference batches are never loaded.
    """
    local = paths.local_copy(path)  # gs:// copied once.
    with np.load(local, allow_pickle=False) as f:
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise UserError(
          f"{os.fspath(path)!r} has no {missing} array(s); its "
          f"keys are {sorted(f.files)}. Expected FID "
          "statistics saved with keys 'mu' and 'sigma'."
        )
      try:
        return cls(f["mu"], f["sigma"])
      except ValueError as e:  # Not FID statistics: name the file.
        raise UserError(f"{os.fspath(path)!r}: {e}") from None

  def frechet_distance(self, other: Statistics) -> float:
    """The Fréchet distance to ``other``."""
    return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def fid_from_features(features_a: ArrayLike, features_b: ArrayLike) -> float:
  """Fréchet distance between the Gaussians fitted to two feature sets."""
  return Statistics.from_features(features_a).frechet_distance(
    Statistics.from_features(features_b)
  )


class RunningStatistics:
  """Mean and covariance accumulated batch by batch, in float64.

  Holds O(D^2) numbers whatever the number of images, so 50k features need
  not be kept. Batches are merged with the pairwise update of Chan, Golub and
  LeVeque (per-batch centred scatter plus a correction for the shift of the
  mean) rather than with raw sums of x x^T, which would subtract two large,
  nearly equal numbers when the mean is large compared with the spread.
  """

  def __init__(self, dim: int | None = None):
    self.count = 0
    self._dim = dim
    self._mean = None
    self._scatter = None  # sum over samples of (x - mean)(x - mean)^T

  @property
  def dim(self) -> int | None:
    """The feature width, once the first batch is in."""
    return self._dim

  def update(self, batch_features: ArrayLike) -> RunningStatistics:
    """Adds a (n, D) batch of features; returns self."""
    x = np.asarray(batch_features, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"batch_features must be (n, D), got shape {x.shape}")
    if self._dim is not None and x.shape[1] != self._dim:
      raise ValueError(
        f"batch_features have {x.shape[1]} features, the "
        f"accumulator holds {self._dim}"
      )
    if not np.all(np.isfinite(x)):
      raise ValueError("batch_features contain NaN or inf")
    n = x.shape[0]
    if n == 0:
      return self
    self._dim = x.shape[1]
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    scatter_b = centred.T @ centred
    if self.count == 0:
      self._mean, self._scatter = mean_b, scatter_b
    else:
      total = self.count + n
      delta = mean_b - self._mean
      self._scatter = (
        self._scatter
        + scatter_b
        + np.outer(delta, delta) * (self.count * n / total)
      )
      self._mean = self._mean + delta * (n / total)
    self.count += n
    return self

  def finalize(self) -> Statistics:
    """The mean and covariance so far (at least 2 samples)."""
    if self.count < 2:
      raise UserError(
        f"a covariance needs at least 2 samples, got {self.count}"
      )
    sigma = self._scatter / (self.count - 1)
    return Statistics(self._mean.copy(), 0.5 * (sigma + sigma.T))


# --------------------------------------------------------------------------
# Inception Score and the command.


def inception_score(logits: ArrayLike, split_size: int = 5000) -> float:
  """exp(E_x KL(p(y|x) || p(y))) of classifier logits (N, K), averaged
  over consecutive splits of ``split_size`` as OpenAI's ADM evaluator
  (``evaluations/evaluator.py``) computes it."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < 1:
    raise ValueError(f"logits must be (N, K), got shape {logits.shape}")
  z = logits - logits.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for start in range(0, len(p), split_size):
    part, log_part = (
      p[start : start + split_size],
      log_p[start : start + split_size],
    )
    marginal = np.log(part.mean(axis=0, keepdims=True))
    kl = (part * (log_part - marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))
