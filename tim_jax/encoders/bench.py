"""Caption-encoding speed of the Gemma-3 text model, beside transformers.

    python -m tim_jax.encoders.bench --config=tests/data/gemma/config.json \\
        --batch=8 --length=128 --dtype=float32 [--torch] [--out=FILE.json]

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

import argparse
import json
import sys

import numpy as np

from tim_jax import timing


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tim_jax.encoders.bench")
  p.add_argument("--config", required=True,
                 help="a Gemma-3 config.json, or a directory holding one")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128,
                 help="padded caption length (tokens)")
  p.add_argument("--dtype", default="float32",
                 choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch", action="store_true",
                 help="also time transformers' PyTorch model (same weights)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tim_jax import torch_weights  # pylint: disable=g-import-not-at-top
  from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top
  path, cfg = timing.read_config_json(args.config)
  c = gemma.GemmaConfig.from_json(cfg)
  dtype = dict(float32=jnp.float32, bfloat16=jnp.bfloat16)[args.dtype]
  rng = np.random.default_rng(0)
  ids = rng.integers(3, c.vocab_size, (args.batch, args.length)).astype(
      np.int32)
  ids[:, 0] = 2  # BOS
  lengths = rng.integers(args.length // 2, args.length + 1, args.batch)
  valid = np.arange(args.length)[None] < lengths[:, None]
  ids[~valid] = 0  # pad
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    tconfig = transformers.Gemma3TextConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures",)})
    tconfig._attn_implementation = "sdpa"  # pylint: disable=protected-access
    decoder = transformers.Gemma3ForCausalLM(tconfig).model.eval().to(
        getattr(torch, args.dtype))
    sd = {k: v.float().numpy() for k, v in decoder.state_dict().items()}
    model = nnx.eval_shape(lambda: gemma.Gemma3TextModel(
        c, dtype=dtype, param_dtype=dtype))
    torch_weights.load_module(model, sd, "random Gemma-3")
    del sd
  else:
    model = gemma.Gemma3TextModel(c, dtype=dtype, param_dtype=dtype,
                                  rngs=nnx.Rngs(0))
  graph, params = nnx.split(model)
  forward = jax.jit(lambda p, i, v: nnx.merge(graph, p)(i, v))
  ours = lambda: jax.block_until_ready(forward(params, ids, valid))
  seconds = timing.median_seconds(ours, args.repeats)
  tokens = int(valid.sum())
  rows = {"tim_jax": dict(captions_per_s=args.batch / seconds,
                          real_tokens_per_s=tokens / seconds)}
  if args.torch:
    torch_ids = torch.from_numpy(ids).long()
    torch_mask = torch.from_numpy(valid.astype(np.int64))
    with torch.inference_mode():
      run = lambda: decoder(input_ids=torch_ids,
                            attention_mask=torch_mask).last_hidden_state
      t_seconds = timing.median_seconds(run, args.repeats)
      ref = run().float().numpy()
    rows["transformers"] = dict(captions_per_s=args.batch / t_seconds,
                                real_tokens_per_s=tokens / t_seconds,
                                torch_threads=torch.get_num_threads())
    got = np.asarray(ours(), np.float32)
    rows["max_rel_diff_real_tokens"] = float(
        np.abs(got[valid] - ref[valid]).max() / np.abs(ref[valid]).max())
  result = dict(config=path, layers=c.num_hidden_layers,
                hidden=c.hidden_size, batch=args.batch, length=args.length,
                dtype=args.dtype, device=str(jax.devices()[0].device_kind),
                **rows)
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
