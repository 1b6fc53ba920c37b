"""How the TiM loss lays out and weights a batch.

``LossConfig``: row counts of the positional partition (diffusion rows first,
consistency rows last, round-half-even, per block with ``groups``) and the
validation of its values; ``sample_t_and_r``: t = max and r = min of two
draws, then the diffusion and consistency rows; ``time_weight``: every
weighting type and warp of the official trainer; and the share metrics the
loss reports for the partition.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transition_utils import EDM, OT, P0, jit_run, normal, student

from tim_jax.method import transition, transports

TRIG = transports.TrigFlow()  # sigma_d = 0.5.


# --- 1. LossConfig -----------------------------------------------------------


def test_counts_round_half_even_and_groups():
  cfg = transition.LossConfig()
  assert cfg.counts(64) == (32, 6)  # 6.4 -> 6.
  assert cfg.counts(256) == (128, 26)  # 25.6 -> 26.
  assert cfg.counts(5) == (2, 0)  # 2.5 -> 2, 0.5 -> 0.
  assert cfg.counts(15) == (8, 2)  # 7.5 -> 8, 1.5 -> 2.
  quarter = transition.LossConfig(diffusion_ratio=0.25, consistency_ratio=0.25)
  assert quarter.counts(2) == (0, 0)  # round(0.5) == 0.
  assert quarter.counts(6) == (2, 2)  # round(1.5) == 2.
  assert quarter.counts(10) == (2, 2)  # round(2.5) == 2.
  # Per block.
  assert transition.LossConfig(groups=4).counts(256) == (32, 6)
  assert transition.LossConfig(groups=2).counts(64) == (16, 3)
  assert transition.LossConfig(groups=2).counts(8) == (2, 0)
  with pytest.raises(ValueError, match="groups=3"):
    transition.LossConfig(groups=3).counts(64)
  with pytest.raises(ValueError, match="overlap"):
    transition.LossConfig(diffusion_ratio=0.6, consistency_ratio=0.5).counts(10)
  # Touching is fine.
  assert transition.LossConfig(
    diffusion_ratio=0.5, consistency_ratio=0.5
  ).counts(10) == (5, 5)


@pytest.mark.parametrize(
  "kwargs, word",
  [
    (dict(derivative="fd"), "'fd'"),
    (dict(weight_time_type="linear"), "'linear'"),
    (dict(diffusion_ratio=1.5), "1.5"),
    (dict(consistency_ratio=-0.1), "-0.1"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(groups=0), "groups"),
  ],
)
def test_config_rejects_bad_values(kwargs, word):
  with pytest.raises(ValueError, match=word):
    transition.LossConfig(**kwargs)


# --- 2. sample_t_and_r -------------------------------------------------------


def _phi(u):
  return 0.5 * (1.0 + math.erf(u / math.sqrt(2.0)))


@pytest.mark.parametrize("groups", [1, 4])
def test_sample_t_and_r(groups):
  b = 8192
  cfg = transition.LossConfig(groups=groups)
  n_d, n_c = cfg.counts(b)
  per = b // groups
  t, r = transition.sample_t_and_r(jax.random.key(3), b, OT, cfg)
  assert t.shape == r.shape == (b,) and t.dtype == jnp.float32
  t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
  assert np.all(t >= r)
  pos = np.arange(b) % per
  diff, cons = pos < n_d, pos >= per - n_c
  mid = ~diff & ~cons
  assert diff.sum() == groups * n_d and cons.sum() == groups * n_c > 0
  np.testing.assert_array_equal(r[diff], t[diff])
  np.testing.assert_array_equal(r[cons], OT.T_min)
  assert np.all(r[mid] < t[mid]) and np.all(r[mid] > OT.T_min)
  # t is the max of two logit-normal draws: CDF Phi(logit(s))^2; the r of
  # the interval rows is the min: 1 - (1 - Phi)^2.
  tol = 4.0 / math.sqrt(mid.sum())
  for s in (0.2, 0.4, 0.5, 0.6, 0.8):
    phi = _phi(math.log(s / (1 - s)))
    assert abs(np.mean(t <= s) - phi**2) < 4.0 / math.sqrt(b)
    assert abs(np.mean(r[mid] <= s) - (1 - (1 - phi) ** 2)) < tol


def test_sample_t_and_r_edm_dtype(x64):
  cfg = transition.LossConfig(diffusion_ratio=0.25, consistency_ratio=0.25)
  t, r = transition.sample_t_and_r(jax.random.key(0), 16, EDM, cfg, jnp.float64)
  assert t.dtype == r.dtype == jnp.float64
  t, r = np.asarray(t), np.asarray(r)
  np.testing.assert_array_equal(r[:4], t[:4])
  np.testing.assert_array_equal(r[-4:], 0.01)
  assert np.all(r[4:12] < t[4:12]) and np.all(t > 0)


# --- 3. time_weight ----------------------------------------------------------


def _hand_weight(t, r, sd, kind, tangent, sigmoid, t_and_r):
  if tangent:
    t, r = np.tan(t), np.tan(r)
  elif sigmoid:
    t, r = t / (1 - t), r / (1 - r)
  d = t - r if t_and_r else t
  return {
    "constant": np.ones_like(d),
    "reciprocal": 1 / (d + sd),
    "sqrt": 1 / np.sqrt(d + sd),
    "square": 1 / (d + sd) ** 2,
    "Soft-Min-SNR": 1 / (d * d + sd * sd),
  }[kind]


@pytest.mark.parametrize("transport", [OT, TRIG], ids=["sd1", "sd0.5"])
@pytest.mark.parametrize("t_and_r", [True, False])
@pytest.mark.parametrize("warp", ["tangent", "sigmoid", "none", "both"])
@pytest.mark.parametrize("kind", transition.WEIGHT_TIME_TYPES)
def test_time_weight(kind, warp, t_and_r, transport):
  rs = np.random.RandomState(0)
  t = rs.uniform(0.05, 0.9, 32)
  r = t * rs.uniform(0.0, 1.0, 32)
  r[:4] = t[:4]
  r[-4:] = 0.0
  tangent = warp in ("tangent", "both")
  sigmoid = warp in ("sigmoid", "both")
  cfg = transition.LossConfig(
    weight_time_type=kind,
    weight_time_tangent=tangent,
    weight_time_sigmoid=sigmoid,
    weight_t_and_r=t_and_r,
  )
  got = transition.time_weight(
    jnp.asarray(t, jnp.float32), jnp.asarray(r, jnp.float32), transport, cfg
  )
  # Tangent wins when both warps are set, as in the official
  # ``TransitionSchedule.time_weighting``.
  expected = _hand_weight(
    t, r, transport.sigma_d, kind, tangent, sigmoid and not tangent, t_and_r
  )
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5)


def test_time_weight_default_is_paper_weight():
  t = np.array([0.2, 0.5, 0.9, 1.0])
  r = np.array([0.2, 0.1, 0.0, 0.5])
  got = transition.time_weight(
    jnp.asarray(t, jnp.float32),
    jnp.asarray(r, jnp.float32),
    OT,
    transition.LossConfig(),
  )
  np.testing.assert_allclose(
    np.asarray(got), (1 + np.tan(t) - np.tan(r)) ** -0.5, rtol=1e-5
  )
  assert float(got[0]) == 1.0


# --- 4. Share metrics of the partition ---------------------------------------


def test_share_metrics():
  def body(x64_rows, x_grouped):
    cond = jnp.zeros((64,))
    return [
      transition.loss(
        student(P0),
        x,
        cond,
        jax.random.key(0),
        transport=OT,
        config=transition.LossConfig(groups=g),
      )[1]
      for x, g in ((x64_rows, 1), (x_grouped, 2))
    ]

  x = jnp.asarray(normal(35, (64, 2, 2, 3)), jnp.float32)
  plain, grouped = jit_run(body, x, x)
  for m, shares in (
    (plain, (32 / 64, 6 / 64, 26 / 64)),
    (grouped, (16 / 32, 3 / 32, 13 / 32)),
  ):
    got = tuple(
      m[k] for k in ("share_diffusion", "share_consistency", "share_interval")
    )
    np.testing.assert_allclose(got, shares, rtol=1e-6)
