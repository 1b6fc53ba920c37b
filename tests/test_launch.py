"""The launch scripts, dry-run: stub `gcloud` and `srun` on PATH record
their command lines, which must start the same trainer on every worker with
the install first and the workdir on shared storage."""

import json
import os
import stat
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stub(bin_dir, name, log):
  path = os.path.join(bin_dir, name)
  with open(path, "w") as f:
    # One JSON list of argv per call (arguments may hold newlines).
    f.write(
      f"#!/usr/bin/env bash\n{sys.executable} -c 'import json, sys; "
      f'print(json.dumps(sys.argv[1:]))\' "$0" "$@" >> {log}\n'
    )
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _run(tmp_path, script, args, stubs, env=None):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "calls.log"
  for name in stubs:
    _stub(str(bin_dir), name, log)
  done = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", script)] + args,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **(env or {})),
  )
  calls = (
    [json.loads(l) for l in log.read_text().splitlines() if l]
    if log.exists()
    else []
  )
  return done, calls


def test_tpu_vm_script_copies_installs_and_starts_every_worker(tmp_path):
  done, calls = _run(
    tmp_path,
    "tpu_vm.sh",
    [
      "my-v5p-64",
      "us-east5-a",
      "configs/c2i.py:xl2_256",
      "gs://bucket/runs/xl2",
      "--config.data.data_dir=gs://bucket/latents",
    ],
    ["gcloud"],
  )
  assert done.returncode == 0, done.stderr
  (scp, ssh) = calls
  assert scp[1:5] == ["compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and "--zone=us-east5-a" in scp
  assert "my-v5p-64:tim_jax.tar.gz" in scp  # This checkout, archived.
  assert ssh[1:5] == ["compute", "tpus", "tpu-vm", "ssh"] and "my-v5p-64" in ssh
  assert "--worker=all" in ssh  # The same command on every worker.
  command = next(a for a in ssh if a.startswith("--command="))
  install = command.index("pip install -q -e '.[tpu]'")
  train = command.index(
    "python3 -m tim_jax.main --distributed "
    "--config=configs/c2i.py:xl2_256 "
    "--workdir=gs://bucket/runs/xl2 "
    "--config.data.data_dir=gs://bucket/latents"
  )
  assert install < train


def test_tpu_vm_script_refuses_a_local_workdir(tmp_path):
  done, calls = _run(
    tmp_path,
    "tpu_vm.sh",
    ["tpu", "zone", "configs/c2i.py:xl2_256", "runs/xl2"],
    ["gcloud"],
  )
  assert done.returncode == 2 and "shared" in done.stderr and not calls


def test_slurm_script_installs_then_starts_one_trainer_per_node(tmp_path):
  done, calls = _run(
    tmp_path,
    "slurm_gpu.sh",
    [
      "configs/t2i.py:xl",
      "/shared/runs/t2i",
      "--config.data.data_dir=/shared/latents",
    ],
    ["srun"],
    env={"SLURM_JOB_NUM_NODES": "4"},
  )
  assert done.returncode == 0, done.stderr
  install, train = calls
  for call in (install, train):
    assert "--nodes=4" in call and "--ntasks-per-node=1" in call
  assert "pip install -q -e '.[gpu]'" in install[-1]
  assert install[-1].startswith(f"cd '{ROOT}'")
  i = train.index("-m")
  assert train[i:] == [
    "-m",
    "tim_jax.main",
    "--distributed",
    "--config=configs/t2i.py:xl",
    "--workdir=/shared/runs/t2i",
    "--config.data.data_dir=/shared/latents",
  ]
  assert "--kill-on-bad-exit=1" in train


def test_slurm_script_needs_an_allocation_and_shared_workdir(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  done = subprocess.run(
    [
      "bash",
      os.path.join(ROOT, "launch", "slurm_gpu.sh"),
      "configs/t2i.py",
      "/shared/run",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=60,
  )
  assert done.returncode != 0 and "SLURM allocation" in done.stderr
  done, calls = _run(
    tmp_path,
    "slurm_gpu.sh",
    ["configs/t2i.py", "run"],
    ["srun"],
    env={"SLURM_JOB_NUM_NODES": "2"},
  )
  assert done.returncode == 2 and "shared storage" in done.stderr
  assert not calls
