"""Runs every command on bad input, as a user would, and counts outcomes.

    python tests/bad_inputs_probe.py [--out=probe.csv]

Each case is a real process (``python -m ...``) with a time limit. An
outcome is "one line" (exit status 2 and a single ``error: ...`` line on
stderr), "traceback", "rc 0" (the command said nothing was wrong: each such
case says what it should have done), "other" (another status without a
traceback) or "hang" (the limit passed). Not a test: it trains two tiny
models first and takes minutes.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
LIMIT = 600


def run(args, cwd=ROOT):
  try:
    done = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=LIMIT,
    )
  except subprocess.TimeoutExpired:
    return "hang", ""
  err = done.stderr
  lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
  if "Traceback (most recent call last)" in err:
    return "traceback", err.strip().splitlines()[-1]
  if done.returncode == 2 and len(lines) == 1:
    return "one line", lines[0]
  if done.returncode == 0:
    return "rc 0", done.stdout.strip().splitlines()[-1:] or [""]
  return "other", (err.strip().splitlines() or [""])[-1]


def cases(tmp):
  """(command, args, what it is) of every probe."""
  t2i, c2i = f"{tmp}/t2i", f"{tmp}/c2i"
  text_file = f"{tmp}/notes.txt"
  garbage = f"{tmp}/garbage.safetensors"
  bad_config = f"{tmp}/bad_config.py"
  no_get = f"{tmp}/no_get_config.py"
  manifest = f"{tmp}/manifest.jsonl"
  shards = f"{tmp}/shards"
  golden_c2i = f"{ROOT}/tests/data/golden/c2i_tiny/model.safetensors"
  main = ["tim_jax.main", "--config=configs/t2i.py", f"--workdir={tmp}/w"]
  smp = [
    "tim_jax.commands.sample",
    f"--checkpoint={t2i}",
    "--prompt=a red circle at the top left",
    f"--out={tmp}/g.png",
  ]
  gen = [
    "tim_jax.commands.generate",
    f"--checkpoint={c2i}",
    f"--out={tmp}/s.npz",
    "--num_images=4",
  ]
  prep = [
    "tim_jax.commands.prepare",
    "--autoencoder=sd_vae_ft_ema",
    f"--autoencoder_path={tmp}/ae",
    f"--data_dir={tmp}/lat",
  ]
  lat = [
    "tim_jax.commands.latents",
    f"--input_dir={shards}",
    f"--data_dir={tmp}/lat2",
  ]
  fid = ["tim_jax.commands.fid", f"--inception_weights={garbage}"]
  nfe = ["tim_jax.commands.nfe_study", f"--out={tmp}/study"]
  bench = [
    "tim_jax.commands.bench",
    "--config=configs/t2i.py",
    "--repeats=1",
    "--matmul_size=0",
  ]
  comp = ["tim_jax.commands.compile", "--config=configs/t2i.py"]
  return [
    (
      main[:1] + ["--config=configs/nope.py", f"--workdir={tmp}/w"],
      "missing config file",
    ),
    (
      main[:1] + ["--config=configs/t2i.py:huge", f"--workdir={tmp}/w"],
      "unknown variant",
    ),
    (
      main[:1] + [f"--config={bad_config}", f"--workdir={tmp}/w"],
      "config file with a syntax error",
    ),
    (
      main[:1] + [f"--config={no_get}", f"--workdir={tmp}/w"],
      "config file without get_config",
    ),
    (main + ["--config.num_steps=0"], "num_steps 0"),
    (main + ["--config.ema_decay=2"], "ema_decay 2"),
    (main + ["--config.batch_size=-4"], "negative batch"),
    (main + ["--config.mesh.data=3"], "mesh larger than the devices"),
    (main + ["--config.model.dtype=float8"], "unknown dtype"),
    (main + ["--config.transport.name=foo"], "unknown transport"),
    (main + ["--config.loss.derivative=xyz"], "unknown derivative"),
    (main + ["--config.optimizer.schedule=bogus"], "unknown schedule"),
    (main[:2] + [f"--workdir={text_file}"], "workdir is a file"),
    (
      [
        "tim_jax.main",
        "--config=configs/c2i.py:xl2_256,smoke",
        f"--workdir={tmp}/w2",
        "--config.data.data_dir=/nonexistent",
      ],
      "missing latent data",
    ),
    (main + ["--config.log_every=0"], "log_every 0"),
    (
      main + ["--config.model.network.hidden_size=33"],
      "width the heads do not divide",
    ),
    (main + ["--worklog=x"], "unknown flag"),
    (main + ["extra"], "stray positional argument"),
    (main + ["--config.keep_checkpoints=0"], "keep no checkpoints"),
    (
      [
        "tim_jax.main",
        "--config=configs/c2i.py",
        f"--workdir={tmp}/w3",
        "--config.sample.labels=(99,)",
        "--config.num_steps=1",
      ],
      "sample label out of range",
    ),
    (main + ["--config.sample.cfg_scale=nan"], "non-finite guidance"),
    (
      main + ["--config.batch_size=7", "--config.microbatches=2"],
      "batch the microbatches do not divide",
    ),
    (
      [
        "tim_jax.commands.sample",
        f"--checkpoint={tmp}/none",
        "--prompt=a red circle",
        f"--out={tmp}/g.png",
      ],
      "missing checkpoint",
    ),
    (
      [
        "tim_jax.commands.sample",
        f"--checkpoint={text_file}",
        "--prompt=a red circle",
        f"--out={tmp}/g.png",
      ],
      "checkpoint is a text file",
    ),
    (
      [
        "tim_jax.commands.sample",
        f"--checkpoint={garbage}",
        "--config=configs/c2i.py:xl2_256",
        "--labels=1",
        f"--out={tmp}/g.png",
      ],
      "garbage weight file",
    ),
    (
      [
        "tim_jax.commands.sample",
        f"--checkpoint={golden_c2i}",
        "--config=configs/t2i.py",
        "--prompt=a red circle",
        f"--out={tmp}/g.png",
      ],
      "class-conditional file, text config",
    ),
    (smp[:2] + ["--labels=3", f"--out={tmp}/g.png"], "labels for t2i"),
    (
      [
        "tim_jax.commands.sample",
        f"--checkpoint={c2i}",
        "--prompt=a red circle",
        f"--out={tmp}/g.png",
      ],
      "prompt for c2i",
    ),
    (
      smp[:2] + ["--prompt=a zebra on the moon", f"--out={tmp}/g.png"],
      "unknown words",
    ),
    (smp + ["--num_steps=-1"], "negative steps"),
    (smp + ["--cfg_scale=nan"], "nan guidance"),
    (smp + ["--guidance_interval=0.9,0.1"], "reversed guidance interval"),
    (smp + ["--height=33"], "height the patch does not divide"),
    (smp + ["--mode=bogus"], "unknown sampler mode"),
    (smp[:3] + [f"--out={tmp}"], "out is a directory"),
    (smp[:3] + [f"--out={tmp}/g.gif"], "unknown picture suffix"),
    (smp + [f"--latents_out={tmp}/x.bin"], "latents suffix"),
    (
      smp[:2] + ["--prompt_set=geneval:/nonexistent.jsonl", f"--out={tmp}/ps"],
      "missing prompt set",
    ),
    (
      smp[:2] + ["--prompt_set=bogus:x", f"--out={tmp}/ps"],
      "unknown prompt-set kind",
    ),
    (smp + ["--cfg_scale=inf"], "infinite guidance"),
    (smp + ["--batch_size=0"], "batch 0"),
    (smp + ["--labels=x"], "non-integer labels"),
    (gen[:2] + [f"--out={tmp}/s.png"], "generate to a PNG"),
    (gen + ["--num_images=0"], "zero images"),
    (gen[:2] + ["--out=/proc/nope/s.npz"], "unwritable output"),
    (
      [
        "tim_jax.commands.generate",
        f"--checkpoint={tmp}/none",
        f"--out={tmp}/s.npz",
      ],
      "generate: missing checkpoint",
    ),
    (gen + ["--prompt=a red circle"], "prompt for a c2i generate"),
    (prep + [f"--images={tmp}/none"], "missing image folder"),
    (prep + [f"--images={tmp}", f"--captioned={tmp}"], "two sources"),
    (prep, "no source"),
    (
      prep[:1]
      + [
        "--autoencoder=bogus",
        f"--autoencoder_path={tmp}/ae",
        f"--data_dir={tmp}/lat",
        f"--images={tmp}",
      ],
      "unknown autoencoder",
    ),
    (
      prep[:1]
      + [
        "--autoencoder=sd_vae_ft_ema",
        f"--autoencoder_path={tmp}/none",
        f"--data_dir={tmp}/lat",
        f"--images={tmp}/imgs",
      ],
      "missing autoencoder directory",
    ),
    (
      prep + [f"--images={tmp}/imgs", "--resolution=1024"],
      "images too large for the device's memory",
    ),
    (prep + [f"--images={tmp}/imgs", "--resolution=0"], "resolution 0"),
    (prep + [f"--manifest={manifest}"], "malformed manifest"),
    (prep + [f"--captioned={tmp}/imgs"], "captioned folder without text"),
    (lat + ["--latent_shape=a,b"], "non-integer shape"),
    (
      lat[:1]
      + [
        f"--input_dir={tmp}/empty",
        f"--data_dir={tmp}/lat2",
        "--latent_shape=4,4,3",
      ],
      "no shards",
    ),
    (lat + ["--latent_shape=8,8,3"], "shards of another shape"),
    (fid, "fid: no action"),
    (fid + ["bogus"], "fid: unknown action"),
    (
      fid
      + ["score", f"--samples={tmp}/s64.npz", f"--reference={tmp}/ref64.npz"],
      "64-feature reference",
    ),
    (fid + ["stats", f"--images={tmp}/s64.npz"], "stats without --out"),
    (
      fid + ["stats", f"--images={tmp}/s64.npz", f"--out={tmp}/r.npz"],
      "garbage inception weights",
    ),
    (nfe + ["--run=badformat"], "malformed run"),
    (nfe + [f"--run=a={t2i}", "--num_steps=0"], "zero steps"),
    (nfe + ["--run=a=/nonexistent"], "missing run"),
    (bench + ["--rows=bogus"], "unknown bench row"),
    (bench + ["--repeats=0"], "zero repeats"),
    (bench + ["--batch_size=0"], "zero batch"),
    (comp + ["--topology=v5e:banana"], "unknown topology"),
    (comp + ["--topology=v5e:2x2", "--batch_size=-1"], "negative batch"),
    (
      [
        "tim_jax.commands.train_oracle",
        "--num_steps=0",
        f"--out={tmp}/o.safetensors",
      ],
      "oracle: zero steps",
    ),
  ]


def setup(tmp):
  """Two tiny checkpoints and the files the cases name."""
  import autoencoder_utils as au
  import numpy as np
  import train_utils

  from tim_jax import training

  training.train_and_evaluate(train_utils.tiny_t2i(), f"{tmp}/t2i")
  training.train_and_evaluate(train_utils.tiny_c2i(num_steps=2), f"{tmp}/c2i")
  open(f"{tmp}/notes.txt", "w").write("just text")
  open(f"{tmp}/garbage.safetensors", "wb").write(os.urandom(256))
  open(f"{tmp}/bad_config.py", "w").write("def get_config(:\n")
  open(f"{tmp}/no_get_config.py", "w").write("X = 1\n")
  open(f"{tmp}/manifest.jsonl", "w").write('{"image_file": "a.jpg", \n')
  os.makedirs(f"{tmp}/shards")
  np.savez(
    f"{tmp}/shards/s.npz",
    latent=np.zeros((2, 4, 4, 3), np.float32),
    label=np.arange(2),
  )
  os.makedirs(f"{tmp}/empty")
  au.write_image_folder(f"{tmp}/imgs", per_class=1)
  au.write(au.KL_SMALL, f"{tmp}/ae")
  np.savez(f"{tmp}/s64.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  np.savez(f"{tmp}/ref64.npz", mu=np.zeros(64), sigma=np.eye(64))


def main():
  out = next(
    (a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), None
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with tempfile.TemporaryDirectory() as tmp:
    setup(tmp)
    rows = []
    for args, what in cases(tmp):
      outcome, said = run(args)
      said = str(said).replace(tmp, "<tmp>").replace(ROOT, "<repo>")
      rows.append(
        dict(
          command=args[0].split(".")[-1],
          case=what,
          outcome=outcome,
          said=str(said)[:300],
        )
      )
      print(
        f"{outcome:10s} {args[0].split('.')[-1]:12s} {what}: {said}", flush=True
      )
  counts = {}
  for r in rows:
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
  print(json.dumps(dict(cases=len(rows), **counts)))
  if out:
    with open(out, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  main()
