"""One writer per directory, and the lock's stale rule."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from train_utils import tiny_c2i

from tim_jax import training
from tim_jax.core import workdir_lock
from tim_jax.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(directory, **record):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, workdir_lock.LOCK_NAME)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(dict(job="trainer", started="then"), **record), f)
  return path


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_second_trainer_on_a_workdir_is_refused(tmp_path, capsys):
  # Two trainers on one workdir used to replace each other's checkpoints.
  workdir = tmp_path / "run"
  first = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tim_jax.main",
      "--config=configs/c2i.py",
      f"--workdir={workdir}",
      "--config.num_steps=100000",
      "--config.sample.every=0",
      "--config.evals.holdout_loss.every=0",
      "--config.evals.shapes_oracle.every=0",
    ],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    lock = workdir / workdir_lock.LOCK_NAME
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None:
      assert time.time() < deadline, "the first trainer never took the lock"
      time.sleep(0.2)
    assert first.poll() is None, first.stderr.read()[-2000:]
    from tim_jax import main
    from tim_jax.commands import cli

    rc = cli.call(main, ["--config=configs/c2i.py", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    assert f"pid {first.pid}" in err and socket.gethostname() in err
    assert "in use by another trainer" in err
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)


def test_a_live_holder_blocks_and_a_dead_one_does_not(tmp_path):
  sleeper = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"]
  )
  try:
    _write_lock(tmp_path / "w", host=socket.gethostname(), pid=sleeper.pid)
    with pytest.raises(UserError, match=f"pid {sleeper.pid}"):
      training.train_and_evaluate(tiny_c2i(num_steps=1), str(tmp_path / "w"))
  finally:
    sleeper.kill()
    sleeper.wait()
  # Its holder is gone (a crash): the next trainer takes the lock over and
  # leaves none behind.
  state = training.train_and_evaluate(
    tiny_c2i(num_steps=1), str(tmp_path / "w")
  )
  assert int(state.step) == 1
  assert not (tmp_path / "w" / workdir_lock.LOCK_NAME).exists()


def test_another_hosts_lock_expires_with_its_heartbeat(tmp_path):
  path = _write_lock(tmp_path, host="another-host", pid=1)
  lock = workdir_lock.WorkdirLock(str(tmp_path), "trainer")
  with pytest.raises(UserError, match="another-host"):
    lock.acquire()
  old = time.time() - workdir_lock.STALE_SECONDS - 5
  os.utime(path, (old, old))
  lock.acquire()  # Taken over: no heartbeat for longer than the rule says.
  assert workdir_lock.read_holder(path)["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(path)


def test_only_process_zero_locks_and_all_agree(tmp_path):
  holder = _write_lock(tmp_path, host="another-host", pid=1)
  # Process 1 takes nothing itself; process 0's refusal reaches it.
  with pytest.raises(UserError, match="in use"):
    workdir_lock.acquire(
      str(tmp_path), "generate", process_index=1, agree=lambda ok: False
    )
  assert (
    workdir_lock.acquire(
      str(tmp_path), "generate", process_index=1, agree=lambda ok: True
    )
    is None
  )
  os.remove(holder)
  lock = workdir_lock.acquire(
    str(tmp_path), "generate", process_index=0, agree=lambda ok: ok
  )
  assert lock is not None and os.path.exists(lock.path)
  lock.release()


def test_generate_resumes_only_with_the_same_weights(
  tiny_t2i_workdir, tmp_path
):
  # Resumed with another checkpoint, generate used to put two models'
  # images into one .npz.
  import jax

  from tim_jax import inference
  from tim_jax.inference import generate

  pipe = inference.load(tiny_t2i_workdir)
  out = str(tmp_path / "samples.npz")
  kw = dict(
    num=4,
    out=out,
    num_steps=1,
    batch_size=2,
    progress=False,
    prompts=["a red circle at the top left"],
  )
  generate.generate(pipe, **kw)
  os.remove(out)
  os.remove(os.path.join(out + ".parts", "batch_0000001.npz"))
  other = inference.Pipeline(
    pipe.config, params=jax.tree.map(lambda a: a * 1.01, pipe.params)
  )
  with pytest.raises(UserError, match="weights"):
    generate.generate(other, **kw)
  assert generate.generate(pipe, **kw) == out  # The same job finishes.


def test_generate_refuses_prompts_for_a_class_model(tmp_path):
  # They were ignored without a word (labels drawn as always).
  from tim_jax import inference
  from tim_jax.inference import generate

  pipe = inference.Pipeline(tiny_c2i())
  with pytest.raises(UserError, match="--prompt is for text-to-image"):
    generate.generate(
      pipe,
      num=2,
      out=str(tmp_path / "s.npz"),
      num_steps=1,
      prompts=["a red circle"],
      progress=False,
    )
