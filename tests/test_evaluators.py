"""Evaluators declared in the config (tim_jax.training.evaluators)."""

import os

import numpy as np
import pytest
import train_utils

from tim_jax import training
from tim_jax.shapes import scoring
from tim_jax.training import evaluators

pytestmark = [pytest.mark.slow]


def _oracle_config():
  config = train_utils.tiny_t2i(num_steps=2)
  config.evals.holdout_loss.every = 2
  o = config.evals.shapes_oracle
  o.every, o.nfe, o.num, o.batch_size, o.reference_num = 2, (1, 2), 8, 8, 64
  return config


def test_the_tiny_configs_turn_the_oracle_on():
  from tim_jax.config import config_base

  for spec in ("configs/t2i.py", "configs/c2i.py"):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = config_base.load_file(os.path.join(root, spec))
    assert c.evals.shapes_oracle.every > 0
    assert c.evals.holdout_loss.every > 0


def test_oracle_scores_samples_of_the_ema_model():
  config = _oracle_config()
  trainer = training.Trainer(config)
  evals = evaluators.build(config, trainer)
  assert sorted(evals) == ["holdout_loss", "shapes_oracle"]
  state = trainer.init_state()
  scores = evals["shapes_oracle"](trainer, state)
  assert sorted(k for k in scores if k.startswith("oracle/nfe1/")) == sorted(
    f"oracle/nfe1/{s}" for s in scoring.SCORES
  )
  assert set(k.split("/")[1] for k in scores) == {"nfe1", "nfe2"}
  real = evals["shapes_oracle"].scorer.real_scores()
  # An untrained model draws noise: nothing right, far from real images.
  assert real["overall"] == 1.0
  assert scores["oracle/nfe1/overall"] < 0.5
  assert scores["oracle/nfe1/fd"] > 2 * real["fd"]
  holdout = evals["holdout_loss"](trainer, state)
  assert np.isfinite(holdout["holdout/loss"]) and holdout["holdout/loss"] > 0


def test_evaluators_write_to_tensorboard_on_their_schedule(tmp_path):
  config = _oracle_config()
  config.evals.holdout_loss.every = 1
  config.evals.shapes_oracle.nfe = (1,)
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(config, workdir)
  events = [f for f in os.listdir(workdir) if f.startswith("events.out")]
  data = b"".join(open(os.path.join(workdir, f), "rb").read() for f in events)
  # holdout every step (twice), the oracle every 2 steps (once).
  assert data.count(b"holdout/loss") == 2
  assert data.count(b"oracle/nfe1/fd") == 1
  assert data.count(b"oracle/nfe1/overall_two") == 1


def test_misconfigured_evaluators_are_named():
  config = train_utils.tiny_t2i()
  trainer = training.Trainer(config)
  config.evals.fid.every = 10
  with pytest.raises(ValueError, match="evals.fid needs reference"):
    evaluators.build(config, trainer)
  c2 = train_utils.tiny_c2i()
  c2.evals.shapes_oracle.every = 1
  c2.data.name = "latents"
  with pytest.raises(ValueError, match="shapes_oracle reads only"):
    evaluators.ShapesOracle(c2, None, every=1)


def test_fid_evaluator_against_reference_statistics(tmp_path):
  from test_fid import _random_state_dict

  from tim_jax.eval import fid, inception

  weights = str(tmp_path / "inception.safetensors")
  inception.save_state_dict(_random_state_dict(0), weights)
  extractor = inception.FeatureExtractor(
    inception.load_fid_weights(weights), batch_size=4
  )
  real = scoring.real_images("c2i", 4, 16, seed=3)
  reference = str(tmp_path / "ref.npz")
  fid.Statistics.from_features(extractor(real)).save(reference)

  config = train_utils.tiny_c2i()
  f = config.evals.fid
  f.every, f.nfe, f.num, f.batch_size = 1, (1,), 4, 4
  f.reference, f.inception_weights = reference, weights
  trainer = training.Trainer(config)
  evaluator = evaluators.build(config, trainer)["fid"]
  score = evaluator(trainer, trainer.init_state())
  assert list(score) == ["fid/nfe1"]
  # Real images of other scenes are closer to the reference than an
  # untrained model's samples.
  other = fid.Statistics.from_features(
    extractor(scoring.real_images("c2i", 4, 16, seed=4))
  )
  assert (
    0
    < other.frechet_distance(fid.Statistics.load(reference))
    < (score["fid/nfe1"])
  )
