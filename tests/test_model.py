"""The TiM backbone: structure, sizes, options and invariances."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import state_utils

from tim_jax import models
from tim_jax.core import numerics, tracing
from tim_jax.models import architectures, layers

TINY = dict(
  patch_size=2,
  in_channels=4,
  hidden_size=32,
  depth=2,
  num_heads=2,
  encoder_depth=1,
  z_dim=16,
  projector_dim=32,
  lora_hidden_size=8,
  num_classes=10,
)
TINY_T2I = dict(TINY, cap_feat_dim=24)
TINY_T2I.pop("num_classes")

# Parameter counts of the official ``TiM`` classes built with the settings of
# ``configs/c2i/*.yaml`` and ``configs/t2i/tim_xl_p1_t2i.yaml`` (the
# architectures of tim_jax.models.architectures): in all and without the REPA
# projector. The official README reports the latter as 664M (XL) and 865M
# (T2I).
EXPECTED_COUNTS = {
  "B/4": dict(total=136_173_120, without_projector=128_828_224),
  "XL/2": dict(total=672_259_344, without_projector=664_128_016),
  "XL/1": dict(total=672_296_224, without_projector=664_164_896),
  "T2I-XL": dict(total=873_109_408, without_projector=864_978_080),
}


def count(tree):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_paper_parameter_counts(name):
  arch = architectures.get(name)
  model = nnx.eval_shape(lambda: models.build(arch.kind, arch.network))
  n = count(nnx.state(model, nnx.Param))  # No memory: shapes only.
  n_proj = count(nnx.state(model.projector, nnx.Param))
  want = EXPECTED_COUNTS[name]
  assert n == want["total"]
  assert n - n_proj == want["without_projector"]


def _perturb(model, scale=0.05, seed=1):
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    v + scale * jax.random.normal(k, v.shape, v.dtype)
    for v, k in zip(leaves, keys)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _inputs(kind, b=2, h=8, w=8, c=4, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, h, w, c))
  t = jax.random.uniform(k[1], (b,))
  r = t * jax.random.uniform(k[2], (b,))
  if kind == "c2i":
    y = jnp.arange(b) % 10
  else:
    y = jax.random.normal(k[3], (b, 5, 24))
  return x, t, r, y


@pytest.mark.parametrize("kind,net", [("c2i", TINY), ("t2i", TINY_T2I)])
def test_official_init(kind, net):
  model = models.build(kind, net)
  out = model(*_inputs(kind))
  # Zeroed adaLN outputs and final layer: the network outputs exactly 0.
  assert np.all(np.asarray(out) == 0)
  for block in model.blocks:
    assert np.all(np.asarray(block.adaLN_modulation.fc2.kernel[...]) == 0)
    assert np.any(np.asarray(block.attn.qkv_d.kernel[...]) != 0)
  std = float(jnp.std(model.t_embedder.mlp_0.kernel[...]))
  assert 0.015 < std < 0.025  # N(0, 0.02^2)
  # The delta embedder keeps Xavier: U(+-sqrt(6 / (256 + 32))).
  bound = np.sqrt(6 / (256 + 32))
  delta = np.asarray(model.delta_embedder.mlp_0.kernel[...])
  assert np.abs(delta).max() <= bound and np.abs(delta).max() > 0.9 * bound


def test_every_parameter_has_logical_axes():
  for kind, net in (("c2i", TINY), ("t2i", TINY_T2I)):
    model = models.build(kind, net)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var.get_value().ndim, path
      dims = [n for n in names if n is not None]
      assert len(set(dims)) == len(dims), (path, names)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kind,net", [("c2i", TINY), ("t2i", TINY_T2I)])
def test_abstract_build_describes_the_concrete_one(kind, net, scan):
  build = lambda: models.build(kind, net, scan_blocks=scan)
  abstract = state_utils.described(nnx.eval_shape(build))
  assert abstract == state_utils.described(build())
  assert any(m.get("out_sharding") for *_, m in abstract.values())


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kind,net", [("c2i", TINY), ("t2i", TINY_T2I)])
def test_traced_init_equals_the_init_in_one_trace(kind, net, scan, monkeypatch):
  # Under jax.jit (Trainer.init_state) the model's parts are traced apart:
  # the same keys drawn, the same program, so the same values as the model
  # built in one trace (tracing.apart bypassed here).
  def init():
    rngs = nnx.Rngs(5)
    config = models.TiMConfig.from_official(kind, net, scan_blocks=scan)
    model = models.TiM(config, rngs=rngs)
    return nnx.state(model, nnx.Param), nnx.state(rngs)

  apart = state_utils.host(jax.jit(init)())
  monkeypatch.setattr(tracing, "apart", lambda make: make)
  whole = state_utils.host(jax.jit(init)())
  assert jax.tree.structure(apart) == jax.tree.structure(whole)
  jax.tree.map(np.testing.assert_array_equal, apart, whole)
  # And no trace (eager): the same keys, each parameter drawn as before.
  eager = state_utils.host(init())
  jax.tree.map(np.testing.assert_array_equal, apart[1], eager[1])


@pytest.mark.parametrize("kind,net", [("c2i", TINY), ("t2i", TINY_T2I)])
@pytest.mark.parametrize("hw", [(8, 8), (4, 12), (10, 6)])
def test_any_divisible_size(kind, net, hw):
  model = _perturb(models.build(kind, net))
  x, t, r, y = _inputs(kind, h=hw[0], w=hw[1])
  out, proj = model(x, t, r, y, return_projection=True)
  assert out.shape == x.shape
  assert proj.shape == (2, hw[0] * hw[1] // 4, net["z_dim"])
  assert np.all(np.isfinite(np.asarray(out)))


def test_bad_inputs_are_named():
  model = models.build("c2i", TINY)
  x, t, r, y = _inputs("c2i")
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    model(x[:, :7], t, r, y)
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.moveaxis(x, -1, 1), t, r, y)
  with pytest.raises(ValueError, match="class labels"):
    model(x, t, r, jnp.zeros((2, 5, 24)))
  with pytest.raises(ValueError, match="new_condition"):
    models.build("c2i", dict(TINY, new_condition="t+r"))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    models.build("c2i", dict(TINY, num_heads=3))


def test_rope_official_index_rule():
  # Official ``TiM.get_rope`` ('xy' meshgrid): h=2 rows, w=3 columns ->
  # axis A = n mod h, axis B = n div h.
  cos, _ = layers.rope_tables(2, 3, 8, "official")
  cos_xy, _ = layers.rope_tables(2, 3, 8, "xy")
  # With head_dim 8 the first frequency is 1: angle = position.
  np.testing.assert_allclose(
    np.arccos(cos[:, 0]), [0, 1, 0, 1, 0, 1], atol=1e-6
  )
  np.testing.assert_allclose(
    np.arccos(cos[:, 4]), [0, 0, 1, 1, 2, 2], atol=1e-6
  )
  np.testing.assert_allclose(
    np.arccos(cos_xy[:, 0]), [0, 1, 2, 0, 1, 2], atol=1e-6
  )
  np.testing.assert_allclose(
    np.arccos(cos_xy[:, 4]), [0, 0, 0, 1, 1, 1], atol=1e-6
  )
  # Square grids: both rules agree.
  np.testing.assert_array_equal(
    layers.rope_tables(4, 4, 8, "official")[0],
    layers.rope_tables(4, 4, 8, "xy")[0],
  )


def test_rope_rotation_is_interleaved_and_relative():
  # Interleaved pairs: (u0, u1) -> (u0 cos - u1 sin, u1 cos + u0 sin).
  u = jnp.asarray([[[[1.0, 2.0, 3.0, 4.0]]]])
  cos = jnp.cos(jnp.asarray([[0.3, 0.3, 0.7, 0.7]]))
  sin = jnp.sin(jnp.asarray([[0.3, 0.3, 0.7, 0.7]]))
  out = np.asarray(layers.apply_rope(u, cos, sin))[0, 0, 0]
  c, s = np.cos(0.3), np.sin(0.3)
  np.testing.assert_allclose(out[:2], [1 * c - 2 * s, 2 * c + 1 * s], rtol=1e-6)
  # Attention logits depend only on relative positions.
  cos_t, sin_t = layers.rope_tables(4, 4, 8, "xy")
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

  def logit(i, j):
    qi = layers.apply_rope(q, cos_t[i : i + 1], sin_t[i : i + 1])
    kj = layers.apply_rope(k, cos_t[j : j + 1], sin_t[j : j + 1])
    return float(jnp.sum(qi * kj))

  # Token 5 = (x1, y1), 0 = (0, 0); 10 = (2, 2), 5 = (1, 1): same offset.
  assert logit(5, 0) == pytest.approx(logit(10, 5), rel=1e-5)
  assert logit(5, 0) != pytest.approx(logit(6, 0), rel=1e-3)


def test_layernorm_cpu_and_tpu_forms_agree_to_second_order():
  # The CPU's written derivative and the TPU's traced formula are one map:
  # equal values and derivatives in both modes and at second order.
  written = lambda a: layers._standardize_written(a, 1e-6)  # pylint: disable=protected-access
  traced = lambda a: layers._standardize_traced(a, 1e-6)  # pylint: disable=protected-access
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (5, 16))
  dx = jax.random.normal(jax.random.key(1), (5, 16))
  ct = jax.random.normal(jax.random.key(2), (5, 16))
  np.testing.assert_allclose(written(x), traced(x), atol=1e-6)
  np.testing.assert_allclose(
    jax.jvp(written, (x,), (dx,))[1],
    jax.jvp(traced, (x,), (dx,))[1],
    atol=1e-5,
  )
  np.testing.assert_allclose(
    jax.vjp(written, x)[1](ct)[0], jax.vjp(traced, x)[1](ct)[0], atol=1e-5
  )
  # Second order (a gradient of the forward-mode derivative) also agrees.
  second = lambda f: jax.grad(
    lambda a: jnp.sum(jax.jvp(f, (a,), (dx,))[1] * ct)
  )(x)
  np.testing.assert_allclose(second(written), second(traced), atol=1e-4)
  # The layer picks its form when lowered: the written one for CPU.
  text = str(jax.make_jaxpr(lambda a: layers.standardize(a, 1e-6))(x))
  assert "platform_index" in text and "custom_jvp_call" in text
  np.testing.assert_allclose(
    jax.jit(jax.grad(lambda a: jnp.sum(layers.standardize(a, 1e-6) * ct)))(x),
    jax.vjp(written, x)[1](ct)[0],
    atol=1e-6,
  )


def test_forms_for_a_platform_trace_that_form_only():
  # Under forms_for the layers trace one form, the one lowering would pick
  # for that platform: no platform switch left in the program.
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (5, 16))
  q = jax.random.normal(jax.random.key(1), (1, 2, 4, 8))
  # A new function each time: jit's trace cache keys on the function, not
  # on the context (hence the context is entered inside jitted functions).
  text = lambda f, *a: str(jax.make_jaxpr(lambda *b: f(*b))(*a))
  norm = lambda a: layers.standardize(a, 1e-6)
  att = lambda a: layers.attention(a, a, a)
  with layers.forms_for("cpu"):
    cpu_norm, cpu_att = text(norm, x), text(att, q)
  with layers.forms_for("tpu"):
    tpu_norm, tpu_att = text(norm, x), text(att, q)
  assert "platform_index" not in cpu_norm + cpu_att + tpu_norm + tpu_att
  assert cpu_norm == text(lambda a: layers._standardize_written(a, 1e-6), x)  # pylint: disable=protected-access
  assert tpu_norm == text(lambda a: layers._standardize_traced(a, 1e-6), x)  # pylint: disable=protected-access
  assert cpu_att == text(lambda a: layers._attend_scaled_q(a, a, a, None), q)  # pylint: disable=protected-access
  assert tpu_att == text(
    lambda a: layers._attend_scaled_logits(a, a, a, None),  # pylint: disable=protected-access
    q,
  )
  # The context ends with its block, and nests.
  assert "platform_index" in text(norm, x)
  with layers.forms_for("tpu"):
    with layers.forms_for("cpu"):
      assert text(norm, x) == cpu_norm
    assert text(norm, x) == tpu_norm


@pytest.mark.parametrize("masked", [False, True])
def test_attention_cpu_and_tpu_forms_agree(masked):
  # Scale on q (CPU) and scale on the logits (TPU): the same attention,
  # values and gradients, in float32 and bfloat16.
  keys = jax.random.split(jax.random.key(3), 4)
  shape = (2, 3, 10, 8)
  q, k, v = (jax.random.normal(key, shape) for key in keys[:3])
  mask = jnp.arange(10)[None, :] < jnp.array([[4], [10]]) if masked else None
  cpu = layers._attend_scaled_q  # pylint: disable=protected-access
  tpu = layers._attend_scaled_logits  # pylint: disable=protected-access
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    args = [a.astype(dtype) for a in (q, k, v)]
    loss = lambda f, *a: jnp.sum(f(*a, mask).astype(jnp.float32) ** 2)
    np.testing.assert_allclose(
      np.asarray(cpu(*args, mask), np.float32),
      np.asarray(tpu(*args, mask), np.float32),
      atol=tol,
      rtol=tol,
    )
    for g_cpu, g_tpu in zip(
      jax.grad(lambda *a: loss(cpu, *a), argnums=(0, 1, 2))(*args),
      jax.grad(lambda *a: loss(tpu, *a), argnums=(0, 1, 2))(*args),
    ):
      np.testing.assert_allclose(
        np.asarray(g_cpu, np.float32),
        np.asarray(g_tpu, np.float32),
        atol=5 * tol,
        rtol=5 * tol,
      )
  # The float32 forms agree with the reference formula.
  want = jax.nn.dot_product_attention(
    *(jnp.swapaxes(a, 1, 2) for a in (q, k, v)),
    mask=None if mask is None else mask[:, None, None, :],
  )
  np.testing.assert_allclose(
    cpu(q, k, v, mask), jnp.swapaxes(want, 1, 2), atol=1e-5
  )


@pytest.mark.parametrize(
  "condition", ["t-r", "r", "t,r", "t,t-r", "r,t-r", "t,r,t-r"]
)
def test_new_condition_options(condition):
  model = _perturb(models.build("c2i", dict(TINY, new_condition=condition)))
  x, t, r, y = _inputs("c2i")
  out = model(x, t, r, y)
  assert np.all(np.isfinite(np.asarray(out)))
  # Every option makes the output depend on r.
  other = model(x, t, r * 0.5, y)
  assert not np.allclose(np.asarray(out), np.asarray(other))


def test_variants_without_optional_parts():
  net = dict(
    TINY,
    qk_norm=False,
    distance_aware=False,
    use_new_embed=False,
    class_dropout_prob=0.0,
  )
  model = _perturb(models.build("c2i", net))
  assert model.blocks[0].attn.qkv_d is None
  assert model.blocks[0].attn.q_norm is None
  assert model.delta_embedder is None
  assert model.y_embedder.embedding_table.embedding.shape[0] == 10
  x, t, r, y = _inputs("c2i")
  assert model(x, t, r, y).shape == x.shape


def test_remat_and_jit_compute_the_same_function():
  model = _perturb(models.build("c2i", TINY))
  remat = _perturb(models.build("c2i", dict(TINY, remat=True)))
  x, t, r, y = _inputs("c2i")

  def loss(m):
    return jnp.sum(m(x, t, r, y) ** 2)

  g1 = nnx.grad(loss)(model)
  g2 = nnx.jit(nnx.grad(loss))(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6
    )


def test_remat_runs_under_vmap_inside_a_gradient():
  # A model called under jax.vmap (e.g. over a batch of times) inside a
  # loss's gradient: remat must work there too.
  model = _perturb(models.build("c2i", TINY))
  remat = _perturb(models.build("c2i", dict(TINY, remat=True)))
  x, t, r, y = _inputs("c2i")

  def loss(m):
    both = jax.vmap(lambda tt: m(x, tt, r, y))(jnp.stack([t, 0.9 * t]))
    return jnp.sum(both**2)

  g1 = nnx.grad(loss)(model)
  g2 = nnx.jit(nnx.grad(loss))(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6
    )


def test_bfloat16_compute_keeps_float32_params_and_output():
  ref = _perturb(models.build("t2i", TINY_T2I))
  low = _perturb(models.build("t2i", TINY_T2I, dtype=jnp.bfloat16))
  x, t, r, y = _inputs("t2i")
  out = low(x, t, r, y)
  assert out.dtype == jnp.float32  # The output layer runs in float32.
  assert all(
    v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(low, nnx.Param))
  )
  want = np.asarray(ref(x, t, r, y))
  err = np.linalg.norm(np.asarray(out) - want) / np.linalg.norm(want)
  assert 1e-5 < err < 5e-2  # bf16-level error, not float32-exact.


def test_library_attention_path_matches_the_einsum_path():
  ref = _perturb(models.build("t2i", TINY_T2I))
  lib = _perturb(models.build("t2i", TINY_T2I, attention_impl="xla"))
  x, t, r, y = _inputs("t2i")
  np.testing.assert_allclose(
    np.asarray(lib(x, t, r, y)),
    np.asarray(ref(x, t, r, y)),
    rtol=1e-4,
    atol=1e-5,
  )


def _numpy_attention(q, k, v, mask, scale):
  """Softmax attention in numpy float64, (B, T, N, H); k, v grouped."""
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


def test_float64_attention_computes_in_float64():
  """jax.nn.dot_product_attention takes its softmax in float32 even for
  float64 inputs; numerics.dot_product_attention (grouped keys and a mask
  here) and the backbone's attention do not."""
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 5, 4, 8)) * 3
  k, v = rng.standard_normal((2, 2, 7, 2, 8)) * 3
  mask = rng.random((2, 1, 5, 7)) < 0.7
  mask[..., 0] = True
  want = _numpy_attention(q, k, v, mask, 0.3)
  rel = lambda a: np.abs(np.asarray(a) - want).max() / np.abs(want).max()
  with jax.enable_x64(True):
    got = numerics.dot_product_attention(q, k, v, mask=mask, scale=0.3)
    assert got.dtype == jnp.float64 and rel(got) < 1e-14
    library = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)
    assert rel(library) > 1e-9  # float32 rounding: what this avoids.
    # The backbone's own attention, (B, heads, T, hd), default scale.
    t = lambda a: np.swapaxes(a, 1, 2)
    k4, v4 = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    want = _numpy_attention(q, k4, v4, np.ones_like(mask), 8**-0.5)
    for impl in (None, "xla"):
      got = t(layers.attention(t(q), t(k4), t(v4), impl))
      assert rel(got) < 1e-14, impl
  # Narrower dtypes go to the library unchanged.
  q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
  np.testing.assert_array_equal(
    numerics.dot_product_attention(q32, k32, v32, mask=mask),
    jax.nn.dot_product_attention(q32, k32, v32, mask=mask),
  )


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("remat", [False, True])
def test_caption_length_mask_equals_the_official_truncation(impl, remat):
  # The official T2I code cuts a batch's caption features to its longest
  # caption (L) and gives them unmasked. Padding them to a longer bucket (M)
  # with anything past L and hiding those keys must give the same output.
  model = _perturb(
    models.build("t2i", dict(TINY_T2I, attention_impl=impl, remat=remat))
  )
  x, t, r, _ = _inputs("t2i", b=3)
  length, bucket = 5, 16
  feats = jax.random.normal(jax.random.key(7), (3, bucket, 24))
  want = np.asarray(model(x, t, r, feats[:, :length]))
  garbage = feats.at[:, length:].set(1e3)  # Must not leak through.
  got = model(x, t, r, {"features": garbage, "length": jnp.full((3,), length)})
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Unmasked, the padded positions change the output: the mask is doing it.
  plain = np.asarray(model(x, t, r, garbage))
  assert np.abs(plain - want).max() > 1e-3
  # Per-row lengths: row b equals its own truncation.
  lengths = jnp.asarray([2, 5, 9])
  got = np.asarray(model(x, t, r, {"features": feats, "length": lengths}))
  for b, n in enumerate([2, 5, 9]):
    one = model(x[b : b + 1], t[b : b + 1], r[b : b + 1], feats[b : b + 1, :n])
    np.testing.assert_allclose(got[b], np.asarray(one)[0], rtol=1e-5, atol=1e-6)


def test_caption_dict_is_checked():
  model = models.build("t2i", TINY_T2I)
  x, t, r, y = _inputs("t2i")
  with pytest.raises(ValueError, match="'features' and 'length'"):
    model(x, t, r, {"features": y})
  with pytest.raises(ValueError, match="caption length must have shape"):
    model(x, t, r, {"features": y, "length": jnp.ones((3,), jnp.int32)})


@pytest.mark.parametrize("kind,net", [("c2i", TINY), ("t2i", TINY_T2I)])
@pytest.mark.parametrize("remat", [False, "full", "dots_saveable"])
def test_scanned_blocks_equal_the_unrolled_model(kind, net, remat):
  from tim_jax.weights import convert

  net = dict(net, depth=3, encoder_depth=2)
  unrolled = _perturb(models.build(kind, net))
  scanned = models.build(kind, dict(net, scan_blocks=True, remat=remat))
  sd = convert.to_official(unrolled)
  report = convert.load_state_dict(scanned, sd)
  assert not report.missing and not report.unexpected
  # The stacked layout converts back to the same official state dict.
  back = convert.to_official(scanned)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  kernel = nnx.state(scanned, nnx.Param)["blocks"]["attn"]["qkv"]["kernel"]
  assert kernel.shape == (3, 32, 96)
  assert kernel.get_metadata()["out_sharding"][0] == "layers"
  x, t, r, y = _inputs(kind)
  want, want_proj = unrolled(x, t, r, y, return_projection=True)
  got, got_proj = nnx.jit(lambda m: m(x, t, r, y, return_projection=True))(
    scanned
  )
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(got_proj), np.asarray(want_proj), rtol=1e-6, atol=1e-6
  )
  # Gradients through the scan (and its remat policy) match too.
  loss = lambda m: jnp.sum(m(x, t, r, y) ** 2)
  g1 = convert.to_official(_grads_as_model(unrolled, nnx.grad(loss)(unrolled)))
  g2 = convert.to_official(_grads_as_model(scanned, nnx.grad(loss)(scanned)))
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-6)


def _grads_as_model(model, grads):
  graph, _ = nnx.split(model)
  return nnx.merge(graph, nnx.state(grads))
