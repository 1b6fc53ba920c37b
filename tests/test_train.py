"""The train loop: resume, guard, checkpoints, sample grids, entry point."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_c2i

from tim_jax import training
from tim_jax.core import sharding
from tim_jax.data import kinds
from tim_jax.weights import checkpoint

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(state):
  return [
    np.asarray(x)
    for x in jax.tree.leaves((state.params, state.ema, state.opt_state))
  ]


def test_resume_equals_uninterrupted(tmp_path, caplog):
  with caplog.at_level("INFO"):
    straight = training.train_and_evaluate(
      tiny_c2i(num_steps=6, every=3), str(tmp_path / "a")
    )
  # The progress lines say where the loop's time went, part by part.
  notes = [
    r.getMessage()
    for r in caplog.records
    if "work unit notes" in r.getMessage()
  ]
  assert notes and "(6/6)" in notes[-1], notes
  for part in ("data", "dispatch", "step", "checkpoint"):
    assert re.search(rf"\d+\.\d% {part}\b", notes[-1]), (part, notes[-1])
  first = training.train_and_evaluate(
    tiny_c2i(num_steps=3, every=3), str(tmp_path / "b")
  )
  assert int(first.step) == 3
  resumed = training.train_and_evaluate(
    tiny_c2i(num_steps=6, every=3), str(tmp_path / "b")
  )
  assert int(resumed.step) == int(straight.step) == 6
  for a, b in zip(_params(straight), _params(resumed)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # The resumed run really restored rather than re-initialising.
  assert not all(
    np.array_equal(a, b) for a, b in zip(_params(first), _params(resumed))
  )


def test_other_architecture_is_refused_and_files_untouched(tmp_path):
  workdir = str(tmp_path / "w")
  training.train_and_evaluate(tiny_c2i(num_steps=2, every=2), workdir)
  before = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      before[p] = (os.path.getsize(p), os.path.getmtime(p))
  other = tiny_c2i(num_steps=4, every=2)
  other.model.network.depth = 3
  with pytest.raises(ValueError, match="model.network.depth"):
    training.train_and_evaluate(other, workdir)
  after = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      after[p] = (os.path.getsize(p), os.path.getmtime(p))
  assert before == after


class _Indexed:
  """A source whose examples carry their index."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return dict(self.source[i], index=np.int64(i))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
  config = tiny_c2i(num_steps=50, every=2)
  config.max_nonfinite_steps = 3
  real = kinds.source

  # The indices of the first two shuffled batches stay finite; every other
  # example is NaN.
  from tim_jax.data import pipeline

  probe = pipeline.make_iterator(
    _Indexed(real(config)), global_batch_size=8, seed=config.data.seed
  )
  finite = set(next(probe)["index"].tolist()) | set(
    next(probe)["index"].tolist()
  )

  class Poisoned(_Indexed):
    def __getitem__(self, i):
      ex = super().__getitem__(i)
      if int(i) not in finite:
        ex["image"] = np.full_like(ex["image"], np.nan)
      return ex

  monkeypatch.setattr(
    kinds, "source", lambda c, split="train": Poisoned(real(c, split))
  )
  workdir = str(tmp_path / "nan")
  with pytest.raises(training.NonFiniteError, match="bad steps in a row"):
    training.train_and_evaluate(config, workdir)
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ck.manager.all_steps()
  assert steps, "the finite steps before the NaNs were checkpointed"
  trainer = training.Trainer(config)
  from tim_jax.data import pipeline

  it = pipeline.make_iterator(real(config), global_batch_size=8, seed=0)
  state = ck.restore(max(steps), trainer.abstract_with_shardings(), it)
  assert checkpoint.all_finite((state.params, state.ema))
  ck.close()


def test_guarded_step_keeps_parameters(tmp_path):
  config = tiny_c2i()
  trainer = training.Trainer(config)
  state = trainer.init_state()
  before = _params(state)
  batch = {
    "image": np.full((8, 16, 16, 3), np.nan, np.float32),
    "label": np.zeros((8,), np.int32),
  }
  state, metrics = trainer.train_step(
    state, sharding.global_batch(batch, trainer.mesh)
  )
  assert int(metrics["nonfinite_streak"]) == 1
  assert int(state.step) == 1
  for a, b in zip(before, _params(state)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_refuses_nonfinite_state(tmp_path):
  config = tiny_c2i()
  trainer = training.Trainer(config)
  state = trainer.init_state()
  bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ck = checkpoint.Checkpointer(str(tmp_path / "c"))
  from tim_jax.data import pipeline

  it = pipeline.make_iterator(kinds.source(config), global_batch_size=8, seed=0)
  assert ck.save(1, bad, it, {"model": {}}) is False
  assert ck.save(2, state, it, {"model": {}}) is True
  ck.close()
  assert ck.manager.all_steps() == [2]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from tim_jax import training
    from tim_jax.weights import checkpoint
    from tim_jax.data import kinds, pipeline
    from train_utils import tiny_c2i
    config = tiny_c2i()
    config.model.network.hidden_size = 256  # A state that takes a while.
    config.model.network.depth = 6
    trainer = training.Trainer(config)
    state = trainer.init_state()
    it = pipeline.make_iterator(kinds.source(config),
                                global_batch_size=8, seed=0)
    ck = checkpoint.Checkpointer({ckdir!r})
    ck.save(1, state, it, {{"model": {{}}}})
    ck.wait()
    state = state.replace(step=state.step + 1)
    ck.save(2, state, it, {{"model": {{}}}})  # Asynchronous: still writing.
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
  ckdir = str(tmp_path / "ck")
  script = KILL_SCRIPT.format(
    tests=os.path.dirname(__file__), root=ROOT, ckdir=ckdir
  )
  proc = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  ck = checkpoint.Checkpointer(ckdir)
  assert ck.latest_step() in (1, 2)
  config = tiny_c2i()
  config.model.network.hidden_size = 256
  config.model.network.depth = 6
  trainer = training.Trainer(config)
  from tim_jax.data import pipeline

  it = pipeline.make_iterator(kinds.source(config), global_batch_size=8, seed=0)
  state = ck.restore(ck.latest_step(), trainer.abstract_with_shardings(), it)
  assert int(state.step) == ck.latest_step() - 1
  fresh = trainer.init_state()
  for a, b in zip(_params(state), _params(fresh)):
    np.testing.assert_array_equal(a, b)
  ck.close()


def test_sample_grids_and_tensorboard(tmp_path):
  config = tiny_c2i(num_steps=2, every=2)
  config.sample.every = 2
  config.sample.nfe = (1, 2)
  config.sample.num = 4
  config.evals.holdout_loss.every = 2
  workdir = str(tmp_path / "s")
  training.train_and_evaluate(config, workdir)
  from PIL import Image

  image = np.asarray(
    Image.open(os.path.join(workdir, "samples", "step_0000002.png"))
  )
  # 4 labels x 2 NFE columns of 16 px images enlarged 8x to 128 px, 4 px
  # gaps, a 220 px label column on the left and a title and NFE row on top.
  assert image.shape[1] == 220 + 2 * (128 + 4) + 4
  assert image.shape[0] > 4 * (128 + 4) + 4
  label_column = image[-(4 * 132 + 4) :, :220]
  assert (label_column < 128).any(), "no class names were written"
  events = [f for f in os.listdir(workdir) if f.startswith("events.out")]
  assert events


def _main(args, capsys, monkeypatch):
  """The training command in this process: (exit status, stderr)."""
  from tim_jax import main
  from tim_jax.commands import cli

  monkeypatch.chdir(ROOT)
  rc = cli.call(main, args)
  err = capsys.readouterr().err
  assert rc == 0 or (
    err.startswith("error: ") and len(err.strip().splitlines()) == 1
  ), err
  return rc, err


def test_unknown_config_key_is_named(tmp_path, capsys, monkeypatch):
  rc, err = _main(
    [
      "--config=configs/t2i.py",
      f"--workdir={tmp_path}",
      "--config.modle.depth=2",
    ],
    capsys,
    monkeypatch,
  )
  assert rc == 2 and "modle" in err


def test_paper_config_without_data_stops_early(tmp_path, capsys, monkeypatch):
  rc, err = _main(
    ["--config=configs/c2i.py:xl2_256", f"--workdir={tmp_path}"],
    capsys,
    monkeypatch,
  )
  assert rc == 2
  assert "data.data_dir" in err and "does not exist" in err


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_microbatches_give_the_full_batch_gradient(derivative):
  # k microbatches (one scan, one update) equal one pass over the batch whose
  # partition groups are the microbatches, with every row drawing its times
  # and noise from its id.
  import jax.numpy as jnp
  import optax

  from tim_jax.core import sharding
  from tim_jax.data import kinds

  def trainer(micro, groups):
    c = tiny_c2i(batch=12)
    c.microbatches = micro
    c.loss.groups = groups
    c.loss.derivative = derivative
    c.conditioning.drop_prob = 0.0  # Dropout draws per microbatch.
    return training.Trainer(c)

  full, micro = trainer(1, 3), trainer(3, 0)
  state = full.init_state()
  batch = sharding.global_batch(
    kinds.synthetic_batch(full.config, 12), full.mesh
  )
  key = jax.random.key(5)
  # The full pass that equals them draws per row too (jitted: run op by op,
  # the three forwards of a DDE loss took a minute).
  (want_loss, _), want = jax.jit(
    jax.value_and_grad(
      lambda p: full.loss(p, state.ema, batch, key, row_ids=jnp.arange(12)),
      has_aux=True,
    )
  )(state.params)
  got_loss, metrics, got = jax.jit(micro.gradients)(
    state.params, state.ema, batch, key
  )
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  assert float(optax.tree.norm(want)) > 0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)  # Float32 summation order aside.
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-7
  # The row split stays per group: one diffusion row of each 4-row group.
  assert float(metrics["share_diffusion"]) == 0.5
  # A batch the microbatches do not divide is refused.
  bad = trainer(5, 0)
  with pytest.raises(ValueError, match="microbatches"):
    bad.gradients(state.params, state.ema, batch, key)


def test_architecture_check_covers_fields_that_change_the_weights():
  base = {"model": {"kind": "c2i", "network": {"depth": 2}}, "data": {}}
  old = {"model": {"kind": "c2i", "network": {"depth": 2}}}  # Before them.
  assert checkpoint.architecture_differences(old, base) == []
  for key, value in (
    ("scan_blocks", True),
    ("use_projector", False),
    ("rope_positions", "xy"),
  ):
    other = {"model": dict(base["model"], **{key: value}), "data": {}}
    problems = checkpoint.architecture_differences(base, other)
    assert len(problems) == 1 and f"model.{key}" in problems[0], problems
  other = dict(base, data={"caption_seed": 3})
  assert (
    "data.caption_seed" in checkpoint.architecture_differences(base, other)[0]
  )
  # A checkpoint from before caption_context was plain word + position.
  other = dict(base, data={"caption_context": 0.7})
  assert (
    "data.caption_context"
    in checkpoint.architecture_differences(base, other)[0]
  )
  assert (
    checkpoint.architecture_differences(
      base, dict(base, data={"caption_context": 0.0})
    )
    == []
  )


def test_run_already_at_num_steps_says_so(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(tiny_c2i(num_steps=2, every=2), workdir)
  caplog.set_level("INFO")
  state = training.train_and_evaluate(tiny_c2i(num_steps=2, every=2), workdir)
  assert int(state.step) == 2
  text = caplog.text
  assert "nothing to train: the checkpoint is at step 2" in text
  assert "finished -" not in text and "finished 0" not in text


def test_all_finite_compiles_once_per_layout(caplog):
  tree = {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}
  assert checkpoint.all_finite(tree)  # Compiled here, for this layout.
  caplog.set_level("DEBUG")
  with jax.log_compiles(True):
    nan = jnp.full((3,), jnp.nan, jnp.float32)
    assert not checkpoint.all_finite({"a": nan, "b": jnp.zeros((2, 2))})
    assert checkpoint.all_finite(tree)
  compiles = [
    r.getMessage()
    for r in caplog.records
    if "ompil" in r.getMessage() and "lambda" in r.getMessage()
  ]
  assert not compiles, compiles
  with jax.log_compiles(True):  # A new layout does compile (and logs it).
    checkpoint.all_finite({"c": jnp.ones((5,))})
  assert any("ompil" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["ot_fm", "trigflow", "edm", "vp", "ve"])
def test_every_transport_trains_with_its_defaults(name):
  # The tangent time warp of the default weighting took tan of EDM's and
  # VE's noise levels (negative for many sigma) and made every step NaN.
  config = tiny_c2i(batch=8)
  config.transport.name = name  # The config's P_mean/P_std stay.
  trainer = training.Trainer(config)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {
      "image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
      "label": rng.integers(0, 4, size=(8,)).astype(np.int32),
    }
    state, metrics = trainer.train_step(
      state, sharding.global_batch(batch, trainer.mesh)
    )
    assert np.isfinite(float(metrics["loss"])), (name, metrics)
  assert int(state.nonfinite_total) == 0
  assert checkpoint.all_finite((state.params, state.ema))
  before = jax.tree.leaves(trainer.init_state().params)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(before, jax.tree.leaves(state.params))
  ), "nothing trained"


def test_tangent_warp_of_noise_level_transports_is_the_noise_level():
  from tim_jax.method import transition, transports

  lc = transition.LossConfig(groups=1)
  t, r = np.array([40.0, 3.0]), np.array([1.0, 0.5])
  for name in ("edm", "ve"):
    tr = transports.get(name)
    w = np.asarray(transition.time_weight(t, r, tr, lc))
    np.testing.assert_allclose(w, 1.0 / np.sqrt(t - r + tr.sigma_d), rtol=1e-6)
  otfm = transports.get("ot_fm")
  w = np.asarray(
    transition.time_weight(np.array([0.9]), np.array([0.2]), otfm, lc)
  )
  np.testing.assert_allclose(
    w, 1 / np.sqrt(np.tan(0.9) - np.tan(0.2) + 1), rtol=1e-6
  )


def test_divergence_stops_and_says_which_checkpoint_is_suspect(tmp_path):
  # base_lr=1e6: the first update throws the weights to ~1e6, every later
  # step is rejected; only the step-1 checkpoint exists, and the message
  # says its weights started the bad streak.
  config = tiny_c2i(num_steps=30, every=1)
  config.optimizer.base_lr = 1e6
  config.max_nonfinite_steps = 3
  workdir = str(tmp_path / "diverged")
  with pytest.raises(training.NonFiniteError) as err:
    training.train_and_evaluate(config, workdir)
  text = str(err.value)
  assert "3 bad steps in a row (steps 2-4" in text, text
  assert "Checkpoints on disk: steps [1]" in text, text
  assert "Step 1 holds the weights that the first bad step started" in text
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.manager.all_steps() == [1]  # Saves refused during the streak.
  ck.close()


def test_mse_explosion_is_a_bad_step_and_no_checkpoint_is_said(tmp_path):
  config = tiny_c2i(num_steps=30, every=2)
  config.guard_max_mse = 1e-3  # Every step's MSE (~2) counts as diverged.
  config.max_nonfinite_steps = 2
  trainer = training.Trainer(config)
  state = trainer.init_state()
  before = _params(state)
  batch = {
    "image": np.ones((8, 16, 16, 3), np.float32),
    "label": np.zeros((8,), np.int32),
  }
  state, metrics = trainer.train_step(
    state, sharding.global_batch(batch, trainer.mesh)
  )
  assert np.isfinite(float(metrics["loss"]))
  assert int(metrics["nonfinite_streak"]) == 1  # Finite, yet rejected.
  for a, b in zip(before, _params(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(training.NonFiniteError) as err:
    training.train_and_evaluate(config, str(tmp_path / "w"))
  text = str(err.value)
  assert "above guard_max_mse=0.001" in text, text
  assert "No checkpoint was written" in text, text


def test_unwritable_checkpoints_fail_at_start_and_at_save(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("a file where the folder goes")
  with pytest.raises(
    checkpoint.CheckpointWriteError, match="cannot write checkpoints to"
  ):
    training.train_and_evaluate(tiny_c2i(num_steps=2, every=2), str(workdir))
  # The folder breaking during a run: orbax's save thread fails and the
  # save waited forever; now the save raises at once, naming the latest
  # saved step (run in a child so that a regression cannot hang the suite).
  script = textwrap.dedent(f"""
      import os, shutil, sys
      sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
      from train_utils import tiny_c2i
      from tim_jax import training
      from tim_jax.weights import checkpoint
      from tim_jax.data import kinds, pipeline
      c = tiny_c2i()
      state = training.Trainer(c).init_state()
      it = pipeline.make_iterator(kinds.source(c), global_batch_size=8,
                                  seed=0)
      d = {str(tmp_path / "ck")!r}
      ck = checkpoint.Checkpointer(d)
      ck.save(1, state, it, {{}}, force=True)
      ck.wait()
      shutil.move(os.path.join(d, "1"), d + "_kept")
      shutil.rmtree(d)
      open(d, "w").write("x")
      try:
        ck.save(2, state, it, {{}}, force=True)
      except checkpoint.CheckpointWriteError as e:
        print("RAISED", e)
      """)
  done = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert "RAISED step 2 was not saved: cannot write checkpoints" in (
    done.stdout
  ), done.stdout + done.stderr[-2000:]


def _damage(step_dir, how):
  import glob
  import shutil

  if how == "truncated":
    blobs = sorted(
      glob.glob(
        os.path.join(step_dir, "state", "**", "d", "*"), recursive=True
      ),
      key=os.path.getsize,
    )
    with open(blobs[-1], "r+b") as f:
      f.truncate(os.path.getsize(blobs[-1]) // 3)
  else:  # The `state` item is missing.
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.parametrize("how", ["truncated", "missing_state"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(
  tmp_path, how, caplog
):
  workdir = str(tmp_path / "w")
  training.train_and_evaluate(tiny_c2i(num_steps=4, every=2), workdir)
  ckdir = os.path.join(workdir, "checkpoints")
  _damage(os.path.join(ckdir, "4"), how)
  # A step 4 damaged once before is kept too: the new one goes beside it.
  os.makedirs(os.path.join(ckdir, "damaged-step-4"))
  caplog.set_level("INFO")
  state = training.train_and_evaluate(tiny_c2i(num_steps=6, every=2), workdir)
  assert int(state.step) == 6
  text = caplog.text
  assert "checkpoint step 4 in" in text and "cannot be read" in text
  assert "resuming from step 2 instead of the damaged step 4" in text
  assert "resumed from step 2" in text
  assert os.path.isdir(os.path.join(ckdir, "damaged-step-4-2"))  # Kept.
  assert os.listdir(os.path.join(ckdir, "damaged-step-4-2"))
  ck = checkpoint.Checkpointer(ckdir)
  assert ck.manager.all_steps() == [2, 4, 6]  # 4 rewritten whole.
  ck.close()


def test_every_checkpoint_damaged_is_refused_untouched(tmp_path):
  workdir = str(tmp_path / "w")
  training.train_and_evaluate(tiny_c2i(num_steps=2, every=2), workdir)
  step_dir = os.path.join(workdir, "checkpoints", "2")
  _damage(step_dir, "missing_state")
  before = sorted(os.listdir(os.path.dirname(step_dir)))
  with pytest.raises(checkpoint.CheckpointReadError) as err:
    training.train_and_evaluate(tiny_c2i(num_steps=4, every=2), workdir)
  text = str(err.value)
  assert f"step 2 ({step_dir})" in text and "delete those step" in text, text
  assert "run with the config the checkpoints were made with" in text
  assert len(text) < 2000
  assert sorted(os.listdir(os.path.dirname(step_dir))) == before


def test_missing_config_file_is_named(tmp_path, capsys, monkeypatch):
  rc, err = _main(
    ["--config=configs/nope.py:xl", f"--workdir={tmp_path}"],
    capsys,
    monkeypatch,
  )
  assert rc == 2
  assert "no config file 'configs/nope.py'" in err
  assert "config_config" not in err


def test_garbage_dataset_info_names_the_file(tmp_path):
  from tim_jax.data import latents

  (tmp_path / "dataset_info.json").write_bytes(b"\xff\xfe\x00garbage{")
  with pytest.raises(ValueError) as err:
    latents.LatentSource(str(tmp_path))
  assert str(tmp_path / "dataset_info.json") in str(err.value)
  assert "python -m tim_jax.commands.prepare" in str(err.value)


@pytest.mark.parametrize(
  "field,value",
  [
    ("num_steps", 0),
    ("ema_decay", 1.5),
    ("ema_decay", -0.1),
    ("log_every", 0),
    ("max_nonfinite_steps", 0),
    ("keep_checkpoints", 0),
    ("checkpoint_every", -1),
    ("batch_size", 0),
    ("optimizer.base_lr", float("nan")),
    ("sample.cfg_scale", 0.5),
    ("loss.diffusion_ratio", 1.2),
  ],
)
def test_out_of_range_knobs_stop_before_any_work(tmp_path, field, value):
  config = tiny_c2i(num_steps=2, every=2)
  node = config
  *parents, last = field.split(".")
  for key in parents:
    node = node[key]
  node[last] = value
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=re.escape(f"{field}=")):
    training.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # Refused before anything was written.


def test_the_final_step_is_always_saved(tmp_path):
  # checkpoint_every=0 used to write no checkpoint at all.
  config = tiny_c2i(num_steps=3, every=0)
  workdir = str(tmp_path / "final")
  training.train_and_evaluate(config, workdir)
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert list(ck.manager.all_steps()) == [3]
  ck.close()


def test_step_and_sampler_trace_the_layers_for_their_platform():
  # The trainer traces its step, and the pipeline its sampler, with the
  # layers in the form of their devices' platform only (layers.forms_for):
  # no platform switch is traced, differentiated and lowered twice.
  import train_utils  # pylint: disable=g-import-not-at-top

  trainer = training.Trainer(train_utils.tiny_t2i())
  host = kinds.synthetic_batch(trainer.config, 4, caption_len=8)
  batch = sharding.global_batch(host, trainer.mesh)
  step = trainer.jitted_step(batch).trace(
    trainer.abstract_with_shardings(), batch, trainer.frozen
  )
  text = str(step.jaxpr)
  assert "platform_index" not in text
  assert "_standardize_written" in text  # The CPU form.
  pipe = trainer.pipeline
  settings = pipe.settings(2)
  params = trainer.init_state().ema
  noise = jnp.zeros((1, 32, 32, 3))
  cond = jax.tree.map(lambda a: a[:1], pipe.conditions()[0])
  null = pipe.null_like(cond)
  for platform, switch in (("cpu", False), (None, True)):
    sampler = pipe.compiled_sampler(settings, platform)
    traced = sampler.trace(params, noise, cond, null, jax.random.key(0), 0)
    assert ("platform_index" in str(traced.jaxpr)) == switch
