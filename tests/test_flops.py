"""tim_jax.models.flops against XLA's own count of the compiled programs.

Every check compiles the real function (the model, ``transition.target``,
``transition.loss``, ``sampling.sample``) with ``jax.jit(f).lower(...)
.compile()`` and reads ``cost_analysis()["flops"]``, the count of XLA's
HloCostAnalysis over the optimised HLO: 2 FLOPs per multiply-add of a dot or
convolution, plus 1 per element of every elementwise op and reduction
(transcendentals such as exp are counted apart and not included).

Our counts are model FLOPs (matmuls and attention products only), so XLA
reads a little higher: the elementwise work (LayerNorms, RoPE, softmax,
gates, residuals, the loss) costs ~100 FLOPs per token and hidden unit per
block against ~24 D per token and unit of matmuls, i.e. a share ~4/D —
about 8 % at D = 64, 4 % at D = 128, 2 % at D = 256. RoPE's pair swap is a
product with a signed permutation matrix (``models.layers.apply_rope``),
which XLA counts as 2 hd FLOPs per element of q and k: another hd / (6 D)
(2 % at D = 64 with hd 32, 1 % at the paper's D = 1152). That stays inside
the 12 % tolerance at the smallest width tested, so neither is added to the
count (and the tests would fail if the matmul model were off by more than
the few per cent left).

Compile speed: the programs are compiled with the XLA:CPU backend at
optimisation level 0. That option only changes LLVM code generation; the
HLO pipeline (CSE, DCE, fusion) and therefore the cost analysis are
unchanged — ``test_backend_level_does_not_change_the_count`` checks it — and
compiles are ~3x faster.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from tim_jax import models
from tim_jax.method import sampling, transition, transports
from tim_jax.models import flops

TOL = 0.12  # |XLA / ours - 1| must stay below this.
B = 8
FAST = {"xla_backend_optimization_level": 0}
OT_FM = transports.get("ot_fm")


def _config(kind, d, depth, p, **kw):
  base = dict(
    kind=kind,
    patch_size=p,
    in_channels=4,
    hidden_size=d,
    depth=depth,
    num_heads=4,
    encoder_depth=1,
    z_dim=32,
    projector_dim=64,
    num_classes=10,
    cap_feat_dim=d,
    use_projector=False,
  )
  base.update(kw)
  return models.TiMConfig(**base)


# name -> (config, height = width, caption_len). Tokens N = (hw / p)^2.
CASES = {
  # The widest elementwise share (D 64); exercises the 3-embedder
  # new_condition (t_embedder(t) twice in the code, once after CSE) and a
  # LoRA width.
  "c2i-D64-L2-p2-N16": (
    _config("c2i", 64, 2, 2, new_condition="t,r,t-r", lora_hidden_size=32),
    8,
    0,
  ),
  "c2i-D128-L4-p2-N64": (_config("c2i", 128, 4, 2), 16, 0),
  "c2i-D256-L2-p4-N64": (
    _config("c2i", 256, 2, 4, distance_aware=False),
    32,
    0,
  ),
  # t2i without the delta embedder: t_embedder on t and on r.
  "t2i-D128-L3-p2-N16": (
    _config("t2i", 128, 3, 2, use_new_embed=False, new_condition="t,r"),
    8,
    8,
  ),
  "t2i-D256-L2-p4-N36": (_config("t2i", 256, 2, 4, cap_feat_dim=192), 24, 8),
}
C2I, T2I = "c2i-D128-L4-p2-N64", "t2i-D128-L3-p2-N16"
SMALL_C2I = "c2i-D64-L2-p2-N16"


def xla_flops(f, *args, options=FAST):
  """FLOPs XLA counts for the compiled ``f(*args)``."""
  compiled = jax.jit(f).lower(*args).compile(compiler_options=options)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Some jax versions: one per device.
    cost = cost[0]
  return float(cost["flops"])


@functools.cache
def _setup(name):
  """(config, graphdef, abstract params, abstract inputs): nothing is
  initialised, XLA sees only shapes."""
  config, hw, m = CASES[name]
  graphdef, params = nnx.split(
    nnx.eval_shape(lambda: models.TiM(config, rngs=nnx.Rngs(0)))
  )
  s = jax.ShapeDtypeStruct
  x = s((B, hw, hw, config.in_channels), jnp.float32)
  t = s((B,), jnp.float32)
  if config.kind == "c2i":
    y, null = s((B,), jnp.int32), s((B,), jnp.int32)
  else:
    y = s((B, m, config.cap_feat_dim), jnp.float32)
    null = s((1, m, config.cap_feat_dim), jnp.float32)
  return config, graphdef, params, dict(x=x, t=t, y=y, null=null)


def _network(graphdef, params, **kw):
  model = nnx.merge(graphdef, params)
  return lambda x, t, r, y: model(x, t, r, y, **kw)


def _geometry(name):
  config, hw, m = CASES[name]
  return config, B, hw, hw, m


def _check(name, what, ours, counted):
  ratio = counted / ours
  print(
    f"\n{name:22s} {what:28s} ours {ours:14.4e}  XLA {counted:14.4e}  "
    f"XLA/ours {ratio:.3f}"
  )
  assert abs(ratio - 1.0) < TOL, (name, what, ours, counted, ratio)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward(name):
  _, graphdef, params, a = _setup(name)
  counted = xla_flops(
    lambda p, x, t, r, y: _network(graphdef, p)(x, t, r, y),
    params,
    a["x"],
    a["t"],
    a["t"],
    a["y"],
  )
  ours = flops.forward_flops(*_geometry(name))
  assert ours["total"] == sum(v for k, v in ours.items() if k != "total")
  _check(name, "forward", ours["total"], counted)


def test_forward_with_projection():
  config, hw, m = CASES[C2I]
  config = dataclasses.replace(
    config, use_projector=True, encoder_depth=2, projector_dim=256, z_dim=128
  )
  graphdef, params = nnx.split(
    nnx.eval_shape(lambda: models.TiM(config, rngs=nnx.Rngs(0)))
  )
  _, _, _, a = _setup(C2I)
  counted = xla_flops(
    lambda p, x, t, r, y: _network(graphdef, p, return_projection=True)(
      x, t, r, y
    ),
    params,
    a["x"],
    a["t"],
    a["t"],
    a["y"],
  )
  ours = flops.forward_flops(config, B, hw, hw, m, projection=True)
  assert ours["projector"] > 0.1 * ours["total"]  # Visible at 10 %.
  _check(C2I + "+proj", "forward, projection", ours["total"], counted)


def test_timestep_embedders_counted_once():
  """new_condition "t,r,t-r" calls t_embedder(t) twice in the code (once in
  TiM.__call__, once in _delta_embed); XLA's CSE runs it once, and so does
  our count: one timestep MLP more than "t-r" (t_embedder(r)), not two."""
  config, hw, m = CASES[SMALL_C2I]
  counted = {}
  for cond in ("t-r", "t,r,t-r"):
    c = dataclasses.replace(config, new_condition=cond)
    graphdef, params = nnx.split(
      nnx.eval_shape(lambda: models.TiM(c, rngs=nnx.Rngs(0)))
    )
    _, _, _, a = _setup(SMALL_C2I)
    counted[cond] = xla_flops(
      lambda p, x, t, r, y: _network(graphdef, p)(x, t, r, y),
      params,
      a["x"],
      a["t"],
      a["t"],
      a["y"],
    )
    ours = flops.forward_flops(c, B, hw, hw, m)["embedders"]
    counted[cond, "ours"] = ours
  one_mlp = 2 * B * (256 * config.hidden_size + config.hidden_size**2)
  assert counted["t,r,t-r", "ours"] - counted["t-r", "ours"] == one_mlp
  _check(
    SMALL_C2I, "t,r,t-r minus t-r", one_mlp, counted["t,r,t-r"] - counted["t-r"]
  )


def test_backend_level_does_not_change_the_count():
  _, graphdef, params, a = _setup(SMALL_C2I)
  f = lambda p, x, t, r, y: _network(graphdef, p)(x, t, r, y)
  args = (params, a["x"], a["t"], a["t"], a["y"])
  assert xla_flops(f, *args) == xla_flops(f, *args, options=None)


@pytest.mark.parametrize("name", [SMALL_C2I, T2I])
def test_flow_matching_step(name):
  """jax.grad of a sum-of-squares loss w.r.t. the parameters: 3 forwards
  (the backward as 2x the forward)."""
  _, graphdef, params, a = _setup(name)

  def loss(p, x, t, r, y):
    return jnp.sum(jnp.square(_network(graphdef, p)(x, t, r, y)))

  counted = xla_flops(jax.grad(loss), params, a["x"], a["t"], a["t"], a["y"])
  _check(
    name,
    "fm_step (grad)",
    flops.step_flops(*_geometry(name), step="fm_step"),
    counted,
  )


def _target(name, derivative, n):
  _, graphdef, params, a = _setup(name)

  def f(p, x, t, r, y):
    return transition.target(
      _network(graphdef, p),
      x,
      x,
      t,
      r,
      OT_FM,
      derivative,
      cond=y,
      num_diffusion=n,
    )

  return xla_flops(f, params, a["x"], a["t"], a["t"], a["y"])


@pytest.mark.parametrize("name", [C2I, T2I])
def test_dde_target(name):
  """Two forwards (t ± eps) over the B - n derivative rows. For c2i that is
  2 (B - n) / B of a forward of the batch; for t2i the caption embedder and
  the cross-attention k/v do not depend on t and the ``vmap`` over ± runs
  them once (``dde_flops`` subtracts them: without it, ours would be ~4 %
  high here)."""
  n = 2
  config, b, h, w, m = _geometry(name)
  ours = flops.dde_flops(config, b - n, h, w, m)
  if config.kind == "c2i":
    full = flops.forward_flops(config, b, h, w, m)["total"]
    assert ours == pytest.approx(2 * (b - n) / b * full)
  _check(name, f"DDE target (n={n})", ours, _target(name, "dde", n))


@pytest.mark.parametrize("name", [C2I, T2I])
def test_jvp_target(name):
  """One JVP over the B - n derivative rows: ~2 forwards (see
  ``flops.jvp_flops`` for the exact model; a plain 2 F is within 10 % too
  at these sizes)."""
  n = 2
  config, b, h, w, m = _geometry(name)
  counted = _target(name, "jvp", n)
  ours = flops.jvp_flops(config, b - n, h, w, m)
  _check(name, f"JVP target (n={n})", ours, counted)


@pytest.mark.parametrize(
  "name,derivative", [(C2I, "dde"), (T2I, "dde"), (C2I, "jvp")]
)
def test_tim_loss_step(name, derivative):
  """value_and_grad of the full ``transition.loss`` (default LossConfig:
  half the rows are diffusion rows) against ``step_flops``. (At D 64 this
  reads 1.087: the elementwise share of the module docstring plus the
  loss's own; D 128 leaves the matmul model a clearer margin.)"""
  _, graphdef, params, a = _setup(name)
  config = transition.LossConfig(derivative=derivative)

  def loss(p, x, y, key):
    network = _network(graphdef, p)
    fn = lambda *args: (network(*args), None)
    return transition.loss(fn, x, y, key, transport=OT_FM, config=config)

  counted = xla_flops(
    jax.value_and_grad(loss, has_aux=True),
    params,
    a["x"],
    a["y"],
    jax.random.key(0),
  )
  ours = flops.step_flops(
    *_geometry(name),
    step=f"tim_{derivative}_step",
    diffusion_share=config.diffusion_ratio,
  )
  _check(name, f"tim_{derivative}_step (loss+grad)", ours, counted)


def _sampler_flops(name, num_steps, guidance_interval):
  _, graphdef, params, a = _setup(name)

  def f(p, noise, y, null):
    return sampling.sample(
      _network(graphdef, p),
      noise,
      y,
      null,
      transport=OT_FM,
      num_steps=num_steps,
      cfg_scale=2.0,
      guidance_interval=guidance_interval,
    )

  return xla_flops(f, params, a["x"], a["y"], a["null"])


@pytest.mark.parametrize("name", [C2I, T2I])
def test_sampler(name):
  """``sampling.sample``: 4 steps, cfg 2, guidance on t_cur in (0, 0.7),
  so steps at t = 1, 0.75 run plain and t = 0.5, 0.25 guided (doubled
  batch): the sampler costs (4 + 2) F.

  How XLA counts it: the steps are a ``lax.scan`` — an HLO ``while`` — and
  the guidance a ``lax.cond`` — an HLO ``conditional``. HloCostAnalysis
  costs a ``while`` as ONE pass of its body (the trip count is not used) and
  a ``conditional`` as the MAXIMUM over its branches (not the sum, not the
  branch taken). So XLA reports one guided step, 2 F, for the whole 4-step
  sampler. We check that reading, and the true total as the sum of the
  per-step bodies XLA counts when each is compiled alone: with one step the
  scan's loop is removed (trip count 1) and the cond's predicate is a
  constant, so the branch is folded and counted exactly.
  """
  config, b, h, w, m = _geometry(name)
  plan = sampling.step_schedule(OT_FM, 4, 2.0, (0.0, 0.7))
  assert plan["guided"].tolist() == [False, False, True, True]

  whole = _sampler_flops(name, 4, (0.0, 0.7))
  one_body = flops.step_flops(
    config, b, h, w, m, step="sample", num_steps=1, guided_steps=1
  )
  _check(name, "sample x4 as XLA counts it", one_body, whole)

  plain_step = _sampler_flops(name, 1, (0.0, 0.7))  # t = 1: unguided.
  guided_step = _sampler_flops(name, 1, (0.0, 1.5))  # 1 < 1.5: guided.
  _check(
    name,
    "sampler step, plain",
    flops.step_flops(config, b, h, w, m, step="sample"),
    plain_step,
  )
  _check(
    name,
    "sampler step, guided",
    flops.step_flops(config, b, h, w, m, step="sample", guided_steps=1),
    guided_step,
  )
  ours = flops.step_flops(
    config, b, h, w, m, step="sample", num_steps=4, guided_steps=2
  )
  _check(
    name, "sample x4, sum of steps", ours, 2 * plain_step + 2 * guided_step
  )


# --- the formula alone ------------------------------------------------------


def test_step_kinds():
  config, b, h, w, m = _geometry(T2I)
  f = flops.forward_flops(config, b, h, w, m)["total"]
  count = functools.partial(flops.step_flops, config, b, h, w, m)
  assert count(step="forward") == f
  assert count(step="fm_step") == 3 * f
  assert count(step="sample", num_steps=4, guided_steps=2) == 6 * f
  assert count(step="tim_dde_step") == 3 * f + flops.dde_flops(
    config, b // 2, h, w, m
  )
  assert count(step="tim_jvp_step") == 3 * f + flops.jvp_flops(
    config, b // 2, h, w, m
  )
  # All rows diffusion rows: no derivative pass.
  assert count(step="tim_dde_step", diffusion_share=1.0) == 3 * f
  # ~2 forwards per derivative pass.
  assert 1.8 < flops.jvp_flops(config, b, h, w, m) / f < 2.2
  assert 1.8 < flops.dde_flops(config, b, h, w, m) / f <= 2.0
  with pytest.raises(ValueError):
    count(step="backward")
  with pytest.raises(ValueError):
    count(step="sample", num_steps=2, guided_steps=3)
  # Linear in the batch; c2i has no cross-attention, t2i has.
  assert flops.forward_flops(config, 2 * b, h, w, m)["total"] == 2 * f
  assert flops.forward_flops(*_geometry(C2I))["cross_attention"] == 0
  assert flops.forward_flops(config, b, h, w, m)["cross_attention"] > 0


def test_xl2_256_forward():
  """TiM-XL/2 at 256 px (32x32x4 SD-VAE latents, 256 tokens), batch 1.

  The DiT paper's 118.6 "Gflops" for DiT-XL/2 are multiply-adds (its authors
  count a multiply-add as one FLOP, as fvcore does; DiT issue #14), so
  ~237 GFLOPs at 2 per multiply-add. TiM-XL/2 has the same matmul shapes
  where the FLOPs are (SwiGLU hidden 3072 = 8/3 D: 3 D x 3072 = 8 D^2, the
  same as DiT's 4x GELU MLP); its extras (qkv_d, LoRA adaLN) act on one
  vector per sample.
  """
  config = models.TiMConfig(
    kind="c2i",
    patch_size=2,
    in_channels=4,
    hidden_size=1152,
    depth=28,
    num_heads=16,
    encoder_depth=8,
    lora_hidden_size=384,
  )
  out = flops.forward_flops(config, 1, 32, 32)
  total = out["total"]
  print(
    f"\nTiM-XL/2 256px forward: {total / 1e9:.1f} GFLOPs "
    f"({total / 2e9:.1f} G multiply-adds); "
    + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in out.items())
  )
  assert 200e9 < total < 300e9
  # DiT-XL/2 in multiply-adds, from its architecture: per block qkv + proj
  # (4 D^2) and the MLP (8 D^2) per token, QK^T and AV (2 N^2 D), adaLN
  # (6 D^2) per sample.
  d, n = 1152, 256
  dit_macs = 28 * (12 * n * d * d + 2 * n * n * d + 6 * d * d)
  assert dit_macs == pytest.approx(118.6e9, rel=0.005)
  assert total / 2 == pytest.approx(dit_macs, rel=0.01)
  # Backward = 2x forward: a flow-matching step is 3 forwards; a TiM DDE
  # step with half the rows diffusion rows adds 2 forwards of half a batch.
  assert flops.step_flops(config, 1, 32, 32, step="fm_step") == 3 * total
  assert flops.step_flops(config, 2, 32, 32, step="tim_dde_step") == (
    pytest.approx(8 * total)
  )
  # With the REPA projector (2 x 2048 hidden, 768 out) on the 256 tokens.
  proj = flops.forward_flops(config, 1, 32, 32, projection=True)["projector"]
  assert proj == 2 * 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)


@pytest.mark.parametrize(
  "grid,image_hw,table",
  [((4, 4), (40, 36), (8, 8)), ((3, 5), (24, 40), (6, 6))],
)
def test_repa_teacher(grid, image_hw, table):
  from tim_jax.encoders import radio

  c = dataclasses.replace(
    radio.V2_5_B,
    embed_dim=128,
    depth=2,
    num_heads=4,
    mlp_hidden=512,
    table=table,
  )
  # Looped blocks: XLA counts a scanned body once.
  enc = radio.random_encoder(c, scan_blocks=False)
  images = jnp.zeros((B,) + image_hw + (3,))
  compiled = (
    jax.jit(enc.apply, static_argnums=(2,))
    .lower(enc.state, images, grid)
    .compile(compiler_options=FAST)
  )
  xla = compiled.cost_analysis()["flops"]
  ours = flops.repa_teacher_flops(
    embed_dim=c.embed_dim,
    depth=c.depth,
    mlp_hidden=c.mlp_hidden,
    patch_size=c.patch_size,
    num_skip=c.num_skip,
    table=c.table,
    batch=B,
    grid=grid,
    image_hw=image_hw,
  )
  assert abs(xla / ours - 1) < TOL, (xla, ours)
