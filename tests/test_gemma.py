"""The Gemma-3 caption encoder against transformers' PyTorch Gemma-3 text
model: random weights in a small config with both layer kinds, a tokenizer
trained here; float32 within 1e-4 on real tokens, and on pad rows against
the zero-attention rule of FlashAttention-2 (emulated on the reference side
with a custom attention function). The real 1B config builds with the
checkpoint's names, shapes and count."""

import copy
import dataclasses
import json
import os

from flax import nnx
import gemma_utils
import jax
import numpy as np
import pytest
import torch
import transformers

from tim_jax.encoders import gemma
from tim_jax.weights import torch_weights

pytestmark = [pytest.mark.parity]

DATA = os.path.join(os.path.dirname(__file__), "data", "gemma")
SENTENCES = gemma_utils.SENTENCES
SMALL = gemma_utils.SMALL
MAX_LEN = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  d = tmp_path_factory.mktemp("gemma")
  return d, gemma_utils.write(d)


def reference(model, ids, mask, sdpa=False):
  """last_hidden_state with pad query rows' attention output zeroed;
  eager attention, or PyTorch's SDPA (``sdpa``)."""
  from transformers import AttentionInterface
  from transformers.integrations.sdpa_attention import sdpa_attention_forward
  from transformers.masking_utils import AttentionMaskInterface, eager_mask
  from transformers.models.gemma3 import modeling_gemma3

  rows = torch.from_numpy(mask).to(next(model.parameters()).dtype)
  attention = (
    sdpa_attention_forward if sdpa else modeling_gemma3.eager_attention_forward
  )

  def zero_pad(module, query, key, value, attention_mask, **kw):
    out, weights = attention(module, query, key, value, attention_mask, **kw)
    return out * rows[:, :, None, None], weights

  name = "zero_pad_rows_sdpa" if sdpa else "zero_pad_rows"
  AttentionInterface.register(name, zero_pad)
  # The same (additive) masks as eager attention.
  AttentionMaskInterface.register(name, eager_mask)
  model.config._attn_implementation = name  # pylint: disable=protected-access
  with torch.no_grad():
    out = model.model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
    )
  return out.last_hidden_state.numpy()


def test_features_match_transformers(small):
  d, model = small
  enc = gemma.load(d, max_length=MAX_LEN)
  assert [t for t in enc.config.layer_types] == [
    "sliding_attention",
    "full_attention",
  ] * 2
  prompts = SENTENCES[:4]
  ids, mask = enc.tokenize(prompts)
  assert (ids[:, 0] == 2).all()  # BOS first
  assert ids.shape == (4, MAX_LEN)
  want = reference(model, ids, mask)
  got, lengths = enc.encode_padded(prompts)
  got = np.asarray(got)
  real = mask.astype(bool)
  scale = np.abs(want).max()
  assert np.abs(got[real] - want[real]).max() / scale < 1e-4
  assert np.abs(got[~real] - want[~real]).max() / scale < 1e-4
  np.testing.assert_array_equal(lengths, mask.sum(-1))
  # encode: cut to the longest caption, as the trainers do.
  cut, lengths = enc.encode(prompts)
  assert cut.shape == (4, int(lengths.max()), SMALL["hidden_size"])
  np.testing.assert_allclose(np.asarray(cut), got[:, : int(lengths.max())])


def test_features_match_transformers_in_float64(small):
  """In float64 against transformers' float64 model with PyTorch's SDPA,
  whose softmax is float64 (its eager attention takes the softmax in
  float32 even there). transformers forms the RMSNorms and the RoPE tables
  in float32 even in float64, and so does tim_jax; their float32 roundings
  (reduction order, XLA's float32 pow, cos and sin vs PyTorch's) leave
  3.0e-7 (measured with the RMSNorms in float64 on both sides: 4.2e-8;
  with RoPE's cos and sin too: 4.1e-9, its float32 frequencies). Before
  the attention took its softmax in float64 here: 3.3e-7."""
  d, model = small
  with jax.enable_x64(True):
    enc = gemma.load(d, max_length=MAX_LEN, dtype=jax.numpy.float64)
    prompts = SENTENCES[:4]
    ids, mask = enc.tokenize(prompts)
    want = reference(copy.deepcopy(model).double(), ids, mask, sdpa=True)
    got, _ = enc.encode_padded(prompts)
    assert got.dtype == np.float64
    got = np.asarray(got)
  real = mask.astype(bool)
  scale = np.abs(want).max()
  assert np.abs(got[real] - want[real]).max() / scale < 1e-6
  assert np.abs(got[~real] - want[~real]).max() / scale < 1e-6


def test_truncation_to_max_length(small):
  d, _ = small
  enc = gemma.load(d, max_length=6)
  ids, mask = enc.tokenize([SENTENCES[5]])
  assert ids.shape == (1, 6) and mask.sum() == 6 and ids[0, 0] == 2
  # Which prompts were cut (samplers warn about them).
  assert enc.truncated([SENTENCES[5], "a"]) == [True, False]


def test_real_config_has_the_checkpoint_names_shapes_and_count():
  with open(os.path.join(DATA, "config.json")) as f:
    cfg = json.load(f)
  hf_cfg = transformers.Gemma3TextConfig(
    **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
  )
  with torch.device("meta"):
    ref = transformers.Gemma3ForCausalLM(hf_cfg).model
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  c = gemma.GemmaConfig.from_json(cfg)
  assert c.layer_types.count("full_attention") == 4  # every 6th of 26
  model = nnx.eval_shape(lambda: gemma.Gemma3TextModel(c))
  got = torch_weights.expected_shapes(model)
  assert got == want
  count = sum(int(np.prod(s)) for s in got.values())
  assert count == sum(p.numel() for p in ref.parameters())
  assert 990e6 < count < 1010e6  # the "1B"


def test_bfloat16_embedding_scale_is_rounded():
  c = dataclasses.replace(
    gemma.ONE_B,
    vocab_size=8,
    intermediate_size=8,
    num_hidden_layers=0,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=8,
    layer_types=(),
  )
  bf16 = jax.numpy.bfloat16
  model = gemma.Gemma3TextModel(c, dtype=bf16, param_dtype=bf16)
  model.embed_tokens.weight.set_value(jax.numpy.ones((8, 1152), bf16))
  out = model.embed(jax.numpy.asarray([[3]]))
  assert float(out[0, 0, 0]) == 34.0  # sqrt(1152) = 33.94 in float32
  f32 = gemma.Gemma3TextModel(c)
  f32.embed_tokens.weight.set_value(jax.numpy.ones((8, 1152)))
  np.testing.assert_allclose(
    float(f32.embed(jax.numpy.asarray([[3]]))[0, 0, 0]),
    np.sqrt(1152),
    rtol=1e-6,
  )
