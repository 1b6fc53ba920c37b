"""The shipped configs and the benchmark command."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# variant: (batch, lr, base batch, steps, P_mean, P_std, D, depth, patch)
PAPER = {
    ("t2i", "xl"): (2048, 1e-4, 512, 500_000, 0.0, 1.6, 1152, 28, 1),
    ("c2i", "b4"): (1024, 1e-4, 256, 100_000, -0.4, 1.0, 768, 12, 4),
    ("c2i", "xl2_256"): (512, 1e-4, 256, 750_000, -0.4, 1.0, 1152, 28, 2),
    ("c2i", "xl1_512"): (512, 1e-4, 256, 750_000, -0.4, 1.0, 1152, 28, 1),
}


@pytest.mark.parametrize("family,variant", sorted(PAPER))
def test_paper_variants_carry_the_official_hyperparameters(family, variant):
  c = load(family).get_config(variant)
  batch, lr, base, steps, pm, ps, d, depth, p = PAPER[(family, variant)]
  assert (c.batch_size, c.optimizer.base_lr, c.optimizer.base_batch,
          c.num_steps) == (batch, lr, base, steps)
  assert (c.transport.params.P_mean, c.transport.params.P_std) == (pm, ps)
  net = c.model.network
  assert (net.hidden_size, net.depth, net.patch_size) == (d, depth, p)
  assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.eps,
          c.optimizer.weight_decay, c.optimizer.grad_clip) == (
              0.9, 0.95, 1e-6, 0.01, 1.0)
  assert c.ema_decay == 0.9999 and not c.ema_warmup
  assert (c.loss.diffusion_ratio, c.loss.consistency_ratio,
          c.loss.derivative, c.loss.epsilon) == (0.5, 0.1, "dde", 0.005)
  assert c.loss.enhance_target is False
  assert c.data.name == "latents" and c.model.dtype == "bfloat16"


@pytest.mark.parametrize("variant", ["xl2_256_mg", "xl1_512_mg"])
def test_model_guidance_variants(variant):
  c = load("c2i").get_config(variant)
  base = load("c2i").get_config(variant[:-3])
  assert (c.loss.enhance_target, c.loss.w_gt, c.loss.w_cond, c.loss.w_start,
          c.loss.w_end) == (True, 1.0, 0.75, 0.3, 0.8)
  assert c.model.network == base.model.network


def test_unknown_variant_and_key():
  with pytest.raises(ValueError, match="unknown t2i variant"):
    load("t2i").get_config("huge")
  c = load("t2i").get_config()
  with pytest.raises(AttributeError):
    c.modle = 1  # Locked: new keys are refused.


@pytest.mark.parametrize("family", ["t2i", "c2i"])
def test_tiny_defaults_build(family):
  from tim_jax import train
  c = load(family).get_config()
  assert c.data.name == "shapes"
  trainer = train.Trainer(c)
  assert trainer.model_config.kind == family


def test_bench_runs_and_reports(tmp_path):
  from tim_jax import bench
  c = load("c2i").get_config()
  c.unlock()
  c.model.network.hidden_size = 32
  c.model.network.depth = 1
  c.model.network.lora_hidden_size = 8
  c.data.image_size = 16
  out = bench.run(c, batch=4, repeats=1, nfes=[2],
                  rows=("forward", "tim_dde_step", "sample_nfe2_cfg"))
  names = [r["name"] for r in out["rows"]]
  assert names == ["forward", "tim_dde_step", "sample_nfe2_cfg"]
  fwd, step, smp = out["rows"]
  assert fwd["model_flops"] > 0 and fwd["seconds"] > 0
  assert smp["model_flops"] == pytest.approx(4 * fwd["model_flops"])
  assert step["model_flops"] > 3 * fwd["model_flops"]
  json.dumps(out)  # Serialisable as written by --out.
