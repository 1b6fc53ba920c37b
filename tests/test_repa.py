"""REPA with the teacher inside the step, and the fidelity fixes that came
with it: the model-guidance teacher's conditions, the holdout loss of
model-guidance runs, initialising from a checkpoint with ignored keys."""

import os

import jax
import numpy as np
import pytest
from train_utils import tiny_c2i, tiny_t2i

from tim_jax import training
from tim_jax.core import sharding
from tim_jax.data import kinds
from tim_jax.encoders import radio
from tim_jax.method import transition
from tim_jax.weights import convert

pytestmark = [pytest.mark.slow]

TEACHER = os.path.join(
  os.path.dirname(__file__), "data", "radio", "radio_plain.pth"
)


def with_teacher(c):
  c.loss_extras.repa_encoder = "radio_v2_5_b"
  c.loss_extras.repa_encoder_path = TEACHER
  c.model.use_projector = True
  c.model.network.z_dim = 64  # The test teacher's width.
  return c


def test_teacher_runs_inside_the_step_on_the_batch_pixels():
  c = with_teacher(tiny_c2i(num_steps=2))
  trainer = training.Trainer(c)
  host = next(kinds.iterator(c, kinds.source(c)))
  batch = sharding.global_batch(host, trainer.mesh)
  # The targets are the teacher's features of the (pixel-space) images at
  # the TiM token grid.
  want = radio.load(TEACHER)(host["image"], grid=(4, 4))
  got = trainer.repa_target(batch, trainer.frozen)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6
  )
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, batch)
  assert float(metrics["proj_loss"]) > 0
  assert np.isfinite(float(metrics["loss"]))


def test_teacher_configuration_errors_say_what_to_do():
  c = with_teacher(tiny_c2i())
  c.loss_extras.repa_encoder_path = ""
  with pytest.raises(ValueError, match="repa_encoder_path=FILE"):
    training.Trainer(c)
  c = with_teacher(tiny_c2i())
  c.model.network.z_dim = 16
  with pytest.raises(ValueError, match="64 wide but model.network.z_dim"):
    training.Trainer(c)
  c = with_teacher(tiny_c2i())
  c.loss_extras.repa_feature_key = "repa_features"
  with pytest.raises(ValueError, match="two sources of REPA targets"):
    training.Trainer(c)
  c = tiny_c2i()
  c.loss_extras.repa_encoder = "dinov3"
  with pytest.raises(ValueError, match="radio_v2_5_b"):
    training.Trainer(c)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_model_guidance_teacher_sees_what_the_official_trainer_gives(
  kind, monkeypatch
):
  """C2I: the undropped labels (trainer_c2i.py); T2I: the dropped caption
  features (trainer_t2i.py)."""
  c = tiny_c2i() if kind == "c2i" else tiny_t2i()
  c.loss.enhance_target = True
  c.loss.w_cond = 0.75
  c.conditioning.drop_prob = 1.0  # Every condition dropped.
  trainer = training.Trainer(c)
  batch = sharding.global_batch(
    next(kinds.iterator(c, kinds.source(c))), trainer.mesh
  )
  seen = {}

  def spy(model_fn, x, y, key, **kw):
    seen.update(y=y, teacher_cond=kw["teacher_cond"], null=kw["null_cond"])
    return real(model_fn, x, y, key, **kw)

  real = transition.loss
  monkeypatch.setattr(transition, "loss", spy)
  state = trainer.init_state()
  trainer.loss(state.params, state.ema, batch, jax.random.key(0))
  leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]
  for a, b in zip(leaves(seen["y"]), leaves(seen["null"])):
    np.testing.assert_array_equal(a, b)  # The student's: all dropped.
  same = all(
    np.array_equal(a, b)
    for a, b in zip(leaves(seen["teacher_cond"]), leaves(seen["y"]))
  )
  assert same == (kind == "t2i")


def test_holdout_loss_works_for_model_guidance():
  from tim_jax.training import evaluators

  c = tiny_c2i(num_steps=2)
  c.loss.enhance_target = True
  c.loss.w_cond = 0.75
  c.evals.holdout_loss.every = 1
  trainer = training.Trainer(c)
  state = trainer.init_state()
  out = evaluators.build(c, trainer)["holdout_loss"](trainer, state)
  assert np.isfinite(out["holdout/loss"]) and out["holdout/loss"] > 0


def test_init_from_a_checkpoint_with_ignored_keys(tmp_path):
  c = tiny_c2i(num_steps=2)
  source = training.Trainer(c)
  src_state = source.init_state()
  src_state = src_state.replace(
    params=jax.tree.map(lambda p: p + 0.5, src_state.params)
  )
  model = source.pipeline.model(src_state.params)
  path = str(tmp_path / "official.safetensors")
  convert.save_official(model, path)

  c2 = tiny_c2i(num_steps=2)
  c2.seed = 7
  trainer = training.Trainer(c2)
  fresh = trainer.init_state()
  state = trainer.initialise_from(fresh, path, ("t_embedder",))
  names = lambda st: {
    convert.official_name(p): np.asarray(v.get_value())
    for p, v in __import__("flax").nnx.to_flat_state(st.params)
  }
  got, want, init = names(state), names(src_state), names(fresh)
  assert any("t_embedder" in k for k in got)
  for k, v in got.items():
    expected = init[k] if "t_embedder" in k else want[k]
    np.testing.assert_array_equal(v, expected, err_msg=k)
  ema = names(state.replace(params=state.ema))
  for k in got:
    np.testing.assert_array_equal(ema[k], got[k])
  # And through the loop: config.init_from at a fresh start.
  c3 = tiny_c2i(num_steps=1)
  c3.init_from = path
  c3.optimizer.base_lr = 0.0
  c3.ema_decay = 1.0
  out = training.train_and_evaluate(c3, str(tmp_path / "run"))
  for k, v in names(out).items():
    np.testing.assert_allclose(v, want[k], atol=1e-6, err_msg=k)
