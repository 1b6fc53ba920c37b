"""Small Gemma-3 text models with random weights in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json with a word-level tokenizer
trained on the given sentences), for the parity and end-to-end tests."""

import os

SENTENCES = [
  "a red bus at night",
  "two cats on a sofa near the window",
  "a bowl of soup",
  "mountains under a violet sky at dawn",
  "a dog",
  "an old map of the city with a compass rose",
]
SMALL = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  query_pre_attn_scalar=16,
  sliding_window=4,
  sliding_window_pattern=2,
  rope_theta=1_000_000.0,
  rope_local_base_freq=10_000.0,
  max_position_embeddings=300,
  rms_norm_eps=1e-6,
  pad_token_id=0,
  bos_token_id=2,
  eos_token_id=1,
)


def write_tokenizer(directory, sentences=SENTENCES):
  """A word-level tokenizer with Gemma's special ids and BOS first."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    sentences,
    trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]
    ),
  )
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", 2)]
  )
  tok.save(os.path.join(directory, "tokenizer.json"))
  return tok.get_vocab_size()


def write(directory, sentences=SENTENCES, seed=0, **overrides):
  """A random-weight Gemma3ForCausalLM saved with its tokenizer; returns
  the PyTorch model. Norm weights are randomised so (1 + w) matters."""
  import torch
  import transformers

  os.makedirs(directory, exist_ok=True)
  vocab = write_tokenizer(directory, sentences)
  config = transformers.Gemma3TextConfig(
    vocab_size=vocab, **dict(SMALL, **overrides)
  )
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model
