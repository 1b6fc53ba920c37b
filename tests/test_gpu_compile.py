"""tim_jax.commands.compile for a node of eight NVIDIA cards, on this CPU
host: XLA:GPU through JAX's CUDA plugin and XLA's target configs; the
roofline from tim_jax's FLOP count.

The plugin stays out of the test environment (in every JAX process it
prints CUDA-driver warnings to stderr on a host without GPUs, ahead of a
command's one-line error): the compiles run in a subprocess with the
folder ``TIM_JAX_CUDA_PLUGIN`` names (``.ci/run`` installs it there) or
with a plugin installed in the environment."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tim_jax.commands import cli, gpu_compile
from tim_jax.commands import compile as compile_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _plugin_path() -> str | None:
  """The folder holding JAX's CUDA plugin ("" when it is installed in this
  environment); None when there is none."""
  folder = os.environ.get("TIM_JAX_CUDA_PLUGIN")
  if folder:
    assert os.path.isdir(os.path.join(folder, "jax_plugins", "xla_cuda12")), (
      f"TIM_JAX_CUDA_PLUGIN={folder} holds no JAX CUDA plugin"
    )
    return folder
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
    return ""
  return None


@pytest.fixture(scope="module")
def plugin():
  path = _plugin_path()
  if path is None:
    import jax  # pylint: disable=g-import-not-at-top

    pytest.skip(
      "JAX's CUDA plugin is absent: pip install --no-deps --target DIR "
      f"jax-cuda12-plugin=={jax.__version__} "
      f"jax-cuda12-pjrt=={jax.__version__} and set TIM_JAX_CUDA_PLUGIN=DIR"
    )
  return path


@pytest.mark.gpu_compile
@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_paper_step_with_its_teacher_compiles_for_h100(plugin, tmp_path):
  # XL/2's code path shrunk (smoke), with the full RADIO teacher at 264
  # tokens and 4 rows per card: with the teacher's attention laid out as
  # jax.nn.dot_product_attention takes it, XLA:GPU refused this step for
  # sm_90 ("Couldn't find output tile sizes").
  out = tmp_path / "report.json"
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (plugin, ROOT) if p),
    JAX_PLATFORMS="cpu",
  )
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "tim_jax.commands.compile",
      "--config=configs/c2i.py:xl2_256,smoke",
      "--topology=h100x8",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=8",
      "--batch_size=32",
      f"--out={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "roofline from tim_jax's FLOP count (not a measurement)" in (
    done.stdout
  )
  rep = json.loads(out.read_text())
  assert rep["topology_kind"] == "NVIDIA H100 80GB HBM3"
  assert rep["devices"] == 8 and rep["batch_per_device"] == 4
  assert [r["name"] for r in rep["rows"]] == [
    "train_step",
    "sampler_step",
    "sampler_step_cfg",
  ]
  train = rep["rows"][0]
  m = train["memory"]
  assert m["fits"] and 0 < m["total"] < 2 * GIB
  assert m["capacity"] == pytest.approx(0.9 * 84942979072)
  # The roofline is the largest of its parts, from tim_jax's FLOPs; the
  # teacher's forward is in the model FLOPs (most of them at this size).
  r = train["gpu_roofline"]
  assert train["roofline_seconds"] == max(r["compute"], r["hbm"], r["nvlink"])
  assert train["roofline_source"] == "tim_jax_flops"
  assert r["compute"] == pytest.approx(
    r["executed_flops"] / (8 * 989e12), rel=1e-9
  )
  assert r["executed_flops"] > train["model_flops"] > 1e12  # remat=full
  # FSDP over 8 cards gathers the weights and scatters the gradients.
  c = train["collectives"]
  assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] > 0
  assert r["nvlink"] > 0


@pytest.mark.gpu_compile
@pytest.mark.multiprocess
def test_the_t2i_teachers_resize_compiles_for_h100(plugin):
  # The REPA teacher's bicubic resize of 1024 px images (T2I-XL): in the
  # NHWC product form XLA:GPU refused it for sm_90 ("Couldn't find output
  # tile sizes", f32[24576,512] for these 8 images).
  code = """
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from tim_jax.commands import gpu_compile
from tim_jax.encoders import resize
card = gpu_compile.topology_devices("h100x8")[0]
x = jax.ShapeDtypeStruct(
  (8, 1024, 1024, 3), jnp.float32, sharding=SingleDeviceSharding(card)
)
jax.jit(lambda x: resize.bicubic(x, (512, 512))).lower(x).compile()
print("compiled")
"""
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (plugin, ROOT) if p),
    JAX_PLATFORMS="cpu",
  )
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["compiled"]


def test_cards_are_read_from_their_target_configs():
  h100 = gpu_compile.card_memory("NVIDIA H100 80GB HBM3")
  h200 = gpu_compile.card_memory("NVIDIA H200 141GB HBM3e")
  a100 = gpu_compile.card_memory("NVIDIA A100-SXM4-80GB")
  assert h100 == (0.9 * 84942979072, 3.35232e12)
  assert h200 == (0.9 * 141 * GIB, 4.8e12)
  assert a100 == (0.9 * 85100068864, 2.03904e12)
  assert gpu_compile.card_memory("TPU v4") is None
  assert set(gpu_compile.TOPOLOGIES) == {"h100x8", "h200x8", "a100x8"}
  assert gpu_compile.is_gpu_topology("H100x8")
  assert not gpu_compile.is_gpu_topology("v5p:4x4x2")


def test_link_bytes_follow_ring_algorithms():
  hlo = "\n".join(
    [
      # 8 cards: an all-gather sends 7/8 of its result.
      "%a = bf16[8,1024]{1,0} all-gather(%x), replica_groups=[1,8]<=[8]",
      # Groups of 4: a reduce-scatter sends 3 times its shard.
      "%b = f32[256]{0} reduce-scatter(%y), replica_groups={{0,1,2,3},"
      "{4,5,6,7}}",
      # An all-reduce over 2: 2 (n-1)/n of it; async: its largest buffer.
      "%c = (f32[64]{0}, f32[64]{0}) all-reduce-start(%z), "
      "replica_groups=[4,2]<=[8]",
      "%d = f32[64]{0} all-reduce-done(%c)",
      "%e = f32[3]{0} add(%q, %r)",
    ]
  )
  assert gpu_compile.link_bytes(hlo, 8) == pytest.approx(
    8 * 1024 * 2 * 7 / 8 + 256 * 4 * 3 + 64 * 4 * 1.0
  )


def test_the_roofline_is_the_largest_part():
  chip = compile_lib.Chip(
    "NVIDIA H200 141GB HBM3e", 8, 8, 100 * GIB, 989e12, 4.8e12
  )
  rows = [
    dict(
      name=name,
      model_flops=8 * 989e12 * 0.010,  # 10 ms at the peak
      memory=dict(argument=48e9, output=0.0, temp=0.0),  # 10 ms of HBM
      link_bytes=450e9 * 0.002,  # 2 ms of NVLink
    )
    for name in ("train_step", "sampler_step")
  ]
  gpu_compile.add_roofline(rows, chip, extra_train_flops=8 * 989e12 * 0.005)
  train, sampler = rows
  # remat's recompute makes the train step compute-bound: 15 ms.
  assert train["gpu_roofline"]["bound"] == "compute"
  assert train["roofline_seconds"] == pytest.approx(0.015)
  assert train["roofline_mfu_upper_bound"] == pytest.approx(10 / 15)
  assert sampler["roofline_seconds"] == pytest.approx(0.010)
  assert sampler["gpu_roofline"]["nvlink"] == pytest.approx(0.002)
  assert "link_bytes" not in train


def test_gpu_mistakes_are_one_line(capsys, monkeypatch):
  config = f"--config={ROOT}/configs/c2i.py"
  assert (
    cli.call(compile_lib, [config, "--topology=h100x8", "--extrapolate"]) == 2
  )
  err = capsys.readouterr().err
  assert "--extrapolate is for TPU topologies" in err
  assert len(err.strip().splitlines()) == 1
  # An unknown name lists the GPU nodes beside the TPU shapes.
  with pytest.raises(ValueError, match="h100x8, h200x8, a100x8"):
    compile_lib.topology_devices("h100x4")
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda n, *a: None if n == "jax_plugins.xla_cuda12" else real(n, *a),
  )
  assert cli.call(compile_lib, [config, "--topology=h200x8"]) == 2
  err = capsys.readouterr().err
  assert "CUDA plugin is not installed" in err and "--no-deps" in err


def test_the_caption_encoders_flops_match_xla():
  # XLA:CPU's count of a two-layer Gemma-3 (the 1B model's widths, one
  # sliding layer): the matmuls gemma_flops counts, within the elementwise
  # share.
  import dataclasses  # pylint: disable=g-import-not-at-top

  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

  two = dataclasses.replace(
    gemma.ONE_B,
    num_hidden_layers=2,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=8,
  )
  model = nnx.eval_shape(
    lambda: gemma.Gemma3TextModel(
      two, dtype=jnp.float32, param_dtype=jnp.float32
    )
  )
  graph, params = nnx.split(model)
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  valid = jax.ShapeDtypeStruct((2, 16), jnp.bool_)
  cost = (
    jax.jit(lambda p, i, v: nnx.merge(graph, p)(i, v))
    .lower(params, ids, valid)
    .compile()
    .cost_analysis()
  )
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  ours = gpu_compile.gemma_flops(two, rows=2, tokens=16)
  assert 1.0 <= cost["flops"] / ours < 1.05
