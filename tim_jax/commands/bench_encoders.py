"""Caption-encoding speed of the Gemma-3 text model, beside transformers.

    python -m tim_jax.commands.bench_encoders --config_json=tests/data/gemma/config.json \\
        --batch_size=8 --length=128 --dtype=float32 [--torch] [--out=FILE.json]

Random weights of the given ``config.json`` architecture (the real 1B
config needs no weight file). With ``--torch`` the same weights run in
``transformers``' PyTorch ``Gemma3ForCausalLM`` decoder in the same process
(SDPA attention: FlashAttention-2 needs a GPU) and the real-token features
are compared. Captions are random token ids, BOS first, of random lengths
between half and all of ``--length`` (right-padded), so the timing is of
the network, not the tokenizer. Each row is the median of ``--repeats``
timed calls after a warm-up (compile) call.
"""

from __future__ import annotations

import json
import sys

from absl import flags
import numpy as np

from tim_jax.commands import cli
from tim_jax.core import timing
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "config_json",
    None,
    "A Gemma-3 config.json, or a directory holding one.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size", 8, "Captions per call.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "length",
    128,
    "Padded caption length (tokens).",
    lower_bound=2,
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Weights and compute dtype.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "repeats",
    3,
    "Timed calls (median reported).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "torch",
    False,
    "Also time transformers' PyTorch model (same weights).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out", "", "Also write the results as JSON.", flag_values=fv
  )
  flags.mark_flag_as_required("config_json", flag_values=fv)


def main(fv: flags.FlagValues, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top
  from tim_jax.weights import torch_weights  # pylint: disable=g-import-not-at-top

  path, cfg = timing.read_config_json(fv.config_json)
  c = gemma.GemmaConfig.from_json(cfg)
  dtype = dict(float32=jnp.float32, bfloat16=jnp.bfloat16)[fv.dtype]
  rng = np.random.default_rng(0)
  ids = rng.integers(3, c.vocab_size, (fv.batch_size, fv.length)).astype(
    np.int32
  )
  ids[:, 0] = 2  # BOS
  lengths = rng.integers(fv.length // 2, fv.length + 1, fv.batch_size)
  valid = np.arange(fv.length)[None] < lengths[:, None]
  ids[~valid] = 0  # pad
  if fv.torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    tconfig = transformers.Gemma3TextConfig(
      **{k: v for k, v in cfg.items() if k not in ("architectures",)}
    )
    tconfig._attn_implementation = "sdpa"  # pylint: disable=protected-access
    decoder = (
      transformers.Gemma3ForCausalLM(tconfig)
      .model.eval()
      .to(getattr(torch, fv.dtype))
    )
    sd = {k: v.float().numpy() for k, v in decoder.state_dict().items()}
    model = nnx.eval_shape(
      lambda: gemma.Gemma3TextModel(c, dtype=dtype, param_dtype=dtype)
    )
    torch_weights.load_module(model, sd, "random Gemma-3")
    del sd
  else:
    model = gemma.Gemma3TextModel(
      c, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)
    )
  graph, params = nnx.split(model)
  forward = jax.jit(lambda p, i, v: nnx.merge(graph, p)(i, v))
  ours = lambda: jax.block_until_ready(forward(params, ids, valid))
  seconds = timing.median_seconds(ours, fv.repeats)
  tokens = int(valid.sum())
  rows = {
    "tim_jax": dict(
      captions_per_s=fv.batch_size / seconds, real_tokens_per_s=tokens / seconds
    )
  }
  if fv.torch:
    torch_ids = torch.from_numpy(ids).long()
    torch_mask = torch.from_numpy(valid.astype(np.int64))
    with torch.inference_mode():
      run = lambda: (
        decoder(
          input_ids=torch_ids, attention_mask=torch_mask
        ).last_hidden_state
      )
      t_seconds = timing.median_seconds(run, fv.repeats)
      ref = run().float().numpy()
    rows["transformers"] = dict(
      captions_per_s=fv.batch_size / t_seconds,
      real_tokens_per_s=tokens / t_seconds,
      torch_threads=torch.get_num_threads(),
    )
    got = np.asarray(ours(), np.float32)
    rows["max_rel_diff_real_tokens"] = float(
      np.abs(got[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    )
  result = dict(
    config=path,
    layers=c.num_hidden_layers,
    hidden=c.hidden_size,
    batch=fv.batch_size,
    length=fv.length,
    dtype=fv.dtype,
    device=str(jax.devices()[0].device_kind),
    **rows,
  )
  print(json.dumps(result, indent=1))
  if fv.out:
    with open(fv.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


def entry() -> None:
  """The console script ``tim-bench-encoders``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
