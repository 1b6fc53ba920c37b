"""The official-checkpoint converter."""

import builtins
import os

from golden_utils import CASES, GOLDEN, Golden, nchw, rel_err
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tim_jax import models
from tim_jax.weights import convert, torch_weights

pytestmark = [pytest.mark.parity]


def _official(name):
  return load_file(os.path.join(GOLDEN, name, "model.safetensors"))


@pytest.mark.parametrize("name", CASES)
def test_export_round_trips_exactly(name, tmp_path):
  g = Golden(name, jnp.float32)
  exported = convert.to_official(g.model)
  reference = _official(name)
  assert sorted(exported) == sorted(reference)
  for key, value in reference.items():
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # And through a file and back into a fresh model.
  path = str(tmp_path / "again.safetensors")
  convert.save_official(g.model, path)
  again = convert.load_official(path, g.kind, g.meta["network"])
  for key, value in convert.to_official(again).items():
    np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_released_checkpoints_without_projector_load(tmp_path):
  sd = {
    k: v
    for k, v in _official("c2i_tiny").items()
    if not k.startswith("projector.")
  }
  path = str(tmp_path / "released.safetensors")
  save_file(sd, path)
  g = Golden("c2i_tiny", jnp.float32)
  model, report = convert.load_official(
    path, "c2i", g.meta["network"], return_report=True
  )
  assert report.missing and all(
    m.startswith("projector.") for m in report.missing
  )
  assert report.unexpected == []
  out = model(g.x("fwd_x"), g.a("fwd_t"), g.a("fwd_r"), g.a("fwd_y"))
  assert rel_err(nchw(out), g.arrays["fwd_out"]) < 2e-4


def test_unexpected_and_missing_keys_are_reported(tmp_path):
  sd = dict(_official("c2i_tiny"))
  sd["extra.weight"] = np.zeros(3, np.float32)
  del sd["blocks.1.attn.qkv.bias"]
  path = str(tmp_path / "odd.safetensors")
  save_file(sd, path)
  net = Golden("c2i_tiny", jnp.float32).meta["network"]
  with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
    convert.load_official(path, "c2i", net)
  _, report = convert.load_official(
    path, "c2i", net, strict=False, return_report=True
  )
  assert report.missing == ["blocks.1.attn.qkv.bias"]
  assert report.unexpected == ["extra.weight"]


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
  net = dict(Golden("c2i_tiny", jnp.float32).meta["network"])
  net["lora_hidden_size"] = 8  # The checkpoint has 16.
  with pytest.raises(ValueError) as err:
    convert.load_official(
      os.path.join(GOLDEN, "c2i_tiny", "model.safetensors"), "c2i", net
    )
  msg = str(err.value)
  # The first mismatching tensor is the low-rank adaLN's bias.
  assert "'blocks.0.adaLN_modulation.fc1_g.bias'" in msg
  assert "(16,)" in msg and "(8,)" in msg


def test_unknown_network_parameter_is_rejected():
  with pytest.raises(ValueError, match="hidden_sise"):
    models.build("c2i", {"hidden_sise": 64})


def test_torch_checkpoint_without_torch_says_so(tmp_path, monkeypatch):
  path = tmp_path / "model.bin"
  path.write_bytes(b"not really a pickle")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="needs PyTorch"):
    convert.read_state_dict(str(path))


def test_missing_file_is_named():
  with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
    convert.read_state_dict("nowhere.safetensors")


def test_torch_pickle_is_read_when_torch_is_present(tmp_path):
  import torch

  sd = {k: torch.from_numpy(v) for k, v in _official("c2i_tiny").items()}
  path = str(tmp_path / "model.pt")
  torch.save({"ema": sd}, path)
  g = Golden("c2i_tiny", jnp.float32)
  model = convert.load_official(path, "c2i", g.meta["network"])
  out = model(g.x("fwd_x"), g.a("fwd_t"), g.a("fwd_r"), g.a("fwd_y"))
  assert rel_err(nchw(out), g.arrays["fwd_out"]) < 2e-4


def test_wrapped_and_prefixed_state_dicts_unwrap():
  sd = {"module.a.weight": np.ones(2), "module.b.bias": np.zeros(1)}
  assert sorted(torch_weights.unwrap({"model": sd})) == ["a.weight", "b.bias"]
  with pytest.raises(ValueError, match="no state_dict"):
    torch_weights.unwrap({"optimizer": {"lr": {"x": 1}}})


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".npz"])
def test_a_damaged_weight_file_is_named(tmp_path, suffix):
  from tim_jax.weights import torch_weights

  path = tmp_path / f"weights{suffix}"
  path.write_bytes(b"this is not a weight file")
  with pytest.raises(ValueError, match="cannot read the weight file") as e:
    torch_weights.read(str(path))
  assert str(path) in str(e.value)


def test_a_file_of_the_other_kind_names_the_config_it_needs():
  # A class-conditional file with a text-to-image config used to fail on a
  # tensor shape deep in the model.
  for name, other in (("c2i_tiny", "t2i"), ("t2i_tiny", "c2i")):
    net = dict(Golden(other + "_tiny", jnp.float32).meta["network"])
    with pytest.raises(ValueError, match=f"use configs/{name[:3]}.py"):
      convert.load_official(
        os.path.join(GOLDEN, name, "model.safetensors"), other, net
      )
